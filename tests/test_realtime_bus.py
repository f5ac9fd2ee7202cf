"""The cross-node event bus: LISTEN/NOTIFY between nodes on one PostgreSQL."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from cyphr.db import DatabaseUnavailable
from cyphr.db.postgres import PostgresDatabase
from cyphr.realtime import bus as bus_module
from cyphr.realtime.bus import CHANNEL, MAX_PAYLOAD, Bus, LocalBus, PostgresBus, node_channel
from tests import postgres


async def wait_until(predicate: Any, what: str, seconds: float = 10.0) -> None:
    deadline = reactor.seconds() + seconds
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def turn() -> None:
    """Let the reactor go round once."""
    await deferLater(reactor, 0, lambda: None)


def capture_logs(testcase: TestCase) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def messages(events: list[dict[str, Any]], level: str | None = None) -> list[str]:
    return [formatEvent(e) for e in events
            if level is None or getattr(e.get("log_level"), "name", None) == level]


def largest_fitting(bus: Bus) -> dict[str, Any]:
    """The biggest event of the shape {"x": "aaa..."} that ``bus`` accepts."""
    low, high = 0, MAX_PAYLOAD
    while low < high:
        middle = (low + high + 1) // 2
        if bus.fits({"x": "a" * middle}):
            low = middle
        else:
            high = middle - 1
    return {"x": "a" * low}


class Node:
    """A bus's listener: what it heard, and how often the bus said it
    listened and was restored. ``hear`` is what takes each event."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.received: list[dict[str, Any]] = []
        self.hear: Any = self.received.append
        self.listened = 0
        self.restored = 0
        bus.listen(self)

    def bus_event(self, event: dict[str, Any]) -> None:
        self.hear(event)

    def bus_listening(self) -> None:
        self.listened += 1

    def bus_restored(self) -> None:
        self.restored += 1


class BusTestsMixin:
    """Builds nodes on a database of the test's choosing."""

    def database(self, url: str) -> PostgresDatabase:
        fail = self.fail  # type: ignore[attr-defined]
        db = PostgresDatabase(url, reactor, on_fatal=fail, pool_size=2)
        db.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(db.close()))  # type: ignore[attr-defined]
        return db

    def node(self, db: PostgresDatabase, url: str, node_id: str) -> Node:
        bus = PostgresBus(db, url, node_id, reactor)
        node = Node(bus)
        bus.start()
        # Added after the database's cleanup, so it runs before it.
        self.addCleanup(lambda: Deferred.fromCoroutine(bus.stop()))  # type: ignore[attr-defined]
        return node

    def count_statements(self, db: PostgresDatabase) -> list[int]:
        """Record how many notifications each statement of ``db`` sends."""
        sizes: list[int] = []
        run_query = db.run_query

        async def counting(sql: str, params: Any = ()) -> Any:
            if "pg_notify" in sql:
                sizes.append(sql.count("pg_notify"))
            return await run_query(sql, params)

        db.run_query = counting  # type: ignore[method-assign]
        return sizes


