"""ChatStore.record_deliveries, a batch of delivery receipts in one
transaction, on both engines: on PostgreSQL one call of schema 021's
record_deliveries, on SQLite the Python steps it mirrors. Each rule is
tested on both, and a replay of the same random receipts on both must end
in the same rows."""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cyphr.clock import now_ms
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.receipts import ReceiptsHandler
from cyphr.store.chats import Delivered, Delivery
from cyphr.store.envelopes import SealedFor
from cyphr.store.identities import MainKey
from cyphr.store.messages import Message, Outgoing
from tests.stores import World, open_world


async def second_device(world: World, user: AuthUser) -> AuthUser:
    """``user`` on a device 2 of its identity."""
    added = await world.devices.add(user.user_id, "second-" + user.cyphr_id,
                                    MainKey(os.urandom(1568), os.urandom(64)), 10, now_ms(world.clock))
    return replace(user, device_id=added.device.device_id)


async def send(world: World, sender: AuthUser, chat_id: str, sealed_for: list[AuthUser] = ()
               ) -> Message:
    """One message from ``sender``'s device; over sessions (one envelope for
    each device of ``sealed_for``) when that is given."""
    envelopes = tuple(SealedFor(device.cyphr_id, device.device_id, "message", os.urandom(40))
                      for device in sealed_for)
    [stored] = (await world.messages.store_batch([Outgoing(
        str(uuid.uuid4()), chat_id, sender.cyphr_id, "{}", "text", None, now_ms(world.clock),
        sender.device_id, envelopes)])).answers
    assert isinstance(stored, Message), stored
    return stored


def delivery(world: World, device: AuthUser, message: Message, chat_id: str | None = "same") -> Delivery:
    return Delivery(message.id, message.chat_id if chat_id == "same" else chat_id, device.cyphr_id,
                    (device.user_id, device.device_id), now_ms(world.clock))


