"""The Database interface, on both engines."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cyphr.db import DatabaseUnavailable, IntegrityError, Transaction, open_database
from cyphr.db.postgres import (
    MaintainedConnection,
    connection_dsn,
    dsn_connect_timeout,
    is_connection_error,
    to_pyformat,
)
from cyphr.db.sqlite import SQLiteDatabase
from tests import postgres
from tests.helpers import PostgresMixin, SQLiteMixin, make_config, start_server

NOW = 1_790_000_000_000


async def _add_identity(txn: Transaction, cyphr_id: str, key: bytes = b"\x00" * 32) -> str:
    user_id = str(uuid.uuid4())
    await txn.execute(
        "INSERT INTO cyphr_identities (id, cyphr_id, public_key, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (user_id, cyphr_id, key, NOW, NOW),
    )
    return user_id


async def _add_chat(txn: Transaction) -> str:
    chat_id = str(uuid.uuid4())
    await txn.execute(
        "INSERT INTO chats (id, chat_type, created_at, updated_at) VALUES (?, 'group', ?, ?)",
        (chat_id, NOW, NOW),
    )
    return chat_id


class DatabaseTestsMixin:
    """Behaviour both engines must share."""

    async def setUp(self) -> None:
        self.server = await start_server(self)
        self.db = self.server.database

    async def test_round_trip_of_values(self) -> None:
        """Text, integers, NULL and raw bytes come back as they went in (bytes as bytes)."""
        key = bytes(range(256)) * 6 + b"\x00\xff" * 16
        user_id = await self.db.run_interaction("add", _add_identity, "alice", key)
        rows = await self.db.run_query(
            "SELECT id, cyphr_id, public_key, created_at, last_seen FROM cyphr_identities"
            " WHERE cyphr_id = ?", ("alice",))
        self.assertEqual(rows, [(user_id, "alice", key, NOW, None)])
        self.assertIsInstance(rows[0][2], bytes)

    async def test_run_operation_counts_rows(self) -> None:
        """run_operation answers how many rows a statement changed."""
        for name in ("ann", "bob", "cat"):
            await self.db.run_interaction("add", _add_identity, name)
        changed = await self.db.run_operation(
            "UPDATE cyphr_identities SET display_name = ? WHERE cyphr_id <> ?", ("x", "bob"))
        self.assertEqual(changed, 2)

    async def test_percent_and_placeholders(self) -> None:
        """SQL is written once with ? placeholders; a literal % is just a character."""
        await self.db.run_interaction("add", _add_identity, "percent_user")
        rows = await self.db.run_query(
            "SELECT cyphr_id, '100%' FROM cyphr_identities WHERE cyphr_id LIKE ?", ("percent%",))
        self.assertEqual(rows, [("percent_user", "100%")])

    async def test_interaction_commits(self) -> None:
        """An interaction that returns commits everything it wrote, and answers its result."""
        async def txn(t: Transaction) -> int:
            await _add_identity(t, "one")
            await _add_identity(t, "two")
            rows = await t.execute("SELECT COUNT(*) FROM cyphr_identities")
            return rows[0][0]

        self.assertEqual(await self.db.run_interaction("two", txn), 2)
        rows = await self.db.run_query("SELECT cyphr_id FROM cyphr_identities ORDER BY cyphr_id")
        self.assertEqual(rows, [("one",), ("two",)])

    async def test_interaction_rolls_back_on_error(self) -> None:
        """An interaction that raises leaves nothing behind and re-raises."""
        class Boom(Exception):
            pass

        async def txn(t: Transaction) -> None:
            await _add_identity(t, "ghost")
            raise Boom()

        with self.assertRaises(Boom):
            await self.db.run_interaction("boom", txn)
        self.assertEqual(await self.db.run_query("SELECT * FROM cyphr_identities"), [])

    async def test_integrity_error(self) -> None:
        """A unique violation is cyphr.db.IntegrityError on both engines, and the transaction is undone."""
        await self.db.run_interaction("add", _add_identity, "taken")

        async def txn(t: Transaction) -> None:
            await _add_identity(t, "fresh")
            await _add_identity(t, "taken")

        with self.assertRaises(IntegrityError):
            await self.db.run_interaction("dup", txn)
        with self.assertRaises(IntegrityError):
            await self.db.run_operation(
                "INSERT INTO cyphr_identities (id, cyphr_id, public_key, created_at, updated_at)"
                " VALUES (?, 'taken', ?, 0, 0)", (str(uuid.uuid4()), b"k"))
        rows = await self.db.run_query("SELECT cyphr_id FROM cyphr_identities")
        self.assertEqual(rows, [("taken",)])

    async def test_foreign_keys_enforced(self) -> None:
        """Foreign keys hold: a member of a chat that does not exist is refused."""
        await self.db.run_interaction("add", _add_identity, "member")
        with self.assertRaises(IntegrityError):
            await self.db.run_operation(
                "INSERT INTO chat_participants (chat_id, user_id, joined_at) VALUES (?, 'member', 0)",
                (str(uuid.uuid4()),))

    async def test_cascade_on_identity_delete(self) -> None:
        """Deleting an identity removes its memberships, devices and prekeys with it."""
        user_id = await self.db.run_interaction("add", _add_identity, "leaver")
        chat_id = await self.db.run_interaction("chat", _add_chat)
        await self.db.run_operation(
            "INSERT INTO chat_participants (chat_id, user_id, joined_at) VALUES (?, 'leaver', 0)", (chat_id,))
        await self.db.run_operation(
            "INSERT INTO devices (user_id, device_id, fingerprint_hash, kyber_public_key,"
            " kyber_key_signature, kyber_key_signature_version, created_at)"
            " VALUES (?, 1, 'f', ?, ?, 1, 0)", (user_id, b"k", b"s"))
        await self.db.run_operation(
            "INSERT INTO one_time_prekeys (user_id, device_id, key_id, kyber_public_key, signature,"
            " created_at) VALUES (?, 1, 1, ?, ?, 0)", (user_id, b"k", b"s"))
        await self.db.run_operation("DELETE FROM cyphr_identities WHERE id = ?", (user_id,))
        self.assertEqual(await self.db.run_query("SELECT * FROM chat_participants"), [])
        self.assertEqual(await self.db.run_query("SELECT * FROM devices"), [])
        self.assertEqual(await self.db.run_query("SELECT * FROM one_time_prekeys"), [])

    async def test_concurrent_interactions(self) -> None:
        """Many interactions at once all complete, and none sees another's half-done work:
        a counter bumped by 30 concurrent transactions hands out 1..30 exactly once."""
        chat_id = await self.db.run_interaction("chat", _add_chat)

        async def bump(t: Transaction) -> int:
            rows = await t.execute(
                "UPDATE chats SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq", (chat_id,))
            await t.execute(
                "INSERT INTO messages (chat_id, seq, id, sender_id, encrypted_content, created_at)"
                " VALUES (?, ?, ?, 'x', '{}', 0)", (chat_id, rows[0][0], str(uuid.uuid4())))
            return rows[0][0]

        results = await gatherResults([
            Deferred.fromCoroutine(self.db.run_interaction("bump", bump)) for _ in range(30)])
        self.assertEqual(sorted(results), list(range(1, 31)))
        rows = await self.db.run_query("SELECT seq FROM messages WHERE chat_id = ? ORDER BY seq", (chat_id,))
        self.assertEqual([r[0] for r in rows], list(range(1, 31)))

    async def test_closed_database_is_unavailable(self) -> None:
        """After close, every call is answered DatabaseUnavailable at once."""
        await self.db.close()
        with self.assertRaises(DatabaseUnavailable):
            await self.db.run_query("SELECT 1")
        with self.assertRaises(DatabaseUnavailable):
            await self.db.run_interaction("x", _add_chat)


class SQLiteDatabaseTests(SQLiteMixin, DatabaseTestsMixin, TestCase):
    async def test_no_sqlite_on_the_reactor_thread(self) -> None:
        """Every statement, transactions included, runs on the engine's own thread."""
        threads: list[int] = []
        await self.db._call(lambda conn: conn.set_trace_callback(lambda _: threads.append(threading.get_ident())))
        await self.db.run_interaction("add", _add_identity, "traced")
        await self.db.run_query("SELECT * FROM cyphr_identities")
        await self.db.run_operation("UPDATE cyphr_identities SET display_name = 'x'")
        self.assertEqual(len(threads), 5)  # BEGIN, INSERT, COMMIT, SELECT, UPDATE
        self.assertNotIn(threading.get_ident(), threads)

    async def test_wal_and_foreign_keys(self) -> None:
        """The connection runs in WAL mode with foreign keys on."""
        self.assertEqual(await self.db.run_query("PRAGMA journal_mode"), [("wal",)])
        self.assertEqual(await self.db.run_query("PRAGMA foreign_keys"), [(1,)])

    async def test_file_modes(self) -> None:
        """The database file is readable by its owner only."""
        import os
        import stat

        mode = stat.S_IMODE(os.stat(self.db.path).st_mode)
        self.assertEqual(mode & 0o077, 0)


