"""
An operator's rough edges: one server per SQLite data directory, a failed
first start that leaves nothing behind, what ``--version`` and ``--help``
say, config errors named as the operator wrote them, the event bus's log
while PostgreSQL is away, and a quiet shutdown with clients connected.
"""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import subprocess
from contextlib import redirect_stdout
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

import cyphr
from cyphr.config import ConfigError, load_config, named_by_source
from cyphr.datadir import LOCK_FILE, DataDirInUse, open_data_dir
from cyphr.db import open_database
from cyphr.realtime.bus import PostgresBus
from cyphr.server import build_server
from cyphr.tap import Options
from tests.helpers import InProcessHTTP, SQLiteMixin, make_config, start_server
from tests.processes import REPO, TWISTD, clean_environment, free_port
from tests.realtime import SioClient, sessions_closed
from tests.test_realtime_events import RealtimeBase


def captured_log(testcase: Any) -> list[dict[str, Any]]:
    """Every log event from now until the test ends."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def lines(events: list[dict[str, Any]], namespace: str) -> list[tuple[str, str]]:
    """(level, text) of the events of ``namespace``."""
    return [(event["log_level"].name, formatEvent(event)) for event in events
            if event.get("log_namespace") == namespace]


class DataDirLockTests(SynchronousTestCase):
    def test_second_open_refused(self) -> None:
        """A data directory opened with its lock cannot be opened so again
        (another open in the same process counts, as flock(2) locks an open
        file): the refusal is one line naming the directory and the holder's
        pid. Once released, it opens again."""
        path = os.path.abspath(self.mktemp())
        first = open_data_dir(path, lock=True)
        self.addCleanup(first.close)
        first.served()  # not to be removed on close
        with self.assertRaises(DataDirInUse) as caught:
            open_data_dir(path, lock=True)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"data directory {path} is in use by another Cyphr server (pid {os.getpid()})",
                      message)
        first.close()
        again = open_data_dir(path, lock=True)
        self.addCleanup(again.close)
        self.assertTrue(again.locked)
        self.assertFalse(again.created)
        self.assertTrue(os.path.exists(os.path.join(path, LOCK_FILE)))

    def test_sqlite_servers_lock_postgresql_nodes_share(self) -> None:
        """build_server locks the data directory on SQLite (a second server
        there is refused) and not on PostgreSQL, whose nodes on one host may
        share it and its secrets."""
        config = make_config(self)
        first = build_server(config, reactor, on_fatal=lambda message: None)
        self.addCleanup(first.service.cpu.stop)
        with self.assertRaises(DataDirInUse):
            build_server(config, reactor, on_fatal=lambda message: None)
        shared = make_config(self, database="postgresql://cyphr@127.0.0.1:1/cyphr")
        for _ in range(2):
            node = build_server(shared, reactor, on_fatal=lambda message: None)
            self.addCleanup(node.service.cpu.stop)

    def test_removed_only_when_made_for_a_start_that_never_served(self) -> None:
        """Closing a data directory this process created, without having
        served, removes it; one that existed before, or that served, stays."""
        made = os.path.abspath(self.mktemp())
        directory = open_data_dir(made, lock=True)
        directory.close()
        self.assertFalse(os.path.exists(made))
        served = open_data_dir(made, lock=True)
        served.served()
        served.close()
        self.assertTrue(os.path.isdir(made))
        existing = open_data_dir(made, lock=True)
        existing.close()
        self.assertTrue(os.path.isdir(made))


class ProcessTests(TestCase):
    """twistd processes, as an operator runs them."""

    timeout = 120

    def twistd(self, cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*TWISTD, "-n", "--pidfile=", "cyphr", *args], cwd=cwd,
                              env=clean_environment(), capture_output=True, text=True, timeout=60)

    async def test_second_server_on_a_data_directory_refused(self) -> None:
        """A second server on the SQLite data directory of a running one
        (here, a server in this process) exits non-zero at once with one
        line saying why, naming the first's pid; the first serves on."""
        data_dir = os.path.abspath(self.mktemp())
        first = await start_server(self, serve=True, data_dir=data_dir, database="")
        second = await deferToThread(self.twistd, REPO, "--data-dir", data_dir,
                                     "--listen", f"tcp:{free_port()}:interface=127.0.0.1")
        self.assertNotEqual(second.returncode, 0)
        output = (second.stdout + second.stderr).strip()
        self.assertNotIn("Traceback", output)
        self.assertEqual(output.splitlines()[0],
                         f"cyphr: data directory {data_dir} is in use by another Cyphr server "
                         f"(pid {os.getpid()}): two servers on one SQLite database would "
                         "each see only their own realtime clients; stop the other one, or give "
                         "this one its own --data-dir")
        health = await InProcessHTTP.for_server(first).get("/api/health")  # still serving
        self.assertEqual(health.code, 200, health.body)

    def test_failed_first_start_leaves_no_data_directory(self) -> None:
        """A first start whose port is taken fails and leaves no data
        directory behind; the same failure on an existing data directory
        leaves it (and its secrets) as they were."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            listen = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
            fresh = os.path.join(cwd, "fresh")
            result = self.twistd(cwd, "--data-dir", fresh, "--listen", listen)
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            self.assertIn("cannot listen", result.stdout + result.stderr)
            self.assertFalse(os.path.exists(fresh))
            existing = os.path.join(cwd, "existing")
            os.makedirs(existing, mode=0o700)
            with open(os.path.join(existing, "jwt_secret.secret"), "w") as f:
                f.write("s" * 64 + "\n")
            result = self.twistd(cwd, "--data-dir", existing, "--listen", listen)
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            with open(os.path.join(existing, "jwt_secret.secret")) as f:
                self.assertEqual(f.read(), "s" * 64 + "\n")

    def test_version(self) -> None:
        """twistd cyphr --version shows Cyphr's version (and Twisted's) and exits 0."""
        result = self.twistd(REPO, "--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith(f"Cyphr {cyphr.__version__} (Twisted "),
                        result.stdout)


class OptionsTests(SynchronousTestCase):
    def test_version_option(self) -> None:
        """--version prints Cyphr's version and exits with status 0."""
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--version"])
        self.assertEqual(caught.exception.code, 0)
        self.assertIn(f"Cyphr {cyphr.__version__}", out.getvalue())

    def test_help_says_where_secrets_come_from(self) -> None:
        """--help says that the secrets are set in the config file or the
        environment (naming each variable) and are otherwise generated into
        the data directory."""
        text = " ".join(str(Options()).split())
        for variable in ("CYPHR_JWT_SECRET", "CYPHR_FINGERPRINT_KEY", "CYPHR_TOTP_KEY",
                         "CYPHR_TURN_SECRET", "CYPHR_ADMIN_TOKEN"):
            self.assertIn(variable, text)
        self.assertIn("Secrets are not command-line options", text)
        self.assertIn("generated at first start into the data directory "
                      "(DATA_DIR/<name>.secret, mode 0600)", text)

    def test_gitignore_holds_twistd_pid(self) -> None:
        """The pid file twistd writes where it was started is ignored by git."""
        with open(os.path.join(REPO, ".gitignore")) as f:
            self.assertIn("twistd.pid", f.read().split())


