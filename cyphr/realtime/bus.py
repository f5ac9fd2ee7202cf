"""
The cross-node event bus: server processes that serve one set of users pass
realtime events (JSON objects) to each other.

``Bus`` is what the realtime layer sees: ``publish`` an event to every other
node; ``listen`` (one BusListener, before ``start``) to theirs. Two engines
implement it: ``LocalBus`` for a single node (SQLite), where there is nobody
to tell, and ``PostgresBus`` for nodes that share one PostgreSQL database,
with LISTEN/NOTIFY. Another engine would be another subclass; the realtime
layer would not change.

On PostgreSQL, publishing is fire and forget. The events published in one
turn of the reactor go out in one statement on the pool (``SELECT
pg_notify(?, ?), ...``); while it runs, newcomers gather for the next one. Statements go one
after another, so every other node gets a node's events in publish order
(PostgreSQL delivers notifications in commit order). While the database is
down, events are dropped and counted: the realtime layer recovers them
through its catch-up path, which ``bus_restored`` starts.

Listening runs on a connection of its own (the pool's connections run
queries and transactions): a MaintainedConnection, as each of the pool's,
which reconnects by itself; the bus then says LISTEN again.

An event goes to every other node on the shared channel, or to some nodes
only (``publish(event, to=nodes)``): one notification on each one's channel
of its own (``node_channel``), which only that node listens to. A node
hears both channels in one stream, so what it is sent arrives in publish
order whichever channel carried it.

A payload is ``{"n":<node id>,"s":<sequence>,"e":<event>}``. The sequence
number is there because PostgreSQL folds identical notifications sent in one
transaction into one, and two identical events in one batch must both
arrive. Each node hears its own notifications too; the fixed prefix with its
node id lets it skip them without decoding.
"""

from __future__ import annotations

import functools
import hashlib
import json
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

import orjson
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cyphr.db.postgres import (
    MaintainedConnection,
    PostgresDatabase,
    connection_dsn,
    dsn_connect_timeout,
    is_connection_error,
)
from cyphr.errors import DatabaseUnavailable
from cyphr.handlers.validation import refuse_json_constant

__all__ = ["CHANNEL", "MAX_PAYLOAD", "Bus", "BusListener", "LocalBus", "PostgresBus", "node_channel"]

_log = Logger()

MAX_PAYLOAD = 7900   # bytes of one NOTIFY payload (PostgreSQL's limit is 8000)
CHANNEL = "cyphr_events"

# Notifications a statement sends at most; a reactor turn's worth usually.
CHUNK = 100
# Events waiting to be sent at most; beyond that the database cannot keep up
# and new events are dropped (and counted) rather than held without bound.
MAX_BACKLOG = 100_000
# Events handed to the listener in one turn of the reactor, so that a burst of
# notifications does not hold the reactor for long.
DRAIN_SLICE = 500
# Digits the sequence number may take, counted in the size check so that
# whether an event fits does not depend on how many were sent before it.
_SEQ_DIGITS = 20
_MALFORMED_REPORT_EVERY = 60.0
_RETRY_LISTEN = 5.0
# A publish the database refused as unavailable is tried again, in order,
# this often and this many times in a row before its events are dropped: a
# restart of PostgreSQL leaves the pool a broken connection or two that it
# replaces within a moment, and a message announced then must not be lost to
# the other nodes (they learn of a missed message only from a later one).
PUBLISH_RETRY_DELAY = 0.25
PUBLISH_RETRIES = 20
# While PostgreSQL stays away, the bus says so this often (the pool's rule,
# cyphr.db.postgres: one line when it goes, one every 30 s, one when back).
AWAY_REPORT_EVERY = 30.0

_json_encode = json.JSONEncoder(separators=(",", ":")).encode


_json_decode = json.JSONDecoder(parse_constant=refuse_json_constant).decode


