"""
The one place where Cyphr reaches into its frameworks' private parts.

Twisted, Autobahn, txpostgres (and, for the reference client,
python-socketio and python-engineio) keep some names private that we need:
there is no public way to ask whether a request's connection is gone, to
learn the port a listening service got, or to run a statement through a
txpostgres connection's lock and dead-connection detector. Every such name
is reached through an accessor below, named for what it does, which says
the version it was checked against and why no public way exists. Nothing
else in Cyphr reads a framework's private name.

Three tables record the rest, and ``tests.test_compat`` checks each one
against the installed versions:

- ``PRIVATE_NAMES``: every private framework name Cyphr relies on, read
  here or overridden by a subclass elsewhere (an override stays in its
  class; it is listed here so that an upgrade checks it too). Owners are
  dotted names, so that nothing is imported for the table's sake.
- ``COPIED``: framework functions whose code Cyphr copies (a method
  re-implemented with a change) or whose inner workings it depends on,
  with a digest of their source as last read. A new release that changes
  one fails the test until someone re-reads it and ports the change.
- ``CHECKED_AGAINST``: the versions all this was checked against; the
  upper bounds in setup.cfg are these versions.

The upgrade procedure is in docs/development.rst.
"""

from __future__ import annotations

import hashlib
import inspect
import socket
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from twisted.internet import tcp
from twisted.internet.defer import Deferred

# The versions every accessor, table entry and digest below was checked
# against (see docs/development.rst before changing one). Klein has no
# private name here, but cyphr.api.http.ApiRouter does its dispatch (COPIED).
CHECKED_AGAINST: dict[str, str] = {
    "Twisted": "26.10.0",
    "autobahn": "26.11.1",
    "txpostgres": "1.7.0",
    "klein": "24.8.0",
    "python-socketio": "5.18.1",
    "python-engineio": "4.15.1",
    "treq": "26.7.0",
}


@dataclass(frozen=True)
class PrivateName:
    """One private framework name Cyphr relies on."""

    owner: str         # dotted name of the class or module that holds it
    name: str
    used_by: str       # where Cyphr uses it
    why: str           # why no public name does
    on_instance: bool = False  # set on instances (by __init__ or later), not on the class
    override: bool = False     # a Cyphr subclass overrides it


@dataclass(frozen=True)
class Copied:
    """A framework function whose code Cyphr copies, or whose inner
    workings it depends on, with the digest of its source when last read."""

    function: str      # dotted name
    digest: str        # source_digest() of it, as last read
    used_by: str
    why: str


def source_digest(function: Any) -> str:
    """A short digest of a function's source: it changes when the code does."""
    source = textwrap.dedent(inspect.getsource(function))
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


# -- Twisted: services -------------------------------------------------------


def port_deferred(service: Any) -> Deferred[Any] | None:
    """The Deferred of a StreamServerEndpointService's listening port: None
    before the service starts, then firing with the port once it listens.

    Twisted 26.10.0: ``_waitingForPort``. Twisted offers no public way to
    learn the port a service listens on (needed to log it, and by tests
    that listen on port 0)."""
    return service._waitingForPort


# -- Twisted: HTTP ----------------------------------------------------------


def request_gone(request: Any) -> bool:
    """Whether a request's connection was lost (what is written to it is
    dropped, and its finish() raises RuntimeError).

    Twisted 26.10.0: ``Request._disconnected``, set by connectionLost; the
    public way (``notifyFinish()`` failing) is an event, not a state one
    can ask for at the moment of writing."""
    return request._disconnected


def handle_star(request: Any) -> None:
    """Answer an ``OPTIONS *`` request (200, or 405 for any other method
    on ``*``) as Twisted's own ``Request.process`` does.

    Twisted 26.10.0: ``server.Request._handleStar``, needed by a request
    class that re-implements ``process`` (see COPIED)."""
    request._handleStar()


def request_line(channel: Any) -> tuple[bytes, bytes]:
    """The method and URI of the request an HTTP channel is reading, as
    received (``b""`` before its request line has arrived).

    Twisted 26.10.0: ``HTTPChannel._command`` and ``_path``. A request
    whose body is refused before its headers are complete has no ``method``
    or ``uri`` of its own yet; the channel has them."""
    return getattr(channel, "_command", b""), getattr(channel, "_path", b"")


def set_aborting_call(channel: Any, call: Any) -> None:
    """Record (or, with None, forget) the delayed call that will abort a
    timed-out HTTP channel, so that the channel cancels it when the
    connection goes first.

    Twisted 26.10.0: ``HTTPChannel._abortingCall``, read by its
    ``connectionLost``; needed by a channel that re-implements
    ``timeoutConnection`` and ``forceAbortClient`` (see COPIED)."""
    channel._abortingCall = call


# -- Twisted: TCP transports ------------------------------------------------


