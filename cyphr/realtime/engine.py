"""
Engine.IO v4 on Twisted: sessions, the HTTP long-polling transport, the
WebSocket transport (Autobahn), the upgrade from one to the other, and the
heartbeat. What runs over a session (Socket.IO) is someone else's business:
the server hands every session to ``on_session`` and passes it the
messages.

Rules (see socketio-protocol.md): a bad handshake, an unknown sid, an
unknown transport and a protocol violation get HTTP 400 with the reference
server's ``{"code", "message"}`` body; a POST is answered ``ok``; a session
whose client breaks the protocol is closed, and only that session. A
handshake over its address's caps (``handshake_rate``, ``max_pending``
sessions that have not joined) gets HTTP 429 with code 4, the reference's
"Forbidden", and a message saying which.

Outgoing packets wait in the session's queue while the transport cannot
take them (no poll pending, a WebSocket whose TCP buffer is full, an upgrade
in progress). A queue that passes ``buffer_limit`` bytes closes the session
("slow consumer"): the client reconnects and catches up, the process does
not grow without bound. What waits in the transport's own write buffer
(written, not yet taken by the kernel) counts toward that limit too.

Incoming messages are held to the session's ``frame_limit``, which the
handler sets (Socket.IO: a few KiB until the application trusts the
client, then what is left of the event limit). A larger WebSocket message
is refused from its frame header, before it is read (close code 1009); a
larger polling body is refused before it is decoded (413). Either closes
the session. Refusals are counted by reason (``refusals``) and logged as a
periodic summary, never one line per client mistake.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from typing import Any, Callable, Protocol
from urllib.parse import parse_qs

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import resource, server

from cyphr._compat import (
    plain_tcp_socket,
    request_gone,
    slim_websocket,
    transport_idle,
    websocket_between_messages,
    websocket_data_received,
)
from cyphr.connections import address_key
from cyphr.errors import RateLimited
from cyphr.handlers.ratelimit import RateLimit
from cyphr.realtime import frames
from cyphr.realtime.codec import (
    CLOSE,
    MESSAGE,
    NOOP,
    OPEN,
    PING,
    PONG,
    UPGRADE,
    EnginePacket,
    ProtocolError,
    decode_frame,
    decode_payload,
    encode_frame,
    encode_payload,
)

_log = Logger()

# The reference server's error codes.
TRANSPORT_UNKNOWN = 0
SESSION_UNKNOWN = 1
BAD_HANDSHAKE_METHOD = 2
BAD_REQUEST = 3
FORBIDDEN = 4  # the reference's answer to a handshake its allowRequest refuses
UNSUPPORTED_PROTOCOL = 5
_ERROR_MESSAGES = {
    TRANSPORT_UNKNOWN: "Transport unknown",
    SESSION_UNKNOWN: "Session ID unknown",
    BAD_HANDSHAKE_METHOD: "Bad handshake method",
    BAD_REQUEST: "Bad request",
    FORBIDDEN: "Forbidden",
    UNSUPPORTED_PROTOCOL: "Unsupported protocol version",
}

# WebSocket close codes (Autobahn lets a server send 1000 or 3000-4999).
CLOSE_NORMAL = 1000
CLOSE_SHUTDOWN = 4001
CLOSE_SLOW_CONSUMER = 4002
CLOSE_PROTOCOL_ERROR = 4003
CLOSE_POLICY = 4008

PING_PACKET = EnginePacket(PING)
NOOP_PACKET = EnginePacket(NOOP)
CLOSE_PACKET = EnginePacket(CLOSE)

POLLING = "polling"
WEBSOCKET = "websocket"
CLOSE_TOO_BIG = 1009  # WebSocket "message too big", sent as Autobahn does for its own limit
# Room for a polling body's framing around messages of frame_limit bytes:
# base64 grows binary data by a third, and each record has a type and a
# separator.
_BODY_SLACK = 1024


class FrameTooLarge(ProtocolError):
    """A message over its session's frame_limit."""


class Refusals:
    """What clients had refused, by reason (a fixed word: label values for
    metrics), and at most one summary line in the log per ``period``: a
    client that makes mistakes on purpose must not fill the log."""

    def __init__(self, clock: Any, what: str, period: float = 60.0) -> None:
        self.totals: Counter[str] = Counter()
        self._clock = clock
        self._what = what
        self._period = period
        self._window: Counter[str] = Counter()
        self._logged_at: float | None = None

    def count(self, reason: str) -> None:
        self.totals[reason] += 1
        self._window[reason] += 1
        now = self._clock.seconds()
        if self._logged_at is None or now - self._logged_at >= self._period:
            window, self._window = self._window, Counter()
            self._logged_at = now
            _log.info("Refused {count} {what} from clients since the last summary: {reasons}",
                      count=sum(window.values()), what=self._what,
                      reasons=", ".join(f"{n} {r}" for r, n in sorted(window.items())))


