"""
The reference client sends over sessions (issue #22): messages between
several devices of two users, opened out of order, dropped and delivered
again; the body erased on the server once every device acknowledged it,
while each device keeps what it read; a replayed or re-dated message
refused, a gap shown, the sender's clock shown; two devices that start
sessions with each other at once; a handshake naming an erased prekey; a
contact whose client has no sessions (version 3). A real server over a
real port, on both engines, and two nodes of one PostgreSQL database.
"""

from __future__ import annotations

import os
import queue
import random
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.client.client import Client, Message
from tests.clients import PASSPHRASE, ServedClients
from tests.helpers import PostgresMixin, SQLiteMixin
from tests.test_client_devices import Linking
from tests.test_realtime_cluster import ClusterMixin

# In the many-devices test: 60 in the suite, enough for a tenth held back
# and a tenth twice on each of five devices (the protocol's own test takes
# 1,000: tests/test_sessions.py); CYPHR_SESSION_TEST_MESSAGES=1000 runs the
# issue's figure (about a minute).
MESSAGES = int(os.environ.get("CYPHR_SESSION_TEST_MESSAGES", "60"))


class ClientSessionsMixin(ServedClients):
    async def raw(self, reader: Client, chat_id: str) -> list[dict[str, Any]]:
        """The chat as the server hands it to ``reader``'s device, oldest first."""
        messages: list[dict[str, Any]] = []
        after = 0
        while True:
            answer = await self.thread(reader._call, "GET", f"/api/messaging/chat/{chat_id}",
                                       params={"after": after, "limit": 100})
            messages += answer["messages"]
            if not answer["hasMore"]:
                return messages
            after = messages[-1]["seq"]

    async def opened(self, reader: Client, message: dict[str, Any]) -> Message:
        return await self.thread(reader.open_message, message)

    async def test_a_pair_and_the_bodies_the_server_lets_go(self) -> None:
        """Alice and bob write to each other over sessions (version 4 on the
        wire). Once bob's listener has acknowledged alice's messages, the
        server holds neither their envelopes nor their bodies, and bob's
        history still shows them, from his local store; the time shown is
        the sender's clock."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        first = await self.thread(alice.send, "bob", "hello bob")
        chat_id = first["chatId"]
        await self.thread(bob.send, "alice", "hello alice")
        [raw] = [m for m in await self.raw(bob, chat_id) if m["id"] == first["messageId"]]
        # The first message carries alice's handshake.
        self.assertEqual((raw["encryptedPayload"]["version"], raw["envelope"]["kind"]),
                         (4, "prekey"))
        got: queue.Queue[Message] = queue.Queue()
        listener = await self.thread(lambda: bob.listener(got.put, top_up=False).start())
        second = await self.thread(alice.send, "bob", "are you there?")
        seen = [await self.thread(got.get, True, 10) for _ in range(2)]  # caught up, then live
        self.assertEqual([(m.id, m.text, m.verified) for m in seen],
                         [(first["messageId"], "hello bob", True),
                          (second["messageId"], "are you there?", True)])
        await self.thread(listener.stop)
        rows = await self.server.database.run_query("SELECT COUNT(*) FROM message_envelopes"
                                                    " WHERE chat_id = ?", (chat_id,))
        self.assertEqual(rows[0][0], 1)  # alice's envelope of "hello alice": never acknowledged
        erased = {m["id"]: m["encryptedPayload"] for m in await self.raw(bob, chat_id)}
        self.assertEqual((erased[first["messageId"]], erased[second["messageId"]]), (None, None))
        history = await self.thread(bob.history, chat_id)
        self.assertEqual([(m.sender, m.text, m.verified) for m in history],
                         [("alice", "hello bob", True), ("bob", "hello alice", True),
                          ("alice", "are you there?", True)])
        kept = await self.thread(bob.store.message, second["messageId"])
        self.assertEqual(history[-1].timestamp, self.iso(kept["sentAt"]))

    @staticmethod
    def iso(ms: int) -> str:
        from cyphr.client.crypto import iso_ms
        return iso_ms(ms)

    async def test_replayed_and_redated_messages(self) -> None:
        """A server that hands bob alice's message again under a new id,
        seq and date is refused (its envelope opened before); the original
        still reads, with alice's clock, not the server's."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        sent = await self.thread(alice.send, "bob", "approve the payment")
        [raw] = await self.raw(bob, sent["chatId"])
        genuine = await self.opened(bob, raw)
        self.assertEqual(genuine.text, "approve the payment")
        replay = dict(raw, id="00000000-0000-4000-8000-000000000001", seq=raw["seq"] + 1,
                      timestamp="2031-01-01T00:00:00.000Z")
        refused = await self.opened(bob, replay)
        self.assertIsNone(refused.text)
        self.assertIn("opened before", refused.error)
        again = await self.opened(bob, raw)
        self.assertEqual((again.text, again.timestamp), (genuine.text, genuine.timestamp))
        self.assertNotEqual(genuine.timestamp[:4], "2031")

    async def test_a_gap_is_shown(self) -> None:
        """A message the server withholds shows as a gap before the next one
        from the same device; when it comes after all, it fills the gap."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        chat_id = (await self.thread(alice.send, "bob", "one"))["chatId"]
        await self.thread(alice.send, chat_id, "two")
        await self.thread(alice.send, chat_id, "three")
        one, two, three = await self.raw(bob, chat_id)
        self.assertEqual((await self.opened(bob, one)).missing, 0)
        after_gap = await self.opened(bob, three)
        self.assertEqual((after_gap.text, after_gap.missing), ("three", 1))
        late = await self.opened(bob, two)
        self.assertEqual((late.text, late.missing), ("two", 0))

    async def test_both_start_at_once(self) -> None:
        """Alice and bob each send a first message before reading the
        other's: each has started a session; each then reads the other's
        (the newer handshake wins, the older session is kept to open what
        was sealed in it), the conversation goes on both ways, and the two
        come to use one session (the one a message last opened in)."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        chat_id = (await self.thread(alice.send, "bob", "alice first"))["chatId"]
        await self.thread(bob.send, chat_id, "bob first")
        await self.thread(alice.send, chat_id, "alice second")
        for reader in (alice, bob):
            texts = [(await self.opened(reader, m)).text for m in await self.raw(reader, chat_id)]
            self.assertEqual(texts, ["alice first", "bob first", "alice second"])
        for n in range(3):
            await self.thread(bob.send, chat_id, f"bob {n}")
            await self.thread(alice.send, chat_id, f"alice {n}")
        for reader in (alice, bob):
            texts = [m.text for m in await self.thread(reader.history, chat_id)]
            self.assertEqual(texts[-6:], ["bob 0", "alice 0", "bob 1", "alice 1", "bob 2",
                                          "alice 2"])
        # They came to use one session: without the ones before, still both ways.
        for client, peer in ((alice, "bob/1"), (bob, "alice/1")):
            record = await self.thread(client.store.get, "sessions", peer)
            await self.thread(client.store.put, "sessions", peer, dict(record, previous=None))
        await self.thread(alice.send, chat_id, "alice last")
        await self.thread(bob.send, chat_id, "bob last")
        for reader in (alice, bob):
            texts = [m.text for m in await self.thread(reader.history, chat_id)]
            self.assertEqual(texts[-2:], ["alice last", "bob last"])

    async def test_a_device_that_lost_its_sessions(self) -> None:
        """Bob's device loses its sessions (a store restored from before
        them): its next message starts a new session, alice's client answers
        in it, and bob reads the answer. (What alice sealed in the old one
        before reading bob's new message is lost to bob, as in Signal.)"""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        chat_id = (await self.thread(alice.send, "bob", "one"))["chatId"]
        await self.thread(bob.history, chat_id)
        await self.thread(bob.send, chat_id, "two")
        await self.thread(alice.history, chat_id)
        await self.thread(bob.store.delete, "sessions", "alice/1")
        await self.thread(bob.send, chat_id, "three, anew")
        await self.thread(alice.history, chat_id)  # read before answering, as a listener does
        await self.thread(alice.send, chat_id, "four")
        self.assertEqual([m.text for m in await self.thread(bob.history, chat_id)],
                         ["one", "two", "three, anew", "four"])
        self.assertEqual([m.text for m in await self.thread(alice.history, chat_id)],
                         ["one", "two", "three, anew", "four"])

    async def test_a_handshake_naming_an_erased_prekey(self) -> None:
        """A first message whose handshake names a signed prekey bob's
        device no longer has is refused, saying which; nothing is kept, and
        it opens once the key is back (the state did not move)."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        sent = await self.thread(alice.send, "bob", "sealed to a lost key")
        with bob.profile.lock:
            signed = bob.profile.vault["sessionKeys"]["signed"]
            kept = dict(signed)
            signed.clear()
            bob.profile.save()
        [raw] = await self.raw(bob, sent["chatId"])
        refused = await self.opened(bob, raw)
        self.assertIsNone(refused.text)
        self.assertRegex(refused.error, r"names signed prekey \d+, which this device does not have")
        self.assertIsNone(await self.thread(bob.store.message, raw["id"]))
        with bob.profile.lock:
            bob.profile.vault["sessionKeys"]["signed"].update(kept)
            bob.profile.save()
        self.assertEqual((await self.opened(bob, raw)).text, "sealed to a lost key")

    async def test_a_contact_without_sessions(self) -> None:
        """Bob's device published no session keys (a client from before
        sessions): alice's message goes as version 3, she is told why, and
        bob reads it; once he publishes, the next goes over sessions."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        await self.server.database.run_operation(
            "DELETE FROM session_prekeys WHERE user_id ="
            " (SELECT id FROM cyphr_identities WHERE cyphr_id = 'bob')")
        sent = await self.thread(alice.send, "bob", "the old way")
        self.assertIn("device 1 of bob published no session keys", alice.no_session)
        [raw] = await self.raw(bob, sent["chatId"])
        self.assertEqual(raw["encryptedPayload"]["version"], 3)
        self.assertEqual((await self.opened(bob, raw)).text, "the old way")
        await self.thread(bob.publish_session_keys)
        newer = await self.thread(alice.send, "bob", "the new way")
        self.assertIsNone(alice.no_session)
        [raw] = [m for m in await self.raw(bob, sent["chatId"]) if m["id"] == newer["messageId"]]
        self.assertEqual(raw["encryptedPayload"]["version"], 4)
        self.assertEqual((await self.opened(bob, raw)).text, "the new way")


