"""
The private framework names Cyphr relies on (cyphr._compat) still exist and
behave as assumed, on the installed Twisted, Autobahn, txpostgres,
python-socketio and python-engineio; the framework code Cyphr copies has
not changed since it was read; and setup.cfg allows no version newer than
the ones this was checked against.

When one of these fails after an upgrade, follow docs/development.rst.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pkgutil
import re
import socket
import threading
from typing import Any, Callable

import engineio
import psycopg2
import socketio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor as global_reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from twisted.trial.unittest import TestCase
from twisted.web import http, resource, server
from twisted.web.test.requesthelper import DummyChannel
from treq.testing import RequestTraversalAgent, StubTreq
from txpostgres import txpostgres
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector

import cyphr
from cyphr import _compat
from tests.processes import REPO

FRAMEWORKS = ("twisted", "autobahn", "txpostgres", "klein", "engineio", "socketio")


# -- instances, made cheaply, for the names set on instances ----------------


def _listening_service(test: TestCase) -> Any:
    service = StreamServerEndpointService(TCP4ServerEndpoint(MemoryReactor(), 0), Factory())
    service.startService()
    test.addCleanup(service.stopService)
    return service


def _channel_after_request_line(test: TestCase) -> Any:
    channel = http.HTTPChannel()
    channel.callLater = Clock().callLater  # its idle timeout, off the real reactor
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"POST /socket.io/?EIO=4&sid=abc HTTP/1.1\r\n")
    test.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
    return channel


def _file_descriptor(test: TestCase) -> Any:
    return FileDescriptor(reactor=MemoryReactor())


class _Recorder(WebSocketServerProtocol):
    received: list[tuple[bytes, bool]]

    def onOpen(self) -> None:
        self.received = []

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append((payload, isBinary))


HANDSHAKE = (b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: localhost\r\n"
             b"Upgrade: websocket\r\nConnection: Upgrade\r\nOrigin: https://chat.example\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def open_websocket(test: TestCase) -> tuple[_Recorder, StringTransport]:
    """A server WebSocket whose opening handshake has completed, over an
    in-memory transport, configured as cyphr.realtime.engine configures its
    own (no timers: nothing is left on the reactor)."""
    factory = WebSocketServerFactory()
    factory.protocol = _Recorder
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0,
                               autoPingInterval=0, utf8validateIncoming=False, failByDrop=False)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    _compat.websocket_data_received(protocol, HANDSHAKE)
    test.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
    return protocol, transport


INSTANCES: dict[str, Callable[[TestCase], Any]] = {
    "twisted.application.internet.StreamServerEndpointService": _listening_service,
    "twisted.web.http.HTTPChannel": _channel_after_request_line,
    "twisted.internet.abstract.FileDescriptor": _file_descriptor,
    "autobahn.twisted.websocket.WebSocketServerProtocol": lambda test: open_websocket(test)[0],
    "treq.testing.StubTreq": lambda test: StubTreq(resource.Resource()),
    "treq.testing.RequestTraversalAgent": lambda test: RequestTraversalAgent(resource.Resource()),
}


def _masked_text_frame(payload: bytes) -> bytes:
    """One client-to-server WebSocket text frame (clients must mask)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    return (bytes([0x81, 0x80 | len(payload)]) + mask
            + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload)))


# -- the tables ---------------------------------------------------------------


@functools.cache  # a framework class is the base of several of Cyphr's: read once
def _assigned_names(cls: type) -> frozenset[str]:
    """The names a class defines: in its body, and as ``self.<name> =``
    (or an annotated assignment) in its methods."""
    names = frozenset(vars(cls))
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return names
    return names | set(re.findall(r"\bself\.([A-Za-z_]\w*)\s*(?::[^=\n]+)?=(?!=)", source))


def _cyphr_classes() -> list[type]:
    """Every class defined in a module of the cyphr package."""
    classes = []
    for info in pkgutil.walk_packages(cyphr.__path__, "cyphr."):
        module = importlib.import_module(info.name)
        classes.extend(value for value in vars(module).values()
                       if inspect.isclass(value) and value.__module__ == module.__name__)
    return classes


def _is_framework(cls: type) -> bool:
    return cls.__module__.split(".")[0] in FRAMEWORKS


