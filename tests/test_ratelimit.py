"""Rate limits: a burst, refilled evenly, per key, on the injected clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cyphr.errors import RateLimited
from cyphr.handlers.ratelimit import RateLimit


class RateLimitTests(TestCase):
    def test_burst_then_refused(self) -> None:
        """COUNT events pass at once; the next is refused with the seconds to wait."""
        clock = Clock()
        limit = RateLimit(clock, 100, 900)
        for _ in range(100):
            limit.hit("a")
        with self.assertRaises(RateLimited) as caught:
            limit.hit("a")
        self.assertEqual(caught.exception.headers["Retry-After"], "9")
        self.assertEqual(caught.exception.status, 429)

    def test_refill(self) -> None:
        """One event comes back every PERIOD/COUNT seconds, and no sooner."""
        clock = Clock()
        limit = RateLimit(clock, 4, 60)
        for _ in range(4):
            limit.hit("a")
        clock.advance(14.9)
        self.assertRaises(RateLimited, limit.hit, "a")
        clock.advance(0.1)
        limit.hit("a")
        self.assertRaises(RateLimited, limit.hit, "a")
        clock.advance(60)
        for _ in range(4):
            limit.hit("a")

    def test_refusals_are_not_counted(self) -> None:
        """Hammering while refused does not push the wait further out."""
        clock = Clock()
        limit = RateLimit(clock, 2, 10)
        limit.hit("a")
        limit.hit("a")
        for _ in range(50):
            self.assertRaises(RateLimited, limit.hit, "a")
        clock.advance(5)
        limit.hit("a")

    def test_keys_are_independent(self) -> None:
        """Each key has its own budget."""
        clock = Clock()
        limit = RateLimit(clock, 1, 60)
        limit.hit(("alice", "bob"))
        limit.hit(("alice", "carol"))
        self.assertRaises(RateLimited, limit.hit, ("alice", "bob"))

    def test_idle_keys_are_forgotten(self) -> None:
        """Memory is bounded: keys back at a full budget are dropped when the table fills."""
        clock = Clock()
        limit = RateLimit(clock, 1, 10, max_keys=100)
        for n in range(100):
            limit.hit(n)
        clock.advance(11)
        limit.hit("fresh")
        self.assertEqual(len(limit._arrivals), 1)

    def test_full_table_evicts_the_oldest_in_place(self) -> None:
        """When more keys than max_keys are busy at once, the least recently used are dropped, in place:
        the table never grows past max_keys and is never rebuilt."""
        clock = Clock()
        limit = RateLimit(clock, 1, 10, max_keys=100)
        table = limit._arrivals
        for n in range(150):
            limit.hit(n)
        self.assertIs(limit._arrivals, table)
        self.assertEqual(len(table), 100)
        self.assertEqual(list(table), list(range(50, 150)))
        limit.hit(0)  # forgotten: a fresh budget
        self.assertRaises(RateLimited, limit.hit, 149)  # kept: still limited
        self.assertEqual(len(table), 100)

    def test_use_keeps_a_key(self) -> None:
        """A key hit again moves to the young end, so eviction takes keys unused for longest."""
        clock = Clock()
        limit = RateLimit(clock, 2, 10, max_keys=3)
        for key in ("a", "b", "c"):
            limit.hit(key)
        limit.hit("a")
        limit.hit("d")
        self.assertEqual(list(limit._arrivals), ["c", "a", "d"])
        self.assertRaises(RateLimited, limit.hit, "a")
