"""The reference client's WebSocket over TLS (cyphr.client.realtime
._OneAtATimeTLS): read on one thread and written on another, as the stock
Engine.IO client does, over a real TLS connection (Python's ssl on a
socket pair, the tests' self-signed certificate)."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from typing import Any

import websocket
from twisted.trial.unittest import TestCase

from cyphr.client.realtime import _OneAtATimeTLS
from tests.certificates import self_signed


class TLSWebSocketTests(TestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        key, cert = self_signed(directory)
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.load_cert_chain(cert, key)
        self.client_context = ssl.create_default_context(cafile=cert)
        self.client_context.check_hostname = False

    def connect(self, timeout: float = 5.0) -> tuple[_OneAtATimeTLS, ssl.SSLSocket]:
        """A client WebSocket and the server's end, TLS over a socket pair."""
        client_end, server_end = socket.socketpair()
        server: list[ssl.SSLSocket] = []
        handshake = threading.Thread(
            target=lambda: server.append(self.server_context.wrap_socket(server_end, server_side=True)))
        handshake.start()
        tls = self.client_context.wrap_socket(client_end, server_hostname="127.0.0.1")
        handshake.join(5)
        tls.settimeout(timeout)  # as the stock client's: ping interval + ping timeout
        ws = _OneAtATimeTLS(enable_multithread=True)
        ws.sock, ws.connected = tls, True
        self.addCleanup(tls.close)
        self.addCleanup(server[0].close)
        return ws, server[0]

    def test_reads_and_writes_at_once(self) -> None:
        """Reads on one thread and writes on another, for half a second with
        the server writing too: every read answers data and every write
        goes. (The stock websocket.WebSocket, in the same run, fails within
        milliseconds: a read of b"" taken for the server's close, or a
        "bad record mac" alert.)"""
        ws, server = self.connect()
        failures: list[Any] = []
        stop = threading.Event()

        def server_writes() -> None:
            try:
                while not stop.is_set():
                    server.sendall(b"s" * 50)
                    time.sleep(0.0002)
            except OSError as e:
                failures.append(("server", e))

        def server_reads() -> None:
            try:
                while server.recv(65536):
                    pass
            except OSError:
                pass

        reads = 0

        def client_reads() -> None:
            nonlocal reads
            try:
                while not stop.is_set():
                    if not ws._recv(16384):
                        failures.append(("read", b""))
                        return
                    reads += 1
            except Exception as e:
                if not stop.is_set():
                    failures.append(("read", e))

        threads = [threading.Thread(target=f, daemon=True) for f in (server_writes, server_reads, client_reads)]
        for thread in threads:
            thread.start()
        writes, deadline = 0, time.monotonic() + 0.5
        try:
            while time.monotonic() < deadline and not failures:
                ws._send(b"c" * 40)
                writes += 1
        except Exception as e:
            failures.append(("write", e))
        stop.set()
        threads[0].join(5)
        self.assertEqual(failures, [])
        self.assertGreater(reads, 10)
        self.assertGreater(writes, 100)

    def test_a_waiting_read_lets_writes_through(self) -> None:
        """A read waiting for data holds no lock: a write goes meanwhile,
        and the read then answers what the server sent."""
        ws, server = self.connect()
        read: list[bytes] = []
        reader = threading.Thread(target=lambda: read.append(ws._recv(100)), daemon=True)
        reader.start()
        time.sleep(0.05)  # the reader is waiting
        ws._send(b"hello")
        self.assertEqual(server.recv(100), b"hello")
        server.sendall(b"answer")
        reader.join(5)
        self.assertEqual(read, [b"answer"])

    def test_read_times_out(self) -> None:
        """With nothing to read, a read ends at the socket's timeout with the
        stock client's timeout exception (its read loop then gives up on the
        server), not with an empty read."""
        ws, _ = self.connect(timeout=0.2)
        started = time.monotonic()
        with self.assertRaises(websocket.WebSocketTimeoutException):
            ws._recv(100)
        self.assertGreaterEqual(time.monotonic() - started, 0.19)
