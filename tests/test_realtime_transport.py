"""
Engine.IO v4 and Socket.IO v5 on the wire, over a real port. These tests
speak the protocol themselves (HTTP through treq or a bare TCP connection,
WebSocket frames through Autobahn's client protocol), so what they check
is exact bytes, status codes and close codes. The server's realtime timers
run on a task.Clock; its database runs on the real reactor.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from cyphr.realtime.socketio import AckTimeout, Disconnected
from tests.helpers import InProcessHTTP, SQLiteMixin, fixed_clock, start_server
from tests.realtime import WireSocket, sessions_closed, sleep, until
from tests.users import User

POLLING = "EIO=4&transport=polling"
WEBSOCKET = "EIO=4&transport=websocket"
OPEN_KEYS = {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
SMALL = 64 * 1024  # max_body and realtime_buffer of the limit tests
TEXT = "text/plain; charset=UTF-8"
UNKNOWN_EVENT = '{"success":false,"error":"Unknown event","code":"UNKNOWN_EVENT"}'
RATE_LIMITED = '{"success":false,"error":"Too many events","code":"RATE_LIMITED"}'
NO_NAMESPACE = '44/nope,{"message":"Invalid namespace"}'
UPGRADE_HEADERS = (
    b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def client_frame(payload: bytes, *, opcode: int = 1, fin: bool = True, rsv: int = 0,
                 masked: bool = True, wide: bool = False) -> bytes:
    """One client-to-server WebSocket frame, as given, valid or not
    (``wide``: the length in 16 bits even when it fits in 7)."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126 and not wide:
        header = bytes((first, mask_bit | size))
    elif size < 0x10000:
        header = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def unknown_event(ack_id: int, argument: str = "") -> bytes:
    return f'42{ack_id}["no_such_event"{"," + json.dumps(argument) if argument else ""}]'.encode()


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass
class Reply:
    code: int
    body: bytes
    content_type: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


