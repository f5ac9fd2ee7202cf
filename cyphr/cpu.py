"""
A thread pool for CPU-heavy work (Argon2, batches of key checks), so that it
never runs on the reactor thread. Started on first use and stopped with the
service (or, at the latest, when the reactor shuts down); as many threads as
cores, so that the work cannot take more than the machine has. The blob
stores (cyphr.blobs) keep a pool of their own for disk and network work.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

# The test switch (tahoe-lafs: util/cputhreadpool.py): tests of rules run
# the work at once on the calling thread. Never set outside tests.
_inline_for_tests = False


def run_inline_for_tests(inline: bool) -> bool:
    """Tests only: run CpuPool work on the calling thread (or, with False,
    on the pool again); answers the previous setting."""
    global _inline_for_tests
    previous, _inline_for_tests = _inline_for_tests, inline
    return previous


class CpuPool:
    def __init__(self, reactor: Any, threads: int | None = None, name: str = "cyphr-cpu") -> None:
        self._reactor = reactor
        self._threads = threads or max(1, os.cpu_count() or 1)
        self._name = name
        self._pool: ThreadPool | None = None

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        if _inline_for_tests:
            return maybeDeferred(f, *args, **kwargs)
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self._threads, name=self._name)
            self._pool.start()
            self._trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._end)
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def stop(self) -> None:
        """Wait for running work, then end the threads; a later run() starts anew."""
        if self._pool is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._end()

    def _end(self) -> None:
        # Also the reactor's shutdown trigger, which is not there to remove
        # while it runs (removing it then raised, and left the threads).
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