class PostgresDatabaseTests(PostgresMixin, DatabaseTestsMixin, TestCase):
    async def test_messages_are_partitioned(self) -> None:
        """messages is hash-partitioned into 100 partitions."""
        rows = await self.db.run_query(
            "SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'messages'::regclass")
        self.assertEqual(rows, [(100,)])

    async def test_pool_stats(self) -> None:
        """The pool reports its size and how many connections are up: all of
        them soon after it is ready (the first one up makes it ready)."""
        size = self.db.stats["size"]
        self.assertEqual(size, self.server.config.db_pool_size)
        self.assertGreaterEqual(self.db.stats["up"], 1)
        await wait_until(lambda: self.db.stats["up"] == size, "every connection")
        stats = self.db.stats
        self.assertEqual(stats["size"], size)
        self.assertEqual(stats["waiting"], 0)


class PlaceholderTests(TestCase):
    def test_to_pyformat(self) -> None:
        """? becomes %s and a literal % is escaped for psycopg2."""
        self.assertEqual(to_pyformat("SELECT '5%' WHERE a = ? AND b = ?"), "SELECT '5%%' WHERE a = %s AND b = %s")


class EngineChoiceTests(TestCase):
    def test_sqlite_by_default(self) -> None:
        """Without --database the engine is SQLite in the data directory."""
        config = make_config(self)
        database = open_database(config, reactor, on_fatal=self.fail)
        self.assertIsInstance(database, SQLiteDatabase)
        self.assertTrue(database.path.endswith("cyphr.sqlite3"))
        self.assertFalse(database.ready)

    async def test_not_ready_before_start(self) -> None:
        """A database that has not started answers DatabaseUnavailable, not a hang."""
        database = open_database(make_config(self), reactor, on_fatal=self.fail)
        with self.assertRaises(DatabaseUnavailable):
            await database.run_query("SELECT 1")

    def test_on_fatal_is_required(self) -> None:
        """A database is not built without someone to tell of a fatal
        condition: there is no silent default."""
        with self.assertRaises(TypeError):
            open_database(make_config(self), reactor)  # type: ignore[call-arg]


