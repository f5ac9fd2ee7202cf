"""ReceiptsHandler's rules (delivered, read, read-up-to) on a real SQLite
database, with no server, socket or HTTP: the handler alone, its stores and
a task.Clock (tests.stores)."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.trial.unittest import TestCase

from cyphr.clock import now_ms
from cyphr.errors import CHAT_NOT_FOUND, MESSAGE_NOT_FOUND, NotFound
from cyphr.handlers.receipts import Receipt, ReceiptsHandler
from tests.stores import open_world


class ReceiptsTests(TestCase):
    async def setUp(self) -> None:
        self.world = w = await open_world(self)
        self.alice, self.bob, self.carol, self.mallory = [
            await w.user(name) for name in ("alice", "bob", "carol", "mallory")]
        self.direct = await w.direct(self.alice, self.bob)
        self.group = await w.group(self.alice, self.bob, self.carol)
        self.handler = ReceiptsHandler(w.chats, w.messages, w.clock)

    def now(self) -> int:
        return now_ms(self.world.clock)

    async def assertNotFound(self, code: str, call: Any) -> None:
        with self.assertRaises(NotFound) as caught:
            await call
        self.assertEqual(caught.exception.code, code)

    # -- delivered ------------------------------------------------------

    async def test_first_delivery_recorded_and_sender_told(self) -> None:
        """The first delivery of another's message records a receipt at the
        clock's time, moves the reader's delivered mark to the message, counts
        one, and names the sender to tell."""
        [message] = await self.world.send(self.alice, self.direct)
        receipt = await self.handler.delivered(self.bob, message.id, self.direct)
        self.assertEqual(receipt, Receipt(chat_id=self.direct, reader="bob", at=self.now(),
                                          message_id=message.id, up_to_seq=None, tell=("alice",)))
        self.assertEqual(await self.world.receipt_rows(), [(message.id, "bob", self.now(), None)])
        self.assertEqual((await self.world.marks(self.direct))["bob"], (0, 1))
        self.assertEqual((self.handler.delivered_count, self.handler.read_count), (1, 0))

    async def test_repeated_delivery_tells_nobody(self) -> None:
        """A second delivery of the same message by the same user (another
        socket, a repeat) is acknowledged but tells nobody, counts nothing
        and keeps the first receipt's time."""
        [message] = await self.world.send(self.alice, self.direct)
        first = await self.handler.delivered(self.bob, message.id, self.direct)
        self.world.clock.advance(5)
        again = await self.handler.delivered(self.bob, message.id, None)
        self.assertEqual(again.tell, ())
        self.assertEqual((again.chat_id, again.message_id, again.at), (self.direct, message.id, self.now()))
        self.assertEqual(await self.world.receipt_rows(), [(message.id, "bob", first.at, None)])
        self.assertEqual(self.handler.delivered_count, 1)

    async def test_each_member_delivers_once(self) -> None:
        """In a group, each member's first delivery tells the sender."""
        [message] = await self.world.send(self.alice, self.group)
        by_bob = await self.handler.delivered(self.bob, message.id, self.group)
        by_carol = await self.handler.delivered(self.carol, message.id, self.group)
        self.assertEqual((by_bob.tell, by_carol.tell), (("alice",), ("alice",)))
        self.assertEqual(self.handler.delivered_count, 2)

    async def test_delivery_without_chat_id(self) -> None:
        """An old client that leaves chatId out gets the message's chat in
        the receipt."""
        [message] = await self.world.send(self.alice, self.group)
        receipt = await self.handler.delivered(self.carol, message.id, None)
        self.assertEqual((receipt.chat_id, receipt.tell), (self.group, ("alice",)))

    async def test_delivery_out_of_order_keeps_the_mark(self) -> None:
        """A delivery of a later message records its receipt but leaves the
        delivered mark before the gap: the catch-up still owes the earlier one."""
        first, second = await self.world.send(self.alice, self.direct, 2)
        await self.handler.delivered(self.bob, second.id, self.direct)
        self.assertEqual((await self.world.marks(self.direct))["bob"], (0, 0))
        await self.handler.delivered(self.bob, first.id, self.direct)
        self.assertEqual((await self.world.marks(self.direct))["bob"], (0, 1))

    async def test_own_message_delivery_records_nothing(self) -> None:
        """Acknowledging one's own message is answered, records nothing and
        tells nobody."""
        [message] = await self.world.send(self.alice, self.direct)
        receipt = await self.handler.delivered(self.alice, message.id, self.direct)
        self.assertEqual(receipt, Receipt(chat_id=self.direct, reader="alice", at=self.now(),
                                          message_id=message.id, up_to_seq=None, tell=()))
        self.assertEqual(await self.world.receipt_rows(), [])
        self.assertEqual((await self.world.marks(self.direct))["alice"], (0, 0))
        self.assertEqual(self.handler.delivered_count, 0)

    async def test_delivery_of_unseen_message_refused(self) -> None:
        """A message the user cannot see (not a member, unknown id, or
        chatId naming another of its chats) is MESSAGE_NOT_FOUND, and
        nothing is recorded or counted."""
        [message] = await self.world.send(self.alice, self.direct)
        await self.assertNotFound(MESSAGE_NOT_FOUND, self.handler.delivered(self.carol, message.id, None))
        await self.assertNotFound(MESSAGE_NOT_FOUND,
                                  self.handler.delivered(self.bob, str(uuid.uuid4()), None))
        await self.assertNotFound(MESSAGE_NOT_FOUND,
                                  self.handler.delivered(self.bob, message.id, self.group))
        self.assertEqual(await self.world.receipt_rows(), [])
        self.assertEqual((await self.world.marks(self.direct))["bob"], (0, 0))
        self.assertEqual(self.handler.delivered_count, 0)

    # -- read one message -----------------------------------------------

    async def test_read_recorded_and_sender_told_once(self) -> None:
        """Reading another's message records its read (and delivery) time,
        counts a read and names the sender; saying it again changes nothing,
        tells nobody and counts nothing, keeping the first times."""
        [message] = await self.world.send(self.alice, self.group)
        first = await self.handler.read(self.bob, message.id, self.group)
        self.assertEqual(first, Receipt(chat_id=self.group, reader="bob", at=self.now(),
                                        message_id=message.id, up_to_seq=None, tell=("alice",)))
        self.world.clock.advance(1)
        again = await self.handler.read(self.bob, message.id, None)
        self.assertEqual((again.tell, again.at), ((), self.now()))
        self.assertEqual(await self.world.receipt_rows(), [(message.id, "bob", first.at, first.at)])
        self.assertEqual((self.handler.delivered_count, self.handler.read_count), (0, 1))

    async def test_read_after_delivery_keeps_delivery_time(self) -> None:
        """A read of a delivered message adds its read time to the receipt."""
        [message] = await self.world.send(self.alice, self.direct)
        delivered = await self.handler.delivered(self.bob, message.id, self.direct)
        self.world.clock.advance(2)
        read = await self.handler.read(self.bob, message.id, self.direct)
        self.assertEqual(await self.world.receipt_rows(), [(message.id, "bob", delivered.at, read.at)])

    async def test_own_message_read_records_nothing(self) -> None:
        """Reading one's own message is answered, records nothing, tells
        nobody and counts nothing."""
        [message] = await self.world.send(self.alice, self.group)
        receipt = await self.handler.read(self.alice, message.id, self.group)
        self.assertEqual((receipt.chat_id, receipt.message_id, receipt.tell), (self.group, message.id, ()))
        self.assertEqual(await self.world.receipt_rows(), [])
        self.assertEqual(self.handler.read_count, 0)

    async def test_read_of_unseen_message_refused(self) -> None:
        """Reading a message the user cannot see is MESSAGE_NOT_FOUND, and
        nothing is recorded or counted."""
        [message] = await self.world.send(self.alice, self.direct)
        await self.assertNotFound(MESSAGE_NOT_FOUND, self.handler.read(self.mallory, message.id, None))
        await self.assertNotFound(MESSAGE_NOT_FOUND, self.handler.read(self.bob, str(uuid.uuid4()), None))
        await self.assertNotFound(MESSAGE_NOT_FOUND, self.handler.read(self.bob, message.id, self.group))
        self.assertEqual(await self.world.receipt_rows(), [])
        self.assertEqual(self.handler.read_count, 0)

    # -- read up to -----------------------------------------------------

    async def test_read_up_to_tells_unread_senders(self) -> None:
        """Reading a chat up to a seq marks it read (and delivered) there,
        counts one read, and names the senders of the messages it marks
        read, sorted, without the reader."""
        await self.world.send(self.carol, self.group)
        await self.world.send(self.bob, self.group)
        await self.world.send(self.carol, self.group)
        await self.world.send(self.alice, self.group)
        receipt = await self.handler.read_up_to(self.alice, self.group, 4)
        self.assertEqual(receipt, Receipt(chat_id=self.group, reader="alice", at=self.now(),
                                          message_id=None, up_to_seq=4, tell=("bob", "carol")))
        self.assertEqual((await self.world.marks(self.group))["alice"], (4, 4))
        self.assertEqual((self.handler.delivered_count, self.handler.read_count), (0, 1))

    async def test_read_up_to_tells_only_those_it_marks(self) -> None:
        """Only the senders of messages between the old mark and the new
        one are named."""
        await self.world.send(self.bob, self.group)
        await self.world.send(self.carol, self.group)
        self.assertEqual((await self.handler.read_up_to(self.alice, self.group, 1)).tell, ("bob",))
        self.assertEqual((await self.handler.read_up_to(self.alice, self.group, 2)).tell, ("carol",))

    async def test_read_up_to_capped_at_newest(self) -> None:
        """A seq past the chat's newest message is capped at it, so that
        later messages stay unread."""
        await self.world.send(self.bob, self.direct, 2)
        receipt = await self.handler.read_up_to(self.alice, self.direct, 2**62)
        self.assertEqual((receipt.up_to_seq, receipt.tell), (2, ("bob",)))
        self.assertEqual((await self.world.marks(self.direct))["alice"], (2, 2))

    async def test_read_up_to_never_moves_back(self) -> None:
        """A mark at or before the current one changes nothing, tells
        nobody and is not counted as a read."""
        await self.world.send(self.bob, self.direct, 3)
        await self.handler.read_up_to(self.alice, self.direct, 3)
        again = await self.handler.read_up_to(self.alice, self.direct, 3)
        back = await self.handler.read_up_to(self.alice, self.direct, 1)
        self.assertEqual((again.tell, back.tell, back.up_to_seq), ((), (), 1))
        self.assertEqual((await self.world.marks(self.direct))["alice"], (3, 3))
        self.assertEqual(self.handler.read_count, 1)

    async def test_read_up_to_own_messages_tells_nobody(self) -> None:
        """Reading a chat holding only one's own messages tells nobody."""
        await self.world.send(self.alice, self.direct, 2)
        receipt = await self.handler.read_up_to(self.alice, self.direct, 2)
        self.assertEqual((receipt.up_to_seq, receipt.tell), (2, ()))

    async def test_read_up_to_outside_chat_refused(self) -> None:
        """Reading a chat one is not a member of, or one that does not
        exist, is CHAT_NOT_FOUND, and nobody's mark moves."""
        await self.world.send(self.alice, self.direct, 2)
        before = await self.world.marks(self.direct)
        await self.assertNotFound(CHAT_NOT_FOUND, self.handler.read_up_to(self.carol, self.direct, 2))
        await self.assertNotFound(CHAT_NOT_FOUND,
                                  self.handler.read_up_to(self.bob, str(uuid.uuid4()), 2))
        self.assertEqual(await self.world.marks(self.direct), before)
        self.assertEqual(self.handler.read_count, 0)
