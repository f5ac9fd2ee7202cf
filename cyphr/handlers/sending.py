"""
Group commit of messages (cyphr.handlers.batching): messages that arrive
in the same moment are stored together, in one transaction and one
multi-row statement, and each sender is answered after the commit.

A batch starts on the next turn of the reactor after the first message
arrives; while it is being written, newcomers gather for the next one. So a
lone message waits for nobody, and under load batches grow by themselves to
what the database can take. One batch is written at a time, so messages are
stored in the order they came; the next one goes to the database as soon as
the last one committed, before that one's senders are answered and its
messages fanned out, so that the database and the reactor work side by side.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from cyphr.handlers.batching import GroupCommit, each_alone_if_refused
from cyphr.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram
from cyphr.store.messages import Message, MessageStore, NotAMember, Outgoing
from cyphr.store.push import WakeUps

MAX_BATCH = 500


class WakeUpQueue(Protocol):
    """Who queues push wake-ups with each batch (cyphr.handlers.push.PushHandler)."""

    def wake_ups(self) -> WakeUps:
        """The wake-ups to queue with a batch stored now."""

    def queued(self, count: int) -> None:
        """A batch queued ``count`` wake-ups."""


class SendBatcher:
    def __init__(self, store: MessageStore, reactor: Any, max_batch: int = MAX_BATCH,
                 wake_ups: WakeUpQueue | None = None) -> None:
        self._store = store
        self._reactor = reactor
        self._wake_ups = wake_ups
        self._batches: GroupCommit[Outgoing, Message | NotAMember] = GroupCommit(
            self._outcomes, max_batch, reactor)
        self.batch_sizes: list[int] = []  # the last few, for tests
        # For metrics: counted per batch, not per message.
        self.messages_stored = 0
        self.size_histogram = Histogram(BATCH_BUCKETS)
        self.commit_histogram = Histogram(LATENCY_BUCKETS)

    def submit(self, item: Outgoing) -> Deferred[Message | NotAMember]:
        """Store ``item`` with whatever else arrives now; fires after the commit."""
        return self._batches.submit(item)

    async def _outcomes(self, batch: list[Outgoing]) -> list[Message | NotAMember | Failure]:
        """Each message's outcome: its stored message, NotAMember, or the
        failure to answer its sender with. Something in a batch that makes
        the whole transaction fail (say a resend racing on another node)
        has each message stored on its own."""
        return await each_alone_if_refused(self._store_batch, batch, "Storing a message failed")

    async def _store_batch(self, batch: list[Outgoing]) -> list[Message | NotAMember]:
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-100:]
        self.size_histogram.observe(len(batch))
        started = self._reactor.seconds()
        wake_ups = self._wake_ups
        stored = await self._store.store_batch(batch, wake_ups.wake_ups() if wake_ups is not None else None)
        self.commit_histogram.observe(self._reactor.seconds() - started)
        if wake_ups is not None:
            wake_ups.queued(stored.woken)
        self.messages_stored += sum(not isinstance(answer, NotAMember) for answer in stored.answers)
        return list(stored.answers)

    async def stop(self) -> None:
        """Write what is pending, then return (the service is stopping)."""
        await self._batches.stop()
