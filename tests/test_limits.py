"""
Limits on what one client address, and the process as a whole, may hold
open: connections (a cap per address and one in all, below the open-file
limit), a deadline for each request's head and body, and Engine.IO
handshakes and sessions that have not connected a namespace yet.

The request deadline is tested on an in-memory transport with the site's
timers on a task.Clock; the connection caps on a real port, since they act
on accepted sockets.
"""

from __future__ import annotations

import gc
import json
import resource
import socket
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from klein import Klein
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.api.http import ApiRouter, CyphrRequest, CyphrSite, HttpPolicy, Root, answer
from cyphr.config import Config, ConfigError, validate
from cyphr.connections import ConnectionLimits, address_key, connection_cap
from tests.helpers import InProcessHTTP, SQLiteMixin, fixed_clock, make_config, start_server
from tests.realtime import sessions_closed, until
from tests.test_realtime_transport import WireSocket

POLLING = "/socket.io/?EIO=4&transport=polling"


class SlowAPI:
    """Routes standing for every real one: one answers at once, one when
    the test releases it."""

    app = Klein()

    def __init__(self) -> None:
        self.release: Deferred[None] = Deferred()
        self.waiting = 0

    @app.route("/api/ping", methods=["GET", "POST"])
    def ping(self, request: Any) -> bytes:
        return answer(request, {"success": True, "client": request.client_ip})

    @app.route("/api/slow", methods=["GET"])
    async def slow(self, request: Any) -> bytes:
        self.waiting += 1
        await self.release
        return answer(request, {"success": True})


def make_site(testcase: TestCase, clock: Any = reactor, **overrides: Any) -> tuple[SlowAPI, CyphrSite]:
    api = SlowAPI()
    policy = HttpPolicy.from_config(make_config(testcase, **overrides))
    return api, CyphrSite(Root(ApiRouter([api])), policy, clock)


def connect(site: CyphrSite, host: str = "198.51.100.7") -> tuple[Any, StringTransport]:
    """A channel of ``site`` on an in-memory transport from ``host``."""
    address = IPv4Address("TCP", host, 40000)
    protocol = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def status_and_json(raw: bytes) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of one raw HTTP answer (chunked or not)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        whole = b""
        while True:
            size, _, rest = body.partition(b"\r\n")
            length = int(size, 16)
            if length == 0:
                break
            whole, body = whole + rest[:length], rest[length + 2:]
        body = whole
    return int(head.split(b" ", 2)[1]), json.loads(body)


# -- the request deadline -------------------------------------------------------