class PostgresBusTests(BusTestsMixin, TestCase):
    """Two nodes, a and b, on one database of the shared cluster."""

    timeout = 60
    _url: str | None = None

    async def setUp(self) -> None:
        # One database for the class: a listener hears only what is sent
        # after its LISTEN, so the tests do not hear each other.
        if PostgresBusTests._url is None:
            PostgresBusTests._url = await deferToThread(postgres.database_url)
        self.url = PostgresBusTests._url
        self.db_a = self.database(self.url)
        self.db_b = self.database(self.url)
        await self.db_a.when_ready()
        await self.db_b.when_ready()
        self.a = self.node(self.db_a, self.url, "node-a")
        self.b = self.node(self.db_b, self.url, "node-b")
        await wait_until(lambda: self.a.bus.listening and self.b.bus.listening, "LISTEN")

    async def sync(self) -> None:
        """Wait until each node has heard everything sent before: b answers a
        marker, and PostgreSQL delivers to every listener in commit order."""
        marker = {"marker": len(self.b.received)}
        self.a.bus.publish(marker)
        await wait_until(lambda: marker in self.b.received, "b to hear a's marker")
        self.b.received.remove(marker)
        reply = {"reply": marker["marker"]}
        self.b.bus.publish(reply)
        await wait_until(lambda: reply in self.a.received, "a to hear b's reply")
        self.a.received.remove(reply)

    async def test_one_turn_arrives_once_in_order(self) -> None:
        """500 events published in one turn reach the other node once each,
        in order, in statements of at most 100; the publisher does not hear
        its own; nobody is 'restored' on the first LISTEN."""
        statements = self.count_statements(self.db_a)
        events = [{"type": "message", "i": i} for i in range(500)]
        for event in events:
            self.a.bus.publish(event)
        await wait_until(lambda: len(self.b.received) >= 500, "500 events")
        await self.sync()
        self.assertEqual(self.b.received, events)
        self.assertEqual(self.a.received, [])
        self.assertEqual(statements[:5], [100] * 5)
        self.assertEqual((self.a.restored, self.b.restored), (0, 0))
        self.assertEqual((self.a.listened, self.b.listened), (1, 1))

    async def test_several_turns_arrive_once_in_order(self) -> None:
        """Events published over several turns arrive once each, in order,
        and the events of one turn share one statement."""
        statements = self.count_statements(self.db_a)
        events = [{"turn": t, "i": i} for t in range(10) for i in range(50)]
        for t in range(10):
            for event in events[t * 50:(t + 1) * 50]:
                self.a.bus.publish(event)
            await turn()
        await wait_until(lambda: len(self.b.received) >= 500, "500 events")
        await self.sync()
        self.assertEqual(self.b.received, events)
        self.assertEqual(self.a.received, [])
        # 50 a turn, more when newcomers gathered while a statement ran.
        self.assertLessEqual(len(statements), 11)
        self.assertEqual(sum(statements[:-1]), 500)

    async def test_both_directions(self) -> None:
        """Each node hears the other and not itself."""
        self.a.bus.publish({"from": "a"})
        self.b.bus.publish({"from": "b"})
        await wait_until(lambda: self.a.received and self.b.received, "both")
        await self.sync()
        self.assertEqual(self.a.received, [{"from": "b"}])
        self.assertEqual(self.b.received, [{"from": "a"}])

    async def test_identical_events_all_arrive(self) -> None:
        """PostgreSQL folds identical payloads of one transaction into one;
        the same event published three times in one turn still arrives
        three times."""
        for _ in range(3):
            self.a.bus.publish({"type": "typing", "chatId": "c"})
        await wait_until(lambda: len(self.b.received) >= 3, "three events")
        await self.sync()
        self.assertEqual(self.b.received, [{"type": "typing", "chatId": "c"}] * 3)

    async def test_size_limit(self) -> None:
        """An event whose payload would be over MAX_PAYLOAD is refused with
        ValueError at once and fits() says False; the largest that fits goes
        through PostgreSQL and arrives whole."""
        big = largest_fitting(self.a.bus)
        self.assertTrue(self.a.bus.fits(big))
        too_big = {"x": big["x"] + "a"}
        self.assertFalse(self.a.bus.fits(too_big))
        with self.assertRaises(ValueError):
            self.a.bus.publish(too_big)
        with self.assertRaises(TypeError):
            self.a.bus.publish(["not", "an", "object"])  # type: ignore[arg-type]
        self.assertGreater(len(big["x"]), MAX_PAYLOAD - 100)
        self.a.bus.publish(big)
        self.a.bus.publish({"after": "big"})
        await wait_until(lambda: len(self.b.received) >= 2, "the big event")
        self.assertEqual(self.b.received, [big, {"after": "big"}])

    async def test_non_ascii(self) -> None:
        """Text beyond ASCII arrives as it was sent, and counts at its size
        in UTF-8 (what PostgreSQL's limit counts); a lone surrogate (which a
        client may escape in its JSON, and no UTF-8 can carry) goes escaped
        and arrives as it was sent too."""
        event = {"name": "Zoë 🙂"}
        lone = {"offer": "\ud800 and \udfff"}
        self.a.bus.publish(event)
        self.a.bus.publish(lone)
        await wait_until(lambda: len(self.b.received) >= 2, "the events")
        self.assertEqual(self.b.received, [event, lone])
        self.assertTrue(self.a.bus.fits({"x": "é" * (MAX_PAYLOAD // 2 - 50)}))
        self.assertFalse(self.a.bus.fits({"x": "é" * (MAX_PAYLOAD // 2 + 1)}))

    async def test_malformed_notifications_are_ignored(self) -> None:
        """Notifications on the channel that are not the bus's envelope are
        ignored with a warning that does not repeat what they said."""
        logs = capture_logs(self)
        for payload in ("garbage-payload", '{"x":1}', "[1,2]", '{"n":"z","e":5}',
                        '{"n":7,"e":{}}', '{"n":"node-z","s":1,"e":{}', "[" * 100_000,
                        '{"n":"node-z","s":1,"es":[]}', '{"n":"node-z","s":1,"es":[{},5]}',
                        '{"n":"node-z","s":1,"es":{}}'):
            await self.db_a.run_query("SELECT pg_notify(?, ?)", (CHANNEL, payload[:7999]))
        self.a.bus.publish({"fine": True})
        await wait_until(lambda: self.b.received, "the good event")
        await self.sync()
        self.assertEqual(self.b.received, [{"fine": True}])
        # Once for each node: both hear them.
        warnings = [m for m in messages(logs, "warn") if "malformed" in m]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertNotIn("garbage", " ".join(messages(logs)))

    async def test_sent_to_some_nodes(self) -> None:
        """An event sent to some nodes reaches them alone (on each one's
        channel), in order with what was sent to all."""
        db_c = self.database(self.url)
        await db_c.when_ready()
        c = self.node(db_c, self.url, "node-c")
        await wait_until(lambda: c.bus.listening, "c's LISTEN")
        self.a.bus.publish({"to": "b"}, to=["node-b"])
        self.a.bus.publish({"to": "all"})
        self.a.bus.publish({"to": "b and c"}, to=["node-b", "node-c"])
        await wait_until(lambda: len(c.received) >= 2, "c's two")
        await self.sync()
        self.assertEqual(self.b.received, [{"to": "b"}, {"to": "all"}, {"to": "b and c"}])
        self.assertEqual([e for e in c.received if "to" in e], [{"to": "all"}, {"to": "b and c"}])
        self.assertNotEqual(node_channel("node-b"), node_channel("node-c"))
        self.assertLessEqual(len(node_channel("n" * 1000)), 63)

    async def test_failing_listener(self) -> None:
        """A listener whose bus_event raises is logged and does not stop the
        events after it."""
        seen: list[dict[str, Any]] = []

        def on_event(event: dict[str, Any]) -> None:
            seen.append(event)
            if event.get("bad"):
                raise ZeroDivisionError("owner bug")

        self.b.hear = on_event
        self.a.bus.publish({"bad": True})
        self.a.bus.publish({"bad": False})
        await wait_until(lambda: len(seen) >= 2, "both events")
        await turn()
        self.a.bus.publish({"later": 1})
        await wait_until(lambda: len(seen) >= 3, "a later event")
        self.assertEqual(seen, [{"bad": True}, {"bad": False}, {"later": 1}])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    async def test_a_refused_publish_is_tried_again(self) -> None:
        """A publish the database refuses as unavailable (a broken pool
        connection after a restart) is tried again shortly, in order: every
        event arrives once and nothing is reported dropped."""
        logs = capture_logs(self)
        # "Shortly": PUBLISH_RETRY_DELAY, a quarter of a second, made short.
        self.patch(bus_module, "PUBLISH_RETRY_DELAY", 0.02)
        run_query = self.db_a.run_query
        refusals = [2]

        async def flaky(sql: str, params: Any = ()) -> Any:
            if "pg_notify" in sql and refusals[0]:
                refusals[0] -= 1
                raise DatabaseUnavailable("the connection broke")
            return await run_query(sql, params)

        self.db_a.run_query = flaky  # type: ignore[method-assign]
        events = [{"n": n} for n in range(5)]
        for event in events:
            self.a.bus.publish(event)
        await wait_until(lambda: len(self.b.received) >= 5, "the events, tried again")
        await self.sync()
        self.assertEqual(self.b.received, events)
        self.assertEqual(refusals, [0])
        self.assertFalse([m for m in messages(logs, "warn") if "dropp" in m])

    async def test_stop_sends_what_was_published(self) -> None:
        """stop() sends the events published before it, then returns; a
        publish after stop() is dropped without an error (still checked for
        size)."""
        events = [{"i": i} for i in range(250)]
        for event in events:
            self.a.bus.publish(event)
        await self.a.bus.stop()
        self.assertFalse(self.a.bus.listening)
        self.a.bus.publish({"after": "stop"})
        with self.assertRaises(ValueError):
            self.a.bus.publish({"x": "a" * MAX_PAYLOAD})
        # A third node's marker reaches b after everything a sent.
        third = PostgresBus(self.db_b, self.url, "node-c", reactor)
        third.publish({"marker": 1})
        await wait_until(lambda: {"marker": 1} in self.b.received, "the marker")
        self.assertEqual(self.b.received, [*events, {"marker": 1}])
        await self.a.bus.stop()  # again: harmless

    async def test_concurrent_stops(self) -> None:
        """Two stop() calls at once both return when the bus has stopped."""
        self.a.bus.publish({"i": 1})
        first = Deferred.fromCoroutine(self.a.bus.stop())
        second = Deferred.fromCoroutine(self.a.bus.stop())
        await first
        await second
        await wait_until(lambda: self.b.received, "the event")
        self.assertEqual(self.b.received, [{"i": 1}])


def unused_postgres_bus(node_id: str = "solo") -> PostgresBus:
    """A PostgresBus that is never started (its database is not either)."""
    url = "postgresql:///x"
    return PostgresBus(PostgresDatabase(url, reactor, on_fatal=lambda message: None), url,
                       node_id, reactor)


class LocalBusTests(TestCase):
    def test_local_bus(self) -> None:
        """A single node's bus is not shared: it accepts what fits, sends
        nothing anywhere, applies the same size rule, listens from start()
        to stop(), and tells its listener bus_listening once, at start()."""
        bus = LocalBus("solo")
        node = Node(bus)
        self.assertFalse(bus.shared)
        self.assertFalse(bus.listening)
        bus.start()
        self.assertTrue(bus.listening)
        self.assertEqual((node.listened, node.restored), (1, 0))
        bus.start()  # again: nothing more
        self.assertEqual(node.listened, 1)
        bus.publish({"type": "message"})
        self.assertEqual(node.received, [])
        big = largest_fitting(bus)
        self.assertEqual(big, largest_fitting(unused_postgres_bus()))
        bus.publish(big)
        too_big = {"x": big["x"] + "a"}
        self.assertFalse(bus.fits(too_big))
        with self.assertRaises(ValueError):
            bus.publish(too_big)
        self.assertEqual(node.received, [])
        self.assertEqual(bus.published, 2)
        self.successResultOf(Deferred.fromCoroutine(bus.stop()))
        self.assertFalse(bus.listening)

    def test_node_id_required(self) -> None:
        """A bus needs a node id."""
        with self.assertRaises(ValueError):
            LocalBus("")


class ListenerTests(TestCase):
    """The bus interface's rules for its listener, on each engine."""

    def buses(self) -> list[Bus]:
        return [LocalBus("solo"), unused_postgres_bus()]

    def test_start_without_listener_is_refused(self) -> None:
        """A bus nobody listens to refuses to start, with RuntimeError, and
        does not start: it is not listening, and starts once it has one."""
        for bus in self.buses():
            with self.assertRaises(RuntimeError):
                bus.start()
            self.assertFalse(bus.listening)
        local = LocalBus("solo")
        with self.assertRaises(RuntimeError):
            local.start()
        node = Node(local)
        local.start()
        self.assertEqual(node.listened, 1)

    def test_second_listener_is_refused(self) -> None:
        """listen() takes one listener: a second call raises RuntimeError
        and the first listener stays the one the bus tells."""
        for bus in self.buses():
            first = Node(bus)
            with self.assertRaises(RuntimeError):
                Node(bus)
            self.assertIs(bus.listener, first)

    def test_shared(self) -> None:
        """Only a bus whose events other nodes may hear says it is shared."""
        self.assertEqual([bus.shared for bus in self.buses()], [False, True])


class _Silent(Protocol):
    """Hangs up on the first connection; accepts the others and never says
    a word, like a server that hangs."""

    def connectionMade(self) -> None:
        made = self.factory.made  # type: ignore[attr-defined]
        made.append(self)
        self.closed: Deferred[None] = Deferred()
        if len(made) == 1:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class UnreachableTests(BusTestsMixin, TestCase):
    timeout = 30

    async def test_stop_while_unreachable(self) -> None:
        """With PostgreSQL never reachable, publishing neither raises nor
        logs errors, the password never reaches the log, and stop() returns
        at once."""
        logs = capture_logs(self)
        # Its publishes are tried again every PUBLISH_RETRY_DELAY (a quarter
        # of a second), made short: the test waits for two retries.
        self.patch(bus_module, "PUBLISH_RETRY_DELAY", 0.02)
        url = "postgresql://postgres:hunter2-secret@/nothing?host=/nonexistent-cyphr-dir"
        db = PostgresDatabase(url, reactor, on_fatal=self.fail, pool_size=1)
        node = self.node(db, url, "lonely")
        for i in range(10):
            node.bus.publish({"i": i})
        await wait_until(lambda: node.bus._publish_failures >= 3, "a retry or two")
        await wait_until(lambda: any("cannot reach" in m for m in messages(logs, "warn")),
                         "the listener's warning")
        self.assertFalse(node.bus.listening)
        started = reactor.seconds()
        await node.bus.stop()
        self.assertLess(reactor.seconds() - started, 0.5)
        self.assertTrue(any("cannot reach" in m for m in messages(logs, "warn")))
        self.assertTrue(any("10 event(s) were dropped" in m for m in messages(logs, "warn")))
        self.assertNotIn("hunter2", repr(logs))

    def silent_server(self) -> tuple[list[_Silent], str]:
        """A server that hangs up on the first connection and lets the
        others hang; the list of its connections, and its URL."""
        factory = Factory.forProtocol(_Silent)
        factory.made = made = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        async def stop() -> None:
            await port.stopListening()
            for protocol in made:
                protocol.transport.loseConnection()
                await protocol.closed

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return made, f"postgresql://postgres@127.0.0.1:{port.getHost().port}/nothing"

    async def test_stop_while_connecting(self) -> None:
        """stop() does not wait for a reconnection attempt to time out."""
        made, url = self.silent_server()
        node = self.node(PostgresDatabase(url, reactor, on_fatal=self.fail), url, "hanging")
        await wait_until(lambda: len(made) == 2, "a second connection attempt")
        started = reactor.seconds()
        await node.bus.stop()
        self.assertLess(reactor.seconds() - started, 0.5)
        await made[1].closed

    async def test_connection_attempts_time_out(self) -> None:
        """A connection attempt that gets no answer is given up after
        connect_timeout, and another follows."""
        made, url = self.silent_server()
        url += "?connect_timeout=1"
        node = self.node(PostgresDatabase(url, reactor, on_fatal=self.fail), url, "patient")
        await wait_until(lambda: len(made) == 2, "a second connection attempt")
        started = reactor.seconds()
        await made[1].closed
        self.assertLess(reactor.seconds() - started, 1.5)
        await wait_until(lambda: len(made) == 3, "a third connection attempt", seconds=3)
        self.assertFalse(node.bus.listening)

    async def test_stop_without_start(self) -> None:
        """stop() on a bus that never started returns at once."""
        url = "postgresql://postgres@/nothing?host=/nonexistent-cyphr-dir&port=5432"
        bus = PostgresBus(PostgresDatabase(url, reactor, on_fatal=self.fail), url, "idle", reactor)
        bus.publish({"i": 1})
        await bus.stop()
        self.assertFalse(bus.listening)


class OutageTests(BusTestsMixin, TestCase):
    """Each test stops PostgreSQL: the tests run on the cluster of those
    that do (postgres.stoppable_cluster), not the shared one."""

    timeout = 90

    async def setUp(self) -> None:
        self.cluster = await deferToThread(postgres.stoppable_cluster)
        self.url = await deferToThread(self.cluster.create_database)

    async def test_restart(self) -> None:
        """When PostgreSQL restarts, publishing during the outage neither
        raises nor leaves errors (the events are dropped and counted); once
        it is back, each node LISTENs again, bus_restored fires once, and
        events flow again."""
        # The outage's publishes are dropped after their retries: made short.
        self.patch(bus_module, "PUBLISH_RETRY_DELAY", 0.02)
        self.patch(bus_module, "PUBLISH_RETRIES", 3)
        logs = capture_logs(self)
        db_a, db_b = self.database(self.url), self.database(self.url)
        await db_a.when_ready()
        await db_b.when_ready()
        a, b = self.node(db_a, self.url, "a"), self.node(db_b, self.url, "b")
        await wait_until(lambda: a.bus.listening and b.bus.listening, "LISTEN")
        a.bus.publish({"before": 1})
        await wait_until(lambda: b.received, "an event before the outage")

        await deferToThread(self.cluster.stop)
        await wait_until(lambda: not a.bus.listening and not b.bus.listening, "the loss")
        for i in range(10):
            a.bus.publish({"during": i})
            await turn()
        await wait_until(lambda: any("dropping" in m for m in messages(logs, "warn")),
                         "the warning")
        self.assertEqual((a.restored, b.restored), (0, 0))

        await deferToThread(self.cluster.start)
        await wait_until(lambda: a.restored and b.restored and db_a.ready, "recovery")
        self.assertTrue(a.bus.listening and b.bus.listening)
        events = [{"after": i} for i in range(100)]
        for event in events:
            a.bus.publish(event)
        await wait_until(lambda: len(b.received) >= 101, "events after the outage")
        self.assertEqual(b.received, [{"before": 1}, *events])
        self.assertEqual((a.restored, b.restored), (1, 1))
        self.assertEqual((a.listened, b.listened), (1, 1))  # only the first LISTEN
        warnings = messages(logs, "warn")
        self.assertEqual(len([m for m in warnings if "dropping" in m]), 1, warnings)
        self.assertIn("Event bus: 10 event(s) were dropped while PostgreSQL was unavailable",
                      warnings)
        self.assertEqual(a.received, [])

    async def test_down_at_start(self) -> None:
        """A bus started while PostgreSQL is down LISTENs once it comes up;
        that first LISTEN is not a restoration. An event published while
        it was down is tried again for a few seconds (PUBLISH_RETRIES): it
        arrives, once and first, if the other node listens by then."""
        await deferToThread(self.cluster.stop)
        logs = capture_logs(self)
        db_a, db_b = self.database(self.url), self.database(self.url)
        a, b = self.node(db_a, self.url, "a"), self.node(db_b, self.url, "b")
        a.bus.publish({"lost": True})
        # Until the publish has been refused once, and a listener's
        # connection too (not a guessed half second).
        await wait_until(lambda: a.bus._publish_failures >= 1, "the publish refused")
        await wait_until(lambda: any("cannot reach" in m for m in messages(logs, "warn")),
                         "a listener refused")
        self.assertFalse(b.bus.listening)

        await deferToThread(self.cluster.start)
        await wait_until(lambda: a.bus.listening and b.bus.listening and db_a.ready, "LISTEN")
        a.bus.publish({"found": True})
        await wait_until(lambda: {"found": True} in b.received, "an event")
        self.assertIn(b.received, ([{"found": True}], [{"lost": True}, {"found": True}]))
        self.assertEqual((a.restored, b.restored), (0, 0))
        self.assertEqual((a.listened, b.listened), (1, 1))


class PoolDeadlineTests(TestCase):
    """The pool's connection attempts have the same deadline as the bus's."""

    timeout = 30

    async def test_pool_gives_up_on_a_silent_server(self) -> None:
        factory = Factory.forProtocol(_Silent)
        factory.made = made = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        url = f"postgresql://postgres@127.0.0.1:{port.getHost().port}/nothing?connect_timeout=1"
        db = PostgresDatabase(url, reactor, on_fatal=self.fail, pool_size=1)
        db.start()
        await wait_until(lambda: len(made) >= 1, "a connection attempt")
        started = reactor.seconds()
        await made[0].closed  # given up, not waited on for ever
        self.assertLess(reactor.seconds() - started, 1.5)
        await wait_until(lambda: len(made) >= 2, "another attempt", seconds=4)
        started = reactor.seconds()
        await db.close()
        self.assertLess(reactor.seconds() - started, 0.5)
        await port.stopListening()
        for protocol in made:
            protocol.transport.loseConnection()
            await protocol.closed
