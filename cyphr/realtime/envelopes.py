"""
What one node tells the others over the bus: typed, frozen envelopes with
one encoding each.

The encoding is a small JSON object whose ``t`` names the kind. The short
keys are the wire form nodes have always exchanged, kept so that nodes of
two versions understand each other during a rolling upgrade; in the code
every envelope is a dataclass with named fields. ``decode`` refuses what is
not exactly an envelope (anyone who can connect to the database can NOTIFY
on the channel) and answers None for a kind this version does not know (a
newer node's), which the receiver ignores.

Kinds (``t``):

- ``m`` MessageAnnounced: a message was committed (its JSON, or only its
  chat and seq when too large for the bus: the receiver fetches it);
- ``e`` Emitted: an event for the sockets of some rooms;
- ``j`` / ``l`` Joined / Left: a user's sockets join or leave a chat's room;
- ``k`` EndSessions: close a user's sockets (of one token, one device, or all);
- ``p`` PresenceChanged, ``P`` PresenceList: who is online on a node;
- ``hello``: a node started and asks the others who is online there;
- ``h`` Heartbeat: a node is alive (a silent one has its users forgotten);
- ``w`` / ``u`` Watching / Unwatching: a node has (or no longer has) a feed
  for some chats, so wants (or no longer wants) their messages;
- ``wn`` WatchNoted: a node has taken in a Watching (see cyphr.realtime.fanout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

ROOMS_PER_EMIT = 100     # rooms named in one Emitted, to keep it under the bus limit
CHATS_PER_WATCH = 100    # chats named in one Watching or Unwatching (36-character ids)
USERS_PER_LIST = 200     # users named in one PresenceList


class MalformedEnvelope(ValueError):
    """A bus event of a known kind whose fields are not what they must be."""


@dataclass(frozen=True, slots=True)
class MessageAnnounced:
    chat_id: str
    seq: int
    text: str | None = None   # the message's JSON (cyphr.wire.message_text); None: fetch it


@dataclass(frozen=True, slots=True)
class Emitted:
    rooms: tuple[str, ...]
    event: str
    data: Any
    skip_user: str | None = None   # that user's sockets do not get it (the typer)


@dataclass(frozen=True, slots=True)
class Joined:
    chat_id: str
    cyphr_id: str
    last_seq: int = 0


@dataclass(frozen=True, slots=True)
class Left:
    chat_id: str
    cyphr_id: str


@dataclass(frozen=True, slots=True)
class EndSessions:
    cyphr_id: str
    jti: str | None = None   # None: every session of the user (or of the device)
    device: str | None = None  # a device's keyed fingerprint hash: only its sessions


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    node: str
    cyphr_id: str
    online: bool


@dataclass(frozen=True, slots=True)
class PresenceList:
    node: str
    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    # The node sends Watching and routes messages by it (a node of an older
    # version, heard without this, is sent every message, as it expects).
    routed: bool = True


@dataclass(frozen=True, slots=True)
class Heartbeat:
    node: str
    routed: bool = True


@dataclass(frozen=True, slots=True)
class Watching:
    node: str
    chats: tuple[str, ...]
    token: int   # echoed by each node's WatchNoted
    # The first of a node's whole list: forget what it watched before (it
    # says its list again after its bus was away, and may have missed some).
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Unwatching:
    node: str
    chats: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WatchNoted:
    node: str    # the node that took the Watching in
    token: int


Envelope = Union[MessageAnnounced, Emitted, Joined, Left, EndSessions, PresenceChanged,
                 PresenceList, Hello, Heartbeat, Watching, Unwatching, WatchNoted]


def encode(envelope: Envelope) -> dict[str, Any]:
    """The envelope's JSON object, as the bus carries it."""
    match envelope:
        case MessageAnnounced(chat_id, seq, text):
            out: dict[str, Any] = {"t": "m", "c": chat_id, "s": seq}
            if text is not None:
                out["m"] = text
            return out
        case Emitted(rooms, event, data, skip_user):
            out = {"t": "e", "r": list(rooms), "e": event, "d": data}
            if skip_user is not None:
                out["u"] = skip_user
            return out
        case Joined(chat_id, cyphr_id, last_seq):
            return {"t": "j", "c": chat_id, "u": cyphr_id, "s": last_seq}
        case Left(chat_id, cyphr_id):
            return {"t": "l", "c": chat_id, "u": cyphr_id}
        case EndSessions(cyphr_id, jti, device):
            out = {"t": "k", "u": cyphr_id, "j": jti}
            if device is not None:
                out["d"] = device
            return out
        case PresenceChanged(node, cyphr_id, online):
            return {"t": "p", "n": node, "u": cyphr_id, "o": 1 if online else 0}
        case PresenceList(node, users):
            return {"t": "P", "n": node, "us": list(users)}
        case Hello(node, routed):
            return {"t": "hello", "n": node, "r": 1} if routed else {"t": "hello", "n": node}
        case Heartbeat(node, routed):
            return {"t": "h", "n": node, "r": 1} if routed else {"t": "h", "n": node}
        case Watching(node, chats, token, reset):
            out = {"t": "w", "n": node, "cs": list(chats), "k": token}
            if reset:
                out["x"] = 1
            return out
        case Unwatching(node, chats):
            return {"t": "u", "n": node, "cs": list(chats)}
        case WatchNoted(node, token):
            return {"t": "wn", "n": node, "k": token}
    raise TypeError(f"not an envelope: {envelope!r}")