class RequestDeadlineTests(TestCase):
    """The whole request, head and body, must arrive within request_timeout
    (extended only by bytes actually received); idleness alone is not the
    measure."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.api, self.site = make_site(self, self.clock, request_timeout=30, max_body=4 * 1024 * 1024)

    def test_trickled_head_is_timed_out(self) -> None:
        """A client sending one byte of its request head every 20 s (never
        idle for the 75 s idle timeout) is answered 408 in the contract's
        format 30 s after its first byte, and its connection closed."""
        protocol, transport = connect(self.site)
        for byte in b"GET /api/":
            protocol.dataReceived(bytes([byte]))
            self.clock.advance(20)
            if transport.disconnecting:
                break
        self.assertTrue(transport.disconnecting)
        status, body = status_and_json(transport.value())
        self.assertEqual((status, body["code"], body["success"]), (408, "REQUEST_TIMEOUT", False))
        self.assertEqual(self.site.connections.refused["request_timeout"], 1)

    def test_trickled_body_is_timed_out(self) -> None:
        """A head sent at once and a body trickled a byte at a time is timed
        out all the same: the deadline covers the body."""
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"POST /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        for _ in range(10):
            protocol.dataReceived(b" ")
            self.clock.advance(5)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(status_and_json(transport.value())[0], 408)

    def test_body_arriving_steadily_earns_time(self) -> None:
        """A large body arriving at a steady rate (64 KiB a second, 40 s in
        all) is not cut off at the base deadline: each byte received extends it."""
        protocol, transport = connect(self.site)
        size = 40 * 64 * 1024
        protocol.dataReceived(b"POST /api/ping HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n" % size)
        chunk = b" " * (64 * 1024 - 2)
        for index in range(40):
            protocol.dataReceived(b"{}" + chunk if index == 0 else b"  " + chunk)
            self.clock.advance(1)
        self.assertFalse(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:60])

    def test_request_being_answered_is_not_timed_out(self) -> None:
        """Once the request has arrived the deadline no longer applies: a
        route that takes 100 s (as a long-polling GET may) still answers."""
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /api/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.api.waiting, 1)
        self.clock.advance(100)
        self.assertFalse(transport.disconnecting)
        self.api.release.callback(None)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:60])

    def test_each_request_of_a_connection_has_its_own_deadline(self) -> None:
        """On a kept-alive connection the deadline starts again with the
        first byte of each request: a second request, sent whole 25 s after
        the first, is answered."""
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(25)
        transport.clear()
        protocol.dataReceived(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(25)
        self.assertFalse(transport.disconnecting)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:60])


# -- connection caps --------------------------------------------------------------


class _RealPort:
    """A site on a real port, and raw connections to it."""

    async def listen(self, **overrides: Any) -> None:
        self.api, self.site = make_site(self, **overrides)
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        self.addCleanup(self.port.stopListening)
        self.sockets: list[socket.socket] = []
        self.addCleanup(self._close_all)

    async def _close_all(self) -> None:
        for s in self.sockets:
            s.close()
        await until(lambda: self.site.connections.open == 0, "every connection closed")

    async def hold(self) -> socket.socket:
        """An open connection that has sent nothing, once the server counts it."""
        before = self.site.connections.open
        s = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=10)
        self.sockets.append(s)
        await until(lambda: self.site.connections.open > before, "the connection counted")
        return s

    def exchange(self, data: bytes) -> Deferred[bytes]:
        """Send ``data`` on a new connection; everything answered until it closes."""
        port = self.port.getHost().port

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                try:
                    s.sendall(data)
                except OSError:
                    pass  # refused early: the answer is read all the same
                received = b""
                while True:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        return received
                    if not chunk:
                        return received
                    received += chunk

        return deferToThread(talk)


PING = b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


class GlobalCapTests(_RealPort, TestCase):
    """At most max_connections open connections in all."""

    async def test_over_the_cap_is_503_and_closed(self) -> None:
        """With max_connections connections open, the next is accepted,
        answered 503 in the contract's format and closed; once one of them
        goes, a new connection is served again."""
        await self.listen(max_connections=2)
        first = await self.hold()
        await self.hold()
        refused = await self.exchange(PING)
        self.assertTrue(refused.startswith(b"HTTP/1.1 503 "), refused[:80])
        status, body = status_and_json(refused)
        self.assertEqual((body["success"], body["code"]), (False, "SERVER_BUSY"))
        self.assertIn(b"Retry-After: ", refused)
        self.assertEqual(self.site.connections.refused["total"], 1)
        first.close()
        await until(lambda: self.site.connections.open == 1, "the closed connection released")
        served = await self.exchange(PING)
        self.assertTrue(served.startswith(b"HTTP/1.1 200 "), served[:80])


class PerAddressCapTests(_RealPort, TestCase):
    """At most max_connections_per_address connections for one client address."""

    async def test_over_the_cap_is_429(self) -> None:
        """A third connection from an address that holds two (the cap) is
        answered 429 and closed at once, before it sends anything."""
        await self.listen(max_connections_per_address=2)
        await self.hold()
        await self.hold()
        refused = await self.exchange(b"")
        status, body = status_and_json(refused)
        self.assertEqual((status, body["code"]), (429, "RATE_LIMITED"))
        self.assertEqual(self.site.connections.refused["per_address"], 1)

    async def test_trusted_proxy_is_not_one_client(self) -> None:
        """A trusted proxy's connections are not capped as its own address:
        they count for the client each request comes from, while that
        request is in flight. Two slow requests of one client behind the
        proxy hold its two places; a third of the same client is 429, one of
        another client is served."""
        await self.listen(max_connections_per_address=2, trusted_proxy=("127.0.0.1",))
        slow = (b"GET /api/slow HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n"
                b"Connection: close\r\n\r\n")
        answers = [self.exchange(slow), self.exchange(slow)]
        await until(lambda: self.api.waiting == 2, "two slow requests in flight")
        third = await self.exchange(PING.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"))
        status, body = status_and_json(third)
        self.assertEqual((status, body["code"]), (429, "RATE_LIMITED"))
        other = await self.exchange(PING.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 203.0.113.10\r\n\r\n"))
        self.assertEqual(status_and_json(other), (200, {"success": True, "client": "203.0.113.10"}))
        self.api.release.callback(None)
        for d in answers:
            self.assertTrue((await d).startswith(b"HTTP/1.1 200 "))


class CapSettingTests(TestCase):
    """The caps as configured."""

    def test_global_cap_follows_open_file_limit(self) -> None:
        """max_connections 0 (the default) is 80% of the open-file limit read
        at start; a setting above that is brought down to it."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertEqual(HttpPolicy.from_config(make_config(self)).max_connections, soft * 8 // 10)
        self.assertEqual(connection_cap(0, 1000), 800)
        self.assertEqual(connection_cap(500, 1000), 500)
        self.assertEqual(connection_cap(5000, 1000), 800)

    def test_ipv6_counts_by_64(self) -> None:
        """IPv6 clients are counted by their /64 (one subscriber holds a whole
        /64); IPv4, IPv4-mapped and non-IP peers as they are."""
        self.assertEqual(address_key("2001:db8:1:2:aaaa::1"), address_key("2001:db8:1:2:ffff::9"))
        self.assertNotEqual(address_key("2001:db8:1:2::1"), address_key("2001:db8:1:3::1"))
        self.assertEqual(address_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(address_key("192.0.2.1"), "192.0.2.1")

    def test_counts_are_forgotten(self) -> None:
        """An address whose last connection goes is no longer held in memory."""
        limits = ConnectionLimits(total=10, per_address=2)
        self.assertTrue(limits.claim("192.0.2.1"))
        self.assertTrue(limits.claim("192.0.2.1"))
        self.assertFalse(limits.claim("192.0.2.1"))
        limits.unclaim("192.0.2.1")
        limits.unclaim("192.0.2.1")
        self.assertEqual(limits.addresses, 0)

    def test_validation(self) -> None:
        """Impossible values are refused with the option's name."""
        for name, value in (("max_connections", -1), ("max_connections_per_address", -1),
                            ("request_timeout", 0), ("realtime_pending_sessions", -1)):
            with self.assertRaises(ConfigError) as caught:
                validate(Config(**{name: value}))
            self.assertIn(name.replace("_", "-"), str(caught.exception))

    def test_defaults(self) -> None:
        """The documented defaults: 256 connections per address, 30 s per
        request, 60 handshakes per 3 s, 32 sessions without a namespace per
        address, and 10 s to connect a namespace."""
        config = Config()
        self.assertEqual((config.max_connections, config.max_connections_per_address,
                          config.request_timeout, config.realtime_handshake_rate,
                          config.realtime_pending_sessions, config.connect_timeout),
                         (0, 256, 30, (60, 3), 32, 10))


class WebSocketConnectionTests(SQLiteMixin, TestCase):
    """A WebSocket holds its connection's place until its TCP connection closes."""

    timeout = 30

    async def test_websocket_counted_until_closed(self) -> None:
        """The connection a WebSocket took over from HTTP stays counted while
        the WebSocket is open (in all and for its address) and is released
        when it closes; meanwhile nothing keeps the HTTP request that opened
        it (its headers and channel cost an idle socket about 4 KiB)."""
        server = await start_server(self, serve=True)
        [port] = [await d for d in server.listening()]
        url = f"ws://127.0.0.1:{port.getHost().port}/socket.io/?EIO=4&transport=websocket"
        factory = WebSocketClientFactory(url)
        factory.protocol = WireSocket
        ws = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                                   factory.buildProtocol(None))
        await ws.opened
        await ws.recv()  # the open packet
        self.assertEqual(server.site.connections.open, 1)
        self.assertEqual(server.site.connections.addresses, 1)
        gc.collect()
        kept = [o for o in gc.get_objects()
                if isinstance(o, CyphrRequest) and b"transport=websocket" in (o.uri or b"")]
        self.assertEqual(kept, [])
        ws.sendClose(1000)
        await ws.wait_closed()
        await sessions_closed(server)
        await until(lambda: server.site.connections.open == 0, "the WebSocket's connection released")
        self.assertEqual(server.site.connections.addresses, 0)


