"""
``cyphr-admin``: operator commands on the server's database, reading the
same settings as ``twistd cyphr`` (``--config``, CYPHR_* variables, the same
options).

    cyphr-admin [options] migrate        apply pending schema migrations
    cyphr-admin [options] check          is this configuration ready to serve?
    cyphr-admin [options] backup FILE    SQLite: an online copy; PostgreSQL: the pg_dump command
    cyphr-admin [options] stats [--json] rows per table

``migrate`` goes through the server's own Database classes (the same
migration code, the same advisory lock on PostgreSQL) on a reactor of its
own. The other commands only read, with plain blocking drivers: this is a
command line tool, not the server, and nothing else waits on it.

Each command prints what it found and exits 0, or one line on standard
error and exits 1.
"""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import sys
from typing import Any, Callable, TypeVar
from urllib.parse import quote, urlsplit

from twisted.python import usage

from cyphr.config import Config, ConfigError
from cyphr.datadir import read_secret_file
from cyphr.store.status import TABLES_SQL, count_sql, counted_tables
from cyphr.tap import Options as ServerOptions

# How long migrate and check wait for PostgreSQL before giving up.
CONNECT_TIMEOUT = 10


T = TypeVar("T")


class Failed(Exception):
    """The command cannot do its job: one line for the operator."""


class MigrateOptions(usage.Options):
    synopsis = ""
    longdesc = "Apply pending schema migrations, then print the schema version."


class CheckOptions(usage.Options):
    synopsis = ""
    longdesc = ("Validate the configuration, reach the database, compare its schema "
                "version with this code's, check the data directory and the secrets.")


class BackupOptions(usage.Options):
    synopsis = "FILE"
    longdesc = ("SQLite: copy the database into FILE with SQLite's online backup "
                "(safe while the server runs). PostgreSQL: print the pg_dump command "
                "that backs up the configured database (without its password).")

    def parseArgs(self, path: str) -> None:
        self["file"] = path


class StatsOptions(usage.Options):
    synopsis = "[--json]"
    longdesc = "Print the number of rows of each table."
    optFlags = [["json", None, "Print one JSON object."]]


