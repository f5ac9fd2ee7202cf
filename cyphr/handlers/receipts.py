"""
Receipts: a member says a message reached it (delivered), that it read one
message, or that it read a chat up to a seq. Each is recorded and answered
with a Receipt naming whom to tell; the caller (the realtime layer) tells
them. A member learns nothing of a message it cannot see: an unknown id, a
chat it is not in, or a message of another chat than the one named are all
MESSAGE_NOT_FOUND. Own messages are acknowledged but record nothing and
tell nobody: a sender needs no receipt from itself. A receipt that changes
nothing (a message delivered or read again, a read mark that does not move)
is acknowledged and tells nobody: a client repeating itself cannot make the
server repeat it to the sender.

As synapse's ``handlers/receipts.py``, this knows nothing of the transport:
the ids come parsed (UUIDs, a seq within range) from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.python.failure import Failure

from cyphr.clock import now_ms
from cyphr.errors import CHAT_NOT_FOUND, MESSAGE_NOT_FOUND, NotFound
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.batching import GroupCommit, each_alone_if_refused
from cyphr.store.chats import ChatStore, Delivered, Delivery
from cyphr.store.messages import Message, MessageStore


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a receipt recorded, for the acknowledgement and for those told."""

    chat_id: str
    reader: str                 # the cyphrId who delivered / read
    at: int                     # ms since the epoch (cyphr.clock.now_ms)
    message_id: str | None      # one message ...
    up_to_seq: int | None       # ... or every message up to this seq (read-up-to)
    tell: tuple[str, ...]       # senders to tell; empty: nobody (own message, or not the first delivery)


MAX_BATCH = 500  # delivery receipts recorded in one transaction


class ReceiptsHandler:
    def __init__(self, chats: ChatStore, messages: MessageStore, clock: Any) -> None:
        self._chats = chats
        self._messages = messages
        self._clock = clock
        # Delivery receipts, one for every message every device receives,
        # are recorded in batches: those that arrive while one is written
        # go together in the next (one statement on PostgreSQL, schema
        # 021). A lone receipt goes at once.
        self._deliveries: GroupCommit[Delivery, Delivered | None] = GroupCommit(
            self._record_deliveries, MAX_BATCH)
        # For metrics: first delivery receipts and read marks recorded here.
        self.delivered_count = 0
        self.read_count = 0

    async def _visible(self, user: AuthUser, message_id: str, chat_id: str | None) -> Message:
        message = await self._messages.by_id_for_member(message_id, user.cyphr_id, chat_id)
        if message is None:
            raise NotFound("No such message", code=MESSAGE_NOT_FOUND)
        return message

    async def delivered(self, user: AuthUser, message_id: str, chat_id: str | None) -> Receipt:
        """The message reached one of ``user``'s devices. Its sender is told
        only the first time: a user with several devices or sockets (or a
        client that repeats itself) acknowledges one message many times, and
        the sender hears of it once. The device's delivered mark moves on
        with it, so that device's catch-up does not send the message again
        (the others' still do, until they acknowledge it too). The user's
        own message, sent from another of its devices, moves that mark
        only."""
        now = now_ms(self._clock)
        recorded = await self._deliveries.submit(
            Delivery(message_id, chat_id, user.cyphr_id, (user.user_id, user.device_id), now))
        if recorded is None:
            raise NotFound("No such message", code=MESSAGE_NOT_FOUND)
        tell: tuple[str, ...] = ()
        if recorded.first:
            self.delivered_count += 1
            tell = (recorded.sender_id,)
        return Receipt(chat_id=recorded.chat_id, reader=user.cyphr_id, at=now, message_id=recorded.message_id,
                       up_to_seq=None, tell=tell)

    async def _record_deliveries(self, batch: list[Delivery]) -> list[Delivered | None | Failure]:
        return await each_alone_if_refused(self._chats.record_deliveries, batch,
                                           "Recording a delivery receipt failed")

    async def stop(self) -> None:
        """Record the delivery receipts still pending (the server is stopping)."""
        await self._deliveries.stop()

    async def read(self, user: AuthUser, message_id: str, chat_id: str | None) -> Receipt:
        """``user`` read the message (which records its delivery too, if
        not yet recorded). As for ``delivered``, the sender is told only the
        first time."""
        now = now_ms(self._clock)
        message = await self._visible(user, message_id, chat_id)
        tell: tuple[str, ...] = ()
        if message.sender_id != user.cyphr_id:
            if await self._chats.mark_message_read(message.chat_id, message.id, user.cyphr_id, now):
                self.read_count += 1
                tell = (message.sender_id,)
        return Receipt(chat_id=message.chat_id, reader=user.cyphr_id, at=now, message_id=message.id,
                       up_to_seq=None, tell=tell)

    async def read_up_to(self, user: AuthUser, chat_id: str, up_to_seq: int) -> Receipt:
        """``user`` read the chat up to ``up_to_seq``, capped at its newest
        message (a mark past it would hide messages still to come). Those
        told are the senders of the messages this marks read, found before
        the mark moves; a mark that does not move (already there, or moved
        by a concurrent receipt meanwhile) tells nobody."""
        now = now_ms(self._clock)
        membership = await self._chats.membership(chat_id, user.cyphr_id)
        if membership is None:
            raise NotFound("No such chat", code=CHAT_NOT_FOUND)
        up_to = min(up_to_seq, membership.chat.last_seq)
        senders = await self._chats.unread_senders(chat_id, user.cyphr_id, up_to)
        tell: tuple[str, ...] = ()
        if await self._chats.mark_read(chat_id, user.cyphr_id, up_to):
            self.read_count += 1
            tell = tuple(sorted(senders))
        return Receipt(chat_id=chat_id, reader=user.cyphr_id, at=now, message_id=None,
                       up_to_seq=up_to, tell=tell)
