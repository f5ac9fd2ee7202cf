"""
Messages over sessions, the server's side (issue #22, item 5): a send
carries one opaque body and one envelope per recipient device; each device
is given only its own, live, in its catch-up, in history and in sync; an
envelope goes once its device acknowledges the message, the body once no
envelope of it is left (acknowledged, expired, or its device removed). On
both engines, and across two nodes.
"""

from __future__ import annotations

import base64
import os
import time
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cyphr.handlers.maintenance import Maintenance
from cyphr.store.challenges import ChallengeStore
from cyphr.store.messages import MessageStore
from cyphr.store.tokens import TokenStore
from tests.helpers import PostgresMixin, SQLiteMixin
from tests.test_devices import new_fingerprint
from tests.test_realtime_cluster import ClusterMixin
from tests.test_realtime_events import MemoryRealtimeBase
from tests.users import User


def envelope_for(cyphr_id: str, device_id: int, data: bytes, kind: str = "message") -> dict[str, Any]:
    return {"cyphrId": cyphr_id, "deviceId": device_id, "kind": kind,
            "envelope": base64.b64encode(data).decode()}


async def arrived(client: Any, message_id: str) -> dict[str, Any]:
    """The message ``message_id`` once the socket has it (live or caught up)."""
    count = 1
    while True:
        events = await client.wait_for("new_message", count)
        for event in events:
            if event["message"]["id"] == message_id:
                return event["message"]
        count = len(events) + 1


def sealed_data(cyphr_id: str, device_id: int, text: str) -> bytes:
    """Stands for a session message: distinct for each device and message."""
    return f"{text} for {cyphr_id}/{device_id}".encode()


