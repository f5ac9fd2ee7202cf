"""Time in the contract's form."""

from __future__ import annotations

from datetime import datetime, timezone

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cyphr.clock import iso, now_ms


class ClockTests(TestCase):
    def test_iso(self) -> None:
        """Milliseconds become ISO 8601 UTC with exactly three decimals and a Z, exactly."""
        self.assertEqual(iso(1_790_000_000_123), "2026-09-21T14:13:20.123Z")
        self.assertEqual(iso(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(iso(253_402_300_799_999), "9999-12-31T23:59:59.999Z")
        self.assertIsNone(iso(None))

    def test_iso_in_any_order(self) -> None:
        """Seconds in a row, back and forth, each formatted as if alone."""
        for ms in (5_999, 6_000, 6_001, 5_500, 86_399_999, 86_400_000, 0, 0, 1_790_000_000_123):
            expected = datetime.fromtimestamp(ms // 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            self.assertEqual(iso(ms), f"{expected}.{ms % 1000:03d}Z")

    def test_now_from_the_clock(self) -> None:
        """Now is read from the injected clock, in whole milliseconds."""
        clock = Clock()
        clock.advance(12.3456)
        self.assertEqual(now_ms(clock), 12345)
