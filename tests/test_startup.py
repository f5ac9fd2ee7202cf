"""
Start-up guarantees of a real ``twistd -n cyphr``: it listens only once its
database is connected, migrated and has passed the secrets check, so that
the first API request after /health first answers is served; and a node
whose secrets differ from those its database was first started with
refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests import postgres
from cyphr.server import Server, build_server
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, make_config, start_server
from tests.processes import CyphrProcess, clean_environment

SECRETS = {"CYPHR_JWT_SECRET": "j" * 40, "CYPHR_FINGERPRINT_KEY": "f" * 40,
           "CYPHR_TOTP_KEY": "t" * 40, "CYPHR_PUSH_VAPID_KEY": "v" * 40}


def get(url: str, timeout: float = 2) -> int:
    """The status of GET ``url``; OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def post_json(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"null")


def health_then_request(process: CyphrProcess, timeout: float = 60) -> tuple[int, Any]:
    """Poll /health as a load balancer does (but every few milliseconds)
    until it answers 200, then send an API request at once: its answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process is not None and process.process.poll() is not None:
            raise AssertionError(f"the server exited:\n{process.output()}")
        try:
            if get(process.url + "/health") == 200:
                return post_json(process.url + "/api/cyphr-id/check", {"cyphrId": "alice"})
        except OSError:
            pass
        time.sleep(0.005)
    raise AssertionError(f"/health never answered 200:\n{process.output()}")


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class ReadyBeforeServingMixin:
    timeout = 120

    def server_args(self) -> list[str]:
        args = ["--data-dir", os.path.abspath(self.mktemp())]  # type: ignore[attr-defined]
        database = self.database_setting()  # type: ignore[attr-defined]
        return args + (["--database", database] if database else [])

    async def test_first_request_after_health_is_served(self) -> None:
        """/health first answers 200 only once the database is migrated and
        connected: the API request sent right after it is served (200), not
        refused with 503 DATABASE_UNAVAILABLE."""
        process = CyphrProcess(self, *self.server_args())
        process.start()
        code, body = await deferToThread(health_then_request, process)
        self.assertEqual((code, body.get("success")), (200, True), f"{body}\n{process.output()}")  # type: ignore[attr-defined]
        self.assertEqual(body["available"], True)  # type: ignore[attr-defined]
        # twistd re-raises the signal once it has shut down cleanly.
        self.assertIn(await process.terminate(), (0, -signal.SIGTERM))  # type: ignore[attr-defined]


class SQLiteReadyBeforeServingTests(SQLiteMixin, ReadyBeforeServingMixin, TestCase):
    pass


class PostgresReadyBeforeServingTests(PostgresMixin, ReadyBeforeServingMixin, TestCase):
    pass


class PostgresDownAtStartTests(TestCase):
    """Stops PostgreSQL: runs on the cluster of the tests that do
    (postgres.stoppable_cluster), not the shared one."""

    timeout = 120

    async def setUp(self) -> None:
        self.cluster = await deferToThread(postgres.stoppable_cluster)
        url = await deferToThread(self.cluster.create_database)
        # trust authentication ignores it; the log must not show it.
        self.password = "hunter2-not-in-logs"
        self.url = url.replace("postgresql://postgres@", f"postgresql://postgres:{self.password}@")

    async def test_waits_visibly_then_serves(self) -> None:
        """A server whose PostgreSQL is down at start listens on nothing
        (no /health 200 in front of 503s), logs each connection attempt with
        its backoff and without credentials, and once PostgreSQL comes up,
        migrates, listens, and serves the first request after /health."""
        await deferToThread(self.cluster.stop)
        process = CyphrProcess(self, "--database", self.url, "--data-dir", os.path.abspath(self.mktemp()))
        process.start()
        attempts = re.compile(r"not reachable yet \(attempt (\d+)\).*retrying in (\d+\.\d)s")

        def seen_attempts() -> list[tuple[int, float]]:
            return [(int(n), float(d)) for n, d in attempts.findall(process.output())]

        # Two are enough to see both: backoff() starts at 0.25 s (±20 %)
        # and doubles, so the second delay logged is always the longer.
        await deferToThread(wait_until, lambda: len(seen_attempts()) >= 2, 60, "two attempts logged")
        with self.assertRaises(OSError):  # nothing listens: connection refused
            await deferToThread(get, process.url + "/health")
        numbers = [n for n, _ in seen_attempts()]
        self.assertEqual(numbers, list(range(1, len(numbers) + 1)))
        self.assertLess(seen_attempts()[0][1], seen_attempts()[1][1])  # backing off

        await deferToThread(self.cluster.start)
        code, body = await deferToThread(health_then_request, process)
        self.assertEqual((code, body.get("success")), (200, True), f"{body}\n{process.output()}")
        output = process.output()
        self.assertIn("answers after", output)
        self.assertNotIn(self.password, output)
        self.assertNotIn("Traceback", output)
        self.assertIn(await process.terminate(), (0, -signal.SIGTERM))


class SecretsAgreeTests(TestCase):
    """Several nodes on one PostgreSQL database. The node started first runs
    in this process (started is all it must be: its start records its
    secrets' fingerprints); the nodes started next, whose refusal or start
    is the subject, run as ``twistd -n cyphr``."""

    timeout = 120

    def setUp(self) -> None:
        # Migrated, with no fingerprint yet (what cyphr-admin migrate leaves).
        self.database = postgres.migrated_database_url(self)

    def node(self, secrets: dict[str, str] | None = None) -> CyphrProcess:
        return CyphrProcess(self, "--database", self.database, "--data-dir", os.path.abspath(self.mktemp()),
                            env=clean_environment(**(SECRETS if secrets is None else secrets)))

    async def first_node(self, secrets: dict[str, str] | None = None) -> Server:
        """A node started in this process with ``secrets`` (CYPHR_* names;
        by default SECRETS; those not given are generated in its own data
        directory), its database started."""
        settings = {name.removeprefix("CYPHR_").lower(): value
                    for name, value in (SECRETS if secrets is None else secrets).items()}
        server = await start_server(self, database=self.database, **settings)
        self.assertEqual(server.fatal_messages, [])  # type: ignore[attr-defined]
        return server

    async def refused(self, process: CyphrProcess) -> str:
        """Start ``process``, which must exit non-zero; its output."""
        process.start()
        assert process.process is not None
        code = await deferToThread(process.process.wait, 60)
        output = process.output()
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Serving the API", output)
        return output

    async def test_different_jwt_secret_is_refused(self) -> None:
        """A second node whose jwt_secret differs from the first's refuses to
        start (exit status 1, one line naming jwt_secret and neither of the
        secrets that agree), and never listens; the secret is not logged."""
        await self.first_node()
        other = {**SECRETS, "CYPHR_JWT_SECRET": "x" * 40}
        output = await self.refused(self.node(other))
        [line] = [line for line in output.splitlines() if "differs" in line]
        self.assertIn("jwt_secret differs from the one the database was first started with", line)
        self.assertNotIn("fingerprint_key differs", line)
        self.assertNotIn("totp_key differs", line)
        self.assertNotIn("x" * 40, output)

    async def test_different_vapid_key_is_refused(self) -> None:
        """A node whose push_vapid_key differs (its Web Push key: the
        subscriptions made with the others' would fail at the push
        services) refuses to start, naming it and its variable."""
        await self.first_node()
        output = await self.refused(self.node({**SECRETS, "CYPHR_PUSH_VAPID_KEY": "w" * 40}))
        [line] = [line for line in output.splitlines() if "differs" in line]
        self.assertIn("push_vapid_key differs from the one the database was first started with", line)
        self.assertNotIn("w" * 40, output)

    async def test_same_secrets_start(self) -> None:
        """Nodes with the same configured secrets, each with a data
        directory of its own, all start and serve."""
        first = await self.first_node()
        second = await self.node().started()
        code, body = await deferToThread(post_json, second.url + "/api/cyphr-id/check", {"cyphrId": "bob"})
        self.assertEqual(code, 200, body)
        answer = await InProcessHTTP.for_server(first).post("/api/cyphr-id/check", {"cyphrId": "bob"})
        self.assertEqual(answer.code, 200, answer.body)

    async def test_fingerprints_are_not_the_secrets(self) -> None:
        """The database holds one fingerprint per secret: the HMAC keyed by
        the secret over a fixed label, in which neither the secret, nor its
        hex, nor the key derived from it appears."""
        await self.first_node()

        def rows() -> list[tuple[str, str]]:
            conn = psycopg2.connect(self.database)
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT * FROM secret_fingerprints ORDER BY name")
                    return [tuple(str(v) for v in row) for row in cursor.fetchall()]
            finally:
                conn.close()

        table = await deferToThread(rows)
        self.assertEqual([row[0] for row in table],
                         ["fingerprint_key", "jwt_secret", "push_vapid_key", "totp_key"])
        text = " ".join(" ".join(row) for row in table)
        for secret in SECRETS.values():
            for form in (secret, secret.encode().hex(), hashlib.sha256(secret.encode()).hexdigest(),
                         secret[:16]):
                self.assertNotIn(form, text)
        fingerprints = {row[0]: row[1] for row in table}

        def hmac_hex(key: bytes, name: str) -> str:
            label = f"cyphr secret fingerprint v1 {name}".encode()
            return hmac.new(key, label, hashlib.sha256).hexdigest()

        self.assertEqual(fingerprints["jwt_secret"], hmac_hex(b"j" * 40, "jwt_secret"))
        self.assertEqual(fingerprints["fingerprint_key"], hmac_hex(b"f" * 40, "fingerprint_key"))
        # The TOTP key is used as the SHA-256 of the configured text.
        self.assertEqual(fingerprints["totp_key"], hmac_hex(hashlib.sha256(b"t" * 40).digest(), "totp_key"))

    async def test_generated_secrets_are_refused_with_advice(self) -> None:
        """Two nodes with no secrets configured generate different ones in
        their own data directories: the second refuses, saying to set the
        secrets in the configuration for a cluster."""
        await self.first_node({})
        output = await self.refused(self.node({}))
        self.assertIn("jwt_secret and fingerprint_key and totp_key and push_vapid_key differ", output)
        self.assertIn("CYPHR_PUSH_VAPID_KEY", output)
        self.assertIn("generated in its own data directory", output)
        self.assertIn("set the secrets in the configuration", output)


class SQLiteSecretsTests(TestCase):
    """The same check on the embedded engine, in process."""

    async def start(self, data_dir: str, jwt_secret: str) -> Any:
        config = make_config(self, data_dir=data_dir, jwt_secret=jwt_secret)
        fatal: list[str] = []
        server = build_server(config, reactor, on_fatal=fatal.append)
        server.service.startService()
        self.addCleanup(lambda: server.service.stopService() if server.service.running else None)
        server.fatal_messages = fatal
        while not (server.database.ready or fatal):
            await deferLater(reactor, 0.01, lambda: None)
        return server

    async def test_restart_with_another_jwt_secret_is_refused(self) -> None:
        """A server restarted on its SQLite database with another jwt_secret
        is refused, naming jwt_secret, and opens no endpoint; with the
        original secret it starts again."""
        data_dir = os.path.abspath(self.mktemp())
        first = await self.start(data_dir, "a" * 40)
        self.assertEqual(first.fatal_messages, [])
        await first.service.stopService()
        second = await self.start(data_dir, "b" * 40)
        [message] = second.fatal_messages
        self.assertTrue(message.startswith("jwt_secret differs from the one the database was first"),
                        message)
        self.assertNotIn("generated in its own data directory", message)
        self.assertFalse(second.database.ready)
        self.assertEqual(second.listening(), [None])  # nothing listens
        await second.service.stopService()
        third = await self.start(data_dir, "a" * 40)
        self.assertEqual(third.fatal_messages, [])
        self.assertTrue(third.database.ready)