def _encode(value: Any) -> bytes:
    """Compact JSON, in UTF-8. orjson writes an announced message's
    envelope in 0.46 µs rather than json's 2.7, and reads it back in 0.64
    rather than 2.4: a few of the µs each message crossing nodes costs
    (docs/scaling.rst). What orjson refuses (a lone surrogate a client
    escaped, say) is written by json, escaped to ASCII."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _json_encode(value).encode("ascii")


def _decode(text: str) -> Any:
    """A notification's JSON; ValueError (or RecursionError) if it is none.
    What orjson refuses and json reads (a lone surrogate's escape) is read
    by json, which refuses NaN and Infinity as orjson does."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _json_decode(text)


@functools.lru_cache(maxsize=1024)
def node_channel(node_id: str) -> str:
    """The channel only ``node_id`` listens to: a plain identifier whatever
    the node id holds (a digest of it), well under PostgreSQL's 63 bytes."""
    return "cyphr_node_" + hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:40]


def _statement(count: int) -> str:
    return "SELECT " + ", ".join(["pg_notify(?, ?)"] * count)


_FULL_STATEMENT = _statement(CHUNK)


class BusListener(Protocol):
    """Who hears the other nodes (the realtime layer's fan-out adapter).
    A bus calls it on the reactor thread; what it raises is logged, and the
    bus goes on."""

    def bus_event(self, event: dict[str, Any]) -> None:
        """An event another node published."""

    def bus_listening(self) -> None:
        """Once: events from the other nodes can first arrive (on a
        LocalBus: at start(), since there are no others)."""

    def bus_restored(self) -> None:
        """Listening again after a lost connection: events may have been missed."""


class Bus(ABC):
    """What the realtime layer needs from a bus, and the size rule every
    bus applies alike."""

    node_id: str

    def __init__(self, node_id: str) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty string")
        self.node_id = node_id
        # Who hears the other nodes' events (listen()).
        self._listener: BusListener | None = None
        # For metrics: events published, sent to the other nodes, received
        # from them, dropped; notifications that were not events.
        self.published = 0
        self.sent = 0
        self.received = 0
        self.dropped_total = 0
        self.malformed_total = 0
        self._own = '{"n":' + _encode(node_id).decode("utf-8") + ","
        self._head = self._own + '"s":'
        # The envelope is counted at its largest, in bytes.
        self._room = (MAX_PAYLOAD - len(self._head.encode("utf-8")) - _SEQ_DIGITS
                      - len(',"e":}'))

    def _body(self, event: dict[str, Any]) -> str:
        """The JSON of ``event``; ValueError when its payload would be too big."""
        if not isinstance(event, dict):
            raise TypeError(f"an event is a dict, not {type(event).__name__}")
        body = _encode(event)
        if len(body) > self._room:
            raise ValueError(
                f"event of {len(body)} bytes is over the bus limit of {self._room} bytes:"
                " publish ids and let the other nodes fetch the rest")
        return body.decode("utf-8")

    def listen(self, listener: BusListener) -> None:
        """Hand the other nodes' events to ``listener``: exactly once, before
        start(). A second call raises RuntimeError."""
        if self._listener is not None:
            raise RuntimeError("the bus has a listener already")
        self._listener = listener

    @property
    def listener(self) -> BusListener:
        """Who hears this bus. RuntimeError before listen(): start() uses
        it, so that a bus nobody hears refuses to start."""
        if self._listener is None:
            raise RuntimeError("nobody listens to the bus: listen() comes before start()")
        return self._listener

    @property
    def shared(self) -> bool:
        """Whether other nodes may hear what is published (a single node's
        bus says False)."""
        return True

    def fits(self, event: dict[str, Any]) -> bool:
        """Would publish() accept ``event``?"""
        return isinstance(event, dict) and len(_encode(event)) <= self._room

    @property
    @abstractmethod
    def listening(self) -> bool:
        """Events from other nodes can arrive now."""

    @abstractmethod
    def start(self) -> None:
        """Start listening, without waiting. RuntimeError if nobody
        listens (see ``listener``)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop listening; send what was published before."""

    @abstractmethod
    def publish(self, event: dict[str, Any], to: Iterable[str] | None = None) -> None:
        """
        Send ``event`` to every other node (or to the nodes ``to`` names),
        fire and forget: it reaches each one's listener once, in publish
        order. Raises ValueError at
        once when it is too big (check with fits(), or send ids instead).
        Events published while the database is down are tried again for a
        few seconds (PostgresBus: PUBLISH_RETRIES), then dropped.
        """


