"""
The storage engines behind one small async interface.

SQL is written once, with ``?`` placeholders; the PostgreSQL engine turns
them into psycopg2's ``%s``. Rows come back as tuples of plain Python values
(``bytes`` for binary columns on both engines). Store modules (cyphr.store)
are the only users; they turn rows into frozen dataclasses.

A transaction is an ``async`` function taking a Transaction::

    async def _add_member_txn(txn, chat_id, user_id):
        await txn.execute("INSERT INTO ...", (chat_id, user_id))
        return await txn.execute("SELECT ...", (chat_id,))

    await database.run_interaction("add_member", _add_member_txn, chat_id, user_id)

It commits when the function returns and rolls back when it raises. Inside
it, use only the Transaction: calling the Database again from inside a
transaction waits for a connection the transaction itself may hold.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cyphr.config import Config
from cyphr.errors import DatabaseUnavailable

__all__ = [
    "Database",
    "DatabaseUnavailable",
    "IntegrityError",
    "SchemaTooNew",
    "Transaction",
    "UnusableDatabase",
    "open_database",
    "preflight",
]

Row = tuple[Any, ...]
T = TypeVar("T")
_log = Logger()


class IntegrityError(Exception):
    """A constraint refused a write (unique, foreign key, check), on either
    engine."""


class UnusableDatabase(Exception):
    """The database can never be used by this code as it is: no retry helps."""


class SchemaTooNew(UnusableDatabase):
    """The database was written by a newer version of Cyphr."""


class Transaction(ABC):
    """The handle a transaction function gets."""

    rowcount: int = -1

    @abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement; answer its rows (empty when it returns none).
        ``rowcount`` is then the number of rows it changed."""

    @abstractmethod
    async def execute_script(self, script: str) -> None:
        """Run a script of several statements without parameters (schema
        migrations)."""


class Database(ABC):
    """One database, on one engine."""

    engine: str

    def __init__(
        self,
        *,
        on_fatal: Callable[[str], None],
        start_check: Callable[[Transaction], Awaitable[None]] | None = None,
    ) -> None:
        self._ready_waiters: list[Deferred[None]] = []
        self.schema_version: int | None = None
        self._on_fatal = on_fatal
        self._schema_target: int | None = None
        # Run at start in the migration's transaction, after it; what it
        # raises keeps the database from becoming ready (build_server: the
        # check that this node has the same secrets as the others).
        self._start_check = start_check
        # For metrics: connections lost, callers answered DatabaseUnavailable,
        # statements the database failed (constraint refusals are not failures).
        self.failures = {"connection_lost": 0, "unavailable": 0, "error": 0}

    @property
    def on_fatal(self) -> Callable[[str], None]:
        """Told, once, of a condition no retry can mend (read-only: given
        to the constructor)."""
        return self._on_fatal

    @property
    @abstractmethod
    def stats(self) -> dict[str, int]:
        """The pool, for health and metrics: ``size`` (connections meant to
        be held), ``up`` (connected), ``busy`` (running work), ``waiting``
        (callers waiting for a connection)."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Connected and migrated: queries can be answered."""

    @abstractmethod
    def start(self) -> None:
        """Start connecting and migrating, without waiting. An unreachable
        database is retried with backoff until close(). The schema is
        brought to the latest version (or to ``schema_target``, given to the
        engine's constructor: tests use it to upgrade step by step)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop: wait for running work, close every connection."""

    @abstractmethod
    async def run_query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement on its own (autocommit) and answer its rows."""

    @abstractmethod
    async def run_operation(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement on its own and answer how many rows it changed."""

    @abstractmethod
    async def run_interaction(
        self,
        name: str,
        func: Callable[..., Awaitable[T]],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        """Run ``await func(txn, *args, **kwargs)`` in one transaction.
        ``name`` says what it is, for logs and metrics."""

    def when_ready(self) -> Deferred[None]:
        """A Deferred that fires once the database is ready."""
        d: Deferred[None] = Deferred()
        if self.ready:
            d.callback(None)
        else:
            self._ready_waiters.append(d)
        return d

    def _became_ready(self) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    async def _start_txn(self, txn: Transaction) -> int:
        """What the first connection does, in one transaction: migrate, then
        the start check. Answers the schema version reached."""
        from cyphr.db.migrations import migrate_txn

        version = await migrate_txn(txn, self.engine, self._schema_target)
        if self._start_check is not None:
            await self._start_check(txn)
        return version

    def _fatal(self, message: str) -> None:
        """A condition no retry can mend (a database newer than the code,
        secrets that differ from the other nodes'): ``on_fatal`` says it."""
        self._on_fatal(message)


def pg_array(values: Sequence[str | int | None]) -> str:
    """
    ``values`` as the text of a PostgreSQL array (``{"a","b\\"c",NULL,3}``),
    for a parameter cast to an array type (``?::text[]``, ``?::uuid[]``,
    ``?::bigint[]``). Every string is quoted, with ``\\`` and ``"``
    escaped (array_in's rules); None is NULL; an int is written as it is.

    psycopg2 adapts a Python list element by element, an adapter object
    and a quoting call each, into ``ARRAY['a', 'b', ...]``. The eight
    columns of a batch of 16 messages (200-byte payloads) cost the server
    83 µs to adapt that way and 39 µs this way, with the quoting of the
    eight strings: about 2.8 µs of a message's CPU. PostgreSQL's side is
    the same either way (``benchmarks/store_batch.py``, side by side).
    """
    parts = []
    for value in values:
        if value is None:
            parts.append("NULL")
        elif type(value) is int:
            parts.append(str(value))
        elif type(value) is str:
            parts.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            raise TypeError(f"pg_array takes str, int or None, not {type(value).__name__}")
    return "{" + ",".join(parts) + "}"


def open_database(
    config: Config,
    reactor: Any,
    *,
    on_fatal: Callable[[str], None],
    start_check: Callable[[Transaction], Awaitable[None]] | None = None,
) -> Database:
    """
    The engine the configuration names, not yet started. ``on_fatal`` is
    told (once) of a condition no retry can mend, such as a schema newer
    than the code; the database is then never ready. ``start_check`` runs
    in the migration's transaction, after it; what it raises keeps the
    database from becoming ready.
    """
    if config.database_engine == "postgresql":
        from cyphr.db.postgres import PostgresDatabase

        return PostgresDatabase(config.database, reactor, pool_size=config.db_pool_size,
                                on_fatal=on_fatal, start_check=start_check)
    from cyphr.db.sqlite import SQLiteDatabase

    return SQLiteDatabase(config.sqlite_path, reactor, on_fatal=on_fatal, start_check=start_check)


def preflight(config: Config) -> None:
    """Before the reactor runs: raise UnusableDatabase if the configured
    database exists and can never be used (a newer schema, not a database).
    An unreachable PostgreSQL passes: the server starts and keeps trying."""
    if config.database_engine == "postgresql":
        from cyphr.db import postgres

        postgres.preflight(config.database)
    else:
        from cyphr.db import sqlite

        sqlite.preflight(config.sqlite_path)