class TableTests(TestCase):
    """PRIVATE_NAMES and COPIED hold for the installed versions."""

    def test_private_names_on_classes_exist(self) -> None:
        """Every private name Cyphr reads from a framework class or module
        (or overrides in a subclass) is still there."""
        missing = [f"{entry.owner}.{entry.name} (used by {entry.used_by})"
                   for entry in _compat.PRIVATE_NAMES
                   if not entry.on_instance and not hasattr(namedAny(entry.owner), entry.name)]
        self.assertEqual(missing, [], "private names gone: see docs/development.rst")

    def test_private_names_on_instances_exist(self) -> None:
        """Every private name Cyphr reads from framework instances is set
        on an instance made as Cyphr makes it (a listening service, a
        channel that read a request line, a descriptor, an open WebSocket)."""
        missing = []
        for entry in _compat.PRIVATE_NAMES:
            if not entry.on_instance:
                continue
            self.assertIn(entry.owner, INSTANCES,
                          f"no way to make a {entry.owner} in this test: add one to INSTANCES")
            if entry.name not in vars(INSTANCES[entry.owner](self)):
                missing.append(f"{entry.owner}().{entry.name} (used by {entry.used_by})")
        self.assertEqual(missing, [], "private names gone: see docs/development.rst")

    def test_overrides_are_methods(self) -> None:
        """Each framework-private method Cyphr overrides is still a method
        of the framework class (else the override is dead code)."""
        for entry in _compat.PRIVATE_NAMES:
            if entry.override:
                self.assertTrue(callable(getattr(namedAny(entry.owner), entry.name, None)),
                                f"{entry.owner}.{entry.name} is no longer a method")

    def test_subclasses_touch_no_unlisted_private_name(self) -> None:
        """A Cyphr subclass of a framework class defines no private name the
        framework class also has, unless PRIVATE_NAMES lists it as an
        override: an unlisted one is an accidental clash (or an unlisted
        override) that a framework upgrade could break silently."""
        listed = {(namedAny(entry.owner), entry.name) for entry in _compat.PRIVATE_NAMES
                  if entry.override}
        clashes = []
        for cls in _cyphr_classes():
            frameworks = [base for base in cls.__mro__ if _is_framework(base)]
            if not frameworks:
                continue
            theirs = {base: _assigned_names(base) for base in frameworks}
            for name in sorted(_assigned_names(cls)):
                if not name.startswith("_") or name.startswith("__"):
                    continue
                owners = [base for base in frameworks if name in theirs[base]]
                if owners and not any((base, name) in listed for base in owners):
                    clashes.append(f"{cls.__module__}.{cls.__qualname__}.{name} "
                                   f"(also on {owners[0].__module__}.{owners[0].__qualname__})")
        self.assertEqual(clashes, [])

    def test_copied_code_unchanged(self) -> None:
        """The framework functions Cyphr copies, or whose inner workings it
        relies on, have the source they had when last read."""
        changed = []
        for entry in _compat.COPIED:
            digest = _compat.source_digest(namedAny(entry.function))
            if digest != entry.digest:
                changed.append(f"{entry.function} (digest now {digest}): re-read it and "
                               f"update {entry.used_by} ({entry.why})")
        self.assertEqual(changed, [], "framework code changed: see docs/development.rst")

    def test_upper_bounds_are_the_checked_versions(self) -> None:
        """setup.cfg allows each framework whose private names Cyphr uses up
        to the version they were checked against, and no further."""
        with open(os.path.join(REPO, "setup.cfg"), encoding="utf-8") as f:
            text = f.read()
        for package, version in _compat.CHECKED_AGAINST.items():
            found = re.search(rf"^\s*{re.escape(package)}(\[[\w,]+\])?\s*(?P<spec>[^#\n]*)$", text,
                              re.IGNORECASE | re.MULTILINE)
            self.assertIsNotNone(found, f"{package} is not a requirement in setup.cfg")
            bounds = [part.strip().replace(" ", "") for part in found["spec"].split(",")]
            self.assertIn(f"<={version}", bounds, f"{package}: {found['spec']}")


# -- Twisted ----------------------------------------------------------------


class _RefusingEndpoint:
    def listen(self, factory: Any) -> Deferred[Any]:
        return fail(CannotListenError("127.0.0.1", 1, OSError("in use")))


