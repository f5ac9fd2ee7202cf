"""
A throwaway PostgreSQL cluster for the tests.

The cluster is made with initdb (once per test process, then copied) in a
temporary directory, listens only on a unix socket in that directory, runs
with fsync off, and is removed when the test run ends. It starts once per
test run (about a second); each test class gets a fresh database in it.

initdb and the server refuse to run as root: as root they run as the
``postgres`` user through runuser. When no PostgreSQL binaries are found the
PostgreSQL tests skip, unless CYPHR_TEST_POSTGRES=required (as in CI), which
turns the skip into a failure.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

from twisted.trial.unittest import SkipTest

from cyphr.db import Transaction
from cyphr.db.migrations import migrate_txn
from cyphr.db.postgres import to_pyformat

REQUIRED = os.environ.get("CYPHR_TEST_POSTGRES", "").lower() == "required"
PORT = 5432  # the socket lives in a private directory: no port is shared


def find_bindir() -> str | None:
    explicit = os.environ.get("CYPHR_TEST_PG_BINDIR")
    candidates = [explicit] if explicit else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(os.path.dirname(pg_ctl))
    for candidate in candidates:
        if candidate and os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    return None


class Cluster:
    """One PostgreSQL server with its own data and socket directory."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.directory = tempfile.mkdtemp(prefix="cyphr-pg-")
        self.datadir = os.path.join(self.directory, "data")
        self.logfile = os.path.join(self.directory, "server.log")
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            # The server runs as "postgres", which must own its directories.
            entry = pwd.getpwnam("postgres")
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self._names = itertools.count(1)
        self._migrated: str | None = None
        # Copies of the migrated template that a finished test gave back,
        # emptied again (see give_back).
        self._idle: list[str] = []
        self._cleaners: dict[str, Any] = {}  # url -> the connection that empties it
        self._template_state: tuple[Any, ...] | None = None
        # Copies given back are emptied by a thread of their own while the
        # next test runs on another copy (see give_back).
        self._changed = threading.Condition()
        self._emptying = 0  # copies given back and not yet emptied
        self._copies = 0  # copies in use, being emptied or idle
        self._given_back: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._emptier: threading.Thread | None = None
        self._init_datadir()

    def _init_datadir(self) -> None:
        """The data directory: a copy of one that initdb made once per test
        process (initdb costs about half a second, a copy of its fresh
        result a few hundredths; the copy is what initdb would make again,
        as nothing has run in it)."""
        global _initialized
        if _initialized is None:
            directory = tempfile.mkdtemp(prefix="cyphr-pg-initdb-")
            atexit.register(shutil.rmtree, directory, True)
            if self._as_postgres:
                entry = pwd.getpwnam("postgres")
                os.chown(directory, entry.pw_uid, entry.pw_gid)
            datadir = os.path.join(directory, "data")
            self._run("initdb", "-D", datadir, "-U", "postgres", "-A", "trust",
                      "--no-sync", "-E", "UTF8", "--locale=C")
            _initialized = datadir
        # -a: the files keep their owner (postgres, when the tests run as root).
        result = subprocess.run(["cp", "-a", _initialized, self.datadir],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"copying the initialised data directory failed: {result.stderr}")

    def _run(self, tool: str, *args: str) -> None:
        command = [os.path.join(self.bindir, tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}")

    def start(self) -> None:
        options = (
            f"-p {PORT} -k {self.directory} -c listen_addresses='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        """Whether the server is up (``pg_ctl status``)."""
        try:
            self._run("pg_ctl", "-D", self.datadir, "status")
        except RuntimeError:
            return False
        return True

    def destroy(self) -> None:
        if self._emptier is not None:
            self._given_back.put(None)
            self._emptier.join(30)
        for conn in self._cleaners.values():
            conn.close()
        self._cleaners.clear()
        try:
            self.stop()
        except RuntimeError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@/{dbname}?host={self.directory}&port={PORT}"

    def create_database(self, template: str = "template0") -> str:
        """A new database, a copy of ``template`` (by default empty); its
        postgresql:// URL."""
        import psycopg2

        name = f"cyphr_test_{os.getpid()}_{next(self._names)}"
        conn = psycopg2.connect(self.url("postgres"))
        try:
            conn.autocommit = True
            # PostgreSQL 15 and later copy a template through the WAL by
            # default; copying its files is as safe here (fsync is off and
            # the cluster is thrown away) and does not grow with the WAL.
            strategy = " STRATEGY FILE_COPY" if conn.server_version >= 150000 else ""
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}')
        finally:
            conn.close()
        return self.url(name)

    def migrated_template(self) -> str:
        """The name of a database at the code's schema version, migrated
        once by the server's own migration code (migrate_txn, as
        ``cyphr-admin migrate`` runs it, without its secrets check) and then
        only copied: a copy costs less than migrating anew."""
        if self._migrated is None:
            url = self.create_database()
            _migrate(url)
            self._migrated = url.split("@/", 1)[1].split("?", 1)[0]
        return self._migrated


    # -- copies reused between tests -------------------------------------
    #
    # CREATE DATABASE costs about 0.17 s (it checkpoints); emptying a copy a
    # test is done with costs about 5 to 30 ms. A copy is reused only if its
    # schema is still the template's and nobody is still connected to it;
    # else it is left alone and the next test gets a new copy. Copies are
    # emptied by a thread while the next test runs on another: two copies
    # take turns, and no test waits for the emptying of the last one's.
    SPARE_COPIES = 2

    _STATE = """SELECT
        (SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace),
        (SELECT count(*) FROM pg_attribute a JOIN pg_class c ON a.attrelid = c.oid
          WHERE c.relnamespace = 'public'::regnamespace),
        (SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace),
        (SELECT count(*) FROM pg_trigger t JOIN pg_class c ON t.tgrelid = c.oid
          WHERE c.relnamespace = 'public'::regnamespace),
        (SELECT count(*) FROM pg_namespace)"""

    def _read_state(self, cursor: Any) -> tuple[Any, ...]:
        """The schema's shape, the tables, and the rows the migrations left
        (the template's are all it should have after emptying)."""
        cursor.execute(self._STATE)
        shape = cursor.fetchone()
        # Partitions are emptied through their parent (messages has a
        # hundred): listing them too would delete everything twice.
        cursor.execute("SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                       " AND relkind IN ('r', 'p') AND NOT relispartition ORDER BY 1")
        tables = tuple(row[0] for row in cursor.fetchall())
        cursor.execute("SELECT sequence_name FROM information_schema.sequences"
                       " WHERE sequence_schema = 'public'")
        sequences = tuple(row[0] for row in cursor.fetchall())
        rows = {}
        for table in tables:
            cursor.execute(f'SELECT * FROM "{table}"')
            found = cursor.fetchall()
            if found:
                rows[table] = found
        return shape, tables, sequences, rows

    def take_migrated(self) -> str:
        """A migrated database no running test uses: one given back, or a new
        copy of the template."""
        template = self.migrated_template()
        if self._template_state is None:
            import psycopg2

            conn = psycopg2.connect(self.url(template))
            try:
                with conn.cursor() as cursor:
                    self._template_state = self._read_state(cursor)
            finally:
                conn.close()
        with self._changed:
            # An emptying costs less than a new copy: wait for it, once
            # there are enough copies to take turns.
            # (Not for ever: if the emptier is stuck, a new copy is made.)
            deadline = time.monotonic() + 10
            while not self._idle and self._emptying and self._copies >= self.SPARE_COPIES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            if self._idle:
                return self._idle.pop()
            self._copies += 1
        try:
            return self.create_database(template)
        except BaseException:
            with self._changed:
                self._copies -= 1
            raise

    def give_back(self, url: str) -> None:
        """After a test (its servers stopped): have the emptier thread empty
        the database to the template's rows and keep it for a later test,
        unless it changed shape or someone is still connected. Returns at
        once."""
        with self._changed:
            self._emptying += 1
            if self._emptier is None:
                self._emptier = threading.Thread(target=self._empty_given_back, daemon=True,
                                                 name="cyphr-test-pg-emptier")
                self._emptier.start()
        self._given_back.put(url)

    def _empty_given_back(self) -> None:
        while (url := self._given_back.get()) is not None:
            kept = False
            try:
                kept = self._empty(url)
            except Exception:  # noqa: BLE001 - a copy not emptied is not reused
                kept = False
            finally:
                with self._changed:
                    self._emptying -= 1
                    if kept:
                        self._idle.append(url)
                    else:
                        self._copies -= 1
                    self._changed.notify_all()

    def _empty(self, url: str) -> bool:
        """(In the emptier thread.) Empty the copy at ``url`` to the
        template's rows; whether it can be used again."""
        import psycopg2

        assert self._template_state is not None
        shape, tables, sequences, rows = self._template_state
        # The connection that emptied a copy last time stays open for the
        # next time: its caches are warm (planning a DELETE over messages'
        # hundred partitions costs 15 ms on a new connection, 1 ms after).
        conn = self._cleaners.pop(url, None)
        if conn is not None and conn.closed:
            conn = None
        try:
            conn = conn or psycopg2.connect(url)
        except psycopg2.Error:
            return False
        kept = False
        try:
            conn.rollback()  # whatever state the last use left
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute("SET lock_timeout = '1s'")
                # The servers' connections are closed, but their backends
                # may take a few milliseconds more to exit: a copy still
                # used after half a second is left alone.
                deadline = time.monotonic() + 0.5
                while True:
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                   " datname = current_database() AND pid <> pg_backend_pid()")
                    if not cursor.fetchone()[0]:
                        break
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.005)
                cursor.execute(self._STATE)
                if cursor.fetchone() != shape:
                    return False
                conn.autocommit = False
                # One round trip for the lot.
                cursor.execute("; ".join([*(f'DELETE FROM "{table}"' for table in tables),
                                          *(f'ALTER SEQUENCE "{sequence}" RESTART'
                                            for sequence in sequences)]))
                for table, values in rows.items():
                    marks = ", ".join(["%s"] * len(values[0]))
                    cursor.executemany(f'INSERT INTO "{table}" VALUES ({marks})', values)
                conn.commit()
            kept = True
        except psycopg2.Error:
            return False
        finally:
            if kept:
                self._cleaners[url] = conn
            else:
                conn.close()
        return True