class Options(ServerOptions):
    synopsis = "[options] migrate|check|backup FILE|stats [--json]"
    longdesc = (
        "Operator commands on the Cyphr database. The options, the TOML file given "
        "with --config and the CYPHR_* environment variables are those of "
        "'twistd cyphr', so give the same ones as the server."
    )
    subCommands = [
        ["migrate", None, MigrateOptions, "Apply pending schema migrations."],
        ["check", None, CheckOptions, "Check that this configuration is ready to serve."],
        ["backup", None, BackupOptions, "Back up the database (see backup --help)."],
        ["stats", None, StatsOptions, "Rows per table."],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            usage.Options.parseOptions(self, options)
        except ConfigError as e:
            raise Failed(f"configuration: {e}") from None
        except usage.UsageError as e:
            raise Failed(f"{e} (run 'cyphr-admin --help' for the commands and options)") from None

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is needed: migrate, check, backup FILE or stats")
        super().postOptions()


# -- reading the database without the server --------------------------------


def _sqlite_readonly(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise Failed(f"no SQLite database at {path} (the server, or 'cyphr-admin migrate', creates it)")
    try:
        return sqlite3.connect("file:" + quote(os.path.abspath(path)) + "?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise Failed(f"cannot open the SQLite database {path}: {e}") from None


def _postgres(config: Config) -> Any:
    import psycopg2

    try:
        return psycopg2.connect(config.database, connect_timeout=CONNECT_TIMEOUT,
                                application_name="cyphr-admin")
    except psycopg2.Error as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise Failed(_without_password(
            f"cannot reach the database {config.describe_database()}: {reason}", config)) from None


def _without_password(message: str, config: Config) -> str:
    password = urlsplit(config.database).password if config.database_engine == "postgresql" else None
    return message.replace(password, "***") if password else message


def _read(config: Config, work: Callable[[Callable[[str], list[Any]]], T]) -> T:
    """``work(fetch)`` on one read-only connection; ``fetch(sql)`` answers
    the rows of one statement."""
    if config.database_engine == "sqlite":
        conn = _sqlite_readonly(config.sqlite_path)
        try:
            cursor = conn.cursor()
            return work(lambda sql: cursor.execute(sql).fetchall())
        except sqlite3.DatabaseError as e:
            raise Failed(f"{config.sqlite_path} is not a usable SQLite database: {e}") from None
        finally:
            conn.close()
    import psycopg2

    conn = _postgres(config)
    try:
        with conn.cursor() as cursor:
            def fetch(sql: str) -> list[Any]:
                cursor.execute(sql)
                return cursor.fetchall()
            return work(fetch)
    except psycopg2.Error as e:
        raise Failed(_without_password(f"query failed on {config.describe_database()}: {e}".strip(),
                                       config)) from None
    finally:
        conn.close()


def _schema_version(config: Config) -> int:
    """0 when the database has no schema yet."""
    if config.database_engine == "sqlite":
        present = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    else:
        present = "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'schema_version'"
    if config.database_engine == "sqlite" and not os.path.exists(config.sqlite_path):
        return 0

    def read(fetch: Callable[[str], list[Any]]) -> int:
        if not fetch(present)[0][0]:
            return 0
        rows = fetch("SELECT version FROM schema_version WHERE id = 1")
        return rows[0][0] if rows else 0
    return _read(config, read)


# -- the commands ------------------------------------------------------------


def migrate(config: Config, out: Callable[[str], None]) -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    from cyphr.db import UnusableDatabase, open_database, preflight

    try:
        preflight(config)
    except UnusableDatabase as e:
        raise Failed(str(e)) from None
    if config.database_engine == "sqlite" and not config.database:
        from cyphr.datadir import prepare_data_dir

        prepare_data_dir(config.data_dir)  # as the server would: mode 0700
    before = _schema_version_or_none(config)
    outcome: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        def fatal(message: str) -> None:
            # Only called once started, when ``ready`` (below) exists.
            if not ready.called:
                ready.errback(Failed(message))

        database = open_database(config, reactor, on_fatal=fatal)
        ready = database.when_ready()
        database.start()
        timer = reactor.callLater(CONNECT_TIMEOUT, lambda: ready.called or ready.errback(
            Failed(f"cannot reach the database {config.describe_database()} "
                   f"within {CONNECT_TIMEOUT}s")))
        try:
            await ready
            outcome["version"] = database.schema_version
        except Failed as e:
            outcome["error"] = str(e)
        finally:
            if timer.active():
                timer.cancel()
            await Deferred.fromCoroutine(database.close())

    try:
        react(lambda r: Deferred.fromCoroutine(run(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise Failed(outcome.get("error") or f"migration failed ({e.code})") from None
    if "error" in outcome:
        raise Failed(outcome["error"])
    version = outcome["version"]
    if before is not None and before == version:
        out(f"schema version {version}: already up to date ({config.describe_database()})")
    else:
        out(f"schema version {version}: migrated from {before or 0} ({config.describe_database()})")


def _schema_version_or_none(config: Config) -> int | None:
    try:
        return _schema_version(config)
    except Failed:
        return None  # migrate reports the reason itself


def check(config: Config, out: Callable[[str], None]) -> None:
    from cyphr.datadir import prepare_data_dir
    from cyphr.db.migrations import latest_version

    data_dir = prepare_data_dir(config.data_dir)  # ConfigError: one line
    probe = os.path.join(data_dir, f".cyphr-admin-check-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise Failed(f"data directory {data_dir} is not writable: {e.strerror or e}") from None
    out(f"configuration: ok{' (' + config.config_file + ')' if config.config_file else ''}")
    out(f"data directory: {data_dir} (writable)")
    sources = []
    for name in ("jwt_secret", "fingerprint_key", "totp_key"):
        if getattr(config, name):  # its length was checked with the configuration
            sources.append(f"{name} from the configuration")
            continue
        path = os.path.join(data_dir, f"{name}.secret")
        if not os.path.exists(path):
            sources.append(f"{name} to be generated at first start")
            continue
        try:
            read_secret_file(path)
        except ConfigError as e:
            raise Failed(str(e)) from None
        sources.append(f"{name} from the data directory")
    out("secrets: " + ", ".join(sources))
    out(f"database: {config.describe_database()}")
    version = _schema_version(config)
    latest = latest_version(config.database_engine)
    if version > latest:
        raise Failed(f"the database has schema version {version}, newer than this code's {latest}: "
                     "run the newer Cyphr, or restore a backup")
    if version < latest:
        out(f"schema: version {version}, this code's is {latest}: the server (or "
            "'cyphr-admin migrate') will migrate it")
    else:
        out(f"schema: version {version} (up to date)")


def backup(config: Config, path: str, out: Callable[[str], None]) -> None:
    if config.database_engine == "postgresql":
        parts = urlsplit(config.database)
        command = ["pg_dump", "--format=custom", f"--file={path}"]
        # pg_dump takes a connection string: the same URL without the
        # password, which it finds in ~/.pgpass or PGPASSWORD.
        netloc = parts.hostname or ""
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        if parts.port:
            netloc += f":{parts.port}"
        url = parts._replace(netloc=netloc).geturl()
        command.append(f"--dbname={url}")
        out(shlex.join(command))
        if parts.password:
            out("# the password is not shown: give it in ~/.pgpass or PGPASSWORD")
        return
    source = _sqlite_readonly(config.sqlite_path)
    target_path = os.path.abspath(path)
    if os.path.exists(target_path):
        source.close()
        raise Failed(f"{target_path} exists: give a new file")
    try:
        # The backup holds what the database holds: keep it as private.
        fd = os.open(target_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        target = sqlite3.connect(target_path)
        try:
            # Copies page by page; a writer in the server restarts the copy,
            # so the file is always one consistent state of the database.
            source.backup(target)
        finally:
            target.close()
    except (OSError, sqlite3.Error) as e:
        raise Failed(f"backup to {target_path} failed: {getattr(e, 'strerror', None) or e}") from None
    finally:
        source.close()
    out(f"backed up {config.describe_database()} to {target_path}")


SUMMARY = {"users": "cyphr_identities", "chats": "chats", "messages": "messages",
           "prekeys": "one_time_prekeys"}


def stats(config: Config, as_json: bool, out: Callable[[str], None]) -> None:
    def count(fetch: Callable[[str], list[Any]]) -> dict[str, int]:
        tables = counted_tables(row[0] for row in fetch(TABLES_SQL[config.database_engine]))
        return {table: int(fetch(count_sql(table))[0][0]) for table in tables}

    counts = _read(config, count)
    if not counts:
        raise Failed(f"the database {config.describe_database()} has no tables: run 'cyphr-admin migrate'")
    tables = list(counts)
    summary = {name: counts.get(table, 0) for name, table in SUMMARY.items()}
    if as_json:
        out(json.dumps({"database": config.describe_database(), "schemaVersion": _schema_version(config),
                        **summary, "tables": counts}, sort_keys=True))
        return
    out(f"database: {config.describe_database()}")
    out("  ".join(f"{name}: {count}" for name, count in summary.items()))
    width = max(len(t) for t in tables)
    for table, count in counts.items():
        out(f"{table:<{width}}  {count}")


def run(argv: list[str], environ: dict[str, str], out: Callable[[str], None]) -> None:
    options = Options()
    options.environ = environ
    options.parseOptions(argv)
    config = options.config
    command, sub = options.subCommand, options.subOptions
    try:
        if command == "migrate":
            migrate(config, out)
        elif command == "check":
            check(config, out)
        elif command == "backup":
            backup(config, sub["file"], out)
        else:
            stats(config, sub["json"], out)
    except ConfigError as e:
        raise Failed(str(e)) from None


def main() -> None:
    try:
        run(sys.argv[1:], dict(os.environ), print)
    except Failed as e:
        print(f"cyphr-admin: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
