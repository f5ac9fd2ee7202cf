"""Chats and messages over REST, on both engines: sending with group commit,
history, sync, edits, groups and roles, receipts and retention."""

from __future__ import annotations

import json
import uuid
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from cyphr.store.chats import ChatStore
from cyphr.store.messages import NotAMember, Outgoing
from tests.helpers import (
    InProcessHTTP,
    PostgresMixin,
    Response,
    SQLiteMixin,
    fixed_clock,
    start_server,
)
from tests.users import User

PAYLOAD = {"kyberCiphertext": "AAAA", "encryptedMessage": "QUJD", "nonce": "bm9uY2U=", "tag": "dGFn",
           "v": 2, "nested": {"list": [1, 2.5, "é", None, True]}}


async def make_contacts(server: Any, user: User, *others: User) -> None:
    """Direct chats (with no message) between ``user`` and each of ``others``."""
    chats = ChatStore(server.database)
    for other in others:
        await chats.direct_chat(user.cyphr_id, other.cyphr_id, 0)


class MessagingTestsMixin:
    async def setUp(self) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, rate_limit_send=(100_000, 1))
        self.http = InProcessHTTP.for_server(self.server)
        self.alice, self.bob, self.carol = User("alice"), User("bob"), User("carol")
        for user in (self.alice, self.bob, self.carol):
            await user.register(self.http)

    async def send(self, user: User, payload: Any = PAYLOAD, **fields: Any) -> Response:
        return await self.http.post("/api/messaging/send", {"encryptedPayload": payload, **fields},
                                    headers=user.auth())

    async def sent(self, user: User, **fields: Any) -> dict[str, Any]:
        response = await self.send(user, **fields)
        self.assertEqual(response.code, 201, response.body)
        return response.json()

    async def get(self, user: User, path: str) -> Response:
        return await self.http.get(path, headers=user.auth())

    def assertError(self, response: Response, status: int, code: str) -> None:
        self.assertEqual((response.code, response.json().get("code")), (status, code), response.body)

    async def contacts(self, user: User, *others: User) -> None:
        """Make ``others`` contacts of ``user`` (a direct chat, no message),
        as a group admin may add only its contacts."""
        await make_contacts(self.server, user, *others)

    async def group(self, admin: User, *members: User) -> str:
        await self.contacts(admin, *members)
        response = await self.http.post("/api/messaging/create-group", {
            "encryptedName": "bmFtZQ==", "members": [m.cyphr_id for m in members]}, headers=admin.auth())
        self.assertEqual(response.code, 201, response.body)
        return response.json()["chatId"]

    async def count_messages(self) -> int:
        return (await self.server.database.run_query("SELECT COUNT(*) FROM messages"))[0][0]

    # -- direct chats -----------------------------------------------------------

    async def test_direct_flow(self) -> None:
        """A first message creates the direct chat; seq grows by one; the payload
        comes back exactly as sent; both sides see the chat with their unread counts."""
        first = await self.sent(self.alice, recipientId="bob")
        self.assertEqual((first["seq"], first["timestamp"]), (1, "2026-09-21T14:13:20.000Z"))
        second = await self.sent(self.alice, recipientId="bob", messageType="image")
        self.assertEqual((second["seq"], second["chatId"]), (2, first["chatId"]))
        reply = await self.sent(self.bob, chatId=first["chatId"], payload={"x": "y"})
        self.assertEqual(reply["seq"], 3)

        history = (await self.get(self.bob, f"/api/messaging/chat/{first['chatId']}")).json()
        self.assertEqual([m["seq"] for m in history["messages"]], [1, 2, 3])
        self.assertFalse(history["hasMore"])
        message = history["messages"][0]
        self.assertEqual(message["encryptedPayload"], PAYLOAD)
        self.assertEqual((message["id"], message["senderId"], message["messageType"], message["chatId"]),
                         (first["messageId"], "alice", "text", first["chatId"]))
        self.assertEqual(set(message), {"id", "chatId", "seq", "senderId", "senderDeviceId",
                                        "encryptedPayload", "messageType", "clientMessageId",
                                        "timestamp", "editedAt", "deletedAt"})
        self.assertEqual(message["senderDeviceId"], 1)
        self.assertEqual(history["messages"][1]["messageType"], "image")

        for user, unread in ((self.alice, 1), (self.bob, 2)):
            chats = (await self.get(user, "/api/messaging/chats")).json()["chats"]
            self.assertEqual(len(chats), 1)
            self.assertEqual((chats[0]["chatId"], chats[0]["chatType"], chats[0]["role"], chats[0]["unreadCount"]),
                             (first["chatId"], "direct", "member", unread))
            self.assertEqual(sorted(chats[0]["participants"]), ["alice", "bob"])
        self.assertEqual((await self.get(self.carol, "/api/messaging/chats")).json()["chats"], [])

    async def test_one_direct_chat_per_pair(self) -> None:
        """Both sides sending their first message at once get one chat between them."""
        results = await gatherResults([
            Deferred.fromCoroutine(self.sent(self.alice, recipientId="bob")),
            Deferred.fromCoroutine(self.sent(self.bob, recipientId="alice")),
            Deferred.fromCoroutine(self.sent(self.alice, recipientId="bob")),
        ])
        self.assertEqual(len({r["chatId"] for r in results}), 1)
        self.assertEqual(sorted(r["seq"] for r in results), [1, 2, 3])
        rows = await self.server.database.run_query("SELECT COUNT(*) FROM chats")
        self.assertEqual(rows, [(1,)])

    async def test_bad_sends(self) -> None:
        """Bad sends are refused with the right code and store nothing."""
        chat = (await self.sent(self.alice, recipientId="bob"))["chatId"]
        before = await self.count_messages()
        cases = [
            ({"recipientId": "bob", "payload": "text"}, 400, "INVALID_FIELD"),
            ({"recipientId": "bob", "payload": [1]}, 400, "INVALID_FIELD"),
            ({"recipientId": "bob", "messageType": "sticker"}, 400, "INVALID_FIELD"),
            ({"recipientId": "bob", "chatId": chat}, 400, "MISSING_FIELD"),
            ({}, 400, "MISSING_FIELD"),
            ({"recipientId": "nobody"}, 404, "USER_NOT_FOUND"),
            ({"recipientId": "Bob"}, 400, "INVALID_CYPHR_ID"),
            ({"chatId": "not-a-uuid"}, 400, "INVALID_FIELD"),
            ({"chatId": str(uuid.uuid4())}, 404, "CHAT_NOT_FOUND"),
            ({"recipientId": "bob", "clientMessageId": ""}, 400, "INVALID_FIELD"),
            ({"recipientId": "bob", "clientMessageId": "x" * 129}, 400, "INVALID_FIELD"),
            ({"recipientId": "bob", "payload": {"big": "x" * (1024 * 1024)}}, 413, "PAYLOAD_TOO_LARGE"),
            # Lone surrogates: legal JSON escapes, but not Unicode text.
            ({"recipientId": "bob", "payload": {"c": "\ud800"}}, 400, "INVALID_FIELD"),
            ({"recipientId": "bob", "payload": {"\udfff": "c"}}, 400, "INVALID_FIELD"),
            ({"recipientId": "bob", "clientMessageId": "a\udc00"}, 400, "INVALID_FIELD"),
        ]
        for fields, status, code in cases:
            payload = fields.pop("payload", PAYLOAD)
            self.assertError(await self.send(self.alice, payload, **fields), status, code)
        # A stranger cannot write into the chat.
        self.assertError(await self.send(self.carol, chatId=chat), 404, "CHAT_NOT_FOUND")
        self.assertEqual(await self.count_messages(), before)

    async def test_client_message_id(self) -> None:
        """The same clientMessageId from the same sender returns the first message,
        also when the resends race; it stores nothing new."""
        first = await self.sent(self.alice, recipientId="bob", clientMessageId="m-1")
        again = await self.sent(self.alice, recipientId="bob", clientMessageId="m-1", payload={"other": 1})
        self.assertEqual((again["messageId"], again["seq"]), (first["messageId"], first["seq"]))
        racing = await gatherResults([
            Deferred.fromCoroutine(self.sent(self.alice, recipientId="bob", clientMessageId="m-2"))
            for _ in range(10)])
        self.assertEqual(len({r["messageId"] for r in racing}), 1)
        other = await self.sent(self.bob, recipientId="alice", clientMessageId="m-1")
        self.assertNotEqual(other["messageId"], first["messageId"])
        self.assertEqual(await self.count_messages(), 3)

    async def test_resends_in_a_mixed_batch(self) -> None:
        """One batch holding new messages, a resend of a stored one, a
        clientMessageId repeated within the batch, and a resend by a member
        removed since: the resends answer their first message, the removed
        member is refused, and the new ones take the next seqs, no gap."""
        chat = await self.group(self.alice, self.bob, self.carol)
        stored = await self.sent(self.alice, chatId=chat, clientMessageId="m-1")
        await self.sent(self.carol, chatId=chat, clientMessageId="c-1")
        await self.http.request("DELETE", f"/api/chats/{chat}/members/carol", headers=self.alice.auth())
        before = await self.count_messages()

        def outgoing(sender: str, client_message_id: str | None) -> Outgoing:
            return Outgoing(str(uuid.uuid4()), chat, sender, "{}", "text", client_message_id, 0)

        items = [outgoing("bob", "b-1"), outgoing("alice", "m-1"), outgoing("alice", None),
                 outgoing("bob", "b-1"), outgoing("carol", "c-1"), outgoing("bob", "b-2")]
        outcomes = await gatherResults([self.server.batcher.submit(item) for item in items])
        self.assertEqual(self.server.batcher.batch_sizes[-1], len(items))  # one batch
        new = [outcomes[0], outcomes[2], outcomes[5]]
        self.assertEqual([m.seq for m in new], [3, 4, 5])
        self.assertEqual([m.id for m in new], [items[0].id, items[2].id, items[5].id])
        self.assertEqual((outcomes[1].id, outcomes[1].seq), (stored["messageId"], stored["seq"]))
        self.assertEqual(outcomes[3], outcomes[0])
        self.assertIsInstance(outcomes[4], NotAMember)
        self.assertEqual(await self.count_messages(), before + 3)
        rows = await self.server.database.run_query(
            "SELECT last_seq FROM chats WHERE id = ?", (chat,))
        self.assertEqual(rows[0][0], 5)
        position = await self.server.database.run_query("SELECT last_position FROM message_stream")
        self.assertEqual(position[0][0], max(m.stream_position for m in new))

    # -- group commit -----------------------------------------------------------

    async def test_concurrent_sends(self) -> None:
        """200 sends at once into one group from several users get seq 1..200,
        each exactly once, written in batches."""
        chat = await self.group(self.alice, self.bob, self.carol)
        senders = [self.alice, self.bob, self.carol]
        results = await gatherResults([
            Deferred.fromCoroutine(self.sent(senders[n % 3], chatId=chat, clientMessageId=f"c{n}"))
            for n in range(200)])
        self.assertEqual(sorted(r["seq"] for r in results), list(range(1, 201)))
        rows = await self.server.database.run_query(
            "SELECT seq, client_message_id FROM messages WHERE chat_id = ? ORDER BY seq", (chat,))
        self.assertEqual([r[0] for r in rows], list(range(1, 201)))
        self.assertEqual(len({r[1] for r in rows}), 200)
        self.assertGreater(max(self.server.batcher.batch_sizes), 1)

    async def test_batch_failures_stay_apart(self) -> None:
        """In one batch, a message to a chat its sender was removed from, and one
        the database refuses, fail on their own; the others are stored."""
        chat = await self.group(self.alice, self.bob, self.carol)
        await self.http.request("DELETE", f"/api/chats/{chat}/members/carol", headers=self.alice.auth())

        def outgoing(sender: str, message_type: str = "text") -> Outgoing:
            return Outgoing(str(uuid.uuid4()), chat, sender, "{}", message_type, None, 0)

        batcher = self.server.batcher
        items = [outgoing("alice"), outgoing("carol"), outgoing("bob"), outgoing("bob", "bogus"),
                 outgoing("alice")]
        outcomes = await gatherResults(
            [batcher.submit(item).addErrback(lambda f: f.value) for item in items])
        self.assertIsInstance(outcomes[1], NotAMember)
        self.assertIsInstance(outcomes[3], Exception)
        self.assertEqual(sorted(o.seq for o in (outcomes[0], outcomes[2], outcomes[4])), [1, 2, 3])
        self.assertEqual([o.sender_id for o in (outcomes[0], outcomes[2], outcomes[4])],
                         ["alice", "bob", "alice"])
        self.flushLoggedErrors()

    async def test_stop_writes_what_is_pending(self) -> None:
        """Stopping the batcher writes the messages still waiting for a batch."""
        chat = await self.group(self.alice, self.bob)
        batcher = self.server.batcher
        pending = [batcher.submit(Outgoing(str(uuid.uuid4()), chat, "alice", "{}", "text", None, 0))
                   for _ in range(5)]
        await batcher.stop()
        self.assertTrue(all(d.called for d in pending))
        self.assertEqual(await self.count_messages(), 5)

    # -- history ------------------------------------------------------------------

    async def test_pagination(self) -> None:
        """The latest page, the page before a seq and after a seq, with hasMore at the edges."""
        chat = await self.group(self.alice, self.bob)
        empty = (await self.get(self.alice, f"/api/messaging/chat/{chat}")).json()
        self.assertEqual((empty["messages"], empty["hasMore"]), ([], False))
        for _ in range(7):
            await self.sent(self.alice, chatId=chat)

        async def page(query: str) -> tuple[list[int], bool]:
            body = (await self.get(self.bob, f"/api/messaging/chat/{chat}?{query}")).json()
            return [m["seq"] for m in body["messages"]], body["hasMore"]

        self.assertEqual(await page("limit=3"), ([5, 6, 7], True))
        self.assertEqual(await page("limit=3&before=5"), ([2, 3, 4], True))
        self.assertEqual(await page("limit=3&before=4"), ([1, 2, 3], False))
        self.assertEqual(await page("limit=3&before=2"), ([1], False))
        self.assertEqual(await page("limit=3&after=4"), ([5, 6, 7], False))
        self.assertEqual(await page("limit=2&after=3"), ([4, 5], True))
        self.assertEqual(await page("after=7"), ([], False))
        self.assertEqual(await page("limit=7"), ([1, 2, 3, 4, 5, 6, 7], False))
        for query in ("before=3&after=1", "limit=0", "limit=201", "before=x", "after=-1"):
            self.assertError(await self.get(self.bob, f"/api/messaging/chat/{chat}?{query}"), 400, "INVALID_QUERY")
        self.assertError(await self.get(self.carol, f"/api/messaging/chat/{chat}"), 404, "CHAT_NOT_FOUND")
        self.assertError(await self.get(self.bob, "/api/messaging/chat/nope"), 404, "CHAT_NOT_FOUND")

    # -- sync ---------------------------------------------------------------------

    async def test_sync_across_chats(self) -> None:
        """Sync hands out every message of the caller's chats once, oldest first,
        page by page, also while messages are written between pages."""
        direct = (await self.sent(self.bob, recipientId="alice"))["chatId"]
        group = await self.group(self.carol, self.alice, self.bob)
        elsewhere = (await self.sent(self.bob, recipientId="carol"))["chatId"]
        seen: list[str] = []
        cursor = 0
        for _ in range(6):
            writes = [Deferred.fromCoroutine(self.sent(sender, chatId=chat))
                      for sender, chat in ((self.bob, direct), (self.carol, group), (self.alice, group),
                                           (self.carol, elsewhere))]
            body = (await self.get(self.alice, f"/api/messaging/sync?since={cursor}&limit=3")).json()
            await gatherResults(writes)
            seen += [m["id"] for m in body["messages"]]
            cursor = body["cursor"]
        while True:
            body = (await self.get(self.alice, f"/api/messaging/sync?since={cursor}&limit=4")).json()
            seen += [m["id"] for m in body["messages"]]
            cursor = body["cursor"]
            if not body["hasMore"]:
                break
        rows = await self.server.database.run_query(
            "SELECT id FROM messages WHERE chat_id IN (?, ?) ORDER BY stream_position", (direct, group))
        self.assertEqual(seen, [row[0] for row in rows])
        self.assertEqual(len(seen), 1 + 6 * 3)
        end = (await self.get(self.alice, f"/api/messaging/sync?since={cursor}")).json()
        self.assertEqual((end["messages"], end["cursor"], end["hasMore"]), ([], cursor, False))

    # -- edits and deletions ------------------------------------------------------

    async def test_edit_and_delete(self) -> None:
        """Only the sender edits or deletes; deletion erases the blob and keeps a tombstone."""
        sent = await self.sent(self.alice, recipientId="bob")
        path = f"/api/messaging/message/{sent['messageId']}"
        self.clock.advance(5)
        edited = await self.http.request("PUT", path, data=json.dumps({"encryptedPayload": {"v": 3}}).encode(),
                                         headers={**self.alice.auth(), b"Content-Type": [b"application/json"]})
        message = edited.json()["message"]
        self.assertEqual((message["encryptedPayload"], message["editedAt"]), ({"v": 3}, "2026-09-21T14:13:25.000Z"))
        not_sender = await self.http.request("PUT", path, data=json.dumps({"encryptedPayload": {}}).encode(),
                                             headers={**self.bob.auth(), b"Content-Type": [b"application/json"]})
        self.assertError(not_sender, 403, "NOT_SENDER")
        self.assertError(await self.http.request("DELETE", path, headers=self.carol.auth()), 404, "MESSAGE_NOT_FOUND")
        deleted = (await self.http.request("DELETE", path, headers=self.alice.auth())).json()["message"]
        self.assertEqual((deleted["encryptedPayload"], deleted["deletedAt"]), (None, "2026-09-21T14:13:25.000Z"))
        rows = await self.server.database.run_query("SELECT encrypted_content FROM messages")
        self.assertEqual(rows, [(None,)])
        self.assertError(await self.http.request("DELETE", path, headers=self.alice.auth()), 409, "MESSAGE_DELETED")
        history = (await self.get(self.bob, f"/api/messaging/chat/{sent['chatId']}")).json()["messages"]
        self.assertEqual((history[0]["id"], history[0]["encryptedPayload"]), (sent["messageId"], None))

    # -- groups and roles -----------------------------------------------------------

    async def test_groups_and_roles(self) -> None:
        """The creator is admin; only admins add, remove and change roles; members
        leave; the last admin leaving hands admin to the oldest member."""
        dave = User("dave")
        await dave.register(self.http)
        missing = await self.http.post("/api/messaging/create-group", {"members": ["bob", "nobody"]},
                                       headers=self.alice.auth())
        self.assertError(missing, 404, "USER_NOT_FOUND")
        chat = await self.group(self.alice, self.bob)
        base = f"/api/chats/{chat}/members"
        members = (await self.get(self.bob, base)).json()["members"]
        self.assertEqual([(m["cyphrId"], m["role"]) for m in members], [("alice", "admin"), ("bob", "member")])

        await self.contacts(self.alice, self.carol, dave)
        self.assertError(await self.http.post(f"{base}/carol", headers=self.bob.auth()), 403, "NOT_ADMIN")
        self.assertError(await self.http.post(f"{base}/carol", headers=self.carol.auth()), 404, "CHAT_NOT_FOUND")
        self.assertError(await self.get(self.carol, base), 404, "CHAT_NOT_FOUND")
        self.clock.advance(1)
        self.assertEqual((await self.http.post(f"{base}/carol", headers=self.alice.auth())).code, 200)
        self.assertError(await self.http.post(f"{base}/carol", headers=self.alice.auth()), 409, "ALREADY_MEMBER")
        self.assertError(await self.http.post(f"{base}/nobody", headers=self.alice.auth()), 404, "USER_NOT_FOUND")
        self.clock.advance(1)
        await self.http.post(f"{base}/dave", headers=self.alice.auth())

        role = f"{base}/alice/role"
        self.assertError(await self.http.request("PUT", role, data=b'{"role": "member"}',
                                                 headers={**self.alice.auth(), b"Content-Type": [b"application/json"]}),
                         409, "LAST_ADMIN")
        self.assertError(await self.http.request("DELETE", f"{base}/carol", headers=self.bob.auth()), 403, "NOT_ADMIN")

        # Removed: no reading, no writing from that moment.
        await self.sent(dave, chatId=chat)
        self.assertEqual((await self.http.request("DELETE", f"{base}/dave", headers=self.alice.auth())).code, 200)
        self.assertError(await self.get(dave, f"/api/messaging/chat/{chat}"), 404, "CHAT_NOT_FOUND")
        self.assertError(await self.send(dave, chatId=chat), 404, "CHAT_NOT_FOUND")
        self.assertEqual((await self.get(dave, "/api/messaging/sync")).json()["messages"], [])

        # The last admin leaves: bob, the oldest remaining member, takes over.
        self.assertEqual((await self.http.request("DELETE", f"{base}/alice", headers=self.alice.auth())).code, 200)
        members = (await self.get(self.bob, base)).json()["members"]
        self.assertEqual([(m["cyphrId"], m["role"]) for m in members], [("bob", "admin"), ("carol", "member")])
        response = await self.http.request("PUT", f"{base}/carol/role", data=b'{"role": "admin"}',
                                           headers={**self.bob.auth(), b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 200)
        direct = (await self.sent(self.bob, recipientId="carol"))["chatId"]
        self.assertError(await self.http.post(f"/api/chats/{direct}/members/alice", headers=self.bob.auth()),
                         400, "NOT_A_GROUP")

    # -- receipts and retention ------------------------------------------------------

    async def test_unread_follows_read_receipts(self) -> None:
        """unreadCount counts others' messages past what the member has read."""
        chat = (await self.sent(self.alice, recipientId="bob"))["chatId"]
        for _ in range(3):
            await self.sent(self.alice, chatId=chat)
        from cyphr.store.chats import ChatStore
        store = ChatStore(self.server.database)
        await store.mark_read(chat, "bob", 3)
        await store.mark_read(chat, "bob", 1)  # never moves back
        chats = (await self.get(self.bob, "/api/messaging/chats")).json()["chats"]
        self.assertEqual(chats[0]["unreadCount"], 1)

    async def test_message_receipts(self) -> None:
        """Delivered and read receipts are kept per message and recipient, once each."""
        from cyphr.store.chats import ChatStore, Delivery

        sent = await self.sent(self.alice, recipientId="bob")
        store = ChatStore(self.server.database)
        for at in (1000, 2000):  # kept: the first
            await store.record_deliveries([Delivery(sent["messageId"], sent["chatId"], "bob",
                                                    (self.bob.user_id, 1), at)])
        await store.mark_message_read(sent["chatId"], sent["messageId"], "bob", 3000)
        await store.mark_message_read(sent["chatId"], sent["messageId"], "bob", 4000)
        rows = await self.server.database.run_query(
            "SELECT user_id, delivered_at, read_at FROM message_receipts WHERE message_id = ?",
            (sent["messageId"],))
        self.assertEqual(rows, [("bob", 1000, 3000)])

    async def test_retention(self) -> None:
        """With a retention period, the periodic job deletes older messages only."""
        chat = (await self.sent(self.alice, recipientId="bob"))["chatId"]
        self.clock.advance(2 * 86400)
        recent = await self.sent(self.alice, chatId=chat)
        from cyphr.handlers.maintenance import Maintenance
        from cyphr.store.challenges import ChallengeStore
        from cyphr.store.messages import MessageStore
        from cyphr.store.tokens import TokenStore
        db = self.server.database
        await Maintenance(ChallengeStore(db), TokenStore(db), MessageStore(db), 1, self.clock).run()
        rows = await db.run_query("SELECT id FROM messages")
        self.assertEqual(rows, [(recent["messageId"],)])
        await Maintenance(ChallengeStore(db), TokenStore(db), MessageStore(db), 0, self.clock).run()
        self.assertEqual(len(await db.run_query("SELECT id FROM messages")), 1)


class SQLiteMessagingTests(SQLiteMixin, MessagingTestsMixin, TestCase):
    pass


class PostgresMessagingTests(PostgresMixin, MessagingTestsMixin, TestCase):
    pass


class TwoNodeSyncTests(PostgresMixin, TestCase):
    async def test_sync_never_skips_across_nodes(self) -> None:
        """Two servers on one PostgreSQL database write into the same chats at
        once while a client syncs page by page from one of them: it receives
        every message exactly once, in stream order, though the two nodes'
        transactions commit concurrently."""
        # A cluster: the nodes share the database and the secrets.
        shared = {"rate_limit_send": (100_000, 1), "jwt_secret": "j" * 40, "fingerprint_key": "f" * 40,
                  "totp_key": "t" * 40, "push_vapid_key": "v" * 40}
        first = await start_server(self, **shared)
        second = await start_server(self, database=first.config.database, **shared)
        node_a, node_b = InProcessHTTP.for_server(first), InProcessHTTP.for_server(second)
        alice, bob = User("alice"), User("bob")
        await alice.register(node_a)
        await bob.register(node_b)
        chat = (await node_a.post("/api/messaging/send", {"recipientId": "bob", "encryptedPayload": {}},
                                  headers=alice.auth())).json()["chatId"]

        async def write(node: InProcessHTTP, user: User, count: int) -> None:
            for n in range(count):
                await gatherResults([Deferred.fromCoroutine(node.post(
                    "/api/messaging/send", {"chatId": chat, "encryptedPayload": {"n": n}},
                    headers=user.auth())) for _ in range(5)])

        writers = gatherResults([Deferred.fromCoroutine(write(node_a, alice, 20)),
                                 Deferred.fromCoroutine(write(node_b, bob, 20))])
        seen: list[str] = []
        cursor = 0
        while True:
            body = (await node_a.get(f"/api/messaging/sync?since={cursor}&limit=7",
                                     headers=bob.auth())).json()
            seen += [m["id"] for m in body["messages"]]
            cursor = body["cursor"]
            if writers.called and not body["hasMore"]:
                break
        await writers
        rows = await first.database.run_query(
            "SELECT id FROM messages WHERE chat_id = ? ORDER BY stream_position", (chat,))
        self.assertEqual(len(rows), 1 + 2 * 20 * 5)
        self.assertEqual(seen, [row[0] for row in rows])


class RemovalRaceTests(PostgresMixin, TestCase):
    async def test_send_waits_for_a_removal_in_progress(self) -> None:
        """A send racing with the removal of its sender is refused once the
        removal commits: a removed member cannot post, from that moment."""
        import psycopg2
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        server = await start_server(self)
        http = InProcessHTTP.for_server(server)
        alice, dave = User("alice"), User("dave")
        await alice.register(http)
        await dave.register(http)
        await make_contacts(server, alice, dave)
        chat = (await http.post("/api/messaging/create-group", {"members": ["dave"]},
                                headers=alice.auth())).json()["chatId"]

        # Another writer is removing dave: it holds the chat's row lock, as
        # ChatStore.remove_member does, and has not committed yet.
        remover = psycopg2.connect(server.config.database)
        self.addCleanup(remover.close)
        cursor = remover.cursor()
        cursor.execute("SELECT id FROM chats WHERE id = %s FOR UPDATE", (chat,))
        sending = server.batcher.submit(Outgoing(str(uuid.uuid4()), chat, "dave", "{}", "text", None, 0))
        # Wait until PostgreSQL shows the send blocked on the remover's lock,
        # or the send is answered (it did not wait). In autocommit: within
        # one transaction pg_stat_activity would not change.
        watcher = psycopg2.connect(server.config.database)
        self.addCleanup(watcher.close)
        watcher.autocommit = True

        def blocked() -> bool:
            with watcher.cursor() as look:
                look.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                             (remover.get_backend_pid(),))
                return look.fetchone()[0] > 0

        for _ in range(500):
            if sending.called or blocked():
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(sending.called)  # waiting for the removal
        self.assertTrue(blocked())
        cursor.execute("DELETE FROM chat_participants WHERE chat_id = %s AND user_id = 'dave'", (chat,))
        remover.commit()
        self.assertIsInstance(await sending, NotAMember)
        rows = await server.database.run_query("SELECT COUNT(*) FROM messages WHERE sender_id = 'dave'")
        self.assertEqual(rows, [(0,)])
