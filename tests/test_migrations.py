"""Schema migrations, on both engines."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from cyphr.db import Database, SchemaTooNew, Transaction
from cyphr.db import migrations as migrations_module
from cyphr.db.migrations import (
    Migration,
    dump_schema,
    latest_version,
    migrate_txn,
    migrations,
)
from cyphr.db.postgres import PostgresDatabase
from cyphr.db.postgres import preflight as postgres_preflight
from cyphr.db.sqlite import SQLiteDatabase
from cyphr.db.sqlite import preflight as sqlite_preflight
from tests import postgres


class MigrationTestsMixin:
    def new_location(self) -> str:
        raise NotImplementedError

    def open(self, location: str, target: int | None = None) -> Database:
        raise NotImplementedError

    async def started(self, location: str, target: int | None = None) -> Database:
        database = self.open(location, target)
        database.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(database.close()))
        await database.when_ready()
        return database

    def setUp(self) -> None:
        self.fatal: list[str] = []

    async def test_fresh_equals_step_by_step(self) -> None:
        """A database created at the latest version equals one upgraded one
        version at a time, with a restart between versions."""
        fresh = await self.started(self.new_location())
        self.assertEqual(fresh.schema_version, latest_version(fresh.engine))

        location = self.new_location()
        for version in range(1, latest_version(fresh.engine) + 1):
            stepped = await self.started(location, target=version)
            self.assertEqual(stepped.schema_version, version)
            if version < latest_version(fresh.engine):
                await stepped.close()
        self.assertEqual(await dump_schema(stepped), await dump_schema(fresh))
        self.assertGreater(len(await dump_schema(fresh)), 10)

    async def test_restart_changes_nothing(self) -> None:
        """Starting again on an up-to-date database applies nothing and keeps the data."""
        location = self.new_location()
        first = await self.started(location)
        await first.run_operation(
            "INSERT INTO chats (id, created_at, updated_at) VALUES (?, 0, 0)",
            ("00000000-0000-4000-8000-000000000001",))
        before = await dump_schema(first)
        await first.close()
        second = await self.started(location)
        self.assertEqual(await dump_schema(second), before)
        self.assertEqual(len(await second.run_query("SELECT id FROM chats")), 1)

    async def test_too_new_is_refused(self) -> None:
        """A database whose schema is newer than the code is refused with a
        clear message and never served."""
        location = self.new_location()
        database = await self.started(location)
        await database.run_operation("UPDATE schema_version SET version = ?", (latest_version() + 1,))
        await database.close()

        refused = self.open(location)
        refused.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(refused.close()))
        for _ in range(200):
            if self.fatal:
                break
            await deferLater(0.01)
        # Every connection of the pool comes up in the meantime: the
        # refusal is still reported once.
        await deferLater(0.3)
        self.assertEqual(len(self.fatal), 1)
        self.assertIn("newer Cyphr", self.fatal[0])
        self.assertFalse(refused.ready)
        with self.assertRaises(SchemaTooNew):
            self.preflight(location)

    async def test_failed_migration_changes_nothing(self) -> None:
        """Pending migrations apply in one transaction: when one fails, none is applied."""
        database = await self.started(self.new_location(), target=1)
        real = migrations(database.engine)
        broken = real + (Migration(len(real) + 1, "broken", "CREATE TABLE half_done (x INTEGER);\nNOT SQL;\n"),)
        self.patch(migrations_module, "migrations", lambda engine: broken)
        self.patch(migrations_module, "latest_version", lambda engine="sqlite": len(broken))

        async def upgrade(txn: Transaction) -> int:
            return await migrate_txn(txn, database.engine)

        with self.assertRaises(Exception):
            await database.run_interaction("upgrade", upgrade)
        self.assertEqual(await database.run_query("SELECT version FROM schema_version"), [(1,)])
        with self.assertRaises(Exception):
            await database.run_query("SELECT * FROM chats")
        with self.assertRaises(Exception):
            await database.run_query("SELECT * FROM half_done")


class V2SignaturesMigrationMixin:
    """Schema 006 (v2 signatures) on a database holding data from before."""

    async def test_upgrade_keeps_v1_keys_as_version_1(self) -> None:
        """Upgrading from schema 5, an identity's main key and its one-time
        prekeys become signature version 1 with no id nor times, the
        recovery phrase hint column is gone with its values, and the pin
        backup table exists (empty) and cascades with the identity."""
        location = self.new_location()
        old = await self.started(location, target=5)
        user_id = "00000000-0000-4000-8000-000000000001"
        await old.run_operation(
            "INSERT INTO cyphr_identities (id, cyphr_id, public_key, kyber_public_key, kyber_key_signature,"
            " recovery_phrase_hint, created_at, updated_at) VALUES (?, 'olduser', ?, ?, ?, 'my dog', 0, 0)",
            (user_id, b"k" * 32, b"m" * 1568, b"s" * 64))
        await old.run_operation(
            "INSERT INTO one_time_prekeys (user_id, key_id, kyber_public_key, signature, created_at)"
            " VALUES (?, 7, ?, ?, 0)", (user_id, b"p" * 1568, b"s" * 64))
        await old.close()
        new = await self.started(location, target=6)
        self.assertEqual(new.schema_version, 6)
        self.assertEqual(await new.run_query(
            "SELECT kyber_key_id, kyber_key_created_at, kyber_key_expires_at, kyber_key_signature_version"
            " FROM cyphr_identities"), [(None, None, None, 1)])
        self.assertEqual(await new.run_query(
            "SELECT key_id, key_created_at, key_expires_at, signature_version FROM one_time_prekeys"),
            [(7, None, None, 1)])
        with self.assertRaises(Exception):
            await new.run_query("SELECT recovery_phrase_hint FROM cyphr_identities")
        await new.run_operation("INSERT INTO pin_backups (user_id, blob, updated_at) VALUES (?, ?, 1)",
                                (user_id, b"sealed"))
        await new.run_operation("DELETE FROM cyphr_identities WHERE id = ?", (user_id,))
        self.assertEqual(await new.run_query("SELECT COUNT(*) FROM pin_backups"), [(0,)])


class DevicesMigrationMixin:
    """Schema 010 (devices) on a database holding data from before."""

    async def test_upgrade_moves_the_device_and_its_key_to_device_1(self) -> None:
        """Upgrading from schema 9, an identity's fingerprint hash, main key
        (with its id, times and signature version), token cut-off and last
        seen move to its device 1, its prekeys become device 1's, its next
        device id is 2, and the identity's own columns for them are gone. An
        identity that had no device (no fingerprint) gets none, and its
        prekeys, which no device holds, go."""
        location = self.new_location()
        old = await self.started(location, target=9)
        alice, ghost = "00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"
        await old.run_operation(
            "INSERT INTO cyphr_identities (id, cyphr_id, public_key, kyber_public_key,"
            " kyber_key_signature, kyber_key_id, kyber_key_created_at, kyber_key_expires_at,"
            " kyber_key_signature_version, device_fingerprint_hash, tokens_valid_after, created_at,"
            " updated_at, last_seen) VALUES (?, 'alice', ?, ?, ?, 4, 10, 20, 2, ?, 5000, 1, 2, 3)",
            (alice, b"k" * 32, b"m" * 1568, b"s" * 64, "f" * 64))
        await old.run_operation(
            "INSERT INTO cyphr_identities (id, cyphr_id, public_key, kyber_public_key,"
            " kyber_key_signature, created_at, updated_at) VALUES (?, 'ghost', ?, ?, ?, 0, 0)",
            (ghost, b"g" * 32, b"m" * 1568, b"s" * 64))
        for user in (alice, ghost):
            await old.run_operation(
                "INSERT INTO one_time_prekeys (user_id, key_id, kyber_public_key, signature, created_at,"
                " key_created_at, key_expires_at, signature_version) VALUES (?, 7, ?, ?, 0, 1, 2, 2)",
                (user, b"p" * 1568, b"s" * 64))
        await old.close()
        new = await self.started(location, target=10)
        rows = await new.run_query(
            "SELECT user_id, device_id, fingerprint_hash, encrypted_name, kyber_public_key,"
            " kyber_key_signature, kyber_key_id, kyber_key_created_at, kyber_key_expires_at,"
            " kyber_key_signature_version, tokens_valid_after, created_at, last_seen FROM devices")
        self.assertEqual([tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                          for row in rows],
                         [(alice, 1, "f" * 64, None, b"m" * 1568, b"s" * 64, 4, 10, 20, 2, 5000, 1, 3)])
        self.assertEqual(await new.run_query(
            "SELECT user_id, device_id, key_id, key_created_at, key_expires_at, signature_version"
            " FROM one_time_prekeys"), [(alice, 1, 7, 1, 2, 2)])
        self.assertEqual(await new.run_query(
            "SELECT cyphr_id, next_device_id FROM cyphr_identities ORDER BY cyphr_id"),
            [("alice", 2), ("ghost", 1)])
        for column in ("device_fingerprint_hash", "kyber_public_key", "kyber_key_signature_version"):
            with self.assertRaises(Exception):
                await new.run_query(f"SELECT {column} FROM cyphr_identities")
        await new.run_operation("DELETE FROM cyphr_identities WHERE id = ?", (alice,))
        self.assertEqual(await new.run_query("SELECT COUNT(*) FROM devices"), [(0,)])
        self.assertEqual(await new.run_query("SELECT COUNT(*) FROM one_time_prekeys"), [(0,)])


class DeviceDeliveryMigrationMixin:
    """Schema 012 (delivery per device) on a database holding data from before."""

    async def test_upgrade_gives_device_1_the_members_marks(self) -> None:
        """Upgrading from schema 11, each member's delivered mark becomes
        its device 1's mark in that chat, and its receipts for messages past
        the mark (acknowledged out of order) become device 1's receipts;
        receipts at or below the mark are not copied."""
        location = self.new_location()
        old = await self.started(location, target=11)
        alice = "00000000-0000-4000-8000-000000000001"
        chat = "00000000-0000-4000-8000-0000000000c1"
        await old.run_operation(
            "INSERT INTO cyphr_identities (id, cyphr_id, public_key, created_at, updated_at)"
            " VALUES (?, 'alice', ?, 0, 0)", (alice, b"k" * 32))
        await old.run_operation(
            "INSERT INTO devices (user_id, device_id, fingerprint_hash, kyber_public_key,"
            " kyber_key_signature, kyber_key_signature_version, created_at)"
            " VALUES (?, 1, 'f', ?, ?, 2, 0)", (alice, b"m" * 1568, b"s" * 64))
        await old.run_operation(
            "INSERT INTO chats (id, chat_type, created_at, updated_at, last_seq)"
            " VALUES (?, 'group', 0, 0, 4)", (chat,))
        await old.run_operation(
            "INSERT INTO chat_participants (chat_id, user_id, joined_at, delivered_up_to_seq)"
            " VALUES (?, 'alice', 0, 2)", (chat,))
        ids = [f"00000000-0000-4000-8000-00000000000{n}" for n in range(1, 5)]
        for seq, message_id in enumerate(ids, start=1):
            await old.run_operation(
                "INSERT INTO messages (chat_id, seq, id, sender_id, encrypted_content, created_at,"
                " stream_position) VALUES (?, ?, ?, 'bob', '{}', 0, ?)", (chat, seq, message_id, seq))
        for message_id in (ids[1], ids[3]):  # seq 2 (within the mark) and seq 4 (past it)
            await old.run_operation(
                "INSERT INTO message_receipts (chat_id, message_id, user_id, delivered_at)"
                " VALUES (?, ?, 'alice', 1)", (chat, message_id))
        await old.close()
        new = await self.started(location, target=12)
        self.assertEqual([tuple(str(v) if not isinstance(v, int) else v for v in row)
                          for row in await new.run_query(
                              "SELECT user_id, device_id, chat_id, delivered_up_to_seq"
                              " FROM device_deliveries")], [(alice, 1, chat, 2)])
        self.assertEqual([(str(row[0]), row[1], str(row[2])) for row in await new.run_query(
            "SELECT user_id, device_id, message_id FROM device_receipts")], [(alice, 1, ids[3])])


class HistoryBackupsMigrationMixin:
    """Schema 017 (history backups) on a database holding an identity."""

    async def test_upgrade_adds_history_backups(self) -> None:
        """Upgrading from schema 16, the history backup table exists (empty),
        holds one blob per identity and goes with the identity."""
        location = self.new_location()
        old = await self.started(location, target=16)
        alice = "00000000-0000-4000-8000-000000000001"
        await old.run_operation(
            "INSERT INTO cyphr_identities (id, cyphr_id, public_key, created_at, updated_at)"
            " VALUES (?, 'alice', ?, 0, 0)", (alice, b"k" * 32))
        await old.close()
        new = await self.started(location, target=17)
        self.assertEqual(await new.run_query("SELECT COUNT(*) FROM history_backups"), [(0,)])
        await new.run_operation("INSERT INTO history_backups (user_id, blob, updated_at)"
                                " VALUES (?, ?, 1)", (alice, b"sealed"))
        with self.assertRaises(Exception):
            await new.run_operation("INSERT INTO history_backups (user_id, blob, updated_at)"
                                    " VALUES (?, ?, 2)", (alice, b"again"))
        await new.run_operation("DELETE FROM cyphr_identities WHERE id = ?", (alice,))
        self.assertEqual(await new.run_query("SELECT COUNT(*) FROM history_backups"), [(0,)])


async def deferLater(seconds: float) -> None:
    from twisted.internet.task import deferLater as later

    await later(reactor, seconds, lambda: None)


class SQLiteMigrationTests(V2SignaturesMigrationMixin, DevicesMigrationMixin,
                           DeviceDeliveryMigrationMixin, HistoryBackupsMigrationMixin,
                           MigrationTestsMixin, TestCase):
    def new_location(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return os.path.join(directory, "cyphr.sqlite3")

    def open(self, location: str, target: int | None = None) -> Database:
        return SQLiteDatabase(location, reactor, on_fatal=self.fatal.append, schema_target=target)

    def preflight(self, location: str) -> None:
        sqlite_preflight(location)

    def test_preflight_on_missing_file(self) -> None:
        """A database file that does not exist yet passes the preflight check."""
        sqlite_preflight(os.path.join(self.mktemp(), "none.sqlite3"))


class PostgresMigrationTests(V2SignaturesMigrationMixin, DevicesMigrationMixin,
                             DeviceDeliveryMigrationMixin, HistoryBackupsMigrationMixin,
                             MigrationTestsMixin, TestCase):
    def new_location(self) -> str:
        return postgres.database_url()

    def open(self, location: str, target: int | None = None) -> Database:
        return PostgresDatabase(location, reactor, on_fatal=self.fatal.append, pool_size=2,
                                schema_target=target)

    def preflight(self, location: str) -> None:
        postgres_preflight(location)


class TwinTests(TestCase):
    """The SQLite and PostgreSQL schemas describe the same tables and columns."""

    async def columns(self, database: Database) -> dict[str, set[str]]:
        if database.engine == "sqlite":
            tables = await database.run_query(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
            result = {}
            for (table,) in tables:
                rows = await database.run_query("SELECT name FROM pragma_table_info(?)", (table,))
                result[table] = {r[0] for r in rows}
            return result
        rows = await database.run_query(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c"
            " JOIN pg_class t ON t.relname = c.table_name"
            " WHERE c.table_schema = 'public' AND NOT t.relispartition")
        result: dict[str, set[str]] = {}
        for table, column in rows:
            result.setdefault(table, set()).add(column)
        return result

    async def open_started(self, database: Database) -> Database:
        database.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(database.close()))
        await database.when_ready()
        return database

    async def test_same_tables_and_columns(self) -> None:
        """Every table has the same columns on both engines."""
        directory = self.mktemp()
        os.makedirs(directory)
        fatal: list[str] = []
        lite = await self.open_started(
            SQLiteDatabase(os.path.join(directory, "db.sqlite3"), reactor, on_fatal=fatal.append))
        pg = await self.open_started(PostgresDatabase(postgres.database_url(), reactor,
                                                      on_fatal=fatal.append, pool_size=1))
        self.assertEqual(await self.columns(lite), await self.columns(pg))
        self.assertEqual(fatal, [])

    def test_versions_are_dense(self) -> None:
        """Migration files are numbered 1..N on both engines, named alike."""
        lite, pg = migrations("sqlite"), migrations("postgresql")
        self.assertEqual([m.version for m in lite], list(range(1, len(lite) + 1)))
        self.assertEqual([(m.version, m.name) for m in lite], [(m.version, m.name) for m in pg])
