"""
``cyphr-client chat``: a full-screen chat in the terminal (prompt_toolkit).

On the left the chats, with unread counts and ``●`` for a contact online;
on the right the open chat's messages as ``history`` shows them, one's own
with their receipt (sent, delivered, read), who is typing, and the line to
write in. Enter sends, Tab and Shift-Tab move between chats, Esc, Ctrl-C
or Ctrl-D quit. A status line at the bottom says how the connection is and
what went wrong: nothing is printed over the screen, no traceback reaches
it (what the libraries would write to stderr is shown there).

This module only draws and reads keys; :mod:`cyphr.client.chatsession`
does the network work off this loop, into :mod:`cyphr.client.chatstate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import sys
from collections.abc import Iterator
from typing import Any

from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.data_structures import Point
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout import HSplit, Layout, VSplit, Window
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl
from prompt_toolkit.output import create_output
from prompt_toolkit.styles import Style

from cyphr.client.chatsession import ChatSession, Describe
from cyphr.client.chatstate import ChatState
from cyphr.client.client import Client
from cyphr.client.render import time_text
from cyphr.client.terminal import safe, safe_lines

LIST_WIDTH = 32
HELP = "Enter: send  Tab: next chat  Esc: quit"
STYLE = Style.from_dict({
    "selected": "reverse", "unread": "bold", "mine": "ansigreen", "mark": "ansibrightblack",
    "header": "bold", "typing": "italic ansibrightblack", "status": "reverse",
})


class _StatusStream(io.TextIOBase):
    """Standard error while the screen is up: each line written to it (a
    library's warning, a thread's traceback) becomes the status line, its
    last line only, made safe."""

    def __init__(self, state: ChatState) -> None:
        self.state = state

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = [one.strip() for one in str(text).splitlines() if one.strip()]
        if lines:
            self.state.set_status(safe(lines[-1]))
        return len(text)


@contextlib.contextmanager
def _errors_to_status(state: ChatState) -> Iterator[None]:
    with contextlib.redirect_stderr(_StatusStream(state)):  # type: ignore[type-var]
        yield


def _chat_list(state: ChatState) -> StyleAndTextTuples:
    fragments: StyleAndTextTuples = []
    for entry in state.chat_list():
        chosen = state.selected is not None and entry.is_(state.selected)
        dot = "● " if entry.peer is not None and state.online(entry.peer) else "  "
        style = "class:selected" if chosen else "class:unread" if entry.unread else ""
        unread = f" [{entry.unread}]" if entry.unread else ""
        fragments.append((style, f"{dot}{entry.label}{unread}\n"))
    return fragments or [("", "  No chats yet.\n")]


def _header(state: ChatState) -> StyleAndTextTuples:
    chat = state.selected
    if chat is None:
        return [("class:header", " Choose a chat with Tab")]
    entry = state.entry(chat)
    if entry is None:
        return [("class:header", f" {safe(chat)}")]
    about = f"group, {len(entry.members)} members" if entry.group else ""
    if entry.peer is not None:
        online, seen = state.online(entry.peer), state.last_seen(entry.peer)
        about = "online" if online else f"last seen {time_text(seen)}" if seen else \
            "offline" if online is False else ""
    return [("class:header", f" {entry.label}"), ("", f"  {about}" if about else "")]


def _messages(state: ChatState) -> StyleAndTextTuples:
    fragments: StyleAndTextTuples = []
    for one in state.messages(state.selected):
        mine = one.message.sender == state.me
        fragments.append(("class:mine" if mine else "", safe_lines(one.text)))
        mark = state.mark(one)
        fragments.append(("class:mark", f"  · {mark}\n" if mark else "\n"))
    return fragments


def _typing(state: ChatState) -> StyleAndTextTuples:
    who = state.typing_now(state.selected)
    if not who:
        return []
    return [("class:typing", f" {', '.join(safe(user) for user in who)} "
                             f"{'is' if len(who) == 1 else 'are'} typing…")]


def _status(state: ChatState) -> StyleAndTextTuples:
    status = f" │ {state.status}" if state.status else ""
    return [("class:status", f" {state.connection}{status} │ {HELP}")]


def _quit(app: Application[None]) -> None:
    if not app.is_done:  # a second key before the screen is gone
        app.exit()


def build_app(state: ChatState, session: ChatSession, **kwargs: Any) -> Application[None]:
    """The screen, drawing ``state`` and telling ``session`` what the
    person does."""
    def typed(buffer: Buffer) -> None:
        if buffer.text:  # emptied after a send is not typing
            session.typing()

    entry = Buffer(multiline=False, on_text_changed=typed)
    lines = [0]

    def messages() -> StyleAndTextTuples:
        fragments = _messages(state)
        lines[0] = sum(text.count("\n") for _, text, *_ in fragments)
        return fragments

    # The cursor on the last line keeps the newest message in view.
    shown = FormattedTextControl(messages,
                                 get_cursor_position=lambda: Point(0, max(0, lines[0] - 1)))
    keys = KeyBindings()

    @keys.add("enter")
    def _send(event: KeyPressEvent) -> None:
        if session.send(entry.text):
            entry.reset()

    def move(step: int) -> None:
        chats = state.chat_list()
        if not chats:
            return
        selected = state.selected
        at = next((i for i, e in enumerate(chats) if selected is not None and e.is_(selected)),
                  -1)
        if at == -1 and step < 0:
            at = 0
        session.select(chats[(at + step) % len(chats)].chat_id)

    keys.add("tab")(lambda event: move(1))
    keys.add("s-tab")(lambda event: move(-1))
    for key in ("c-c", "c-d", Keys.SIGINT):
        keys.add(key)(lambda event: _quit(event.app))
    keys.add("escape", eager=True)(lambda event: _quit(event.app))

    layout = HSplit([
        VSplit([
            Window(FormattedTextControl(lambda: _chat_list(state)), width=LIST_WIDTH,
                   wrap_lines=True),
            Window(width=1, char="│"),
            HSplit([
                Window(FormattedTextControl(lambda: _header(state)), height=1),
                Window(height=1, char="─"),
                Window(shown, wrap_lines=True, always_hide_cursor=True),
                Window(FormattedTextControl(lambda: _typing(state)), height=1),
            ]),
        ]),
        Window(height=1, char="─"),
        VSplit([Window(FormattedTextControl("> "), width=2), Window(BufferControl(entry))],
               height=1),
        Window(FormattedTextControl(lambda: _status(state)), height=1, style="class:status"),
    ])
    return Application(layout=Layout(layout, focused_element=entry), key_bindings=keys,
                       style=STYLE, full_screen=True, refresh_interval=1.0, **kwargs)


def _on_terminate(app: Application[None]) -> None:
    # Killed politely (SIGTERM), the screen still restores the terminal.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: _quit(app))


def run_chat(client: Client, chat: str | None, describe: Describe) -> int:
    """The chat screen until the person quits: 0, or 1 when the server
    ended the session meanwhile."""
    state = ChatState(client.cyphr_id)
    session = ChatSession(client, state, describe)
    app = build_app(state, session, output=create_output(sys.stdout))
    state.on_change = app.invalidate
    with _errors_to_status(state):
        session.start(chat)
        try:
            # Errors of the loop go to stderr, that is the status line,
            # rather than to prompt_toolkit's "Press ENTER" prompt.
            app.run(set_exception_handler=False, pre_run=lambda: _on_terminate(app))
        finally:
            session.stop()
    if state.connection == "ended":
        print(f"cyphr-client: {state.status}", file=sys.stderr)
        return 1
    return 0
