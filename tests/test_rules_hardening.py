"""Rules and storage hardened after a hostile-client trial (issue #18,
MEDIUM 7 and LOW 8, 11, 12, 13, 15, 16), on both engines: who may be put in
a group and how fast, the chat list in pages, presence only to those who
share a chat, receipts forwarded once, call permissions forgotten on leave,
new members reading forward only, the purge's receipt index, and SQLite's
durable commits."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.trial.unittest import TestCase

import tests
from cyphr.api import messaging as messaging_api
from cyphr.db import sqlite
from cyphr.errors import USER_NOT_FOUND, NotFound
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.receipts import ReceiptsHandler
from cyphr.store.chats import ChatStore
from cyphr.store.messages import MessageStore
from tests.helpers import InProcessHTTP, PostgresMixin, Response, SQLiteMixin, fixed_clock, start_server
from tests.users import User

GROUPS_PER_HOUR, ADDITIONS_PER_HOUR = 6, 3
CHAT_FIELDS = {"chatId", "chatType", "participants", "encryptedName", "lastMessageAt", "unreadCount", "role"}


class RulesMixin:
    engine: str

    async def setUp(self) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, inline=True,
                                         rate_limit_send=(100_000, 1), **self.settings())
        self.http = InProcessHTTP.for_server(self.server)
        self.chats = ChatStore(self.server.database)
        self.alice, self.bob, self.carol, self.mallory = [
            User(name) for name in ("alice", "bob", "carol", "mallory")]
        for user in (self.alice, self.bob, self.carol, self.mallory):
            await user.register(self.http)

    def settings(self) -> dict[str, Any]:
        """Small limits, so that the tests reach them (the others stay under)."""
        return {"rate_limit_group_create": (GROUPS_PER_HOUR, 3600),
                "rate_limit_member_add": (ADDITIONS_PER_HOUR, 3600)}

    # -- helpers ------------------------------------------------------------

    async def sent(self, user: User, **fields: Any) -> dict[str, Any]:
        response = await self.http.post("/api/messaging/send", {"encryptedPayload": {"n": 1}, **fields},
                                        headers=user.auth())
        self.assertEqual(response.code, 201, response.body)
        return response.json()

    async def create_group(self, admin: User, *members: User) -> Response:
        return await self.http.post("/api/messaging/create-group", {
            "encryptedName": "bmFtZQ==", "members": [m.cyphr_id for m in members]}, headers=admin.auth())

    async def group(self, admin: User, *members: User) -> str:
        """A group of ``admin`` and ``members``, who first write to it (so
        that each is its contact)."""
        for member in members:
            await self.sent(member, recipientId=admin.cyphr_id)
        response = await self.create_group(admin, *members)
        self.assertEqual(response.code, 201, response.body)
        return response.json()["chatId"]

    async def add(self, admin: User, chat_id: str, member: User) -> Response:
        return await self.http.post(f"/api/chats/{chat_id}/members/{member.cyphr_id}", headers=admin.auth())

    async def remove(self, admin: User, chat_id: str, member: User) -> Response:
        return await self.http.request("DELETE", f"/api/chats/{chat_id}/members/{member.cyphr_id}",
                                       headers=admin.auth())

    async def get(self, user: User, path: str) -> Response:
        return await self.http.get(path, headers=user.auth())

    def assertError(self, response: Response, status: int, code: str) -> None:
        self.assertEqual((response.code, response.json().get("code")), (status, code), response.body)

    async def seqs(self, user: User, path: str) -> list[int]:
        response = await self.get(user, path)
        self.assertEqual(response.code, 200, response.body)
        return [m["seq"] for m in response.json()["messages"]]

    def auth_user(self, user: User) -> AuthUser:
        assert user.user_id is not None
        return AuthUser(user_id=user.user_id, cyphr_id=user.cyphr_id, jti="t", expires_at=0, device_hash="d", device_id=1)

    # -- MEDIUM 7: who may be added to a group --------------------------------

    async def test_strangers_cannot_be_put_in_a_group(self) -> None:
        """Creating a group with a user who has no direct chat with the
        creator is refused exactly as for a user who does not exist (404
        USER_NOT_FOUND listing it), nothing is stored, and the stranger's
        presence does not reach the creator (they share no chat)."""
        refused = await self.create_group(self.mallory, self.alice)
        unknown = await self.http.post("/api/messaging/create-group", {"members": ["nobody"]},
                                       headers=self.mallory.auth())
        self.assertError(refused, 404, USER_NOT_FOUND)
        self.assertEqual(refused.json()["details"], {"members": ["alice"]})
        self.assertEqual((refused.json()["error"], unknown.json()["error"], unknown.code),
                         ("No such user", "No such user", 404))
        rows = await self.server.database.run_query("SELECT COUNT(*) FROM chats")
        self.assertEqual(rows[0][0], 0)
        self.assertNotIn("alice", await self.chats.partners("mallory"))
        self.assertEqual((await self.get(self.alice, "/api/messaging/chats")).json()["chats"], [])

    async def test_contacts_may_be_put_in_a_group(self) -> None:
        """Once the two have a direct chat (either one wrote), each may put
        the other in a group, at creation or by adding."""
        await self.sent(self.alice, recipientId="mallory")
        created = await self.create_group(self.mallory, self.alice)
        self.assertEqual(created.code, 201, created.body)
        chat_id = await self.group(self.alice, self.bob)
        self.assertEqual((await self.add(self.alice, chat_id, self.mallory)).code, 200)

    async def test_strangers_cannot_be_added(self) -> None:
        """An admin adding a user who is not its contact is refused 404
        USER_NOT_FOUND, as for a user who does not exist, and the user is
        not a member; once the user wrote to the admin, the addition passes."""
        chat_id = await self.group(self.alice, self.bob)
        refused = await self.add(self.alice, chat_id, self.carol)
        self.assertError(refused, 404, USER_NOT_FOUND)
        self.assertEqual(refused.json()["details"], {"cyphrId": "carol"})
        self.assertIsNone(await self.chats.membership(chat_id, "carol"))
        # Bob shares the group with carol's would-be admin, but is no
        # contact of hers: sharing a group is not enough.
        await self.sent(self.carol, recipientId="bob")
        self.assertError(await self.add(self.alice, chat_id, self.carol), 404, USER_NOT_FOUND)
        await self.sent(self.carol, recipientId="alice")
        self.assertEqual((await self.add(self.alice, chat_id, self.carol)).code, 200)
        self.assertIsNotNone(await self.chats.membership(chat_id, "carol"))

    async def test_group_creation_rate_limited(self) -> None:
        """Past --rate-limit-group-create a user's group creations are 429
        RATE_LIMITED with Retry-After, and nothing is created; another user
        is not affected."""
        await self.sent(self.bob, recipientId="alice")
        await self.sent(self.alice, recipientId="carol")
        for _ in range(GROUPS_PER_HOUR):
            self.assertEqual((await self.create_group(self.alice, self.bob)).code, 201)
        refused = await self.create_group(self.alice, self.bob)
        self.assertError(refused, 429, "RATE_LIMITED")
        self.assertIsNotNone(refused.header("Retry-After"))
        rows = await self.server.database.run_query("SELECT COUNT(*) FROM chats WHERE chat_type = 'group'")
        self.assertEqual(rows[0][0], GROUPS_PER_HOUR)
        self.assertEqual((await self.create_group(self.carol, self.alice)).code, 201)

    async def test_member_additions_rate_limited(self) -> None:
        """Past --rate-limit-member-add an admin's additions are 429
        RATE_LIMITED and the user is not added; after the period they pass."""
        chat_id = await self.group(self.alice, self.bob)
        for user in (self.carol, self.mallory):
            await self.sent(user, recipientId="alice")
        self.assertEqual((await self.add(self.alice, chat_id, self.carol)).code, 200)
        for _ in range(ADDITIONS_PER_HOUR - 1):  # refusals count too: a flood of tries is one
            self.assertError(await self.add(self.alice, chat_id, self.carol), 409, "ALREADY_MEMBER")
        self.assertError(await self.add(self.alice, chat_id, self.mallory), 429, "RATE_LIMITED")
        self.assertIsNone(await self.chats.membership(chat_id, "mallory"))
        self.clock.advance(3600)
        self.assertEqual((await self.add(self.alice, chat_id, self.mallory)).code, 200)

    # -- MEDIUM 7: the chat list in pages -------------------------------------

    async def test_chat_list_pages(self) -> None:
        """The chat list comes in pages of ``limit``, newest activity first,
        ties by id; following ``nextCursor`` walks every chat once, and the
        last page's ``nextCursor`` is null. Without a cursor the answer is
        the original shape plus nextCursor."""
        chat_ids = []
        for n in range(5):
            self.clock.advance(n % 2)  # some chats tie on activity
            chat_ids.append(await self.group(self.alice, self.bob))
        first = (await self.get(self.bob, "/api/messaging/chats")).json()
        self.assertEqual(set(first), {"success", "chats", "nextCursor"})
        self.assertIsNone(first["nextCursor"])
        self.assertEqual(set(first["chats"][0]), CHAT_FIELDS)
        everything = [chat["chatId"] for chat in first["chats"]]
        self.assertEqual(len(everything), 6)  # five groups and the direct chat with alice

        walked, cursor, pages = [], None, 0
        while True:
            path = "/api/messaging/chats?limit=2" + (f"&cursor={cursor}" if cursor else "")
            page = (await self.get(self.bob, path)).json()
            pages += 1
            self.assertLessEqual(len(page["chats"]), 2)
            walked += [chat["chatId"] for chat in page["chats"]]
            cursor = page["nextCursor"]
            if cursor is None:
                break
        self.assertEqual((walked, pages), (everything, 3))
        self.assertLess(set(chat_ids), set(walked))

    async def test_chat_list_default_page(self) -> None:
        """A client that sends no limit gets the first CHATS_DEFAULT chats
        and a cursor to the rest, not its whole list at once."""
        self.patch(messaging_api, "CHATS_DEFAULT", 3)
        for _ in range(4):
            await self.group(self.alice, self.bob)
        first = (await self.get(self.bob, "/api/messaging/chats")).json()
        self.assertEqual(len(first["chats"]), 3)
        rest = (await self.get(self.bob, f"/api/messaging/chats?cursor={first['nextCursor']}")).json()
        self.assertEqual(len(rest["chats"]), 2)
        self.assertIsNone(rest["nextCursor"])

    async def test_chat_list_bad_cursor(self) -> None:
        """A cursor the server did not answer, or a limit out of range, is
        400 INVALID_QUERY."""
        for query in ("cursor=x", "cursor=" + "A" * 200, "cursor=MTI6bm90LWEtdXVpZA", "limit=0",
                      "limit=501"):
            self.assertError(await self.get(self.bob, f"/api/messaging/chats?{query}"), 400, "INVALID_QUERY")

    # -- LOW 8: presence only to those who share a chat -----------------------

    async def test_presence_only_for_chat_partners(self) -> None:
        """A stranger's profile (lookup and search) has neither isOnline nor
        lastSeen; one's own and a chat partner's have both."""
        stranger = (await self.get(self.mallory, "/api/cyphr-id/user/alice")).json()["user"]
        self.assertNotIn("isOnline", stranger)
        self.assertNotIn("lastSeen", stranger)
        found = (await self.get(self.mallory, "/api/cyphr-id/search?q=a")).json()["users"]
        self.assertEqual([(u["cyphrId"], "isOnline" in u, "lastSeen" in u) for u in found],
                         [("alice", False, False)])
        found = (await self.get(self.mallory, "/api/cyphr-id/search?q=m")).json()["users"]
        self.assertEqual([(u["cyphrId"], u["isOnline"], u["lastSeen"]) for u in found],
                         [("mallory", False, None)])
        await self.sent(self.bob, recipientId="alice")
        partner = (await self.get(self.bob, "/api/cyphr-id/user/alice")).json()["user"]
        self.assertEqual((partner["isOnline"], partner["lastSeen"]), (False, None))

    # -- LOW 11: receipts that change nothing ---------------------------------

    async def test_repeated_receipts_tell_nobody(self) -> None:
        """Reading a message again, or reading a chat up to a mark already
        reached, is acknowledged but tells the sender nothing; only the
        first read of each is forwarded."""
        receipts = ReceiptsHandler(self.chats, MessageStore(self.server.database), self.clock)
        first = await self.sent(self.alice, recipientId="bob")
        second = await self.sent(self.alice, recipientId="bob")
        bob = self.auth_user(self.bob)
        tells = [(await receipts.read(bob, first["messageId"], first["chatId"])).tell for _ in range(3)]
        self.assertEqual(tells, [("alice",), (), ()])
        ups = [(await receipts.read_up_to(bob, first["chatId"], second["seq"])).tell for _ in range(3)]
        self.assertEqual(ups, [("alice",), (), ()])
        self.assertEqual(receipts.read_count, 2)

    # -- LOW 12: call permission forgotten when a member leaves ---------------

    async def test_call_permission_ends_with_the_shared_chat(self) -> None:
        """Two users whose only shared chat is a group may signal each other;
        once one leaves it, the next signal is refused at once (not after
        the 60 s the permission is otherwise believed)."""
        chat_id = await self.group(self.alice, self.bob)
        calls = self.server.realtime.events._calls  # the handler build_server wired
        # Only the group is shared: the direct chat that made them contacts goes.
        await self.server.database.run_operation("DELETE FROM chats WHERE chat_type = 'direct'")
        await calls.check_peer(self.auth_user(self.alice), "bob")
        self.assertEqual((await self.remove(self.bob, chat_id, self.bob)).code, 200)
        with self.assertRaises(NotFound):
            await calls.check_peer(self.auth_user(self.alice), "bob")

    # -- LOW 13: members read forward from their joining ----------------------

    async def test_added_member_reads_forward_only(self) -> None:
        """A member added later sees, in history (every direction) and in
        sync, only messages sent after it joined; a receipt for an earlier
        one is refused as unknown."""
        chat_id = await self.group(self.alice, self.bob)
        old = [await self.sent(self.alice, chatId=chat_id) for _ in range(3)]
        await self.sent(self.carol, recipientId="alice")
        self.assertEqual((await self.add(self.alice, chat_id, self.carol)).code, 200)
        new = [await self.sent(self.bob, chatId=chat_id) for _ in range(2)]
        later = [m["seq"] for m in new]
        base = f"/api/messaging/chat/{chat_id}"
        self.assertEqual(await self.seqs(self.carol, base), later)
        self.assertEqual(await self.seqs(self.carol, f"{base}?after=0"), later)
        self.assertEqual(await self.seqs(self.carol, f"{base}?before={later[0] + 1}"), later[:1])
        self.assertEqual(await self.seqs(self.carol, f"{base}?before={later[0]}"), [])
        self.assertEqual(await self.seqs(self.bob, base), [m["seq"] for m in old + new])
        synced = (await self.get(self.carol, "/api/messaging/sync")).json()["messages"]
        self.assertEqual([m["id"] for m in synced if m["chatId"] == chat_id], [m["messageId"] for m in new])
        receipts = ReceiptsHandler(self.chats, MessageStore(self.server.database), self.clock)
        with self.assertRaises(NotFound):
            await receipts.read(self.auth_user(self.carol), old[0]["messageId"], chat_id)

    async def test_readded_member_reads_from_its_new_joining(self) -> None:
        """A member removed and added again sees only what was sent after
        its latest joining, not what it saw before nor what it missed."""
        chat_id = await self.group(self.alice, self.bob, self.carol)
        await self.sent(self.alice, chatId=chat_id)
        self.assertEqual((await self.remove(self.alice, chat_id, self.carol)).code, 200)
        await self.sent(self.alice, chatId=chat_id)
        self.assertEqual((await self.add(self.alice, chat_id, self.carol)).code, 200)
        last = await self.sent(self.bob, chatId=chat_id)
        self.assertEqual(await self.seqs(self.carol, f"/api/messaging/chat/{chat_id}"), [last["seq"]])
        synced = (await self.get(self.carol, "/api/messaging/sync")).json()["messages"]
        self.assertEqual([m["seq"] for m in synced if m["chatId"] == chat_id], [last["seq"]])

    # -- LOW 15: the purge deletes receipts by an index -----------------------

    async def test_receipts_deleted_by_message_through_an_index(self) -> None:
        """The purge's DELETE of receipts by message_id is planned on an
        index leading with message_id, not a scan of every receipt."""
        plan = await self.plan("DELETE FROM message_receipts WHERE message_id IN (?, ?)")
        self.assertIn("message_receipts_message", plan)


class SQLiteRulesTests(SQLiteMixin, RulesMixin, TestCase):
    async def plan(self, sql: str) -> str:
        rows = await self.server.database.run_query("EXPLAIN QUERY PLAN " + sql, ("a", "b"))
        return " | ".join(str(row[-1]) for row in rows)

    async def test_commits_are_durable(self) -> None:
        """SQLite runs in WAL mode with synchronous = FULL (2): an
        acknowledged commit survives power loss, not only a killed process."""
        # The suite's servers skip the fsyncs (tests/__init__.py): this one
        # runs with what production runs with.
        self.patch(sqlite, "SYNCHRONOUS", tests.SQLITE_SYNCHRONOUS)
        server = await start_server(self)
        rows = await server.database.run_query("PRAGMA synchronous")
        self.assertEqual(rows[0][0], 2)
        rows = await server.database.run_query("PRAGMA journal_mode")
        self.assertEqual(rows[0][0], "wal")


class PostgresRulesTests(PostgresMixin, RulesMixin, TestCase):
    async def plan(self, sql: str) -> str:
        async def explain(txn: Any) -> str:
            # The table is tiny: forbid the sequential scan so the plan shows
            # which index the planner can use at all.
            await txn.execute("SET LOCAL enable_seqscan = off")
            rows = await txn.execute("EXPLAIN " + sql.replace("?, ?", f"'{uuid.uuid4()}', '{uuid.uuid4()}'"))
            return " | ".join(str(row[0]) for row in rows)
        return await self.server.database.run_interaction("explain", explain)
