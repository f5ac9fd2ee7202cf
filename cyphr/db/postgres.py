"""
The PostgreSQL engine: a pool of txpostgres connections that heals itself.

txpostgres's own ConnectionPool never recovers once PostgreSQL restarts.
Here each connection is a MaintainedConnection, the one place that keeps a
PostgreSQL connection up: when it dies (a query fails with a connection
error, or the idle socket closes), it reconnects with a short backoff and a
deadline on each attempt, telling its owner at each step. The pool takes a
dead connection out and puts it back when it answers again; while no
connection is up, callers are answered DatabaseUnavailable at once (503 to
HTTP clients) rather than left hanging. The event bus (cyphr.realtime.bus)
keeps its LISTEN connection up with the same class.

The first connection that comes up applies the schema migrations; the pool
serves queries only after that.
"""

from __future__ import annotations

import random
from collections import deque
from contextlib import suppress
from functools import lru_cache
from typing import Any, Awaitable, Callable, Iterator, Protocol, Sequence, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector

from cyphr._compat import locked_call
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


@lru_cache(maxsize=4096)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders to psycopg2's ``%s``, with literal ``%`` escaped,
    so that SQL is written once for both engines."""
    return sql.replace("%", "%%").replace("?", "%s")


def _bytea(value: str | None, cursor: Any) -> bytes | None:
    return None if value is None else bytes(psycopg2.BINARY(value, cursor))


# BYTEA values (and arrays of them) come back as bytes, as SQLite's do, rather
# than psycopg2's memoryview: rows are then handed on as psycopg2 makes them,
# where converting every value of every row cost about 3 µs a stored message.
# Registered for the process (cyphr's own connections are its only ones).
_BYTEA = psycopg2.extensions.new_type(psycopg2.BINARY.values, "CYPHR_BYTEA", _bytea)
psycopg2.extensions.register_type(_BYTEA)
psycopg2.extensions.register_type(
    psycopg2.extensions.new_array_type((1001,), "CYPHR_BYTEA_ARRAY", _BYTEA))


def _fetch(cursor: Any) -> list[Row]:
    if cursor.description is None:
        return []
    return cursor.fetchall()


def is_connection_error(error: BaseException) -> bool:
    """Did this fail because the connection (or the server) went away,
    rather than because of the statement?"""
    if isinstance(error, (ConnectionDead, txpostgres.RollbackFailed, psycopg2.InterfaceError)):
        return True
    if isinstance(error, psycopg2.OperationalError):
        # Cancelled statements, deadlocks and serialisation failures are
        # OperationalErrors too, but the connection is fine.
        return not isinstance(
            error,
            (psycopg2.errors.QueryCanceled, psycopg2.extensions.TransactionRollbackError),
        )
    return False


def _death_checker(failure: Failure) -> bool:
    return is_connection_error(failure.value)


def backoff(initial: float = 0.25, maximum: float = 2.0) -> Iterator[float]:
    """Reconnection delays: short, since an outage of PostgreSQL is usually a
    restart, with jitter so that the connections do not reconnect in step."""
    delay = initial
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, maximum)


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, for logs: host, port and database name; never a
    password, a user or another parameter."""
    params = psycopg2.extensions.parse_dsn(dsn)
    host = params.get("host") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"{host}{port}/{params.get('dbname', '')}"


def connection_dsn(url: str) -> str:
    """The URL with the connection settings a server wants unless the
    operator chose otherwise: a connect timeout, and TCP keepalives so that
    a vanished server is noticed within seconds."""
    params = psycopg2.extensions.parse_dsn(url)
    params.setdefault("connect_timeout", "5")
    params.setdefault("application_name", "cyphr")
    params.setdefault("keepalives", "1")
    params.setdefault("keepalives_idle", "10")
    params.setdefault("keepalives_interval", "3")
    params.setdefault("keepalives_count", "3")
    return psycopg2.extensions.make_dsn(**params)


