"""Health of this process and of its database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

import cyphr
from cyphr.db import DatabaseUnavailable
from cyphr.store.status import StatusStore

_log = Logger()


@dataclass(frozen=True)
class RealtimeStats:
    connections: int = 0
    users: int = 0


@dataclass(frozen=True)
class HealthReport:
    version: str
    node_id: str
    uptime_seconds: int
    database_ok: bool
    database_latency_ms: float | None
    realtime: RealtimeStats

    @property
    def ok(self) -> bool:
        return self.database_ok


class PingTimeout(Exception):
    pass


def within(awaitable: Awaitable[Any], seconds: float, clock: Any) -> Deferred[Any]:
    """Fire with the result of ``awaitable``, or fail with PingTimeout after
    ``seconds``. The work itself is left to finish on its own: cancelling a
    PostgreSQL query means a blocking cancel request, which a hung server
    would turn into a hung reactor."""
    inner = ensureDeferred(awaitable)
    outer: Deferred[Any] = Deferred()

    def expire() -> None:
        if not outer.called:
            outer.errback(PingTimeout())

    timer = clock.callLater(seconds, expire)

    def succeeded(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not outer.called:
            outer.callback(result)

    def failed(failure: Any) -> None:
        if timer.active():
            timer.cancel()
        if not outer.called:
            outer.errback(failure)
        # else: a late failure is dropped, not logged as unhandled

    inner.addCallbacks(succeeded, failed)
    return outer


class HealthHandler:
    def __init__(
        self,
        status: StatusStore,
        clock: Any,
        node_id: str,
        realtime_stats: Callable[[], RealtimeStats] = RealtimeStats,
        ping_timeout: float = 2.0,
    ) -> None:
        self._status = status
        self._clock = clock
        self._node_id = node_id
        self._realtime_stats = realtime_stats
        self._ping_timeout = ping_timeout
        self._started = clock.seconds()

    async def report(self) -> HealthReport:
        started = self._clock.seconds()
        latency_ms: float | None
        try:
            await within(self._status.ping(), self._ping_timeout, self._clock)
        except (DatabaseUnavailable, PingTimeout):
            ok, latency_ms = False, None
        else:
            ok = True
            latency_ms = round((self._clock.seconds() - started) * 1000, 3)
        return HealthReport(
            version=cyphr.__version__,
            node_id=self._node_id,
            uptime_seconds=int(self._clock.seconds() - self._started),
            database_ok=ok,
            database_latency_ms=latency_ms,
            realtime=self._realtime_stats(),
        )
