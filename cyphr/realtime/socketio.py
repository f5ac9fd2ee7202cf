"""
Socket.IO v5 over the Engine.IO sessions of cyphr.realtime.engine:
namespaces with connect handlers, sockets, rooms, events and acks in both
directions. Nothing here knows about Cyphr's events; an application
registers namespaces and event handlers. (Its refusals of malformed events
are the contract's ApiErrors, so that any ``error_ack`` renders them.)

A namespace's ``connect`` handler accepts a socket by returning (or
resolving to) anything, and refuses it by raising ConnectRefused, which
becomes a CONNECT_ERROR object. The CONNECT reply always goes out before
anything the application emits to the socket. An event handler's result is
the ack (a tuple is several arguments); handlers may be coroutines.

An event is refused with an error (answered through the namespace's
``error_ack``, and the connection lives) before its handler runs when its
arguments do not fit the handler's signature (BadEventArguments) or nest
deeper than MAX_JSON_DEPTH (EventTooDeep). A handler that raises, at once
or later, is answered the same way.

Limits: until the application trusts a connection (``Socket.trust()``,
once it knows who the client is) every packet, attachments included, must
fit ``untrusted_limit`` (a few KiB: a CONNECT, an ``authenticate``); after
that, ``max_event`` (default: the Engine.IO session's maxPayload). Either
is enforced from the frame header or body length, before anything is
read (cyphr.realtime.engine), and passing it closes the session. An event
over the event rate is refused from its header, before its JSON is parsed.
Refusals are counted by reason (``refusals``, for metrics) and never
logged one by one.
"""

from __future__ import annotations

import inspect
import secrets
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from cyphr.realtime.codec import (
    ACK,
    BINARY_ACK,
    BINARY_EVENT,
    CONNECT,
    CONNECT_ERROR,
    DISCONNECT,
    EVENT,
    RESERVED_EVENTS,
    EncodedJson,
    EventTooLarge,
    NestedTooDeep,
    PacketDecoder,
    ProtocolError,
    SocketPacket,
    encode_ack_json,
    encode_packet,
    peek_event,
)
# The one place this layer speaks the application's language: its refusals
# of malformed events are the contract's 400s, which any error_ack renders.
from cyphr.errors import INVALID_BODY, ApiError, BadRequest, InvalidJson
from cyphr.handlers.validation import MAX_JSON_DEPTH, json_too_deep
from cyphr.realtime.engine import CLOSE_POLICY, CLOSE_PROTOCOL_ERROR, Refusals, Session

_log = Logger()

Handler = Callable[..., Any]

# The largest packet (with its attachments) of a connection the
# application has not trusted yet: room for a CONNECT or an authenticate
# event with a session token, and nothing an attacker could use to make
# the server buffer or parse much.
UNTRUSTED_LIMIT = 4096


class ConnectRefused(Exception):
    """Raised by a connect handler: the client gets CONNECT_ERROR with this
    message and data."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class BadEventArguments(BadRequest):
    """An event came with more (or fewer) arguments than its handler takes."""

    code = INVALID_BODY


class EventTooDeep(InvalidJson):
    """An event's arguments nest deeper than MAX_JSON_DEPTH."""

    message = f"The event's data is nested deeper than {MAX_JSON_DEPTH} levels"


def _arity(handler: Handler) -> tuple[int, int | None]:
    """How many event arguments (after the socket) ``handler`` takes: at
    least, and at most (None: any number)."""
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let it decide
        return 0, None
    least = most = 0
    for parameter in parameters:
        if parameter.kind == parameter.VAR_POSITIONAL:
            return max(least - 1, 0), None
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            most += 1
            if parameter.default is parameter.empty:
                least += 1
    return max(least - 1, 0), max(most - 1, 0)


class AckTimeout(Exception):
    """The client did not acknowledge a server-initiated emit in time."""


class Disconnected(Exception):
    """The socket went away before it acknowledged."""


