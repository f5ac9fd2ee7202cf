"""
SIGTERM: the server writes what it has acknowledged, closes every socket
with code 4001, and exits within ``shutdown_timeout``.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import struct
import threading
import time
from typing import Any

import websocket
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.realtime.engine import CLOSE_SHUTDOWN
from cyphr.server import build_server
from tests.helpers import PostgresMixin, SQLiteMixin, make_config
from tests.processes import CyphrProcess, UrllibHTTP
from tests.realtime import SioClient, sleep, until
from tests.users import User

SHUTDOWN_TIMEOUT = 5


def raw_engine_socket(port: int) -> websocket.WebSocket:
    """An Engine.IO WebSocket that joins no namespace: it sees the close
    frame exactly as the server sends it."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket", timeout=30)
    opening = ws.recv()
    assert opening.startswith("0{"), opening
    return ws


def close_frame(ws: websocket.WebSocket) -> tuple[int, str]:
    """Read until the close frame; its code and reason. (websocket-client
    answers it.)"""
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            ws.shutdown()
            return struct.unpack("!H", frame.data[:2])[0], frame.data[2:].decode("utf-8")


class Sender:
    """Threads sending messages over one socket as fast as their acks come
    back, so that some are always in flight; every acknowledged id is kept."""

    def __init__(self, client: SioClient, chat_id: str, threads: int = 3) -> None:
        self.client = client
        self.chat_id = chat_id
        self.acked: list[str] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, number: int) -> None:
        for count in range(10_000):
            try:
                # Not sio.call: it would wait out its timeout for a send in
                # flight when the socket closes.
                ack = self.client.call_while_connected("send_message", {
                    "chatId": self.chat_id, "encryptedPayload": {"t": number, "n": count}}, timeout=10)
            except Exception as e:  # the socket went away: this thread is done
                with self._lock:
                    self.errors.append(type(e).__name__)
                return
            if ack.get("success"):
                with self._lock:
                    self.acked.append(ack["messageId"])

    def join(self) -> None:
        for thread in self._threads:
            thread.join(30)


class ShutdownMixin:
    timeout = 180

    def database(self) -> str:
        """On PostgreSQL, a copy of a database already migrated (these tests
        are of stopping; migrating a fresh one costs PostgreSQL about 0.3 s
        at each start); on SQLite, none: the server's data directory."""
        return getattr(self, "migrated_database_setting", self.database_setting)()

    def server_args(self) -> list[str]:
        data_dir = os.path.abspath(self.mktemp())
        database = self.database()
        return ["--data-dir", data_dir, *(["--database", database] if database else []),
                "--shutdown-timeout", f"{SHUTDOWN_TIMEOUT}s",
                # python-engineio's client could miss the end of its socket
                # when a send raced the close (its write loop consumed the
                # wake-up) and notice only after max(ping interval, ping
                # timeout) + 5 s; cyphr.client.realtime._EndKeepingQueue now
                # keeps the end. Short pings bound any wait of that kind.
                "--ping-interval", "1s", "--ping-timeout", "2s",
                "--rate-limit-send", "100000/1s", "--realtime-event-rate", "100000/1s"]

    async def history(self, http: UrllibHTTP, user: User, chat_id: str) -> list[str]:
        ids: list[str] = []
        after = 0
        while True:
            response = await http.get(f"/api/messaging/chat/{chat_id}?after={after}&limit=200",
                                      headers=user.auth())
            assert response.code == 200, response.body
            page = response.json()
            ids += [m["id"] for m in page["messages"]]
            if not page["hasMore"] or not page["messages"]:
                return ids
            after = page["messages"][-1]["seq"]

    async def test_sigterm_keeps_every_acknowledged_message(self) -> None:
        """On SIGTERM with messages in flight, each client is disconnected
        (a bare Engine.IO socket sees close code 4001 "server shutting
        down"), the process exits within shutdown_timeout, and after a
        restart every acknowledged message is in the chat's history."""
        args = self.server_args()
        first = await CyphrProcess(self, *args).started()
        http = UrllibHTTP(first.url)
        alice, bob = User("alice"), User("bob")
        await alice.register(http)
        await bob.register(http)
        opening = await http.post("/api/messaging/send", {
            "recipientId": "bob", "encryptedPayload": {"hello": 1}}, headers=alice.auth())
        self.assertEqual(opening.code, 201, opening.body)
        chat_id = opening.json()["chatId"]

        a = SioClient(first.url, transports=["websocket"])
        b = SioClient(first.url, transports=["polling", "websocket"])
        for client, user in ((a, alice), (b, bob)):
            await client.connect({"token": user.token})
            await client.wait_for("sync_complete")
        raw = await deferToThread(raw_engine_socket, first.port)
        self.addCleanup(raw.close)
        sender = Sender(a, chat_id)
        for _ in range(300):
            if len(sender.acked) >= 30:
                break
            await sleep(0.05)
        self.assertGreaterEqual(len(sender.acked), 30, sender.errors)

        began = time.monotonic()
        closed = deferToThread(close_frame, raw)
        status = await first.terminate(timeout=SHUTDOWN_TIMEOUT + 30)
        elapsed = time.monotonic() - began
        await deferToThread(sender.join)
        self.assertEqual(await closed, (CLOSE_SHUTDOWN, "server shutting down"))
        await a.wait_disconnected(timeout=20)
        await b.wait_disconnected(timeout=20)
        # twistd re-raises SIGTERM once the stop is done; systemd counts
        # that as a clean exit.
        self.assertIn(status, (0, -signal.SIGTERM), first.output())
        self.assertLess(elapsed, SHUTDOWN_TIMEOUT + 3, first.output())
        output = first.output()
        self.assertIn("Cyphr shutting down", output)
        self.assertIn("Cyphr shut down in", output)
        self.assertNotIn("Traceback", output)
        self.assertTrue(b.events("new_message"), "bob received nothing before the stop")

        second = await CyphrProcess(self, *args).started()
        stored = await self.history(UrllibHTTP(second.url), alice, chat_id)
        acked = set(sender.acked)
        self.assertEqual(acked - set(stored), set(), "acknowledged messages lost")
        self.assertEqual(len(stored), len(set(stored)))
        self.assertIn(await second.terminate(), (0, -signal.SIGTERM))

    async def test_stop_is_bounded(self) -> None:
        """A client that never answers the close frame does not hold the
        stop past shutdown_timeout: it is dropped, and the stop says so."""
        config = make_config(self, database=self.database(), shutdown_timeout=1)
        server = build_server(config, reactor)
        server.service.startService()
        await server.database.when_ready()
        port = (await server.listening()[0]).getHost().port
        silent = await deferToThread(raw_engine_socket, port)
        self.addCleanup(silent.close)
        began = time.monotonic()
        await server.service.stopService()
        elapsed = time.monotonic() - began
        # Autobahn alone would wait 5 s for the close handshake.
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 3)
        await until(lambda: not server.engine.websockets, "the dropped connection to go")

        def read_all() -> tuple[int, bytes]:
            # The raw frame: answering it would fail, the connection is gone.
            frame = silent.recv_frame()
            return frame.opcode, frame.data

        opcode, data = await deferToThread(read_all)
        self.assertEqual(opcode, websocket.ABNF.OPCODE_CLOSE)
        self.assertEqual(struct.unpack("!H", data[:2])[0], CLOSE_SHUTDOWN)
        # Autobahn's close-handshake timer (one batch for every connection)
        # would run out 5 s from now, on a connection already gone: fire it
        # now rather than wait, so the test leaves a clean reactor sooner.
        for call in reactor.getDelayedCalls():
            if getattr(call.func, "__name__", "") == "_notify_bucket":
                call.reset(0)
        await until(lambda: not any(getattr(call.func, "__name__", "") == "_notify_bucket"
                                    for call in reactor.getDelayedCalls()),
                    "Autobahn's timers", timeout=10)


