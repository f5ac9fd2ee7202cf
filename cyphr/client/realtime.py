"""
The realtime half of the client: the stock python-socketio client, in its
own threads.

On connecting, the server first pushes every message this user has not yet
acknowledged as delivered, then ``sync_complete``; after that, new messages
as they are stored. The listener opens each message, hands it to the
callback, and acknowledges it (``message_delivered``) so that it is not
pushed again.

What happens to the connection goes to ``on_status``: ``"lost"`` when it
dropped (the stock client then reconnects, with a growing delay),
``"reconnected"`` when it is back, ``"ended"`` when the server ended the
session (a logout elsewhere, a revoked token, a recovery on another
device): then nothing more comes, and the listener does not reconnect.

With the history backup on (cyphr.client.backup), a listener rewrites it
when it is due, after the catch-up and as messages come, in a thread of
its own (at most once a day; a failure is logged).
"""

from __future__ import annotations

import logging
import queue
import selectors
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import engineio
import socketio
import websocket

from cyphr.client import backup
from cyphr.client.http import ApiError, ClientError

if TYPE_CHECKING:
    from cyphr.client.client import Client, Message


_log = logging.getLogger(__name__)

LOST, RECONNECTED, ENDED = "lost", "reconnected", "ended"
CLOSE_TIMEOUT = 10.0  # seconds stop() waits for the stock client to close
_SESSION_CODES = {"INVALID_TOKEN", "TOKEN_EXPIRED", "TOKEN_REVOKED", "UNAUTHORIZED"}