def plain_tcp_socket(transport: Any) -> socket.socket | None:
    """The socket of a plain (not TLS) TCP server connection, to write to
    directly; None for anything else.

    Twisted 26.10.0: ``tcp.Server.TLS`` (from the private module
    ``twisted.internet._newtls``) is True once ``startTLS`` has run, when
    bytes written to the socket would bypass the TLS layer. A transport of
    ``ssl:`` endpoints is a TLSMemoryBIOProtocol, not a tcp.Server."""
    if type(transport) is tcp.Server and not transport.TLS:
        return transport.getHandle()
    return None


def transport_idle(transport: Any) -> bool:
    """Whether a connected TCP transport has nothing waiting to be written,
    so that bytes sent on its socket now arrive in order.

    Twisted 26.10.0: ``FileDescriptor._tempDataBuffer`` (what write()
    buffered since the last doWrite), ``dataBuffer`` (what doWrite has yet
    to send) and ``_writeDisconnected`` (the write side is shut). Twisted
    has no public "is the write buffer empty"; see COPIED for doWrite."""
    return bool(transport.connected and not transport.disconnecting
                and not transport._writeDisconnected and not transport.dataBuffer
                and not transport._tempDataBuffer)


# -- Autobahn ---------------------------------------------------------------

# Autobahn's data path without its Twisted adapter, whose dataReceived
# formats a debug line (with colours) for every read, logged or not.
# Autobahn 26.11.1: WebSocketProtocol._dataReceived, the framework-neutral
# half that the adapter's public dataReceived calls (see COPIED). Assign it
# as a protocol's ``dataReceived``: it takes (self, data).
websocket_data_received: Callable[[Any, bytes], None] = WebSocketProtocol._dataReceived


def websocket_between_messages(protocol: Any) -> bool:
    """Whether an open Autobahn WebSocket holds no incoming bytes and is in
    no frame or fragmented message, so that the next bytes read begin a
    frame and may be parsed by someone else (cyphr.realtime.frames) until
    the first frame that one leaves to Autobahn.

    Autobahn 26.11.1: ``data`` (bytes read and not yet processed),
    ``current_frame`` (the frame being read) and ``inside_message`` (a
    fragmented message is being read), the state of ``processData`` (see
    COPIED); none is public."""
    return (protocol.state == WebSocketProtocol.STATE_OPEN and not protocol.data
            and protocol.current_frame is None and not protocol.inside_message)


# What Autobahn keeps of the opening handshake on each connection and never
# reads once the connection is open. Autobahn 26.11.1 (``_wskey`` is private).
HANDSHAKE_RECORDS: tuple[str, ...] = (
    "http_headers", "http_request_data", "http_response_data", "http_request_params",
    "http_status_line", "http_request_uri", "http_request_path", "http_request_host",
    "_wskey", "websocket_origin", "websocket_protocols", "websocket_extensions",
)
# Traffic counters nobody reads, shared rather than kept per connection.
_SHARED_TRAFFIC_STATS = TrafficStats()


def slim_websocket(protocol: Any) -> None:
    """Drop what Autobahn keeps per open connection and never uses again:
    the handshake records, the per-connection traffic counters and the
    UTF-8 validator (incoming text must be validated by the protocol
    itself, with ``utf8validateIncoming=False``). An idle connection then
    costs little memory.

    Autobahn 26.11.1: the records are instance attributes set during the
    handshake (HANDSHAKE_RECORDS); ``trafficStats`` is only added to, and
    ``utf8validator`` only used when ``utf8validateIncoming`` is on.
    Autobahn has no public way to release them."""
    attributes = protocol.__dict__
    for name in HANDSHAKE_RECORDS:
        attributes.pop(name, None)
    protocol.trafficStats = _SHARED_TRAFFIC_STATS
    protocol.utf8validator = None


# -- txpostgres -------------------------------------------------------------