class SessionHandler(Protocol):
    """What runs over a session: Socket.IO, or anything else."""

    def message(self, data: str | bytes) -> None: ...
    def closed(self, reason: str) -> None: ...


class Session:
    """One Engine.IO session, on polling or on a WebSocket."""

    __slots__ = (
        "sid", "server", "handler", "transport", "closed", "_queue", "_queued_bytes", "_poll",
        "_ws", "_probe", "_paused", "_ping_call", "_pong_deadline", "_upgrade_call", "_linger",
        "client_ip", "frame_limit", "__weakref__",
    )

    def __init__(self, server: EngineServer, sid: str, transport: str, client_ip: str) -> None:
        self.sid = sid
        self.server = server
        self.handler: SessionHandler | None = None
        self.transport = transport
        self.client_ip = client_ip
        self.closed = False
        self._queue: list[EnginePacket] = []
        self._queued_bytes = 0
        self._poll: Any = None          # the pending polling GET
        self._ws: EngineWebSocket | None = None
        self._probe: EngineWebSocket | None = None  # the upgrade candidate
        self._paused = False            # the WebSocket's TCP buffer is full
        self._ping_call: Any = None
        self._pong_deadline: Any = None
        self._upgrade_call: Any = None
        self._linger: Any = None
        # The largest message the handler takes next (it lowers and raises it).
        self.frame_limit = server.max_payload

    # -- sending --------------------------------------------------------

    def send_many(self, messages: list[str | bytes]) -> None:
        """Send Engine.IO messages (text or binary), in order."""
        for data in messages:
            ws = self._writable()
            if ws is None:
                self._send_packet(EnginePacket(MESSAGE, data))
                continue
            # The common case, without a packet object.
            ws.send_message(data)
            self._check_buffer(ws)

    def _writable(self) -> EngineWebSocket | None:
        """The WebSocket a packet is written to now, or None when it must
        wait in the queue (polling, the upgrade's pause, packets already
        waiting) or the session is closed."""
        ws = self._ws
        if ws is None or self._paused or self._queue or self.closed:
            return None
        return ws

    def _check_buffer(self, ws: EngineWebSocket) -> None:
        if ws.unsent > self.server.buffer_limit:
            self._slow_consumer()

    def _send_packet(self, packet: EnginePacket) -> None:
        if self.closed:
            return
        ws = self._writable()
        if ws is not None:
            ws.send_packet(packet)
            self._check_buffer(ws)
            return
        self._queue.append(packet)
        self._queued_bytes += len(packet.data) + 1
        if self.buffered_bytes > self.server.buffer_limit:
            self._slow_consumer()
            return
        if self._poll is not None:
            self._answer_poll()

    def _slow_consumer(self) -> None:
        _log.debug("Session {sid} closed: its client does not keep up", sid=self.sid)
        self.server.refusals.count("slow_consumer")
        self.close("slow consumer", code=CLOSE_SLOW_CONSUMER, flush=False, abort=True)

    @property
    def buffered_bytes(self) -> int:
        """What waits for the client: in our queue, and in the WebSocket
        transport's write buffer."""
        ws = self._ws
        return self._queued_bytes + (ws.unsent if ws is not None else 0)

    def _take_queue(self) -> list[EnginePacket]:
        queue, self._queue, self._queued_bytes = self._queue, [], 0
        return queue

    # -- polling --------------------------------------------------------

    def poll(self, request: Any) -> Any:
        """A polling GET: answer now if something waits, else hold it."""
        if self._poll is not None:
            # Two polls at once: the protocol is broken. Close the session,
            # telling the older poll.
            self._respond(self._poll, encode_payload([CLOSE_PACKET]))
            self._poll = None
            self.close("protocol error: concurrent polls", flush=False, abort=True)
            return self.server.error(request, BAD_REQUEST)
        if self._probe is not None and self._probe.probed:
            return encode_payload([NOOP_PACKET])  # the client is switching to the WebSocket
        if self._queue:
            body = encode_payload(self._take_queue())
            if self.closed:
                self._forget()
            return body
        if self.closed:
            self._forget()
            return encode_payload([CLOSE_PACKET])
        self._poll = request
        request.notifyFinish().addBoth(self._poll_gone, request)
        return server.NOT_DONE_YET

    def _poll_gone(self, _: Any, request: Any) -> None:
        if self._poll is request:
            self._poll = None

    def _answer_poll(self, packets: list[EnginePacket] | None = None) -> None:
        request, self._poll = self._poll, None
        if request is None:
            return
        self._respond(request, encode_payload(packets if packets is not None else self._take_queue()))

    @staticmethod
    def _respond(request: Any, body: bytes) -> None:
        if request.finished or request_gone(request):
            return
        request.setHeader(b"Content-Type", b"text/plain; charset=UTF-8")
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()

    def receive_payload(self, body: bytes) -> None:
        """A polling POST's body. ProtocolError closes the session."""
        if self.transport != POLLING:
            raise ProtocolError("POST on a session that upgraded")
        for packet in decode_payload(body):
            if self.closed:
                return
            # The limit may change with each message (the handler sets it).
            if packet.type == MESSAGE and len(packet.data) > self.frame_limit:
                raise FrameTooLarge(f"a message larger than {self.frame_limit}")
            self.receive(packet)

    @property
    def body_limit(self) -> int:
        """The largest polling body this session takes now: messages up to
        frame_limit, base64 and framing included."""
        return self.frame_limit * 4 // 3 + _BODY_SLACK

    # -- receiving ------------------------------------------------------

    def receive(self, packet: EnginePacket) -> None:
        kind = packet.type
        if kind == MESSAGE:
            if self.handler is not None:
                self.handler.message(packet.data)
        elif kind == PONG:
            self._pong()
        elif kind == CLOSE:
            self.close("client close", flush=False, answer_poll=True)
        elif kind == PING:
            # Engine.IO v4 pings go from the server to the client only.
            raise ProtocolError("invalid heartbeat direction")
        # OPEN, UPGRADE and NOOP mean nothing on an established transport:
        # ignored, as the reference does.

    # -- heartbeat ------------------------------------------------------

    def start(self) -> None:
        self._ping_call = self.server.clock.callLater(self.server.ping_interval, self._ping)

    def joined(self) -> None:
        """The handler's client passed the handler's own handshake (Socket.IO:
        a namespace accepted its CONNECT): the session no longer counts among
        its address's pending sessions."""
        self.server.joined(self)

    def _ping(self) -> None:
        self._ping_call = None
        self._send_packet(PING_PACKET)
        if not self.closed:
            self._pong_deadline = self.server.clock.callLater(self.server.ping_timeout, self._no_pong)

    def _pong(self) -> None:
        if self._pong_deadline is None:
            return  # an unasked pong is harmless
        self._pong_deadline.cancel()
        self._pong_deadline = None
        self._ping_call = self.server.clock.callLater(self.server.ping_interval, self._ping)

    def _no_pong(self) -> None:
        self._pong_deadline = None
        self.close("ping timeout", flush=False, abort=True)

    # -- upgrade --------------------------------------------------------

    def begin_upgrade(self, ws: EngineWebSocket) -> bool:
        if self.closed or self.transport != POLLING or self._probe is not None:
            return False
        self._probe = ws
        self._upgrade_call = self.server.clock.callLater(self.server.upgrade_timeout, self._upgrade_expired)
        return True

    def probed(self, ws: EngineWebSocket) -> None:
        """``2probe`` arrived: the pending poll is answered with a noop so
        that the client's polling loop pauses."""
        if self._poll is not None:
            self._answer_poll([NOOP_PACKET])

    def upgraded(self, ws: EngineWebSocket) -> None:
        """``5`` arrived: the session moves to the WebSocket, with every
        packet that waited."""
        if self._upgrade_call is not None and self._upgrade_call.active():
            self._upgrade_call.cancel()
        self._upgrade_call = None
        self._probe = None  # (no poll is held: probed() and poll() answered them)
        self.transport = WEBSOCKET
        self._ws = ws
        self.flush()

    def probe_lost(self, ws: EngineWebSocket) -> None:
        if self._probe is ws:
            self._probe = None
            if self._upgrade_call is not None and self._upgrade_call.active():
                self._upgrade_call.cancel()
            self._upgrade_call = None

    def _upgrade_expired(self) -> None:
        self._upgrade_call = None
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close(CLOSE_POLICY, "upgrade timeout")

    # -- the WebSocket --------------------------------------------------

    def attach(self, ws: EngineWebSocket) -> None:
        self._ws = ws

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.flush()

    def flush(self) -> None:
        """Send what waits, as far as the WebSocket takes it."""
        ws = self._ws
        if ws is None or self._paused or not self._queue:
            return
        queue = self._take_queue()
        for index, packet in enumerate(queue):
            if self._paused:
                # The TCP buffer filled up: the rest waits for resume().
                self._queue = queue[index:]
                self._queued_bytes = sum(len(p.data) + 1 for p in self._queue)
                return
            ws.send_packet(packet)

    def transport_lost(self, ws: EngineWebSocket, reason: str = "transport close") -> None:
        if self._ws is ws:
            self._ws = None
            self.close(reason, flush=False, abort=True)

    # -- closing --------------------------------------------------------

    def close(self, reason: str, *, code: int = CLOSE_NORMAL, flush: bool = True,
              answer_poll: bool = False, abort: bool = False) -> None:
        """
        End the session. With ``flush`` what is queued is still sent (over a
        WebSocket at once; to polling at the next poll, if it comes soon).

        A polling client is told with the close packet: in the pending poll,
        or in the next one if it comes soon, until when the session is kept.
        ``abort`` (the client broke the Engine.IO protocol or stopped
        answering) and ``answer_poll`` (the client closed) forget it at once:
        its next request gets 400.
        """
        if self.closed:
            return
        self.closed = True
        for call in (self._ping_call, self._pong_deadline, self._upgrade_call):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._pong_deadline = self._upgrade_call = None
        if self._probe is not None:
            # With the session's code: a probe hears "server shutting down"
            # as 4001, like every other WebSocket.
            self._probe.close(code, reason)
            self._probe = None
        handler, self.handler = self.handler, None
        if handler is not None:
            try:
                handler.closed(reason)
            except Exception:
                _log.failure("Closing session {sid} failed", sid=self.sid)
        ws, self._ws = self._ws, None
        if ws is not None:
            if flush:
                for packet in self._take_queue():
                    ws.send_packet(packet)
            ws.close(code, reason)
            self._forget()
            return
        if answer_poll or not flush:
            self._queue, self._queued_bytes = [], 0
        if self._poll is not None:
            # A client's close answers the pending poll with a noop; ours with
            # what waits, then the close packet.
            self._answer_poll([NOOP_PACKET] if answer_poll else self._take_queue() + [CLOSE_PACKET])
            self._forget()
        elif answer_poll or abort or self.transport != POLLING:
            self._forget()
        else:
            # Keep what waits and the close packet for the next poll, for as
            # long as a client may take to answer a ping.
            self._queue.append(CLOSE_PACKET)
            self._linger = self.server.clock.callLater(self.server.ping_timeout, self._forget)

    def _forget(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        self._queue, self._queued_bytes = [], 0
        self.server.forget(self)


class EngineServer:
    """The session table and the settings every session follows."""

    def __init__(self, clock: Any, *, on_session: Callable[[Session], SessionHandler],
                 ping_interval: float = 25.0, ping_timeout: float = 20.0,
                 upgrade_timeout: float = 10.0, max_payload: int = 1_000_000,
                 buffer_limit: int = 4 * 1024 * 1024, client_ip: Callable[[Any], str] | None = None,
                 handshake_rate: tuple[int, float] | None = None, max_pending: int = 0,
                 connection_release: Callable[[Any], Callable[[], None]] | None = None,
                 ) -> None:
        """``handshake_rate`` (count, period): new sessions one client address
        may open (None: no cap). ``max_pending``: open sessions of one client
        address that have not ``joined()`` (0: no cap). Both count client
        addresses by cyphr.connections.address_key. ``connection_release``:
        for a request that becomes a WebSocket, what gives its connection's
        place back to the site when the WebSocket closes (None: the site
        counts nothing)."""
        self.clock = clock
        self.on_session = on_session
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.upgrade_timeout = upgrade_timeout
        self.max_payload = max_payload
        self.buffer_limit = buffer_limit
        self.client_ip = client_ip or (lambda request: getattr(request.getClientAddress(), "host", ""))
        self.sessions: dict[str, Session] = {}
        self.refusals = Refusals(clock, "Engine.IO messages")
        # Every WebSocket connection until its TCP connection is gone
        # (including those whose close handshake is under way).
        self.websockets: set[EngineWebSocket] = set()
        self._all_closed: list[Deferred[None]] = []
        self.accepting = True
        self.handover_ip = ""
        self._handshakes = (RateLimit(clock, handshake_rate[0], handshake_rate[1], name="handshakes")
                            if handshake_rate is not None else None)
        self.max_pending = max_pending
        # Open sessions not joined yet, by client address (an address with
        # none is not kept).
        self._pending: dict[str, set[Session]] = {}
        self.refused_handshakes = {"handshake_rate": 0, "pending_sessions": 0}
        self.connection_release = connection_release
        self.handover_release: Callable[[], None] | None = None
        self._releases: dict[EngineWebSocket, Callable[[], None]] = {}
        self.resource = EngineResource(self)

    def open_packet(self, upgrades: list[str], sid: str) -> EnginePacket:
        return EnginePacket(OPEN, json.dumps({
            "sid": sid,
            "upgrades": upgrades,
            "pingInterval": int(self.ping_interval * 1000),
            "pingTimeout": int(self.ping_timeout * 1000),
            "maxPayload": self.max_payload,
        }, separators=(",", ":")))

    def new_session(self, transport: str, client_ip: str) -> Session:
        sid = secrets.token_urlsafe(15)
        session = Session(self, sid, transport, client_ip)
        self.sessions[sid] = session
        self._pending.setdefault(address_key(client_ip), set()).add(session)
        return session

    def refuse_handshake(self, request: Any) -> bytes | None:
        """The answer refusing a new session to this request's client, or
        None when it may open one: 429 in the reference's error format
        (code 4, "Forbidden", with a message of ours) when its address holds
        ``max_pending`` sessions not joined yet, or opens them faster than
        ``handshake_rate``."""
        key = address_key(self.client_ip(request))
        if self.max_pending and self._pending_count(key) >= self.max_pending:
            self.refused_handshakes["pending_sessions"] += 1
            return self.error(request, FORBIDDEN, 429, "Too many sessions without a namespace")
        if self._handshakes is not None:
            try:
                self._handshakes.hit(key)
            except RateLimited as e:
                self.refused_handshakes["handshake_rate"] += 1
                request.setHeader(b"Retry-After", e.headers["Retry-After"].encode("ascii"))
                return self.error(request, FORBIDDEN, 429, "Too many handshakes from this address")
        return None

    def _pending_count(self, key: str) -> int:
        # A closed session may wait a while to be forgotten (to tell its
        # polling client): it holds nothing the cap is about.
        return sum(1 for session in self._pending.get(key, ()) if not session.closed)

    def joined(self, session: Session) -> None:
        self._not_pending(session)

    def memory_tables(self) -> dict[str, int]:
        """The size of each table, for the memory metrics. Each follows the
        open connections: a session goes when it is forgotten, an address
        with its last session not joined yet, a WebSocket with its TCP
        connection; the handshake limit forgets idle addresses (RateLimit)."""
        return {"engine_sessions": len(self.sessions), "engine_pending_addresses": len(self._pending),
                "engine_websockets": len(self.websockets),
                "engine_handshake_addresses": len(self._handshakes) if self._handshakes else 0}

    def expire(self) -> None:
        """Forget the addresses idle long enough (the handshake limit's)."""
        if self._handshakes is not None:
            self._handshakes.expire()

    def _not_pending(self, session: Session) -> None:
        key = address_key(session.client_ip)
        pending = self._pending.get(key)
        if pending is not None:
            pending.discard(session)
            if not pending:
                del self._pending[key]

    def started(self, session: Session) -> None:
        """Hand the open session to its handler and start its heartbeat."""
        session.start()
        try:
            session.handler = self.on_session(session)
        except Exception:
            _log.failure("Starting session {sid} failed", sid=session.sid)
            session.close("server error", flush=False)

    def forget(self, session: Session) -> None:
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]
        self._not_pending(session)

    def close_all(self, reason: str, code: int = CLOSE_SHUTDOWN) -> None:
        """Close every session (the service is stopping), sending what each
        has queued first."""
        self.accepting = False
        for session in list(self.sessions.values()):
            session.close(reason, code=code)
        # A polling client that is not polling now will not be waited for.
        for session in list(self.sessions.values()):
            session._forget()

    def websocket_opened(self, ws: EngineWebSocket) -> None:
        self.websockets.add(ws)
        # The connection it took over stays counted by the site until it closes.
        release, self.handover_release = self.handover_release, None
        if release is not None:
            self._releases[ws] = release

    def websocket_gone(self, ws: EngineWebSocket) -> None:
        self.websockets.discard(ws)
        release = self._releases.pop(ws, None)
        if release is not None:
            release()
        if not self.websockets:
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                d.callback(None)

    def websockets_closed(self) -> Deferred[None]:
        """Fires once no WebSocket connection is left: each client has
        answered our close frame (or Autobahn's close timeout dropped it)."""
        d: Deferred[None] = Deferred()
        if self.websockets:
            self._all_closed.append(d)
        else:
            d.callback(None)
        return d

    def drop_all(self) -> int:
        """Abort every remaining WebSocket connection without waiting for a
        close handshake (shutdown ran out of time). Answers how many."""
        dropped = list(self.websockets)
        for ws in dropped:
            if ws.transport is not None:
                ws.transport.abortConnection()
        return len(dropped)

    @staticmethod
    def error(request: Any, code: int, status: int = 400, message: str | None = None) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"code": code, "message": message or _ERROR_MESSAGES[code]}).encode("ascii")


