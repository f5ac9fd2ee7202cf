"""
The embedded engine: SQLite on one dedicated thread.

One connection, opened and used only on the engine's own thread, in WAL mode
with foreign keys on. Work is serialised by a DeferredLock: a transaction
holds it from BEGIN to COMMIT, so no statement of another caller ever runs
inside it. Nothing touches sqlite3 on the reactor thread.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Awaitable, Callable, Sequence, TypeVar
from urllib.parse import quote

from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from cyphr.db import (
    Database,
    DatabaseUnavailable,
    IntegrityError,
    Row,
    Transaction,
    UnusableDatabase,
)
from cyphr.db.migrations import check_version

_log = Logger()
T = TypeVar("T")

# The synchronous setting of every connection (see _open_in_thread). Always
# FULL, but in the test suite (tests/__init__.py, apart from the test of
# this setting): its databases go with the test run, a power cut is not
# what it tests, and an fsync per commit adds up to many seconds there.
SYNCHRONOUS = "FULL"

# The test switch (as tahoe-lafs: util/cputhreadpool.py): tests of rules
# run each call at once on the calling thread, so that they need no thread
# hop and no real time. Never set outside tests.
_inline_for_tests = False


def run_inline_for_tests(inline: bool) -> bool:
    """Tests only: run the engine's work on the calling thread (or, with
    False, on its own thread again); answers the previous setting."""
    global _inline_for_tests
    previous, _inline_for_tests = _inline_for_tests, inline
    return previous


def _execute(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> tuple[list[Row], int]:
    try:
        cursor = conn.execute(sql, params)
        return cursor.fetchall(), cursor.rowcount
    except sqlite3.IntegrityError as e:
        raise IntegrityError(str(e)) from None


def _split_script(script: str) -> list[str]:
    """The statements of a script. sqlite3's executescript() would commit
    the open transaction first, so a migration runs statement by statement."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not all(
        not ln.strip() or ln.strip().startswith("--") for ln in current.splitlines()
    ):
        raise ValueError("schema script ends with an incomplete statement")
    return statements


class _SQLiteTransaction(Transaction):
    def __init__(self, database: SQLiteDatabase) -> None:
        self._database = database

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        rows, self.rowcount = await self._database._call(_execute, sql, tuple(params))
        return rows

    async def execute_script(self, script: str) -> None:
        for statement in _split_script(script):
            await self.execute(statement)


class SQLiteDatabase(Database):
    engine = "sqlite"

    def __init__(
        self,
        path: str,
        reactor: Any,
        *,
        on_fatal: Callable[[str], None],
        start_check: Callable[[Transaction], Awaitable[None]] | None = None,
        schema_target: int | None = None,
    ) -> None:
        super().__init__(on_fatal=on_fatal, start_check=start_check)
        self._schema_target = schema_target
        self.path = path
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="cyphr-sqlite")
        self._lock = DeferredLock()
        self._conn: sqlite3.Connection | None = None
        self._ready = False
        self._closed = False
        self._starting: Any = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def stats(self) -> dict[str, int]:
        """One connection; work waits for it in the lock's queue."""
        return {
            "size": 1,
            "up": int(self._conn is not None),
            "busy": int(self._lock.locked),
            "waiting": len(self._lock.waiting),
        }

    # -- the thread -----------------------------------------------------

    def _call(self, f: Callable[..., T], *args: Any) -> Any:
        """Run ``f(connection, *args)`` on the engine's thread."""

        def in_thread() -> T:
            if self._conn is None:
                raise DatabaseUnavailable()
            return f(self._conn, *args)

        return self._in_thread(in_thread).addErrback(self._count_failure)

    def _in_thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        if _inline_for_tests:
            return maybeDeferred(f, *args)
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _count_failure(self, failure: Any) -> Any:
        if failure.check(DatabaseUnavailable):
            self.failures["unavailable"] += 1
        elif failure.check(sqlite3.Error):
            self.failures["error"] += 1
        return failure

    def _open_in_thread(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # The connection is made, used and closed on this thread only.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            os.chmod(self.path, 0o600)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # FULL: a commit is fsynced to the WAL before it returns, so a
            # message acknowledged as stored survives power loss or an OS
            # crash, not only a killed process (NORMAL's promise). Group
            # commit pays one fsync per batch (figures in README.rst).
            conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
            conn.execute("PRAGMA busy_timeout = 5000")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_in_thread(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- lifecycle ------------------------------------------------------

    def start(self) -> None:
        self._pool.start()
        self._starting = self._lock.run(self._open_and_migrate)
        self._starting.addErrback(self._start_failed)

    async def _open_and_migrate(self) -> None:
        await self._in_thread(self._open_in_thread)
        self.schema_version = await self._transaction(self._start_txn)
        self._ready = True
        _log.info(
            "SQLite database {path} ready at schema version {version}",
            path=self.path,
            version=self.schema_version,
        )
        self._became_ready()

    def _start_failed(self, failure: Any) -> None:
        if failure.check(UnusableDatabase):
            # One line, said once (by on_fatal).
            self._fatal(failure.getErrorMessage())
            return None
        _log.failure("Cannot open the SQLite database {path}", failure, path=self.path)
        self._fatal(f"cannot open the SQLite database {self.path}: {failure.getErrorMessage()}")
        return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready = False
        if self._pool.started:
            # Taking the lock waits for the running transaction to finish.
            await self._lock.acquire()
            try:
                await self._in_thread(self._close_in_thread)
            finally:
                self._lock.release()
            self._pool.stop()

    # -- work -----------------------------------------------------------

    def _check_ready(self) -> None:
        if not self._ready:
            self.failures["unavailable"] += 1
            raise DatabaseUnavailable()

    async def run_query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._check_ready()
        async with self._lock:
            self._check_ready()
            rows, _ = await self._call(_execute, sql, tuple(params))
        return rows

    async def run_operation(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._check_ready()
        async with self._lock:
            self._check_ready()
            _, rowcount = await self._call(_execute, sql, tuple(params))
        return rowcount

    async def run_interaction(
        self, name: str, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        self._check_ready()
        async with self._lock:
            self._check_ready()
            return await self._transaction(func, *args, **kwargs)

    async def _transaction(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        # IMMEDIATE takes the write lock at BEGIN, so another process on the
        # same file cannot make this transaction fail half way.
        await self._call(_execute, "BEGIN IMMEDIATE", ())
        try:
            result = await func(_SQLiteTransaction(self), *args, **kwargs)
        except BaseException:
            await self._call(_execute, "ROLLBACK", ())
            raise
        await self._call(_execute, "COMMIT", ())
        return result


def read_schema_version(path: str) -> int | None:
    """The schema version of an existing database file, read without
    changing it; None when there is no file or no schema yet. Used once,
    before the reactor runs, to refuse a database newer than the code."""
    if not os.path.exists(path):
        return None
    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as e:
        raise UnusableDatabase(f"cannot open the SQLite database {path}: {e}") from None
    try:
        if not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchall():
            return None
        rows = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchall()
        return rows[0][0] if rows else None
    except sqlite3.DatabaseError as e:
        raise UnusableDatabase(f"{path} is not a usable SQLite database: {e}") from None
    finally:
        conn.close()


def preflight(path: str) -> None:
    """Raise SchemaTooNew if the file holds a newer schema."""
    version = read_schema_version(path)
    if version is not None:
        check_version(version, "sqlite")
