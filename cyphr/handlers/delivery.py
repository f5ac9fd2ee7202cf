"""
Delivery to a user's sockets: where each of its chats stands when a socket
comes back, the pages of what it has not acknowledged (the catch-up), and
what happens when its last socket goes (last seen). The realtime layer does
the sending; the rules of what to send live here.

Delivery is per device (``device``: the user id and device id of the
socket's token): each device has its own marks, so a device that was away
catches up on its own, and a message reaches each device once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cyphr.clock import now_ms
from cyphr.store.chats import ChatStore
from cyphr.store.devices import DeviceStore
from cyphr.store.identities import IdentityStore
from cyphr.store.messages import Message, MessageStore

CATCH_UP_PAGE = 200          # messages per catch-up query
MAX_NAMED_CHATS = 500        # beyond this, the catch-up query does not list the chats
# Before every (chat id, seq): chat ids are UUIDs, and seqs start at 1.
_FIRST = ("00000000-0000-0000-0000-000000000000", -1)


@dataclass(frozen=True, slots=True)
class Positions:
    chats: tuple[tuple[str, int], ...]   # (chat_id, last_seq) of every chat of the user
    behind: tuple[str, ...]             # chats whose last_seq is past the user's delivered mark


class DeliveryHandler:
    def __init__(self, chats: ChatStore, messages: MessageStore, identities: IdentityStore,
                 devices: DeviceStore, clock: Any) -> None:
        self._chats = chats
        self._messages = messages
        self._identities = identities
        self._devices = devices
        self._clock = clock

    async def positions(self, cyphr_id: str, device: tuple[str, int]) -> Positions:
        """Every chat of ``cyphr_id`` with its newest seq (its sockets join
        them there), and those with something its ``device`` has not
        acknowledged: only these need a catch-up."""
        rows = await self._chats.chat_positions(cyphr_id, device)
        return Positions(
            chats=tuple((chat_id, last_seq) for chat_id, last_seq, _ in rows),
            behind=tuple(chat_id for chat_id, last_seq, delivered in rows if last_seq > delivered))

    async def cursor(self) -> Any:
        """The stream position of the newest committed message: read before
        the catch-up, it is the ``sync_complete`` cursor, from which a
        client's next REST sync misses nothing the catch-up did not send."""
        return await self._messages.stream_position()

    async def undelivered_page(self, cyphr_id: str, device: tuple[str, int],
                               after: tuple[str, int] | None,
                               behind: Sequence[str]) -> list[Message]:
        """One page (CATCH_UP_PAGE) of the messages of others, not deleted,
        that ``cyphr_id``'s ``device`` has not acknowledged as delivered in the chats
        ``behind``, in (chat_id, seq) order, past ``after`` (the last one of
        the previous page; None: from the start), each with the device's
        envelope if it has one. A short page is the last.
        With no chat behind there is nothing to send, and nothing is asked.
        Up to MAX_NAMED_CHATS chats are named in the query, sorted
        (PostgreSQL then reads their partitions only); past that the list
        would be too long for one query, and every chat of the user is read."""
        if not behind:
            return []
        chats = sorted(behind) if len(behind) <= MAX_NAMED_CHATS else None
        page = await self._messages.undelivered(cyphr_id, device,
                                                after if after is not None else _FIRST,
                                                CATCH_UP_PAGE, chats)
        return await self._messages.for_reader(page, cyphr_id, device)

    async def went_offline(self, cyphr_id: str, at: int | None = None) -> int:
        """``cyphr_id``'s last socket went (or its node went silent): its
        last seen is ``at`` (ms; now when not given), the time a
        ``user_offline`` already sent told. Answers that time."""
        at = now_ms(self._clock) if at is None else at
        await self._identities.set_last_seen(cyphr_id, at)
        return at

    async def device_left(self, user_id: str, device_id: int) -> None:
        """A socket of the device went: the device was last seen now (what
        its owner's device list shows)."""
        await self._devices.seen(user_id, device_id, now_ms(self._clock))

    async def partners(self, cyphr_id: str) -> list[str]:
        """Everyone who shares a chat with ``cyphr_id``: those told when it
        comes online or goes offline."""
        return await self._chats.partners(cyphr_id)

    # What a chat's feed fetches when it missed messages (cyphr.realtime.feeds):
    # the feed only exists for chats with member sockets, so no member check.

    async def message_at(self, chat_id: str, seq: int) -> Message | None:
        """The message of ``chat_id`` with ``seq``, if it still exists, with
        every envelope still held of it (each socket is given its device's)."""
        message = await self._messages.by_seq(chat_id, seq)
        if message is None:
            return None
        return (await self._messages.with_all_envelopes(chat_id, [message]))[0]

    async def last_seqs(self, chat_ids: list[str]) -> dict[str, int]:
        """Each chat's last seq (a node checking what its feeds missed)."""
        return await self._chats.last_seqs(chat_ids)

    async def messages_after(self, chat_id: str, seq: int, limit: int) -> tuple[list[Message], bool]:
        """Up to ``limit`` messages of ``chat_id`` after ``seq``, in order,
        with their envelopes, and whether more follow."""
        page, more = await self._messages.history(chat_id, before=None, after=seq, limit=limit)
        return await self._messages.with_all_envelopes(chat_id, page), more
