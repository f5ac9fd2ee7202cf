"""
Receipts in history and sync, on both engines: each message the caller
sent carries ``receipts`` ({delivered, read}: the other present members it
reached and who read it), from what the receipts recorded (by message id,
and read-up-to marks); others' messages carry none. Receipts are recorded
by the handler the realtime events call (ReceiptsHandler), on the server's
own database.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from twisted.trial.unittest import TestCase

from cyphr.api.operations import openapi_document
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.receipts import ReceiptsHandler
from cyphr.store.chats import ChatStore
from cyphr.store.messages import MessageStore
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, fixed_clock, start_server
from tests.test_messaging import PAYLOAD, make_contacts
from tests.users import User

NONE: dict[str, list[str]] = {"delivered": [], "read": []}
HISTORY_PATH, SYNC_PATH = "/api/messaging/chat/{chatId}", "/api/messaging/sync"
_DOCUMENT_URI = "urn:cyphr:openapi"


def answer_validator(path: str) -> Draft202012Validator:
    """A validator of the 200 answer of ``GET path`` as the OpenAPI document
    describes it, its references resolved within the document."""
    document = {**json.loads(openapi_document()), "$id": _DOCUMENT_URI}
    pointer = "/".join(["", "paths", path.replace("~", "~0").replace("/", "~1"), "get", "responses",
                        "200", "content", "application~1json", "schema"])
    registry = Registry().with_resource(_DOCUMENT_URI, DRAFT202012.create_resource(document))
    return Draft202012Validator({"$ref": _DOCUMENT_URI + "#" + urllib.parse.quote(pointer, safe="/~")},
                                registry=registry)


class HistoryReceiptsMixin:
    async def setUp(self) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, rate_limit_send=(100_000, 1))
        self.http = InProcessHTTP.for_server(self.server)
        self.users = {name: User(name) for name in ("alice", "bob", "carol", "dave")}
        for user in self.users.values():
            await user.register(self.http)
        database = self.server.database
        self.receipts = ReceiptsHandler(ChatStore(database), MessageStore(database), self.clock)

    def who(self, name: str) -> AuthUser:
        user = self.users[name]
        assert user.user_id is not None
        return AuthUser(user_id=user.user_id, cyphr_id=name, jti="", expires_at=0, device_hash="",
                        device_id=1)

    async def send(self, name: str, **target: Any) -> dict[str, Any]:
        response = await self.http.post("/api/messaging/send", {"encryptedPayload": PAYLOAD, **target},
                                        headers=self.users[name].auth())
        self.assertEqual(response.code, 201, response.body)
        return response.json()

    async def answer(self, name: str, path: str) -> dict[str, Any]:
        response = await self.http.get(path, headers=self.users[name].auth())
        self.assertEqual(response.code, 200, response.body)
        return response.json()

    async def history(self, name: str, chat: str) -> dict[int, dict[str, Any] | None]:
        """Each message of ``name``'s history of ``chat`` by seq: its
        receipts, or None where it carries none."""
        body = await self.answer(name, f"/api/messaging/chat/{chat}?limit=200")
        return {m["seq"]: m.get("receipts") for m in body["messages"]}

    async def sync(self, name: str) -> dict[str, dict[str, Any] | None]:
        body = await self.answer(name, "/api/messaging/sync")
        return {m["id"]: m.get("receipts") for m in body["messages"]}

    async def group(self, admin: str, *members: str) -> str:
        await make_contacts(self.server, self.users[admin], *(self.users[m] for m in members))
        response = await self.http.post("/api/messaging/create-group", {
            "encryptedName": "bmFtZQ==", "members": list(members)}, headers=self.users[admin].auth())
        self.assertEqual(response.code, 201, response.body)
        return response.json()["chatId"]

    async def test_direct_chat(self) -> None:
        """Before any receipt one's own messages carry empty receipts and
        others' none; a delivery by id marks one delivered, a read up to a
        seq marks those up to it read (and so delivered), a read by id marks
        that one; the reader's view of the same messages never says who read
        them; sync carries the same receipts as history."""
        m1 = await self.send("alice", recipientId="bob")
        chat = m1["chatId"]
        m2, m3 = await self.send("alice", chatId=chat), await self.send("alice", chatId=chat)
        reply = await self.send("bob", chatId=chat)
        self.assertEqual(await self.history("alice", chat), {1: NONE, 2: NONE, 3: NONE, 4: None})
        self.assertEqual(await self.history("bob", chat), {1: None, 2: None, 3: None, 4: NONE})

        await self.receipts.delivered(self.who("bob"), m1["messageId"], chat)
        self.assertEqual(await self.history("alice", chat), {
            1: {"delivered": ["bob"], "read": []}, 2: NONE, 3: NONE, 4: None})
        await self.receipts.read_up_to(self.who("bob"), chat, 2)
        read = {"delivered": ["bob"], "read": ["bob"]}
        self.assertEqual(await self.history("alice", chat), {1: read, 2: read, 3: NONE, 4: None})
        await self.receipts.read(self.who("bob"), m3["messageId"], chat)
        self.assertEqual(await self.history("alice", chat), {1: read, 2: read, 3: read, 4: None})
        self.assertEqual(await self.history("bob", chat), {1: None, 2: None, 3: None, 4: NONE})

        # The other way round: bob's message, delivered to alice.
        await self.receipts.delivered(self.who("alice"), reply["messageId"], chat)
        self.assertEqual((await self.history("bob", chat))[4], {"delivered": ["alice"], "read": []})
        self.assertIsNone((await self.history("alice", chat))[4])

        self.assertEqual(await self.sync("alice"), {
            m1["messageId"]: read, m2["messageId"]: read, m3["messageId"]: read,
            reply["messageId"]: None})
        self.assertEqual(await self.sync("bob"), {
            m1["messageId"]: None, m2["messageId"]: None, m3["messageId"]: None,
            reply["messageId"]: {"delivered": ["alice"], "read": []}})

    async def test_group(self) -> None:
        """In a group each member counts on its own, sorted: a delivery by
        id, a read by id, a read up to a seq. A member added later counts
        for no message sent before it joined (its marks start there), only
        for later ones; a removed member and one whose account was deleted
        no longer count, and history still answers."""
        chat = await self.group("alice", "bob", "carol")
        first, second = await self.send("alice", chatId=chat), await self.send("alice", chatId=chat)
        await self.receipts.delivered(self.who("bob"), first["messageId"], chat)
        await self.receipts.read_up_to(self.who("carol"), chat, second["seq"])
        self.assertEqual(await self.history("alice", chat), {
            1: {"delivered": ["bob", "carol"], "read": ["carol"]},
            2: {"delivered": ["carol"], "read": ["carol"]}})
        await self.receipts.read(self.who("bob"), first["messageId"], chat)
        both = {"delivered": ["bob", "carol"], "read": ["bob", "carol"]}
        self.assertEqual((await self.history("alice", chat))[1], both)

        await make_contacts(self.server, self.users["alice"], self.users["dave"])
        response = await self.http.post(f"/api/chats/{chat}/members/dave", None,
                                        headers=self.users["alice"].auth())
        self.assertEqual(response.code, 200, response.body)
        third = await self.send("alice", chatId=chat)
        self.assertEqual(await self.history("alice", chat), {
            1: both, 2: {"delivered": ["carol"], "read": ["carol"]}, 3: NONE})
        await self.receipts.read_up_to(self.who("dave"), chat, third["seq"])
        self.assertEqual((await self.history("alice", chat))[3], {"delivered": ["dave"], "read": ["dave"]})
        self.assertEqual(await self.history("dave", chat), {3: None})

        response = await self.http.request("DELETE", f"/api/chats/{chat}/members/carol",
                                           headers=self.users["alice"].auth())
        self.assertEqual(response.code, 200, response.body)
        bob_only = {"delivered": ["bob"], "read": ["bob"]}
        self.assertEqual(await self.history("alice", chat), {1: bob_only, 2: NONE, 3: {
            "delivered": ["dave"], "read": ["dave"]}})
        self.assertEqual((await self.users["bob"].delete_account(self.http)).code, 200)
        self.assertEqual(await self.history("alice", chat), {1: NONE, 2: NONE, 3: {
            "delivered": ["dave"], "read": ["dave"]}})

    async def test_receipt_names_the_chat(self) -> None:
        """A receipt found by its chat and message id (what clients send:
        the look-up reads the chat's partition only) or by its message id
        alone (old clients) is recorded; one naming another chat of the
        reader's is MESSAGE_NOT_FOUND and records nothing."""
        from cyphr.errors import MESSAGE_NOT_FOUND, NotFound

        sent = await self.send("alice", recipientId="bob")
        other = await self.send("bob", recipientId="carol")
        with self.assertRaises(NotFound) as refused:
            await self.receipts.delivered(self.who("bob"), sent["messageId"], other["chatId"])
        self.assertEqual(refused.exception.code, MESSAGE_NOT_FOUND)
        self.assertEqual(await self.history("alice", sent["chatId"]), {1: NONE})
        named = await self.receipts.delivered(self.who("bob"), sent["messageId"], sent["chatId"])
        self.assertEqual((named.chat_id, named.tell), (sent["chatId"], ("alice",)))
        again = await self.send("alice", chatId=sent["chatId"])
        unnamed = await self.receipts.read(self.who("bob"), again["messageId"], None)
        self.assertEqual((unnamed.chat_id, unnamed.tell), (sent["chatId"], ("alice",)))
        self.assertEqual(await self.history("alice", sent["chatId"]), {
            1: {"delivered": ["bob"], "read": []}, 2: {"delivered": ["bob"], "read": ["bob"]}})

    async def test_deleted_contact(self) -> None:
        """A direct chat whose other member deleted its account still
        answers history and sync, with empty receipts on one's messages."""
        sent = await self.send("alice", recipientId="bob")
        await self.receipts.read(self.who("bob"), sent["messageId"], sent["chatId"])
        self.assertEqual(await self.history("alice", sent["chatId"]),
                         {1: {"delivered": ["bob"], "read": ["bob"]}})
        self.assertEqual((await self.users["bob"].delete_account(self.http)).code, 200)
        self.assertEqual(await self.history("alice", sent["chatId"]), {1: NONE})
        self.assertEqual(await self.sync("alice"), {sent["messageId"]: NONE})

    async def test_one_query_per_page(self) -> None:
        """A page costs the same number of database queries whether it
        holds one of the caller's messages or sixty, each with receipts:
        the receipts come in one query for the page, not one per message."""
        first = await self.send("alice", recipientId="bob")
        chat = first["chatId"]
        await self.receipts.read(self.who("bob"), first["messageId"], chat)
        queries: list[str] = []
        run_query = self.server.database.run_query

        async def counted(sql: str, *args: Any, **kwargs: Any) -> Any:
            queries.append(sql)
            return await run_query(sql, *args, **kwargs)

        self.patch(self.server.database, "run_query", counted)
        await self.history("alice", chat)
        one = len(queries)
        for _ in range(59):
            sent = await self.send("alice", chatId=chat)
            await self.receipts.delivered(self.who("bob"), sent["messageId"], chat)
        del queries[:]
        page = await self.history("alice", chat)
        self.assertEqual(len(page), 60)
        self.assertEqual(page[60], {"delivered": ["bob"], "read": []})
        self.assertEqual(len(queries), one)
        self.assertEqual(len([sql for sql in queries if "message_receipts" in sql]), 1)

    async def test_answers_match_the_document(self) -> None:
        """History and sync answers with receipts (empty and not, on one's
        own messages beside others') are what the OpenAPI document says; a
        receipts object of another shape is not."""
        sent = await self.send("alice", recipientId="bob")
        await self.send("alice", chatId=sent["chatId"])
        await self.send("bob", chatId=sent["chatId"])
        await self.receipts.read(self.who("bob"), sent["messageId"], sent["chatId"])
        history = await self.answer("alice", f"/api/messaging/chat/{sent['chatId']}")
        sync = await self.answer("alice", "/api/messaging/sync")
        self.assertEqual([m.get("receipts") for m in history["messages"]],
                         [{"delivered": ["bob"], "read": ["bob"]}, NONE, None])
        history_schema, sync_schema = answer_validator(HISTORY_PATH), answer_validator(SYNC_PATH)
        history_schema.validate(history)
        sync_schema.validate(sync)
        for wrong in (["bob"], {"delivered": ["bob"]}, {"delivered": "bob", "read": []},
                      {"delivered": ["bob"], "read": [], "at": 1}, {"delivered": ["Bob!"], "read": []},
                      {"delivered": ["bob", "bob"], "read": []}):
            broken = json.loads(json.dumps(history))
            broken["messages"][0]["receipts"] = wrong
            self.assertRaises(ValidationError, history_schema.validate, broken)


class SQLiteHistoryReceiptsTests(HistoryReceiptsMixin, SQLiteMixin, TestCase):
    pass


class PostgresHistoryReceiptsTests(HistoryReceiptsMixin, PostgresMixin, TestCase):
    async def test_page_query_plan(self) -> None:
        """On PostgreSQL the receipts of a 100-message page look into one
        partition of messages, the chat's: the chat id reaches the planner
        as a constant. (Which index it takes there depends on the table's
        statistics; with 200,000 messages it is the primary key's seq range.)"""
        first = await self.send("alice", recipientId="bob")
        chat = first["chatId"]
        for _ in range(99):
            await self.send("alice", chatId=chat)
        await self.receipts.read_up_to(self.who("bob"), chat, 50)
        plans: list[str] = []
        database = self.server.database
        run_query = database.run_query

        async def explained(sql: str, *args: Any, **kwargs: Any) -> Any:
            if "message_receipts" in sql:
                rows = await run_query("EXPLAIN (COSTS OFF) " + sql, *args, **kwargs)
                plans.append("\n".join(row[0] for row in rows))
            return await run_query(sql, *args, **kwargs)

        self.patch(database, "run_query", explained)
        page = await self.answer("alice", f"/api/messaging/chat/{chat}?limit=100")
        self.assertEqual(len(page["messages"]), 100)
        [plan] = plans
        self.assertEqual(len(set(re.findall(r"\bmessages_\d+\b", plan))), 1, plan)
