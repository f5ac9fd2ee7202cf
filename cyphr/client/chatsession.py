"""
The network side of the full-screen ``chat``, off the interface's loop.

A connector thread loads the chat list and opens the realtime connection
(retried with a growing delay until it is up; afterwards the stock
client's own reconnection takes over). A worker thread runs what the
person asks for (open a chat, send, say "typing") one at a time. The
realtime threads hand messages and events in. All of them write into the
:class:`~cyphr.client.chatstate.ChatState`; none raises: an error becomes
the status line.

Messages are opened by the client library (``Client.history`` and the
``Listener``, as ``history`` and ``listen`` do) and rendered by
:mod:`cyphr.client.render`.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import socketio

from cyphr.client.chatstate import ChatEntry, ChatState, Shown
from cyphr.client.client import Client, Message, is_chat_id
from cyphr.client.realtime import ENDED, LOST, Listener
from cyphr.client.render import line, person, visible
from cyphr.client.terminal import safe

HISTORY = 100  # messages shown when a chat is opened
TYPING_EVERY = 3.0  # s: at most one "typing" event this often
RETRY_FIRST, RETRY_MOST = 1.0, 30.0  # s: the delays between first connection attempts

Describe = Callable[[BaseException], str]


class ChatSession:
    def __init__(self, client: Client, state: ChatState, describe: Describe,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.state = state
        self.describe = describe
        self.clock = clock
        self.listener: Listener | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._typing_sent: tuple[str, float] | None = None
        self._presence_asked: set[str] = set()
        self._threads = [threading.Thread(target=self._work, daemon=True, name="chat-worker"),
                         threading.Thread(target=self._connect, daemon=True, name="chat-connect")]

    def start(self, chat: str | None = None) -> None:
        for thread in self._threads:
            thread.start()
        if chat is not None:
            self.select(chat)

    def stop(self) -> None:
        """Ends the threads and the connection (receipts sent are waited for)."""
        self._stopping.set()
        self._jobs.put(None)
        for thread in self._threads:
            thread.join(3)  # a request under way ends with the process
        if self.listener is not None:
            self.listener.stop()

    # -- what the person asks for (called on the interface's thread) --------

    def select(self, chat: str) -> None:
        self.state.select(chat)
        self._submit(lambda: self._open(chat))

    def send(self, text: str) -> bool:
        """Send ``text`` to the open chat; False (and why on the status
        line) when there is none or the text is empty."""
        chat = self.state.selected
        if chat is None:
            self.state.set_status("choose a chat first (Tab)")
            return False
        if not text.strip():
            self.state.set_status("an empty message is not sent")
            return False
        self._typing_sent = None
        self._submit(lambda: self._send(chat, text))
        return True

    def typing(self) -> None:
        """The person is typing in the open chat: said at most every
        TYPING_EVERY seconds."""
        chat, now = self.state.selected, self.clock()
        if chat is None or not is_chat_id(chat):
            return
        if self._typing_sent is not None and self._typing_sent[0] == chat \
                and now - self._typing_sent[1] < TYPING_EVERY:
            return
        self._typing_sent = (chat, now)
        self._submit(lambda: self._emit_typing(chat))

    # -- threads ------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stopping.is_set():
                return
            self._guarded(job)

    def _guarded(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as e:  # noqa: BLE001 - shown on the status line, never a traceback
            self.state.set_status(self.describe(e))

    def _connect(self) -> None:
        delay = RETRY_FIRST
        self._guarded(self._load_chats)
        while not self._stopping.is_set():
            listener = self.client.listener(self._on_message, on_event=self._on_event,
                                            on_status=self._on_status)
            try:
                listener.start()
            except Exception as e:  # noqa: BLE001 - said, then tried again
                listener.stop(0)
                self.state.set_status(f"{self.describe(e)}; trying again in {delay:.0f} s",
                                      "offline")
                self._stopping.wait(delay)
                delay = min(delay * 2, RETRY_MOST)
                continue
            self.listener = listener
            self.state.set_status("")  # "online" once caught up (sync_complete)
            if self._stopping.is_set():
                return
            selected = self.state.selected
            if selected is not None and is_chat_id(selected):
                self._guarded(lambda: self._mark_read(selected))
            return

    # -- the work -----------------------------------------------------------

    def _load_chats(self) -> None:
        entries = []
        for chat in self.client.chats():
            group = chat["chatType"] == "group"
            peer = None if group else chat.get("name")
            if peer is not None:
                self._ask_presence(peer)
                label = person(peer, self.client.display_name)
            else:
                label = safe(chat.get("name")) or "(name not known here)"
            entries.append(ChatEntry(chat["chatId"], group, label, list(chat["participants"]),
                                     peer, int(chat.get("unreadCount") or 0)))
        self.state.set_chats(entries)

    def _caught_up(self) -> None:
        # The server's unread counts now include what came while away.
        self._load_chats()
        self.state.set_status(self.state.status, "online")

    def _ask_presence(self, peer: str) -> None:
        # Once a run: afterwards user_online and user_offline keep it.
        if peer in self._presence_asked:
            return
        self._presence_asked.add(peer)
        try:
            user = self.client.user(peer)
        except Exception:  # noqa: BLE001 - presence is not worth a status line
            return
        self.state.presence(peer, bool(user.get("isOnline")), user.get("lastSeen"))

    def _open(self, chat: str) -> None:
        chat_id = chat if is_chat_id(chat) else self.client._direct_chat_with(chat)
        if chat_id is None:
            self.state.set_status(f"a new chat with {safe(chat)}: write the first message")
            self._ask_presence(chat)
            return
        if self.state.selected == chat:
            self.state.select(chat_id)
        self.state.add([self._shown(m) for m in self.client.history(chat_id, HISTORY)
                        if visible(m)])
        self._mark_read(chat_id)

    def _mark_read(self, chat_id: str) -> None:
        seq = self.state.last_seq_from_others(chat_id)
        if seq is not None and self.listener is not None:
            self.listener.mark_read(chat_id, seq)

    def _send(self, chat: str, text: str) -> None:
        listener = self.listener
        if listener is not None and listener.sio.connected:
            try:
                ack = listener.send(chat, text)
            except socketio.exceptions.SocketIOError:
                ack = self.client.send(chat, text)  # the connection went meanwhile
        else:
            ack = self.client.send(chat, text)
        message = Message(ack["messageId"], ack["chatId"], ack["seq"], self.client.cyphr_id,
                          ack["timestamp"], "text", text, True, contact_verified=True)
        shown = self._shown(message)
        shown.sent_here = True
        if self.state.add([shown]) or not is_chat_id(chat):
            self._load_chats()  # a direct chat made by this message
        self.state.set_status("")

    def _emit_typing(self, chat: str) -> None:
        if self.listener is not None and self.listener.sio.connected:
            self.listener.typing(chat)

    def _shown(self, message: Message) -> Shown:
        return Shown(message, line(message, self.client.cyphr_id, None,
                                   self.client.display_name, short_time=True))

    # -- what the realtime connection brings (its threads) -------------------

    def _on_message(self, message: Message) -> None:
        if not visible(message):
            return
        try:
            shown = self._shown(message)
        except Exception as e:  # noqa: BLE001 - a name lookup failed: shown without it
            self.state.set_status(self.describe(e))
            shown = Shown(message, line(message, self.client.cyphr_id, short_time=True))
        if self.state.add([shown], live=True):
            self._submit(self._load_chats)
        listener = self.listener
        if message.chat_id == self.state.selected and message.sender != self.client.cyphr_id \
                and listener is not None:
            listener.mark_read(message.chat_id, message.seq)  # shown is read

    def _on_event(self, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if name in ("message_delivered", "message_read"):
            self.state.receipt(name, data)
        elif name == "user_typing":
            self.state.typing(data)
        elif name in ("user_online", "user_offline") and isinstance(data.get("userId"), str):
            self.state.presence(data["userId"], name == "user_online", data.get("lastSeen"))
        elif name == "sync_complete":
            self._submit(self._caught_up)

    def _on_status(self, status: str, detail: str) -> None:
        if status == ENDED:
            self.state.set_status(f"{safe(detail)}: quit and run `cyphr-client login`", "ended")
        elif status == LOST:
            self.state.set_status(f"the connection was lost ({safe(detail)}); reconnecting",
                                  "offline")
        else:
            self.state.set_status("reconnected", "online")
