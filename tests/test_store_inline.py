"""
Store unit tests on SQLite with no thread and no real time: the engine's
and the CPU pool's test switches (``tests.helpers.run_inline``) run their
work on the calling thread, and the reactor is a ``task.Clock``, so each
call completes before it returns (tahoe-lafs: test_storage_http.py with
util/cputhreadpool.py). Store tests against both engines live beside the
handlers they serve; these show the fast layer and its switches.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cyphr.cpu import CpuPool
from cyphr.db.migrations import latest_version
from cyphr.db.sqlite import SQLiteDatabase
from cyphr.store.identities import Identity, IdentityStore, IdentityTaken, MainKey
from tests.helpers import run_inline


def done(d: Any) -> Any:
    """The result of a coroutine or Deferred that must already be complete."""
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError("still waiting: something ran off the calling thread")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


# The store checks no key: random bytes stand for device 1's.
KEY = MainKey(os.urandom(1568), os.urandom(64))


def identity(cyphr_id: str, now: int = 1_790_000_000_000) -> Identity:
    return Identity(
        id=f"id-{cyphr_id}", cyphr_id=cyphr_id, public_key=os.urandom(32),
        kyber_public_key=KEY.kyber_public_key, kyber_key_signature=KEY.signature, kyber_key_id=None,
        kyber_key_created_at=None, kyber_key_expires_at=None, kyber_key_signature_version=1,
        display_name=cyphr_id.title(), avatar_url=None,
        encrypted_settings=None, tokens_valid_after=0, created_at=now, updated_at=now,
        last_seen=None, totp_enabled=False, primary_device_id=1)


class InlineStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        run_inline(self)
        self.clock = Clock()
        self.fatal: list[str] = []
        path = os.path.join(os.path.abspath(self.mktemp()), "cyphr.sqlite3")
        self.database = SQLiteDatabase(path, self.clock, on_fatal=self.fatal.append)
        self.database.start()
        self.addCleanup(lambda: done(self.database.close()))
        done(self.database.when_ready())
        self.store = IdentityStore(self.database)

    def test_started_and_migrated_at_once(self) -> None:
        """On the memory reactor with the switch on, start() opens and
        migrates the database before it returns: ready at the code's schema
        version, with nothing left to run and no time passed."""
        self.assertTrue(self.database.ready)
        self.assertEqual(self.database.schema_version, latest_version())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.fatal, [])

    def test_create_and_read_back(self) -> None:
        """A stored identity reads back equal, by Cyphr ID and by id; its
        name is then no longer available."""
        alice = identity("alice")
        self.assertTrue(done(self.store.is_available("alice")))
        done(self.store.create(alice, "f" * 64, KEY))
        self.assertEqual(done(self.store.by_cyphr_id("alice")), alice)
        self.assertEqual(done(self.store.by_id(alice.id)), alice)
        self.assertFalse(done(self.store.is_available("alice")))

    def test_taken_name_is_refused(self) -> None:
        """A second identity with a name in use is refused IdentityTaken and
        the first one is kept."""
        first = identity("alice")
        done(self.store.create(first, "f" * 64, KEY))
        with self.assertRaises(IdentityTaken):
            done(self.store.create(identity("alice"), "f" * 64, KEY))
        self.assertEqual(done(self.store.by_cyphr_id("alice")), first)

    def test_work_runs_on_the_calling_thread(self) -> None:
        """With the switch on, a transaction of several statements is done
        when the call returns (``done`` fails otherwise), and the CPU pool's
        work runs on the thread that asked (here the test's own)."""
        async def two(txn: Any) -> Any:
            await txn.execute("CREATE TABLE probe (n INTEGER)")
            await txn.execute("INSERT INTO probe VALUES (?)", (7,))
            return await txn.execute("SELECT n FROM probe")

        self.assertEqual([tuple(r) for r in done(self.database.run_interaction("probe", two))],
                         [(7,)])
        pool = CpuPool(self.clock)
        self.assertEqual(done(pool.run(threading.get_ident)), threading.get_ident())


class SwitchOffTests(SynchronousTestCase):
    def test_off_by_default(self) -> None:
        """Outside run_inline the switches are off: the server's engine and
        CPU pool keep their threads."""
        from cyphr import cpu
        from cyphr.db import sqlite

        self.assertFalse(sqlite._inline_for_tests)
        self.assertFalse(cpu._inline_for_tests)
        run_inline(self)
        self.assertTrue(sqlite._inline_for_tests and cpu._inline_for_tests)
        self.doCleanups()
        self.assertFalse(sqlite._inline_for_tests or cpu._inline_for_tests)
