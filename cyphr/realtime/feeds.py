"""
Each chat's messages in seq order, without gaps, on their way to this
node's sockets.

A message reaches a chat's feed from this node's commits or from the bus,
in whatever order they come. The feed hands messages on in seq order; a
missing seq is waited for a moment (GAP_WAIT), then fetched from the
database, page by page; a seq that no longer exists (purged) is skipped.
A node keeps a feed only for chats that have sockets here.

Memory: one Feed per chat with a socket here; it is closed (its timer
cancelled, its pending messages dropped) when the chat's last socket here
leaves or disconnects, so the table follows the sockets connected now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cyphr.store.messages import Message
from cyphr.wire import Outbound

GAP_WAIT = 0.25   # seconds a feed waits for a missing seq before fetching it
FILL_PAGE = 200   # messages fetched per query


class MessageSource(Protocol):
    """Where a feed fetches what it missed (the delivery handler)."""

    async def message_at(self, chat_id: str, seq: int) -> Message | None: ...

    async def messages_after(self, chat_id: str, seq: int, limit: int) -> tuple[list[Message], bool]: ...

    async def last_seqs(self, chat_ids: list[str]) -> dict[str, int]: ...


# Called with (chat id, seq, the message, the socket that sent it or None).
Deliver = Callable[[str, int, Outbound, Any], None]


@dataclass
class Feed:
    next_seq: int
    pending: dict[int, tuple[Outbound, Any]]  # seq -> (message, origin)
    timer: Any = None
    filling: bool = False
    again: bool = False  # a recheck came while filling: look once more


class ChatFeeds:
    def __init__(self, source: MessageSource, reactor: Any, deliver: Deliver,
                 spawn: Callable[[Any], None], *, opened: Callable[[str], None],
                 closed: Callable[[str], None]) -> None:
        self._source = source
        self._reactor = reactor
        self._deliver = deliver
        self._spawn = spawn
        # Told when a chat's feed opens and closes (the fan-out adapter: the
        # other nodes send this one the chats it has feeds for).
        self._opened = opened
        self._closed = closed
        self._feeds: dict[str, Feed] = {}

    def __contains__(self, chat_id: str) -> bool:
        return chat_id in self._feeds

    def __len__(self) -> int:
        """Open feeds (for the memory metrics)."""
        return len(self._feeds)

    def chats(self) -> list[str]:
        """The chats with a feed."""
        return list(self._feeds)

    def open(self, chat_id: str, last_seq: int) -> None:
        """Start a chat's feed (if it has none) after ``last_seq``."""
        if chat_id not in self._feeds:
            self._feeds[chat_id] = Feed(next_seq=last_seq + 1, pending={})
            self._opened(chat_id)

    def close(self, chat_id: str) -> None:
        feed = self._feeds.pop(chat_id, None)
        if feed is None:
            return
        if feed.timer is not None and feed.timer.active():
            feed.timer.cancel()
        self._closed(chat_id)

    def stop(self) -> None:
        for chat_id in list(self._feeds):
            self.close(chat_id)

    def arrive(self, chat_id: str, seq: int, message: Outbound, origin: Any = None) -> None:
        feed = self._feeds.get(chat_id)
        if feed is None or seq < feed.next_seq:
            return
        if seq > feed.next_seq:
            feed.pending[seq] = (message, origin)
            if feed.timer is None and not feed.filling:
                feed.timer = self._reactor.callLater(GAP_WAIT, self._gap, chat_id)
            return
        self._deliver(chat_id, seq, message, origin)
        feed.next_seq = seq + 1
        while feed.next_seq in feed.pending:
            message, origin = feed.pending.pop(feed.next_seq)
            self._deliver(chat_id, feed.next_seq, message, origin)
            feed.next_seq += 1
        if not feed.pending and feed.timer is not None:
            if feed.timer.active():
                feed.timer.cancel()
            feed.timer = None

    def fetch(self, chat_id: str, seq: int) -> None:
        """A message announced by id only (too large for the bus, or sent
        over sessions: its envelopes are fetched with it)."""
        if chat_id in self._feeds:
            self._spawn(self._fetch(chat_id, seq))

    async def _fetch(self, chat_id: str, seq: int) -> None:
        message = await self._source.message_at(chat_id, seq)
        if message is not None:
            self.arrive(chat_id, seq, Outbound.of(message))

    def resync(self) -> None:
        """Messages may have been missed (the bus was down): every feed
        looks in the database for what follows it."""
        for chat_id, feed in list(self._feeds.items()):
            if feed.timer is None and not feed.filling:
                self._spawn(self._fill(chat_id, feed))

    def recheck(self, chat_ids: tuple[str, ...] | list[str]) -> None:
        """Look in the database for messages of these chats past what their
        feeds have (another node may have committed some without sending
        them here: cyphr.realtime.fanout, "The window"); one query for all."""
        chats = [chat_id for chat_id in chat_ids if chat_id in self._feeds]
        if chats:
            self._spawn(self._recheck(chats))

    async def _recheck(self, chats: list[str]) -> None:
        last_seqs = await self._source.last_seqs(chats)
        for chat_id, last_seq in last_seqs.items():
            feed = self._feeds.get(chat_id)
            if feed is None or last_seq < feed.next_seq:
                continue
            if feed.filling:
                feed.again = True
            elif feed.timer is None:
                self._spawn(self._fill(chat_id, feed))
            # else: a gap's timer is set, and fills when it runs

    def _gap(self, chat_id: str) -> None:
        feed = self._feeds.get(chat_id)
        if feed is None:
            return
        feed.timer = None
        if feed.pending:
            self._spawn(self._fill(chat_id, feed))

    async def _fill(self, chat_id: str, feed: Feed) -> None:
        """Fetch from the database what the feed misses, page by page, and
        hand it on; skip a seq that no longer exists (purged)."""
        feed.filling = True
        try:
            while True:
                page, more = await self._source.messages_after(chat_id, feed.next_seq - 1, FILL_PAGE)
                if self._feeds.get(chat_id) is not feed:
                    return
                for message in page:
                    if message.seq >= feed.next_seq and message.seq not in feed.pending:
                        feed.pending[message.seq] = (Outbound.of(message), None)
                if feed.pending and feed.next_seq not in feed.pending:
                    feed.next_seq = min(feed.pending)
                if feed.pending:
                    first = feed.next_seq
                    message, origin = feed.pending.pop(first)
                    self.arrive(chat_id, first, message, origin)
                if not more:
                    if not feed.again:
                        return
                    feed.again = False
        finally:
            feed.filling = False
