"""
Rate limits, kept in this process.

Each limit allows ``count`` events per ``period`` seconds for each key (a
client address, a user, a pair of users), as a burst of ``count`` refilled
evenly over the period (the generic cell rate algorithm: one timestamp per
key). Time comes from the injected clock.
"""

from __future__ import annotations

import math
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
        self._arrivals: dict[Hashable, float] = {}

    def hit(self, key: Hashable) -> None:
        """Count one event for ``key``, or raise RateLimited with the seconds
        to wait. A refused event is not counted."""
        now = self._clock.seconds()
        theoretical = max(self._arrivals.get(key, now), now)
        ahead = theoretical - now
        if ahead > self._burst:
            self.refused += 1
            raise RateLimited(max(1, math.ceil(ahead - self._burst)))
        self._arrivals[key] = theoretical + self._interval
        if len(self._arrivals) > self._max_keys:
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        # A key whose next arrival time has passed is back at a full burst:
        # forgetting it changes nothing.
        self._arrivals = {k: t for k, t in self._arrivals.items() if t > now}


class RateLimits:
    """The server's named limits, from the configuration."""

    def __init__(self, clock: Any, config: Any) -> None:
        self.auth_ip = RateLimit(clock, *config.rate_limit_auth, name="auth")
        self.search = RateLimit(clock, *config.rate_limit_search, name="search")
        self.claim = RateLimit(clock, *config.rate_limit_claim, name="claim")
        self.password = RateLimit(clock, *config.rate_limit_password, name="password")
        self.send = RateLimit(clock, *config.rate_limit_send, name="send")

    def all(self) -> list[RateLimit]:
        return [self.auth_ip, self.search, self.claim, self.password, self.send]
