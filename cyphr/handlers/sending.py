"""
Group commit: messages that arrive in the same moment are stored together,
in one transaction and one multi-row statement, and each sender is answered
after the commit.

A batch starts on the next turn of the reactor after the first message
arrives; while it is being written, newcomers gather for the next one. So a
lone message waits for nobody, and under load batches grow by themselves to
what the database can take.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cyphr.errors import DatabaseUnavailable
from cyphr.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram
from cyphr.store.messages import Message, MessageStore, NotAMember, Outgoing

_log = Logger()
MAX_BATCH = 500


class SendBatcher:
    def __init__(self, store: MessageStore, reactor: Any, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._reactor = reactor
        self._max_batch = max_batch
        self._pending: list[tuple[Outgoing, Deferred[Message | NotAMember]]] = []
        self._scheduled: Any = None
        self._writing: Deferred[None] | None = None
        self.batch_sizes: list[int] = []  # the last few, for tests
        # For metrics: counted per batch, not per message.
        self.messages_stored = 0
        self.size_histogram = Histogram(BATCH_BUCKETS)
        self.commit_histogram = Histogram(LATENCY_BUCKETS)

    def submit(self, item: Outgoing) -> Deferred[Message | NotAMember]:
        """Store ``item`` with whatever else arrives now; fires after the commit."""
        d: Deferred[Message | NotAMember] = Deferred()
        self._pending.append((item, d))
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._scheduled is None and self._writing is None and self._pending:
            self._scheduled = self._reactor.callLater(0, self._start)

    def _start(self) -> None:
        self._scheduled = None
        batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
        self._writing = Deferred.fromCoroutine(self._write(batch))
        self._writing.addBoth(self._written)

    def _written(self, result: Any) -> None:
        self._writing = None
        self._schedule()

    async def _write(self, batch: list[tuple[Outgoing, Deferred[Message | NotAMember]]]) -> None:
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-100:]
        self.size_histogram.observe(len(batch))
        started = self._reactor.seconds()
        try:
            results = await self._store.store_batch([item for item, _ in batch])
        except DatabaseUnavailable as e:
            for _, d in batch:
                d.errback(e)
            return
        except Exception:
            if len(batch) == 1:
                _log.failure("Storing a message failed")
                batch[0][1].errback()
                return
            # Something in the batch made the whole transaction fail (say a
            # resend racing on another node): store each on its own, so that
            # every sender gets its own answer and nobody pays for another.
            for entry in batch:
                await self._write([entry])
            return
        self.commit_histogram.observe(self._reactor.seconds() - started)
        stored = 0
        for (_, d), result in zip(batch, results):
            if not isinstance(result, NotAMember):
                stored += 1
            d.callback(result)
        self.messages_stored += stored

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