def dsn_connect_timeout(dsn: str) -> float:
    """The connect_timeout of ``dsn``, in seconds (connection_dsn always sets
    one): the deadline of each connection attempt."""
    return float(psycopg2.extensions.parse_dsn(dsn)["connect_timeout"])


class _Connection(txpostgres.Connection):
    def doRead(self) -> Any:
        # When the server closes an idle connection, psycopg2 raises from
        # poll(). Handing the exception back (rather than raising it) makes
        # the reactor call connectionLost quietly, which wakes the detector;
        # raised, it would also be logged as an "Unhandled Error".
        try:
            return super().doRead()
        except psycopg2.Error as e:
            return e
        except ValueError:
            # A connection attempt failed while reading (the server hung up,
            # or answered "starting up"): txpostgres has handed the failure
            # on, then watches the socket again, which is gone (fileno -1).
            # Nothing is left to watch; raised, this would be logged as an
            # "Unhandled Error".
            if self.fileno() != -1:
                raise
            return None

    def execute(self, sql: str, params: Sequence[Any] | None) -> Deferred[tuple[list[Row], int]]:
        """One statement in autocommit, through the detector and the lock."""
        return locked_call(self, self._execute, sql, params)

    def _execute(self, sql: str, params: Sequence[Any] | None) -> Deferred[tuple[list[Row], int]]:
        d = self.cursor().execute(sql, params)
        return d.addCallback(lambda cursor: (_fetch(cursor), cursor.rowcount))


class _InOrder:
    """
    Stands in for the Cooperator txpostgres hands notifications to. It makes
    each read's notifications into a task of their own, and a Cooperator
    runs its tasks round-robin: the notifications of two reads could reach
    the observer interleaved, out of order. This runs each at once, in
    order; observers should only queue them, so that is quick.
    """

    @staticmethod
    def cooperate(iterator: Iterator[Any]) -> None:
        for _ in iterator:
            pass


def _with_deadline(d: Deferred[Any], conn: _Connection, seconds: float,
                   reactor: Any) -> Deferred[Any]:
    """Close ``conn`` if its connection attempt ``d`` takes over ``seconds``."""
    expired = []

    def expire() -> None:
        expired.append(True)
        with suppress(AttributeError):
            conn.close()  # fails the attempt

    timer = reactor.callLater(seconds, expire)

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if expired and isinstance(result, Failure):
            return Failure(psycopg2.OperationalError(
                f"no answer from PostgreSQL within {seconds:g} s"))
        return result

    return d.addBoth(done)


class _Detector(DeadConnectionDetector):
    """txpostgres's hook into a connection: it judges whether a failure
    means the connection died, and while it is dead fails further work at
    once with ConnectionDead. What happens then (reconnecting) is the
    MaintainedConnection's, not the stock detector's, which can be neither
    stopped nor given a deadline."""

    def __init__(self, owner: MaintainedConnection, reactor: Any) -> None:
        super().__init__(deathChecker=_death_checker, reactor=reactor)
        self._owner = owner

    def startReconnecting(self, f: Failure) -> None:
        self._owner._lost(f)


class ConnectionObserver(Protocol):
    """What a MaintainedConnection tells its owner (the pool, the bus)."""

    def connection_up(self, connection: MaintainedConnection) -> None:
        """Connected, at first or again: work can be given to it."""

    def connection_died(self, connection: MaintainedConnection, failure: Failure) -> None:
        """Lost (or the first attempt failed): reconnecting has begun."""

    def reconnect_failed(self, connection: MaintainedConnection, failure: Failure) -> None:
        """An attempt to reconnect failed; another will follow."""

    def retry_scheduled(self, connection: MaintainedConnection, failure: Failure,
                        delay: float) -> None:
        """The next attempt comes in ``delay`` seconds."""


