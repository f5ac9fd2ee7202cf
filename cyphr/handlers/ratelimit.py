"""
Rate limits, kept in this process.

Each limit allows ``count`` events per ``period`` seconds for each key (a
client address, a user, a pair of users), as a burst of ``count`` refilled
evenly over the period (the generic cell rate algorithm: one timestamp per
key). Time comes from the injected clock.

Memory: each limit's table holds one entry per key that is *busy* (its
next arrival time not yet passed: it has used part of its burst). A key
that has been idle long enough to be back at a full burst is forgotten,
since forgetting it changes nothing; idle keys are trimmed from the
table's old end on every hit, so the table follows the keys active in the last
``period``, not every key ever seen (each key is popped once in its life,
so this costs O(1) per hit, amortised). ``max_keys`` caps it besides (the
least recently used busy key goes first).
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

    def hit(self, key: Hashable, cost: int = 1) -> None:
        """Count ``cost`` events (at most the burst) for ``key``, or raise
        RateLimited with the seconds to wait. A refused event is not counted."""
        now = self._clock.seconds()
        theoretical = max(self._arrivals.get(key, now), now)
        # Room for ``cost`` events: the last of them must fit in the burst.
        ahead = theoretical - now + (cost - 1) * self._interval
        if ahead > self._burst:
            self.refused += 1
            raise RateLimited(max(1, math.ceil(ahead - self._burst)))
        arrivals = self._arrivals
        arrivals[key] = theoretical + self._interval * cost
        arrivals.move_to_end(key)  # the table stays in order of last use
        # Idle keys at the old end go as the table is used, so that keys
        # seen once (a user who came and left) do not stay until the cap.
        # (``key`` itself may go: with a tiny interval, next to the clock's
        # magnitude, it is at once back at a full burst.)
        self.expire(now)
        if len(arrivals) > self._max_keys:
            self._evict(now)

    def expire(self, now: float | None = None) -> None:
        """Forget the keys back at a full burst, from the table's old end
        (each key is popped once in its life: amortised O(1) per hit). Also
        called on a timer (build_server), for a table no longer used."""
        if now is None:
            now = self._clock.seconds()
        arrivals = self._arrivals
        while arrivals:
            oldest = next(iter(arrivals))
            if arrivals[oldest] > now:
                break
            del arrivals[oldest]

    def __len__(self) -> int:
        """Keys held now (for the memory metrics)."""
        return len(self._arrivals)

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
        def limit(name: str, rate: tuple[int, int]) -> RateLimit:
            return RateLimit(clock, *rate, max_keys=config.rate_limit_keys, name=name)

        self.auth_ip = limit("auth", config.rate_limit_auth)
        self.search = limit("search", config.rate_limit_search)
        self.claim = limit("claim", config.rate_limit_claim)
        self.password = limit("password", config.rate_limit_password)
        self.send = limit("send", config.rate_limit_send)
        self.group_create = limit("group_create", config.rate_limit_group_create)
        self.member_add = limit("member_add", config.rate_limit_member_add)
        self.provision = limit("provision", config.rate_limit_provision)
        self.link = limit("link", config.rate_limit_link)
        self.link_poll = limit("link_poll", config.rate_limit_link_poll)
        self.bundle_claim = limit("bundle_claim", config.rate_limit_bundle_claim)
        self.bundle_drain = limit("bundle_drain", config.rate_limit_bundle_drain)
        self.attachments = limit("attachments", config.rate_limit_attachments)
        # Counted in MiB (cyphr.handlers.attachments).
        self.attachment_bytes = limit("attachment_bytes", config.rate_limit_attachment_bytes)

    def all(self) -> list[RateLimit]:
        return [self.auth_ip, self.search, self.claim, self.password, self.send, self.group_create,
                self.member_add, self.provision, self.link, self.link_poll, self.bundle_claim,
                self.bundle_drain, self.attachments, self.attachment_bytes]