class Namespace:
    """A namespace's handlers, sockets and rooms."""

    def __init__(self, server: SocketServer, name: str, *, connect: Handler | None = None,
                 connected: Handler | None = None, disconnected: Handler | None = None,
                 error_ack: Callable[[Failure], Any] | None = None) -> None:
        self.server = server
        self.name = name
        self.sockets: dict[str, Socket] = {}
        self.rooms: dict[str, set[Socket]] = {}
        self.handlers: dict[str, Handler] = {}
        self._arities: dict[str, tuple[int, int | None]] = {}
        # (socket, auth) -> accept (anything) or raise ConnectRefused; None accepts all.
        self.connect_handler = connect
        # (socket): the CONNECT reply has gone out.
        self.connected_handler = connected
        # (socket, reason): called with the socket's rooms still joined.
        self.disconnect_handler = disconnected
        # An event handler's exception becomes the ack this answers, if any.
        self.error_ack = error_ack

    def on(self, event: str, handler: Handler) -> None:
        if event in RESERVED_EVENTS:
            raise ValueError(f"{event!r} is a reserved event name")
        self.handlers[event] = handler
        # Read once here: inspecting a signature costs more than an event.
        self._arities[event] = _arity(handler)

    def emit(self, event: str, *args: Any, room: str | None = None,
             skip: Socket | None = None) -> int:
        """Send an event to every socket of ``room`` (or of the namespace)
        but ``skip``; answer how many got it. The packet is encoded once."""
        targets = self.rooms.get(room, ()) if room is not None else self.sockets.values()
        if not targets:
            return 0
        frames = encode_packet(SocketPacket(EVENT, self.name, [event, *args]))
        sent = 0
        for socket in list(targets):
            if socket is not skip:
                socket.send_frames(frames)
                sent += 1
        return sent

    def room_size(self, room: str) -> int:
        return len(self.rooms.get(room, ()))

    def _join(self, socket: Socket, room: str) -> None:
        self.rooms.setdefault(room, set()).add(socket)

    def _leave(self, socket: Socket, room: str) -> None:
        members = self.rooms.get(room)
        if members is not None:
            members.discard(socket)
            if not members:
                del self.rooms[room]