class ConfigSourceTests(SynchronousTestCase):
    def config_file(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_bad_value_in_file_names_file_and_key(self) -> None:
        """A value from the config file that fails validation is reported
        with the file and the key as written there, not as an option."""
        path = self.config_file('max_body = "10"\n')
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {}, path)
        self.assertEqual(str(caught.exception),
                         f"config file {path}: max_body must be between 1KiB and 1GiB")
        path = self.config_file('listen = ["tcp:nope"]\n')
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {}, path)
        self.assertTrue(str(caught.exception).startswith(
            f"config file {path}: listen 'tcp:nope' is not a valid endpoint"), caught.exception)
        path = self.config_file('jwt_secret = "short"\n')
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {}, path)
        self.assertEqual(str(caught.exception),
                         f"config file {path}: jwt_secret must be at least 32 characters long")

    def test_other_sources_named_as_given(self) -> None:
        """The same bad value from the environment names its variable, and
        from the command line its option; the command line wins over the file."""
        with self.assertRaises(ConfigError) as caught:
            load_config({}, {"CYPHR_MAX_BODY": "10"})
        self.assertEqual(str(caught.exception), "CYPHR_MAX_BODY must be between 1KiB and 1GiB")
        path = self.config_file('max_body = "1MiB"\n')
        with self.assertRaises(ConfigError) as caught:
            load_config({"max_body": "10"}, {}, path)
        self.assertEqual(str(caught.exception), "--max-body must be between 1KiB and 1GiB")

    def test_two_settings_from_two_sources(self) -> None:
        """A message about two settings names each as its source gave it."""
        self.assertEqual(
            named_by_source("--realtime-buffer must be at least --max-body",
                            {"realtime_buffer": "file", "max_body": "command line"}, "/etc/c.toml"),
            "config file /etc/c.toml: realtime_buffer must be at least --max-body")