class _EndKeepingQueue(queue.Queue):
    """
    The stock client's send queue, in which the end of a connection is not
    lost. The stock client ends its write loop by putting None in the queue
    (python-engineio 4.15.1, ``Client._write_loop``); but a write loop that
    takes packets in a batch drops a None found behind them and, while the
    client still counts as connected (its read loop sets that only after the
    write loop has ended), waits for more until max(ping interval, ping
    timeout) + 5 s: 30 s with the server's defaults, during which a server
    that closed the connection (a restart) goes unnoticed. Once a None was
    put, a blocking get on an empty queue answers None at once, until the
    connection is over (``reopen``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._ended = False

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            self._ended = True
        super().put(item, block, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            with self.mutex:
                if self._ended and not self._qsize():
                    # The caller marks it done, as a None put.
                    self.unfinished_tasks += 1
                    return None
        return super().get(block, timeout)

    def reopen(self) -> None:
        """The connection is over (the stock client has emptied the queue):
        the next one starts afresh."""
        with self.mutex:
            self._ended = False


class _OneAtATimeTLS(websocket.WebSocket):
    """
    The stock client's WebSocket, whose TLS connection is used by one thread
    at a time. The stock client reads on one thread while it writes on
    another (python-engineio's read and write loops; websocket-client's
    locks keep reads apart from reads and writes from writes, not one from
    the other), and an ``ssl.SSLSocket`` used so by two threads at once
    fails: a read answers b"" while the connection is alive (the client
    then takes it for closed by the server and drops it), or the
    connection breaks with a "bad record mac" alert. Seen in 1 of some 25
    runs of a test that connects over wss and sends at once
    (tests.test_real_port.TLSTests.test_socketio_over_wss: the server saw
    the client drop the connection 1 ms after its first packet, each such
    empty read came while a send was under way on the same socket; none
    in 2,770 runs with this class), and within milliseconds of reading and
    writing at once (tests.test_client_tls).

    Each read or write of the TLS socket is made under one lock, without
    blocking: a read with nothing to answer yet (no data, part of a record,
    or a record that is not data, such as TLS 1.3's session tickets) waits
    for the socket outside the lock, so that a write is never held up by a
    read. Plain TCP is left as it is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls_lock = threading.Lock()

    def _send(self, data: bytes | str) -> int:
        if not isinstance(self.sock, ssl.SSLSocket):
            return super()._send(data)
        with self._tls_lock:
            return super()._send(data)

    def _recv(self, bufsize: int) -> bytes:
        sock = self.sock
        if not isinstance(sock, ssl.SSLSocket):
            return super()._recv(bufsize)
        timeout = sock.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._tls_lock:
                # The write waiting for the lock uses the socket only once
                # its timeout is back.
                sock.settimeout(0)
                try:
                    return super()._recv(bufsize)
                except ssl.SSLWantReadError:
                    wanted = selectors.EVENT_READ
                except ssl.SSLWantWriteError:
                    wanted = selectors.EVENT_WRITE
                finally:
                    sock.settimeout(timeout)
            left = None if deadline is None else deadline - time.monotonic()
            with selectors.DefaultSelector() as selector:
                selector.register(sock, wanted)
                if (left is not None and left <= 0) or not selector.select(left):
                    raise websocket.WebSocketTimeoutException("Connection timed out waiting for data")


class _InOrderEngineIO(engineio.Client):
    # The stock client runs each incoming message's handlers in a thread of
    # its own, so two messages may be handled out of order. A messenger must
    # see a chat in seq order and the catch-up before sync_complete: handle
    # them one by one, in arrival order, on one thread of their own. Not on
    # the reading thread: the stock DISCONNECT handler joins the reading
    # thread ("cannot join current thread"), and a handler that blocks
    # there (opening a message may ask the server for a key) would stop
    # the pings too.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Given to websocket.create_connection with the stock client's own
        # options (its public websocket_extra_options).
        self.websocket_extra_options.setdefault("class_", _OneAtATimeTLS)
        self._inbox: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._handling: threading.Thread | None = None
        self.server_ended = False

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        return _EndKeepingQueue()

    def _reset(self) -> None:
        super()._reset()
        self.queue.reopen()

    def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event != "message":
            return super()._trigger_event(event, *args, **kwargs)
        data = args[0] if args else None
        if isinstance(data, str) and data[:1] == "1" and data[1:2] in ("", "/"):
            # A Socket.IO DISCONNECT: the server ended the session. Noted
            # now, on the reading thread, as the transport may close before
            # the handler thread gets to the packet.
            self.server_ended = True
        if self._handling is None or not self._handling.is_alive():
            self._handling = threading.Thread(target=self._handle, daemon=True,
                                              name="cyphr-realtime-handler")
            self._handling.start()
        self._inbox.put(args)
        return None

    def _handle(self) -> None:
        while True:
            args = self._inbox.get()
            if args is None:
                return
            super()._trigger_event("message", *args, run_async=False)

    def stop_handling(self, timeout: float = 5.0) -> None:
        """End the handler thread once what arrived before is handled."""
        handling = self._handling
        if handling is not None and handling is not threading.current_thread():
            self._inbox.put(None)
            handling.join(timeout)


class OrderedClient(socketio.Client):
    """The stock client, handling what arrives in arrival order."""

    def _engineio_client_class(self) -> type[engineio.Client]:
        return _InOrderEngineIO


class Listener:
    def __init__(self, client: Client, on_message: Callable[[Message], None], *,
                 on_event: Callable[[str, Any], None] | None = None,
                 on_status: Callable[[str, str], None] | None = None,
                 transports: list[str] | None = None, acknowledge: bool = True,
                 top_up: bool = True) -> None:
        self.client = client
        self.on_message = on_message
        self.on_event = on_event
        self.on_status = on_status
        self.ended: str | None = None  # why the server ended the session
        self._connected_once = False
        self.transports = transports
        self.acknowledge = acknowledge
        self.top_up = top_up
        self._topping_up: threading.Thread | None = None
        self._topping_up_sessions: threading.Thread | None = None
        self._backing_up: threading.Thread | None = None
        self._unacknowledged = 0  # receipts sent that the server has not acknowledged
        self._acknowledged = threading.Condition()
        self.synced = threading.Event()
        self.cursor: str | None = None
        self.error: str | None = None
        self._authenticated = threading.Event()
        # handle_sigint=False: the stock client's own SIGINT handler
        # disconnects from the signal handler, which deadlocks when the main
        # thread is inside the client's queue at that moment (a receipt
        # being sent); Ctrl-C then reaches the caller as KeyboardInterrupt,
        # and stop() runs in its ``finally``.
        self.sio = OrderedClient(reconnection=True, reconnection_delay=0.5,
                                 reconnection_delay_max=5, http_session=client.http.session,
                                 handle_sigint=False)
        self.sio.on("new_message", self._new_message)
        self.sio.on("sync_complete", self._sync_complete)
        self.sio.on("authenticated", lambda data: self._authenticated.set())
        self.sio.on("connect_error", self._connect_error)
        self.sio.on("connect", self._connected)
        self.sio.on("disconnect", self._disconnected)
        self.sio.on("session_prekeys_low", self._session_prekeys_low)
        for event in ("message_delivered", "message_read", "user_typing", "user_online",
                      "user_offline", "incoming_call", "call_answer", "call_ice_candidate",
                      "call_end", "devices_changed"):
            self.sio.on(event, lambda data, event=event: self._event(event, data))

    def start(self, timeout: float = 15.0) -> Listener:
        """Connect and authenticate; returns once the server has accepted."""
        if self.client.http.token is None:
            # Rate limited and logged, like any sign-in the user did not ask for.
            self.client._automatic_login("no session for realtime")
        try:
            self.sio.connect(self.client.http.server, auth=self._auth, transports=self.transports,
                             wait_timeout=timeout)
        except socketio.exceptions.ConnectionError as e:
            raise ClientError(f"cannot connect to {self.client.http.server} for realtime: "
                              f"{self.error or e}") from None
        if not self._authenticated.wait(timeout):
            self.stop()
            raise ClientError("the server did not authenticate the realtime connection")
        return self

    def _auth(self) -> dict[str, str]:
        # Called on every (re)connection, so a renewed token is used.
        return {"token": self.client.http.token or ""}

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect, once the receipts already sent are acknowledged (so
        that what was delivered is not pushed again next time)."""
        deadline = time.monotonic() + timeout
        with self._acknowledged:
            while self._unacknowledged and self.sio.connected:
                if not self._acknowledged.wait(max(0.0, deadline - time.monotonic())):
                    break
        # shutdown, not disconnect: it also ends a reconnection under way.
        # The stock client then waits for its reading thread with no bound;
        # the wait is bounded here, so that stop() (and Ctrl-C on a listen)
        # always returns: its threads are daemons, and go with the process.
        closing = threading.Thread(target=self.sio.shutdown, daemon=True,
                                   name="cyphr-realtime-close")
        closing.start()
        closing.join(CLOSE_TIMEOUT)
        if closing.is_alive():
            _log.warning("the realtime connection did not close within %.0f s; leaving it",
                         CLOSE_TIMEOUT)
        eio = self.sio.eio
        if isinstance(eio, _InOrderEngineIO):
            eio.stop_handling()
        for topping_up in (self._topping_up, self._topping_up_sessions, self._backing_up):
            if topping_up is not None:
                topping_up.join(30)

    def _status(self, status: str, detail: str) -> None:
        if self.on_status is not None:
            self.on_status(status, detail)

    def _connected(self) -> None:
        if self._connected_once:
            self._status(RECONNECTED, self.client.http.server)
        self._connected_once = True

    def _disconnected(self, reason: str = "") -> None:
        # The answers to receipts sent on this connection went with it (the
        # server pushes their messages again on the next one): stop() must
        # not wait for them.
        with self._acknowledged:
            self._unacknowledged = 0
            self._acknowledged.notify_all()
        eio = self.sio.eio
        if reason == socketio.Client.reason.CLIENT_DISCONNECT or self.ended is not None:
            return
        if reason == socketio.Client.reason.SERVER_DISCONNECT \
                or getattr(eio, "server_ended", False):
            self._end("the server ended this session (signed out elsewhere, or the session "
                      "was revoked or expired)")
        else:
            self._status(LOST, reason or "connection lost")

    def _end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
            self._status(ENDED, why)

    def _connect_error(self, data: Any) -> None:
        code = None
        if isinstance(data, dict):
            code = (data.get("data") or {}).get("code")
            self.error = f"{data.get('message')} ({code})" if code else str(data.get("message"))
        else:
            self.error = str(data)
        if self._connected_once and code in _SESSION_CODES:
            # Reconnecting with a session the server no longer takes.
            self._end(f"the server ended this session ({self.error})")

    def _sync_complete(self, data: Any) -> None:
        if isinstance(data, dict):
            self.cursor = data.get("cursor")
        self.synced.set()
        self._event("sync_complete", data)
        if self.top_up and (self._topping_up is None or not self._topping_up.is_alive()):
            # Catching up may have used many one-time prekeys.
            self._topping_up = threading.Thread(target=self._top_up, daemon=True)
            self._topping_up.start()
        self._back_up_if_due()

    def _back_up_if_due(self) -> None:
        """The history backup's schedule: rewritten in a thread of its own
        when due (the check is a read of the vault)."""
        if self._backing_up is not None and self._backing_up.is_alive():
            return
        try:
            if not backup.due(self.client):
                return
        except Exception as e:  # noqa: BLE001 - best effort, never the listener's failure
            _log.warning("Could not tell whether the history backup is due: %s", e)
            return
        self._backing_up = threading.Thread(target=self.client.backup_history_if_due,
                                            daemon=True, name="cyphr-history-backup")
        self._backing_up.start()

    def _top_up(self) -> None:
        try:
            self.client.top_up_prekeys()
        except ClientError:
            pass  # tried again after the next catch-up

    def _session_prekeys_low(self, data: Any) -> None:
        self._event("session_prekeys_low", data)
        if not (self.top_up and isinstance(data, dict)
                and data.get("deviceId") == self.client.device_id):
            return  # another device of the account: it tops up its own
        # A top-up under way brings the stock back to the target already.
        if self._topping_up_sessions is None or not self._topping_up_sessions.is_alive():
            self._topping_up_sessions = threading.Thread(target=self._top_up_session_keys,
                                                         daemon=True)
            self._topping_up_sessions.start()

    def _top_up_session_keys(self) -> None:
        try:
            self.client.publish_session_keys(force_one_time=True)
        except ClientError:
            pass  # a device that comes back reads its stock (publish_session_keys)

    def _event(self, name: str, data: Any) -> None:
        if self.on_event is not None:
            self.on_event(name, data)

    def _new_message(self, data: Any) -> None:
        message = data.get("message") if isinstance(data, dict) else None
        if not isinstance(message, dict):
            return
        opened = self.client.open_message(message)
        self.on_message(opened)
        if self.acknowledge:
            self._receipt("message_delivered", {"messageId": message.get("id"),
                                                "chatId": message.get("chatId")})
        if self.synced.is_set():
            self._back_up_if_due()

    def _receipt(self, event: str, data: dict[str, Any]) -> None:
        # Sent with an ack id, not waited for here (this may be the reading
        # thread): stop() waits for the answers.
        def answered(*_: Any) -> None:
            with self._acknowledged:
                self._unacknowledged = max(0, self._unacknowledged - 1)
                self._acknowledged.notify_all()

        with self._acknowledged:
            self._unacknowledged += 1
        try:
            self.sio.emit(event, data, callback=answered)
        except socketio.exceptions.SocketIOError:
            # Not connected (now): the server pushes the message again on
            # the next connection, and it is acknowledged then.
            with self._acknowledged:
                self._unacknowledged -= 1
                self._acknowledged.notify_all()

    def send(self, to: str, text: str, message_type: str = "text",
             timeout: float = 30.0) -> dict[str, Any]:
        """Send over this connection (``send_message``); answers the ack
        once the server has stored the message."""
        def transmit(body: dict[str, Any]) -> dict[str, Any]:
            try:
                ack = self.sio.call("send_message", body, timeout=timeout)
            except socketio.exceptions.TimeoutError:
                raise ClientError("the server did not acknowledge the message in time") from None
            if not isinstance(ack, dict) or not ack.get("success"):
                code = ack.get("code", "ERROR") if isinstance(ack, dict) else "ERROR"
                message = ack.get("error", "refused") if isinstance(ack, dict) else "refused"
                details = ack.get("details") if isinstance(ack, dict) else None
                raise ApiError(0, code, message, details)
            return ack

        # Refused DEVICES_CHANGED, it is sealed again for the devices now.
        return self.client.send_sealed(to, text.encode("utf-8"), message_type, transmit)

    def mark_read(self, chat_id: str, up_to_seq: int) -> None:
        self._receipt("message_read", {"chatId": chat_id, "upToSeq": up_to_seq})

    def typing(self, chat_id: str, is_typing: bool = True) -> None:
        self.sio.emit("typing", {"chatId": chat_id, "isTyping": is_typing})
