"""--log-format json: one JSON object per line."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any
from unittest import SkipTest

import pyotp
from twisted.application.service import Application
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import (
    ILogObserver,
    Logger,
    LogPublisher,
    formatEvent,
    globalLogPublisher,
)
from twisted.trial.unittest import TestCase

import cyphr
from cyphr.api.http import ApiRouter, CyphrSite, HttpPolicy, Root
from cyphr.cpu import CpuPool
from cyphr.logs import JsonLogObserver
from cyphr.realtime.engine import EngineServer
from cyphr.server import CyphrService
from tests import postgres
from tests.helpers import RealHTTP, make_config
from tests.processes import REPO, TWISTD, free_port
from tests.realtime import SioClient
from tests.users import User, b64


def engine() -> EngineServer:
    return EngineServer(reactor, on_session=lambda session: None)  # type: ignore[arg-type,return-value]


class JsonLogTests(TestCase):
    def log(self) -> tuple[Logger, io.StringIO]:
        out = io.StringIO()
        publisher = LogPublisher(JsonLogObserver(out))
        return Logger(namespace="cyphr.test", observer=publisher), out

    def test_fields(self) -> None:
        """A line holds time, level, namespace, the formatted message and the event's fields."""
        log, out = self.log()
        log.warn("Pool of {size} is {state}", size=4, state="down")
        record = json.loads(out.getvalue())
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "cyphr.test")
        self.assertEqual(record["message"], "Pool of 4 is down")
        self.assertEqual((record["size"], record["state"]), (4, "down"))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_failure_traceback(self) -> None:
        """A logged failure carries its traceback."""
        log, out = self.log()
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("Dividing went wrong")
        record = json.loads(out.getvalue())
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_one_line_per_event(self) -> None:
        """Messages with newlines still make one line each; values that are not JSON are repr'd."""
        log, out = self.log()
        log.info("two\nlines", thing=object())
        log.info("second")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("object", json.loads(lines[0])["thing"])

    def test_twistd_takes_the_observer(self) -> None:
        """With --log-format json the service gives twistd's application a JSON observer."""
        application = Application("cyphr")
        CyphrService(make_config(self, log_format="json"), CpuPool(reactor), engine(), reactor, [],
                     on_fatal=self.fail).setServiceParent(application)
        self.assertIsInstance(application.getComponent(ILogObserver), JsonLogObserver)

    def test_text_keeps_twistd_logging(self) -> None:
        """With text logs twistd's own observer is left in place."""
        application = Application("cyphr")
        CyphrService(make_config(self), CpuPool(reactor), engine(), reactor, [],
                     on_fatal=self.fail).setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver))


@dataclass
class RecordingUser(User):
    """A test user that remembers every signature it made."""

    signatures: list[str] = field(default_factory=list)

    def encode_signature(self, signature: bytes) -> str:
        encoded = super().encode_signature(signature)
        self.signatures.append(encoded)
        return encoded