class MaintainedConnection:
    """
    One PostgreSQL connection, kept up until stop(): the pool holds one for
    each connection it keeps, the event bus one for its LISTEN.

    start() connects. When the connection dies (work fails with a
    connection error, or the idle socket closes) or an attempt fails, it
    reconnects after a short backoff with jitter, for ever, and tells its
    observer at each step. Each attempt has a deadline (``connect_timeout``):
    libpq ignores connect_timeout in the asynchronous mode txpostgres uses,
    so an attempt on a server that accepts and never answers would wait for
    ever. While it is dead, work given to it fails at once (ConnectionDead,
    a connection error for is_connection_error).

    Notifications (after a LISTEN) reach the notify observers at once, in
    the order they arrived.
    """

    def __init__(self, dsn: str, reactor: Any, observer: ConnectionObserver, *,
                 connect_timeout: float) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._observer = observer
        self._timeout = connect_timeout
        self._detector = _Detector(self, reactor)
        self._conn = _Connection(reactor, cooperator=_InOrder(), detector=self._detector)
        self._alive = False
        self._started = False
        self._stopped = False
        self._tried = False  # an attempt was made: the next closes what it left
        self._reconnecting = False
        self._delays: Iterator[float] = iter(())
        self._timer: Any = None
        self._attempt: Deferred[None] | None = None

    @property
    def alive(self) -> bool:
        """Connected, and not found dead since: work can be given to it."""
        return self._alive

    # -- life cycle -----------------------------------------------------

    def start(self) -> None:
        """Connect, without waiting; the observer hears connection_up when
        it is connected."""
        if self._started or self._stopped:
            return
        self._started = True
        self._try()

    async def stop(self) -> None:
        """Stop for good: no further attempt, an attempt in progress ends now
        rather than at its deadline, and the connection closes (work still
        running on it fails). A second call returns at once."""
        if self._stopped:
            return
        self._stopped = True
        self._alive = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        attempt = self._attempt
        self._close()  # fails an attempt in progress now
        if attempt is not None:
            await attempt

    def _try(self) -> None:
        self._timer = None
        attempt = self._attempt = maybeDeferred(self._connect)
        attempt.addCallbacks(self._connected, self._attempt_failed)

    def _connect(self) -> Deferred[Any]:
        if self._tried:
            self._close()  # what the dead connection or the last attempt left
        self._tried = True
        return _with_deadline(self._conn.connect(self._dsn), self._conn, self._timeout,
                              self._reactor)

    def _connected(self, _: Any) -> None:
        self._attempt = None
        if self._stopped:
            self._close()
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()  # a retry set while this attempt still ran
        self._timer = None
        self._reconnecting = False
        self._detector.connectionIsDead = False
        self._alive = True
        self._tell(self._observer.connection_up, self)

    def _attempt_failed(self, f: Failure) -> None:
        self._attempt = None
        if self._stopped:
            return
        if not self._reconnecting:
            # The first attempt: from here on, as if a connection had died.
            self._detector.connectionIsDead = True
            self._lost(f)
            return
        self._tell(self._observer.reconnect_failed, self, f)
        self._schedule(f)

    def _lost(self, f: Failure) -> None:
        """Dead (the detector found out, or the first attempt failed)."""
        self._alive = False
        if self._stopped:
            return
        self._reconnecting = True
        self._delays = backoff()
        self._tell(self._observer.connection_died, self, f)
        self._schedule(f)

    def _schedule(self, f: Failure) -> None:
        if self._stopped or (self._timer is not None and self._timer.active()):
            return
        delay = next(self._delays)
        self._tell(self._observer.retry_scheduled, self, f, delay)
        self._timer = self._reactor.callLater(delay, self._try)

    def _close(self) -> None:
        with suppress(Exception):  # never connected, or closed already
            self._conn.close()

    def _tell(self, method: Callable[..., None], *args: Any) -> None:
        # The observer's bug must not stop the reconnection.
        try:
            method(*args)
        except Exception:  # noqa: BLE001
            _log.failure("The observer of a PostgreSQL connection failed")

    # -- work -----------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] | None = None
                ) -> Deferred[tuple[list[Row], int]]:
        """Run one statement (psycopg2's ``%s`` placeholders) in autocommit;
        answer its rows and its rowcount."""
        return self._conn.execute(sql, params)

    def run_interaction(self, interaction: Callable[[Any], Deferred[T]]) -> Deferred[T]:
        """Run ``interaction(cursor)`` in one transaction: committed when
        its Deferred fires, rolled back when it fails."""
        return self._conn.runInteraction(interaction)

    def add_notify_observer(self, observer: Callable[[Any], None]) -> None:
        """Call ``observer(notify)`` for each notification (psycopg2's
        Notify: ``channel``, ``payload``), across reconnections."""
        self._conn.addNotifyObserver(observer)

    def remove_notify_observer(self, observer: Callable[[Any], None]) -> None:
        self._conn.removeNotifyObserver(observer)


