"""
Realtime clients driven from trial tests.

``SioClient`` is the stock python-socketio client (the threaded one, over
requests and websocket-client): it runs in its own threads; what it
receives is kept in order, and tests wait for it from the reactor through
the thread pool. It does not speak the protocol through anything of ours:
that is the point.

``WireSocket`` is a bare WebSocket (Autobahn's client protocol) that shows
every frame, for tests that speak Engine.IO and Socket.IO by hand, over a
real port (tests.test_realtime_transport) or in memory
(tests.memory_socket).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.threads import deferToThread

from cyphr.client.realtime import OrderedClient
from cyphr.realtime.client_events import SENT_EVENTS

reactor.suggestThreadPoolSize(40)

# Every event the server sends (cyphr.realtime.client_events.Sent).
SERVER_EVENTS = tuple(sorted(SENT_EVENTS))


class SioClient:
    """One stock client; ``received`` is every event in arrival order."""

    def __init__(self, url: str, *, transports: list[str] | None = None, **options: Any) -> None:
        self.url = url
        self.transports = transports
        # options: socketio.Client's own (http_session=... for TLS trust).
        # In arrival order: the stock client runs each message's handler in
        # a thread of its own, which can record two events out of order.
        self.sio = OrderedClient(reconnection=False, **options)
        self.received: list[tuple[str, Any]] = []
        self.connect_errors: list[Any] = []
        self.disconnects: list[Any] = []
        self._changed = threading.Condition()
        for event in SERVER_EVENTS:
            self.sio.on(event, self._recorder(event))
        self.sio.on("connect_error", self._connect_error)
        self.sio.on("disconnect", self._disconnected)

    def _recorder(self, event: str) -> Any:
        def record(data: Any = None) -> None:
            with self._changed:
                self.received.append((event, data))
                self._changed.notify_all()
        return record

    def _connect_error(self, data: Any = None, *more: Any) -> None:
        with self._changed:
            self.connect_errors.append(data)
            self._changed.notify_all()

    def _disconnected(self, reason: Any = None) -> None:
        with self._changed:
            self.disconnects.append(reason)
            self._changed.notify_all()

    @property
    def connected(self) -> bool:
        return bool(self.sio.connected)

    # -- from the reactor ---------------------------------------------------

    def connect(self, auth: Any = None) -> Deferred[None]:
        def go() -> None:
            self.sio.connect(self.url, auth=auth, transports=self.transports, wait_timeout=10)
        return deferToThread(go)

    def call(self, event: str, data: Any = None, timeout: float = 10) -> Deferred[Any]:
        return deferToThread(self.sio.call, event, data, timeout=timeout)

    def call_while_connected(self, event: str, data: Any = None, timeout: float = 10) -> Any:
        """In a thread of the caller's: emit with an ack and wait for the
        answer while the socket lives. The stock ``call`` waits out its whole
        timeout when the connection drops; this raises ConnectionError as
        soon as the disconnect is seen."""
        answers: list[Any] = []

        def answered(*args: Any) -> None:
            with self._changed:
                answers.append(args[0] if len(args) == 1 else args)
                self._changed.notify_all()

        self.sio.emit(event, data, callback=answered)
        deadline = time.monotonic() + timeout
        with self._changed:
            while not answers:
                if self.disconnects:
                    raise ConnectionError("disconnected before the answer")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to {event!r} after {timeout}s")
                self._changed.wait(left)
            return answers[0]

    async def barrier(self) -> None:
        """Every frame the server sent this socket before now has arrived.

        An event with an ack (one the server does not know: it has no other
        effect; before authentication it is refused all the same) is
        answered after everything the server already queued for this
        socket, and the stock client handles frames in order: once the
        answer is here, so is all that came before it. A test asserting that
        nothing else arrived waits for this, not for a sleep."""
        answer = await self.call("no_such_event", {})
        assert isinstance(answer, dict) and answer.get("success") is False, answer

    def emit(self, event: str, data: Any = None) -> Deferred[None]:
        return deferToThread(self.sio.emit, event, data)

    def disconnect(self) -> Deferred[None]:
        return deferToThread(self.sio.disconnect)

    def events(self, name: str) -> list[Any]:
        with self._changed:
            return [data for event, data in self.received if event == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 10) -> Deferred[list[Any]]:
        """Wait until ``count`` events ``name`` have arrived; answer them all."""
        def wait() -> list[Any]:
            deadline = time.monotonic() + timeout
            with self._changed:
                while True:
                    found = [data for event, data in self.received if event == name]
                    if len(found) >= count:
                        return found
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AssertionError(
                            f"{len(found)} of {count} {name!r} events after {timeout}s;"
                            f" received {[e for e, _ in self.received]}")
                    self._changed.wait(left)
        return deferToThread(wait)

    def wait_disconnected(self, timeout: float = 10) -> Deferred[Any]:
        def wait() -> Any:
            deadline = time.monotonic() + timeout
            with self._changed:
                while not self.disconnects:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AssertionError("still connected")
                    self._changed.wait(left)
                return self.disconnects[0]
        return deferToThread(wait)


Closed = tuple[int | None, str | None]  # a WebSocket's close code and reason


class WireSocket(WebSocketClientProtocol):
    """A WebSocket that shows every frame: ``frames`` (str for text, bytes
    for binary); ``opened`` fires after the handshake or fails with it;
    ``ended`` fires with the close code and reason."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: DeferredQueue[str | bytes] = DeferredQueue()
        self.opened: Deferred[WireSocket] = Deferred()
        self.ended: Deferred[Closed] = Deferred()

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.frames.put(payload if isBinary else payload.decode("utf-8"))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        self.ended.callback((code, reason))

    def recv(self, timeout: float = 5.0) -> Deferred[str | bytes]:
        return self.frames.get().addTimeout(timeout, reactor)

    def send_text(self, text: str) -> None:
        self.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_binary(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)

    def wait_closed(self, timeout: float = 5.0) -> Deferred[Closed]:
        d: Deferred[Closed] = Deferred()

        def done(result: Any) -> Any:
            if not d.called:
                d.callback(result)
            return result

        self.ended.addBoth(done)
        return d.addTimeout(timeout, reactor)


def sleep(seconds: float) -> Deferred[None]:
    """Wait on the real reactor."""
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def until(predicate: Any, what: str = "the condition", timeout: float = 10.0,
                step: float = 0.005) -> None:
    """Wait, on the real reactor, until ``predicate()`` holds (looked at
    every ``step``: a test waits half a step on average past the moment it
    holds)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(step)


async def sessions_closed(server: Any, timeout: float = 30) -> None:
    """Wait until the server holds no session (every connection closed).
    A polling session whose client went without a word ends at the
    server's timeouts (connect_timeout, 10 s, for one that never joined):
    the wait outlasts them."""
    deadline = time.monotonic() + timeout
    while server.engine.sessions:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(server.engine.sessions)} sessions still open")
        d: Deferred[None] = Deferred()
        reactor.callLater(0.005, d.callback, None)
        await d


async def sessions_at_most(server: Any, count: int, timeout: float = 10) -> None:
    """Wait until the server holds at most ``count`` sessions."""
    deadline = time.monotonic() + timeout
    while len(server.engine.sessions) > count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(server.engine.sessions)} sessions still open, not {count}")
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