class EnvelopesMixin:
    async def setUp(self) -> None:
        await self.serve()
        self.alice, self.bob = await self.user("alice"), await self.user("bob")
        self.chat_id = await self.direct_chat(self.bob, self.alice)
        response = await self.alice.recover(self.http, new_fingerprint(), keepOtherDevices=True)
        assert response.code == 200, response.body
        self.tokens = {("alice", 1): self.alice.token, ("alice", 2): response.json()["token"],
                       ("bob", 1): self.bob.token}

    def auth(self, device: tuple[str, int]) -> dict[str, str]:
        user = self.alice if device[0] == "alice" else self.bob
        return user.auth(self.tokens[device])

    async def send(self, sender: tuple[str, int], text: str, *,
                   to: list[tuple[str, int]] | None = None, **extra: Any) -> Any:
        """A send from ``sender`` over sessions, with an envelope for each
        device of ``to`` (default: every device but the sender's)."""
        devices = to if to is not None else [d for d in self.tokens if d != sender]
        body = {"chatId": self.chat_id, "encryptedPayload": {"body": text},
                "envelopes": [envelope_for(c, d, sealed_data(c, d, text)) for c, d in devices], **extra}
        return await self.http.post("/api/messaging/send", body, headers=self.auth(sender))

    async def sent(self, sender: tuple[str, int], text: str) -> dict[str, Any]:
        response = await self.send(sender, text)
        self.assertEqual(response.code, 201, response.body)
        return response.json()

    async def rows(self) -> list[tuple[str, int, int, str]]:
        """Every stored envelope: (Cyphr ID, device id, seq, kind)."""
        rows = await self.server.database.run_query(
            "SELECT i.cyphr_id, e.device_id, e.seq, e.kind FROM message_envelopes e"
            " JOIN cyphr_identities i ON i.id = e.user_id ORDER BY 1, 2, 3")
        return [tuple(row) for row in rows]

    async def history(self, device: tuple[str, int]) -> list[dict[str, Any]]:
        response = await self.http.get(f"/api/messaging/chat/{self.chat_id}", headers=self.auth(device))
        self.assertEqual(response.code, 200, response.body)
        return response.json()["messages"]

    def opened(self, message: dict[str, Any], device: tuple[str, int]) -> None:
        """The message carries ``device``'s own envelope, and its body."""
        text = message["encryptedPayload"]["body"]
        self.assertEqual(message["envelope"], {"kind": "message", "envelope": base64.b64encode(
            sealed_data(*device, text)).decode()})

    async def test_each_device_is_given_its_own_envelope(self) -> None:
        """Bob's message reaches alice's device 1 live and device 2 in its
        catch-up, each with its own envelope and nobody else's; history
        and sync show each device its own; bob's own copy has none. A
        message alice's device 2 sends over the socket reaches bob and her
        device 1, each with its own."""
        live = await self.connect(self.alice)
        sent = await self.sent(("bob", 1), "one")
        self.opened(await arrived(live, sent["messageId"]), ("alice", 1))
        late = self.new_client()
        await late.connect({"token": self.tokens[("alice", 2)]})
        await late.wait_for("sync_complete")
        [caught] = [e["message"] for e in late.events("new_message") if e["message"]["id"] == sent["messageId"]]
        self.opened(caught, ("alice", 2))
        for device in (("alice", 1), ("alice", 2)):
            [message] = [m for m in await self.history(device) if m["id"] == sent["messageId"]]
            self.opened(message, device)
            response = await self.http.get("/api/messaging/sync", headers=self.auth(device))
            [synced] = [m for m in response.json()["messages"] if m["id"] == sent["messageId"]]
            self.opened(synced, device)
        [own] = [m for m in await self.history(("bob", 1)) if m["id"] == sent["messageId"]]
        self.assertNotIn("envelope", own)
        self.assertEqual(own["encryptedPayload"], {"body": "one"})

        bob = await self.connect(self.bob)
        ack = await late.call("send_message", {
            "chatId": self.chat_id, "encryptedPayload": {"body": "two"}, "clientMessageId": "c2",
            "envelopes": [envelope_for("alice", 1, sealed_data("alice", 1, "two")),
                          envelope_for("bob", 1, sealed_data("bob", 1, "two"))]})
        self.assertTrue(ack["success"], ack)
        for client, device in ((bob, ("bob", 1)), (live, ("alice", 1))):
            self.opened(await arrived(client, ack["messageId"]), device)
        await late.barrier()
        self.assertEqual([e for e in late.events("new_message") if e["message"]["id"] == ack["messageId"]], [])

    async def test_acknowledged_envelopes_go_then_the_body(self) -> None:
        """Each device's acknowledgement deletes its envelope; the body goes
        with the last one: history then shows the message with no payload
        and not deleted. A resend under the same clientMessageId stores no
        second set of envelopes."""
        sent = await self.sent(("bob", 1), "one")
        again = await self.send(("bob", 1), "one", clientMessageId="same")
        first = again.json()
        self.assertEqual((await self.send(("bob", 1), "one", clientMessageId="same")).json()["messageId"],
                         first["messageId"])
        self.assertEqual(len(await self.rows()), 4)
        for n, device in enumerate((("alice", 2), ("alice", 1))):
            client = self.new_client()
            await client.connect({"token": self.tokens[device]})
            await client.wait_for("sync_complete")
            answer = await client.call("message_delivered", {"messageId": sent["messageId"],
                                                             "chatId": self.chat_id})
            self.assertTrue(answer["success"], answer)
            left = [row for row in await self.rows() if row[2] == sent["seq"]]
            [message] = [m for m in await self.history(("bob", 1)) if m["id"] == sent["messageId"]]
            if n == 0:
                self.assertEqual(left, [("alice", 1, sent["seq"], "message")])
                self.assertEqual(message["encryptedPayload"], {"body": "one"})
            else:
                self.assertEqual(left, [])
                self.assertEqual((message["encryptedPayload"], message["deletedAt"]), (None, None))
            [mine] = [m for m in await self.history(device) if m["id"] == sent["messageId"]]
            self.assertNotIn("envelope", mine)
        # The other message and its envelopes are untouched.
        self.assertEqual(len(await self.rows()), 2)

    async def test_own_devices_acknowledge_too(self) -> None:
        """An envelope alice's device 2 sealed for her device 1 goes when
        device 1 acknowledges the message (her own, from another device)."""
        sent = await self.sent(("alice", 2), "mine")
        client = await self.connect(self.alice)
        [event] = [e for e in client.events("new_message") if e["message"]["id"] == sent["messageId"]]
        self.opened(event["message"], ("alice", 1))
        answer = await client.call("message_delivered", {"messageId": sent["messageId"],
                                                         "chatId": self.chat_id})
        self.assertTrue(answer["success"], answer)
        self.assertEqual(await self.rows(), [("bob", 1, sent["seq"], "message")])

    async def test_refused_sends_store_nothing(self) -> None:
        """Envelopes that are not one for each device of the chat but the
        sending one are 409 DEVICES_CHANGED; malformed ones, one for the
        sending device, or devices and envelopes together, 400
        INVALID_FIELD; none stores a message or an envelope."""
        missing = await self.send(("bob", 1), "x", to=[("alice", 1)])
        self.assertEqual((missing.code, missing.json()["code"]), (409, "DEVICES_CHANGED"))
        self.assertEqual(missing.json()["details"], {
            "missing": [{"cyphrId": "alice", "deviceId": 2}], "stale": []})
        stale = await self.send(("bob", 1), "x", to=[("alice", 1), ("alice", 2), ("alice", 3)])
        self.assertEqual(stale.json()["details"]["stale"], [{"cyphrId": "alice", "deviceId": 3}])
        own = await self.send(("bob", 1), "x", to=[("alice", 1), ("alice", 2), ("bob", 1)])
        self.assertEqual((own.code, own.json()["details"]), (400, {"field": "envelopes[2]"}))
        good = [envelope_for("alice", 1, b"k"), envelope_for("alice", 2, b"k")]
        bad: list[Any] = [
            [good[0], {**good[1], "kind": "signal"}],
            [good[0], {**good[1], "envelope": ""}],
            [good[0], {**good[1], "envelope": "not base64!"}],
            [good[0], {**good[1], "envelope": base64.b64encode(os.urandom(16 * 1024 + 1)).decode()}],
            [good[0], good[0]],
            [good[0], "alice"],
            "x",
        ]
        for envelopes in bad:
            response = await self.http.post("/api/messaging/send", {
                "chatId": self.chat_id, "encryptedPayload": {}, "envelopes": envelopes},
                headers=self.auth(("bob", 1)))
            self.assertEqual((response.code, response.json()["code"]), (400, "INVALID_FIELD"),
                             (envelopes, response.body))
        extra = await self.http.post("/api/messaging/send", {
            "chatId": self.chat_id, "encryptedPayload": {}, "envelopes": [good[0], {**good[1], "x": 1}]},
            headers=self.auth(("bob", 1)))
        self.assertEqual((extra.code, extra.json()["code"]), (400, "UNKNOWN_FIELD"))
        both = await self.http.post("/api/messaging/send", {
            "chatId": self.chat_id, "encryptedPayload": {}, "envelopes": good,
            "devices": [{"cyphrId": "alice", "deviceId": 1}, {"cyphrId": "alice", "deviceId": 2}]},
            headers=self.auth(("bob", 1)))
        self.assertEqual((both.code, both.json()["details"]), (400, {"field": "envelopes"}))
        self.assertEqual(await self.rows(), [])
        self.assertEqual(len(await self.history(("bob", 1))), 1)  # the first "hello" only
        largest = [good[0], {**good[1], "envelope": base64.b64encode(os.urandom(16 * 1024)).decode()}]
        response = await self.http.post("/api/messaging/send", {
            "chatId": self.chat_id, "encryptedPayload": {}, "envelopes": largest},
            headers=self.auth(("bob", 1)))
        self.assertEqual(response.code, 201, response.body)

    async def test_expired_envelopes_go_with_bare_bodies(self) -> None:
        """The sweep deletes envelopes older than the envelope retention and
        erases the bodies left with none; a message with no envelopes (the
        first "hello") and newer envelopes stay."""
        old = await self.sent(("bob", 1), "old")
        db = self.server.database
        await db.run_operation("UPDATE message_envelopes SET created_at = created_at - ? WHERE seq = ?",
                               (31 * 86_400_000, old["seq"]))
        new = await self.sent(("bob", 1), "new")
        clock = Clock()
        clock.advance(time.time())
        await Maintenance(ChallengeStore(db), TokenStore(db), MessageStore(db), 0, clock,
                          envelope_retention_days=30).run()
        self.assertEqual([row[2] for row in await self.rows()], [new["seq"], new["seq"]])
        payloads = {m["id"]: m["encryptedPayload"] for m in await self.history(("bob", 1))}
        self.assertIsNone(payloads[old["messageId"]])
        self.assertEqual(payloads[new["messageId"]], {"body": "new"})
        self.assertEqual(sum(1 for p in payloads.values() if p == {"hello": True}), 1)
        await Maintenance(ChallengeStore(db), TokenStore(db), MessageStore(db), 0, clock,
                          envelope_retention_days=0).run()
        self.assertEqual(len(await self.rows()), 2)

    async def test_not_edited(self) -> None:
        """A message sent over sessions is not edited (its envelopes name the
        body they were made for), nor one whose body is gone: 409
        NOT_EDITABLE, and the body stays; a message sent without envelopes
        still is."""
        sent = await self.sent(("bob", 1), "as sent")
        path = f"/api/messaging/message/{sent['messageId']}"
        refused = await self.http.put(path, {"encryptedPayload": {"body": "changed"}},
                                      headers=self.auth(("bob", 1)))
        self.assertEqual((refused.code, refused.json()["code"]), (409, "NOT_EDITABLE"))
        [message] = [m for m in await self.history(("bob", 1)) if m["id"] == sent["messageId"]]
        self.assertEqual(message["encryptedPayload"], {"body": "as sent"})
        await self.server.database.run_operation(
            "DELETE FROM message_envelopes WHERE seq = ?", (sent["seq"],))
        await self.server.database.run_operation(
            "UPDATE messages SET encrypted_content = NULL WHERE seq = ? AND chat_id = ?",
            (sent["seq"], self.chat_id))
        gone = await self.http.put(path, {"encryptedPayload": {"body": "back"}},
                                   headers=self.auth(("bob", 1)))
        self.assertEqual((gone.code, gone.json()["code"]), (409, "NOT_EDITABLE"))
        plain = await self.http.post("/api/messaging/send", {
            "chatId": self.chat_id, "encryptedPayload": {"v": 1}}, headers=self.auth(("bob", 1)))
        edited = await self.http.put(f"/api/messaging/message/{plain.json()['messageId']}",
                                     {"encryptedPayload": {"v": 2}}, headers=self.auth(("bob", 1)))
        self.assertEqual(edited.code, 200, edited.body)

    async def test_removed_devices_and_deleted_messages(self) -> None:
        """Removing a device deletes its envelopes, and the bodies whose
        last envelope it held; a message its sender deletes loses its
        envelopes at once."""
        first = await self.sent(("bob", 1), "one")
        second = await self.sent(("bob", 1), "two")
        client = await self.connect(self.alice)
        answer = await client.call("message_delivered", {"messageId": first["messageId"],
                                                         "chatId": self.chat_id})
        self.assertTrue(answer["success"], answer)
        removed = await self.http.delete("/api/devices/me/2", headers=self.auth(("alice", 1)))
        self.assertEqual(removed.code, 200, removed.body)
        self.assertEqual(await self.rows(), [("alice", 1, second["seq"], "message")])
        payloads = {m["id"]: m["encryptedPayload"] for m in await self.history(("bob", 1))}
        self.assertEqual((payloads[first["messageId"]], payloads[second["messageId"]]),
                         (None, {"body": "two"}))
        deleted = await self.http.delete(f"/api/messaging/message/{second['messageId']}",
                                         headers=self.auth(("bob", 1)))
        self.assertEqual(deleted.code, 200, deleted.body)
        self.assertEqual(await self.rows(), [])