class Socket:
    """A client's presence in one namespace, over one Engine.IO session."""

    __slots__ = ("id", "namespace", "connection", "rooms", "connected", "state", "_acks",
                 "_next_ack", "_held", "__weakref__")

    def __init__(self, namespace: Namespace, connection: Connection) -> None:
        self.id = secrets.token_urlsafe(15)
        self.namespace = namespace
        self.connection = connection
        self.rooms: set[str] = set()
        self.connected = False
        self.state: Any = None  # the application's, e.g. who is authenticated
        self._acks: dict[int, tuple[Deferred[list[Any]], Any]] | None = None
        self._next_ack = 0
        self._held: list[list[str | bytes]] | None = []  # frames emitted before the CONNECT reply

    @property
    def client_ip(self) -> str:
        return self.connection.session.client_ip

    @property
    def session(self) -> Session:
        return self.connection.session

    # -- rooms ------------------------------------------------------------

    def trust(self) -> None:
        """The application knows who the client is (its token was
        accepted): the connection's packets may now reach the event limit."""
        self.connection.trust()

    def join(self, room: str) -> None:
        if room not in self.rooms and self.connection.open:
            self.rooms.add(room)
            self.namespace._join(self, room)

    def leave(self, room: str) -> None:
        if room in self.rooms:
            self.rooms.discard(room)
            self.namespace._leave(self, room)

    # -- sending ----------------------------------------------------------

    def send_frames(self, frames: list[str | bytes]) -> None:
        if self._held is not None:
            self._held.append(frames)
            return
        self.connection.session.send_many(frames)

    def emit(self, event: str, *args: Any) -> None:
        if event in RESERVED_EVENTS:
            raise ValueError(f"{event!r} is a reserved event name")
        self.send_frames(encode_packet(SocketPacket(EVENT, self.namespace.name, [event, *args])))

    def emit_with_ack(self, event: str, *args: Any, timeout: float = 10.0) -> Deferred[list[Any]]:
        """Emit and wait for the client's ack: fires with its arguments, or
        fails with AckTimeout or Disconnected."""
        if event in RESERVED_EVENTS:
            raise ValueError(f"{event!r} is a reserved event name")
        ack_id = self._next_ack
        self._next_ack += 1
        d: Deferred[list[Any]] = Deferred()
        if not self.connection.open:
            d.errback(Disconnected())
            return d
        timer = self.connection.server.clock.callLater(timeout, self._ack_timed_out, ack_id)
        if self._acks is None:
            self._acks = {}
        self._acks[ack_id] = (d, timer)
        self.send_frames(encode_packet(SocketPacket(EVENT, self.namespace.name, [event, *args], ack_id)))
        return d

    def _ack_timed_out(self, ack_id: int) -> None:
        entry = self._acks.pop(ack_id, None) if self._acks else None
        if entry is not None:
            entry[0].errback(AckTimeout())

    def _acked(self, ack_id: int | None, args: list[Any]) -> None:
        entry = self._acks.pop(ack_id, None) if self._acks and ack_id is not None else None
        if entry is None:
            return  # late or unknown: ignored, as the reference does
        d, timer = entry
        if timer.active():
            timer.cancel()
        d.callback(args)

    def _accepted(self) -> None:
        self.connected = True
        held, self._held = self._held, None
        session = self.connection.session
        session.send_many(encode_packet(SocketPacket(CONNECT, self.namespace.name, {"sid": self.id})))
        for frames in held or ():
            session.send_many(frames)

    def disconnect(self) -> None:
        """Leave the namespace on the server's initiative (the client is told)."""
        if self.connected:
            self.send_frames(encode_packet(SocketPacket(DISCONNECT, self.namespace.name)))
        self.connection._drop(self, "server namespace disconnect")

    def _gone(self, reason: str) -> None:
        was_connected, self.connected = self.connected, False
        handler = self.namespace.disconnect_handler
        if was_connected and handler is not None:
            # Called with the rooms still joined, and synchronously up to
            # its first wait.
            _run(handler, self, reason).addErrback(
                lambda f: _log.failure("Disconnect handler failed", f))
        for room in list(self.rooms):
            self.leave(room)
        self.namespace.sockets.pop(self.id, None)
        acks, self._acks = self._acks, None
        for d, timer in (acks or {}).values():
            if timer.active():
                timer.cancel()
            d.errback(Disconnected(reason))


def _run(handler: Handler, *args: Any) -> Deferred[Any]:
    """Call a handler that may answer a value, a Deferred or a coroutine.
    What it raises, at once or later, comes back as the Deferred's failure."""
    try:
        result = handler(*args)
    except Exception:
        return fail()
    if isinstance(result, Deferred):
        return result
    if inspect.isawaitable(result):
        return ensureDeferred(result)  # type: ignore[arg-type]
    d: Deferred[Any] = Deferred()
    d.callback(result)
    return d


class _Bucket:
    """Events per connection: ``rate`` a second, ``burst`` at once."""

    __slots__ = ("tokens", "at")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.at = now