class EngineResource(resource.Resource):
    """``/socket.io/``: the polling transport, and the door to the WebSocket one."""

    isLeaf = True

    def __init__(self, engine: EngineServer) -> None:
        super().__init__()
        self.engine = engine
        factory = WebSocketServerFactory()
        factory.protocol = EngineWebSocket
        factory.engine = engine
        factory.setProtocolOptions(
            webStatus=False,
            maxMessagePayloadSize=engine.max_payload,
            maxFramePayloadSize=engine.max_payload,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            # The Engine.IO heartbeat does the job of WebSocket pings.
            autoPingInterval=0,
            # A frame over the limit is answered with close code 1009
            # ("message too big") rather than a bare drop.
            failByDrop=False,
            # Text is checked once, as a whole message, when it is decoded
            # (onMessage): no validator state per connection.
            utf8validateIncoming=False,
        )
        self._websocket = WebSocketResource(factory)

    def render(self, request: Any) -> Any:
        request.route = "/socket.io/"
        args = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"))
        engine = self.engine
        if args.get("EIO") != ["4"]:
            return engine.error(request, UNSUPPORTED_PROTOCOL)
        transport = args.get("transport", [""])[0]
        if transport not in (POLLING, WEBSOCKET):
            return engine.error(request, TRANSPORT_UNKNOWN)
        sid = args.get("sid", [None])[0]
        method = request.method
        if sid is None:
            if method != b"GET":
                return engine.error(request, BAD_HANDSHAKE_METHOD)
            if not engine.accepting:
                return engine.error(request, BAD_REQUEST, 503)
            refused = engine.refuse_handshake(request)
            if refused is not None:
                return refused
        elif sid not in engine.sessions or engine.sessions[sid].closed and transport == WEBSOCKET:
            return engine.error(request, SESSION_UNKNOWN)
        if transport == WEBSOCKET:
            if method != b"GET" or (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
                return engine.error(request, BAD_REQUEST)
            # The WebSocket takes the connection over: the HTTP channel's
            # idle timeout must no longer apply to it.
            request.channel.setTimeout(None)
            engine.handover_ip = engine.client_ip(request)
            if engine.connection_release is not None:
                engine.handover_release = engine.connection_release(request)
            try:
                return self._websocket.render(request)
            finally:
                engine.handover_ip = ""
                engine.handover_release = None
        if sid is None:
            session = engine.new_session(POLLING, engine.client_ip(request))
            request.setHeader(b"Content-Type", b"text/plain; charset=UTF-8")
            body = encode_payload([engine.open_packet([WEBSOCKET], session.sid)])
            engine.started(session)
            return body
        session = engine.sessions[sid]
        if session.transport != POLLING:
            return engine.error(request, BAD_REQUEST)
        if method == b"GET":
            body = session.poll(request)
            if body is not server.NOT_DONE_YET and isinstance(body, bytes):
                request.setHeader(b"Content-Type", b"text/plain; charset=UTF-8")
            return body
        if method == b"POST":
            if session.closed:
                return engine.error(request, SESSION_UNKNOWN)
            # Measured before it is read: a body over the session's limit is
            # refused without being decoded (Twisted keeps a large one in a
            # temporary file, not in memory).
            content = request.content
            content.seek(0, 2)
            if content.tell() > session.body_limit:
                engine.refusals.count("too_large")
                session.close("message too big", flush=False, abort=True)
                return engine.error(request, BAD_REQUEST, 413)
            content.seek(0)
            try:
                session.receive_payload(content.read())
            except FrameTooLarge:
                engine.refusals.count("too_large")
                session.close("message too big", flush=False, abort=True)
                return engine.error(request, BAD_REQUEST, 413)
            except ProtocolError as e:
                engine.refusals.count("protocol")
                _log.debug("Session {sid} broke the protocol: {error}", sid=sid, error=str(e))
                session.close("protocol error", flush=False, abort=True)
                return engine.error(request, BAD_REQUEST)
            request.setHeader(b"Content-Type", b"text/html")
            return b"ok"
        return engine.error(request, BAD_REQUEST)

    def body_refused(self, uri: bytes) -> None:
        """A POST whose body passed the limit was refused with 413 before
        reaching us: the session it was meant for ends too."""
        args = parse_qs(uri.partition(b"?")[2].decode("latin-1"))
        sid = args.get("sid", [None])[0]
        session = self.engine.sessions.get(sid) if sid else None
        if session is not None:
            session.close("payload too large", flush=False, abort=True)


class EngineWebSocket(WebSocketServerProtocol):
    """One WebSocket: a fresh session, or the upgrade of a polling one."""

    session: Session | None = None
    upgrading = False
    probed = False
    refused = False  # a second WebSocket for a session: closed once open
    client_ip = ""
    _socket: Any = None  # a plain TCP connection's socket, for _write
    # Bytes handed to the transport since its buffer was last seen empty
    # or below its own threshold (it had not paused us): about what waits
    # there for a client that does not read.
    unsent = 0
    _held_back = False  # the transport paused us (its buffer is full)

    def connectionMade(self) -> None:
        # The site's view of the client (trusted proxies applied), handed
        # over by EngineResource.render, which runs this synchronously.
        self.client_ip = self.factory.engine.handover_ip
        self.factory.engine.websocket_opened(self)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.engine.websocket_gone(self)

    def onConnect(self, request: Any) -> None:
        engine: EngineServer = self.factory.engine
        sid = request.params.get("sid", [None])[0]
        if sid is not None:
            session = engine.sessions.get(sid)
            if session is None or session.closed:
                raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "Session ID unknown")
            if not session.begin_upgrade(self):
                # The session has its WebSocket already, or a probe: as in
                # the reference, the handshake completes and onOpen closes
                # this one, with no session of its own.
                self.refused = True
                return None
            self.session = session
            self.upgrading = True
        return None

    def onOpen(self) -> None:
        # What Autobahn keeps of the handshake and per connection but never
        # uses again: an idle connection should cost little memory.
        slim_websocket(self)
        engine: EngineServer = self.factory.engine
        # Twisted's HTTP channel registered itself as the producer of this
        # connection; from now on the WebSocket is.
        try:
            self.transport.unregisterProducer()
        except Exception:
            pass
        self.transport.registerProducer(self, True)
        self._socket = plain_tcp_socket(self.transport)
        if self.refused:
            self.close(CLOSE_PROTOCOL_ERROR, "upgrade refused")
            return
        if self.upgrading:
            return
        session = engine.new_session(WEBSOCKET, self.client_ip)
        session.attach(self)
        self.session = session
        self.send_packet(engine.open_packet([], session.sid))
        engine.started(session)

    def onMessageFrameBegin(self, length: int) -> None:
        # A message over the session's frame_limit is refused from the frame
        # header, before its payload is read: Autobahn's own check, with
        # a limit that changes per session (Autobahn's maxMessagePayloadSize
        # also bounds what we send, so it stays at max_body).
        session = self.session
        if (session is not None and not self.failedByMe
                and self.message_data_total_length + length > session.frame_limit):
            self.failedByMe = True  # Autobahn discards the rest of the message
            self.factory.engine.refusals.count("too_large")
            self.session = None
            self.sendCloseFrame(CLOSE_TOO_BIG, b"message too big")
            if self.upgrading:
                session.probe_lost(self)
            else:
                session.transport_lost(self, "message too big")
        super().onMessageFrameBegin(length)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            return
        try:
            frame: str | bytes = payload if isBinary else payload.decode("utf-8")
            packet = decode_frame(frame)
            if self.upgrading:
                self._upgrade_step(session, packet)
                return
            session.receive(packet)
        except (ProtocolError, UnicodeDecodeError) as e:
            _log.debug("Session {sid} broke the protocol: {error}", sid=session.sid, error=str(e))
            self.factory.engine.refusals.count("protocol")
            if self.upgrading:
                self.close(CLOSE_PROTOCOL_ERROR, "protocol error")
            else:
                session.close("protocol error", code=CLOSE_PROTOCOL_ERROR, flush=False, abort=True)

    def _upgrade_step(self, session: Session, packet: EnginePacket) -> None:
        if packet.type == PING and packet.data == "probe":
            # Answered each time it comes, as the reference does.
            self.probed = True
            self.send_packet(EnginePacket(PONG, "probe"))
            session.probed(self)
        elif packet.type == UPGRADE and self.probed:
            self.upgrading = False
            session.upgraded(self)
        else:
            raise ProtocolError("unexpected packet during the upgrade")

    # Autobahn formats a debug line, with colours, for every read and every
    # write, even when debug logging is off: about 5% of the reactor's time
    # under load. dataReceived and sendData do what Autobahn does without
    # that line, and the common case of framing is done directly
    # (cyphr.realtime.frames; all listed in cyphr._compat.COPIED, checked at
    # each upgrade).

    def dataReceived(self, data: bytes) -> None:
        # Whole single-frame messages are taken here while Autobahn holds
        # nothing of the stream; Autobahn gets the rest from the first frame
        # they leave to it (a control frame, a fragment, a frame not whole
        # yet, one over the limit, a violation) and so refuses or buffers it.
        if websocket_between_messages(self) and not self.logFrames and not self.logOctets:
            start = 0
            # The largest message taken here: the session's frame limit
            # (which changes as the session goes) within Autobahn's own
            # bound; onMessageFrameBegin and Autobahn refuse a larger one.
            bound = self.factory.engine.max_payload
            while (session := self.session) is not None and self.state == self.STATE_OPEN:
                limit = session.frame_limit
                taken = frames.next_message(data, start, limit if limit < bound else bound)
                if taken is None:
                    break
                payload, binary, start = taken
                self.onMessage(payload, binary)
            if start == len(data):
                return
            if start:
                data = data[start:]
        websocket_data_received(self, data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue or self.logOctets:
            self._count_unsent(len(data))
            super().sendData(data, sync, chopsize)
            return
        self._write(data)
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

    def _write(self, data: bytes) -> None:
        """Write now what the socket takes when nothing waits before it.
        Twisted's write only buffers, then asks the reactor to watch the
        socket for writing and to stop watching once it is drained: two more
        system calls and a turn of the reactor for each frame. Over TLS, or
        when something is buffered already, Twisted's write does it all."""
        transport = self.transport
        sock = self._socket
        if sock is not None and transport_idle(transport):
            self.unsent = 0  # nothing waits before this
            try:
                sent = sock.send(data)
            except OSError:  # full (EAGAIN), or gone: Twisted's write finds out
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self._count_unsent(len(data))
        transport.write(data)

    def _count_unsent(self, size: int) -> None:
        # While the transport has not paused us its buffer is below its
        # threshold (64 KiB): only what goes on top of a full one adds up.
        self.unsent = self.unsent + size if self._held_back else size

    def send_packet(self, packet: EnginePacket) -> None:
        if self.state != self.STATE_OPEN:
            return  # closing: onClose tells the session
        encoded = encode_frame(packet)
        if isinstance(encoded, bytes):
            self._send_frame(encoded, True)
        else:
            self._send_frame(encoded.encode("utf-8"), False)

    def send_message(self, data: str | bytes) -> None:
        """``send_packet(EnginePacket(MESSAGE, data))``, without the packet."""
        if self.state != self.STATE_OPEN:
            return  # closing: onClose tells the session
        if type(data) is str:
            self._send_frame(("4" + data).encode("utf-8"), False)
        else:
            self._send_frame(encode_frame(EnginePacket(MESSAGE, data)), True)  # type: ignore[arg-type]

    def _send_frame(self, payload: bytes, binary: bool) -> None:
        # (No compression is ever negotiated: the factory keeps Autobahn's
        # default perMessageCompressionAccept, which refuses every offer.)
        if (self.send_queue or self.logFrames or self.logOctets or self.autoFragmentSize
                or 0 < self.maxMessagePayloadSize < len(payload)):
            self.sendMessage(payload, isBinary=binary)  # Autobahn's general path, and its refusal
            return
        self._write(frames.frame(payload, binary))

    def close(self, code: int, reason: str) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(code, reason)
        elif self.state not in (self.STATE_CLOSING, self.STATE_CLOSED):
            self.dropConnection(abort=True)

    # -- flow control (IPushProducer for the TCP transport) --------------

    def pauseProducing(self) -> None:
        self._held_back = True
        if self.session is not None and not self.upgrading:
            self.session.pause()

    def resumeProducing(self) -> None:
        self._held_back = False
        self.unsent = 0  # the transport resumes us once its buffer is empty
        if self.session is not None and not self.upgrading:
            self.session.resume()

    def stopProducing(self) -> None:
        pass

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        if self.upgrading:
            session.probe_lost(self)
        else:
            session.transport_lost(self)
