"""
Socket.IO clients over in-memory WebSockets, to a server of
tests.helpers.start_server: no port, no thread, no sleep.

Each connection is made by Autobahn's in-memory agent
(``autobahn.twisted.testing.create_memory_agent``, as
magic-wormhole-mailbox-server's test/test_websocket.py uses it): two iosim
FakeTransports joined by an IOPump. The server's end is a connection of the
server's own site (``server.site.buildProtocol``), so the upgrade request
takes the path one on a real port takes: the site's connection limits, Root,
EngineResource (the EIO, transport and sid checks, the per-address handshake
caps, with the client at 127.0.0.1 as on a loopback port) and Autobahn's
WebSocketResource; from there it is the server's EngineWebSocket, Engine.IO
session, Socket.IO namespace and Realtime. Only the bytes travel in memory.

``MemorySocket`` speaks Engine.IO v4 and Socket.IO v5 text frames by hand
over tests.realtime.WireSocket, with the calls of tests.realtime.SioClient
that event tests use, so a test of the event rules runs on either client.
Its ``barrier()`` is an ack round trip: once its answer is here, so is
everything the server sent the socket before it, and a test asserts that
nothing else arrived without sleeping.

``EagerPumper`` moves the bytes: as soon as either end writes (or closes),
a flush of that connection is due on the next turn of the reactor.
Autobahn's own pumper flushes every 0.1 s, a tenth of a second in each
round trip.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable, Coroutine, TypeVar

from autobahn.twisted.testing import create_memory_agent
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import FakeTransport, IOPump

from tests.realtime import Closed, WireSocket

# Where the client appears to be, as create_memory_agent makes it.
CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 31337)
WEBSOCKET_URL = "ws://127.0.0.1/socket.io/?EIO=4&transport=websocket"

# Why a client was disconnected: the values python-socketio's Client.reason
# has, so a test reads the same on either client.
SERVER_DISCONNECT = "server disconnect"
CLIENT_DISCONNECT = "client disconnect"
TRANSPORT_ERROR = "transport error"

_ACK_ID = re.compile(r"\d*")
T = TypeVar("T")


def _deferred(method: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., Deferred[T]]:
    # A Deferred, as SioClient's calls answer: tests gather them in a
    # DeferredList.
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Deferred[T]:
        return Deferred.fromCoroutine(method(*args, **kwargs))
    return wrapper


class EagerPumper:
    """An IPumper for create_memory_agent (``add``, ``start``, ``stop``)
    that flushes a connection on the reactor's next turn after either end
    wrote to it or closed it, rather than every 0.1 s. Not at once, inside
    ``write``: a protocol would then receive while it is still sending."""

    def __init__(self, reactor: Any = global_reactor) -> None:
        self._reactor = reactor
        self._pumps: set[IOPump] = set()
        self._call: Any = None
        self._stopped = False

    def add(self, pump: IOPump) -> None:
        self._pumps.add(pump)
        for transport in (pump.clientIO, pump.serverIO):
            self._watch(transport)
        self._soon()

    def _watch(self, transport: FakeTransport) -> None:
        # FakeTransport has no hook of its own for "something was written";
        # writeSequence, stopProducing and stopConsuming go through these.
        for name in ("write", "loseConnection", "abortConnection"):
            original = getattr(transport, name)

            def watched(*args: Any, _original: Callable[..., None] = original) -> None:
                _original(*args)
                self._soon()
            setattr(transport, name, watched)

    def _soon(self) -> None:
        if self._call is None and not self._stopped:
            self._call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._call = None
        for pump in list(self._pumps):
            pump.flush()
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self._pumps.discard(pump)

    def start(self) -> None:
        """Nothing to start: writes start the flushes."""

    def stop(self) -> Deferred[None]:
        """Flush what is left, once, and schedule nothing more (a test's
        last cleanup, after the server has stopped)."""
        self._stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        for pump in list(self._pumps):
            pump.flush()
        self._pumps.clear()
        return succeed(None)


class MemoryConnector:
    """Opens in-memory WebSockets to ``server`` (tests.helpers.start_server),
    through its site, moved by ``pumper``."""

    def __init__(self, server: Any, pumper: EagerPumper) -> None:
        self.server = server
        # The client's end runs on a memory reactor: its own timers (the
        # handshake and close timeouts) never fire; the server's run as
        # they do in production.
        self._agent = create_memory_agent(MemoryReactorClock(), pumper, self._server_protocol)

    def _server_protocol(self) -> Any:
        return self.server.site.buildProtocol(CLIENT_ADDRESS)

    def open(self, url: str = WEBSOCKET_URL) -> Deferred[WireSocket]:
        """A WebSocket whose handshake has completed (it fails if the
        server refuses the upgrade)."""
        return self._agent.open(url, {}, WireSocket)


class MemorySocket:
    """
    A Socket.IO client on the main namespace, over one in-memory WebSocket.
    ``received`` is every event in arrival order, as (name, first
    argument); ``connect_errors`` the data of each CONNECT_ERROR;
    ``disconnects`` the reason of each disconnect (SERVER_DISCONNECT,
    CLIENT_DISCONNECT or TRANSPORT_ERROR); ``frames`` every frame as it
    came; ``unexpected`` the frames this client does not understand (a
    test's cleanup expects none). With ``answer_pings`` False it never
    answers the server's pings: a client whose network went away.
    """

    def __init__(self, connector: MemoryConnector, *, answer_pings: bool = True) -> None:
        self._connector = connector
        self.answer_pings = answer_pings
        self.ws: WireSocket | None = None
        self.engine_sid: str | None = None
        self.sid: str | None = None  # the Socket.IO socket's
        self.connected = False
        self.closed: Closed | None = None  # the WebSocket's close code and reason, once closed
        self.received: list[tuple[str, Any]] = []
        self.connect_errors: list[Any] = []
        self.disconnects: list[str] = []
        self.frames: list[str | bytes] = []
        self.unexpected: list[str | bytes] = []
        self._answers: dict[int, Any] = {}
        self._next_ack = 0
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []
        self._reading: Deferred[Any] | None = None

    # -- the calls of tests.realtime.SioClient --------------------------------

    @_deferred
    async def connect(self, auth: Any = None, timeout: float = 10) -> None:
        """Open the WebSocket and join the main namespace (with ``auth`` as
        the CONNECT's payload). A refusal raises ConnectionError, its data
        in ``connect_errors``; the connection is then closed."""
        self.ws = await self._connector.open()
        self.ws.ended.addCallback(self._ended)
        self._read()
        await self._until(lambda: self.engine_sid is not None or self.closed is not None,
                          "the Engine.IO OPEN packet", timeout)
        self.send_frame("40" + (_compact(auth) if auth is not None else ""))
        await self._until(lambda: self.connected or bool(self.connect_errors) or self.closed is not None,
                          "the answer to CONNECT", timeout)
        if not self.connected:
            self._hang_up()
            raise ConnectionError(f"not connected: {self.connect_errors or self.closed}")

    def emit(self, event: str, data: Any = None) -> Deferred[None]:
        """Send an event with no ack (already sent when this returns)."""
        self.send_frame("42" + _compact(_arguments(event, data)))
        return succeed(None)

    @_deferred
    async def call(self, event: str, data: Any = None, timeout: float = 10) -> Any:
        """Send an event with an ack and answer the ack's argument (a list
        when there are several), as python-socketio's ``call`` does."""
        ack_id = self._next_ack
        self._next_ack += 1
        self.send_frame(f"42{ack_id}" + _compact(_arguments(event, data)))
        await self._until(lambda: ack_id in self._answers or self.closed is not None,
                          f"the answer to {event!r}", timeout)
        if ack_id not in self._answers:
            raise ConnectionError(f"disconnected before the answer to {event!r}")
        answer = self._answers.pop(ack_id)
        return answer[0] if len(answer) == 1 else answer

    @_deferred
    async def barrier(self) -> None:
        """Every frame the server sent this socket before now has arrived.

        An event with an ack that the server does not know (it has no other
        effect; before authentication it is refused all the same) is
        answered after everything already written to this socket, and
        frames arrive in order: once the answer is here, so is all that
        came before it."""
        answer = await self.call("no_such_event", {})
        assert isinstance(answer, dict) and answer.get("success") is False, answer

    @_deferred
    async def disconnect(self, timeout: float = 10) -> None:
        """Leave the namespace (DISCONNECT), close the Engine.IO session
        and the WebSocket, and wait until the WebSocket is closed."""
        if self.connected:
            self.send_frame("41")
            self._disconnected(CLIENT_DISCONNECT)
        self._hang_up()
        if self.ws is not None:
            await self.ws.wait_closed(timeout)

    def events(self, name: str) -> list[Any]:
        return [data for event, data in self.received if event == name]

    @_deferred
    async def wait_for(self, name: str, count: int = 1, timeout: float = 10) -> list[Any]:
        """Wait until ``count`` events ``name`` have arrived; answer them all."""
        await self._until(lambda: len(self.events(name)) >= count,
                          f"{count} {name!r} events", timeout)
        return self.events(name)

    @_deferred
    async def wait_disconnected(self, timeout: float = 10) -> str:
        """Wait for the first disconnect; answer its reason."""
        await self._until(lambda: bool(self.disconnects), "a disconnect", timeout)
        return self.disconnects[0]

    # -- the wire -------------------------------------------------------------

    def send_frame(self, text: str) -> None:
        """Send one Engine.IO text frame as it is (for tests that write
        something by hand)."""
        assert self.ws is not None, "not connected"
        self.ws.send_text(text)

    def _read(self) -> None:
        ws = self.ws
        assert ws is not None
        while ws.frames.pending:  # what came with the handshake
            self._frame(ws.frames.pending.pop(0))
        self._reading = ws.frames.get()
        self._reading.addCallbacks(self._got, lambda f: f.trap(CancelledError))

    def _got(self, frame: str | bytes) -> None:
        self._frame(frame)
        self._read()

    def _frame(self, frame: str | bytes) -> None:
        self.frames.append(frame)
        if isinstance(frame, bytes) or not frame:
            self.unexpected.append(frame)
        elif frame[0] == "0":  # OPEN
            self.engine_sid = json.loads(frame[1:])["sid"]
        elif frame == "2":  # PING
            if self.answer_pings:
                self.send_frame("3")
        elif frame == "1":  # CLOSE: the server ends the session
            self._disconnected(SERVER_DISCONNECT)
        elif frame[0] == "4":  # MESSAGE: a Socket.IO packet
            self._packet(frame[1:])
        else:
            self.unexpected.append(frame)
        self._changed()

    def _packet(self, text: str) -> None:
        kind, rest = text[:1], text[1:]
        digits = _ACK_ID.match(rest).group()  # type: ignore[union-attr]
        ack_id, rest = (int(digits) if digits else None), rest[len(digits):]
        if rest.startswith("/"):  # only the main namespace is joined
            self.unexpected.append("4" + text)
            return
        payload = json.loads(rest) if rest else None
        if kind == "0" and isinstance(payload, dict):  # CONNECT: accepted
            self.connected = True
            self.sid = payload.get("sid")
        elif kind == "4":  # CONNECT_ERROR
            self.connect_errors.append(payload)
        elif kind == "1":  # DISCONNECT: the server ends the socket
            self._disconnected(SERVER_DISCONNECT)
            # As the stock client does with its last namespace gone.
            self._hang_up()
        elif kind == "2" and isinstance(payload, list) and payload:  # EVENT
            self.received.append((payload[0], payload[1] if len(payload) > 1 else None))
            if ack_id is not None:  # the server asks for an ack: an empty one
                self.send_frame(f"43{ack_id}[]")
        elif kind == "3" and ack_id is not None and isinstance(payload, list):  # ACK
            self._answers[ack_id] = payload
        else:
            self.unexpected.append("4" + text)

    def _disconnected(self, reason: str) -> None:
        if self.connected:
            self.connected = False
            self.disconnects.append(reason)

    def _hang_up(self) -> None:
        ws = self.ws
        if ws is not None and ws.state == ws.STATE_OPEN:
            # An Engine.IO CLOSE first: the session ends now, rather than at
            # the server's ping timeout.
            ws.send_text("1")
            ws.sendClose(1000)

    def _ended(self, closed: Closed) -> Closed:
        self.closed = closed
        self._disconnected(TRANSPORT_ERROR)
        if self._reading is not None and not self._reading.called:
            self._reading.cancel()
        self._changed()
        return closed

    # -- waiting --------------------------------------------------------------

    def _changed(self) -> None:
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate():
                self._waiters.remove(waiter)
                d.callback(None)

    async def _until(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        if predicate():
            return
        d: Deferred[None] = Deferred()
        waiter = (predicate, d)
        self._waiters.append(waiter)
        d.addTimeout(timeout, global_reactor)
        try:
            await d
        except (TimeoutError, CancelledError):
            raise AssertionError(f"timed out after {timeout}s waiting for {what};"
                                 f" received {[event for event, _ in self.received]}") from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _arguments(event: str, data: Any) -> list[Any]:
    # As python-socketio: no argument for None, a tuple's items as several.
    if data is None:
        return [event]
    if isinstance(data, tuple):
        return [event, *data]
    return [event, data]