class SQLiteEnvelopesTests(SQLiteMixin, EnvelopesMixin, MemoryRealtimeBase, TestCase):
    pass


class PostgresEnvelopesTests(PostgresMixin, EnvelopesMixin, MemoryRealtimeBase, TestCase):
    pass


class EnvelopesAcrossNodesTests(PostgresMixin, ClusterMixin, TestCase):
    async def test_the_other_node_gives_each_device_its_own(self) -> None:
        """Bob on node A sends to alice's two devices, one on each node:
        each is given its own envelope live, node B having fetched the
        message with its envelopes."""
        a_node, b_node = await self.cluster(self.migrated_database_setting())
        alice, bob = await self.user(a_node, "alice"), await self.user(a_node, "bob")
        response = await alice.recover(a_node.http, new_fingerprint(), keepOtherDevices=True)
        assert response.code == 200, response.body
        other = User("alice")
        other.token = response.json()["token"]
        devices = {1: await self.connect(a_node, alice), 2: await self.connect(b_node, other)}
        sender = await self.connect(a_node, bob)
        ack = await sender.call("send_message", {
            "recipientId": "alice", "encryptedPayload": {"body": "x"},
            "envelopes": [envelope_for("alice", d, sealed_data("alice", d, "x")) for d in (1, 2)]})
        self.assertTrue(ack["success"], ack)
        for device_id, client in devices.items():
            message = await arrived(client, ack["messageId"])
            self.assertEqual(message["envelope"]["envelope"],
                             base64.b64encode(sealed_data("alice", device_id, "x")).decode())
