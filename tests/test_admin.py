"""
``cyphr-admin`` on both engines. ``migrate`` (which runs a reactor of its
own) and one ``check`` run as the installed console script in a
subprocess; the other commands run in-process through the same ``main()``,
with the arguments, environment and standard streams a process would give
it, so they cost no interpreter start (and backup's running server runs in
this process too).
"""

from __future__ import annotations

import configparser
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr import admin
from cyphr.db.migrations import latest_version
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, start_server
from tests.processes import REPO, clean_environment, free_port
from tests.users import User


def entry_point() -> str:
    """What setup.cfg installs as cyphr-admin (module:function)."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    scripts = parser["options.entry_points"]["console_scripts"]
    [target] = [line.split("=", 1)[1].strip() for line in scripts.strip().splitlines()
                if line.split("=", 1)[0].strip() == "cyphr-admin"]
    return target


def admin_command() -> list[str]:
    """The installed script when this Python has one (as after pip install),
    else the same entry point run the way pip's wrapper runs it."""
    installed = os.path.join(os.path.dirname(sys.executable), "cyphr-admin")
    if os.path.exists(installed):
        return [installed]
    module, function = entry_point().split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


class AdminMixin:
    timeout = 120

    def setUp(self) -> None:
        self.data_dir = os.path.abspath(self.mktemp())
        self.database = self.database_setting()
        self.env = clean_environment(CYPHR_DATA_DIR=self.data_dir)
        if self.database:
            self.env["CYPHR_DATABASE"] = self.database

    def admin_process(self, *args: str, env: dict[str, str] | None = None,
                      command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        """The console script in a process of its own."""
        return subprocess.run([*(command or admin_command()), *args], env=env or self.env,
                              cwd=os.path.dirname(self.data_dir), capture_output=True, text=True,
                              timeout=60)

    def admin(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``cyphr.admin.main()`` in this process, with the argv, environment
        and standard streams the script would have; its exit status is that
        of its SystemExit (0 when it returns)."""
        module, function = entry_point().split(":")
        self.assertEqual((module, function), ("cyphr.admin", "main"))
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "argv", ["cyphr-admin", *args])
        self.patch(os, "environ", dict(env or self.env))
        code: Any = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                admin.main()
            except SystemExit as e:
                code = e.code
        if not isinstance(code, int):
            # SystemExit("text"): the text goes to standard error, status 1.
            err.write(f"{code}\n" if code is not None else "")
            code = 0 if code is None else 1
        return subprocess.CompletedProcess(["cyphr-admin", *args], code, out.getvalue(), err.getvalue())

    def assertFailsWith(self, result: subprocess.CompletedProcess[str], *expected: str) -> None:
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        for text in expected:
            self.assertIn(text, lines[0])

    def test_migrate_then_check(self) -> None:
        """migrate on an empty database brings it to the code's schema
        version and says so; a second run has nothing to do; check then
        reports engine, schema, data directory and secrets, exit 0."""
        latest = latest_version()
        result = self.admin_process("migrate")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"schema version {latest}: migrated from 0", result.stdout)
        result = self.admin_process("migrate")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"schema version {latest}: already up to date", result.stdout)
        # The installed script once (on SQLite); then the same main() in-process.
        if self.engine == "sqlite":
            result = self.admin_process("check")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(f"schema: version {latest} (up to date)", result.stdout)
        result = self.admin("check")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"database: {self.engine}", result.stdout)
        self.assertIn(f"schema: version {latest} (up to date)", result.stdout)
        self.assertIn("(writable)", result.stdout)
        # check writes nothing: the secrets are the server's to generate.
        self.assertIn("jwt_secret to be generated at first start", result.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "jwt_secret.secret")))
        with open(os.path.join(self.data_dir, "totp_key.secret"), "w") as f:
            f.write("0123456789abcdef" * 4)
        env = {**self.env, "CYPHR_JWT_SECRET": "j" * 40}
        result = self.admin("check", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("secrets: jwt_secret from the configuration, fingerprint_key to be generated "
                      "at first start, totp_key from the data directory", result.stdout)
        self.assertNotIn("j" * 40, result.stdout)
        self.assertNotIn("0123456789abcdef", result.stdout)
        with open(os.path.join(self.data_dir, "totp_key.secret"), "w") as f:
            f.write("short")
        self.assertFailsWith(self.admin("check"), "totp_key.secret is too short")
        for name in os.listdir(self.data_dir):
            if name.endswith(".secret"):
                with open(os.path.join(self.data_dir, name)) as f:
                    self.assertNotIn(f.read().strip(), result.stdout)

    def test_check_refuses_bad_configuration(self) -> None:
        """A malformed setting is one line and exit 1."""
        env = {**self.env, "CYPHR_MAX_BODY": "lots"}
        self.assertFailsWith(self.admin("check", env=env), "CYPHR_MAX_BODY")
        self.assertFailsWith(self.admin("frobnicate"), "frobnicate")

    async def test_stats_and_backup(self) -> None:
        """backup while the server runs (SQLite: a copy holding the data;
        PostgreSQL: the pg_dump command); stats counts the rows, as text
        and JSON."""
        # The server in this process: what backup needs is its database in
        # use (SQLite: opened by another connection, in WAL mode).
        server = await start_server(self, data_dir=self.data_dir, database=self.database)
        http = InProcessHTTP.for_server(server)
        alice, bob = User("alice"), User("bob")
        await alice.register(http)
        await bob.register(http)
        for n in range(3):
            sent = await http.post("/api/messaging/send", {"recipientId": "bob", "encryptedPayload": {"n": n}},
                                   headers=alice.auth())
            self.assertEqual(sent.code, 201, sent.body)

        # While the server runs: the backup is a consistent copy.
        backup = os.path.join(os.path.dirname(self.data_dir), "backup.sqlite3")
        result = await deferToThread(self.admin, "backup", backup)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.check_backup(result, backup)

        result = self.admin("stats", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        stats = json.loads(result.stdout)
        self.assertEqual((stats["users"], stats["chats"], stats["messages"], stats["prekeys"]), (2, 1, 3, 0))
        self.assertEqual(stats["tables"]["cyphr_identities"], 2)
        self.assertEqual(stats["schemaVersion"], latest_version())
        result = self.admin("stats")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("users: 2  chats: 1  messages: 3  prekeys: 0", result.stdout)


class SQLiteAdminTests(SQLiteMixin, AdminMixin, TestCase):
    def check_backup(self, result: Any, backup: str) -> None:
        self.assertIn("backed up", result.stdout)
        self.assertEqual(os.stat(backup).st_mode & 0o777, 0o600)
        conn = sqlite3.connect(backup)
        try:
            names = [row[0] for row in conn.execute("SELECT cyphr_id FROM cyphr_identities ORDER BY 1")]
            self.assertEqual(names, ["alice", "bob"])
            self.assertEqual(conn.execute("SELECT count(*) FROM messages").fetchone()[0], 3)
        finally:
            conn.close()
        # An existing file is never overwritten.
        self.assertFailsWith(self.admin("backup", backup), "exists")

    def test_check_unusable_database(self) -> None:
        """A file that is no database fails check with one clear line."""
        os.makedirs(self.data_dir)
        path = os.path.join(self.data_dir, "cyphr.sqlite3")
        with open(path, "wb") as f:
            f.write(b"not a database" * 100)
        self.assertFailsWith(self.admin("check"), "not a usable SQLite database")


class PostgresAdminTests(PostgresMixin, AdminMixin, TestCase):
    def check_backup(self, result: Any, backup: str) -> None:
        [command] = [line for line in result.stdout.splitlines() if line.startswith("pg_dump")]
        self.assertIn(f"--file={backup}", command.replace("'", ""))
        self.assertIn("--dbname=postgresql://postgres@/", command)
        self.assertFalse(os.path.exists(backup))

    def test_backup_hides_password(self) -> None:
        """The pg_dump command printed for a URL with a password does not show it."""
        env = {**self.env, "CYPHR_DATABASE": "postgresql://cyphr:s3cr3t-pw@db.internal:5433/cyphr"}
        result = self.admin("backup", "/tmp/cyphr.dump", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("s3cr3t-pw", result.stdout)
        self.assertIn("pg_dump --format=custom --file=/tmp/cyphr.dump "
                      "--dbname=postgresql://cyphr@db.internal:5433/cyphr", result.stdout)

    def test_check_unreachable_database(self) -> None:
        """An unreachable PostgreSQL fails check and migrate with one line
        naming the database, never its password."""
        url = f"postgresql://cyphr:s3cr3t-pw@127.0.0.1:{free_port()}/cyphr?connect_timeout=2"
        env = {**self.env, "CYPHR_DATABASE": url}
        # migrate runs its own reactor, so a process of its own; its wait for
        # the database (cyphr.admin.CONNECT_TIMEOUT, 10 s) is cut to 0.2 s,
        # as the length of the wait is not what this test is about.
        impatient = [sys.executable, "-c",
                     "import sys, cyphr.admin as a; a.CONNECT_TIMEOUT = 0.2; sys.exit(a.main())"]
        for result in (self.admin("check", env=env),
                       self.admin_process("migrate", env=env, command=impatient)):
            self.assertFailsWith(result, "cannot reach the database postgresql://cyphr@127.0.0.1:")
            self.assertNotIn("s3cr3t-pw", result.stderr)
