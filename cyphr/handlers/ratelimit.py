"""
Rate limits, kept in this process.

Each limit allows ``count`` events per ``period`` seconds for each key (a
client address, a user, a pair of users), as a burst of ``count`` refilled
evenly over the period (the generic cell rate algorithm: one timestamp per
key). Time comes from the injected clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Hashable

from cyphr.errors import RateLimited


class RateLimit:
    def __init__(self, clock: Any, count: int, period: float, *, max_keys: int = 200_000,
                 name: str = "") -> None:
        self.name = name
        self.refused = 0  # events refused, for metrics
        self._clock = clock
        self._interval = period / count
        self._burst = period - self._interval  # how far ahead a key may run
        self._max_keys = max_keys
        # In order of last use, so the oldest go first when it is full.
        self._arrivals: OrderedDict[Hashable, float] = OrderedDict()

    def hit(self, key: Hashable) -> None:
        """Count one event for ``key``, or raise RateLimited with the seconds
        to wait. A refused event is not counted."""
        now = self._clock.seconds()
        theoretical = max(self._arrivals.get(key, now), now)
        ahead = theoretical - now
        if ahead > self._burst:
            self.refused += 1
            raise RateLimited(max(1, math.ceil(ahead - self._burst)))
        arrivals = self._arrivals
        arrivals[key] = theoretical + self._interval
        arrivals.move_to_end(key)  # the table stays in order of last use
        if len(arrivals) > self._max_keys:
            self._evict(now)

    def _evict(self, now: float) -> None:
        """
        Bring the table back within ``max_keys`` in place, never rebuilding
        it, from its old end (least recently used first). Idle keys go first:
        one whose next arrival time has passed is back at a full burst, and
        forgetting it changes nothing; the run of idle keys at the old end
        goes at once, so each key costs one pop in its life. Only when more
        than ``max_keys`` keys are busy at once is a busy one forgotten, the
        one unused for longest (it may burst again: the price of a bounded
        table).
        """
        arrivals = self._arrivals
        while arrivals:
            oldest = next(iter(arrivals))  # O(1): an OrderedDict's linked list
            if arrivals[oldest] > now and len(arrivals) <= self._max_keys:
                break
            del arrivals[oldest]


class RateLimits:
    """The server's named limits, from the configuration."""

    def __init__(self, clock: Any, config: Any) -> None:
        self.auth_ip = RateLimit(clock, *config.rate_limit_auth, name="auth")
        self.search = RateLimit(clock, *config.rate_limit_search, name="search")
        self.claim = RateLimit(clock, *config.rate_limit_claim, name="claim")
        self.password = RateLimit(clock, *config.rate_limit_password, name="password")
        self.send = RateLimit(clock, *config.rate_limit_send, name="send")
        self.group_create = RateLimit(clock, *config.rate_limit_group_create, name="group_create")
        self.member_add = RateLimit(clock, *config.rate_limit_member_add, name="member_add")

    def all(self) -> list[RateLimit]:
        return [self.auth_ip, self.search, self.claim, self.password, self.send, self.group_create,
                self.member_add]