class BusLogTests(SynchronousTestCase):
    """The event bus's LISTEN connection, told of an outage as its
    MaintainedConnection tells it, on a clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        url = "postgresql://cyphr@127.0.0.1:1/cyphr"
        config = make_config(self, database=url)
        database = open_database(config, self.clock, on_fatal=lambda message: None)
        self.bus = PostgresBus(database, url, "node-a", self.clock)
        self.bus._listening = True  # as after its LISTEN answered
        self.bus._listened_before = True
        self.events = captured_log(self)
        # libpq's messages span lines.
        self.error = Failure(ConnectionError(
            'connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
            '\tIs the server running on that host and accepting TCP/IP connections?\n'))

    def test_outage_said_once_then_every_30s_then_back(self) -> None:
        """While PostgreSQL is away, with an attempt every 1.5 s, the bus
        logs one line when it goes, one every 30 s while it stays away, and
        one when it is back; each is a single line, and nothing is logged at
        debug level."""
        class Listener:
            restored = 0

            def bus_restored(self) -> None:
                Listener.restored += 1

        self.bus.listen(Listener())  # type: ignore[arg-type]
        self.bus.connection_died(None, self.error)  # type: ignore[arg-type]
        for _ in range(60):  # 90 s of failed attempts
            self.clock.advance(1.5)
            self.bus.reconnect_failed(None, self.error)  # type: ignore[arg-type]
        said = lines(self.events, "cyphr.realtime.bus")
        self.assertEqual([level for level, _ in said], ["warn", "warn", "warn", "warn"])
        self.assertTrue(said[0][1].startswith("Event bus lost PostgreSQL, reconnecting: "))
        self.assertTrue(said[1][1].startswith(
            "Event bus still cannot reach PostgreSQL after 30s, reconnecting: "), said[1])
        self.assertIn("after 60s", said[2][1])
        self.assertIn("after 90s", said[3][1])
        for _, text in said:
            self.assertNotIn("\n", text)
        self.events.clear()
        self.bus._now_listening(None)
        [(level, text)] = lines(self.events, "cyphr.realtime.bus")
        self.assertEqual((level, text), ("info", "Event bus listening again, after 90s away"))
        self.assertEqual(Listener.restored, 1)

    def test_publishing_after_stop_said_once(self) -> None:
        """Events published once the bus has stopped (sockets closing at
        shutdown) are counted, and said in one line, not one each."""
        self.bus._stopping = True
        for _ in range(50):
            self.bus.publish({"k": "presence"})
        self.assertEqual(self.bus.dropped_total, 50)
        self.assertEqual(len(lines(self.events, "cyphr.realtime.bus")), 1)


class QuietShutdownTests(RealtimeBase, SQLiteMixin, TestCase):
    async def test_shutdown_with_clients_connected(self) -> None:
        """Stopping a server whose users are connected, and share chats,
        logs no failed realtime task: the last_seen writes and offline
        announcements of the closing sockets end before the database closes,
        and last_seen is recorded for each."""
        await self.serve()
        users = [await self.user(name) for name in ("alice", "bob", "carol", "dave")]
        for other in users[1:]:
            await self.direct_chat(users[0], other)
        clients: list[SioClient] = [await self.connect(user) for user in users]
        events = captured_log(self)
        await self.server.service.stopService()
        await sessions_closed(self.server)
        for client in clients:
            await client.wait_disconnected()
        failed = [formatEvent(e) for e in events if "realtime task failed" in formatEvent(e)
                  or e.get("log_failure") is not None]
        self.assertEqual(failed, [])
        # Read from the file: the server's database is closed.
        conn = sqlite3.connect(self.server.config.sqlite_path)
        self.addCleanup(conn.close)
        seen = conn.execute("SELECT cyphr_id FROM cyphr_identities WHERE last_seen IS NOT NULL").fetchall()
        self.assertEqual(sorted(row[0] for row in seen), ["alice", "bob", "carol", "dave"])