class _RawExchange(Protocol):
    """One HTTP request written as given, and its answer read as it comes:
    for what treq would not send (an upgrade) or not show (an early 413)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, found, body = self.data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n")[1:] if found else ():
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and len(body) >= int(value):
                self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


def parse_raw(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().decode("latin-1")
    return Reply(int(lines[0].split(b" ")[1]), body, headers.get(b"content-type"))


class _RecordingFactory(WebSocketClientFactory):
    protocol = WireSocket

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.built: list[WireSocket] = []

    def buildProtocol(self, addr: Any) -> WireSocket:
        ws = super().buildProtocol(addr)
        self.built.append(ws)
        return ws


class TransportTests(SQLiteMixin, TestCase):
    """The wire rules of socketio-protocol.md, one by one."""

    timeout = 30

    # -- plumbing -------------------------------------------------------------

    async def serve(self, **overrides: Any) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, serve=True, clock=self.clock,
                                         **overrides)
        [port] = [await d for d in self.server.listening()]
        self.port = port.getHost().port
        # No keep-alive: each request has a connection of its own, as
        # concurrent polls need, and none stays open after the test.
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.websockets: list[WireSocket] = []
        self.polling: list[str] = []
        self.pending: list[Deferred[Reply]] = []
        self.addCleanup(self._hang_up)

    async def _hang_up(self) -> None:
        for d in self.pending:
            if not d.called:
                d.cancel()
                d.addErrback(lambda _: None)
        for ws in self.websockets:
            if not ws.ended.called:
                if ws.state == ws.STATE_OPEN:
                    ws.sendClose(1000)
                else:
                    ws.dropConnection(abort=True)
                await ws.wait_closed()
        for sid in self.polling:
            session = self.server.engine.sessions.get(sid)
            if session is not None and not session.closed:
                await self.post(sid, "1")
            elif session is not None:
                await self.poll(sid)  # a closed session waits to say so
        await sessions_closed(self.server, timeout=5)
        await self.pool.closeCachedConnections()

    async def request(self, method: str, query: str, body: bytes | None = None,
                      path: str = "/socket.io/") -> Reply:
        url = f"http://127.0.0.1:{self.port}{path}?{query}"
        headers = {b"Content-Type": [b"text/plain;charset=UTF-8"]} if body else None
        response = await treq.request(method, url, data=body, headers=headers,
                                      pool=self.pool)
        content = await treq.content(response)
        [kind] = response.headers.getRawHeaders(b"content-type", [None])
        return Reply(response.code, content, kind.decode("latin-1") if kind else None)

    async def raw(self, request: bytes) -> Reply:
        exchange = _RawExchange(request)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        await connectProtocol(endpoint, exchange)
        return parse_raw(await exchange.done.addTimeout(5, reactor))

    async def user(self, name: str = "alice") -> User:
        user = User(name)
        await user.register(InProcessHTTP.for_server(self.server))
        return user

    # polling

    async def handshake(self, path: str = "/socket.io/") -> tuple[str, dict[str, Any]]:
        """A polling handshake: the sid and the open packet's JSON."""
        reply = await self.request("GET", POLLING + "&t=Nq0z1aB", path=path)
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.body[:1], b"0")
        opened = json.loads(reply.body[1:])
        self.polling.append(opened["sid"])
        return opened["sid"], opened

    async def poll(self, sid: str) -> Reply:
        return await self.request("GET", f"{POLLING}&sid={sid}")

    async def held_poll(self, sid: str) -> Deferred[Reply]:
        """A GET that the server holds (it has nothing to send yet)."""
        d = Deferred.fromCoroutine(self.poll(sid))
        self.pending.append(d)
        # The server's side of it is the only sign that it has arrived.
        session = self.server.engine.sessions[sid]
        await until(lambda: session._poll is not None or d.called, "the poll to arrive")
        self.assertFalse(d.called, "the poll was answered at once")
        return d

    async def post(self, sid: str, payload: str | bytes) -> Reply:
        body = payload.encode("utf-8") if isinstance(payload, str) else payload
        return await self.request("POST", f"{POLLING}&sid={sid}", body)

    async def polling_socket(self, user: User | None = None) -> tuple[str, str]:
        """A polling session connected to the main namespace (with the
        user's token: until its catch-up is done): (Engine.IO sid,
        Socket.IO sid)."""
        sid, _ = await self.handshake()
        auth = compact({"token": user.token}) if user else ""
        self.assertEqual((await self.post(sid, "40" + auth)).body, b"ok")
        records = (await self.poll(sid)).body.decode().split("\x1e")
        self.assertEqual(records[0][:3], "40{", records)
        connected = json.loads(records[0][2:])
        while user and not records[-1].startswith('42["sync_complete"'):
            records = (await self.poll(sid)).body.decode().split("\x1e")
        return sid, connected["sid"]

    # WebSocket

    async def connect_ws(self, sid: str | None = None, query: str = WEBSOCKET,
                         path: str = "/socket.io/") -> WireSocket:
        """A WebSocket (with ``sid``: an upgrade probe); fails with
        ConnectionError if the handshake does."""
        url = f"ws://127.0.0.1:{self.port}{path}?{query}"
        factory = _RecordingFactory(url + (f"&sid={sid}" if sid else ""))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        ws: WireSocket = await endpoint.connect(factory)
        self.websockets.append(ws)
        await ws.opened.addTimeout(5, reactor)
        return ws

    async def websocket(self, connect: bool = True,
                        ) -> tuple[WireSocket, str, str | None]:
        """A fresh WebSocket session: (socket, Engine.IO sid, Socket.IO sid
        if connected to the main namespace)."""
        ws = await self.connect_ws()
        return (ws, *await self._open(ws, connect))

    async def _open(self, ws: WireSocket, connect: bool) -> tuple[str, str | None]:
        opened = await ws.recv()
        self.assertEqual(opened[0], "0")
        sid = json.loads(opened[1:])["sid"]
        if not connect:
            return sid, None
        ws.send_text("40")
        reply = await ws.recv()
        self.assertEqual(reply[:3], "40{", reply)
        return sid, json.loads(reply[2:])["sid"]

    async def signed_in_ws(self) -> tuple[WireSocket, str, str]:
        """A WebSocket session whose CONNECT carried a valid token, welcomed
        (its packets may then be as large as max_body)."""
        alice = await self.user()
        ws = await self.connect_ws()
        sid, _ = await self._open(ws, connect=False)
        ws.send_text("40" + compact({"token": alice.token}))
        connected = await ws.recv()
        self.assertEqual(connected[:3], "40{", connected)
        while not (await ws.recv()).startswith('42["sync_complete"'):
            pass
        return ws, sid, json.loads(connected[2:])["sid"]

    async def no_frame(self, ws: WireSocket, wait: float = 0.1) -> None:
        await sleep(wait)
        self.assertEqual(ws.frames.pending, [])

    async def nothing_more(self, ws: WireSocket) -> None:
        """Nothing came in answer to what was sent before: the session reads
        and answers frames in order, so whatever it had to send for them
        comes before its answer to a round trip (a barrier, not a sleep)."""
        await self.round_trip(ws)
        self.assertEqual(ws.frames.pending, [])

    async def assert_alive(self, ws: WireSocket, ack_id: int = 99) -> None:
        """The socket's session answers an event with an ack (the error ack
        of an unknown event)."""
        ws.send_text(f'42{ack_id}["no_such_event"]')
        self.assertEqual(await ws.recv(), f"43{ack_id}[{UNKNOWN_EVENT}]")

    async def round_trip(self, ws: WireSocket) -> None:
        """The session answers, without a namespace: everything sent before
        has been read."""
        ws.send_text("40/nope,")
        self.assertEqual(await ws.recv(), NO_NAMESPACE)

    def gone(self, sid: str) -> bool:
        return sid not in self.server.engine.sessions

    # -- 1. handshake ---------------------------------------------------------

    async def test_polling_handshake(self) -> None:
        """A polling GET opens a session: 200, text/plain, ``0`` and exactly
        five keys; times are integer milliseconds, maxPayload the body limit;
        junk query parameters are ignored."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        reply = await self.request("GET", POLLING + "&t=PZ8x2Yq&j=1&b64=1")
        self.assertEqual((reply.code, reply.content_type), (200, TEXT))
        self.assertEqual(reply.body[:1], b"0")
        opened = json.loads(reply.body[1:])
        self.polling.append(opened["sid"])
        self.assertEqual(set(opened), OPEN_KEYS)
        self.assertEqual(opened["upgrades"], ["websocket"])
        timing = (opened["pingInterval"], opened["pingTimeout"], opened["maxPayload"])
        self.assertEqual(timing, (25000, 20000, SMALL))
        self.assertEqual([type(value) for value in timing], [int, int, int])
        self.assertGreaterEqual(len(opened["sid"]), 20)
        session = self.server.engine.sessions[opened["sid"]]
        self.assertEqual(session.transport, "polling")

    async def test_handshake_follows_settings(self) -> None:
        """The advertised heartbeat follows ping_interval and ping_timeout."""
        await self.serve(ping_interval=3, ping_timeout=2)
        _, opened = await self.handshake()
        self.assertEqual((opened["pingInterval"], opened["pingTimeout"]), (3000, 2000))
        self.assertEqual(opened["maxPayload"], self.server.config.max_body)

    async def test_websocket_handshake(self) -> None:
        """A WebSocket opens a session by itself: its first frame is
        ``0{...}``, with no upgrades."""
        await self.serve()
        ws = await self.connect_ws(query=WEBSOCKET + "&t=abc")
        opened = await ws.recv()
        self.assertEqual(opened[0], "0")
        body = json.loads(opened[1:])
        self.assertEqual(set(body), OPEN_KEYS)
        self.assertEqual(body["upgrades"], [])
        timing = (body["pingInterval"], body["pingTimeout"], body["maxPayload"])
        self.assertEqual(timing, (25000, 20000, self.server.config.max_body))
        session = self.server.engine.sessions[body["sid"]]
        self.assertEqual(session.transport, "websocket")
        # On plain TCP, frames are written to the socket at once
        # (EngineWebSocket._write), not left for the reactor's next turn.
        [protocol] = self.server.engine.websockets
        self.assertIs(protocol._socket, protocol.transport.getHandle())
        await self.nothing_more(ws)

    async def test_bad_handshakes(self) -> None:
        """A missing or wrong EIO: 400 code 5; a missing or unknown transport:
        400 code 0; a handshake by POST or PUT: 400 code 2; a WebSocket
        request without the upgrade: 400 code 3. No session is made."""
        await self.serve()
        for method, query, code in [
            ("GET", "transport=polling", 5),
            ("GET", "EIO=3&transport=polling", 5),
            ("GET", "EIO=four&transport=websocket", 5),
            ("GET", "EIO=4", 0),
            ("GET", "EIO=4&transport=flashsocket", 0),
            ("GET", "EIO=4&transport=", 0),
            ("POST", POLLING, 2),
            ("PUT", POLLING, 2),
        ]:
            body = b"40" if method != "GET" else None
            reply = await self.request(method, query, body)
            self.assertEqual((reply.code, reply.json()["code"]), (400, code), query)
            self.assertEqual(reply.content_type, "application/json")
            self.assertEqual(set(reply.json()), {"code", "message"})
        for query, code in [(WEBSOCKET, 3), ("EIO=3&transport=websocket", 5)]:
            upgrade = UPGRADE_HEADERS if code == 5 else b"Host: 127.0.0.1\r\n"
            reply = await self.raw(
                f"GET /socket.io/?{query} HTTP/1.1\r\n".encode() + upgrade + b"\r\n")
            self.assertEqual((reply.code, json.loads(reply.body)["code"]), (400, code))
        self.assertEqual(self.server.engine.sessions, {})

    async def test_unknown_sid(self) -> None:
        """An unknown sid gets 400 code 1: a polling GET, a POST, and a
        WebSocket upgrade (400, not 101)."""
        await self.serve()
        unknown = {"code": 1, "message": "Session ID unknown"}
        self.assertEqual((await self.poll("nope")).json(), unknown)
        reply = await self.post("nope", "40")
        self.assertEqual((reply.code, reply.json()), (400, unknown))
        reply = await self.raw(
            b"GET /socket.io/?EIO=4&transport=websocket&sid=nope HTTP/1.1\r\n"
            + UPGRADE_HEADERS + b"\r\n")
        self.assertEqual((reply.code, json.loads(reply.body)), (400, unknown))
        with self.assertRaises(ConnectionError):
            await self.connect_ws(sid="nope")
        self.assertEqual(self.server.engine.sessions, {})

    async def test_path_without_trailing_slash(self) -> None:
        """``/socket.io`` (a JS client with addTrailingSlash: false) reaches
        the same server on both transports; ``/socket.io.js`` does not."""
        await self.serve()
        sid, _ = await self.handshake(path="/socket.io")
        reply = await self.request("POST", f"{POLLING}&sid={sid}", b"40",
                                   path="/socket.io")
        self.assertEqual(reply.body, b"ok")
        reply = await self.request("GET", f"{POLLING}&sid={sid}", path="/socket.io")
        self.assertEqual(reply.body[:3], b"40{")
        ws = await self.connect_ws(path="/socket.io")
        self.assertEqual((await ws.recv())[0], "0")
        reply = await self.request("GET", POLLING, path="/socket.io.js")
        self.assertEqual(reply.code, 404)

    # -- 2. polling -----------------------------------------------------------

    async def test_post_and_held_get(self) -> None:
        """A POST is answered exactly ``ok`` (text/html); a GET with nothing
        to send is held, then answered by the CONNECT reply, whose sid is
        not the Engine.IO one."""
        await self.serve()
        sid, _ = await self.handshake()
        held = await self.held_poll(sid)
        await sleep(0.05)
        self.assertFalse(held.called)
        reply = await self.post(sid, "40")
        self.assertEqual(reply, Reply(200, b"ok", "text/html"))
        reply = await held
        self.assertEqual((reply.code, reply.content_type), (200, TEXT))
        self.assertEqual(reply.body[:2], b"40")
        connected = json.loads(reply.body[2:])
        self.assertEqual(set(connected), {"sid"})
        self.assertNotEqual(connected["sid"], sid)

    async def test_packets_joined_by_record_separator(self) -> None:
        """What waits is sent at once, joined by \\x1e, binary as
        ``b<base64>``; a POST may carry several packets the same way."""
        await self.serve()
        sid, _ = await self.handshake()
        self.assertEqual((await self.post(sid, "40\x1e40/nope,")).body, b"ok")
        first, second = (await self.poll(sid)).body.split(b"\x1e")
        self.assertEqual(first[:3], b"40{")
        self.assertEqual(second, NO_NAMESPACE.encode())
        self.server.realtime.ns.emit("a", 1)
        self.server.realtime.ns.emit("b", b"\x01\x02\x03\x04")
        self.assertEqual((await self.poll(sid)).body,
                         b'42["a",1]\x1e451-["b",{"_placeholder":true,"num":0}]\x1ebAQIDBA==')

    async def test_concurrent_get(self) -> None:
        """A second GET while one is held breaks the protocol: the first gets
        ``1``, the second 400, and the session is gone."""
        await self.serve()
        sid, _ = await self.handshake()
        first = await self.held_poll(sid)
        self.assertEqual((await self.poll(sid)).code, 400)
        self.assertEqual(await first, Reply(200, b"1", TEXT))
        self.assertTrue(self.gone(sid))
        self.assertEqual((await self.poll(sid)).code, 400)

    async def test_garbage_post(self) -> None:
        """A POST that is not Engine.IO gets 400 and ends the session."""
        await self.serve()
        for garbage in (b"abc", b"", b"4a\x1e\x1e4b", b"\xff\xfe", b"b!!", b"2", b"6\x1e2"):
            sid, _ = await self.handshake()
            reply = await self.post(sid, garbage)
            self.assertEqual(reply.code, 400, garbage)
            self.assertTrue(self.gone(sid), garbage)
            self.assertEqual((await self.poll(sid)).code, 400)

    async def test_client_close_answers_held_get(self) -> None:
        """A client's ``1`` answers the held GET with ``6``; later requests
        with that sid get 400."""
        await self.serve()
        sid, socket_sid = await self.polling_socket()
        held = await self.held_poll(sid)
        self.assertEqual((await self.post(sid, "1")).body, b"ok")
        self.assertEqual(await held, Reply(200, b"6", TEXT))
        self.assertTrue(self.gone(sid))
        self.assertNotIn(socket_sid, self.server.realtime.ns.sockets)
        self.assertEqual((await self.poll(sid)).code, 400)
        self.assertEqual((await self.post(sid, "40")).code, 400)

    async def test_oversized_post(self) -> None:
        """A POST over max_body is answered 413 without being read, and its
        session is closed; a body at the limit is fine once the socket's
        token is accepted (before that, only a few KiB: tests.test_hostile)."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        sid, _ = await self.handshake()
        reply = await self.raw(
            f"POST /socket.io/?{POLLING}&sid={sid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {SMALL + 1}\r\n\r\n".encode("ascii"))
        self.assertEqual(reply.code, 413)
        self.assertTrue(self.gone(sid))
        self.assertEqual((await self.poll(sid)).code, 400)
        sid, _ = await self.polling_socket(await self.user())
        self.assertEqual((await self.post(sid, "4" + "x" * (SMALL - 1))).body, b"ok")

    async def test_oversized_chunked_post(self) -> None:
        """The same for a body without a length that grows past the limit."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        sid, _ = await self.handshake()
        chunk = b"4" + b"x" * SMALL
        reply = await self.raw(
            f"POST /socket.io/?{POLLING}&sid={sid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n{len(chunk):x}\r\n".encode("ascii")
            + chunk + b"\r\n")
        self.assertEqual(reply.code, 413)
        self.assertTrue(self.gone(sid))

    # -- 3. heartbeat ---------------------------------------------------------

    async def test_polling_heartbeat(self) -> None:
        """After pingInterval the server sends ``2``; a ``3`` keeps the
        session; no answer within pingTimeout closes it (a held GET gets
        ``1``)."""
        await self.serve()
        sid, _ = await self.polling_socket(await self.user())
        held = await self.held_poll(sid)
        self.clock.advance(24.9)
        await sleep(0.05)
        self.assertFalse(held.called)
        self.clock.advance(0.1)
        self.assertEqual((await held).body, b"2")
        self.assertEqual((await self.post(sid, "3")).body, b"ok")
        self.clock.advance(24.9)  # the next ping comes 25 s after the pong
        self.assertFalse(self.gone(sid))
        held = await self.held_poll(sid)
        self.clock.advance(0.1)
        self.assertEqual((await held).body, b"2")
        held = await self.held_poll(sid)
        self.clock.advance(19.9)
        self.assertFalse(self.gone(sid))
        self.clock.advance(0.1)
        self.assertEqual((await held).body, b"1")
        self.assertTrue(self.gone(sid))
        self.assertEqual((await self.poll(sid)).code, 400)

    async def test_websocket_heartbeat(self) -> None:
        """On a WebSocket: ``2`` every pingInterval, a ``3`` keeps the
        session, silence closes the connection."""
        await self.serve(connect_timeout=3600)
        ws, sid, _ = await self.websocket(connect=False)
        self.clock.advance(25)
        self.assertEqual(await ws.recv(), "2")
        ws.send_text("3")
        await self.round_trip(ws)  # frames are read in order: the pong was seen
        self.clock.advance(24.9)
        await self.no_frame(ws)
        self.clock.advance(0.1)
        self.assertEqual(await ws.recv(), "2")
        self.clock.advance(19.9)
        await self.round_trip(ws)
        self.clock.advance(0.1)
        self.assertEqual(await ws.wait_closed(), (1000, "ping timeout"))
        self.assertTrue(self.gone(sid))

    async def test_idle_session_expires(self) -> None:
        """A fresh polling session left alone is gone after
        pingInterval + pingTimeout."""
        await self.serve(connect_timeout=3600)
        sid, _ = await self.handshake()
        self.clock.advance(25)
        self.clock.advance(19.9)
        self.assertFalse(self.gone(sid))
        self.clock.advance(0.1)
        self.assertTrue(self.gone(sid))
        self.assertEqual((await self.poll(sid)).code, 400)

    # -- 4. connect timeout -----------------------------------------------------

    async def test_connect_timeout(self) -> None:
        """No CONNECT within connect_timeout closes the session, on either
        transport."""
        await self.serve(connect_timeout=5)
        sid, _ = await self.handshake()
        held = await self.held_poll(sid)
        ws, ws_sid, _ = await self.websocket(connect=False)
        self.clock.advance(4.9)
        self.assertFalse(self.gone(sid) or self.gone(ws_sid))
        self.clock.advance(0.1)
        self.assertEqual((await held).body, b"1")
        self.assertEqual(await ws.wait_closed(), (4008, "connect timeout"))
        self.assertTrue(self.gone(sid))

    async def test_connect_stops_connect_timeout(self) -> None:
        """A socket connected in time keeps its session past connect_timeout."""
        await self.serve(connect_timeout=5)
        ws, _, _ = await self.websocket()
        self.clock.advance(6)
        await self.assert_alive(ws)

    async def test_refused_connect_keeps_connect_timeout(self) -> None:
        """A refused CONNECT (bad token, unknown namespace) connects nothing:
        the connect timeout still closes the session."""
        await self.serve(connect_timeout=5)
        ws, _, _ = await self.websocket(connect=False)
        ws.send_text('40{"token":"not-a-token"}')
        self.assertEqual((await ws.recv())[:3], "44{")
        await self.round_trip(ws)
        self.clock.advance(5)
        self.assertEqual(await ws.wait_closed(), (4008, "connect timeout"))

    async def test_pending_connect_keeps_connect_timeout(self) -> None:
        """A CONNECT still undecided when connect_timeout passes does not hold
        the session open."""
        await self.serve(connect_timeout=5)
        decision: Deferred[None] = Deferred()
        self.server.realtime.sockets.namespace("/slow", connect=lambda socket, auth: decision)
        ws, _, _ = await self.websocket(connect=False)
        ws.send_text("40/slow,")
        await self.round_trip(ws)
        self.clock.advance(5)
        self.assertEqual(await ws.wait_closed(), (4008, "connect timeout"))
        decision.callback(None)  # too late: nothing is sent, nothing breaks

    # -- 5. upgrade -----------------------------------------------------------

    async def test_upgrade(self) -> None:
        """Polling to WebSocket: ``2probe``/``3probe``, the held GET gets ``6``,
        what is emitted meanwhile arrives over the WebSocket after ``5``,
        in order; then polling is refused and another WebSocket for that
        sid is closed, and the heartbeat goes over the WebSocket."""
        await self.serve()
        sid, socket_sid = await self.polling_socket(await self.user())
        held = await self.held_poll(sid)
        ws = await self.connect_ws(sid=sid)
        self.server.realtime.ns.emit("before", 0)  # the held poll takes this
        self.assertEqual((await held).body, b'42["before",0]')
        held = await self.held_poll(sid)
        ws.send_text("2probe")
        self.assertEqual(await ws.recv(), "3probe")
        self.assertEqual(await held, Reply(200, b"6", TEXT))
        self.server.realtime.ns.emit("during", 1)
        self.server.realtime.ns.emit("binary", b"\x00\xff")
        self.assertEqual((await self.post(sid, '427["no_such_event"]')).body, b"ok")
        # A poll now only hears that the transport is changing.
        self.assertEqual((await self.poll(sid)).body, b"6")
        await self.no_frame(ws)
        ws.send_text("5")
        self.assertEqual(await ws.recv(), '42["during",1]')
        self.assertEqual(await ws.recv(),
                         '451-["binary",{"_placeholder":true,"num":0}]')
        self.assertEqual(await ws.recv(), b"\x00\xff")
        self.assertEqual(await ws.recv(), f"437[{UNKNOWN_EVENT}]")
        self.assertEqual(self.server.engine.sessions[sid].transport, "websocket")
        self.assertIn(socket_sid, self.server.realtime.ns.sockets)
        await self.assert_alive(ws)
        self.assertEqual((await self.poll(sid)).code, 400)
        self.assertEqual((await self.post(sid, '42["x"]')).code, 400)
        refused = await self.connect_ws(sid=sid)
        self.assertEqual(await refused.wait_closed(), (4003, "upgrade refused"))
        self.clock.advance(25)
        self.assertEqual(await ws.recv(), "2")
        ws.send_text("3")
        await self.assert_alive(ws)

    async def test_bad_probe_closes_only_the_probe(self) -> None:
        """Anything but ``2probe`` then ``5`` on the probe socket closes the
        probe; the session stays on polling and loses nothing."""
        await self.serve()
        sid, _ = await self.polling_socket()
        for frames in (["5"], ["4hello"], ["3"], ["6"], ["bAQID"], ["2probe", '42["x"]'],
                       ["2probe", "3"], ["2probe", "6"]):
            ws = await self.connect_ws(sid=sid)
            for frame in frames:
                ws.send_text(frame)
            self.assertEqual(await ws.wait_closed(), (4003, "protocol error"), frames)
            if frames[0] == "2probe":
                self.assertEqual(await ws.recv(), "3probe")
            session = self.server.engine.sessions[sid]
            await until(lambda: session._probe is None, "the probe's end")
            self.server.realtime.ns.emit("still", "polling")
            self.assertEqual((await self.poll(sid)).body, b'42["still","polling"]')

    async def test_upgrade_timeout(self) -> None:
        """Without ``5`` within 10 s the probe is closed and the session goes
        on over polling."""
        await self.serve()
        sid, _ = await self.polling_socket(await self.user())
        ws = await self.connect_ws(sid=sid)
        ws.send_text("2probe")
        self.assertEqual(await ws.recv(), "3probe")
        self.server.realtime.ns.emit("meanwhile", 1)
        self.clock.advance(9.9)
        await self.no_frame(ws, 0.05)
        self.clock.advance(0.1)
        self.assertEqual(await ws.wait_closed(), (4008, "upgrade timeout"))
        self.assertEqual(self.server.engine.sessions[sid].transport, "polling")
        self.assertEqual((await self.poll(sid)).body, b'42["meanwhile",1]')
        self.assertEqual((await self.post(sid, '421["no_such_event"]')).body, b"ok")
        self.assertEqual((await self.poll(sid)).body, f"431[{UNKNOWN_EVENT}]".encode())

    async def test_session_end_closes_probe(self) -> None:
        """A session that ends during the probe closes the probe too."""
        await self.serve()
        sid, _ = await self.polling_socket()
        ws = await self.connect_ws(sid=sid)
        ws.send_text("2probe")
        self.assertEqual(await ws.recv(), "3probe")
        self.assertEqual((await self.post(sid, "1")).body, b"ok")
        self.assertEqual(await ws.wait_closed(), (1000, "client close"))
        self.assertTrue(self.gone(sid))

    # -- 6. Socket.IO -----------------------------------------------------------

    async def test_connect(self) -> None:
        """``40`` is answered ``40{"sid":...}``, with a sid of its own."""
        await self.serve()
        ws, sid, socket_sid = await self.websocket()
        self.assertNotEqual(socket_sid, sid)
        self.assertIn(socket_sid, self.server.realtime.ns.sockets)
        await self.no_frame(ws)

    async def test_invalid_namespace(self) -> None:
        """A CONNECT to an unknown namespace (with or without the comma) gets
        a CONNECT_ERROR object; the session stays."""
        await self.serve()
        ws, _, _ = await self.websocket(connect=False)
        ws.send_text("40/nope,")
        self.assertEqual(await ws.recv(), NO_NAMESPACE)
        ws.send_text('40/nope,{"token":"x"}')
        self.assertEqual(await ws.recv(), NO_NAMESPACE)
        ws.send_text("40/nope")
        self.assertEqual(await ws.recv(), NO_NAMESPACE)
        ws.send_text("40")
        self.assertEqual((await ws.recv())[:3], "40{")

    async def test_token_in_connect(self) -> None:
        """A bad token in the CONNECT payload gets CONNECT_ERROR with a
        message and the machine-readable code; then a good one connects."""
        await self.serve()
        ws, _, _ = await self.websocket(connect=False)
        ws.send_text('40{"token":"not-a-token"}')
        refused = await ws.recv()
        self.assertEqual(refused[:2], "44")
        error = json.loads(refused[2:])
        self.assertEqual(set(error), {"message", "data"})
        self.assertIsInstance(error["message"], str)
        self.assertEqual(error["data"], {"code": "INVALID_TOKEN"})
        alice = await self.user()
        ws.send_text("40" + compact({"token": alice.token}))
        self.assertEqual((await ws.recv())[:3], "40{")
        self.assertEqual(await ws.recv(),
                         '42["authenticated",{"userId":"alice","cyphrId":"alice"}]')

    async def test_malformed_packets_close_only_their_session(self) -> None:
        """Each malformed packet closes its own session (4003); a session
        beside it goes on."""
        await self.serve()
        bystander, _, _ = await self.websocket()
        for frame in ['42abc["x"]', "42{}", '42["connect"]', '42["disconnect",1]',
                      '42["x"', "42[]", '42"x"', "42", "4", "47", '44{"message":"x"}',
                      "41[1]", "40[]", '43"x"', '42["x"] 1', b"\x01\x02", "9", "x", "",
                      '451-["x",{"_placeholder":true,"num":1}]',
                      ('451-["x",{"_placeholder":true,"num":0}]', '42["y"]')]:
            ws, sid, _ = await self.websocket()
            for part in frame if isinstance(frame, tuple) else (frame,):
                if isinstance(part, bytes):
                    ws.send_binary(part)
                else:
                    ws.send_text(part)
            self.assertEqual(await ws.wait_closed(), (4003, "protocol error"), frame)
            self.assertTrue(self.gone(sid))
            await self.assert_alive(bystander)

    async def test_malformed_packet_over_polling(self) -> None:
        """The same over polling: the session ends, its held GET gets ``1``."""
        await self.serve()
        sid, _ = await self.polling_socket()
        other, _ = await self.polling_socket()
        held = await self.held_poll(sid)
        await self.post(sid, '42abc["x"]')
        self.assertEqual((await held).body, b"1")
        self.assertTrue(self.gone(sid))
        self.assertEqual((await self.post(other, '427["no_such_event"]')).body, b"ok")
        reply = await self.poll(other)
        self.assertEqual(reply.body, f"437[{UNKNOWN_EVENT}]".encode())

    async def test_event_ack(self) -> None:
        """An event with an ack id gets an ACK with that id; one without gets
        nothing."""
        await self.serve()
        ws, _, _ = await self.websocket()
        ws.send_text('4212["authenticate",{}]')
        ack = await ws.recv()
        self.assertEqual(ack[:5], "4312[")
        [body] = json.loads(ack[4:])
        self.assertEqual((body["success"], body["code"]), (False, "UNAUTHORIZED"))
        ws.send_text('420["no_such_event",1,2]')
        self.assertEqual(await ws.recv(), f"430[{UNKNOWN_EVENT}]")
        ws.send_text('42["no_such_event"]')
        await self.nothing_more(ws)

    async def test_leave_namespace(self) -> None:
        """``41`` leaves the namespace; the Engine.IO session stays, its next
        frame is a ping, and the client may connect again."""
        await self.serve()
        ws, sid, socket_sid = await self.websocket()
        ws.send_text("41")
        await self.round_trip(ws)
        self.assertNotIn(socket_sid, self.server.realtime.ns.sockets)
        self.clock.advance(25)
        self.assertEqual(await ws.recv(), "2")
        self.assertFalse(self.gone(sid))
        ws.send_text("3")
        ws.send_text("40")
        self.assertEqual((await ws.recv())[:3], "40{")

    async def test_binary_attachments(self) -> None:
        """A binary event's attachments are put back in their places; a
        binary ack goes out as a header and raw frames (WebSocket) or
        base64 records (polling)."""
        await self.serve()
        self.server.realtime.ns.on("echo", lambda socket, *args: tuple(args))
        ws, _, _ = await self.websocket()
        ws.send_text('452-7["echo",{"a":{"_placeholder":true,"num":1}},'
                     '{"_placeholder":true,"num":0}]')
        ws.send_binary(b"first")
        await self.no_frame(ws, 0.05)
        ws.send_binary(b"\x00second")
        self.assertEqual(await ws.recv(), '462-7[{"a":{"_placeholder":true,"num":0}},'
                                          '{"_placeholder":true,"num":1}]')
        self.assertEqual(await ws.recv(), b"\x00second")
        self.assertEqual(await ws.recv(), b"first")
        # An unknown event with attachments gets the error ack.
        ws.send_text('451-8["no_such_event",{"_placeholder":true,"num":0}]')
        ws.send_binary(b"x")
        self.assertEqual(await ws.recv(), f"438[{UNKNOWN_EVENT}]")
        sid, _ = await self.polling_socket()
        reply = await self.post(
            sid, '451-3["echo",{"_placeholder":true,"num":0}]\x1ebAQID')
        self.assertEqual(reply.body, b"ok")
        self.assertEqual((await self.poll(sid)).body,
                         b'461-3[{"_placeholder":true,"num":0}]\x1ebAQID')

    async def test_too_many_attachments(self) -> None:
        """Ten attachments are fine; more close the session."""
        await self.serve()
        self.server.realtime.ns.on("count", lambda socket, *args: len(args))
        ws, _, _ = await self.websocket()

        def header(ack_id: int, count: int) -> str:
            places = ",".join(compact({"_placeholder": True, "num": n})
                              for n in range(count))
            return f'45{count}-{ack_id}["count",{places}]'

        ws.send_text(header(1, 10))
        for n in range(10):
            ws.send_binary(bytes([n]))
        self.assertEqual(await ws.recv(), "431[10]")
        ws.send_text(header(2, 11))
        self.assertEqual(await ws.wait_closed(), (4003, "protocol error"))

    async def test_event_rate_limit(self) -> None:
        """Past the per-connection event rate, events are answered
        RATE_LIMITED; the allowance comes back with time."""
        await self.serve(realtime_event_rate=(3, 3))
        ws, _, _ = await self.websocket()
        for n in range(5):
            ws.send_text(f'42{n}["no_such_event"]')
        acks = [await ws.recv() for _ in range(5)]
        self.assertEqual(acks, [f"43{n}[{UNKNOWN_EVENT}]" for n in range(3)]
                         + [f"433[{RATE_LIMITED}]", f"434[{RATE_LIMITED}]"])
        self.clock.advance(1)
        await self.assert_alive(ws)
        ws.send_text('42["no_such_event"]')  # no ack asked for: none given
        await self.nothing_more(ws)

    # -- 7. server-initiated acks -------------------------------------------------

    async def test_emit_with_ack(self) -> None:
        """emit_with_ack fires with the client's ack arguments, text or
        binary; ack ids count up per socket."""
        await self.serve()
        ws, _, socket_sid = await self.websocket()
        socket = self.server.realtime.ns.sockets[socket_sid]
        d = socket.emit_with_ack("question", {"n": 1})
        self.assertEqual(await ws.recv(), '420["question",{"n":1}]')
        self.assertFalse(d.called)
        ws.send_text('430["answer",2]')
        self.assertEqual(await d.addTimeout(5, reactor), ["answer", 2])
        d = socket.emit_with_ack("again")
        self.assertEqual(await ws.recv(), '421["again"]')
        ws.send_text('461-1[{"_placeholder":true,"num":0}]')
        ws.send_binary(b"\x07")
        self.assertEqual(await d.addTimeout(5, reactor), [b"\x07"])

    async def test_emit_with_ack_timeout(self) -> None:
        """Without an ack in time emit_with_ack fails with AckTimeout; a late
        ack is ignored."""
        await self.serve()
        ws, _, socket_sid = await self.websocket()
        socket = self.server.realtime.ns.sockets[socket_sid]
        d = socket.emit_with_ack("question", timeout=5)
        self.assertEqual(await ws.recv(), '420["question"]')
        self.clock.advance(4.9)
        self.assertFalse(d.called)
        self.clock.advance(0.1)
        with self.assertRaises(AckTimeout):
            await d
        ws.send_text("430[1]")
        await self.assert_alive(ws)

    async def test_emit_with_ack_disconnected(self) -> None:
        """emit_with_ack fails with Disconnected when the client goes away,
        and at once on a socket that is gone."""
        await self.serve()
        ws, _, socket_sid = await self.websocket()
        socket = self.server.realtime.ns.sockets[socket_sid]
        d = socket.emit_with_ack("question")
        self.assertEqual(await ws.recv(), '420["question"]')
        ws.sendClose(1000)
        await ws.wait_closed()
        with self.assertRaises(Disconnected):
            await d.addTimeout(5, reactor)
        with self.assertRaises(Disconnected):
            await socket.emit_with_ack("late")

    # -- 7b. WebSocket framing -------------------------------------------------------
    # The server reads a whole message in one masked frame itself and leaves
    # everything else to Autobahn from that frame on (cyphr.realtime.frames):
    # these write frames as raw bytes, so that several arrive in one read, one
    # is split across reads, and control frames and fragments come between.

    async def test_frames_in_one_read_split_across_reads_and_between_others(self) -> None:
        """Messages that arrive together, one cut across two reads, one
        behind a ping, one in fragments and one with a 16-bit length are
        each read once, in order, and the ping is answered."""
        await self.serve()
        ws, _, _ = await self.websocket()
        pongs: list[bytes] = []
        ws.onPong = pongs.append  # type: ignore[method-assign]
        third = client_frame(unknown_event(3))
        ws.transport.write(client_frame(unknown_event(1)) + client_frame(unknown_event(2))
                           + third[:5])
        self.assertEqual([await ws.recv(), await ws.recv()],
                         [f"431[{UNKNOWN_EVENT}]", f"432[{UNKNOWN_EVENT}]"])
        await self.no_frame(ws)  # the third is not whole: nothing is read of it yet
        fragmented = unknown_event(5)
        ws.transport.write(
            third[5:] + client_frame(unknown_event(4)) + client_frame(b"ping!", opcode=9)
            + client_frame(fragmented[:6], fin=False) + client_frame(fragmented[6:], opcode=0)
            + client_frame(unknown_event(6, "x" * 300)) + client_frame(unknown_event(7)))
        for ack_id in range(3, 8):
            self.assertEqual(await ws.recv(), f"43{ack_id}[{UNKNOWN_EVENT}]")
        self.assertEqual(pongs, [b"ping!"])

    async def test_no_compression_is_negotiated(self) -> None:
        """A client that offers permessage-deflate is given no extension:
        frames go uncompressed both ways, as the server frames them itself."""
        await self.serve()
        factory = _RecordingFactory(f"ws://127.0.0.1:{self.port}/socket.io/?{WEBSOCKET}")
        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=PerMessageDeflateResponseAccept)
        ws: WireSocket = await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        self.websockets.append(ws)
        await ws.opened.addTimeout(5, reactor)
        self.assertEqual(ws.websocket_extensions_in_use, [])
        await self._open(ws, connect=True)
        await self.assert_alive(ws)

    async def test_a_bad_frame_behind_good_ones_in_one_read(self) -> None:
        """A frame that breaks RFC 6455 (unmasked, reserved bits, a reserved
        opcode, a 16-bit length that fits in 7) or is over the session's
        limit closes the connection (1002, 1009), after the messages that
        came before it in the same read are answered."""
        await self.serve()
        bad = {
            "unmasked": (client_frame(unknown_event(2), masked=False), 1002),
            "reserved bits": (client_frame(unknown_event(2), rsv=4), 1002),
            "reserved opcode": (client_frame(unknown_event(2), opcode=3), 1002),
            "longer length": (client_frame(unknown_event(2), wide=True), 1002),
            "over the limit": (client_frame(unknown_event(2, "x" * 5000)), 1009),
        }
        for what, (frame, code) in bad.items():
            ws, sid, _ = await self.websocket()
            ws.transport.write(client_frame(unknown_event(1)) + frame)
            self.assertEqual(await ws.recv(), f"431[{UNKNOWN_EVENT}]", what)
            self.assertEqual((await ws.wait_closed())[0], code, what)
            await until(lambda: self.gone(sid), "the session to end")

    # -- 8. limits ------------------------------------------------------------------

    async def test_invalid_utf8_closes_only_that_session(self) -> None:
        """A text frame that is not UTF-8 breaks the protocol: its session
        is closed (4003); other sessions go on."""
        await self.serve()
        bystander, _, _ = await self.websocket()
        ws, sid, _ = await self.websocket()
        ws.sendMessage(b'42["x","\xff\xfe"]', isBinary=False)
        code, _ = await ws.wait_closed()
        self.assertEqual(code, 4003)
        await until(lambda: self.gone(sid), "the session to end")
        await self.assert_alive(bystander)

    async def test_websocket_frame_over_max_body(self) -> None:
        """A frame over max_body closes its session; a frame at the
        limit is read (from a signed-in socket: before that, only a few KiB);
        other sessions go on."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        bystander, _, _ = await self.websocket()
        ws, sid, _ = await self.signed_in_ws()
        head = '42["no_such_event","'
        ws.send_text(head + "x" * (SMALL - len(head) - 2) + '"]')
        await self.assert_alive(ws)
        ws.send_text(head + "x" * (SMALL - len(head) - 1) + '"]')
        # The server says why: 1009, the message is too big.
        code, _ = await ws.wait_closed()
        self.assertEqual(code, 1009)
        await until(lambda: self.gone(sid), "the session to end")
        await self.assert_alive(bystander)

    async def test_polling_slow_consumer(self) -> None:
        """A polling client that does not poll while more than
        realtime_buffer waits for it is closed; one that polls is not."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        slow, _ = await self.polling_socket()
        quick, _ = await self.polling_socket()
        chunk = "x" * 8192
        for n in range(16):
            self.server.realtime.ns.emit("bulk", n, chunk)
            if n % 4 == 3:
                self.assertEqual(len((await self.poll(quick)).body.split(b"\x1e")), 4)
        self.assertTrue(self.gone(slow))
        self.assertFalse(self.gone(quick))
        self.assertEqual((await self.poll(slow)).code, 400)

    async def test_websocket_slow_consumer(self) -> None:
        """A WebSocket client that stops reading is closed as a slow consumer
        once the TCP buffers are full and realtime_buffer is passed; one
        that reads is not."""
        await self.serve(max_body=SMALL, realtime_buffer=SMALL)
        reader, reader_sid, _ = await self.websocket()
        # A client socket with a small receive buffer, so that the server's
        # writes back up soon; Autobahn speaks over it.
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", self.port))
        raw.setblocking(False)
        factory = _RecordingFactory(f"ws://127.0.0.1:{self.port}/socket.io/?{WEBSOCKET}")
        reactor.adoptStreamConnection(raw.fileno(), socket.AF_INET, factory)
        raw.close()
        [ws] = factory.built
        self.websockets.append(ws)
        await ws.opened.addTimeout(5, reactor)
        sid, _ = await self._open(ws, connect=True)
        ws.transport.pauseProducing()  # stop reading
        chunk = "x" * 16384
        sent = 0
        while not self.gone(sid):
            self.assertLess(sent, 64 * 1024 * 1024, "the stalled client stays")
            self.server.realtime.ns.emit("bulk", chunk)
            sent += len(chunk)
            await sleep(0)  # the reactor writes what it can
            del reader.frames.pending[:]
        self.assertGreater(sent, 2 * SMALL)
        self.assertFalse(self.gone(reader_sid))
        ws.transport.resumeProducing()
        self.assertEqual(await ws.wait_closed(10), (4002, "slow consumer"))
        reader.send_text('421["no_such_event"]')
        while (frame := await reader.recv()).startswith('42["bulk"'):
            pass  # the reader got (and gets) everything
        self.assertEqual(frame, f"431[{UNKNOWN_EVENT}]")

    # -- 9. shutdown -------------------------------------------------------------

    async def test_shutdown(self) -> None:
        """Stopping the service closes every WebSocket (an upgrade probe
        too) with 4001 "server shutting down" and answers a held GET
        with ``1``."""
        await self.serve()
        connected, _, _ = await self.websocket()
        fresh, _, _ = await self.websocket(connect=False)
        sid, _ = await self.polling_socket()
        held = await self.held_poll(sid)
        probed, _ = await self.polling_socket()
        probe = await self.connect_ws(sid=probed)
        probe.send_text("2probe")
        self.assertEqual(await probe.recv(), "3probe")
        await self.server.service.stopService()
        self.assertEqual(await held, Reply(200, b"1", TEXT))
        for ws in (connected, fresh, probe):
            self.assertEqual(await ws.wait_closed(), (4001, "server shutting down"))
        self.assertEqual(self.server.engine.sessions, {})

    # -- 10. conformance: what the specifications and the reference do ---------

    async def test_second_websocket_closed_after_handshake(self) -> None:
        """A WebSocket for a session that is probing, or that has upgraded,
        completes its handshake (101) and is then closed (4003 "upgrade
        refused"); the probe, then the session's WebSocket, go on."""
        await self.serve()
        sid, _ = await self.polling_socket()
        probe = await self.connect_ws(sid=sid)
        probe.send_text("2probe")
        self.assertEqual(await probe.recv(), "3probe")
        during = await self.connect_ws(sid=sid)
        self.assertEqual(await during.wait_closed(), (4003, "upgrade refused"))
        probe.send_text("5")
        await until(lambda: self.server.engine.sessions[sid].transport == "websocket",
                    "the upgrade")
        await self.assert_alive(probe)
        after = await self.connect_ws(sid=sid)
        self.assertEqual(await after.wait_closed(), (4003, "upgrade refused"))
        self.assertEqual(list(after.frames.pending), [])
        await self.assert_alive(probe, ack_id=100)

    async def test_packet_for_namespace_not_joined_closes(self) -> None:
        """An event, ack or DISCONNECT before any CONNECT, for a namespace
        the client has not joined, or for one whose CONNECT is undecided,
        closes the connection (4003), on a WebSocket and over polling (the
        next GET gets ``1``); a session beside it goes on."""
        await self.serve()
        self.server.realtime.sockets.namespace("/other")
        self.server.realtime.sockets.namespace("/slow", connect=lambda socket, auth: Deferred())
        bystander, _, _ = await self.websocket()
        cases = [
            (False, ['42["no_such_event"]']),
            (False, ['421["no_such_event"]']),
            (False, ["430[]"]),
            (False, ["41"]),
            (False, ['451-["x",{"_placeholder":true,"num":0}]', b"\x01"]),
            (True, ['42/other,["no_such_event"]']),
            (True, ['42/nope,1["no_such_event"]']),
            (True, ["43/other,0[]"]),
            (True, ["41/other,"]),
            (False, ["40/slow,", '42/slow,["no_such_event"]']),
        ]
        for connect, frames in cases:
            ws, sid, _ = await self.websocket(connect=connect)
            for frame in frames:
                if isinstance(frame, bytes):
                    ws.send_binary(frame)
                else:
                    ws.send_text(frame)
            self.assertEqual(await ws.wait_closed(), (4003, "protocol error"), frames)
            self.assertTrue(self.gone(sid))
            await self.assert_alive(bystander)
        sid, _ = await self.handshake()
        self.assertEqual((await self.post(sid, '42["no_such_event"]')).body, b"ok")
        self.assertEqual(await self.poll(sid), Reply(200, b"1", TEXT))
        self.assertTrue(self.gone(sid))

    async def test_base64_text_frame_is_binary(self) -> None:
        """A WebSocket text frame ``b<base64>`` (engine.io-client's
        forceBase64) is a binary message: here an attachment, put in its
        place; bad base64 in one closes the session (4003)."""
        await self.serve()
        self.server.realtime.ns.on("echo", lambda socket, *args: tuple(args))
        ws, sid, _ = await self.websocket()
        ws.send_text('451-7["echo",{"_placeholder":true,"num":0}]')
        ws.send_text("bAQID")
        self.assertEqual(await ws.recv(), '461-7[{"_placeholder":true,"num":0}]')
        self.assertEqual(await ws.recv(), b"\x01\x02\x03")
        ws.send_text('451-8["echo",{"_placeholder":true,"num":0}]')
        ws.send_text("b")  # no data at all: an empty attachment
        self.assertEqual(await ws.recv(), '461-8[{"_placeholder":true,"num":0}]')
        self.assertEqual(await ws.recv(), b"")
        ws.send_text('451-9["echo",{"_placeholder":true,"num":0}]')
        ws.send_text("bAQI!")
        self.assertEqual(await ws.wait_closed(), (4003, "protocol error"))
        self.assertTrue(self.gone(sid))

    async def test_client_noop_open_upgrade_ignored(self) -> None:
        """A client's ``6`` (noop), ``0`` or ``5`` on an established
        transport is ignored: over polling the POST gets ``ok``; the session
        goes on, on either transport. (A client ``2`` still breaks the
        protocol: see test_garbage_post.)"""
        await self.serve()
        ws, sid, _ = await self.websocket()
        for frame in ("6", "0", "5", "6x", "0{}"):
            ws.send_text(frame)
        await self.assert_alive(ws)
        self.assertFalse(self.gone(sid))
        sid, _ = await self.polling_socket()
        for body in ("6", "0", "5", '6\x1e5\x1e0\x1e427["no_such_event"]'):
            self.assertEqual(await self.post(sid, body), Reply(200, b"ok", "text/html"), body)
        self.assertEqual((await self.poll(sid)).body, f"437[{UNKNOWN_EVENT}]".encode())

    async def test_second_probe_answered(self) -> None:
        """A second ``2probe`` on the probe socket is answered ``3probe``
        again; ``5`` then completes the upgrade."""
        await self.serve()
        sid, _ = await self.polling_socket()
        probe = await self.connect_ws(sid=sid)
        for _ in range(3):
            probe.send_text("2probe")
            self.assertEqual(await probe.recv(), "3probe")
        probe.send_text("5")
        await self.assert_alive(probe)
        self.assertEqual(self.server.engine.sessions[sid].transport, "websocket")

    async def test_server_close_waits_for_the_next_poll(self) -> None:
        """A polling session the server closes while no GET is pending keeps
        its close packet: the next GET gets ``1`` (with what was queued
        before it, when the close flushes), only then is the session
        forgotten and the next request 400. A client that does not poll
        again is forgotten after pingTimeout."""
        await self.serve(connect_timeout=5)
        quiet, _ = await self.handshake()
        sid, _ = await self.handshake()
        self.clock.advance(5)  # the connect timeout closes both
        self.assertFalse(self.gone(sid))
        self.assertEqual(await self.poll(sid), Reply(200, b"1", TEXT))
        self.assertTrue(self.gone(sid))
        self.assertEqual((await self.poll(sid)).code, 400)
        self.assertEqual((await self.post(quiet, "40")).code, 400)
        self.clock.advance(19.9)
        self.assertFalse(self.gone(quiet))
        self.clock.advance(0.1)
        self.assertTrue(self.gone(quiet))
        self.assertEqual((await self.poll(quiet)).code, 400)
        sid, socket_sid = await self.polling_socket()
        socket = self.server.realtime.ns.sockets[socket_sid]
        socket.emit("bye", 1)
        socket.session.close("server close")
        self.assertEqual((await self.poll(sid)).body, b'42["bye",1]\x1e1')
        self.assertTrue(self.gone(sid))
