"""
The cross-node event bus: server processes sharing one PostgreSQL database
pass realtime events (JSON objects) to each other with LISTEN/NOTIFY.

Publishing is fire and forget. The events published in one turn of the
reactor go out in one statement on the pool (``SELECT pg_notify(?, ?),
...``); while it runs, newcomers gather for the next one. Statements go one
after another, so every other node gets a node's events in publish order
(PostgreSQL delivers notifications in commit order). While the database is
down, events are dropped and counted: the realtime layer recovers them
through its catch-up path, which ``on_restored`` starts.

Listening runs on a connection of its own (the pool's connections run
queries and transactions), which reconnects by itself and says LISTEN again.

A payload is ``{"n":<node id>,"s":<sequence>,"e":<event>}``. The sequence
number is there because PostgreSQL folds identical notifications sent in one
transaction into one, and two identical events in one batch must both
arrive. Each node hears its own notifications too; the fixed prefix with its
node id lets it skip them without decoding.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from psycopg2.extensions import parse_dsn
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cyphr.db.postgres import (
    PostgresDatabase,
    _Connection,
    _Detector,
    _with_deadline,
    connection_dsn,
    is_connection_error,
)
from cyphr.errors import DatabaseUnavailable

__all__ = ["CHANNEL", "MAX_PAYLOAD", "Bus", "LocalBus", "PostgresBus"]

_log = Logger()

MAX_PAYLOAD = 7900   # bytes of one NOTIFY payload (PostgreSQL's limit is 8000)
CHANNEL = "cyphr_events"

# Notifications a statement sends at most; a reactor turn's worth usually.
CHUNK = 100
# Events waiting to be sent at most; beyond that the database cannot keep up
# and new events are dropped (and counted) rather than held without bound.
MAX_BACKLOG = 100_000
# Events handed to on_event in one turn of the reactor, so that a burst of
# notifications does not hold the reactor for long.
DRAIN_SLICE = 500
# Digits the sequence number may take, counted in the size check so that
# whether an event fits does not depend on how many were sent before it.
_SEQ_DIGITS = 20
_MALFORMED_REPORT_EVERY = 60.0
_RETRY_LISTEN = 5.0

_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


def _ignore_event(event: dict[str, Any]) -> None:
    pass


def _ignore() -> None:
    pass


def _statement(count: int) -> str:
    return "SELECT " + ", ".join(["pg_notify(?, ?)"] * count)


_FULL_STATEMENT = _statement(CHUNK)


class Bus(ABC):
    """What the realtime layer needs from a bus, and the size rule every
    bus applies alike."""

    node_id: str

    def __init__(self, node_id: str) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty string")
        self.node_id = node_id
        # Set by the owner: events from the other nodes; LISTEN established
        # again after a lost connection.
        self.on_event: Callable[[dict[str, Any]], None] = _ignore_event
        self.on_restored: Callable[[], None] = _ignore
        # Called once, when events from other nodes can first arrive.
        self.on_listening: Callable[[], None] = _ignore
        # For metrics: events published, sent to the other nodes, received
        # from them, dropped; notifications that were not events.
        self.published = 0
        self.sent = 0
        self.received = 0
        self.dropped_total = 0
        self.malformed_total = 0
        self._own = '{"n":' + _encode(node_id) + ","
        self._head = self._own + '"s":'
        # The envelope is counted at its largest. JSON is ASCII here
        # (ensure_ascii), so its length in characters is its size in bytes.
        self._room = MAX_PAYLOAD - len(self._head) - _SEQ_DIGITS - len(',"e":}')

    def _body(self, event: dict[str, Any]) -> str:
        """The JSON of ``event``; ValueError when its payload would be too big."""
        if not isinstance(event, dict):
            raise TypeError(f"an event is a dict, not {type(event).__name__}")
        body = _encode(event)
        if len(body) > self._room:
            raise ValueError(
                f"event of {len(body)} bytes is over the bus limit of {self._room} bytes:"
                " publish ids and let the other nodes fetch the rest")
        return body

    def fits(self, event: dict[str, Any]) -> bool:
        """Would publish() accept ``event``?"""
        return isinstance(event, dict) and len(_encode(event)) <= self._room

    @property
    @abstractmethod
    def listening(self) -> bool:
        """Events from other nodes can arrive now."""

    @abstractmethod
    def start(self) -> None:
        """Start listening, without waiting."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop listening; send what was published before."""

    @abstractmethod
    def publish(self, event: dict[str, Any]) -> None:
        """
        Send ``event`` to every other node, fire and forget: it reaches each
        other node's on_event once, in publish order. Raises ValueError at
        once when it is too big (check with fits(), or send ids instead).
        Events published while the database is down are dropped.
        """


class LocalBus(Bus):
    """A single node (SQLite): there is nobody to tell."""

    @property
    def listening(self) -> bool:
        return True

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def publish(self, event: dict[str, Any]) -> None:
        self._body(event)
        self.published += 1


