"""DeliveryHandler: catch-up positions and pages, last seen, partners, on a
real SQLite database with a task.Clock (no server, no sockets)."""

from __future__ import annotations

import uuid

from twisted.trial.unittest import TestCase

from cyphr.clock import now_ms
from cyphr.handlers.delivery import CATCH_UP_PAGE, MAX_NAMED_CHATS, DeliveryHandler, Positions
from cyphr.store.chats import Delivery
from cyphr.store.messages import Message
from tests.stores import open_world


class DeliveryTests(TestCase):
    async def setUp(self) -> None:
        self.world = w = await open_world(self)
        self.alice, self.bob, self.carol, self.mallory = [
            await w.user(name) for name in ("alice", "bob", "carol", "mallory")]
        self.direct = await w.direct(self.alice, self.bob)
        self.group = await w.group(self.alice, self.bob, self.carol)
        self.handler = DeliveryHandler(w.chats, w.messages, w.identities, w.devices, w.clock)

    def device(self, cyphr_id: str) -> tuple[str, int]:
        """The user's device 1, as (user id, device id)."""
        user = {u.cyphr_id: u for u in (self.alice, self.bob, self.carol, self.mallory)}[cyphr_id]
        return (user.user_id, 1)

    async def deliver(self, cyphr_id: str, *messages: Message) -> None:
        """``cyphr_id``'s device 1 acknowledges ``messages``, its delivered mark moving on."""
        for message in messages:
            await self.world.chats.record_deliveries([Delivery(
                message.id, message.chat_id, cyphr_id, self.device(cyphr_id), now_ms(self.world.clock))])

    # -- positions ------------------------------------------------------

    async def test_positions_name_every_chat_and_those_behind(self) -> None:
        """Every chat of the user comes with its newest seq; a chat is
        behind while its newest seq is past the user's delivered mark."""
        quiet = await self.world.group(self.bob, self.carol)
        await self.world.send(self.alice, self.direct, 2)
        group_messages = await self.world.send(self.carol, self.group, 3)
        await self.deliver("bob", *group_messages)
        positions = await self.handler.positions("bob", self.device("bob"))
        self.assertEqual(sorted(positions.chats), sorted([(self.direct, 2), (self.group, 3), (quiet, 0)]))
        self.assertEqual(positions.behind, (self.direct,))

    async def test_positions_of_a_user_without_chats(self) -> None:
        """A user in no chat has no positions and nothing behind."""
        self.assertEqual(await self.handler.positions("mallory", self.device("mallory")), Positions(chats=(), behind=()))

    async def test_cursor_is_the_stream_position(self) -> None:
        """The cursor is the stream position of the newest committed message."""
        before = await self.handler.cursor()
        await self.world.send(self.alice, self.direct, 3)
        await self.world.send(self.bob, self.group)
        self.assertEqual(await self.handler.cursor(), before + 4)

    # -- undelivered pages ----------------------------------------------

    async def test_page_holds_what_was_not_acknowledged(self) -> None:
        """A page holds the messages of others that the user has not
        acknowledged, not deleted ones nor its own, in (chat, seq) order."""
        direct = await self.world.send(self.alice, self.direct, 3)
        await self.world.send(self.bob, self.direct)
        group = await self.world.send(self.carol, self.group, 2)
        deleted = (await self.world.send(self.alice, self.group))[0]
        await self.world.messages.delete(deleted, now_ms(self.world.clock))
        await self.deliver("bob", direct[0])
        await self.deliver("bob", group[1])
        positions = await self.handler.positions("bob", self.device("bob"))
        page = await self.handler.undelivered_page("bob", self.device("bob"), None, positions.behind)
        expected = sorted([direct[1], direct[2], group[0]], key=lambda m: (m.chat_id, m.seq))
        self.assertEqual([(m.chat_id, m.seq, m.id) for m in page],
                         [(m.chat_id, m.seq, m.id) for m in expected])

    async def test_pages_follow_each_other(self) -> None:
        """Pages hold CATCH_UP_PAGE messages; the next one starts after the
        last of the previous one, and a short page is the last."""
        sent = await self.world.send(self.alice, self.direct, CATCH_UP_PAGE + 1)
        behind = (await self.handler.positions("bob", self.device("bob"))).behind
        first = await self.handler.undelivered_page("bob", self.device("bob"), None, behind)
        self.assertEqual([m.id for m in first], [m.id for m in sent[:CATCH_UP_PAGE]])
        last = first[-1]
        second = await self.handler.undelivered_page("bob", self.device("bob"), (last.chat_id, last.seq), behind)
        self.assertEqual([m.id for m in second], [sent[-1].id])

    async def test_nothing_behind_asks_nothing(self) -> None:
        """With no chat behind the page is empty, even if a message of
        another chat was never acknowledged (the positions say where to look)."""
        await self.world.send(self.alice, self.direct)
        self.assertEqual(await self.handler.undelivered_page("bob", self.device("bob"), None, ()), [])

    async def test_only_named_chats_are_read(self) -> None:
        """Up to MAX_NAMED_CHATS chats, only the chats behind are read."""
        await self.world.send(self.alice, self.direct)
        [in_group] = await self.world.send(self.carol, self.group)
        page = await self.handler.undelivered_page("bob", self.device("bob"), None, [self.group])
        self.assertEqual([m.id for m in page], [in_group.id])

    async def test_many_chats_behind_reads_them_all(self) -> None:
        """Past MAX_NAMED_CHATS chats behind, the query names none and reads
        every chat of the user."""
        [in_direct] = await self.world.send(self.alice, self.direct)
        many = [str(uuid.uuid4()) for _ in range(MAX_NAMED_CHATS)]
        page = await self.handler.undelivered_page("bob", self.device("bob"), None, many + [self.group])
        self.assertEqual([m.id for m in page], [in_direct.id])
        named = await self.handler.undelivered_page("bob", self.device("bob"), None, many[1:] + [self.group])
        self.assertEqual(named, [])  # MAX_NAMED_CHATS of them: named, and the direct chat is not

    # -- offline and partners -------------------------------------------

    async def test_went_offline_records_last_seen(self) -> None:
        """Going offline records the clock's time as last seen and answers it."""
        self.world.clock.advance(42.5)
        at = await self.handler.went_offline("bob")
        self.assertEqual(at, now_ms(self.world.clock))
        bob, alice = [await self.world.identities.by_cyphr_id(name) for name in ("bob", "alice")]
        assert bob is not None and alice is not None
        self.assertEqual((bob.last_seen, alice.last_seen), (at, None))

    async def test_went_offline_at_a_given_time(self) -> None:
        """Going offline at a time given (the one ``user_offline`` told)
        records that time, not the clock's, and answers it."""
        self.world.clock.advance(42.5)
        told = now_ms(self.world.clock) - 7
        self.assertEqual(await self.handler.went_offline("bob", told), told)
        bob = await self.world.identities.by_cyphr_id("bob")
        assert bob is not None
        self.assertEqual(bob.last_seen, told)

    async def test_device_left_records_its_last_seen(self) -> None:
        """A device's socket going records the clock's time as that
        device's last seen, and no other device's (which keeps its time of
        registration)."""
        bob = self.bob
        registered = now_ms(self.world.clock)
        self.world.clock.advance(7)
        await self.handler.device_left(bob.user_id, bob.device_id)
        [device] = await self.world.devices.of_user(bob.user_id)
        self.assertEqual(device.last_seen, now_ms(self.world.clock))
        [other] = await self.world.devices.of_user(self.alice.user_id)
        self.assertEqual(other.last_seen, registered)

    async def test_partners_share_a_chat(self) -> None:
        """Partners are everyone who shares a chat with the user, once each,
        without the user; a stranger has none."""
        self.assertEqual(sorted(await self.handler.partners("alice")), ["bob", "carol"])
        self.assertEqual(sorted(await self.handler.partners("carol")), ["alice", "bob"])
        self.assertEqual(await self.handler.partners("mallory"), [])
