"""
The reference client sends every message to every device over sessions
(issues #13 and #22): alice on three devices and bob on two (the others
linked) read everything any device sends, in a direct chat and a group,
each device given its own envelope; a device linked later reads what is
sent after it joined, not before; a device linked between a sender's fetch
of the device lists and its send (409 DEVICES_CHANGED) gets an envelope on
the retry; a device whose key the server substituted gets no envelope it
can open, and the sender is told; a message sealed under v2 (one wrapped
key per user, before devices) still opens. A real server, over a real
port, with the library, on both engines.
"""

from __future__ import annotations

import base64
import threading
import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.client import crypto, sessionbook
from cyphr.client.client import Client, Message
from cyphr.client.crypto import Recipient
from cyphr.client.http import ClientError
from tests.clients import ServedClients
from tests.helpers import PostgresMixin, SQLiteMixin


class MultiDeviceMixin(ServedClients):
    async def texts(self, reader: Client, chat_id: str) -> dict[str, Message]:
        return {m.id: m for m in await self.thread(reader.history, chat_id)}

    async def envelopes(self, chat_id: str, seq: int) -> list[tuple[str, int]]:
        """The devices the server holds an envelope of the message for."""
        rows = await self.server.database.run_query(
            "SELECT i.cyphr_id, e.device_id FROM message_envelopes e"
            " JOIN cyphr_identities i ON i.id = e.user_id WHERE e.chat_id = ? AND e.seq = ?"
            " ORDER BY 1, 2", (chat_id, seq))
        return [tuple(row) for row in rows]

    async def raw(self, reader: Client, chat_id: str) -> dict[str, dict[str, Any]]:
        """The messages of a chat as the server hands them out, by id."""
        answer = await self.thread(reader._call, "GET", f"/api/messaging/chat/{chat_id}")
        return {m["id"]: m for m in answer["messages"]}

    # -- every device reads every message -----------------------------------------

    async def test_five_devices_read_every_message(self) -> None:
        """Alice on three devices (the others linked, the third by the
        second) and bob on two: in a direct chat and in a group, each of the
        five devices sends, and each reads every message, verified and from
        the right sender; every message went over sessions, with an
        envelope for each of the four other devices."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        alice2 = await self.linked(alice)
        alice3 = await self.linked(alice2)
        bob2 = await self.linked(bob)
        devices = [("alice", alice), ("alice", alice2), ("alice", alice3), ("bob", bob),
                   ("bob", bob2)]
        self.assertEqual([c.device_id for _, c in devices], [1, 2, 3, 1, 2])
        everyone = [("alice", 1), ("alice", 2), ("alice", 3), ("bob", 1), ("bob", 2)]

        first = await self.thread(alice.send, "bob", "hello from alice 1")
        direct = first["chatId"]
        group = await self.thread(alice.create_group, "five devices", ["bob"])
        sent: dict[str, dict[str, tuple[str, str]]] = {direct: {}, group: {}}
        for chat_id in (direct, group):
            for index, (owner, device) in enumerate(devices):
                text = f"{chat_id[:8]} from {owner} {device.device_id} ({index})"
                answer = await self.thread(device.send, chat_id if chat_id == group else
                                           ("bob" if owner == "alice" else "alice"), text)
                self.assertEqual(answer["chatId"], chat_id)
                sent[chat_id][answer["messageId"]] = (owner, text)
                self.assertEqual(device.refused_devices, [])
        for chat_id, messages in sent.items():
            raw = await self.raw(alice, chat_id)
            for message_id in messages:
                message = raw[message_id]
                payload = message["encryptedPayload"]
                self.assertEqual((payload["version"], payload["scheme"]), (4, "cyphr-s1-message"))
                sender = (message["senderId"], message["senderDeviceId"])
                self.assertEqual(await self.envelopes(chat_id, message["seq"]),
                                 [d for d in everyone if d != sender])
            for owner, reader in devices:
                got = await self.texts(reader, chat_id)
                for message_id, (sender, text) in messages.items():
                    message = got[message_id]
                    self.assertEqual((message.text, message.verified, message.sender),
                                     (text, True, sender),
                                     f"{owner} {reader.device_id}: {message.error}")
        # The group's name key reached the devices in a sealed system message.
        for _, reader in devices:
            names = {c["chatId"]: c["name"] for c in await self.thread(reader.chats)}
            self.assertEqual(names[group], "five devices")

    async def test_a_device_linked_later_reads_what_follows(self) -> None:
        """A device linked after a message was sent cannot open that message
        (it was sealed to the devices there were: documented), and reads
        what is sent after it joined, from a contact and from its own
        identity's other device."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        before = await self.thread(alice.send, "bob", "before the laptop")
        chat_id = before["chatId"]
        laptop = await self.linked(bob)
        after = await self.thread(alice.send, "bob", "after the laptop")
        own = await self.thread(bob.send, "alice", "bob's phone, after")
        got = await self.texts(laptop, chat_id)
        earlier = got[before["messageId"]]
        self.assertIsNone(earlier.text)
        self.assertIn("device 2 of bob is not a recipient of this message", earlier.error)
        self.assertEqual(got[after["messageId"]].text, "after the laptop")
        self.assertEqual(got[own["messageId"]].text, "bob's phone, after")
        self.assertTrue(got[own["messageId"]].verified)
        # The first device still reads all of it.
        self.assertEqual([m.text for m in await self.thread(bob.history, chat_id)],
                         ["before the laptop", "after the laptop", "bob's phone, after"])

    # -- DEVICES_CHANGED ---------------------------------------------------------

    async def test_a_device_linked_during_a_send_is_sealed_to_on_the_retry(self) -> None:
        """Bob links another device after alice's client fetched his device
        list and sealed her message, before it is sent: the server refuses
        it (409 DEVICES_CHANGED), and alice's client fetches the lists
        again, seals again (to the new device too) and sends; the new device
        reads it, and the message is stored once. Over REST (``send``) and
        over realtime (``Listener.send``)."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        bob2 = await self.linked(bob)
        chat_id = (await self.thread(alice.send, "bob", "first"))["chatId"]
        listener = await self.thread(lambda: alice.listener(lambda m: None, top_up=False).start())
        # Off the reactor: stop() waits for the server's answer to its close.
        self.addCleanup(deferToThread, listener.stop)
        seal = sessionbook.sealed
        for path, new_device_id in (("rest", 3), ("realtime", 4)):
            sealed_for: list[list[dict[str, Any]]] = []
            sealed = threading.Event()
            go_on = threading.Event()

            def late(*args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
                body, own = seal(*args)
                sealed_for.append([{"cyphrId": e["cyphrId"], "deviceId": e["deviceId"]}
                                   for e in body["envelopes"]])
                if len(sealed_for) == 1:
                    sealed.set()  # the lists are fetched: the test links a device now
                    assert go_on.wait(30)
                return body, own

            self.patch(sessionbook, "sealed", late)
            text = f"sent over {path} while a device was linked"
            sender = alice.send if path == "rest" else listener.send
            sending = deferToThread(sender, chat_id, text)
            self.assertTrue(await self.thread(sealed.wait, 30))
            new_device = await self.linked(bob)
            self.assertEqual(new_device.device_id, new_device_id)
            go_on.set()
            await sending
            new = {"cyphrId": "bob", "deviceId": new_device_id}
            self.assertEqual(len(sealed_for), 2)
            self.assertNotIn(new, sealed_for[0])
            self.assertIn(new, sealed_for[1])
            for reader in (bob, bob2, new_device):
                got = [m for m in await self.thread(reader.history, chat_id) if m.text == text]
                self.assertEqual(len(got), 1, f"device {reader.device_id}")
            self.patch(sessionbook, "sealed", seal)

    async def test_devices_changing_twice_is_a_clear_error(self) -> None:
        """When the server refuses the message sealed again as well (its
        device list still differs), the send stops with a ClientError that
        says so and names the devices; nothing is stored."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        await self.linked(bob)
        chat_id = (await self.thread(alice.send, "bob", "first"))["chatId"]

        def transmit(body: dict[str, Any]) -> dict[str, Any]:
            # Leaves out bob's second device each time, as a stale list would.
            body = dict(body, envelopes=[e for e in body["envelopes"]
                                         if (e["cyphrId"], e["deviceId"]) != ("bob", 2)])
            return alice._call("POST", "/api/messaging/send", body)

        with self.assertRaises(ClientError) as caught:
            await self.thread(alice.send_sealed, chat_id, b"never stored", "text", transmit)
        self.assertIn("the chat's devices changed again", str(caught.exception))
        self.assertIn("missing: bob 2", str(caught.exception))
        self.assertEqual(len(await self.thread(bob.history, chat_id)), 1)

    # -- what a malicious server might do ----------------------------------------

    async def test_a_substituted_device_key_is_not_sealed_to(self) -> None:
        """The server puts a key of its own in place of bob's second device's:
        alice's client still sends over sessions (refusing the key must not
        take forward secrecy from everyone), starts no session with the
        substituted device (its envelope is random bytes) and says so
        (``refused_devices``, naming the device and why); bob's first
        device reads the message, the substituted device cannot."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        bob2 = await self.linked(bob)
        ghost = MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()
        await self.server.database.run_operation(
            "UPDATE devices SET kyber_public_key = ? WHERE device_id = 2 AND user_id ="
            " (SELECT id FROM cyphr_identities WHERE cyphr_id = 'bob')", (ghost,))
        answer = await self.thread(alice.send, "bob", "not for the ghost")
        [(cyphr_id, device_id, problem)] = alice.refused_devices
        self.assertEqual((cyphr_id, device_id), ("bob", 2))
        self.assertIn("not signed by bob's identity key as the key of device 2", problem)
        raw = await self.raw(alice, answer["chatId"])
        payload = raw[answer["messageId"]]["encryptedPayload"]
        self.assertEqual(payload["version"], 4)
        self.assertNotIn(base64.b64encode(ghost).decode(), str(payload))
        self.assertIsNone(await self.thread(alice.store.get, "sessions", "bob/2"))
        got = await self.texts(bob, answer["chatId"])
        self.assertEqual(got[answer["messageId"]].text, "not for the ghost")
        missed = (await self.texts(bob2, answer["chatId"]))[answer["messageId"]]
        self.assertIsNone(missed.text)
        self.assertIn("no session with the sender's device", missed.error)

    # -- history from before devices -----------------------------------------------

    async def test_a_v2_payload_still_opens(self) -> None:
        """A message sealed under v2 (one wrapped key per user, as clients
        did before devices) and sent without a device list is read by its
        recipient's first device and by the sender, verified."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        contact = await self.thread(alice.contact, "bob")
        client_message_id = str(uuid.uuid4())
        payload = crypto.seal(
            alice.identity, "alice",
            [Recipient("alice", alice.identity.public_key, alice.identity.kyber_public_key, 0),
             Recipient("bob", contact.identity_key, contact.kyber_public_key,
                       contact.kyber_key_id)],
            b"sealed the old way", chat_id=None, message_type="text",
            client_message_id=client_message_id)
        answer = await self.thread(alice._call, "POST", "/api/messaging/send", {
            "recipientId": "bob", "encryptedPayload": payload, "messageType": "text",
            "clientMessageId": client_message_id})
        for reader in (alice, bob):
            message = (await self.texts(reader, answer["chatId"]))[answer["messageId"]]
            self.assertEqual((message.text, message.verified), ("sealed the old way", True),
                             message.error)


class SQLiteMultiDeviceTests(SQLiteMixin, MultiDeviceMixin, TestCase):
    pass


class PostgresMultiDeviceTests(PostgresMixin, MultiDeviceMixin, TestCase):
    pass
