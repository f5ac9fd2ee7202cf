"""
A throwaway PostgreSQL cluster for the tests.

The cluster is made with initdb in a temporary directory, listens only on a
unix socket in that directory, runs with fsync off, and is removed when the
test run ends. It starts once per test run (about a second); each test class
gets a fresh database in it.

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
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SkipTest

REQUIRED = os.environ.get("CYPHR_TEST_POSTGRES", "").lower() == "required"
PORT = 5432  # the socket lives in a private directory: no port is shared
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        self._run("initdb", "-D", self.datadir, "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")

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

    def destroy(self) -> None:
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
        once by ``cyphr-admin migrate`` (the server's own migration code)
        and then only copied: a copy costs less than migrating anew."""
        if self._migrated is None:
            url = self.create_database()
            data_dir = tempfile.mkdtemp(prefix="cyphr-template-")
            try:
                env = {k: v for k, v in os.environ.items() if not k.startswith("CYPHR_")}
                env.update(CYPHR_DATABASE=url, CYPHR_DATA_DIR=data_dir,
                           PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
                result = subprocess.run([sys.executable, "-m", "cyphr.admin", "migrate"],
                                        env=env, capture_output=True, text=True, timeout=120)
            finally:
                shutil.rmtree(data_dir, ignore_errors=True)
            if result.returncode != 0:
                raise RuntimeError(f"migrating the template failed: {result.stdout}{result.stderr}")
            self._migrated = url.split("@/", 1)[1].split("?", 1)[0]
        return self._migrated


_shared: Cluster | None = None


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


def migrated_database_url() -> str:
    """A fresh database in the shared cluster, already at the code's schema
    version (for tests of what a started server does, not of migrating)."""
    cluster = shared_cluster()
    return cluster.create_database(cluster.migrated_template())