class SQLiteClientSessionsTests(SQLiteMixin, ClientSessionsMixin, TestCase):
    pass


class PostgresClientSessionsTests(PostgresMixin, ClientSessionsMixin, TestCase):
    # On one engine: what it tests is the clients' (the server's part, the
    # same on both, is tests/test_envelopes.py's).
    async def test_five_devices_out_of_order(self) -> None:
        """Alice on two devices and bob on three take turns sending; each
        device then reads the whole chat as the server gives it, in a
        shuffled order, a tenth of it twice and a tenth held back until
        the end: every message opens once, with its text, on every device
        but its sender's (which kept its own)."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        devices = [alice, await self.linked(alice), bob, await self.linked(bob),
                   await self.linked(bob)]
        chat_id = (await self.thread(alice.send, "bob", "start"))["chatId"]
        sent = {}
        shuffle = random.Random(2026)
        for n in range(MESSAGES):
            device = devices[shuffle.randrange(len(devices))]
            text = f"message {n} from {device.cyphr_id} {device.device_id}"
            answer = await self.thread(device.send, chat_id, text)
            sent[answer["messageId"]] = text
        for reader in devices:
            messages = [m for m in await self.raw(reader, chat_id) if m["id"] in sent]
            self.assertEqual(len(messages), MESSAGES)
            shuffle.shuffle(messages)
            held = messages[:MESSAGES // 10]
            order = messages[MESSAGES // 10:] + messages[-MESSAGES // 10:] + held
            for message in order:
                got = await self.opened(reader, message)
                self.assertEqual(got.text, sent[message["id"]],
                                 f"device {reader.cyphr_id} {reader.device_id}: {got.error}")



class ClientSessionsAcrossNodesTests(PostgresMixin, ClusterMixin, TestCase):
    """The reference clients over sessions, on two nodes of one database."""

    async def test_across_nodes(self) -> None:
        """Alice (two devices) on node A and bob on node B: bob's listener
        on node B gets alice's message live (node B fetched it with its
        envelopes), both of alice's devices read bob's answer, and every
        message reads the same on each device."""
        a_node, b_node = await self.cluster(self.migrated_database_setting())
        directory = os.path.abspath(self.mktemp())

        def registered(url: str, name: str) -> Client:
            client, _ = Client.init(os.path.join(directory, name), PASSPHRASE, url)
            self.addCleanup(client.close)
            client.register(name, prekeys=2)
            return client

        alice = await deferToThread(registered, a_node.url, "alice")
        bob = await deferToThread(registered, b_node.url, "bob")
        linking = Linking(os.path.join(directory, "alice2"), a_node.url)
        code = await linking.code()
        await deferToThread(alice.approve, code.code)
        alice2 = await linking.done
        self.addCleanup(alice2.close)
        got: queue.Queue[Message] = queue.Queue()
        listener = await deferToThread(lambda: bob.listener(got.put, top_up=False).start())
        self.addCleanup(deferToThread, listener.stop)
        sent = await deferToThread(alice.send, "bob", "from node A")
        live = await deferToThread(got.get, True, 15)
        self.assertEqual((live.id, live.text, live.verified), (sent["messageId"], "from node A", True))
        await deferToThread(bob.send, "alice", "from node B")
        for device in (alice, alice2):
            texts = [m.text for m in await deferToThread(device.history, sent["chatId"])]
            self.assertEqual(texts, ["from node A", "from node B"])
