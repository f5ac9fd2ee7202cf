"""
Prometheus metrics, in the text exposition format (served at ``GET
/metrics`` by cyphr.api.metrics).

Each server has a registry of its own (tests run many servers in one
process). Most figures are read from the components' own state when a
scrape comes (sessions, pool, presence); where events must be counted, the
component keeps a plain integer or a Histogram below and the collector
reads it. So the hot paths pay an integer increment, never a lock or a
label lookup: everything here runs on the reactor thread.

Labels hold only fixed words: route templates (never paths or ids),
methods from a fixed list, status codes, limit names, transports.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from typing import Any, Iterator, Protocol, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

import cyphr

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
# Anything else a client sends as a method is "other": labels stay a fixed set.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
UNMATCHED = "unmatched"
TRANSPORTS = ("polling", "websocket")


class Histogram:
    """Counts of observations in fixed buckets, and their sum. Cheaper
    than prometheus_client's (no lock): only the reactor thread observes."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # The first bound >= value: a bucket counts what is less or equal.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative, as the exposition format wants them."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class HttpStats:
    """Requests answered, by method, route template and status, and how
    long each route took (from the request's arrival to its last byte)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.durations: dict[str, Histogram] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "other"
        route = route or UNMATCHED
        key = (method, route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.durations.get(route)
        if histogram is None:
            histogram = self.durations[route] = Histogram(LATENCY_BUCKETS)
        histogram.observe(max(seconds, 0.0))


def _histogram(name: str, documentation: str, histogram: Histogram,
               labels: list[str] | None = None, values: list[str] | None = None,
               family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
    if family is None:
        family = HistogramMetricFamily(name, documentation, labels=labels)
    family.add_metric(values or [], histogram.buckets(), histogram.total)
    return family


class MemoryTables(Protocol):
    """A part that holds in-memory tables keyed by user, token, chat,
    address or socket, and says how big each is (table name -> entries)."""

    def memory_tables(self) -> dict[str, int]: ...


class CyphrCollector:
    """Reads the server's state at each scrape. Takes the server's parts
    (see cyphr.server.build_server); ``tables``: further parts whose
    in-memory tables are counted in cyphr_memory_table_entries (the engine's,
    the presence's, the rate limits', the Socket.IO server's and the
    connection counts' are counted from the parts above)."""

    def __init__(self, *, http: HttpStats, engine: Any, presence: Any, receipts: Any,
                 batcher: Any, database: Any, bus: Any, limits: Any, sockets: Any,
                 connections: Any, attachments: Any = None, push: Any = None,
                 tables: Sequence[MemoryTables] = ()) -> None:
        self._tables = tuple(tables)
        self._attachments = attachments
        self._push = push
        self._http = http
        self._engine = engine
        self._presence = presence
        self._receipts = receipts
        self._batcher = batcher
        self._database = database
        self._bus = bus
        self._limits = limits
        self._sockets = sockets
        self._connections = connections

    def describe(self) -> list[Metric]:
        # Nothing to check against other collectors: this is the only one,
        # and collecting at registration would read half-built state.
        return []

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("cyphr_info", "The running version and database engine (always 1).",
                                 labels=["version", "engine"])
        info.add_metric([cyphr.__version__, self._database.engine], 1)
        yield info
        yield from self._collect_http()
        yield from self._collect_realtime()
        yield from self._collect_messages()
        yield from self._collect_database()
        yield from self._collect_bus()
        yield from self._collect_limits()
        yield from self._collect_connections()
        yield from self._collect_attachments()
        yield from self._collect_push()
        yield from self._collect_memory()

    def _collect_push(self) -> Iterator[Metric]:
        if self._push is None:
            return
        stats = self._push.stats
        sent = CounterMetricFamily("cyphr_push_sent", "Wake-ups a push service took, by kind.",
                                   labels=["kind"])
        for kind, count in sorted(stats.sent.items()):
            sent.add_metric([kind], count)
        yield sent
        failed = CounterMetricFamily(
            "cyphr_push_failed", "Wake-ups a push service did not take, by kind and outcome: gone "
            "(the registration was dropped), retry (tried again later), refused (given up).",
            labels=["kind", "outcome"])
        for (kind, outcome), count in sorted(stats.failed.items()):
            failed.add_metric([kind, outcome], count)
        yield failed
        yield CounterMetricFamily("cyphr_push_queued", "Wake-ups this process queued.",
                                  value=stats.queued)
        yield GaugeMetricFamily("cyphr_push_outbox_depth",
                                "Wake-ups waiting to be sent (all processes), as of the last heartbeat.",
                                value=stats.depth)

    def _collect_attachments(self) -> Iterator[Metric]:
        if self._attachments is None:
            return
        stats = self._attachments.stats
        store = self._attachments.blobs.kind
        for name, help_text, value in (
                ("cyphr_attachment_uploads_begun", "Attachment uploads created (TUS POST).",
                 stats.uploads_begun),
                ("cyphr_attachment_uploads_completed", "Attachment uploads that reached their length.",
                 stats.uploads_completed),
                ("cyphr_attachment_upload_bytes", "Attachment bytes made durable by appends.",
                 stats.upload_bytes),
                ("cyphr_attachment_download_bytes", "Attachment bytes sent to downloaders.",
                 stats.download_bytes),
                ("cyphr_attachments_removed", "Attachments whose blobs the clean-up removed.",
                 stats.removed)):
            counter = CounterMetricFamily(name, help_text, labels=["store"])
            counter.add_metric([store], value)
            yield counter
        for name, help_text, value in (
                ("cyphr_attachment_appends_in_progress",
                 "Upload appends (PATCH bodies) this process is receiving now.",
                 stats.uploads_in_progress),
                ("cyphr_attachments_stored",
                 "Finished attachments kept, as of the last clean-up run (all processes).",
                 stats.stored_count),
                ("cyphr_attachment_stored_bytes",
                 "Bytes of finished attachments kept, as of the last clean-up run (all processes).",
                 stats.stored_bytes)):
            gauge = GaugeMetricFamily(name, help_text, labels=["store"])
            gauge.add_metric([store], value)
            yield gauge

    def _collect_http(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "cyphr_http_requests", "HTTP requests answered, by method, route template and status.",
            labels=["method", "route", "status"])
        for (method, route, status), count in sorted(self._http.requests.items()):
            requests.add_metric([method, route, status], count)
        yield requests
        durations = HistogramMetricFamily(
            "cyphr_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route template.", labels=["route"])
        for route, histogram in sorted(self._http.durations.items()):
            _histogram("", "", histogram, values=[route], family=durations)
        yield durations

    def _collect_realtime(self) -> Iterator[Metric]:
        by_transport = dict.fromkeys(TRANSPORTS, 0)
        for session in list(self._engine.sessions.values()):
            if not session.closed:
                by_transport[session.transport] = by_transport.get(session.transport, 0) + 1
        sessions = GaugeMetricFamily("cyphr_realtime_sessions",
                                     "Open Socket.IO (Engine.IO) sessions, by transport.",
                                     labels=["transport"])
        for transport, count in sorted(by_transport.items()):
            sessions.add_metric([transport], count)
        yield sessions
        presence = self._presence
        yield GaugeMetricFamily("cyphr_realtime_users",
                                "Authenticated users with a socket on this process.",
                                value=presence.users)
        yield GaugeMetricFamily("cyphr_realtime_authenticated_sockets",
                                "Authenticated sockets on this process.", value=presence.connections)

    def _collect_messages(self) -> Iterator[Metric]:
        batcher, receipts = self._batcher, self._receipts
        yield CounterMetricFamily("cyphr_messages_sent",
                                  "Messages stored and acknowledged to their senders (REST and Socket.IO).",
                                  value=batcher.messages_stored)
        yield CounterMetricFamily("cyphr_messages_delivered",
                                  "Messages acknowledged as delivered by a recipient, first time only.",
                                  value=receipts.delivered_count)
        yield CounterMetricFamily("cyphr_messages_read",
                                  "Read marks recorded (one message, or a chat up to a seq).",
                                  value=receipts.read_count)
        yield _histogram("cyphr_send_batch_size", "Messages written per group-commit transaction.",
                         batcher.size_histogram)
        yield _histogram("cyphr_send_batch_duration_seconds",
                         "Time to write and commit one group-commit batch.", batcher.commit_histogram)

    def _collect_database(self) -> Iterator[Metric]:
        stats = self._database.stats
        engine = [self._database.engine]
        for name, key, documentation in (
            ("cyphr_db_pool_size", "size", "Database connections the pool is meant to hold."),
            ("cyphr_db_pool_up", "up", "Database connections that are connected."),
            ("cyphr_db_pool_in_use", "busy", "Database connections running a query or transaction."),
            ("cyphr_db_pool_waiting", "waiting", "Callers waiting for a database connection."),
        ):
            gauge = GaugeMetricFamily(name, documentation, labels=["engine"])
            gauge.add_metric(engine, stats[key])
            yield gauge
        failures = CounterMetricFamily(
            "cyphr_db_failures",
            "Database failures: connections lost, queries answered 'unavailable', statements "
            "that failed in the database.", labels=["engine", "kind"])
        for kind, count in sorted(self._database.failures.items()):
            failures.add_metric([*engine, kind], count)
        yield failures

    def _collect_bus(self) -> Iterator[Metric]:
        bus = self._bus
        for name, value, documentation in (
            ("cyphr_bus_events_published", bus.published, "Events published for the other processes."),
            ("cyphr_bus_events_out", bus.sent, "Events sent to the other processes (NOTIFY)."),
            ("cyphr_bus_events_in", bus.received, "Events received from the other processes."),
            ("cyphr_bus_events_dropped", bus.dropped_total,
             "Events dropped (database unavailable, or too many waiting)."),
            ("cyphr_bus_notifications_malformed", bus.malformed_total,
             "Notifications on the channel that were not events, ignored."),
        ):
            yield CounterMetricFamily(name, documentation, value=value)

    def _collect_limits(self) -> Iterator[Metric]:
        refused = CounterMetricFamily("cyphr_rate_limited",
                                      "Requests and events refused by a rate limit, by limit.",
                                      labels=["limit"])
        for limit in self._limits.all():
            refused.add_metric([limit.name], limit.refused)
        refused.add_metric(["realtime_events"], self._sockets.refused_events)
        yield refused
        # Ordinary refusals of what realtime clients sent (their mistakes,
        # or an attack): counted here rather than logged one by one.
        realtime = CounterMetricFamily(
            "cyphr_realtime_refused",
            "Realtime messages, packets and events refused, by reason: protocol (broken "
            "protocol), too_large (over the frame or event limit), slow_consumer, rate, "
            "unknown_event, bad_arguments, too_deep, refused (by the event's handler).",
            labels=["reason"])
        totals = self._engine.refusals.totals + self._sockets.refusals.totals
        for reason, count in sorted(totals.items()):
            realtime.add_metric([reason], count)
        yield realtime


    def _collect_connections(self) -> Iterator[Metric]:
        connections = self._connections
        yield GaugeMetricFamily("cyphr_http_connections",
                                "Open connections of the API endpoints (HTTP, and WebSockets).",
                                value=connections.open)
        yield GaugeMetricFamily("cyphr_http_connections_limit",
                                "Most connections open at once (max_connections, or from the "
                                "open-file limit).", value=connections.total)
        refused = CounterMetricFamily(
            "cyphr_connections_refused",
            "Connections, requests and Engine.IO handshakes refused by a connection limit, by reason.",
            labels=["reason"])
        for reason, count in sorted({**connections.refused,
                                     **self._engine.refused_handshakes}.items()):
            refused.add_metric([reason], count)
        yield refused

    def memory_tables(self) -> dict[str, int]:
        """Every in-memory table that grows with users, tokens, chats,
        addresses or sockets, by name, with its entries now."""
        sizes: dict[str, int] = {}
        for part in (self._engine, self._presence, *self._tables):
            sizes.update(part.memory_tables())
        for limit in self._limits.all():
            sizes["rate_limit_" + limit.name] = len(limit)
        sockets = self._sockets
        sizes["socketio_connections"] = len(sockets.connections)
        sizes["socketio_sockets"] = sum(len(ns.sockets) for ns in sockets.namespaces.values())
        sizes["socketio_rooms"] = sum(len(ns.rooms) for ns in sockets.namespaces.values())
        sizes["connection_addresses"] = self._connections.addresses
        return sizes

    def _collect_memory(self) -> Iterator[Metric]:
        # One family, labelled by table: an operator (or benchmarks/soak.py)
        # sees a table that grows while the users connected do not.
        entries = GaugeMetricFamily(
            "cyphr_memory_table_entries",
            "Entries in each in-memory table that grows with users, tokens, chats, addresses or "
            "sockets (each is bounded: see README, Memory).", labels=["table"])
        for table, count in sorted(self.memory_tables().items()):
            entries.add_metric([table], count)
        yield entries
        # Python's own allocations, however they are held: a leak of objects
        # shows here as a steady rise, where RSS also moves with what the C
        # allocator keeps or gives back (see cyphr.heap).
        yield GaugeMetricFamily(
            "cyphr_python_allocated_blocks",
            "Memory blocks the Python allocator has handed out and not had back "
            "(sys.getallocatedblocks()).", value=sys.getallocatedblocks())


class Metrics:
    """The registry of one server and the HTTP figures its site fills."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.http = HttpStats()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