class LocalBus(Bus):
    """
    A single node (SQLite): there is nobody to tell. It behaves as a bus
    whose LISTEN succeeds at once and never fails: start() tells the
    listener bus_listening (so whoever waits for that moment goes on, as on
    any bus), it listens from start() until stop(), nothing ever arrives,
    and it is never restored.
    """

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self._started = False
        self._stopped = False

    @property
    def shared(self) -> bool:
        return False

    @property
    def listening(self) -> bool:
        return self._started and not self._stopped

    def start(self) -> None:
        listener = self.listener
        if self._started or self._stopped:
            return
        self._started = True
        try:
            listener.bus_listening()
        except Exception:  # noqa: BLE001 - the listener's bug must not stop the start
            _log.failure("The event bus's listener failed (bus_listening)")

    async def stop(self) -> None:
        self._stopped = True

    def publish(self, event: dict[str, Any], to: Iterable[str] | None = None) -> None:
        self._body(event)
        self.published += 1


class PostgresBus(Bus):
    """The bus of nodes that share one PostgreSQL database: it publishes
    through the pool, and listens on a MaintainedConnection of its own, of
    which it is the ConnectionObserver."""

    def __init__(self, database: PostgresDatabase, url: str, node_id: str, reactor: Any) -> None:
        super().__init__(node_id)
        self._database = database
        self._dsn = connection_dsn(url)
        self._connect_timeout = dsn_connect_timeout(self._dsn)
        self._reactor = reactor
        self._seq = 0
        self.channel = node_channel(node_id)
        # listening
        self._conn: MaintainedConnection | None = None
        self._listening = False
        self._listened_before = False
        self._retry: Any = None
        self._stopping = False
        # Since when the LISTEN connection is away, and when that was last said.
        self._away_since: float | None = None
        self._away_reported = float("-inf")
        self._said_stopped = False
        # Callers of stop() waiting for the first one to finish.
        self._stop_waiters: list[Deferred[None]] | None = None
        # publishing: (channel, payload), in publish order
        self._pending: list[tuple[str, str]] = []
        self._scheduled: Any = None
        self._sending: Deferred[None] | None = None
        self._dropped = 0
        self._publish_failures = 0  # publishes refused in a row (PUBLISH_RETRIES)
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
        self.listener  # noqa: B018 - raises if nobody listens
        if self._conn is not None or self._stopping:
            return
        self._conn = MaintainedConnection(self._dsn, self._reactor, self,
                                          connect_timeout=self._connect_timeout)
        self._conn.add_notify_observer(self._notified)
        self._conn.start()

    def _listen(self) -> None:
        self._retry = None
        if self._stopping or self._conn is None:
            return
        d = self._conn.execute(f"LISTEN {CHANNEL}; LISTEN {self.channel}")
        d.addCallbacks(self._now_listening, self._listen_failed)

    def _now_listening(self, _: Any) -> None:
        if self._stopping:
            return
        self._listening = True
        if not self._listened_before:
            self._listened_before = True
            _log.info("Event bus listening as node {node}", node=self.node_id)
            try:
                self.listener.bus_listening()
            except Exception:  # noqa: BLE001 - the listener's bug must not stop the bus
                _log.failure("The event bus's listener failed (bus_listening)")
            return
        away, self._away_since = self._away_since, None
        if away is None:
            _log.info("Event bus listening again")
        else:
            _log.info("Event bus listening again, after {seconds:.0f}s away",
                      seconds=self._reactor.seconds() - away)
        try:
            self.listener.bus_restored()
        except Exception:  # noqa: BLE001 - the listener's bug must not stop the bus
            _log.failure("The event bus's listener failed (bus_restored)")

    def _listen_failed(self, f: Failure) -> None:
        if self._stopping or is_connection_error(f.value):
            return  # the connection reconnects, then LISTENs again
        # Not the connection: say a standby, where LISTEN is refused.
        _log.failure("LISTEN failed; trying again in {delay} s", f, delay=_RETRY_LISTEN)
        self._retry = self._reactor.callLater(_RETRY_LISTEN, self._listen)

    # -- ConnectionObserver: what the LISTEN connection tells the bus ---

    def connection_up(self, conn: MaintainedConnection) -> None:
        self._listen()

    def connection_died(self, conn: MaintainedConnection, f: Failure) -> None:
        was_listening, self._listening = self._listening, False
        if self._stopping:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        # One line, however many lines libpq's message spans.
        reason = " ".join(f.getErrorMessage().split())
        self._away_since = self._away_reported = self._reactor.seconds()
        if was_listening:
            _log.warn("Event bus lost PostgreSQL, reconnecting: {reason}", reason=reason)
        else:
            _log.warn("Event bus cannot reach PostgreSQL, retrying: {reason}", reason=reason)

    def reconnect_failed(self, conn: MaintainedConnection, f: Failure) -> None:
        # An attempt every second or two: one line each would drown the log.
        if self._stopping:
            return
        now = self._reactor.seconds()
        if self._away_since is None:
            self._away_since = self._away_reported = now
        if now - self._away_reported < AWAY_REPORT_EVERY:
            return
        self._away_reported = now
        _log.warn("Event bus still cannot reach PostgreSQL after {seconds:.0f}s, reconnecting: "
                  "{reason}", seconds=now - self._away_since,
                  reason=" ".join(f.getErrorMessage().split()))

    def retry_scheduled(self, conn: MaintainedConnection, f: Failure, delay: float) -> None:
        pass  # the pool reports a PostgreSQL out of reach, for both

    # -- receiving ------------------------------------------------------

    def _notified(self, notify: Any) -> None:
        payload = notify.payload
        if notify.channel not in (CHANNEL, self.channel) or payload.startswith(self._own):
            return
        self._inbox.append(payload)
        if self._draining is None:
            self._draining = self._reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        self._draining = None
        inbox = self._inbox
        listener = self.listener
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
                listener.bus_event(message["e"])
            except Exception:  # noqa: BLE001 - nor stop the events after it
                _log.failure("The event bus's listener failed (bus_event)")
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

    def publish(self, event: dict[str, Any], to: Iterable[str] | None = None) -> None:
        body = self._body(event)
        self.published += 1
        if self._stopping:
            # Sockets closing at shutdown publish their users' presence:
            # said once, not once for each.
            if not self._said_stopped:
                self._said_stopped = True
                _log.debug("Event bus stopped: events published from now on are not sent")
            self.dropped_total += 1
            return
        if len(self._pending) >= MAX_BACKLOG:
            self._drop(1, "too many events waiting to be sent")
            return
        self._seq += 1
        payload = f"{self._head}{self._seq},\"e\":{body}}}"
        if to is None:
            self._pending.append((CHANNEL, payload))
        else:
            self._pending.extend((node_channel(node), payload) for node in to)
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
            delay = PUBLISH_RETRY_DELAY if self._publish_failures else 0
            self._scheduled = self._reactor.callLater(delay, self._send)

    async def _send_batch(self, batch: list[tuple[str, str]]) -> None:
        # One statement at a time, in order: PostgreSQL delivers in commit
        # order, and two statements on two connections may commit either way.
        for start in range(0, len(batch), CHUNK):
            chunk = batch[start:start + CHUNK]
            params: list[str] = []
            for channel, payload in chunk:
                params += (channel, payload)
            sql = _FULL_STATEMENT if len(chunk) == CHUNK else _statement(len(chunk))
            try:
                await self._database.run_query(sql, params)
            except DatabaseUnavailable as e:
                if (self._publish_failures < PUBLISH_RETRIES and not self._stopping
                        and not self._database.closing):
                    # Back at the front, in order, tried again shortly.
                    self._publish_failures += 1
                    self._pending[:0] = batch[start:]
                    return
                cause = e.__cause__ or e
                self._drop(len(chunk), " ".join(str(cause).split()) or type(cause).__name__)
            except Exception:  # noqa: BLE001 - nobody waits for the answer
                # Not the database going away: a bug, or the server's
                # notification queue full. Nothing waits for these events.
                _log.failure("Publishing {count} event(s) failed", count=len(chunk))
            else:
                self.sent += len(chunk)
                self._publish_failures = 0
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
            # No further attempt; one in progress ends now rather than at
            # its deadline.
            conn.remove_notify_observer(self._notified)
            await conn.stop()
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