class TwistdLogHygieneTests(TestCase):
    """
    ``twistd -n cyphr --log-format json`` in a process of its own, doing real
    work with real tokens: every line of its output is a JSON object, and
    none holds a token, a key, a signature, a payload, a Cyphr ID, the
    database password or (without --access-log) a client address.
    """

    timeout = 120

    def setUp(self) -> None:
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CYPHR_")}
        self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")

    async def run_server(self, *args: str) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
        """Start twistd, do the work, stop it; answer its log lines, its
        standard error and what the work produced."""
        port = free_port()
        # No interface: the server binds every address, so its own startup
        # lines hold no 127.0.0.1 for the client check to trip on.
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "cyphr", "--listen", f"tcp:{port}", "--log-format", "json",
             *args],
            cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            await deferToThread(wait_for_health, port)
            work = await self.work(port)
        finally:
            process.send_signal(signal.SIGTERM)
            stdout, stderr = await deferToThread(process.communicate, timeout=30)
        self.assertIn(process.returncode, (0, -signal.SIGTERM), stderr)
        lines = []
        for line in stdout.splitlines():
            record = json.loads(line)  # every line is JSON
            for key in ("level", "namespace", "message", "time"):
                self.assertIn(key, record, line)
            lines.append(record)
        return lines, stderr, work

    async def work(self, port: int) -> dict[str, Any]:
        http = RealHTTP(f"http://127.0.0.1:{port}")
        marker = uuid.uuid4().hex
        alice = RecordingUser(f"logs_a{marker[:10]}")
        bob = RecordingUser(f"logs_b{marker[:10]}")
        tokens = []
        try:
            for user in (alice, bob):
                await user.register(http)
                tokens.append(user.token)
                self.assertEqual((await user.login(http)).code, 200)
                tokens.append(user.token)
            generated = await http.post("/api/auth/totp/generate", {}, headers=alice.auth())
            self.assertEqual(generated.code, 200, generated.body)
            totp_secret = generated.json()["secret"]
            verified = await http.post("/api/auth/totp/verify", {"code": pyotp.TOTP(totp_secret).now()},
                                       headers=alice.auth())
            self.assertEqual(verified.json(), {"success": True, "enabled": True})
            payloads = [f"rest-{marker}-{n}" for n in range(3)]
            for payload in payloads:
                sent = await http.post("/api/messaging/send", {
                    "recipientId": bob.cyphr_id, "encryptedPayload": {"ciphertext": payload}},
                    headers=alice.auth())
                self.assertEqual(sent.code, 201, sent.body)
            chat_id = sent.json()["chatId"]
            self.assertEqual((await http.get(f"/api/messaging/chat/{chat_id}", headers=bob.auth())).code, 200)
            refused = await http.get("/api/messaging/chats", headers={b"Authorization": [b"Bearer nonsense"]})
            self.assertEqual(refused.code, 401)
            for transports in (["websocket"], ["polling"]):
                client = SioClient(f"http://127.0.0.1:{port}", transports=transports)
                try:
                    await client.connect({"token": bob.token})
                    await client.wait_for("sync_complete")
                    payloads.append(f"sio-{marker}-{transports[0]}")
                    ack = await client.call("send_message", {
                        "chatId": chat_id, "encryptedPayload": {"ciphertext": payloads[-1]}})
                    self.assertTrue(ack["success"], ack)
                    self.assertTrue((await client.call("message_read", {
                        "chatId": chat_id, "upToSeq": ack["seq"]}))["success"])
                finally:
                    await client.disconnect()
                    await client.wait_disconnected()
        finally:
            await http.close()
        return {
            "tokens": tokens,
            "totp_secret": totp_secret,
            "payloads": payloads,
            "cyphr_ids": [alice.cyphr_id, bob.cyphr_id],
            "keys": [b64(u.public_key) for u in (alice, bob)] + [b64(u.kyber_key) for u in (alice, bob)],
            "signatures": alice.signatures + bob.signatures + [alice.kyber_signature(), bob.kyber_signature()],
        }

    def assertNoSecrets(self, text: str, work: dict[str, Any], *, ids: bool = True) -> None:
        secrets = [*work["tokens"], work["totp_secret"], *work["payloads"], *work["keys"],
                   *work["signatures"]]
        # A token's signature part alone would be a leak too.
        secrets += [token.rsplit(".", 1)[1] for token in work["tokens"]]
        if ids:
            secrets += work["cyphr_ids"]
        for secret in secrets:
            self.assertNotIn(secret, text)

    async def test_sqlite_without_access_log(self) -> None:
        """Startup names the version, every endpoint, the engine and the schema
        version; after real work no line holds a secret, an id or a client address."""
        lines, stderr, work = await self.run_server()
        text = json.dumps(lines) + stderr
        self.assertNoSecrets(text, work)
        self.assertNotIn("127.0.0.1", text)
        messages = [line["message"] for line in lines]
        starting = [m for m in messages if m.startswith("Cyphr ") and "starting" in m]
        self.assertTrue(starting, messages)
        self.assertIn(cyphr.__version__, starting[0])
        self.assertIn("sqlite:", starting[0])
        self.assertTrue(any(m.startswith("Serving the API on ipv4 0.0.0.0:") for m in messages), messages)
        self.assertTrue(any("schema version" in m for m in messages), messages)
        self.assertFalse([line for line in lines if '"GET ' in line["message"]])

    async def test_postgres_with_access_log(self) -> None:
        """On PostgreSQL the URL's password never appears (host, database and user at
        most); with --access-log there are access lines (with addresses, as documented,
        and paths without query strings), still without tokens, keys or payloads."""
        try:
            url = postgres.database_url()
        except SkipTest:
            raise
        password = "pw" + uuid.uuid4().hex  # the throwaway cluster trusts local connections
        with_password = url.replace("postgres@", f"postgres:{password}@", 1)
        self.assertIn(password, with_password)
        lines, stderr, work = await self.run_server("--database", with_password, "--access-log")
        text = json.dumps(lines) + stderr
        self.assertNotIn(password, text)
        self.assertNoSecrets(text, work, ids=False)
        access = [line for line in lines if '" 2' in line["message"] or '" 4' in line["message"]]
        self.assertTrue(any('"POST /api/messaging/send" 201' in line["message"] for line in access),
                        [line["message"] for line in lines])
        self.assertTrue(any("/socket.io/" in line["message"] for line in access))
        self.assertFalse([line for line in access if "?" in line["message"]])
        # Ids appear only in the paths of access lines.
        other = json.dumps([line for line in lines if line not in access])
        for cyphr_id in work["cyphr_ids"]:
            self.assertNotIn(cyphr_id, other)
        starting = [line["message"] for line in lines if line["message"].startswith("Cyphr ")]
        dbname = with_password.split("?")[0].rsplit("/", 1)[1]
        self.assertIn("postgresql://postgres@", starting[0])
        self.assertIn(f"/{dbname}", starting[0])
        self.assertTrue(any("PostgreSQL database ready at schema version" in line["message"]
                            for line in lines))


def wait_for_health(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                if json.loads(r.read())["database"]["ok"]:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not answer")


class IdleTimeoutTests(TestCase):
    async def test_idle_timeout_logs_no_address(self) -> None:
        """Timing out an idle connection logs nothing holding the client's address."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        site = CyphrSite(Root(ApiRouter([])), HttpPolicy.from_config(make_config(self)), reactor,
                         timeout=0.2)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def idle() -> bytes:
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as s:
                return s.recv(1)  # b"" once the server hangs up

        self.assertEqual(await deferToThread(idle), b"")
        self.assertFalse([e for e in events if "127.0.0.1" in json.dumps(e, default=repr)],
                         [formatEvent(e) for e in events])