class TwistedTests(TestCase):
    """The behaviour assumed of Twisted's private names."""

    def test_port_deferred(self) -> None:
        """A StreamServerEndpointService's port Deferred is None before it
        starts, then fires with the listening port."""
        reactor = MemoryReactor()
        service = StreamServerEndpointService(TCP4ServerEndpoint(reactor, 0), Factory())
        self.assertIsNone(_compat.port_deferred(service))
        service.startService()
        self.addCleanup(service.stopService)
        port = self.successResultOf(_compat.port_deferred(service))
        self.assertEqual(port.getHost().port, reactor.tcpServers[0][0])

    def test_raise_synchronously(self) -> None:
        """A service with ``_raiseSynchronously`` set raises from its start
        when its endpoint cannot listen (what cyphr.server sets, and what
        strports.service sets publicly); without it the error is only logged."""
        service = StreamServerEndpointService(_RefusingEndpoint(), Factory())
        service._raiseSynchronously = True
        self.assertRaises(CannotListenError, service.privilegedStartService)
        self.assertTrue(strports.service("tcp:0", Factory())._raiseSynchronously)
        quiet = StreamServerEndpointService(_RefusingEndpoint(), Factory())
        quiet.privilegedStartService()
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)

    def test_request_gone(self) -> None:
        """A request is gone once its connection is lost, not before."""
        request = http.Request(DummyChannel())
        self.assertFalse(_compat.request_gone(request))
        request.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(_compat.request_gone(request))

    def test_handle_star(self) -> None:
        """``OPTIONS *`` is answered 200 with an empty body; another method
        on ``*`` 405 with ``Allow: OPTIONS``."""
        for method, code, allow in ((b"OPTIONS", 200, None), (b"GET", 405, [b"OPTIONS"])):
            request = server.Request(DummyChannel())
            request.method = method
            _compat.handle_star(request)
            self.assertEqual(request.code, code)
            self.assertEqual(request.responseHeaders.getRawHeaders(b"content-length"), [b"0"])
            self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), allow)
            self.assertTrue(request.finished)

    def test_request_line(self) -> None:
        """A channel holds the method and URI of the request line it read,
        before the headers are complete; empty before any."""
        channel = http.HTTPChannel()
        channel.callLater = Clock().callLater
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        self.assertEqual(_compat.request_line(channel), (b"", b""))
        channel.dataReceived(b"POST /socket.io/?EIO=4&sid=abc HTTP/1.1\r\nContent-Le")
        self.assertEqual(_compat.request_line(channel), (b"POST", b"/socket.io/?EIO=4&sid=abc"))

    def test_aborting_call_cancelled_when_connection_goes(self) -> None:
        """The aborting call recorded on a channel is cancelled when its
        connection is lost first."""
        clock = Clock()
        channel = http.HTTPChannel()
        channel.callLater = clock.callLater
        channel.makeConnection(StringTransport())
        aborted: list[bool] = []
        _compat.set_aborting_call(channel, clock.callLater(5, aborted.append, True))
        channel.connectionLost(Failure(ConnectionDone()))
        clock.advance(10)
        self.assertEqual(aborted, [])

    def test_plain_tcp_socket_and_idle_transport(self) -> None:
        """A plain TCP server connection gives its socket, and is idle until
        something is written through Twisted or it is closing; a transport
        that is not a TCP server connection gives no socket."""
        self.assertIsNone(_compat.plain_tcp_socket(StringTransport()))
        accepted: Deferred[Any] = Deferred()

        class Accept(Protocol):
            def connectionMade(self) -> None:
                accepted.callback(self.transport)

        port = global_reactor.listenTCP(0, Factory.forProtocol(Accept), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)

        def check(transport: Any) -> Deferred[None]:
            self.assertIs(_compat.plain_tcp_socket(transport), transport.getHandle())
            self.assertTrue(_compat.transport_idle(transport))
            transport.write(b"queued")  # buffered until the reactor's next turn
            self.assertFalse(_compat.transport_idle(transport))
            transport.loseConnection()
            self.assertFalse(_compat.transport_idle(transport))
            gone: Deferred[None] = Deferred()
            transport.protocol.connectionLost = lambda reason: gone.callback(None)
            return gone

        return accepted.addCallback(check)


# -- Autobahn -----------------------------------------------------------------