def locked_call(connection: Any, method: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run ``method(*args)`` on a txpostgres connection the way its own
    runQuery does: under the connection's lock (one statement at a time)
    and through its dead-connection detector (failing at once with
    ConnectionDead while it reconnects, and starting the reconnection when
    the call fails for a dead connection).

    txpostgres 1.7.0: ``Connection._doit``. The public runQuery and
    runOperation answer either the rows or nothing; a statement whose rows
    and row count are both wanted has no public way."""
    return connection._doit(method, *args)


# -- the tables -------------------------------------------------------------

PRIVATE_NAMES: tuple[PrivateName, ...] = (
    PrivateName("twisted.application.internet.StreamServerEndpointService", "_waitingForPort",
                "cyphr.server (port_deferred)", "no public way to the listening port",
                on_instance=True),
    # No accessor: cyphr.server builds its endpoint services with the public
    # twisted.application.strports.service(), which sets it; what is relied
    # on is what it does (a start that cannot listen raises), checked here.
    PrivateName("twisted.application.internet.StreamServerEndpointService", "_raiseSynchronously",
                "cyphr.server (through strports.service)",
                "a port that cannot be bound must fail the start, not only be logged"),
    PrivateName("twisted.web.http.Request", "_disconnected",
                "cyphr.realtime.engine (request_gone)", "no public state for a lost connection"),
    PrivateName("twisted.web.server.Request", "_handleStar",
                "cyphr.api.http (handle_star)", "CyphrRequest.process re-implements process"),
    PrivateName("twisted.web.http.HTTPChannel", "_command",
                "cyphr.api.http (request_line)", "a refused body has no request of its own yet",
                on_instance=True),
    PrivateName("twisted.web.http.HTTPChannel", "_path",
                "cyphr.api.http (request_line)", "a refused body has no request of its own yet",
                on_instance=True),
    PrivateName("twisted.web.http.HTTPChannel", "_abortingCall",
                "cyphr.api.http (set_aborting_call)",
                "_Channel re-implements timeoutConnection and forceAbortClient"),
    PrivateName("twisted.internet.tcp.Server", "TLS",
                "cyphr.realtime.engine (plain_tcp_socket)",
                "from the private twisted.internet._newtls: was startTLS called"),
    PrivateName("twisted.internet.abstract.FileDescriptor", "_writeDisconnected",
                "cyphr.realtime.engine (transport_idle)", "no public write-buffer state"),
    PrivateName("twisted.internet.abstract.FileDescriptor", "_tempDataBuffer",
                "cyphr.realtime.engine (transport_idle)", "no public write-buffer state",
                on_instance=True),
    PrivateName("autobahn.websocket.protocol.WebSocketProtocol", "_dataReceived",
                "cyphr.realtime.engine (websocket_data_received)",
                "the public dataReceived formats a debug line per read"),
    PrivateName("autobahn.twisted.websocket.WebSocketServerProtocol", "data",
                "cyphr.realtime.engine (websocket_between_messages)",
                "no public state of the frame parser", on_instance=True),
    PrivateName("autobahn.twisted.websocket.WebSocketServerProtocol", "current_frame",
                "cyphr.realtime.engine (websocket_between_messages)",
                "no public state of the frame parser", on_instance=True),
    PrivateName("autobahn.twisted.websocket.WebSocketServerProtocol", "inside_message",
                "cyphr.realtime.engine (websocket_between_messages)",
                "no public state of the frame parser", on_instance=True),
    PrivateName("autobahn.twisted.websocket.WebSocketServerProtocol", "_wskey",
                "cyphr.realtime.engine (slim_websocket)", "no public way to release it",
                on_instance=True),
    # Not underscored, but internal by Autobahn's own word: a message over a
    # session's frame limit is refused from its frame header with close 1009
    # and without Autobahn's per-connection warning line.
    PrivateName("autobahn.websocket.protocol.WebSocketProtocol", "sendCloseFrame",
                "cyphr.realtime.engine (EngineWebSocket.onMessageFrameBegin)",
                "the public sendClose refuses 1009 as a code an application may send"),
    PrivateName("autobahn.twisted.websocket.WebSocketServerProtocol", "failedByMe",
                "cyphr.realtime.engine (EngineWebSocket.onMessageFrameBegin)",
                "makes Autobahn discard the rest of a refused message", on_instance=True),
    PrivateName("txpostgres.txpostgres.Connection", "_doit",
                "cyphr.db.postgres (locked_call)",
                "no public call that answers both rows and row count"),
    # Overridden by the reference client (cyphr.client.realtime), not read here.
    PrivateName("engineio.client.Client", "_trigger_event",
                "cyphr.client.realtime._InOrderEngineIO (override, run_async=False)",
                "the stock client handles messages in threads, out of order; no option",
                override=True),
    PrivateName("engineio.client.Client", "_reset",
                "cyphr.client.realtime._InOrderEngineIO (override: the send queue reopened)",
                "the only point where the stock client ends a connection, every way it ends",
                override=True),
    PrivateName("websocket.WebSocket", "_send",
                "cyphr.client.realtime._OneAtATimeTLS (override: TLS written under a lock)",
                "every write of the stock WebSocket goes through it; no option serialises TLS",
                override=True),
    PrivateName("websocket.WebSocket", "_recv",
                "cyphr.client.realtime._OneAtATimeTLS (override: TLS read under a lock)",
                "every read of the stock WebSocket goes through it; no option serialises TLS",
                override=True),
    PrivateName("socketio.client.Client", "_engineio_client_class",
                "cyphr.client.realtime.OrderedClient (override)",
                "the only way to give socketio.Client another Engine.IO client",
                override=True),
    # Read by the tests' in-process HTTP client, to serve with a CyphrSite.
    PrivateName("treq.testing.StubTreq", "_agent", "tests.helpers.InProcessHTTP",
                "no public way to the agent", on_instance=True),
    PrivateName("treq.testing.RequestTraversalAgent", "_serverFactory",
                "tests.helpers.InProcessHTTP", "the agent always builds a plain Site",
                on_instance=True),
    PrivateName("treq.testing.RequestTraversalAgent", "_memoryReactor",
                "tests.helpers.InProcessHTTP", "the Site must run on the agent's reactor",
                on_instance=True),
)

COPIED: tuple[Copied, ...] = (
    Copied("twisted.web.server.Request.process", "f053ddf554a55988",
           "cyphr.api.http.CyphrRequest.process",
           "re-implemented: the site's policy first, no version in the Server header"),
    Copied("twisted.web.http.HTTPChannel.timeoutConnection", "c8ce2d29bf0f610b",
           "cyphr.api.http._Channel.timeoutConnection",
           "copied without the line that logs the client's address"),
    Copied("twisted.web.http.HTTPChannel.forceAbortClient", "b25893adbb372c94",
           "cyphr.api.http._Channel.forceAbortClient",
           "copied without the line that logs the client's address"),
    Copied("klein._resource.KleinResource.render", "ee49fe5f26105e1e",
           "cyphr.api.http.ApiRouter",
           "dispatch as Klein's does (url_map, then execute_endpoint), one map for every app"),
    Copied("twisted.internet.abstract.FileDescriptor.doWrite", "33b469b3af894e6a",
           "cyphr._compat.transport_idle",
           "what the write buffers mean: both empty means every byte written was sent"),
    Copied("autobahn.websocket.protocol.WebSocketProtocol.sendData", "88f768f8c9b62cf0",
           "cyphr.realtime.engine.EngineWebSocket.sendData",
           "copied without its debug line, writing to the socket at once"),
    Copied("autobahn.websocket.protocol.WebSocketProtocol.processData", "3ac2ab517b34f9a9",
           "cyphr.realtime.frames.next_message",
           "its checks of a frame, done again for the single-frame messages taken directly"),
    Copied("autobahn.websocket.protocol.WebSocketProtocol.onFrameBegin", "161ff150172669a1",
           "cyphr.realtime.engine.EngineWebSocket.dataReceived",
           "the frame size limit, applied again to the messages taken directly"),
    Copied("autobahn.websocket.protocol.WebSocketProtocol.onFrameEnd", "f57900e043ef1c92",
           "cyphr.realtime.engine.EngineWebSocket.dataReceived",
           "what a data frame's end does besides delivering the message (counters, logs)"),
    Copied("autobahn.websocket.protocol.WebSocketProtocol.onMessageEnd", "dd5576273c0ab839",
           "cyphr.realtime.engine.EngineWebSocket.dataReceived",
           "what a message's end does besides onMessage (observers, which Cyphr has none of)"),
    Copied("autobahn.websocket.protocol.WebSocketProtocol.sendMessage", "5e4d3a7310f344af",
           "cyphr.realtime.engine.EngineWebSocket.send_packet (cyphr.realtime.frames.frame)",
           "the checks and framing of an unfragmented, uncompressed message, done directly"),
    Copied("autobahn.websocket.protocol.WebSocketProtocol.sendFrame", "45ce8bfe17782817",
           "cyphr.realtime.frames.frame", "a server frame's header, written directly"),
    Copied("autobahn.twisted.websocket.WebSocketAdapterProtocol.dataReceived", "cae10a3e11a44d02",
           "cyphr.realtime.engine.EngineWebSocket.dataReceived (websocket_data_received)",
           "replaced by what it calls, without its debug line"),
    Copied("txpostgres.reconnection.DeadConnectionDetector.checkForDeadConnection",
           "43a8ffcb55728801", "cyphr.db.postgres._Detector.startReconnecting",
           "called once per death (connectionIsDead set first), which the override relies on"),
    Copied("txpostgres.txpostgres.Connection.checkForNotifies", "c3ce99f6d2d02a6b",
           "cyphr.db.postgres._InOrder",
           "the cooperator is only asked to cooperate(iterator) over the notifications"),
    Copied("txpostgres.txpostgres.Connection.doRead", "43f6ab2705a3d474",
           "cyphr.db.postgres._Connection.doRead",
           "psycopg2 errors raised from it, and re-adding a closed socket, are turned quiet"),
    Copied("engineio.client.Client._receive_packet", "d57e07eba86a6939",
           "cyphr.client.realtime._InOrderEngineIO",
           "messages are triggered with run_async=True, which the override turns off"),
    Copied("engineio.client.Client._write_loop", "4a231f0491587c3e",
           "cyphr.client.realtime._EndKeepingQueue",
           "it drops a None drained behind packets and waits again while connected; "
           "the queue answers None to that wait"),
)