class DeliveriesMixin:
    engine: str

    async def setUp(self) -> None:
        self.world = w = await open_world(self, self.engine)  # type: ignore[arg-type]
        self.alice, self.bob, self.carol = [await w.user(name) for name in ("alice", "bob", "carol")]
        self.bob2 = await second_device(w, self.bob)
        self.direct = await w.direct(self.alice, self.bob)
        self.group = await w.group(self.alice, self.bob, self.carol)

    async def device_marks(self, device: AuthUser, chat_id: str) -> int | None:
        rows = await self.world.database.run_query(
            "SELECT delivered_up_to_seq FROM device_deliveries WHERE user_id = ? AND device_id = ?"
            " AND chat_id = ?", (device.user_id, device.device_id, chat_id))
        return rows[0][0] if rows else None

    async def device_receipts(self, device: AuthUser) -> list[str]:
        rows = await self.world.database.run_query(
            "SELECT message_id FROM device_receipts WHERE user_id = ? AND device_id = ?",
            (device.user_id, device.device_id))
        return sorted(str(row[0]) for row in rows)

    async def test_in_order(self) -> None:
        """Messages acknowledged in order, in one batch: each is the reader's
        first receipt, names its sender, and the member's and device's marks
        move to the last; the device keeps no receipt past its mark."""
        w = self.world
        sent = [await send(w, self.alice, self.direct) for _ in range(3)]
        answers = await w.chats.record_deliveries([delivery(w, self.bob, m) for m in sent])
        self.assertEqual(answers, [Delivered(m.id, self.direct, "alice", True) for m in sent])
        self.assertEqual((await w.marks(self.direct))["bob"], (0, 3))
        self.assertEqual(await self.device_marks(self.bob, self.direct), 3)
        self.assertEqual(await self.device_receipts(self.bob), [])
        again = await w.chats.record_deliveries([delivery(w, self.bob, sent[0])])
        self.assertEqual(again, [Delivered(sent[0].id, self.direct, "alice", False)])
        self.assertEqual(len(await w.receipt_rows()), 3)

    async def test_out_of_order(self) -> None:
        """A receipt past the device's mark is kept as the device's receipt;
        the mark moves over it once the gap before it is acknowledged, and
        the receipt goes."""
        w = self.world
        first, second, third = [await send(w, self.alice, self.direct) for _ in range(3)]
        await w.chats.record_deliveries([delivery(w, self.bob, third)])
        self.assertEqual(await self.device_receipts(self.bob), [third.id])
        self.assertEqual(await self.device_marks(self.bob, self.direct), 0)
        await w.chats.record_deliveries([delivery(w, self.bob, first)])
        self.assertEqual(await self.device_marks(self.bob, self.direct), 1)
        await w.chats.record_deliveries([delivery(w, self.bob, second)])
        self.assertEqual(await self.device_marks(self.bob, self.direct), 3)
        self.assertEqual(await self.device_receipts(self.bob), [])
        # The other device acknowledged nothing: no mark (it counts from
        # bob's joining).
        self.assertIsNone(await self.device_marks(self.bob2, self.direct))

    async def test_not_visible(self) -> None:
        """An unknown id, a message of another chat than the one named, and
        a message of a chat the reader is not in answer None, in their
        places in the batch, and record nothing; the rest are recorded."""
        w = self.world
        mallory = await w.user("mallory")
        in_direct = await send(w, self.alice, self.direct)
        in_group = await send(w, self.alice, self.group)
        answers = await w.chats.record_deliveries([
            Delivery(str(uuid.uuid4()), self.direct, "bob", (self.bob.user_id, 1), now_ms(w.clock)),
            delivery(w, self.bob, in_direct, self.group),
            delivery(w, mallory, in_direct),
            delivery(w, mallory, in_group, None),
            delivery(w, self.carol, in_group, None),
        ])
        self.assertEqual(answers, [None, None, None, None, Delivered(in_group.id, self.group, "alice", True)])
        self.assertEqual([row[:2] for row in await w.receipt_rows()], [(in_group.id, "carol")])
        self.assertEqual((await w.marks(self.direct))["bob"], (0, 0))

    async def test_own_message_from_another_device(self) -> None:
        """The reader's own message, sent from its other device, moves only
        that device's mark: no receipt, nobody to tell. Acknowledged by the
        device that sent it, nothing moves."""
        w = self.world
        mine = await send(w, self.bob2, self.direct)
        answers = await w.chats.record_deliveries([delivery(w, self.bob, mine), delivery(w, self.bob2, mine)])
        self.assertEqual(answers, [Delivered(mine.id, self.direct, "bob", False)] * 2)
        self.assertEqual(await w.receipt_rows(), [])
        self.assertEqual(await self.device_marks(self.bob, self.direct), 1)
        self.assertIsNone(await self.device_marks(self.bob2, self.direct))

    async def test_envelopes_and_bodies(self) -> None:
        """A device's acknowledgement drops its envelope of the message; the
        body goes with the last envelope, the row stays."""
        w = self.world
        message = await send(w, self.alice, self.direct, [self.bob, self.bob2])
        await w.chats.record_deliveries([delivery(w, self.bob, message)])
        self.assertEqual(await self.body(message), "{}")
        await w.chats.record_deliveries([delivery(w, self.bob2, message)])
        self.assertIsNone(await self.body(message))
        self.assertEqual(await w.database.run_query("SELECT count(*) FROM message_envelopes"), [(0,)])

    async def test_a_failing_receipt_fails_alone(self) -> None:
        """A batch that the database refuses as a whole (here a receipt from
        a device the identity does not have: its first mark breaks the
        foreign key) is recorded again one receipt at a time: the others are
        recorded and answered, the failing one alone gets its failure."""
        w = self.world
        handler = ReceiptsHandler(w.chats, w.messages, w.clock)
        first, second, third = [await send(w, self.alice, self.direct) for _ in range(3)]
        ghost = replace(self.bob, device_id=99)
        sizes: list[int] = []
        record = w.chats.record_deliveries

        async def counted(batch: list[Delivery]) -> list[Delivered | None]:
            sizes.append(len(batch))
            return await record(batch)
        w.chats.record_deliveries = counted  # type: ignore[method-assign]
        # The first goes at once, alone; the next two gather meanwhile and
        # go together.
        pending = [Deferred.fromCoroutine(handler.delivered(user, message.id, self.direct))
                   for user, message in ((self.bob, first), (ghost, third), (self.bob, second))]
        outcomes = [await d.addErrback(lambda f: ("failed", f)) for d in pending]
        self.assertEqual([receipt.message_id for receipt in outcomes[::2]], [first.id, second.id])
        self.assertEqual(outcomes[1][0], "failed")
        self.assertIsInstance(outcomes[1][1], Failure)
        self.assertEqual(len(self.flushLoggedErrors()), 1)  # "Recording a delivery receipt failed"
        self.assertEqual([row[:2] for row in await w.receipt_rows()],
                         sorted([(first.id, "bob"), (second.id, "bob")]))
        self.assertEqual((await w.marks(self.direct))["bob"], (0, 2))
        self.assertEqual(handler.delivered_count, 2)
        self.assertEqual(sizes, [1, 2, 1, 1])  # alone; the two together, refused; each again

    async def body(self, message: Message) -> Any:
        [(body,)] = await self.world.database.run_query(
            "SELECT encrypted_content FROM messages WHERE chat_id = ? AND seq = ?",
            (message.chat_id, message.seq))
        return body


