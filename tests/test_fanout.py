"""
The change feed (cyphr.changes), the bus envelopes
(cyphr.realtime.envelopes) and the fan-out adapter (cyphr.realtime.fanout)
alone, on an in-memory bus. The PostgreSQL bus between real nodes is tested
in test_realtime_cluster and test_realtime_bus.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cyphr.changes import ChangeFeed, IdentityDeleted, MemberJoined, MessageStored, SessionsEnded
from cyphr.realtime.bus import Bus, LocalBus
from cyphr.realtime.envelopes import (
    Emitted,
    EndSessions,
    Heartbeat,
    Hello,
    Joined,
    Left,
    MalformedEnvelope,
    MessageAnnounced,
    PresenceChanged,
    PresenceList,
    Unwatching,
    WatchNoted,
    Watching,
    decode,
    encode,
)
from cyphr.realtime.fanout import FanOut
from cyphr.wire import Outbound

EVERY_KIND = [
    (MessageAnnounced("c1", 7, '{"id":"m"}'), {"t": "m", "c": "c1", "s": 7, "m": '{"id":"m"}'}),
    (MessageAnnounced("c1", 7), {"t": "m", "c": "c1", "s": 7}),
    (Emitted(("user:a", "chat:b"), "user_typing", {"x": [1]}, "a"),
     {"t": "e", "r": ["user:a", "chat:b"], "e": "user_typing", "d": {"x": [1]}, "u": "a"}),
    (Emitted(("user:a",), "call_end", None), {"t": "e", "r": ["user:a"], "e": "call_end", "d": None}),
    (Joined("c1", "alice", 3), {"t": "j", "c": "c1", "u": "alice", "s": 3}),
    (Left("c1", "alice"), {"t": "l", "c": "c1", "u": "alice"}),
    (EndSessions("alice", "jti-1"), {"t": "k", "u": "alice", "j": "jti-1"}),
    (EndSessions("alice"), {"t": "k", "u": "alice", "j": None}),
    (EndSessions("alice", None, "d" * 64), {"t": "k", "u": "alice", "j": None, "d": "d" * 64}),
    (PresenceChanged("n1", "alice", True), {"t": "p", "n": "n1", "u": "alice", "o": 1}),
    (PresenceChanged("n1", "alice", False), {"t": "p", "n": "n1", "u": "alice", "o": 0}),
    (PresenceList("n1", ("alice", "bob")), {"t": "P", "n": "n1", "us": ["alice", "bob"]}),
    (Hello("n1"), {"t": "hello", "n": "n1", "r": 1}),
    (Hello("n1", routed=False), {"t": "hello", "n": "n1"}),
    (Heartbeat("n1"), {"t": "h", "n": "n1", "r": 1}),
    (Heartbeat("n1", routed=False), {"t": "h", "n": "n1"}),
    (Watching("n1", ("c1", "c2"), 7), {"t": "w", "n": "n1", "cs": ["c1", "c2"], "k": 7}),
    (Watching("n1", (), 8, reset=True), {"t": "w", "n": "n1", "cs": [], "k": 8, "x": 1}),
    (Unwatching("n1", ("c1",)), {"t": "u", "n": "n1", "cs": ["c1"]}),
    (WatchNoted("n1", 7), {"t": "wn", "n": "n1", "k": 7}),
]


class EnvelopeTests(SynchronousTestCase):
    def test_wire_form(self) -> None:
        """Every kind encodes to the compact form nodes have always
        exchanged (so that two versions understand each other during a
        rolling upgrade), and decodes back to an equal envelope."""
        for envelope, wire in EVERY_KIND:
            self.assertEqual(encode(envelope), wire)
            self.assertEqual(decode(wire), envelope)

    def test_malformed_is_refused(self) -> None:
        """A known kind with a field of the wrong type, a missing field, or
        something that is not an object is MalformedEnvelope; nothing half
        built comes out."""
        for bad in [[], "m", None, {"t": "m", "c": "c1", "s": "7"}, {"t": "m", "s": 7},
                    {"t": "e", "r": "user:a", "e": "x", "d": 1}, {"t": "e", "r": [1], "e": "x"},
                    {"t": "j", "c": "c1", "u": 5}, {"t": "k", "u": "a", "j": 3},
                    {"t": "p", "u": "a", "o": 1}, {"t": "P", "n": "n1", "us": [None]},
                    {"t": "h"}, {"t": "m", "c": "c1", "s": True}, {"t": 5},
                    {"t": "w", "n": "n1", "cs": "c1", "k": 1}, {"t": "w", "n": "n1", "cs": []},
                    {"t": "u", "n": "n1"}, {"t": "wn", "n": "n1", "k": "1"}]:
            with self.assertRaises(MalformedEnvelope, msg=repr(bad)):
                decode(bad)

    def test_unknown_kind_is_ignored(self) -> None:
        """A kind this version does not know (a newer node's) decodes to
        None, which the receiver ignores."""
        self.assertIsNone(decode({"t": "device_linked", "u": "alice"}))


class RecordingBus(Bus):
    """A shared bus in memory: what is published is kept, with the size
    rule of every bus."""

    def __init__(self, node_id: str = "here") -> None:
        super().__init__(node_id)
        self.sent: list[dict[str, Any]] = []
        self.to: list[tuple[str, ...] | None] = []  # where each went (None: all)

    @property
    def listening(self) -> bool:
        return True

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def publish(self, event: dict[str, Any], to: Any = None) -> None:
        self._body(event)
        self.sent.append(event)
        self.to.append(None if to is None else tuple(sorted(to)))

    def envelopes(self) -> list[tuple[Any, tuple[str, ...] | None]]:
        """What was published, decoded, with where it went; then forgotten."""
        out = [(decode(event), to) for event, to in zip(self.sent, self.to)]
        self.sent.clear()
        self.to.clear()
        return out


class RecordingHere:
    """This node's part of each action, written down."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.online: dict[str, set[str]] = {}   # user -> the other nodes it is on
        self.watched: list[str] = []            # chats with a feed here
        self.rechecked: list[tuple[str, ...]] = []

    def nodes_of(self, cyphr_id: str) -> set[str]:
        return self.online.get(cyphr_id, set())

    def watched_here(self) -> list[str]:
        return self.watched

    def recheck(self, chat_ids: tuple[str, ...]) -> None:
        self.rechecked.append(chat_ids)

    def emit_here(self, rooms: Any, event: str, data: Any, skip_user: str | None) -> None:
        self.calls.append(("emit", tuple(rooms), event, data, skip_user))

    def join_here(self, chat_id: str, cyphr_id: str, last_seq: int) -> None:
        self.calls.append(("join", chat_id, cyphr_id, last_seq))

    def leave_here(self, chat_id: str, cyphr_id: str) -> None:
        self.calls.append(("leave", chat_id, cyphr_id))

    def end_here(self, cyphr_id: str, jti: str | None, device: str | None) -> None:
        self.calls.append(("end", cyphr_id, jti, device))

    def message_here(self, chat_id: str, seq: int, message: Outbound | None, origin: Any) -> None:
        self.calls.append(("message", chat_id, seq, message, origin))

    def node_event(self, envelope: Any) -> None:
        self.calls.append(("node", envelope))

    def bus_listening(self) -> None:
        self.calls.append(("listening",))

    def bus_restored(self) -> None:
        self.calls.append(("restored",))


class FanOutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.bus = RecordingBus()
        self.here = RecordingHere()
        self.clock = Clock()
        self.fanout = FanOut(self.bus, self.here, self.clock)
        # Another node, of an older version (it does not route): everything
        # is published to all, as before routing.
        self.fanout.bus_event(encode(Heartbeat("old", routed=False)))
        self.bus.envelopes()
        self.here.calls.clear()

    def test_each_action_here_then_published(self) -> None:
        """Each routing action does this node's part and publishes its
        envelope for the others (to all, while a node that does not route
        is heard)."""
        origin = object()
        self.fanout.to_users(["alice"], "call_end", {"callId": "c"})
        self.fanout.join("c1", "bob", 4)
        self.fanout.leave("c1", "bob")
        self.fanout.end_sessions("bob", None)
        self.fanout.message("c1", 5, Outbound('{"id":"m"}'), origin)
        self.assertEqual(self.here.calls, [
            ("emit", ("user:alice",), "call_end", {"callId": "c"}, None),
            ("join", "c1", "bob", 4),
            ("leave", "c1", "bob"),
            ("end", "bob", None, None),
            ("message", "c1", 5, Outbound('{"id":"m"}'), origin),
        ])
        self.assertEqual([decode(e) for e in self.bus.sent], [
            Emitted(("user:alice",), "call_end", {"callId": "c"}),
            Joined("c1", "bob", 4), Left("c1", "bob"), EndSessions("bob"),
            MessageAnnounced("c1", 5, '{"id":"m"}'),
        ])

    def test_many_rooms_go_in_chunks(self) -> None:
        """An event for 250 rooms reaches them all here at once and goes to
        the other nodes in envelopes of at most 100 rooms."""
        rooms = [f"user:u{i}" for i in range(250)]
        self.assertTrue(self.fanout.to_rooms(rooms, "user_online", {"userId": "a"}))
        self.assertEqual(len(self.here.calls[0][1]), 250)
        self.assertEqual([len(e["r"]) for e in self.bus.sent], [100, 100, 50])

    def test_too_large(self) -> None:
        """An event over the bus limit still reaches this node's sockets and
        answers False; a message over it is announced without its text, for
        the other nodes to fetch."""
        big = "x" * 10_000
        self.assertFalse(self.fanout.to_users(["alice"], "incoming_call", {"offer": big}))
        self.assertEqual(self.here.calls[0][2], "incoming_call")
        self.assertEqual(self.bus.sent, [])
        self.fanout.message("c1", 9, Outbound('{"p":"%s"}' % big), None)
        self.assertEqual([decode(e) for e in self.bus.sent], [MessageAnnounced("c1", 9)])

    def test_envelopes_are_fetched(self) -> None:
        """A message sent over sessions reaches this node's sockets with its
        envelopes, and is announced without its text, however small: the
        other nodes fetch it with the envelopes of their devices."""
        message = Outbound('{"id":"m"}', {("bob", 2): '{"kind":"message","envelope":"AA=="}'})
        self.fanout.message("c1", 3, message, None)
        self.assertEqual(self.here.calls, [("message", "c1", 3, message, None)])
        self.assertEqual([decode(e) for e in self.bus.sent], [MessageAnnounced("c1", 3)])

    def test_bus_events_done_here(self) -> None:
        """An envelope from another node does this node's part, with no
        origin and nothing published again but the answers routing asks
        for; node envelopes go to node_event; a malformed one is counted
        and changes nothing."""
        for envelope, _ in EVERY_KIND:
            self.fanout.bus_event(encode(envelope))
        self.fanout.bus_event({"t": "j", "c": 5})
        self.fanout.bus_event({"t": "not-yet-invented"})
        # Published in answer only: this node's (empty) list to the node
        # that said hello, and a WatchNoted for each Watching.
        self.assertEqual(self.bus.envelopes(), [
            (Watching("here", (), 1, reset=True), ("n1",)),
            (WatchNoted("here", 7), ("n1",)), (WatchNoted("here", 8), ("n1",))])
        self.assertEqual(self.fanout.malformed, 1)
        kinds = [call[0] for call in self.here.calls]
        self.assertEqual(kinds, ["message", "message", "emit", "emit", "join", "leave", "end", "end",
                                 "end", "node", "node", "node", "node", "node", "node", "node"])
        self.assertEqual(self.here.calls[1], ("message", "c1", 7, None, None))
        self.assertEqual(self.here.calls[2], ("emit", ("user:a", "chat:b"), "user_typing",
                                              {"x": [1]}, "a"))

    def test_single_node_publishes_nothing(self) -> None:
        """On one node (LocalBus) every action is done here only."""
        bus = LocalBus("solo")
        here = RecordingHere()
        fanout = FanOut(bus, here, Clock())
        self.assertTrue(fanout.to_users(["a"], "x", {"big": "y" * 20_000}))
        fanout.message("c1", 1, Outbound("{}"), None)
        self.assertEqual(bus.published, 0)
        self.assertEqual([c[0] for c in here.calls], ["emit", "message"])

    def test_one_listener(self) -> None:
        """A bus has one listener: a second is refused, and a bus nobody
        listens to refuses to start."""
        with self.assertRaises(RuntimeError):
            self.bus.listen(RecordingHere())  # type: ignore[arg-type]
        with self.assertRaises(RuntimeError):
            LocalBus("solo").start()


class RoutingTests(SynchronousTestCase):
    """A node sends another only what that node has sockets for
    (cyphr.realtime.fanout, "Routing"); here node "here" among others that
    route, on an in-memory bus."""

    def setUp(self) -> None:
        self.bus = RecordingBus()
        self.here = RecordingHere()
        self.clock = Clock()
        self.fanout = FanOut(self.bus, self.here, self.clock)

    def hear(self, *envelopes: Any) -> None:
        for envelope in envelopes:
            self.fanout.bus_event(encode(envelope))

    def test_alone_publishes_no_message_nor_event(self) -> None:
        """With no other node watching or holding anyone, messages, chat
        and user events are done here and published nowhere; joins, leaves
        and ended sessions still go to all (an ended session must reach a
        socket whose presence is on its way)."""
        self.fanout.message("c1", 1, Outbound('{"id":"m"}'), None)
        self.fanout.to_rooms(["chat:c1"], "user_typing", {"chatId": "c1"})
        self.fanout.to_users(["alice"], "message_read", {"chatId": "c1"})
        self.assertEqual(self.bus.envelopes(), [])
        self.assertEqual([call[0] for call in self.here.calls], ["message", "emit", "emit"])
        self.fanout.join("c1", "bob", 1)
        self.fanout.leave("c1", "bob")
        self.fanout.end_sessions("bob", "jti")
        self.assertEqual(self.bus.envelopes(), [
            (Joined("c1", "bob", 1), None), (Left("c1", "bob"), None),
            (EndSessions("bob", "jti"), None)])

    def test_messages_go_to_the_nodes_watching(self) -> None:
        """A chat's messages go to each node that said it watches the chat,
        and to no other; a Watching is answered with WatchNoted to its node
        alone; Unwatching and a node's silence end it."""
        self.hear(Watching("b", ("c1",), 5))
        self.assertEqual(self.bus.envelopes(), [(WatchNoted("here", 5), ("b",))])
        self.fanout.message("c1", 1, Outbound('{"id":"m1"}'), None)
        self.fanout.message("c2", 1, Outbound('{"id":"m2"}'), None)
        self.assertEqual(self.bus.envelopes(), [(MessageAnnounced("c1", 1, '{"id":"m1"}'), ("b",))])
        self.hear(Watching("c", ("c1", "c2"), 1))
        self.bus.envelopes()
        self.fanout.message("c1", 2, Outbound("{}"), None)
        self.assertEqual(self.bus.envelopes(), [(MessageAnnounced("c1", 2, "{}"), ("b", "c"))])
        self.hear(Unwatching("b", ("c1",)))
        self.fanout.message("c1", 3, Outbound("{}"), None)
        self.assertEqual(self.bus.envelopes(), [(MessageAnnounced("c1", 3, "{}"), ("c",))])
        self.fanout.forget_node("c")
        self.fanout.message("c1", 4, Outbound("{}"), None)
        self.fanout.message("c2", 2, Outbound("{}"), None)
        self.assertEqual(self.bus.envelopes(), [])
        self.assertEqual(self.fanout.memory_tables()["fanout_watched_chats"], 0)

    def test_events_go_where_their_rooms_are(self) -> None:
        """An event for a chat's room goes to the nodes watching the chat;
        for a user's room, to the nodes where the user is online; for any
        other room, to all; with ``everywhere``, to all."""
        self.hear(Watching("b", ("c1",), 1))
        self.here.online["alice"] = {"c", "d"}
        self.bus.envelopes()
        self.fanout.to_rooms(["chat:c1"], "user_typing", {"x": 1})
        self.fanout.to_users(["alice", "nobody"], "message_read", {"x": 2})
        self.fanout.to_rooms(["chat:c1", "user:alice"], "e", None)
        self.fanout.to_rooms(["chat:c2"], "user_typing", {"x": 3})
        self.fanout.to_rooms(["lobby"], "e", None)
        self.fanout.to_rooms(["user:nobody"], "marker", None, everywhere=True)
        self.assertEqual(self.bus.envelopes(), [
            (Emitted(("chat:c1",), "user_typing", {"x": 1}), ("b",)),
            (Emitted(("user:alice", "user:nobody"), "message_read", {"x": 2}), ("c", "d")),
            (Emitted(("chat:c1", "user:alice"), "e", None), ("b", "c", "d")),
            (Emitted(("lobby",), "e", None), None),
            (Emitted(("user:nobody",), "marker", None), None)])

    def test_own_feeds_are_announced_once_a_turn(self) -> None:
        """The chats whose feeds open and close in one turn of the reactor
        are announced together at its end; each other node's WatchNoted for
        a Watching makes this node recheck those chats in the database (the
        window a node's commit could fall in before it took the Watching
        in); a WatchNoted for an unknown or expired token does nothing."""
        self.fanout.watch("c1")
        self.fanout.watch("c2")
        self.fanout.watch("c3")
        self.fanout.unwatch("c2")
        self.assertEqual(self.bus.envelopes(), [])
        self.clock.advance(0)
        self.assertEqual(self.bus.envelopes(), [
            (Unwatching("here", ("c2",)), None), (Watching("here", ("c1", "c3"), 1), None)])
        self.hear(WatchNoted("b", 1), WatchNoted("c", 1), WatchNoted("b", 99))
        self.assertEqual(self.here.rechecked, [("c1", "c3"), ("c1", "c3")])
        self.clock.advance(121)
        self.fanout.watch("c4")
        self.clock.advance(0)
        self.bus.envelopes()
        self.hear(WatchNoted("b", 1))
        self.assertEqual(len(self.here.rechecked), 2)
        self.assertEqual(self.fanout.memory_tables()["fanout_watch_tokens"], 1)

    def test_flushed_at_a_stop(self) -> None:
        """At a stop the feeds' closing is published at once (before the
        bus stops), with nothing left for a later turn."""
        self.fanout.watch("c1")
        self.clock.advance(0)
        self.bus.envelopes()
        self.fanout.unwatch("c1")
        self.fanout.flush()
        self.assertEqual(self.bus.envelopes(), [(Unwatching("here", ("c1",)), None)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_many_chats_in_chunks(self) -> None:
        """250 chats opened at once go in Watching of at most 100 chats,
        each with its own token."""
        for n in range(250):
            self.fanout.watch(f"chat-{n:03}")
        self.clock.advance(0)
        sent = self.bus.envelopes()
        self.assertEqual([len(envelope.chats) for envelope, _ in sent], [100, 100, 50])
        self.assertEqual([envelope.token for envelope, _ in sent], [1, 2, 3])

    def test_a_node_starting_is_sent_the_whole_list(self) -> None:
        """A node's Hello drops what it watched before (it starts with no
        feed) and is answered, to it alone, with this node's whole list,
        which replaces what it knew; the list is said to all once the bus
        listens and again after it was away."""
        self.here.watched = ["c9", "c8"]
        self.hear(Watching("b", ("c1",), 1))
        self.bus.envelopes()
        self.hear(Hello("b"))
        self.assertEqual(self.bus.envelopes(), [(Watching("here", ("c8", "c9"), 1, reset=True), ("b",))])
        self.fanout.message("c1", 1, Outbound("{}"), None)
        self.assertEqual(self.bus.envelopes(), [])
        self.fanout.bus_listening()
        self.fanout.bus_restored()
        self.assertEqual(self.bus.envelopes(), [
            (Watching("here", ("c8", "c9"), 2, reset=True), None),
            (Watching("here", ("c8", "c9"), 3, reset=True), None)])
        self.here.watched = []
        self.fanout.bus_restored()
        self.assertEqual(self.bus.envelopes(), [(Watching("here", (), 4, reset=True), None)])
        # At start, with no feed yet, listening says nothing (the database
        # may not take the bus's statements yet; the Hello says it all).
        self.fanout.bus_listening()
        self.assertEqual(self.bus.envelopes(), [])

    def test_a_whole_list_replaces(self) -> None:
        """A Watching marked as a node's whole list forgets the chats it
        named before."""
        self.hear(Watching("b", ("c1", "c2"), 1), Watching("b", ("c3",), 2, reset=True))
        self.bus.envelopes()
        for chat_id in ("c1", "c2", "c3"):
            self.fanout.message(chat_id, 1, Outbound("{}"), None)
        self.assertEqual(self.bus.envelopes(), [(MessageAnnounced("c3", 1, "{}"), ("b",))])

    def test_a_node_that_does_not_route_gets_everything(self) -> None:
        """While a node of an older version is heard (a heartbeat or hello
        without ``routed``, or presence from a node not known to route),
        messages and events go to all; once it is forgotten, or says it
        routes, routing resumes."""
        self.hear(Heartbeat("old", routed=False))
        self.fanout.message("c1", 1, Outbound("{}"), None)
        self.fanout.to_users(["alice"], "e", None)
        self.assertEqual(self.bus.envelopes(), [
            (MessageAnnounced("c1", 1, "{}"), None), (Emitted(("user:alice",), "e", None), None)])
        self.fanout.forget_node("old")
        self.fanout.message("c1", 2, Outbound("{}"), None)
        self.assertEqual(self.bus.envelopes(), [])
        self.hear(PresenceChanged("new", "bob", True))
        self.fanout.message("c1", 3, Outbound("{}"), None)
        self.assertEqual(self.bus.envelopes(), [(MessageAnnounced("c1", 3, "{}"), None)])
        self.hear(Heartbeat("new"))
        self.fanout.message("c1", 4, Outbound("{}"), None)
        self.assertEqual(self.bus.envelopes(), [])


class ChangeFeedTests(SynchronousTestCase):
    def test_subscribers_by_kind_in_order(self) -> None:
        """A change reaches the subscribers of its kind, in the order they
        subscribed, and no others."""
        feed = ChangeFeed()
        heard: list[tuple[str, Any]] = []
        feed.subscribe(SessionsEnded, lambda c: heard.append(("first", c)))
        feed.subscribe(SessionsEnded, lambda c: heard.append(("second", c)))
        feed.subscribe(IdentityDeleted, lambda c: heard.append(("deleted", c)))
        feed.publish(SessionsEnded("alice", "j1"))
        feed.publish(MemberJoined("c1", "alice"))
        self.assertEqual(heard, [("first", SessionsEnded("alice", "j1")),
                                 ("second", SessionsEnded("alice", "j1"))])

    def test_failing_subscriber(self) -> None:
        """A subscriber that raises is logged, and the ones after it still
        hear the change (it is committed: nobody may miss it)."""
        feed = ChangeFeed()
        heard: list[Any] = []

        def broken(change: Any) -> None:
            raise ZeroDivisionError("broken subscriber")

        feed.subscribe(MessageStored, broken)
        feed.subscribe(MessageStored, heard.append)
        change = MessageStored(message=None)  # type: ignore[arg-type]
        feed.publish(change)
        self.assertEqual(heard, [change])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_only_changes(self) -> None:
        """Subscribing to something that is not a kind of change is a
        mistake caught at once, not a subscriber that never hears anything."""
        with self.assertRaises(TypeError):
            ChangeFeed().subscribe(dict, lambda c: None)
