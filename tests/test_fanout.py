"""
The change feed (cyphr.changes), the bus envelopes
(cyphr.realtime.envelopes) and the fan-out adapter (cyphr.realtime.fanout)
alone, on an in-memory bus. The PostgreSQL bus between real nodes is tested
in test_realtime_cluster and test_realtime_bus.
"""

from __future__ import annotations

from typing import Any

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
    (Hello("n1"), {"t": "hello", "n": "n1"}),
    (Heartbeat("n1"), {"t": "h", "n": "n1"}),
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
                    {"t": "h"}, {"t": "m", "c": "c1", "s": True}, {"t": 5}]:
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

    @property
    def listening(self) -> bool:
        return True

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def publish(self, event: dict[str, Any]) -> None:
        self._body(event)
        self.sent.append(event)


class RecordingHere:
    """This node's part of each action, written down."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

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
        self.fanout = FanOut(self.bus, self.here)

    def test_each_action_here_then_published(self) -> None:
        """Each routing action does this node's part and publishes its
        envelope for the others."""
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
        origin and nothing published again; node envelopes go to node_event;
        a malformed one is counted and changes nothing."""
        for envelope, _ in EVERY_KIND:
            self.fanout.bus_event(encode(envelope))
        self.fanout.bus_event({"t": "j", "c": 5})
        self.fanout.bus_event({"t": "not-yet-invented"})
        self.assertEqual(self.bus.sent, [])
        self.assertEqual(self.fanout.malformed, 1)
        kinds = [call[0] for call in self.here.calls]
        self.assertEqual(kinds, ["message", "message", "emit", "emit", "join", "leave", "end", "end",
                                 "end", "node", "node", "node", "node", "node"])
        self.assertEqual(self.here.calls[1], ("message", "c1", 7, None, None))
        self.assertEqual(self.here.calls[2], ("emit", ("user:a", "chat:b"), "user_typing",
                                              {"x": [1]}, "a"))

    def test_single_node_publishes_nothing(self) -> None:
        """On one node (LocalBus) every action is done here only."""
        bus = LocalBus("solo")
        here = RecordingHere()
        fanout = FanOut(bus, here)
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