class SQLiteDeliveriesTests(DeliveriesMixin, TestCase):
    engine = "sqlite"


class PostgresDeliveriesTests(DeliveriesMixin, TestCase):
    engine = "postgresql"


class ReplayTests(TestCase):
    """The same random receipts, in random batches, on both engines: the
    same answers and the same rows at the end."""

    async def test_engines_agree(self) -> None:
        sqlite, postgresql = [await self.replay(engine, random.Random(20261206))
                              for engine in ("sqlite", "postgresql")]
        self.assertEqual(sqlite[0], postgresql[0])  # the answers
        for table, rows in sqlite[1].items():
            self.assertEqual(rows, postgresql[1][table], table)
        # Not a replay of nothing: most receipts were recorded, some out of
        # order, some bodies erased.
        self.assertGreater(sum(answer is not None for answer in sqlite[0]), 100)
        self.assertTrue(sqlite[1]["device_receipts"] or sqlite[1]["device_deliveries"])
        self.assertIn(True, [row[2] for row in sqlite[1]["messages"]])

    async def replay(self, engine: str, script: random.Random) -> tuple[list[Any], dict[str, Any]]:
        w = await open_world(self, engine)
        names = ["alice", "bob", "carol"]
        users = [await w.user(name) for name in names]
        devices = users + [await second_device(w, user) for user in users[:2]]
        direct = await w.direct(users[0], users[1])
        group = await w.group(users[0], users[1], users[2])
        chats = [direct, group]
        messages: list[Message] = []
        for _ in range(60):
            chat = script.choice(chats)
            members = devices if chat == group else [d for d in devices if d.cyphr_id != "carol"]
            sender = script.choice(members)
            sealed = [d for d in members if d != sender] if script.random() < 0.5 else []
            w.clock.advance(script.random())
            messages.append(await send(w, sender, chat, sealed))
        answers: list[Any] = []
        pending = [(device, message) for message in messages for device in devices
                   if script.random() < 0.8]
        script.shuffle(pending)
        # Mostly in order per device, as clients acknowledge, with some out.
        pending.sort(key=lambda dm: dm[1].seq + script.choice([0, 0, 0, 5]))
        while pending:
            size = script.randint(1, 12)
            batch, pending = pending[:size], pending[size:]
            w.clock.advance(0.01)
            named = [delivery(w, device, message, script.choice(["same", "same", None, direct]))
                     for device, message in batch]
            for device_message, answer in zip(batch, await w.chats.record_deliveries(named)):
                answers.append(None if answer is None else (
                    messages.index(device_message[1]), chats.index(answer.chat_id), answer.sender_id,
                    answer.first))
        return answers, await self.rows(w, chats, messages, devices)

    async def rows(self, w: World, chats: list[str], messages: list[Message],
                   devices: list[AuthUser]) -> dict[str, Any]:
        """Every row receipts touch, with ids replaced by their places."""
        ids = {m.id: n for n, m in enumerate(messages)}
        users = {d.user_id: d.cyphr_id for d in devices}

        async def query(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in await w.database.run_query(sql)]

        chat = {c: n for n, c in enumerate(chats)}
        return {
            "chat_participants": sorted((chat[str(c)], u, r, d) for c, u, r, d in await query(
                "SELECT chat_id, user_id, read_up_to_seq, delivered_up_to_seq FROM chat_participants")),
            "device_deliveries": sorted((users[str(u)], d, chat[str(c)], s) for u, d, c, s in await query(
                "SELECT user_id, device_id, chat_id, delivered_up_to_seq FROM device_deliveries")),
            "device_receipts": sorted((users[str(u)], d, chat[str(c)], ids[str(m)]) for u, d, c, m in await query(
                "SELECT user_id, device_id, chat_id, message_id FROM device_receipts")),
            "message_receipts": sorted((ids[str(m)], u, a) for m, u, a in await query(
                "SELECT message_id, user_id, delivered_at FROM message_receipts")),
            "message_envelopes": sorted((users[str(u)], d, chat[str(c)], s) for u, d, c, s in await query(
                "SELECT user_id, device_id, chat_id, seq FROM message_envelopes")),
            "messages": sorted((chat[str(c)], s, b is None) for c, s, b in await query(
                "SELECT chat_id, seq, encrypted_content FROM messages")),
        }