class SQLiteShutdownTests(SQLiteMixin, ShutdownMixin, TestCase):
    pass


class PostgresShutdownTests(PostgresMixin, ShutdownMixin, TestCase):
    pass


class HttpConnectionsAtStopTests(SQLiteMixin, TestCase):
    """A stopping server closes its HTTP connections itself, rather than
    leave them to the idle timeout (75 s) or to the process's exit."""

    async def serving(self) -> tuple[Any, socket.socket]:
        """A server on a real port, and a client connection to it."""
        server = build_server(make_config(self, shutdown_timeout=5), reactor)
        server.service.startService()
        self.addCleanup(lambda: server.service.stopService() if server.service.running else None)
        await server.database.when_ready()
        port = (await server.listening()[0]).getHost().port
        sock = await deferToThread(socket.create_connection, ("127.0.0.1", port), 10)
        self.addCleanup(sock.close)
        return server, sock

    async def test_idle_keep_alive_closed(self) -> None:
        """A keep-alive connection with no request in hand is closed as the
        stop begins: the client reads the end of the connection."""
        server, sock = await self.serving()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")

        def answer() -> int:
            response = http.client.HTTPResponse(sock)
            response.begin()
            response.read()  # the whole answer; the connection stays open
            return response.status

        self.assertEqual(await deferToThread(answer), 200)
        self.assertEqual(len(server.site.channels), 1)
        await server.service.stopService()
        self.assertEqual(await deferToThread(sock.recv, 1), b"")
        self.assertEqual(len(server.site.channels), 0)

    async def test_request_still_arriving_closed(self) -> None:
        """A request whose body has not all arrived when the stop ends is
        cut: the connection is closed with nothing answered, when the stop
        ends and not at the request's deadline."""
        server, sock = await self.serving()
        sock.sendall(b"POST /api/messaging/send HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        await until(lambda: any(channel.requests for channel in server.site.channels),
                    "the request to begin")
        began = time.monotonic()
        await server.service.stopService()
        self.assertLess(time.monotonic() - began, 3)
        self.assertEqual(await deferToThread(sock.recv, 1), b"")
