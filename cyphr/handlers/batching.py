"""
Group commit, whatever is written: items that arrive while the database is
busy are written together, in one transaction, and each submitter is
answered with its own outcome after the commit.

One batch is written at a time, so items are written in the order they
came. The next batch goes to the database as soon as the last one
committed, before that one's submitters are answered, so that the database
and the reactor work side by side. Under load batches grow by themselves to
what the database can take; alone, an item waits for nobody.

Two ways to begin: with a reactor, a batch begins on the reactor's next
turn after its first item arrives, and so takes whatever else the same turn
brings (the send batcher: the messages of one read from many sockets go
together from the first); without one, at once.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cyphr.errors import DatabaseUnavailable

_log = Logger()
Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


class GroupCommit(Generic[Item, Outcome]):
    """Batches of at most ``max_batch`` items, each written by ``write``,
    which answers one outcome (or the Failure to answer with) per item, in
    order. ``write`` handles its own failures: what it raises is logged and
    its items are never answered."""

    def __init__(self, write: Callable[[list[Item]], Awaitable[list[Outcome | Failure]]],
                 max_batch: int, reactor: Any = None) -> None:
        self._write_batch = write
        self._max_batch = max_batch
        self._reactor = reactor
        self._pending: list[tuple[Item, Deferred[Outcome]]] = []
        self._scheduled: Any = None
        self._writing: Deferred[None] | None = None
        self._starting = False

    def submit(self, item: Item) -> Deferred[Outcome]:
        """Write ``item`` with whatever else arrives now; fires after the commit."""
        d: Deferred[Outcome] = Deferred()
        self._pending.append((item, d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._scheduled is not None or self._writing is not None or self._starting or not self._pending:
            return
        if self._reactor is None:
            self._start()
        else:
            self._scheduled = self._reactor.callLater(0, self._start)

    def _start(self) -> None:
        self._scheduled = None
        while True:
            batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
            self._starting = True
            try:
                writing = Deferred.fromCoroutine(self._write(batch))
            finally:
                self._starting = False
            writing.addErrback(lambda f: _log.failure("Writing a batch failed", f))
            if not writing.called:
                self._writing = writing
                return
            # Done at once (the database failed it): the rest next turn, or
            # with no reactor now (a loop, not a recursion per batch).
            if not self._pending:
                return
            if self._reactor is not None:
                self._schedule()
                return

    async def _write(self, batch: list[tuple[Item, Deferred[Outcome]]]) -> None:
        try:
            outcomes = await self._write_batch([item for item, _ in batch])
        finally:
            # The next batch goes to the database now, before this one's
            # submitters are answered: the database works on it meanwhile.
            self._writing = None
            if self._pending and not self._starting:
                if self._scheduled is not None:
                    self._scheduled.cancel()
                self._start()
        for (_, d), outcome in zip(batch, outcomes):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    async def stop(self) -> None:
        """Write what is pending, then return (the service is stopping)."""
        while self._writing is not None or self._pending:
            if self._scheduled is not None:
                self._scheduled.cancel()
                self._scheduled = None
            if self._writing is None:
                self._start()
            if self._writing is not None:
                await self._writing


async def each_alone_if_refused(write: Callable[[list[Item]], Awaitable[list[Outcome]]],
                                batch: list[Item], failed: str) -> list[Outcome | Failure]:
    """``write(batch)``'s outcomes, one an item. A database that is down
    fails them all; a batch the database refuses as a whole (a constraint,
    a deadlock with another node's batch) is written again one item at a
    time, so that each gets its own answer and none pays for another's
    trouble; an item refused alone gets its failure, logged as ``failed``."""
    try:
        return list(await write(batch))
    except DatabaseUnavailable as e:
        return [Failure(e) for _ in batch]
    except Exception:
        if len(batch) == 1:
            _log.failure(failed)
            return [Failure()]
        results: list[Outcome | Failure] = []
        for item in batch:
            results += await each_alone_if_refused(write, [item], failed)
        return results