class _CursorTransaction(Transaction):
    """migrate_txn's transaction on a plain psycopg2 cursor: each statement
    is done when it returns, so the migration never waits on anything."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    async def execute(self, sql: str, params: Any = ()) -> list[Any]:
        self._cursor.execute(to_pyformat(sql), tuple(params))
        return [] if self._cursor.description is None else self._cursor.fetchall()

    async def execute_script(self, script: str) -> None:
        self._cursor.execute(script)


def _migrate(url: str) -> None:
    """Migrate the database at ``url`` to the code's schema version in this
    process, in one transaction (a process of cyphr-admin would cost a
    second of imports)."""
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cursor:  # commits when the block ends
            steps = migrate_txn(_CursorTransaction(cursor), "postgresql")
            try:
                steps.send(None)
            except StopIteration:
                return
            steps.close()
            raise RuntimeError("migrating the template waited on something")
    finally:
        conn.close()


_shared: Cluster | None = None
_stoppable: Cluster | None = None
_initialized: str | None = None  # a data directory fresh from initdb, copied per cluster


def new_cluster() -> Cluster:
    """A started cluster of the test's own (for tests that stop it)."""
    bindir = find_bindir()
    if bindir is None:
        message = ("PostgreSQL binaries (initdb, pg_ctl) not found: install "
                   "PostgreSQL or set CYPHR_TEST_PG_BINDIR")
        if REQUIRED:
            raise RuntimeError(message + " (CYPHR_TEST_POSTGRES=required)")
        raise SkipTest(message)
    cluster = Cluster(bindir)
    try:
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