class AutobahnTests(TestCase):
    """The behaviour assumed of Autobahn's private names."""

    def test_handshake_records_dropped_and_messages_still_received(self) -> None:
        """After the opening handshake (fed through websocket_data_received)
        each handshake record is an attribute of the connection; once
        slimmed, none is, and messages are still received."""
        protocol, transport = open_websocket(self)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "), transport.value())
        attributes = vars(protocol)
        self.assertEqual([name for name in _compat.HANDSHAKE_RECORDS if name not in attributes], [])
        self.assertIn("trafficStats", attributes)
        self.assertIn("utf8validator", attributes)
        _compat.slim_websocket(protocol)
        self.assertEqual([name for name in _compat.HANDSHAKE_RECORDS if name in vars(protocol)], [])
        _compat.websocket_data_received(protocol, _masked_text_frame(b"4hello"))
        self.assertEqual(protocol.received, [(b"4hello", False)])


# -- txpostgres ---------------------------------------------------------------


class _RecordingDetector(DeadConnectionDetector):
    def __init__(self) -> None:
        super().__init__(reactor=Clock())
        self.deaths: list[Failure] = []

    def startReconnecting(self, f: Failure) -> None:
        self.deaths.append(f)


class TxpostgresTests(TestCase):
    """The behaviour assumed of txpostgres's private names."""

    def test_locked_call(self) -> None:
        """A locked call runs under the connection's lock, fails at once
        while the detector holds the connection dead, and a failure that
        means a dead connection starts the reconnection once."""
        detector = _RecordingDetector()
        conn = txpostgres.Connection(reactor=MemoryReactor(), detector=detector)
        calls: list[int] = []

        def work(n: int) -> int:
            calls.append(n)
            return n * 2

        self.assertEqual(self.successResultOf(_compat.locked_call(conn, work, 1)), 2)
        self.successResultOf(conn.lock.acquire())
        waiting = _compat.locked_call(conn, work, 2)
        self.assertEqual(calls, [1])
        conn.lock.release()
        self.assertEqual(self.successResultOf(waiting), 4)

        def dies() -> None:
            raise psycopg2.OperationalError("server closed the connection")

        self.failureResultOf(_compat.locked_call(conn, dies), psycopg2.OperationalError)
        self.assertEqual(len(detector.deaths), 1)
        self.assertTrue(detector.connectionIsDead)
        self.failureResultOf(_compat.locked_call(conn, work, 3), ConnectionDead)
        self.assertEqual(calls, [1, 2])
        self.assertEqual(len(detector.deaths), 1)

    def test_notifications_handed_to_the_cooperator_in_order(self) -> None:
        """A connection hands its waiting notifications to its cooperator as
        one iterator, which calls the observers in arrival order."""

        class Pg:
            closed = False
            notifies = ["first", "second"]

        tasks: list[Any] = []

        class Cooperator:
            def cooperate(self, iterator: Any) -> None:
                tasks.append(iterator)

        conn = txpostgres.Connection(reactor=MemoryReactor(), cooperator=Cooperator())
        conn._connection = Pg()
        seen: list[str] = []
        conn.addNotifyObserver(seen.append)
        conn.checkForNotifies()
        self.assertEqual((len(tasks), seen), (1, []))
        for _ in tasks[0]:
            pass
        self.assertEqual(seen, ["first", "second"])


# -- python-socketio and python-engineio (the reference client) --------------


class SocketioClientTests(TestCase):
    """The behaviour assumed of the private methods the reference client
    (cyphr.client.realtime) overrides."""

    def test_trigger_event_without_run_async_runs_at_once(self) -> None:
        """engineio's _trigger_event with run_async=False runs the handler in
        the calling thread before it returns."""
        client = engineio.Client()
        threads: list[threading.Thread] = []
        client.on("message", lambda data: threads.append(threading.current_thread()))
        client._trigger_event("message", "2", run_async=False)
        self.assertEqual(threads, [threading.current_thread()])

    def test_engineio_client_class(self) -> None:
        """A socketio.Client builds its Engine.IO client from the class its
        _engineio_client_class answers."""

        class Mine(engineio.Client):
            pass

        class Client(socketio.Client):
            def _engineio_client_class(self) -> type[engineio.Client]:
                return Mine

        self.assertIs(type(Client().eio), Mine)
