"""
Call signalling: who may signal whom. The server only relays offers,
answers, ICE candidates and hang-ups between two users who share a chat;
to anyone else the target does not exist, so strangers can neither ring
each other nor learn who has an identity here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from cyphr.changes import MemberLeft
from cyphr.errors import USER_NOT_FOUND, NotFound
from cyphr.handlers.auth import AuthUser
from cyphr.store.chats import ChatStore

CALL_TYPES = ("audio", "video")
PARTNER_CACHE = 60.0            # seconds "these two share a chat" is believed
PARTNER_CACHE_SIZE = 100_000    # pairs remembered; the oldest go first


class CallsHandler:
    def __init__(self, chats: ChatStore, clock: Any, *, cache_size: int = PARTNER_CACHE_SIZE) -> None:
        self._chats = chats
        self._cache_size = cache_size
        self._clock = clock
        # (cyphrId, cyphrId), the smaller first -> when they were found to
        # share a chat. A call sends many signals (every ICE candidate), so
        # each one costs no query; kept in the order learnt, so the oldest
        # entry is trimmed first. Only "yes" is remembered: a stranger's
        # attempts are always asked of the database, and cannot fill it.
        self._partners: OrderedDict[tuple[str, str], float] = OrderedDict()
        # cyphrId -> its pairs in _partners, so that forgetting a user (a
        # leave, a deletion) costs its own pairs, not a walk of the cache.
        self._pairs_of: dict[str, set[tuple[str, str]]] = {}
        # Memory: pairs older than PARTNER_CACHE are trimmed from the old
        # end as new ones are learnt (the cache holds the pairs that called
        # in the last minute, not every pair ever seen), and never more than
        # PARTNER_CACHE_SIZE; _pairs_of loses a user with its last pair.

    def memory_tables(self) -> dict[str, int]:
        """The size of each table, for the memory metrics."""
        return {"call_partners": len(self._partners), "call_partner_users": len(self._pairs_of)}

    async def check_peer(self, user: AuthUser, to: str) -> None:
        """``user`` may signal ``to``: another user who shares a chat with
        it. NotFound USER_NOT_FOUND otherwise, for oneself too."""
        if to == user.cyphr_id or not await self._share_a_chat(user.cyphr_id, to):
            raise NotFound("No such user", code=USER_NOT_FOUND, details={"to": to})

    async def _share_a_chat(self, a: str, b: str) -> bool:
        key = (a, b) if a < b else (b, a)
        now = self._clock.seconds()
        at = self._partners.get(key)
        if at is not None:
            if now - at < PARTNER_CACHE:
                return True
            # Stale: one of them may have left the chat since.
            self._drop(key)
        if not await self._chats.share_a_chat(a, b):
            return False
        self._partners[key] = now
        self._partners.move_to_end(key)  # the same pair learnt twice at once
        for user in key:
            self._pairs_of.setdefault(user, set()).add(key)
        self.expire(now)
        while len(self._partners) > self._cache_size:
            self._drop(next(iter(self._partners)))
        return True

    def expire(self, now: float | None = None) -> None:
        """Forget the pairs older than PARTNER_CACHE, from the cache's old
        end (each popped once in its life: amortised O(1) per pair learnt).
        Also called on a timer (build_server), for a cache no longer used."""
        if now is None:
            now = self._clock.seconds()
        partners = self._partners
        while partners:
            oldest = next(iter(partners))
            if now - partners[oldest] < PARTNER_CACHE:
                break
            self._drop(oldest)

    def _drop(self, key: tuple[str, str]) -> None:
        self._partners.pop(key, None)
        for user in key:
            pairs = self._pairs_of.get(user)
            if pairs is not None:
                pairs.discard(key)
                if not pairs:
                    del self._pairs_of[user]

    def member_left(self, change: MemberLeft) -> None:
        """``change.cyphr_id`` left a chat: the pairs it was remembered in
        may no longer share one, so they are asked again (build_server
        subscribes this to MemberLeft). Every pair of the member goes, not
        only those of that chat: which chat made a pair is not kept, and a
        lookup costs little beside a stale permission."""
        self.forget_user(change.cyphr_id)

    def forget_user(self, cyphr_id: str) -> None:
        """The identity is gone: no signal may reach it (or come from it)
        on what this node remembers."""
        for key in list(self._pairs_of.get(cyphr_id, ())):
            self._drop(key)
