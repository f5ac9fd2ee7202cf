"""CallsHandler: who may signal whom, and how long a yes is believed, on a
real SQLite database with a task.Clock (no server, no sockets)."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from cyphr.errors import USER_NOT_FOUND, NotFound
from cyphr.handlers.calls import PARTNER_CACHE, CallsHandler
from tests.stores import open_world


class CallsTests(TestCase):
    async def setUp(self) -> None:
        self.world = w = await open_world(self)
        self.alice, self.bob, self.carol, self.dave, self.mallory = [
            await w.user(name) for name in ("alice", "bob", "carol", "dave", "mallory")]
        self.direct = await w.direct(self.alice, self.bob)
        self.group = await w.group(self.alice, self.carol, self.dave)
        self.handler = CallsHandler(w.chats, w.clock)

    async def assertRefused(self, user: Any, to: str) -> None:
        with self.assertRaises(NotFound) as caught:
            await self.handler.check_peer(user, to)
        self.assertEqual((caught.exception.code, caught.exception.details), (USER_NOT_FOUND, {"to": to}))

    async def test_chat_partners_may_signal(self) -> None:
        """Two users who share a chat, direct or group, may signal each
        other, either way."""
        await self.handler.check_peer(self.alice, "bob")
        await self.handler.check_peer(self.bob, "alice")
        await self.handler.check_peer(self.carol, "alice")
        await self.handler.check_peer(self.dave, "carol")

    async def test_strangers_and_unknowns_look_alike(self) -> None:
        """A user who shares no chat and one who does not exist are both
        USER_NOT_FOUND, with the same details: a stranger learns nothing of
        who exists."""
        await self.assertRefused(self.mallory, "alice")
        await self.assertRefused(self.bob, "carol")
        await self.assertRefused(self.alice, "nobody")

    async def test_oneself_refused(self) -> None:
        """Nobody may signal itself, though it is in its own chats."""
        await self.assertRefused(self.alice, "alice")

    async def test_yes_believed_for_the_cache_time(self) -> None:
        """Once two users are found to share a chat, that is believed for
        PARTNER_CACHE seconds (a member who left may still signal until
        then), and asked again after it."""
        await self.handler.check_peer(self.carol, "dave")
        self.assertTrue(await self.world.chats.remove_member(self.group, "dave"))
        self.world.clock.advance(PARTNER_CACHE - 0.5)
        await self.handler.check_peer(self.dave, "carol")  # either way round
        self.world.clock.advance(0.5)
        await self.assertRefused(self.carol, "dave")

    async def test_no_is_not_remembered(self) -> None:
        """A refusal is not cached: once the two share a chat, the next
        signal passes at once."""
        await self.assertRefused(self.bob, "carol")
        await self.world.group(self.bob, self.carol)
        await self.handler.check_peer(self.bob, "carol")

    async def test_forget_user_drops_its_pairs(self) -> None:
        """forget_user drops every remembered pair of that identity, and
        only those."""
        await self.handler.check_peer(self.alice, "dave")
        await self.handler.check_peer(self.carol, "dave")
        await self.handler.check_peer(self.alice, "carol")
        await self.world.chats.remove_member(self.group, "dave")
        await self.world.chats.remove_member(self.group, "carol")
        self.handler.forget_user("dave")
        await self.assertRefused(self.alice, "dave")
        await self.assertRefused(self.dave, "carol")
        await self.handler.check_peer(self.alice, "carol")  # still remembered

    async def test_cache_bounded_oldest_first(self) -> None:
        """Past its cache_size pairs, the pair learnt longest ago is
        forgotten first, and the others are still believed."""
        self.handler = CallsHandler(self.world.chats, self.world.clock, cache_size=2)
        await self.handler.check_peer(self.alice, "carol")  # the oldest: forgotten
        await self.handler.check_peer(self.alice, "dave")
        await self.handler.check_peer(self.alice, "bob")
        await self.world.chats.remove_member(self.group, "carol")
        await self.world.chats.remove_member(self.group, "dave")
        await self.assertRefused(self.alice, "carol")
        await self.handler.check_peer(self.alice, "dave")  # remembered