class Connection:
    """One Engine.IO session seen from Socket.IO: its sockets, one per
    namespace, and the decoder of what it sends."""

    __slots__ = ("server", "session", "decoder", "sockets", "open", "trusted", "_connect_timer",
                 "_bucket", "__weakref__")

    def __init__(self, server: SocketServer, session: Session) -> None:
        self.server = server
        self.session = session
        self.decoder = PacketDecoder(server.max_attachments, server.untrusted_limit)
        self.sockets: dict[str, Socket] = {}
        self.open = True
        self.trusted = False
        self._connect_timer: Any = server.clock.callLater(server.connect_timeout, self._no_connect)
        self._bucket: _Bucket | None = None
        session.frame_limit = self.decoder.budget

    def trust(self) -> None:
        """Raise the packet limit from untrusted_limit to the event limit."""
        if self.trusted:
            return
        self.trusted = True
        self.decoder.limit = self.server.max_event or self.session.server.max_payload
        self.session.frame_limit = self.decoder.budget

    def _no_connect(self) -> None:
        self._connect_timer = None
        # A CONNECT whose handler has not decided yet does not count.
        if not any(socket.connected for socket in self.sockets.values()):
            self.session.close("connect timeout", code=CLOSE_POLICY, flush=False)

    # -- SessionHandler ---------------------------------------------------

    def message(self, data: str | bytes) -> None:
        try:
            self._message(data)
        finally:
            # What the next message may weigh (the engine refuses more
            # before reading it).
            self.session.frame_limit = self.decoder.budget

    def _message(self, data: str | bytes) -> None:
        # An EVENT counts against the event rate from its header: over the
        # rate, its JSON is not parsed.
        peeked = peek_event(data) if type(data) is str and not self.decoder.waiting else None
        if peeked is not None and not self._allow():
            socket = self.sockets.get(peeked[0])
            if socket is None or not socket.connected:
                self._protocol_error("packet type 2 for a namespace not joined")
                return
            self.server.refused_events += 1
            self._refuse(socket, peeked[1], RateExceeded(), "rate")
            return
        try:
            packet = self.decoder.feed(data)
        except NestedTooDeep as e:
            self._too_deep(e, counted=peeked is not None)
            return
        except EventTooLarge as e:
            self._protocol_error(str(e), "too_large", "message too big")
            return
        except ProtocolError as e:
            self._protocol_error(str(e))
            return
        if packet is None:
            return  # waiting for attachments
        kind = packet.type
        if kind == CONNECT:
            self._connect(packet)
            return
        if kind == CONNECT_ERROR:  # only goes the other way
            self._protocol_error(f"packet type {kind} from a client")
            return
        socket = self.sockets.get(packet.namespace)
        if socket is None or not socket.connected:
            # Before CONNECT, or for a namespace not joined (or whose CONNECT
            # is still undecided): the specification says the server MUST
            # close the connection, and the reference does.
            self._protocol_error(f"packet type {kind} for a namespace not joined")
            return
        if kind == EVENT or kind == BINARY_EVENT:
            self._event(socket, packet, counted=peeked is not None)
        elif kind == ACK or kind == BINARY_ACK:
            socket._acked(packet.id, packet.data)
        else:  # DISCONNECT
            self._drop(socket, "client namespace disconnect")

    def closed(self, reason: str) -> None:
        self.open = False
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None
        for socket in list(self.sockets.values()):
            self._drop(socket, reason)
        self.server.connections.discard(self)

    def _too_deep(self, error: NestedTooDeep, counted: bool) -> None:
        """An EVENT too deep to decode is refused like one too deep to
        handle, and the session lives; anything else is a protocol error."""
        socket = self.sockets.get(error.namespace)
        if error.kind != EVENT or socket is None or not socket.connected:
            self._protocol_error(str(error))
            return
        if not counted and not self._allow():  # it counts against the event rate all the same
            self.server.refused_events += 1
            self._refuse(socket, error.ack_id, RateExceeded(), "rate")
            return
        self._refuse(socket, error.ack_id, EventTooDeep(), "too_deep")

    def _protocol_error(self, why: str, reason: str = "protocol",
                        close_reason: str = "protocol error") -> None:
        # Bounded: the codec's messages quote no more than a namespace name.
        _log.debug("Session {sid} broke the Socket.IO protocol: {why}", sid=self.session.sid, why=why)
        self.server.refusals.count(reason)
        self.session.close(close_reason, code=CLOSE_PROTOCOL_ERROR, flush=False)

    # -- packets ----------------------------------------------------------

    def _connect(self, packet: SocketPacket) -> None:
        namespace = self.server.namespaces.get(packet.namespace)
        if namespace is None:
            self.session.send_many(encode_packet(SocketPacket(
                CONNECT_ERROR, packet.namespace, {"message": "Invalid namespace"})))
            return
        if packet.namespace in self.sockets:
            self._protocol_error("a second CONNECT to one namespace")
            return
        socket = Socket(namespace, self)
        self.sockets[packet.namespace] = socket
        handler = namespace.connect_handler
        outcome = _run(handler, socket, packet.data) if handler is not None else _run(lambda *_: None)
        outcome.addCallbacks(self._accepted, self._refused, callbackArgs=(socket,),
                             errbackArgs=(socket,))

    def _accepted(self, _: Any, socket: Socket) -> None:
        if not self.open or self.sockets.get(socket.namespace.name) is not socket:
            return
        # Only an accepted CONNECT ends the connect timeout, as in the
        # reference: a refused one (a bad token) must not hold the session.
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None
        self.session.joined()  # no longer among its address's pending sessions
        socket.namespace.sockets[socket.id] = socket
        socket._accepted()
        handler = socket.namespace.connected_handler
        if handler is not None:
            _run(handler, socket).addErrback(lambda f: _log.failure("Connected handler failed", f))

    def _refused(self, failure: Failure, socket: Socket) -> None:
        if self.sockets.get(socket.namespace.name) is socket:
            del self.sockets[socket.namespace.name]
        if failure.check(ConnectRefused):
            error: dict[str, Any] = {"message": failure.value.message}
            if failure.value.data is not None:
                error["data"] = failure.value.data
        else:
            _log.failure("Connect handler failed", failure)
            error = {"message": "Internal error"}
        if self.open:
            self.session.send_many(encode_packet(SocketPacket(CONNECT_ERROR, socket.namespace.name, error)))

    def _event(self, socket: Socket, packet: SocketPacket, counted: bool = False) -> None:
        event, args = packet.data[0], packet.data[1:]
        namespace = socket.namespace
        if not counted and not self._allow():
            self.server.refused_events += 1
            self._refuse(socket, packet.id, RateExceeded(), "rate")
            return
        handler = namespace.handlers.get(event) if isinstance(event, str) else None
        if handler is None:
            self._refuse(socket, packet.id, UnknownEvent(event), "unknown_event")
            return
        # Refused before the handler runs: a call with the wrong arguments
        # would be a TypeError, and data this deep would overflow the stack
        # wherever it is encoded again (stored, relayed).
        least, most = namespace._arities.get(event, (0, None))
        refusal: Exception | None = None
        if len(args) < least or (most is not None and len(args) > most):
            takes = str(least) if least == most else f"{least} to {most}"
            refusal = BadEventArguments(f"The event {event} takes {takes} argument"
                                        f"{'' if most == 1 else 's'}, not {len(args)}")
        elif args and json_too_deep(args, MAX_JSON_DEPTH + 1):  # + 1: the list of arguments
            refusal = EventTooDeep()
        if refusal is not None:
            self._refuse(socket, packet.id, refusal,
                         "too_deep" if isinstance(refusal, EventTooDeep) else "bad_arguments")
            return
        outcome = _run(handler, socket, *args)
        if packet.id is None:
            outcome.addErrback(self._unanswered, event, self.server.refusals)
        else:
            outcome.addCallbacks(self._ack, self._answer_error, callbackArgs=(socket, packet.id),
                                 errbackArgs=(socket, packet.id, namespace.error_ack))

    def _allow(self) -> bool:
        server = self.server
        now = server.clock.seconds()
        bucket = self._bucket
        if bucket is None:
            bucket = self._bucket = _Bucket(server.event_burst, now)
        bucket.tokens = min(server.event_burst, bucket.tokens + (now - bucket.at) * server.event_rate)
        bucket.at = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def _refuse(self, socket: Socket, ack_id: int | None, refusal: Exception, reason: str) -> None:
        """An ordinary refusal (the client's mistake): counted, answered
        when the client asked for an ack, never logged one by one."""
        self.server.refusals.count(reason)
        if ack_id is not None:
            self._answer(socket, ack_id, socket.namespace.error_ack, Failure(refusal))

    @staticmethod
    def _unanswered(failure: Failure, event: Any, refusals: Refusals) -> None:
        # A refusal (the client's mistake) with no ack id to answer: there
        # is nobody to tell, and nothing for the log but the count.
        if failure.check(ApiError):
            refusals.count("refused")
        elif not failure.check(CancelledError):
            _log.failure("Handling event {event!r} failed", failure, event=event)

    def _ack(self, result: Any, socket: Socket, ack_id: int) -> None:
        if not self.open or not socket.connected:
            return
        if type(result) is EncodedJson:
            socket.send_frames(encode_ack_json(socket.namespace.name, ack_id, result))
            return
        args = list(result) if isinstance(result, tuple) else ([] if result is None else [result])
        socket.send_frames(encode_packet(SocketPacket(ACK, socket.namespace.name, args, ack_id)))

    def _answer_error(self, failure: Failure, socket: Socket, ack_id: int,
                      error_ack: Callable[[Failure], Any] | None) -> None:
        if failure.check(ApiError):
            self.server.refusals.count("refused")
        self._answer(socket, ack_id, error_ack, failure)

    def _answer(self, socket: Socket, ack_id: int | None, error_ack: Callable[[Failure], Any] | None,
                failure: Failure) -> None:
        if error_ack is None:
            if not failure.check(RateExceeded, UnknownEvent, BadEventArguments, EventTooDeep):
                _log.failure("Handling an event failed", failure)
            return
        try:
            result = error_ack(failure)
        except Exception:
            _log.failure("Answering a failed event failed")
            return
        if ack_id is not None:
            self._ack(result, socket, ack_id)

    def _drop(self, socket: Socket, reason: str) -> None:
        if self.sockets.get(socket.namespace.name) is socket:
            del self.sockets[socket.namespace.name]
        socket._gone(reason)