async def wait_until(predicate: Any, what: str, seconds: float = 10.0) -> None:
    deadline = reactor.seconds() + seconds
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


class Told:
    """A ConnectionObserver that writes down what it is told, in order."""

    def __init__(self) -> None:
        self.told: list[str] = []
        self.reasons: list[str] = []
        self.delays: list[float] = []

    def connection_up(self, connection: MaintainedConnection) -> None:
        self.told.append("up")

    def connection_died(self, connection: MaintainedConnection, failure: Failure) -> None:
        self.told.append("died")
        self.reasons.append(failure.getErrorMessage())

    def reconnect_failed(self, connection: MaintainedConnection, failure: Failure) -> None:
        self.told.append("failed")

    def retry_scheduled(self, connection: MaintainedConnection, failure: Failure,
                        delay: float) -> None:
        self.told.append("retry")
        self.delays.append(delay)


class _Mute(Protocol):
    """Accepts a connection and never says a word, like a server that hangs."""

    def connectionMade(self) -> None:
        self.factory.made.append(self)  # type: ignore[attr-defined]
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class MaintainedConnectionTests(TestCase):
    """One PostgreSQL connection kept up, as the pool and the bus use it."""

    timeout = 90

    def maintained(self, url: str, told: Any, connect_timeout: float | None = None
                   ) -> MaintainedConnection:
        """The connection to ``url``, with its connect_timeout (or, given,
        a deadline that libpq's whole seconds cannot express)."""
        dsn = connection_dsn(url)
        if connect_timeout is None:
            connect_timeout = dsn_connect_timeout(dsn)
        conn = MaintainedConnection(dsn, reactor, told, connect_timeout=connect_timeout)
        self.addCleanup(lambda: Deferred.fromCoroutine(conn.stop()))
        return conn

    async def test_reconnects_after_server_restart(self) -> None:
        """The connection comes up; when its server stops, the observer
        hears it died and of retries, and work fails at once; when the
        server is back, it comes up again and runs work; after stop(),
        nothing more happens and work fails."""
        cluster = await deferToThread(postgres.stoppable_cluster)  # the test stops it
        url = await deferToThread(cluster.create_database)
        told = Told()
        conn = self.maintained(url, told)
        self.assertFalse(conn.alive)
        conn.start()
        await wait_until(lambda: conn.alive, "the connection")
        self.assertEqual(told.told, ["up"])
        rows, _ = await conn.execute("SELECT 1")
        self.assertEqual(rows, [(1,)])

        await deferToThread(cluster.stop)
        await wait_until(lambda: "retry" in told.told, "a retry")
        self.assertFalse(conn.alive)
        self.assertEqual(told.told[:3], ["up", "died", "retry"])
        with self.assertRaises(Exception) as caught:
            await conn.execute("SELECT 1")
        self.assertTrue(is_connection_error(caught.exception))

        await deferToThread(cluster.start)
        await wait_until(lambda: conn.alive, "the connection again", seconds=20)
        self.assertEqual(told.told[-1], "up")
        self.assertEqual(told.told.count("died"), 1)
        self.assertTrue(all(0 < delay <= 2.4 for delay in told.delays), told.delays)
        rows = await conn.run_interaction(
            lambda cursor: cursor.execute("SELECT 2").addCallback(lambda c: c.fetchall()))
        self.assertEqual(rows, [(2,)])

        await conn.stop()
        self.assertFalse(conn.alive)
        before = list(told.told)
        with self.assertRaises(Exception):
            await conn.execute("SELECT 1")
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(told.told, before)

    async def test_attempt_deadline_and_stop(self) -> None:
        """An attempt on a server that never answers is given up at its
        connect_timeout (libpq would wait for ever) and another follows;
        stop() ends the attempt in progress at once, and none follows."""
        factory = Factory.forProtocol(_Mute)
        factory.made = made = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        async def cleanup() -> None:
            await port.stopListening()
            for protocol in made:
                protocol.transport.loseConnection()
                await protocol.closed

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        told = Told()
        # A quarter of a second: the test waits out deadlines in real time.
        conn = self.maintained(f"postgresql://postgres@127.0.0.1:{port.getHost().port}/x",
                               told, connect_timeout=0.25)
        conn.start()
        await wait_until(lambda: len(made) == 1, "an attempt")
        started = reactor.seconds()
        await wait_until(lambda: "died" in told.told, "the attempt given up", seconds=3)
        self.assertLess(reactor.seconds() - started, 0.75)
        self.assertIn("no answer from PostgreSQL within 0.25 s", told.reasons[0])
        await wait_until(lambda: len(made) == 2, "another attempt", seconds=3)

        started = reactor.seconds()
        await conn.stop()
        self.assertLess(reactor.seconds() - started, 0.5)
        await made[1].closed
        # Had stop() not ended it, this attempt would have been given up at
        # its deadline and the next one made after at most 0.6 s (backoff).
        await deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(len(made), 2)
        self.assertEqual(told.told, ["died", "retry"])

    async def test_observer_failure_does_not_stop_reconnecting(self) -> None:
        """An observer that raises is logged, and the connection keeps
        trying."""
        class Faulty(Told):
            def connection_died(self, connection: Any, failure: Failure) -> None:
                super().connection_died(connection, failure)
                raise ZeroDivisionError("observer bug")

        told = Faulty()
        conn = self.maintained("postgresql://postgres@/x?host=/nonexistent-cyphr-dir", told)
        conn.start()
        await wait_until(lambda: "failed" in told.told, "a second attempt")
        self.assertEqual(told.told[:3], ["died", "retry", "failed"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