def _text(event: dict[str, Any], key: str, *, optional: bool = False) -> Any:
    value = event.get(key)
    if value is None and optional:
        return None
    if type(value) is not str:
        raise MalformedEnvelope(f"{key!r} must be a string")
    return value


def _integer(event: dict[str, Any], key: str, default: int | None = None) -> int:
    value = event.get(key, default)
    if type(value) is not int:
        raise MalformedEnvelope(f"{key!r} must be an integer")
    return value


def _texts(event: dict[str, Any], key: str) -> tuple[str, ...]:
    value = event.get(key)
    if type(value) is not list or any(type(item) is not str for item in value):
        raise MalformedEnvelope(f"{key!r} must be a list of strings")
    return tuple(value)


def decode(event: Any) -> Envelope | None:
    """The envelope of a bus event; None for a kind this version does not
    know. MalformedEnvelope for a known kind with fields amiss."""
    if type(event) is not dict:
        raise MalformedEnvelope("an envelope is a JSON object")
    kind = event.get("t")
    if kind == "m":
        return MessageAnnounced(_text(event, "c"), _integer(event, "s"), _text(event, "m", optional=True))
    if kind == "e":
        return Emitted(_texts(event, "r"), _text(event, "e"), event.get("d"),
                       _text(event, "u", optional=True))
    if kind == "j":
        return Joined(_text(event, "c"), _text(event, "u"), _integer(event, "s", 0))
    if kind == "l":
        return Left(_text(event, "c"), _text(event, "u"))
    if kind == "k":
        return EndSessions(_text(event, "u"), _text(event, "j", optional=True),
                           _text(event, "d", optional=True))
    if kind == "p":
        return PresenceChanged(_text(event, "n"), _text(event, "u"), bool(event.get("o")))
    if kind == "P":
        return PresenceList(_text(event, "n"), _texts(event, "us"))
    if kind == "hello":
        return Hello(_text(event, "n"), event.get("r") == 1)
    if kind == "h":
        return Heartbeat(_text(event, "n"), event.get("r") == 1)
    if kind == "w":
        return Watching(_text(event, "n"), _texts(event, "cs"), _integer(event, "k"), event.get("x") == 1)
    if kind == "u":
        return Unwatching(_text(event, "n"), _texts(event, "cs"))
    if kind == "wn":
        return WatchNoted(_text(event, "n"), _integer(event, "k"))
    if type(kind) is not str:
        raise MalformedEnvelope("an envelope names its kind in 't'")
    return None
