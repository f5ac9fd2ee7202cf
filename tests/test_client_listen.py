"""
``cyphr-client listen`` when the connection goes: a session the server
ended stops it with one line and a non-zero status; a dropped connection
is said, retried, and the reconnection said too. Nothing is logged as an
error ("cannot join current thread" was, and listen then hung).
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr.client.client import Client
from tests.helpers import (CLIENT, SQLiteMixin, cli_in_process, finish, start_server,
                           wait_for_sockets)

ROOT = Path(__file__).resolve().parent.parent
STRONG = "correct horse battery staple 4711"


class _Proxy(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        super().connectionMade()


class ListenTests(SQLiteMixin, TestCase):
    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.port = port.getHost().port
        self.url = f"http://127.0.0.1:{self.port}"
        self.alice = os.path.abspath(self.mktemp())
        await deferToThread(self.ok, "init")
        await deferToThread(self.ok, "register", "alice", "--prekeys", "5")

    def command(self, *args: str, server: str | None = None) -> list[str]:
        passphrase = Path(f"{self.alice}.passphrase")
        passphrase.write_text(f"passphrase for {self.alice}")
        return [*CLIENT, "--server", server or self.url,
                "--profile", self.alice, "--passphrase-file", str(passphrase), *args]

    def ok(self, *args: str) -> str:
        """(Off the reactor.) A command other than the listen, through
        cli.main in this process: the listen is the process under test."""
        result = cli_in_process(self.command(*args)[len(CLIENT):])
        assert result.returncode == 0, result.stderr
        return result.stdout

    def listen(self, server: str | None = None) -> subprocess.Popen[str]:
        process = subprocess.Popen(self.command("listen", server=server), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                   cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process

    def wait_online(self, sockets: int = 1) -> None:
        """Block (off the reactor) until alice has ``sockets`` welcomed
        sockets on the server: the listen is then connected, in place of
        a guessed sleep."""
        wait_for_sockets(self.server, "alice", sockets)

    def assertNoErrorLogged(self, stderr: str) -> None:
        for sign in ("Traceback", "cannot join", "Exception", "handler error"):
            self.assertNotIn(sign, stderr)

    async def test_session_ended_by_the_server(self) -> None:
        """A logout from another process ends the listen's session: listen
        says so in one line on stderr and exits 1, without a traceback."""
        listen = self.listen()

        def scenario() -> tuple[int, str]:
            assert listen.stderr is not None
            # Ready once the prekey check is done and it is connected.
            self.wait_online()
            self.ok("logout")
            out, err = finish(listen, 30)
            return listen.returncode, err

        status, err = await deferToThread(scenario)
        self.assertEqual(status, 1, err)
        said = [line for line in err.splitlines() if not line.startswith("Publishing")]
        self.assertEqual(len(said), 1, err)
        self.assertIn("the server ended this session", err)
        self.assertIn("cyphr-client login", err)
        self.assertNoErrorLogged(err)

    async def test_dropped_connection_is_retried(self) -> None:
        """A connection cut under listen (here by a proxy in between) is
        said on stderr, retried, and the reconnection said; a message sent
        after it is shown; nothing is logged as an error."""
        factory = portforward.ProxyFactory("127.0.0.1", self.port)
        factory.protocol = _Proxy
        factory.connections = []
        proxy = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(proxy.stopListening)
        listen = self.listen(f"http://127.0.0.1:{proxy.getHost().port}")
        bob, _ = await deferToThread(Client.init, self.mktemp(), STRONG, self.url)
        self.addCleanup(bob.close)
        await deferToThread(bob.register, "bob", None, 2)
        lines: list[str] = []
        lost, reconnected = threading.Event(), threading.Event()

        def read_stderr() -> None:
            assert listen.stderr is not None
            for text in listen.stderr:
                lines.append(text)
                if "was lost" in text:
                    lost.set()
                if "reconnected" in text:
                    reconnected.set()

        reader = threading.Thread(target=read_stderr, daemon=True)

        await deferToThread(self.wait_online)
        reader.start()
        # Until the listen sees it: the stock client may be upgrading from
        # long-polling to a WebSocket, on a connection made after this cut.
        for _ in range(60):
            for connection in list(factory.connections):
                connection.transport.abortConnection()
            if await deferToThread(lost.wait, 0.5):
                break
        self.assertTrue(await deferToThread(reconnected.wait, 30), "".join(lines))
        await deferToThread(bob.send, "alice", "after the drop")

        def shown() -> str:
            assert listen.stdout is not None
            return listen.stdout.readline()

        line = await deferToThread(shown)
        self.assertIn("after the drop", line)
        listen.terminate()
        await deferToThread(listen.wait, 30)
        await deferToThread(reader.join, 10)
        err = "".join(lines)
        self.assertIn("was lost", err)
        self.assertIn("reconnecting", err)
        self.assertIn("reconnected to", err)
        self.assertNoErrorLogged(err)


class _Socket:
    """Stands in for the stock client's websocket-client socket: keeps what
    is sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, data: Any) -> None:
        self.sent.append(data)

    send_binary = send


class EndOfConnectionTests(SynchronousTestCase):
    """The stock Engine.IO client's write loop ends with its connection,
    even when the end (a None in its queue) is taken in one batch with
    packets sent just before (cyphr.client.realtime._EndKeepingQueue)."""

    def test_write_loop_ends_when_the_end_comes_behind_packets(self) -> None:
        """The stock write loop takes a packet and the None behind it in one
        batch, sends the packet, and, the client still connected, waits on
        the queue again: it is answered None at once and ends (the stock
        queue would keep it waiting max(ping interval, ping timeout) + 5 s)."""
        from engineio import packet

        from cyphr.client.realtime import _InOrderEngineIO

        client = _InOrderEngineIO()
        client.state, client.current_transport = "connected", "websocket"
        client.ws, client.ping_interval, client.ping_timeout = _Socket(), 25, 20
        client.queue.put(packet.Packet(packet.MESSAGE, "hello"))
        client.queue.put(None)
        loop = threading.Thread(target=client._write_loop, daemon=True)
        loop.start()
        loop.join(5)
        self.assertFalse(loop.is_alive(), "the write loop still waits on its queue")
        self.assertEqual(client.ws.sent, ["4hello"])
        self.assertEqual(client.queue.unfinished_tasks, 0)

    def test_queue_reopens_with_the_next_connection(self) -> None:
        """Once the connection is over (the stock client's _reset, which
        empties the queue without blocking), the queue waits as any queue
        again."""
        from cyphr.client.realtime import _EndKeepingQueue

        q = _EndKeepingQueue()
        q.put("packet")
        q.put(None)
        self.assertEqual((q.get(), q.get(block=False)), ("packet", None))
        self.assertIsNone(q.get(timeout=30))  # ended: answered at once
        with self.assertRaises(queue.Empty):
            q.get(block=False)  # what emptying it uses: never answered None
        q.reopen()
        with self.assertRaises(queue.Empty):
            q.get(timeout=0.05)