class RateExceeded(Exception):
    """The connection sends events faster than it may."""


class UnknownEvent(Exception):
    def __init__(self, event: Any) -> None:
        super().__init__(f"unknown event {event!r}")
        self.event = event


class SocketServer:
    """The Socket.IO server: its namespaces and live connections."""

    def __init__(self, clock: Any, *, connect_timeout: float = 45.0, event_rate: float = 100.0,
                 event_burst: float = 200.0, max_attachments: int = 10, max_event: int = 0,
                 untrusted_limit: int = UNTRUSTED_LIMIT) -> None:
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.event_rate = event_rate
        self.event_burst = event_burst
        self.max_attachments = max_attachments
        # The largest packet, header and attachments together, of a trusted
        # connection (0: the Engine.IO session's maxPayload), and of one not
        # trusted yet.
        self.max_event = max_event
        self.untrusted_limit = untrusted_limit
        self.refused_events = 0  # over the event rate, for metrics
        # Every refusal by reason, for metrics (cyphr_realtime_refused).
        self.refusals = Refusals(clock, "Socket.IO packets and events")
        self.namespaces: dict[str, Namespace] = {}
        self.connections: set[Connection] = set()

    def namespace(self, name: str = "/", *, connect: Handler | None = None,
                  connected: Handler | None = None, disconnected: Handler | None = None,
                  error_ack: Callable[[Failure], Any] | None = None) -> Namespace:
        """Create the namespace ``name`` with its handlers (all optional:
        without ``connect`` every socket is accepted). A namespace is made
        once, complete: asking again for one that exists answers it, and
        giving handlers then is a mistake (ValueError)."""
        existing = self.namespaces.get(name)
        given = (connect, connected, disconnected, error_ack)
        if existing is not None:
            if any(handler is not None for handler in given):
                raise ValueError(f"the namespace {name!r} exists already")
            return existing
        namespace = self.namespaces[name] = Namespace(
            self, name, connect=connect, connected=connected, disconnected=disconnected,
            error_ack=error_ack)
        return namespace

    def on_session(self, session: Session) -> Connection:
        """The Engine.IO server's ``on_session``."""
        connection = Connection(self, session)
        self.connections.add(connection)
        return connection

