"""
Messages and people as a person reads them, made safe for a terminal:
one rendering for every command that shows them (``listen``, ``history``,
``chats``, the full-screen ``chat``).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Callable

from cyphr.client import groups
from cyphr.client.client import Message
from cyphr.rosters import RosterRefused, SignedChange
from cyphr.signing import EncodingError
from cyphr.client.terminal import safe

MESSAGE_INDENT = "    "


def time_text(timestamp: str, short: bool = False) -> str:
    """A server timestamp in local time (``short``: the time of day alone
    when it is today)."""
    try:
        moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone()
    except (ValueError, AttributeError):
        return safe(timestamp)
    today = short and moment.date() == datetime.now().astimezone().date()
    return moment.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S")


def person(cyphr_id: str, display_name: Callable[[str], str | None] | None) -> str:
    """A person as shown: the Cyphr ID (unique, and checked against the
    pinned key) and, after it, the display name they chose, if any."""
    name = display_name(cyphr_id) if display_name is not None else None
    return f"{safe(cyphr_id)} ({safe(name)})" if name and name != cyphr_id else safe(cyphr_id)


def line(message: Message, me: str | None = None,
         chat_names: dict[str, str | None] | None = None,
         display_name: Callable[[str], str | None] | None = None,
         short_time: bool = False) -> str:
    """A message as a person reads it: ``✓`` when its signature checked
    against the sender's pinned key, and ``(unverified contact)`` when that
    key was pinned on first use rather than compared (``verify``); one's
    own messages (``me``) need no such marker."""
    where = ""
    if chat_names is not None and chat_names.get(message.chat_id):
        where = f"#{safe(chat_names[message.chat_id])} "
    sender = person(message.sender, display_name)
    when = time_text(message.timestamp, short_time)
    if message.text is None:
        return f"[{when}] {where}{sender} ✗ ({safe(message.error)})"
    change = roster_change(message)
    if change is not None:
        return f"[{when}] {where}— {safe(change)} —"
    mark = "✓" if message.verified else "?"
    if message.sender != me and not message.contact_verified:
        mark += " (unverified contact)"
    if not message.verified and message.error:
        # Opened but not proven (a v1 message): say why.
        mark += f" ({safe(message.error)})"
    if message.restored:
        mark += " (from the history backup)"
    # Every line of the text under its sender, indented: a line of the
    # text can never pass for a message of its own.
    return f"[{when}] {where}{sender} {mark}: {body(message)}"


def body(message: Message) -> str:
    """What a message says, made safe: its text; for a file message, the
    file's type, name and size, and its caption in quotes
    (``[file] report.pdf (1.2 MiB) "the figures"``)."""
    attachment = message.attachment
    if attachment is None:
        return safe(message.text, indent=MESSAGE_INDENT)
    shown = f"[{safe(message.message_type)}] {safe(attachment.file_name)} " \
            f"({human_size(attachment.size)})"
    if message.text:
        shown += f' "{safe(message.text, indent=MESSAGE_INDENT)}"'
    return shown


def human_size(size: int) -> str:
    """A size as a person reads it: 740 bytes, 12.5 KiB, 1.2 MiB, 3.0 GiB."""
    if size < 1024:
        return f"{size} byte{'' if size == 1 else 's'}"
    value, units = size / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]}"


def receipt_mark(delivered: set[str], read: set[str], others: int | None, sent: bool) -> str:
    """The mark of one's own message: in a direct chat (``others`` None)
    ``read``, ``delivered`` or ``sent``; in a group the count of the
    ``others`` members it reached and that read it. "" when nothing is
    known (``sent`` False: no receipt state came with the message)."""
    delivered = delivered | read
    if others is not None and delivered:
        return f"delivered to {len(delivered)}/{others}, read by {len(read)}/{others}"
    if others is None and read:
        return "read"
    if others is None and delivered:
        return "delivered"
    return "sent" if sent else ""


def visible(message: Message) -> bool:
    """Whether a person sees ``message``: system messages carry keys
    between clients, and only one that failed to open, or that announces a
    change of a group's roster, is shown."""
    return message.message_type != "system" or message.text is None \
        or roster_change(message) is not None


def roster_change(message: Message) -> str | None:
    """What a group roster change announced by ``message`` did (checked
    against the group's chain when it was opened), or None."""
    if message.message_type != "system" or message.text is None:
        return None
    try:
        content = json.loads(message.text)
        announced = content[groups.ANNOUNCED]
        change = SignedChange.decode(base64.b64decode(announced["change"], validate=True)).change
    except (ValueError, KeyError, TypeError, EncodingError, RosterRefused):
        return None
    return groups.describe(change)
