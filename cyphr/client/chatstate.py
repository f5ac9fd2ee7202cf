"""
What the full-screen ``chat`` shows, apart from how it is drawn: the chats
with their unread counts, the messages of each chat as rendered lines, the
receipts of one's own messages, who is typing, who is online, and one
status line.

The realtime and worker threads change it, the interface thread reads it:
every method takes the one lock, and ``on_change`` is called (outside it)
after each change so that the interface draws again. No method here does
network work: lines are rendered (display names looked up) before they
come in.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cyphr.client.client import Message
from cyphr.client.render import receipt_mark

# Another client's typing indicator is shown this long after its last
# ``typing`` event, unless it says it stopped: a client that goes away
# sends no "stopped".
TYPING_SHOWN = 6.0


@dataclass
class ChatEntry:
    """One chat of the list. ``label`` is shown as it is (already safe)."""

    chat_id: str
    group: bool
    label: str
    members: list[str]
    peer: str | None = None  # the other person of a direct chat
    unread: int = 0

    def is_(self, chat: str) -> bool:
        """Whether ``chat`` (a chat id, or a Cyphr ID) names this chat."""
        return chat in (self.chat_id, self.peer)


@dataclass
class Shown:
    """A message in a chat: the message, and its line as rendered."""

    message: Message
    text: str
    sent_here: bool = False  # sent from this chat session: its receipts are all known


@dataclass
class _Receipts:
    delivered: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)


class ChatState:
    def __init__(self, me: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.me = me
        self.clock = clock
        self.on_change: Callable[[], None] = lambda: None
        self._lock = threading.RLock()
        self.chats: list[ChatEntry] = []
        self.selected: str | None = None  # a chat id, or a Cyphr ID for a chat not made yet
        self.status = ""
        self.connection = "connecting"
        self.counting = False  # unread counts from the server are in: count new ones
        self._messages: dict[str, dict[str, Shown]] = {}
        self._receipts: dict[str, _Receipts] = {}
        self._read_up_to: dict[tuple[str, str], int] = {}
        self._typing: dict[str, dict[str, float]] = {}
        self._online: dict[str, bool] = {}
        self._last_seen: dict[str, str] = {}

    def _changed(self) -> None:
        self.on_change()

    # -- changes ------------------------------------------------------------

    def set_status(self, text: str, connection: str | None = None) -> None:
        with self._lock:
            self.status = text
            if connection is not None:
                self.connection = connection
        self._changed()

    def set_chats(self, chats: list[ChatEntry]) -> None:
        """The chat list as the server has it now, its unread counts
        included; from now on new messages are counted here."""
        with self._lock:
            selected = self.selected
            self.chats = chats
            for entry in chats:
                if selected is not None and entry.is_(selected):
                    entry.unread = 0
                    self.selected = entry.chat_id  # a new chat with a person, made meanwhile
            self.counting = True
        self._changed()

    def select(self, chat: str | None) -> None:
        with self._lock:
            self.selected = chat
            for entry in self.chats:
                if entry.chat_id == chat:
                    entry.unread = 0
        self._changed()

    def chat_list(self) -> list[ChatEntry]:
        with self._lock:
            return list(self.chats)

    def entry(self, chat: str | None) -> ChatEntry | None:
        with self._lock:
            return next((e for e in self.chats if chat is not None and e.is_(chat)), None)

    def add(self, shown: list[Shown], live: bool = False) -> bool:
        """Messages into their chats (one already there is replaced);
        ``live`` ones count as unread in a chat not open. Answers whether
        a chat is not in the list (it should be fetched again)."""
        unknown = False
        with self._lock:
            for one in shown:
                message = one.message
                chat = self._messages.setdefault(message.chat_id, {})
                known = chat.get(message.id)
                if message.receipts is not None:
                    # From history: what the server knew when it answered;
                    # receipts that come live add to it.
                    receipts = self._receipts.setdefault(message.id, _Receipts())
                    receipts.delivered.update(message.receipts.delivered)
                    receipts.read.update(message.receipts.read)
                if known is not None and known.sent_here:
                    one.sent_here = True
                chat[message.id] = one
                self._typing.get(message.chat_id, {}).pop(message.sender, None)
                entry = next((e for e in self.chats if e.chat_id == message.chat_id), None)
                if entry is None:
                    unknown = True
                elif live and known is None:
                    self.chats.remove(entry)
                    self.chats.insert(0, entry)  # newest activity first
                    if message.sender != self.me and self.counting \
                            and message.chat_id != self.selected:
                        entry.unread += 1
        self._changed()
        return unknown

    def receipt(self, event: str, data: dict[str, Any]) -> None:
        """``message_delivered`` or ``message_read`` for a message of one's own."""
        user = data.get("userId")
        if not isinstance(user, str):
            return
        with self._lock:
            if isinstance(data.get("messageId"), str):
                receipts = self._receipts.setdefault(data["messageId"], _Receipts())
                receipts.delivered.add(user)
                if event == "message_read":
                    receipts.read.add(user)
            elif event == "message_read" and isinstance(data.get("upToSeq"), int) \
                    and isinstance(data.get("chatId"), str):
                key = (data["chatId"], user)
                self._read_up_to[key] = max(self._read_up_to.get(key, 0), data["upToSeq"])
        self._changed()

    def typing(self, data: dict[str, Any]) -> None:
        chat, user = data.get("chatId"), data.get("userId")
        if not isinstance(chat, str) or not isinstance(user, str) or user == self.me:
            return
        with self._lock:
            if data.get("isTyping"):
                self._typing.setdefault(chat, {})[user] = self.clock() + TYPING_SHOWN
            else:
                self._typing.get(chat, {}).pop(user, None)
        self._changed()

    def presence(self, user: str, online: bool, last_seen: Any = None) -> None:
        with self._lock:
            self._online[user] = online
            if isinstance(last_seen, str):
                self._last_seen[user] = last_seen
        self._changed()

    # -- what is shown ------------------------------------------------------

    def messages(self, chat: str | None) -> list[Shown]:
        with self._lock:
            return sorted(self._messages.get(chat or "", {}).values(),
                          key=lambda one: one.message.seq)

    def last_seq_from_others(self, chat: str) -> int | None:
        with self._lock:
            seqs = [one.message.seq for one in self._messages.get(chat, {}).values()
                    if one.message.sender != self.me]
        return max(seqs, default=None)

    def mark(self, one: Shown) -> str:
        """The receipt mark of one's own message, or "" when not known (a
        message that came without receipts, not sent in this session, with
        no receipt seen since)."""
        message = one.message
        if message.sender != self.me:
            return ""
        with self._lock:
            entry = next((e for e in self.chats if e.chat_id == message.chat_id), None)
            receipts = self._receipts.get(message.id, _Receipts())
            read = set(receipts.read) | {user for (chat, user), seq in self._read_up_to.items()
                                         if chat == message.chat_id and seq >= message.seq}
            delivered = receipts.delivered | read
        others = None
        if entry is not None and entry.group:
            others = len([m for m in entry.members if m != self.me])
        return receipt_mark(delivered, read, others, one.sent_here or message.receipts is not None)

    def typing_now(self, chat: str | None) -> list[str]:
        now = self.clock()
        with self._lock:
            users = self._typing.get(chat or "", {})
            return sorted(user for user, until in users.items() if until > now)

    def online(self, user: str) -> bool | None:
        with self._lock:
            return self._online.get(user)

    def last_seen(self, user: str) -> str | None:
        with self._lock:
            return self._last_seen.get(user)