class _PostgresTransaction(Transaction):
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            await self._cursor.execute(to_pyformat(sql), tuple(params))
        except psycopg2.IntegrityError as e:
            raise IntegrityError(str(e).strip()) from None
        self.rowcount = self._cursor.rowcount
        return _fetch(self._cursor)

    async def execute_script(self, script: str) -> None:
        # No parameters: psycopg2 then leaves every % of the script alone.
        await self._cursor.execute(script)


class PostgresDatabase(Database):
    """The pool: ``pool_size`` MaintainedConnections, of which it is the
    ConnectionObserver."""

    engine = "postgresql"

    def __init__(
        self,
        url: str,
        reactor: Any,
        *,
        on_fatal: Callable[[str], None],
        start_check: Callable[[Transaction], Awaitable[None]] | None = None,
        pool_size: int = 10,
        acquire_timeout: float = 10.0,
        schema_target: int | None = None,
    ) -> None:
        super().__init__(on_fatal=on_fatal, start_check=start_check)
        self._schema_target = schema_target
        self._dsn = connection_dsn(url)
        self._connect_timeout = dsn_connect_timeout(self._dsn)
        self._reactor = reactor
        self._pool_size = pool_size
        self._acquire_timeout = acquire_timeout
        self._connections: list[MaintainedConnection] = []
        self._up: set[MaintainedConnection] = set()
        self._busy: set[MaintainedConnection] = set()
        self._free: deque[MaintainedConnection] = deque()
        self._waiters: deque[tuple[Deferred[MaintainedConnection], Any]] = deque()
        self._migrated = False
        self._migrating = False
        self._refused = False  # a fatal condition was reported: never migrate again
        self._closing = False
        self._idle: Deferred[None] | None = None
        self._last_down_report = float("-inf")
        self._where = describe_dsn(self._dsn)
        self._start_attempts = 0  # failed attempts before the database was first ready

    # -- state ----------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._migrated and bool(self._up) and not self._closing

    @property
    def closing(self) -> bool:
        """close() was called: nothing will be answered again."""
        return self._closing

    @property
    def stats(self) -> dict[str, int]:
        """For health and metrics."""
        return {
            "size": self._pool_size,
            "up": len(self._up),
            "busy": len(self._busy),
            "waiting": len(self._waiters),
        }

    # -- lifecycle ------------------------------------------------------

    def start(self) -> None:
        self._connections = [
            MaintainedConnection(self._dsn, self._reactor, self,
                                 connect_timeout=self._connect_timeout)
            for _ in range(self._pool_size)]
        for conn in self._connections:
            conn.start()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._fail_waiters()
        # Connections without work stop now (an attempt in progress ends at
        # once); those running work are given 10 s to finish it.
        busy = [conn for conn in self._connections if conn in self._busy]
        stopping = [Deferred.fromCoroutine(conn.stop())
                    for conn in self._connections if conn not in self._busy]
        if self._busy:
            self._idle = Deferred()
            timer = self._reactor.callLater(10, self._idle.callback, None)
            await self._idle
            if timer.active():
                timer.cancel()
        stopping += [Deferred.fromCoroutine(conn.stop()) for conn in busy]
        for stopped in stopping:
            await stopped
        self._up.clear()
        self._free.clear()

    # -- ConnectionObserver: what the connections tell the pool ---------

    def connection_up(self, conn: MaintainedConnection) -> None:
        if self._closing:
            return  # close() stops it
        if not self._up and self._start_attempts and not self._migrated:
            _log.info("PostgreSQL at {where} answers after {attempts} failed attempts",
                      where=self._where, attempts=self._start_attempts)
        elif not self._up and self._last_down_report > float("-inf"):
            _log.info("PostgreSQL answers again")
            self._last_down_report = float("-inf")
        self._up.add(conn)
        if self._migrated:
            self._release(conn)
            self._became_ready()  # for whoever waited through an outage
        elif not self._migrating and not self._refused:
            self._migrating = True
            self._busy.add(conn)
            d = Deferred.fromCoroutine(self._migrate(conn))
            d.addErrback(self._migration_failed, conn)

    async def _migrate(self, conn: MaintainedConnection) -> None:
        def txn(cursor: Any) -> Deferred[int]:
            return Deferred.fromCoroutine(self._start_txn(_PostgresTransaction(cursor)))

        self.schema_version = await conn.run_interaction(txn)
        self._migrating = False
        self._migrated = True
        _log.info("PostgreSQL database ready at schema version {version}",
                  version=self.schema_version)
        self._release(conn)
        for other in list(self._up):
            if other is not conn and other not in self._busy and other not in self._free:
                self._release(other)
        self._became_ready()

    def _migration_failed(self, f: Failure, conn: MaintainedConnection) -> None:
        self._migrating = False
        self._busy.discard(conn)
        if f.check(UnusableDatabase):
            # A newer schema, or secrets that differ from the other nodes':
            # one line, said once (by on_fatal).
            self._refused = True
            self._fatal(f.getErrorMessage())
        elif is_connection_error(f.value):
            # The next connection to come up tries again.
            _log.warn("Schema migration interrupted: {reason}", reason=f.getErrorMessage())
        else:
            self._refused = True
            _log.failure("Schema migration failed", f)
            self._fatal(f"schema migration failed: {f.getErrorMessage()}")

    def connection_died(self, conn: MaintainedConnection, f: Failure) -> None:
        was_up = conn in self._up
        self._up.discard(conn)
        try:
            self._free.remove(conn)
        except ValueError:
            pass
        if self._closing:
            return
        if was_up:
            self.failures["connection_lost"] += 1
        if not self._up:
            if self._migrated:
                self._report_down(f)
            self._fail_waiters()

    def reconnect_failed(self, conn: MaintainedConnection, f: Failure) -> None:
        if not self._up and self._migrated and not self._closing:
            self._report_down(f)

    def retry_scheduled(self, conn: MaintainedConnection, f: Failure, delay: float) -> None:
        # Until the database is first ready nothing listens: say so at every
        # attempt (of one connection: the others retry in step), so that a
        # server waiting for its database is seen waiting. Later outages are
        # reported by _report_down, rate-limited.
        if (self._migrated or self._closing or self._up or not self._connections
                or conn is not self._connections[0]):
            return
        self._start_attempts += 1
        _log.warn(
            "PostgreSQL at {where} is not reachable yet (attempt {attempt}): {reason}; "
            "retrying in {delay:.1f}s. Cyphr listens once it is connected and migrated.",
            where=self._where, attempt=self._start_attempts, delay=delay,
            reason=" ".join(f.getErrorMessage().split()))

    def _report_down(self, f: Failure) -> None:
        # Once on the way down, then every 30 s while it lasts: one line per
        # connection and attempt would drown the log.
        now = self._reactor.seconds()
        if now - self._last_down_report >= 30:
            self._last_down_report = now
            _log.warn("PostgreSQL is unreachable, reconnecting: {reason}",
                      reason=" ".join(f.getErrorMessage().split()))

    # -- the pool -------------------------------------------------------

    def _acquire(self) -> Deferred[MaintainedConnection]:
        if not self.ready:
            raise DatabaseUnavailable()
        while self._free:
            # The connection used last: its caches (plans, relations) are
            # warm, and under light load the others stay idle.
            conn = self._free.pop()
            if conn in self._up and conn.alive:
                self._busy.add(conn)
                d: Deferred[MaintainedConnection] = Deferred()
                d.callback(conn)
                return d
        waiter: Deferred[MaintainedConnection] = Deferred()
        timer = self._reactor.callLater(self._acquire_timeout, self._waiter_timed_out, waiter)
        self._waiters.append((waiter, timer))
        return waiter

    def _waiter_timed_out(self, waiter: Deferred[MaintainedConnection]) -> None:
        # Left in the queue, and skipped when its turn comes: removing it
        # here would cost the length of the queue, for every timeout.
        waiter.errback(DatabaseUnavailable("The database is busy, try again shortly"))

    def _fail_waiters(self) -> None:
        waiters, self._waiters = self._waiters, deque()
        for d, timer in waiters:
            if timer.active():
                timer.cancel()
            if not d.called:
                d.errback(DatabaseUnavailable())

    def _release(self, conn: MaintainedConnection) -> None:
        self._busy.discard(conn)
        if self._closing:
            if not self._busy and self._idle is not None and not self._idle.called:
                self._idle.callback(None)
            return
        if conn not in self._up:
            return
        while self._waiters:
            d, timer = self._waiters.popleft()
            if d.called:
                continue  # timed out
            timer.cancel()
            self._busy.add(conn)
            d.callback(conn)
            return
        self._free.append(conn)

    async def _run(self, operation: Callable[[MaintainedConnection], Deferred[T]]) -> T:
        try:
            conn = await self._acquire()
        except DatabaseUnavailable:
            self.failures["unavailable"] += 1
            raise
        try:
            return await operation(conn)
        except psycopg2.IntegrityError as e:
            raise IntegrityError(str(e).strip()) from None
        except Exception as e:
            if is_connection_error(e):
                self.failures["unavailable"] += 1
                raise DatabaseUnavailable() from e
            if isinstance(e, psycopg2.Error):
                self.failures["error"] += 1
            raise
        finally:
            self._release(conn)

    # -- work -----------------------------------------------------------

    async def run_query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        rows, _ = await self._run(lambda conn: conn.execute(to_pyformat(sql), tuple(params)))
        return rows

    async def run_operation(self, sql: str, params: Sequence[Any] = ()) -> int:
        _, rowcount = await self._run(lambda conn: conn.execute(to_pyformat(sql), tuple(params)))
        return rowcount

    async def run_interaction(
        self, name: str, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        def interaction(cursor: Any) -> Deferred[T]:
            return Deferred.fromCoroutine(func(_PostgresTransaction(cursor), *args, **kwargs))

        return await self._run(lambda conn: conn.run_interaction(interaction))


def read_schema_version(url: str, timeout: int = 3) -> int | None:
    """The schema version of the database, read synchronously before the
    reactor runs; None when it cannot be reached or has no schema yet (the
    server then starts anyway and keeps trying)."""
    try:
        conn = psycopg2.connect(url, connect_timeout=timeout, application_name="cyphr")
    except psycopg2.Error:
        return None
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT to_regclass('schema_version') IS NOT NULL")
            if not cursor.fetchone()[0]:
                return None
            cursor.execute("SELECT version FROM schema_version WHERE id = 1")
            row = cursor.fetchone()
            return row[0] if row else None
    except psycopg2.Error:
        return None
    finally:
        conn.close()


def preflight(url: str) -> None:
    """Raise SchemaTooNew if the database holds a newer schema."""
    version = read_schema_version(url)
    if version is not None:
        check_version(version, "postgresql")
