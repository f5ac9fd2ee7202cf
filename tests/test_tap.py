"""The twistd plugin: ``twistd -n cyphr`` run as operators run it."""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import socket
import sqlite3
import stat
import subprocess
import time
import urllib.request

from twisted.application.service import IServiceCollection
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from cyphr.config import SETTINGS
from cyphr.tap import GC_YOUNG, Options, makeService, raise_open_file_limit
from tests.processes import REPO, TWISTD, free_port


class TwistdTests(TestCase):
    """Each test runs twistd in a process of its own, in an empty directory."""

    def setUp(self) -> None:
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CYPHR_")}
        # The repository's twisted/plugins is found whether or not Cyphr is installed.
        self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")

    def twistd(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "cyphr", *args],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def assertRefused(self, result: subprocess.CompletedProcess[str], *expected: str) -> None:
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        for text in expected:
            self.assertIn(text, output)

    def test_help(self) -> None:
        """twistd cyphr --help documents every option and exits 0."""
        result = self.twistd("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for setting in SETTINGS:
            if setting.cli:
                self.assertIn(f"--{setting.option}", result.stdout)

    def test_unknown_option(self) -> None:
        """An unknown option is one clear message and a non-zero exit."""
        self.assertRefused(self.twistd("--colour=blue"), "cyphr:", "colour")

    def test_malformed_endpoint(self) -> None:
        """A malformed endpoint is refused before anything starts."""
        self.assertRefused(self.twistd("--listen", "tcp:nope"), "tcp:nope")
        self.assertFalse(os.path.exists(os.path.join(self.cwd, "cyphr-data")))

    def test_malformed_database_url(self) -> None:
        """A malformed PostgreSQL URL is refused."""
        self.assertRefused(self.twistd("--database", "postgresql://u@h:port/db"), "PostgreSQL URL")

    def test_unreadable_config(self) -> None:
        """A config file that cannot be read is refused, naming it."""
        self.assertRefused(self.twistd("--config", "/nonexistent/cyphr.toml"), "/nonexistent/cyphr.toml")

    def test_data_dir_cannot_be_created(self) -> None:
        """A data directory that cannot be created is refused, naming it."""
        blocker = os.path.join(self.cwd, "file")
        open(blocker, "w").close()
        self.assertRefused(self.twistd("--data-dir", os.path.join(blocker, "data"),
                                       "--listen", f"tcp:{free_port()}:interface=127.0.0.1"),
                           "cannot create data directory")

    def test_database_too_new(self) -> None:
        """A database written by a newer Cyphr is refused with a clear message, and left as it was."""
        os.makedirs(os.path.join(self.cwd, "cyphr-data"), mode=0o700)
        path = os.path.join(self.cwd, "cyphr-data", "cyphr.sqlite3")
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1, 99)")
        conn.commit()
        conn.close()
        self.assertRefused(self.twistd("--listen", f"tcp:{free_port()}:interface=127.0.0.1"),
                           "schema version 99", "newer Cyphr")
        conn = sqlite3.connect(path)
        self.assertEqual(conn.execute("SELECT name FROM sqlite_master").fetchall(), [("schema_version",)])
        conn.close()

    def test_port_in_use(self) -> None:
        """A port that cannot be bound ends the start with a clear message."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            self.assertRefused(self.twistd("--listen", f"tcp:{port}:interface=127.0.0.1"),
                               "cannot listen")

    def test_serves_and_stops(self) -> None:
        """twistd -n cyphr creates its data directory (0700) and secrets (0600),
        answers /health, logs JSON lines when asked, and stops cleanly on SIGTERM."""
        port = free_port()
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "cyphr", "--listen", f"tcp:{port}:interface=127.0.0.1",
             "--log-format", "json"],
            cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            body = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and body is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                        body = json.loads(r.read())
                except OSError:
                    time.sleep(0.1)
            self.assertIsNotNone(body, "the server did not answer")
            self.assertTrue(body["database"]["ok"])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                self.assertEqual(r.read(), b'{"status":"ok"}')
        finally:
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=30)
        # twistd re-raises the signal once it has shut down cleanly.
        self.assertIn(process.returncode, (0, -signal.SIGTERM), stderr)
        self.assertIn("Server Shut Down", stdout)
        data = os.path.join(self.cwd, "cyphr-data")
        self.assertEqual(stat.S_IMODE(os.stat(data).st_mode), 0o700)
        for name in os.listdir(data):
            if name.endswith(".secret"):
                self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data, name)).st_mode), 0o600)
        lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
        self.assertTrue(any("starting" in line["message"] for line in lines), stdout)
        for line in lines:
            self.assertEqual(set(line) >= {"time", "level", "namespace", "message"}, True)
        # Secrets never reach the log.
        for name in os.listdir(data):
            if name.endswith(".secret"):
                with open(os.path.join(data, name)) as f:
                    self.assertNotIn(f.read().strip(), stdout + stderr)


class MakeServiceTests(TestCase):
    def test_make_service(self) -> None:
        """makeService builds the database service, the periodic purge, the
        one-minute sweep of idle memory and one listener per --listen, the
        listeners held until the database is ready."""
        options = Options()
        options.environ = {}
        options.parseOptions(["--data-dir", self.mktemp(), "--listen", "tcp:0:interface=127.0.0.1",
                              "--listen", "tcp:0:interface=127.0.0.1"])
        self.addCleanup(gc.unfreeze)  # this test process goes on
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        service = makeService(options)
        self.assertEqual(len(list(IServiceCollection(service))), 3)
        self.assertEqual(len(service.held), 2)
        # What start made is out of the garbage collector's full passes,
        # and its young generation is collected less often.
        self.assertGreater(gc.get_freeze_count(), 10_000)
        self.assertEqual(gc.get_threshold()[0], GC_YOUNG)

    def test_make_service_refuses_unusable_database(self) -> None:
        """makeService turns an unusable database into a message, not a traceback."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "not-a-db.sqlite3")
        with open(path, "wb") as f:
            f.write(b"this is not a database" * 100)
        options = Options()
        options.environ = {}
        options.parseOptions(["--data-dir", directory, "--database", path])
        with self.assertRaises(SystemExit) as caught:
            makeService(options)
        self.assertIn("not a usable SQLite database", str(caught.exception.code))


class OpenFileLimitTests(TestCase):
    """At start the soft limit on open files is raised to the hard limit."""

    def setUp(self) -> None:
        self.original = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, self.original)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def messages(self) -> list[tuple[str, str]]:
        return [(e["log_level"].name, formatEvent(e)) for e in self.events
                if e.get("log_namespace") == "cyphr.tap"]

    def test_raised_to_hard_limit(self) -> None:
        """A lowered soft limit is raised back to the hard limit, and said so without a warning."""
        soft, hard = self.original
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
        self.assertEqual(raise_open_file_limit(wanted=min(expected, 256)), expected)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (expected, hard))
        self.assertEqual(self.messages(), [("info", f"Open file limit: {expected}")])

    def test_warns_below_wanted(self) -> None:
        """When even the hard limit is below what the server wants, a warning says how to raise it."""
        soft, hard = self.original
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
        self.assertEqual(raise_open_file_limit(wanted=limit + 1), limit)
        [(level, message)] = self.messages()
        self.assertEqual(level, "warn")
        self.assertIn(f"open file limit is {limit}", message)
        self.assertIn("LimitNOFILE", message)
        self.assertIn("ulimit -n", message)
