"""SendBatcher's and GroupCommit's scheduling, over writes the test
controls (the batches themselves are tested against both databases in
tests.test_messaging and tests.test_store_deliveries)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cyphr.errors import DatabaseUnavailable
from cyphr.handlers.batching import GroupCommit
from cyphr.handlers.sending import SendBatcher
from cyphr.store.messages import Outgoing, Stored


def outgoing(n: int) -> Outgoing:
    return Outgoing(f"id-{n}", "chat", "alice", "{}", "text", None, n)


class ControlledStore:
    """store_batch answers when the test says so."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[Outgoing], Deferred[list[Any]]]] = []

    async def store_batch(self, items: list[Outgoing], wake_ups: Any = None) -> Stored:
        d: Deferred[list[Any]] = Deferred()
        self.batches.append((items, d))
        return Stored(await d)

    def commit(self, index: int) -> None:
        items, d = self.batches[index]
        d.callback([item.stored(item.created_at, item.created_at) for item in items])


class UnavailableStore:
    """A database that is down: every batch fails at once."""

    def __init__(self) -> None:
        self.calls = 0

    async def store_batch(self, items: list[Outgoing], wake_ups: Any = None) -> Stored:
        self.calls += 1
        raise DatabaseUnavailable()


class SendBatcherTests(TestCase):
    def test_next_batch_goes_out_before_answers(self) -> None:
        """When a batch commits, the messages that gathered meanwhile go to
        the database before the committed batch's senders are answered."""
        clock, store = Clock(), ControlledStore()
        batcher = SendBatcher(store, clock)  # type: ignore[arg-type]
        first = batcher.submit(outgoing(1))
        clock.advance(0)
        self.assertEqual([[i.id for i in items] for items, _ in store.batches], [["id-1"]])
        later = [batcher.submit(outgoing(2)), batcher.submit(outgoing(3))]
        clock.advance(0)
        self.assertEqual(len(store.batches), 1)  # one batch at a time

        batches_when_answered: list[int] = []
        first.addCallback(lambda _: batches_when_answered.append(len(store.batches)))
        store.commit(0)
        self.assertEqual(batches_when_answered, [2])
        self.assertEqual([i.id for i in store.batches[1][0]], ["id-2", "id-3"])
        store.commit(1)
        self.assertEqual([self.successResultOf(d).seq for d in later], [2, 3])
        self.assertEqual(batcher.messages_stored, 3)

    def test_stop_while_the_database_fails_at_once(self) -> None:
        """Stopping ends, every sender gets the failure, when each batch
        fails before it even reaches the database."""
        clock, store = Clock(), UnavailableStore()
        batcher = SendBatcher(store, clock, max_batch=2)  # type: ignore[arg-type]
        pending = [batcher.submit(outgoing(n)) for n in range(5)]
        stopped = Deferred.fromCoroutine(batcher.stop())
        self.successResultOf(stopped)
        for d in pending:
            self.failureResultOf(d, DatabaseUnavailable)
        self.assertEqual(store.calls, 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_failures_while_running_reach_each_sender(self) -> None:
        """Batches failing at once one after the other, with no stop: each
        goes on the next turn, and every sender hears."""
        clock, store = Clock(), UnavailableStore()
        batcher = SendBatcher(store, clock, max_batch=1)  # type: ignore[arg-type]
        pending = [batcher.submit(outgoing(n)) for n in range(3)]
        for _ in range(3):
            clock.advance(0)
        for d in pending:
            self.failureResultOf(d, DatabaseUnavailable)
        self.assertEqual(store.calls, 3)


class GroupCommitTests(TestCase):
    """GroupCommit without a reactor (as the receipts handler uses it): a
    batch begins at once."""

    def writer(self, fail_at_once: bool = False
               ) -> tuple[GroupCommit[int, int], list[list[int]], list[Deferred[None]]]:
        """A GroupCommit of at most 3 items a batch whose write records each
        batch and waits for the test to commit it (or fails at once); each
        item's outcome is ten times it."""
        batches: list[list[int]] = []
        commits: list[Deferred[None]] = []

        async def write(items: list[int]) -> list[int | Failure]:
            batches.append(items)
            if fail_at_once:
                return [Failure(DatabaseUnavailable()) for _ in items]
            commit: Deferred[None] = Deferred()
            commits.append(commit)
            await commit
            return [item * 10 for item in items]
        return GroupCommit(write, 3), batches, commits

    def test_alone_at_once_then_together(self) -> None:
        """A lone item is written at once; those that arrive meanwhile go
        together in the next batch (at most max_batch), each answered with
        its own outcome."""
        group, batches, commits = self.writer()
        first = group.submit(1)
        self.assertEqual(batches, [[1]])
        later = [group.submit(n) for n in (2, 3, 4, 5)]
        self.assertEqual(batches, [[1]])
        commits[0].callback(None)
        self.assertEqual(self.successResultOf(first), 10)
        self.assertEqual(batches, [[1], [2, 3, 4]])
        commits[1].callback(None)
        self.assertEqual(batches, [[1], [2, 3, 4], [5]])
        commits[2].callback(None)
        self.assertEqual([self.successResultOf(d) for d in later], [20, 30, 40, 50])

    def test_failed_at_once_with_more_waiting(self) -> None:
        """Batches failing at once: an item submitted by an answered
        submitter's callback is written too, not left waiting."""
        group, batches, _ = self.writer(fail_at_once=True)
        again: list[Deferred[int]] = []
        first = group.submit(1)
        first.addErrback(lambda f: again.append(group.submit(2)))
        self.assertEqual(batches, [[1], [2]])
        self.failureResultOf(again[0], DatabaseUnavailable)

    def test_stop_writes_what_is_pending(self) -> None:
        """stop returns once every item submitted was written."""
        group, batches, commits = self.writer()
        pending = [group.submit(n) for n in range(1, 6)]
        stopped = Deferred.fromCoroutine(group.stop())
        for n in range(3):
            self.assertNoResult(stopped)
            commits[n].callback(None)
        self.successResultOf(stopped)
        self.assertEqual(batches, [[1], [2, 3, 4], [5]])
        self.assertEqual([self.successResultOf(d) for d in pending], [10, 20, 30, 40, 50])
