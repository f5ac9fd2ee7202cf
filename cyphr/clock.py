"""Time as the server speaks it: milliseconds from the injected clock, and
the contract's ISO 8601 form. Nothing here reads the system clock."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def now_ms(clock: Any) -> int:
    """Milliseconds since the epoch, from a clock with ``seconds()``."""
    return int(clock.seconds() * 1000)


def iso(ms: int | None) -> str | None:
    """``2026-11-27T20:36:35.123Z`` from milliseconds since the epoch."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