def stoppable_cluster() -> Cluster:
    """A started cluster for the tests that stop PostgreSQL, apart from the
    shared one (whose other tests must not see it go), and shared by them:
    a cluster of each test's own would cost a copy of initdb's result, a
    start, a stop and a removal (about 0.4 s). A test that stops it starts
    it again; if one fails before it does, the next call starts it."""
    global _stoppable
    if _stoppable is None:
        _stoppable = new_cluster()
        atexit.register(_stoppable.destroy)
    elif not _stoppable.running():
        _stoppable.start()
    return _stoppable


def shared_cluster() -> Cluster:
    """The cluster shared by the whole test run, started on first use."""
    global _shared
    if _shared is None:
        _shared = new_cluster()
        atexit.register(_shared.destroy)
    return _shared


def database_url() -> str:
    """A fresh, empty database in the shared cluster."""
    return shared_cluster().create_database()


def migrated_database_url(testcase: Any = None) -> str:
    """A fresh database in the shared cluster, already at the code's schema
    version (for tests of what a started server does, not of migrating).
    With ``testcase``, the database is emptied when the test ends (after
    the cleanups registered later, such as stopping its servers) and reused
    by a later test: cheaper than a new copy."""
    cluster = shared_cluster()
    if testcase is None:
        return cluster.create_database(cluster.migrated_template())
    url = cluster.take_migrated()
    testcase.addCleanup(cluster.give_back, url)
    return url
