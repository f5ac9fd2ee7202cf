"""
Cyphr's realtime events: authentication, chat, receipts, typing, presence,
calls, the offline catch-up, ordering.

On SQLite they run in memory (tests.memory_socket: the server's own site,
engine and Socket.IO layer, with no port and no thread), where "nothing
else arrived" is an ack barrier. On PostgreSQL they run over a real port
with the stock python-socketio client, on WebSocket and on the polling to
WebSocket upgrade; the rules whose path depends on the transport
(ConnectionRules) run there on SQLite too, on polling and on the upgrade.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr.store.chats import ChatStore
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, start_server
from tests.memory_socket import (
    SERVER_DISCONNECT,
    TRANSPORT_ERROR,
    EagerPumper,
    MemoryConnector,
    MemorySocket,
)
from tests.realtime import SioClient, sessions_at_most, sessions_closed, sleep
from tests.users import User

Client = SioClient | MemorySocket


class RealtimeBase:
    """A served server, users, chats, and stock clients over a real port
    (``transports``: python-socketio's)."""

    transports: list[str] | None = ["websocket"]

    async def serve(self, **overrides: Any) -> None:
        self.server = await start_server(self, serve=True, **overrides)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.http = InProcessHTTP.for_server(self.server)
        self.clients: list[Client] = []
        self.addCleanup(self._close_clients)

    async def _close_clients(self) -> None:
        for client in self.clients:
            if client.connected:
                await client.disconnect()
        await sessions_closed(self.server)

    def new_client(self, transports: list[str] | None = None) -> Client:
        """A client, not connected yet, closed when the test ends."""
        client = SioClient(self.url, transports=transports or self.transports)
        self.clients.append(client)
        return client

    async def user(self, name: str) -> User:
        user = User(name)
        await user.register(self.http)
        return user

    async def connect(self, user: User | None, *, auth: Any = None, sync: bool = True,
                      transports: list[str] | None = None) -> Client:
        """A client connected with ``user``'s token (or ``auth``; or
        nothing), once its catch-up is done (``sync``)."""
        client = self.new_client(transports)
        await client.connect(auth if auth is not None else ({"token": user.token} if user else None))
        if user is not None and sync:
            await client.wait_for("sync_complete")
        return client

    async def direct_chat(self, a: User, b: User) -> str:
        response = await self.http.post("/api/messaging/send", {
            "recipientId": b.cyphr_id, "encryptedPayload": {"hello": True}}, headers=a.auth())
        assert response.code == 201, response.body
        return response.json()["chatId"]

    async def contacts(self, user: User, *others: User) -> None:
        """Direct chats (no message) between ``user`` and ``others``: a
        group admin may add only its contacts."""
        for other in others:
            await ChatStore(self.server.database).direct_chat(user.cyphr_id, other.cyphr_id, 0)

    async def group(self, admin: User, *members: User) -> str:
        await self.contacts(admin, *members)
        response = await self.http.post("/api/messaging/create-group", {
            "members": [m.cyphr_id for m in members]}, headers=admin.auth())
        assert response.code in (200, 201), response.body
        return response.json()["chatId"]


class MemoryRealtimeBase(RealtimeBase):
    """RealtimeBase with in-memory clients (tests.memory_socket.MemorySocket)
    to the same server, which is served all the same (its listening port
    goes unused)."""

    async def serve(self, **overrides: Any) -> None:
        pumper = EagerPumper()
        # Added first, so run last: the server's stop still moves bytes.
        self.addCleanup(pumper.stop)
        self.server = await start_server(self, serve=True, **overrides)
        self.connector = MemoryConnector(self.server, pumper)
        self.http = InProcessHTTP.for_server(self.server)
        self.clients = []
        self.addCleanup(self._close_clients)

    async def _close_clients(self) -> None:
        await super()._close_clients()
        for client in self.clients:
            assert client.unexpected == [], client.unexpected

    def new_client(self, transports: list[str] | None = None, *,
                   answer_pings: bool = True) -> MemorySocket:
        assert transports in (None, ["websocket"]), "in memory, only WebSocket"
        client = MemorySocket(self.connector, answer_pings=answer_pings)
        self.clients.append(client)
        return client


class ConnectionRules(RealtimeBase):
    """The rules whose path depends on the transport: joining (with a token
    or refused), an event and its ack, pushes to other sockets, presence at
    a socket's end, the catch-up before sync_complete, ordering under load.
    Run on every transport over a real port, and in memory."""

    async def test_connect_with_token(self) -> None:
        """A client that connects with a valid token is told
        ``authenticated`` (its user and Cyphr ID), then ``sync_complete``
        with an integer cursor."""
        await self.serve()
        alice = await self.user("alice")
        client = await self.connect(alice)
        [authenticated] = client.events("authenticated")
        self.assertEqual(authenticated, {"userId": "alice", "cyphrId": "alice"})
        [done] = client.events("sync_complete")
        self.assertIsInstance(done["cursor"], int)

    async def test_invalid_token_is_refused(self) -> None:
        """A connect with a token that is none is refused: the client's
        connect fails with connect_error INVALID_TOKEN and a message."""
        # The stock client may drop its Engine.IO CLOSE when it gives up
        # while its CONNECT is still being posted (python-engineio's write
        # loop stops on the state change): the refused session then ends at
        # the connect timeout, kept short here.
        await self.serve(connect_timeout=2)
        client = self.new_client()
        with self.assertRaises(Exception):
            await client.connect({"token": "not-a-token"})
        self.assertEqual(client.connect_errors[0]["data"]["code"], "INVALID_TOKEN")
        self.assertTrue(client.connect_errors[0]["message"])

    async def test_two_users_chat(self) -> None:
        """A message sent over a socket is acked with its id and seq and
        pushed to the recipient and to the sender's other sockets, not to
        the sending socket; a message sent over REST is pushed too."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        a = await self.connect(alice)
        a2 = await self.connect(alice)
        b = await self.connect(bob)
        ack = await a.call("send_message", {
            "recipientId": "bob", "encryptedPayload": {"ct": "AAAA"}, "clientMessageId": "c1"})
        self.assertTrue(ack["success"], ack)
        self.assertEqual(ack["seq"], 1)
        [got] = await b.wait_for("new_message")
        message = got["message"]
        self.assertEqual((message["id"], message["senderId"], message["seq"], message["clientMessageId"]),
                         (ack["messageId"], "alice", 1, "c1"))
        self.assertEqual(message["encryptedPayload"], {"ct": "AAAA"})
        # The sender's other socket hears of it; the sending socket does not.
        await a2.wait_for("new_message")
        reply = await b.call("send_message", {"chatId": ack["chatId"], "encryptedPayload": {"ct": "BBBB"}})
        self.assertEqual(reply["seq"], 2)
        [got] = await a.wait_for("new_message")
        self.assertEqual(got["message"]["senderId"], "bob")
        self.assertEqual(len(a.events("new_message")), 1)
        # The REST route fans out too.
        await self.direct_chat(bob, alice)
        await a.wait_for("new_message", 2)

    async def test_presence(self) -> None:
        """The people one shares a chat with are told ``user_online`` at the
        first socket and ``user_offline`` (with lastSeen) at the last one's
        end, and the profile says so; people sharing no chat hear nothing."""
        await self.serve()
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await self.direct_chat(alice, bob)
        a = await self.connect(alice)
        c = await self.connect(carol)
        b = await self.connect(bob)
        [online] = await a.wait_for("user_online")
        self.assertEqual(online, {"userId": "bob"})
        profile = await self.http.get("/api/cyphr-id/user/bob", headers=alice.auth())
        self.assertTrue(profile.json()["user"]["isOnline"], profile.body)
        b2 = await self.connect(bob)  # a second socket: nobody is told again
        await b.disconnect()
        # Once the server has ended b's session, what it made of that has
        # been sent to a before a's barrier is answered.
        await sessions_at_most(self.server, 3)
        await a.barrier()
        self.assertEqual(a.events("user_offline"), [])
        await b2.disconnect()
        [offline] = await a.wait_for("user_offline")
        self.assertEqual(offline["userId"], "bob")
        self.assertTrue(offline["lastSeen"].endswith("Z"))
        # last_seen may be written just after the event went out. Asked at
        # most 50 times: lookups are rate limited per user.
        for _ in range(50):
            profile = await self.http.get("/api/cyphr-id/user/bob", headers=alice.auth())
            if profile.code == 200 and profile.json()["user"]["lastSeen"] == offline["lastSeen"]:
                break
            await sleep(0.1)
        self.assertEqual(profile.code, 200, profile.body)
        self.assertFalse(profile.json()["user"]["isOnline"])
        self.assertEqual(profile.json()["user"]["lastSeen"], offline["lastSeen"])
        # Carol shares no chat with bob: she saw nothing.
        self.assertEqual(c.events("user_online") + c.events("user_offline"), [])

    async def test_offline_delivery(self) -> None:
        """Messages sent while the recipient was away are pushed on connect,
        in seq order, before ``sync_complete``, whose cursor leaves nothing
        to sync; messages acknowledged as delivered are not pushed again."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        a = await self.connect(alice)
        sent = [await a.call("send_message", {"recipientId": "bob", "encryptedPayload": {"n": n}})
                for n in range(5)]
        b = await self.connect(bob, sync=False)
        await b.wait_for("sync_complete")
        names = [event for event, _ in b.received if event in ("new_message", "sync_complete")]
        self.assertEqual(names, ["new_message"] * 5 + ["sync_complete"])
        self.assertEqual([m["message"]["seq"] for m in b.events("new_message")], [1, 2, 3, 4, 5])
        cursor = b.events("sync_complete")[0]["cursor"]
        synced = await self.http.get(f"/api/messaging/sync?since={cursor}", headers=bob.auth())
        self.assertEqual(synced.json()["messages"], [])
        # Delivered on one socket: not pushed again to another.
        for ack in sent[:3]:
            await b.call("message_delivered", {"messageId": ack["messageId"], "chatId": ack["chatId"]})
        await b.disconnect()
        b2 = await self.connect(bob)
        self.assertEqual([m["message"]["seq"] for m in b2.events("new_message")], [4, 5])

    async def test_ordering_under_concurrent_senders(self) -> None:
        """Three members sending at once: each member receives the group's
        messages once each, in seq order, the listener all 60 of them."""
        await self.serve()
        users = [await self.user(f"user{n}") for n in range(4)]
        chat_id = await self.group(users[0], *users[1:])
        clients = [await self.connect(u) for u in users]
        listener = clients[0]

        async def burst(client: Client, n: int) -> None:
            calls = [client.call("send_message", {"chatId": chat_id, "encryptedPayload": {"n": i}})
                     for i in range(n)]
            results = await DeferredList(calls, consumeErrors=True)
            for ok, ack in results:
                assert ok and ack["success"], ack

        await DeferredList([Deferred.fromCoroutine(burst(c, 20)) for c in clients[1:]],
                           fireOnOneErrback=True, consumeErrors=True)
        got = await listener.wait_for("new_message", 60)
        self.assertEqual([m["message"]["seq"] for m in got], list(range(1, 61)))
        for client in clients[1:]:
            seqs = [m["message"]["seq"] for m in await client.wait_for("new_message", 40)]
            self.assertEqual(seqs, sorted(seqs))
            self.assertEqual(len(seqs), len(set(seqs)))


class EventRules(RealtimeBase):
    """The rules of single events (authenticate, errors, group fan-out,
    receipts, typing, calls): one transport shows them as well as another."""

    async def test_authenticate_event(self) -> None:
        """A socket connected without a token may only authenticate, with a
        valid token (the old userId/publicKey form and a bad token are
        refused); every other event is refused UNAUTHORIZED until then."""
        await self.serve()
        alice = await self.user("alice")
        client = await self.connect(None)
        # The original unauthenticated form proves nothing and is refused.
        refused = await client.call("authenticate", {"userId": "alice", "publicKey": "AAAA"})
        self.assertEqual((refused["success"], refused["code"]), (False, "UNAUTHORIZED"))
        # Before authentication nothing else is allowed.
        refused = await client.call("send_message", {"recipientId": "alice", "encryptedPayload": {}})
        self.assertEqual(refused["code"], "UNAUTHORIZED")
        bad = await client.call("authenticate", {"token": "x.y.z"})
        self.assertEqual((bad["success"], bad["code"]), (False, "INVALID_TOKEN"))
        ack = await client.call("authenticate", {"token": alice.token})
        self.assertEqual(ack, {"success": True, "userId": "alice", "cyphrId": "alice"})
        await client.wait_for("authenticated")
        await client.wait_for("sync_complete")

    async def test_send_errors(self) -> None:
        """A bad send_message is answered with the contract's error code and
        the socket lives; an unknown event is answered UNKNOWN_EVENT."""
        await self.serve()
        alice = await self.user("alice")
        a = await self.connect(alice)
        for data, code in [
            ({"recipientId": "nobody", "encryptedPayload": {}}, "USER_NOT_FOUND"),
            ({"chatId": str(uuid.uuid4()), "encryptedPayload": {}}, "CHAT_NOT_FOUND"),
            ({"recipientId": "bob"}, "MISSING_FIELD"),
            ({"recipientId": "alice", "encryptedPayload": "no"}, "INVALID_FIELD"),
            ("not an object", "INVALID_BODY"),
        ]:
            ack = await a.call("send_message", data)
            self.assertEqual((ack["success"], ack["code"]), (False, code), data)
        unknown = await a.call("no_such_event", {})
        self.assertEqual(unknown["code"], "UNKNOWN_EVENT")

    async def test_group_fan_out(self) -> None:
        """A group message reaches every other member and nobody else; a
        member added later receives the next one at once, a removed member
        does not, and may no longer send typing to the chat."""
        await self.serve()
        alice, bob, carol, dave = [await self.user(n) for n in ("alice", "bob", "carol", "dave")]
        chat_id = await self.group(alice, bob, carol)
        a, b, c, d = [await self.connect(u) for u in (alice, bob, carol, dave)]
        ack = await b.call("send_message", {"chatId": chat_id, "encryptedPayload": {"g": 1}})
        for client in (a, c):
            [got] = await client.wait_for("new_message")
            self.assertEqual(got["message"]["id"], ack["messageId"])
        # The fan-out went to every socket at once: what d and b would have
        # been sent has arrived by their barriers.
        await d.barrier()
        await b.barrier()
        self.assertEqual(d.events("new_message"), [])
        self.assertEqual(b.events("new_message"), [])
        # A member added later joins the room at once; a removed one leaves it.
        await self.contacts(alice, dave)
        added = await self.http.post(f"/api/chats/{chat_id}/members/dave", {}, headers=alice.auth())
        self.assertIn(added.code, (200, 201), added.body)
        removed = await self.http.request("DELETE", f"/api/chats/{chat_id}/members/carol",
                                          headers=alice.auth())
        self.assertEqual(removed.code, 200, removed.body)
        ack = await a.call("send_message", {"chatId": chat_id, "encryptedPayload": {"g": 2}})
        [got] = await d.wait_for("new_message")
        self.assertEqual(got["message"]["seq"], ack["seq"])
        await b.wait_for("new_message")
        await c.barrier()
        self.assertEqual(len(c.events("new_message")), 1)
        typing = await c.call("typing", {"chatId": chat_id, "isTyping": True})
        self.assertEqual(typing["code"], "CHAT_NOT_FOUND")

    async def test_receipts(self) -> None:
        """Delivered and read receipts (up to a seq, or one message) reach
        the sender with who, what and when; a second delivered receipt is
        answered but not told again; nobody outside the chat can send one."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        a, b = await self.connect(alice), await self.connect(bob)
        first = await a.call("send_message", {"recipientId": "bob", "encryptedPayload": {"n": 1}})
        second = await a.call("send_message", {"recipientId": "bob", "encryptedPayload": {"n": 2}})
        await b.wait_for("new_message", 2)
        ack = await b.call("message_delivered", {"messageId": first["messageId"]})
        self.assertTrue(ack["success"], ack)
        [delivered] = await a.wait_for("message_delivered")
        self.assertEqual((delivered["messageId"], delivered["chatId"], delivered["userId"]),
                         (first["messageId"], first["chatId"], "bob"))
        self.assertTrue(delivered["at"].endswith("Z"))
        again = await b.call("message_delivered", {"messageId": first["messageId"]})
        self.assertTrue(again["success"], again)  # answered, but the sender is told once
        ack = await b.call("message_read", {"chatId": first["chatId"], "upToSeq": second["seq"]})
        self.assertTrue(ack["success"], ack)
        [read] = await a.wait_for("message_read")
        self.assertEqual((read["upToSeq"], read["chatId"], read["userId"]), (2, first["chatId"], "bob"))
        ack = await b.call("message_read", {"messageId": second["messageId"]})
        self.assertTrue(ack["success"], ack)
        reads = await a.wait_for("message_read", 2)
        self.assertEqual(reads[1]["messageId"], second["messageId"])
        # Nobody acknowledges a message of a chat it is not in.
        carol = await self.user("carol")
        c = await self.connect(carol)
        refused = await c.call("message_delivered", {"messageId": first["messageId"]})
        self.assertEqual(refused["code"], "MESSAGE_NOT_FOUND")
        refused = await c.call("message_read", {"chatId": first["chatId"], "upToSeq": 1})
        self.assertEqual(refused["code"], "CHAT_NOT_FOUND")
        # Anything those calls sent alice was sent before their answers.
        await a.barrier()
        self.assertEqual(len(a.events("message_delivered")), 1)

    async def test_typing(self) -> None:
        """Typing reaches the other people in the chat, not the typist's own
        sockets; typing to a chat one is not in is refused CHAT_NOT_FOUND."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        chat_id = await self.direct_chat(alice, bob)
        a, a2, b = await self.connect(alice), await self.connect(alice), await self.connect(bob)
        ack = await a.call("typing", {"chatId": chat_id, "isTyping": True})
        self.assertTrue(ack["success"], ack)
        [typing] = await b.wait_for("user_typing")
        self.assertEqual(typing, {"chatId": chat_id, "userId": "alice", "isTyping": True})
        await a.barrier()
        await a2.barrier()
        self.assertEqual(a.events("user_typing") + a2.events("user_typing"), [])
        refused = await a.call("typing", {"chatId": str(uuid.uuid4()), "isTyping": True})
        self.assertEqual(refused["code"], "CHAT_NOT_FOUND")

    async def test_calls(self) -> None:
        """Call signalling (offer, answer, ICE candidate, end) passes between
        two people who share a chat, each with who sent it; a stranger's
        signals are refused USER_NOT_FOUND and reach nobody."""
        await self.serve()
        alice, bob, mallory = await self.user("alice"), await self.user("bob"), await self.user("mallory")
        await self.direct_chat(alice, bob)
        a, b, m = await self.connect(alice), await self.connect(bob), await self.connect(mallory)
        offer = {"type": "offer", "sdp": "v=0..."}
        ack = await a.call("call_offer", {"callId": "call-1", "to": "bob", "offer": offer, "callType": "video"})
        self.assertTrue(ack["success"], ack)
        [incoming] = await b.wait_for("incoming_call")
        self.assertEqual(incoming, {"callId": "call-1", "from": "alice", "offer": offer, "callType": "video"})
        await b.call("call_answer", {"callId": "call-1", "to": "alice", "answer": {"sdp": "x"}})
        [answer] = await a.wait_for("call_answer")
        self.assertEqual(answer, {"callId": "call-1", "from": "bob", "answer": {"sdp": "x"}})
        await a.call("call_ice_candidate", {"callId": "call-1", "to": "bob", "candidate": {"c": 1}})
        [candidate] = await b.wait_for("call_ice_candidate")
        self.assertEqual(candidate["candidate"], {"c": 1})
        await b.call("call_end", {"callId": "call-1", "to": "alice"})
        [end] = await a.wait_for("call_end")
        self.assertEqual(end, {"callId": "call-1", "from": "bob", "reason": "ended"})
        # Strangers cannot ring each other.
        for event in ("call_offer", "call_answer", "call_ice_candidate", "call_end"):
            refused = await m.call(event, {"callId": "c", "to": "bob", "offer": {}, "answer": {},
                                           "candidate": {}})
            self.assertEqual((refused["success"], refused["code"]), (False, "USER_NOT_FOUND"), event)
        await b.barrier()
        self.assertEqual(len(b.events("incoming_call")), 1)


class RealtimeMixin(ConnectionRules, EventRules):
    """Every rule."""


class SQLiteMemoryTests(SQLiteMixin, RealtimeMixin, MemoryRealtimeBase, TestCase):
    """Every rule, in memory."""


class SQLitePollingTests(SQLiteMixin, ConnectionRules, TestCase):
    transports = ["polling"]


class SQLiteUpgradeTests(SQLiteMixin, ConnectionRules, TestCase):
    transports = ["polling", "websocket"]


class PostgresWebSocketTests(PostgresMixin, RealtimeMixin, TestCase):
    transports = ["websocket"]


class PostgresUpgradeTests(PostgresMixin, RealtimeMixin, TestCase):
    transports = ["polling", "websocket"]


class MessageTextTests(SynchronousTestCase):
    """The hand-made new_message frame equals the codec's."""

    def test_message_text(self) -> None:
        """A message's JSON text, spliced around its stored payload without
        parsing it, is its message_json; and the new_message frame built
        around that text is what the codec makes of the parsed event."""
        import json

        from cyphr.handlers.messaging import check_payload
        from cyphr.realtime.codec import EVENT, SocketPacket, encode_event_json, encode_packet
        from cyphr.store.messages import Message
        from cyphr.wire import message_json, message_text

        # The text's own fields are encoded by orjson, the codec's by json:
        # a client's id with quotes, escapes, controls and astral characters
        # comes out byte for byte the same.
        client_ids = ["c-1", 'q"\\/\b\f\n\r\t\x01\x1f\x7f \u2028\u2029 é 😀 </script>', None]
        for value, client_id in zip(
                [{"ct": "AAAA", "nested": {"x": [1, 2, "\x00"]}}, {"é": "\u2028 é"}, None], client_ids):
            payload = check_payload(value, 10_000) if value is not None else None  # as stored
            message = Message(str(uuid.uuid4()), str(uuid.uuid4()), 7, "alice", payload, "text",
                              client_id, 1_790_000_000_000, None, None, 3)
            text = message_text(message)
            self.assertEqual(json.loads(text), message_json(message))
            self.assertEqual(encode_event_json("new_message", '{"message":' + text + "}"),
                             encode_packet(SocketPacket(
                                 EVENT, "/", ["new_message", {"message": json.loads(text)}])))


class PayloadTextTests(SynchronousTestCase):
    """check_payload writes with orjson where it can and json where orjson
    cannot say the same thing."""

    def test_same_text_or_error_as_json(self) -> None:
        """For payloads orjson writes (plain ones), those it refuses (an
        integer past 64 bits, a lone surrogate) and those it would write
        otherwise (NaN and infinity as null; a real null): the stored text
        is json's compact text (the same JSON where it holds fractions or
        exponents: orjson writes 1e-7 where json writes 1e-07), and what
        json refuses is refused with the same error."""
        import json

        from cyphr.errors import ApiError
        from cyphr.handlers.messaging import check_payload

        encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
        payloads = [
            {"v": 2, "nonce": "n" * 32, "ct": "Y2lwaGVy" * 30},
            {"nested": {"x": [1, -2.5, 1e16, 1e-7, True, False, {"y": "z"}]}, "e": ""},
            {"big": 2**70, "neg": -(2**64)},
            {"null": None, "s": "a null inside"},
            {"u": "é\u2028\x00\x7f\"\\ 😀"},
            {"inf": float("inf")},
            {"nan": float("nan")},
            {"s": "\ud800"},
        ]
        for payload in payloads:
            try:
                expected: object = encode(payload)
                expected.encode("utf-8")  # type: ignore[attr-defined]
            except (ValueError, UnicodeEncodeError) as e:
                expected = type(e)
            try:
                stored: object = check_payload(payload, 10_000)
            except ApiError as e:
                stored = e.code
            if isinstance(expected, str):
                self.assertEqual(json.loads(stored), json.loads(expected))  # type: ignore[arg-type]
                if "nested" not in payload:  # no fraction nor exponent: the same text
                    self.assertEqual(stored, expected)
            else:
                self.assertEqual(stored, "INVALID_FIELD", payload)


class RawSocket:
    """A WebSocket that speaks the wire protocol by hand and answers no
    ping: a client whose network went away without a goodbye."""

    def __init__(self, url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(
            url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket", timeout=10)
        self.frames: list[str] = [self.ws.recv()]

    def recv_until(self, prefix: str) -> str:
        while True:
            frame = self.ws.recv()
            self.frames.append(frame)
            if frame.startswith(prefix):
                return frame

    def close(self) -> None:
        self.ws.close()


class TimedRealtimeTests(SQLiteMixin, MemoryRealtimeBase, TestCase):
    """Timeouts on the server's clock, moved by the test; in memory."""

    async def test_ping_timeout_ends_presence(self) -> None:
        """A socket that stops answering pings is ended at the ping timeout:
        its user goes offline (``user_offline`` with lastSeen at that time)
        and its last_seen is recorded."""
        from tests.helpers import fixed_clock

        clock = fixed_clock()
        await self.serve(clock=clock)
        alice, bob = await self.user("alice"), await self.user("bob")
        await self.direct_chat(alice, bob)
        a = await self.connect(alice)
        # Bob's network went away without a goodbye: no pong.
        silent = self.new_client(answer_pings=False)
        await silent.connect({"token": bob.token})
        await silent.wait_for("sync_complete")
        await a.wait_for("user_online")
        clock.advance(self.server.config.ping_interval)  # a ping to each
        # Alice's pong was sent as her ping arrived, before this event.
        await a.barrier()
        self.assertEqual(sum(s._pong_deadline is None for s in self.server.engine.sessions.values()), 1)
        clock.advance(self.server.config.ping_timeout)
        [offline] = await a.wait_for("user_offline")
        self.assertEqual(offline, {"userId": "bob", "lastSeen": "2026-09-21T14:14:05.000Z"})
        self.assertEqual(len(self.server.engine.sessions), 1)  # alice's answered
        await self.server.realtime.tasks_done()  # last_seen is written
        profile = await self.http.get("/api/cyphr-id/user/bob", headers=alice.auth())
        self.assertEqual(profile.json()["user"]["lastSeen"], "2026-09-21T14:14:05.000Z")

    async def test_offline_time_is_the_recorded_last_seen(self) -> None:
        """The ``lastSeen`` that ``user_offline`` tells is the last_seen the
        server records, to the millisecond, even when the clock moves
        between the two (here it moves a millisecond at each reading)."""
        clock = _TickingClock()
        clock.advance(1_790_000_000)
        await self.serve(clock=clock)
        alice, bob = await self.user("alice"), await self.user("bob")
        await self.direct_chat(alice, bob)
        a = await self.connect(alice)
        b = await self.connect(bob)
        await a.wait_for("user_online")
        await b.disconnect()
        [offline] = await a.wait_for("user_offline")
        await self.server.realtime.tasks_done()  # last_seen is written
        profile = await self.http.get("/api/cyphr-id/user/bob", headers=alice.auth())
        self.assertEqual(profile.json()["user"]["lastSeen"], offline["lastSeen"])

    async def test_silent_node_ends_presence(self) -> None:
        """When another node falls silent (no goodbye), the users that were
        online only through it go offline as on their last disconnect:
        ``user_offline {userId, lastSeen}`` to the sockets here of those who
        share a chat with them, and last_seen recorded. A user still online
        here or on a node that still speaks stays online; users who share no
        chat hear nothing."""
        from cyphr.clock import iso, now_ms
        from cyphr.realtime.events import HEARTBEAT, NODE_SILENCE
        from tests.helpers import fixed_clock

        clock = fixed_clock()
        await self.serve(clock=clock, ping_interval=3600)  # no pings while time jumps
        alice, bob, carol, dave, erin = [await self.user(name) for name in
                                         ("alice", "bob", "carol", "dave", "erin")]
        for other in (bob, carol, dave):
            await self.direct_chat(alice, other)
        a = await self.connect(alice)
        c = await self.connect(carol)
        e = await self.connect(erin)  # shares no chat with anyone
        await a.wait_for("user_online")  # carol
        realtime = self.server.realtime
        # What the bus would bring: "ghost" has bob, carol and dave; "other"
        # has dave too.
        for node, user in [("ghost", "bob"), ("ghost", "carol"), ("ghost", "dave"),
                           ("other", "dave")]:
            realtime.fanout.bus_event({"t": "p", "n": node, "u": user, "o": 1})
        self.assertTrue(realtime.presence.is_online("bob"))
        for _ in range(int(NODE_SILENCE // HEARTBEAT)):
            realtime.fanout.bus_event({"t": "h", "n": "other"})
            clock.advance(HEARTBEAT)
        # What the last beat began has ended, and what it sent has arrived.
        await realtime.tasks_done()
        await a.barrier()
        self.assertEqual(a.events("user_offline"), [])  # not silent long enough yet
        realtime.fanout.bus_event({"t": "h", "n": "other"})
        clock.advance(HEARTBEAT)
        [offline] = await a.wait_for("user_offline")
        last_seen = iso(now_ms(clock))
        self.assertEqual(offline, {"userId": "bob", "lastSeen": last_seen})
        await realtime.tasks_done()
        for client in (a, c, e):
            await client.barrier()
        self.assertEqual(len(a.events("user_offline")), 1)
        self.assertEqual(c.events("user_offline") + e.events("user_offline"), [])
        self.assertFalse(realtime.presence.is_online("bob"))
        self.assertTrue(realtime.presence.is_online("carol"))
        self.assertTrue(realtime.presence.is_online("dave"))
        profile = await self.http.get("/api/cyphr-id/user/bob", headers=alice.auth())
        self.assertEqual((profile.json()["user"]["lastSeen"], profile.json()["user"]["isOnline"]),
                         (last_seen, False))

    async def test_heartbeat_survives_a_failing_step(self) -> None:
        """A heartbeat step that fails (publishing, or taking a silent
        node's users offline) is logged, and the heartbeat goes on: a node
        whose heartbeat stopped would look silent to the others."""
        from cyphr.realtime.envelopes import Heartbeat
        from cyphr.realtime.events import HEARTBEAT, NODE_SILENCE
        from tests.helpers import fixed_clock

        clock = fixed_clock()
        await self.serve(clock=clock, ping_interval=3600)
        realtime = self.server.realtime
        published: list[object] = []

        def failing_publish(envelope: object) -> bool:
            published.append(envelope)
            raise RuntimeError("the bus is broken")

        self.patch(realtime.fanout, "publish", failing_publish)
        self.patch(realtime.presence, "forget_node",
                   lambda node: (_ for _ in ()).throw(RuntimeError("presence is broken")))
        realtime.fanout.bus_event({"t": "p", "n": "ghost", "u": "bob", "o": 1})
        for _ in range(int(NODE_SILENCE // HEARTBEAT) + 3):
            clock.advance(HEARTBEAT)
        beats = [e for e in published if isinstance(e, Heartbeat)]
        self.assertGreaterEqual(len(beats), int(NODE_SILENCE // HEARTBEAT) + 3)
        self.assertTrue(realtime._heartbeat.active())
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertIn("presence is broken", {str(e.value) for e in errors})
        self.assertIn("the bus is broken", {str(e.value) for e in errors})

    async def test_unauthenticated_socket_closed_after_10s(self) -> None:
        """A socket that joined without a token and has not authenticated
        within 10 s is disconnected, and told so (a client will not
        reconnect)."""
        from tests.helpers import fixed_clock

        clock = fixed_clock()
        await self.serve(clock=clock)
        client = await self.connect(None)
        clock.advance(9.9)
        await client.barrier()  # a disconnect sent at 9.9 s would be here by now
        self.assertEqual(client.disconnects, [])
        clock.advance(0.2)
        reason = await client.wait_disconnected()
        self.assertEqual(reason, SERVER_DISCONNECT)  # told; will not reconnect

    async def test_logout_disconnects_that_token(self) -> None:
        """A logout disconnects the sockets of that token, and only those:
        another socket of the same user, with another token, stays."""
        await self.serve()
        alice = await self.user("alice")
        first = await self.connect(alice)
        old_token = alice.token
        await alice.login(self.http)
        second = await self.connect(alice)
        response = await self.http.post("/api/cyphr-id/logout", {},
                                        headers=alice.auth(old_token))
        self.assertEqual(response.code, 200, response.body)
        await first.wait_disconnected()
        await second.barrier()
        self.assertEqual(second.disconnects, [])
        self.assertTrue(second.connected)

    async def test_stop_closes_sockets_after_acknowledged_work(self) -> None:
        """Stopping the service closes every socket, after what was
        acknowledged to them, and leaves no session behind."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        a, b = await self.connect(alice), await self.connect(bob)
        ack = await a.call("send_message", {"recipientId": "bob", "encryptedPayload": {"n": 1}})
        self.assertTrue(ack["success"])
        await self.server.service.stopService()
        for client in (a, b):
            await client.wait_disconnected()
        await sessions_closed(self.server)


class StockClientTimeoutTests(SQLiteMixin, RealtimeBase, TestCase):
    """What the stock client makes of a timeout, over a real port."""

    async def test_unauthenticated_socket_closed_after_10s(self) -> None:
        """A stock client that joined without a token and has not
        authenticated within 10 s is disconnected by the server. (The server
        sends DISCONNECT, then closes the connection; python-socketio hands a
        packet to a thread of its own but sees the close on its reading
        thread, so it reports whichever it handles first: the memory variant
        in TimedRealtimeTests checks that DISCONNECT comes first on the wire.)"""
        from tests.helpers import fixed_clock

        clock = fixed_clock()
        await self.serve(clock=clock)
        client = await self.connect(None)
        clock.advance(9.9)
        await client.barrier()
        self.assertEqual(client.disconnects, [])
        clock.advance(0.2)
        reason = await client.wait_disconnected()
        self.assertIn(reason, (SERVER_DISCONNECT, TRANSPORT_ERROR))
        await sessions_closed(self.server)


class _TickingClock(Clock):
    """A clock that moves a millisecond each time it is read."""

    def seconds(self) -> float:
        self.rightNow += 0.001
        return self.rightNow