class _InOrder:
    """
    Stands in for the Cooperator txpostgres hands notifications to. It makes
    each read's notifications into a task of their own, and a Cooperator
    runs its tasks round-robin: the notifications of two reads could reach
    the observer interleaved, out of order. This runs each at once, in
    order; the observer only queues them, so that is quick.
    """

    @staticmethod
    def cooperate(iterator: Iterator[Any]) -> None:
        for _ in iterator:
            pass


class PostgresBus(Bus):
    """The bus of nodes that share one PostgreSQL database."""

    def __init__(self, database: PostgresDatabase, url: str, node_id: str, reactor: Any) -> None:
        super().__init__(node_id)
        self._database = database
        self._dsn = connection_dsn(url)
        self._connect_timeout = float(parse_dsn(self._dsn)["connect_timeout"])
        self._reactor = reactor
        self._seq = 0
        # listening
        self._conn: _Connection | None = None
        self._listening = False
        self._listened_before = False
        self._retry: Any = None
        self._stopping = False
        # Callers of stop() waiting for the first one to finish.
        self._stop_waiters: list[Deferred[None]] | None = None
        # publishing
        self._pending: list[str] = []
        self._scheduled: Any = None
        self._sending: Deferred[None] | None = None
        self._dropped = 0
        # receiving
        self._inbox: deque[str] = deque()
        self._draining: Any = None
        self._malformed = 0
        self._malformed_reported = float("-inf")

    @property
    def listening(self) -> bool:
        return self._listening

    # -- listening ------------------------------------------------------

    def start(self) -> None:
        if self._conn is not None or self._stopping:
            return
        # The pool's connection class and detector, each with one more fix:
        # the same doRead that turns a dead socket into a quiet
        # reconnection, the same backoff.
        conn = _Connection(
            self._reactor, cooperator=_InOrder(),
            detector=_Detector(self, self._reactor, self._connect_timeout))  # type: ignore[arg-type]
        conn.addNotifyObserver(self._notified)
        conn.detector.addRecoveryHandler(self._listen)
        self._conn = conn
        connected = _with_deadline(conn.connect(self._dsn), conn, self._connect_timeout,
                                   self._reactor)
        connected.addCallbacks(lambda _: self._listen(), self._first_connect_failed)

    def _first_connect_failed(self, f: Failure) -> None:
        if self._stopping or self._conn is None:
            return
        self._conn.detector.connectionIsDead = True
        self._conn.detector.startReconnecting(f)

    def _listen(self) -> None:
        self._retry = None
        if self._stopping or self._conn is None:
            return
        d = self._conn.runOperation(f"LISTEN {CHANNEL}")
        d.addCallbacks(self._now_listening, self._listen_failed)

    def _now_listening(self, _: Any) -> None:
        if self._stopping:
            return
        self._listening = True
        if not self._listened_before:
            self._listened_before = True
            _log.info("Event bus listening as node {node}", node=self.node_id)
            try:
                self.on_listening()
            except Exception:  # noqa: BLE001 - the owner's bug must not stop the bus
                _log.failure("The event bus's on_listening failed")
            return
        _log.info("Event bus listening again")
        try:
            self.on_restored()
        except Exception:  # noqa: BLE001 - the owner's bug must not stop the bus
            _log.failure("The event bus's on_restored failed")

    def _listen_failed(self, f: Failure) -> None:
        if self._stopping or is_connection_error(f.value):
            return  # the detector reconnects, then LISTENs again
        # Not the connection: say a standby, where LISTEN is refused.
        _log.failure("LISTEN failed; trying again in {delay} s", f, delay=_RETRY_LISTEN)
        self._retry = self._reactor.callLater(_RETRY_LISTEN, self._listen)

    # The detector calls these two, as it calls them on the pool.

    def _connection_died(self, conn: Any, f: Failure) -> None:
        was_listening, self._listening = self._listening, False
        if self._stopping:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        reason = " ".join(f.getErrorMessage().split())
        if was_listening:
            _log.warn("Event bus lost PostgreSQL, reconnecting: {reason}", reason=reason)
        else:
            _log.warn("Event bus cannot reach PostgreSQL, retrying: {reason}", reason=reason)

    def _reconnect_failed(self, f: Failure) -> None:
        # One line per attempt would drown the log; the pool reports the
        # outage every 30 s.
        _log.debug("Event bus reconnection failed: {reason}", reason=f.getErrorMessage())

    # -- receiving ------------------------------------------------------

    def _notified(self, notify: Any) -> None:
        payload = notify.payload
        if notify.channel != CHANNEL or payload.startswith(self._own):
            return
        self._inbox.append(payload)
        if self._draining is None:
            self._draining = self._reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        self._draining = None
        inbox = self._inbox
        for _ in range(min(len(inbox), DRAIN_SLICE)):
            payload = inbox.popleft()
            try:
                message = _decode(payload)
            except (ValueError, RecursionError):
                message = None
            if (
                type(message) is not dict
                or type(message.get("n")) is not str
                or type(message.get("e")) is not dict
            ):
                self._malformed_notification(len(payload))
                continue
            if message["n"] == self.node_id:
                continue  # ours, written some other way
            self.received += 1
            try:
                self.on_event(message["e"])
            except Exception:  # noqa: BLE001 - nor stop the events after it
                _log.failure("The event bus's on_event failed")
        if inbox and not self._stopping:
            self._draining = self._reactor.callLater(0, self._drain)

    def _malformed_notification(self, size: int) -> None:
        # Anyone who can connect may NOTIFY on the channel: warn, but not
        # once for every one of them, and never log what they sent.
        self._malformed += 1
        self.malformed_total += 1
        now = self._reactor.seconds()
        if now - self._malformed_reported >= _MALFORMED_REPORT_EVERY:
            _log.warn("Ignored {count} malformed notification(s) on {channel}"
                      " (the last of {size} bytes)",
                      count=self._malformed, channel=CHANNEL, size=size)
            self._malformed_reported = now
            self._malformed = 0

    # -- publishing -----------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        body = self._body(event)
        self.published += 1
        if self._stopping:
            _log.debug("Event bus stopped: an event was not sent")
            self.dropped_total += 1
            return
        if len(self._pending) >= MAX_BACKLOG:
            self._drop(1, "too many events waiting to be sent")
            return
        self._seq += 1
        self._pending.append(f"{self._head}{self._seq},\"e\":{body}}}")
        if self._scheduled is None and self._sending is None:
            self._scheduled = self._reactor.callLater(0, self._send)

    def _send(self) -> None:
        self._scheduled = None
        batch, self._pending = self._pending, []
        self._sending = Deferred.fromCoroutine(self._send_batch(batch))
        self._sending.addBoth(self._sent)

    def _sent(self, result: None | Failure) -> None:
        if isinstance(result, Failure):  # _send_batch catches what it expects
            _log.failure("Publishing failed", result)
        self._sending = None
        if self._pending and self._scheduled is None:
            self._scheduled = self._reactor.callLater(0, self._send)

    async def _send_batch(self, batch: list[str]) -> None:
        # One statement at a time, in order: PostgreSQL delivers in commit
        # order, and two statements on two connections may commit either way.
        for start in range(0, len(batch), CHUNK):
            chunk = batch[start:start + CHUNK]
            params: list[str] = []
            for payload in chunk:
                params += (CHANNEL, payload)
            sql = _FULL_STATEMENT if len(chunk) == CHUNK else _statement(len(chunk))
            try:
                await self._database.run_query(sql, params)
            except DatabaseUnavailable as e:
                cause = e.__cause__ or e
                self._drop(len(chunk), " ".join(str(cause).split()) or type(cause).__name__)
            except Exception:  # noqa: BLE001 - nobody waits for the answer
                # Not the database going away: a bug, or the server's
                # notification queue full. Nothing waits for these events.
                _log.failure("Publishing {count} event(s) failed", count=len(chunk))
            else:
                self.sent += len(chunk)
                if self._dropped:
                    _log.warn("Event bus: {count} event(s) were dropped while PostgreSQL"
                              " was unavailable", count=self._dropped)
                    self._dropped = 0

    def _drop(self, count: int, reason: str) -> None:
        if not self._dropped:
            _log.warn("Event bus: PostgreSQL is unavailable ({reason}); dropping published"
                      " events until it answers", reason=reason)
        self._dropped += count
        self.dropped_total += count

    # -- stopping -------------------------------------------------------

    async def stop(self) -> None:
        if self._stopping:
            if self._stop_waiters is not None:  # still stopping: wait for it
                waiter: Deferred[None] = Deferred()
                self._stop_waiters.append(waiter)
                await waiter
            return
        self._stopping = True
        self._stop_waiters = []
        self._listening = False
        for call in (self._retry, self._draining):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._draining = None
        self._inbox.clear()
        conn = self._conn
        if conn is not None:
            # The detector's stop() cancels the next attempt; closing ends
            # one in progress now rather than at its deadline.
            detector_stopped = Deferred.fromCoroutine(conn.detector.stop())
            conn.removeNotifyObserver(self._notified)
            with suppress(AttributeError):  # never connected
                conn.close()
            await detector_stopped
        # What was published before stop() goes out.
        while self._sending is not None or self._pending:
            if self._scheduled is not None:
                self._scheduled.cancel()
                self._scheduled = None
            if self._sending is None:
                self._send()
            if self._sending is not None:
                await self._sending
        if self._dropped:
            _log.warn("Event bus: {count} event(s) were dropped while PostgreSQL was unavailable",
                      count=self._dropped)
            self._dropped = 0
        waiters, self._stop_waiters = self._stop_waiters, None
        for waiter in waiters:
            waiter.callback(None)
