"""
Stores on a real database with no server, socket or HTTP, for the handler
and store unit tests: a World is the stores of one fresh database (SQLite,
or PostgreSQL in the tests' throwaway cluster), a task.Clock, and the few
ways the tests make users, chats and messages.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cyphr.clock import now_ms
from cyphr.db import Database
from cyphr.db.postgres import PostgresDatabase
from cyphr.db.sqlite import SQLiteDatabase
from cyphr.handlers.auth import AuthUser
from cyphr.store.chats import ChatStore
from cyphr.store.devices import DeviceStore
from cyphr.store.identities import Identity, IdentityStore, MainKey
from cyphr.store.messages import Message, MessageStore, Outgoing
from tests import postgres

START = 1_790_000_000.0  # seconds: the clock's time when a test begins


def open_sqlite(path: str, on_fatal: Callable[[str], None]) -> SQLiteDatabase:
    """The one place these tests build a database."""
    return SQLiteDatabase(path, reactor, on_fatal=on_fatal)


class World:
    """Stores on one fresh database, a clock, and the few ways the tests
    make users, chats and messages (through the stores)."""

    def __init__(self, database: Database, clock: Clock) -> None:
        self.database = database
        self.clock = clock
        self.chats = ChatStore(database)
        self.messages = MessageStore(database)
        self.identities = IdentityStore(database)
        self.devices = DeviceStore(database)

    async def user(self, cyphr_id: str) -> AuthUser:
        now = now_ms(self.clock)
        user_id = str(uuid.uuid4())
        # The store checks no key: random bytes stand for device 1's.
        key = MainKey(os.urandom(1568), os.urandom(64))
        await self.identities.create(Identity(
            id=user_id, cyphr_id=cyphr_id, public_key=os.urandom(32),
            kyber_public_key=key.kyber_public_key, kyber_key_signature=key.signature,
            kyber_key_id=None, kyber_key_created_at=None, kyber_key_expires_at=None,
            kyber_key_signature_version=1, display_name=None, avatar_url=None,
            encrypted_settings=None, tokens_valid_after=0, created_at=now, updated_at=now,
            last_seen=None, totp_enabled=False), "device", key)
        return AuthUser(user_id=user_id, cyphr_id=cyphr_id, jti=str(uuid.uuid4()),
                        expires_at=int(self.clock.seconds()) + 3600, device_hash="device",
                        device_id=1)

    async def direct(self, a: AuthUser, b: AuthUser) -> str:
        chat_id, _ = await self.chats.direct_chat(a.cyphr_id, b.cyphr_id, now_ms(self.clock))
        return chat_id

    async def group(self, creator: AuthUser, *members: AuthUser) -> str:
        return await self.chats.create_group(creator.cyphr_id, [m.cyphr_id for m in members],
                                             None, None, now_ms(self.clock))

    async def send(self, sender: AuthUser, chat_id: str, count: int = 1) -> list[Message]:
        """``count`` messages from ``sender`` in one batch, as committed."""
        items = [Outgoing(id=str(uuid.uuid4()), chat_id=chat_id, sender_id=sender.cyphr_id,
                          payload=json.dumps({"n": n}), message_type="text", client_message_id=None,
                          created_at=now_ms(self.clock)) for n in range(count)]
        stored = (await self.messages.store_batch(items)).answers
        assert all(isinstance(m, Message) for m in stored), stored
        return stored  # type: ignore[return-value]

    async def receipt_rows(self) -> list[tuple[Any, ...]]:
        """Every receipt recorded: (message id, reader, delivered at, read at)."""
        rows = await self.database.run_query(
            "SELECT message_id, user_id, delivered_at, read_at FROM message_receipts"
            " ORDER BY message_id, user_id")
        return [tuple(row) for row in rows]

    async def marks(self, chat_id: str) -> dict[str, tuple[int, int]]:
        """Each member's (read up to, delivered up to) in the chat."""
        rows = await self.database.run_query(
            "SELECT user_id, read_up_to_seq, delivered_up_to_seq FROM chat_participants"
            " WHERE chat_id = ?", (chat_id,))
        return {user: (read, delivered) for user, read, delivered in rows}


async def open_world(testcase: TestCase, engine: str = "sqlite") -> World:
    """A World on a new database (SQLite in the test's temporary directory,
    or a migrated PostgreSQL database of the shared cluster), closed when
    the test ends; the clock starts at START."""
    started: Deferred[None] = Deferred()

    def fatal(message: str) -> None:
        # Never ready: fail now rather than at the test's timeout.
        if not started.called:
            started.errback(AssertionError(f"the database cannot start: {message}"))

    database: Database
    if engine == "postgresql":
        database = PostgresDatabase(postgres.migrated_database_url(testcase), reactor, on_fatal=fatal,
                                    pool_size=2)
    else:
        directory = testcase.mktemp()
        os.makedirs(directory)
        database = open_sqlite(os.path.join(directory, "cyphr.sqlite"), fatal)
    database.when_ready().addCallback(lambda _: None if started.called else started.callback(None))
    database.start()
    testcase.addCleanup(lambda: Deferred.fromCoroutine(database.close()))
    await started
    clock = Clock()
    clock.advance(START)
    return World(database, clock)
