"""
A lean Socket.IO v5 client (Engine.IO v4, WebSocket transport, text frames
only) for load generation: wsproto does the WebSocket framing (sans-IO), an
asyncio Protocol does the I/O.

Why not the stock python-socketio client: it spends a thread or a task and
several layers per socket, far too much for thousands of messages a second
or tens of thousands of sockets on the machine the server runs on. Why a
Protocol rather than asyncio streams: a stream needs a reader task and a
buffer copy per socket; the Protocol is the layer streams are built on, and
runs the parsing straight from the event loop's read callback.

What it speaks (socketio-protocol.md): the server's ``0{...}`` open packet
is answered with ``40<auth JSON>``; ``40{"sid":...}`` accepts,
``44{...}`` refuses; ``42[...]`` / ``42<id>[...]`` are events, ``43<id>[...]``
acks; a ping ``2`` is answered ``3`` at once, or the server would drop the
session after pingInterval + pingTimeout.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any, Callable

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

PATH = "/socket.io/?EIO=4&transport=websocket"

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads

# (client, event name, event data) / (client, ack id, ack arguments)
EventHandler = Callable[["Client", str, Any], None]
AckHandler = Callable[["Client", int, list[Any]], None]


class ConnectFailed(Exception):
    pass


class Client(asyncio.Protocol):
    """
    One Socket.IO client on the main namespace. ``ready`` resolves once the
    server accepted the CONNECT and, with ``until`` set, once that event has
    arrived too (e.g. ``sync_complete``: the server's catch-up is over).
    Events and acks go to ``on_event`` and ``on_ack``; ``closed`` resolves
    when the TCP connection ends.
    """

    __slots__ = (
        "host", "auth", "until", "on_event", "on_ack", "ws", "transport", "ready", "closed",
        "sid", "pings", "_partial", "_open", "__weakref__",
    )

    def __init__(self, host: str, auth: dict[str, Any], *, until: str | None = "sync_complete",
                 on_event: EventHandler | None = None, on_ack: AckHandler | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.host = host
        self.auth = auth
        self.until = until
        self.on_event = on_event
        self.on_ack = on_ack
        self.ws: WSConnection | None = WSConnection(ConnectionType.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.sid: str | None = None
        self.pings = 0
        self._partial: list[str] | None = None
        self._open = False

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.ws.send(Request(host=self.host, target=PATH)))  # type: ignore

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        if ws is None:
            return
        ws.receive_data(data)
        for event in ws.events():
            kind = type(event)
            if kind is TextMessage:
                if not event.message_finished:
                    if self._partial is None:
                        self._partial = []
                    self._partial.append(event.data)
                    continue
                text = event.data
                if self._partial is not None:
                    self._partial.append(text)
                    text, self._partial = "".join(self._partial), None
                self._packet(text)
            elif kind is AcceptConnection:
                self._open = True
            elif kind is Ping:
                self.transport.write(ws.send(event.response()))  # type: ignore[union-attr]
            elif kind is CloseConnection:
                if ws.state.name == "REMOTE_CLOSING":
                    self.transport.write(ws.send(event.response()))  # type: ignore[union-attr]
                self._fail(ConnectFailed(f"closed by the server: {event.code} {event.reason}"))
                self.transport.close()  # type: ignore[union-attr]
            elif kind is RejectConnection or kind is RejectData:
                self._fail(ConnectFailed(f"WebSocket refused: {getattr(event, 'status_code', '')}"))
                self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.ws = None
        self._fail(ConnectFailed(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, error: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)

    # -- Engine.IO and Socket.IO packets --------------------------------------

    def _packet(self, text: str) -> None:
        kind = text[0]
        if kind == "4":
            sub = text[1]
            if sub == "2":
                self._event(text)
            elif sub == "3":
                start = text.index("[", 2)
                if self.on_ack is not None:
                    self.on_ack(self, int(text[2:start]), _loads(text[start:]))
            elif sub == "0":
                self.sid = _loads(text[2:])["sid"]
                if self.until is None and not self.ready.done():
                    self.ready.set_result(None)
            elif sub == "4":
                self._fail(ConnectFailed(f"CONNECT refused: {text[2:]}"))
            elif sub == "1":
                self._fail(ConnectFailed("disconnected by the server"))
        elif kind == "2":
            self.pings += 1
            self.send_text("3")
        elif kind == "0":
            self.send_text("40" + _dumps(self.auth))
        elif kind == "1":
            self._fail(ConnectFailed("session closed by the server"))

    def _event(self, text: str) -> None:
        start = 2
        while text[start] != "[":
            start += 1
        args = _loads(text[start:])
        name = args[0]
        data = args[1] if len(args) > 1 else None
        if start > 2:
            # The server wants an ack: an empty one will do.
            self.send_text("43" + text[2:start] + "[]")
        if name == self.until and not self.ready.done():
            self.ready.set_result(None)
        elif self.on_event is not None:
            self.on_event(self, name, data)

    # -- sending ---------------------------------------------------------------

    def send_text(self, text: str) -> None:
        """One Engine.IO packet as one text frame (dropped once closed)."""
        ws, transport = self.ws, self.transport
        if ws is not None and transport is not None and self._open:
            transport.write(ws.send(TextMessage(data=text)))

    def emit(self, event: str, data: Any = None, ack_id: int | None = None) -> None:
        self.send_text("42" + ("" if ack_id is None else str(ack_id)) + _dumps([event, data]))

    def abort(self) -> None:
        """Drop the connection with a reset: no close handshake and no
        TIME_WAIT left behind, so that tens of thousands of sockets end
        at once and the next run finds free ports."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


async def connect(host: str, port: int, auth: dict[str, Any], *, timeout: float = 60.0,
                  local_host: str | None = None, **options: Any) -> Client:
    """A connected, ready Client; ConnectFailed or TimeoutError otherwise
    (its connection is then dropped)."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: Client(f"{host}:{port}", auth, **options), host, port,
        local_addr=(local_host, 0) if local_host else None)
    try:
        await asyncio.wait_for(asyncio.shield(client.ready), timeout)
    except BaseException:
        client.abort()
        raise
    return client