# -- Engine.IO handshakes and sessions -----------------------------------------------


class HandshakeTests(SQLiteMixin, TestCase):
    """Engine.IO handshakes per address per second, and open sessions per
    address that have connected no namespace, are capped; refusals are in
    the reference server's error format."""

    async def serve(self, **overrides: Any) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, inline=True, **overrides)
        self.http = InProcessHTTP.for_server(self.server)
        self.addCleanup(self.server.engine.close_all, "test over")

    async def handshake(self, query: str = POLLING) -> Any:
        return await self.http.get(query)

    async def test_handshake_rate(self) -> None:
        """Past the handshake rate an address is answered 429 with
        ``{"code": 4, "message": ...}`` and Retry-After; time restores it."""
        await self.serve(realtime_handshake_rate=(3, 3), realtime_pending_sessions=0)
        for _ in range(3):
            self.assertEqual((await self.handshake()).code, 200)
        refused = await self.handshake()
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.header("Content-Type"), "application/json")
        self.assertEqual(refused.json(), {"code": 4, "message": "Too many handshakes from this address"})
        self.assertIsNotNone(refused.header("Retry-After"))
        websocket = await self.handshake("/socket.io/?EIO=4&transport=websocket")
        self.assertEqual(websocket.code, 429)
        self.assertEqual(len(self.server.engine.sessions), 3)
        self.clock.advance(1)
        self.assertEqual((await self.handshake()).code, 200)
        self.assertEqual(self.server.engine.refused_handshakes["handshake_rate"], 2)

    async def test_pending_sessions(self) -> None:
        """An address holding realtime_pending_sessions sessions that have
        connected no namespace gets 429 for the next; a session that connects
        a namespace, or closes, makes room."""
        await self.serve(realtime_pending_sessions=2)
        sids = []
        for _ in range(2):
            reply = await self.handshake()
            self.assertEqual(reply.code, 200)
            sids.append(json.loads(reply.body[1:])["sid"])
        refused = await self.handshake()
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.json(), {"code": 4, "message": "Too many sessions without a namespace"})
        self.assertEqual(self.server.engine.refused_handshakes["pending_sessions"], 1)
        # The first connects the main namespace (no token: accepted, as the contract says).
        ok = await self.http.post(f"{POLLING}&sid={sids[0]}", headers={b"Content-Type": [b"text/plain"]},
                                  data=b"40")
        self.assertEqual(ok.body, b"ok")
        connected = await self.http.get(f"{POLLING}&sid={sids[0]}")
        self.assertTrue(connected.body.startswith(b"40"), connected.body)
        self.assertEqual((await self.handshake()).code, 200)
        self.assertEqual((await self.handshake()).code, 429)
        # The second closes.
        await self.http.post(f"{POLLING}&sid={sids[1]}", headers={b"Content-Type": [b"text/plain"]},
                             data=b"1")
        self.assertEqual((await self.handshake()).code, 200)

    async def test_session_without_namespace_ends_after_10s(self) -> None:
        """By default a session that connects no namespace is closed after
        10 s (the reference's 45 s is for clients that never send CONNECT at
        once; Socket.IO clients send it with the handshake's answer)."""
        await self.serve()
        reply = await self.handshake()
        sid = json.loads(reply.body[1:])["sid"]
        self.clock.advance(9)
        self.assertFalse(self.server.engine.sessions[sid].closed)
        self.clock.advance(1)
        self.assertTrue(sid not in self.server.engine.sessions or self.server.engine.sessions[sid].closed)

    async def test_refusals_in_metrics(self) -> None:
        """Refused handshakes and connections are counted in
        cyphr_connections_refused_total by reason."""
        await self.serve(realtime_handshake_rate=(1, 60))
        await self.handshake()
        await self.handshake()
        metrics = (await self.http.get("/metrics")).body.decode("utf-8")
        self.assertIn('cyphr_connections_refused_total{reason="handshake_rate"} 1.0', metrics)
        self.assertIn('cyphr_connections_refused_total{reason="per_address"} 0.0', metrics)
        self.assertIn("cyphr_http_connections_limit ", metrics)
