"""
The change feed: what the handlers changed, as typed, frozen events, for
whoever must act on it elsewhere (the realtime layer tells sockets; the
messaging handler forgets what it cached; push, later, wakes devices).

A handler publishes a change once it is committed. Subscribers are called
at once, in the order they subscribed, in the publisher's turn of the
reactor: they must be quick and must not block (start a task if there is
more to do). A subscriber that raises is logged and the others still run:
one listener's bug must not undo or hide a committed change.

``build_server`` builds the feed first and subscribes every listener;
nothing else is wired by setting attributes after construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.logger import Logger

from cyphr.store.messages import Message

_log = Logger()


@dataclass(frozen=True, slots=True)
class MessageStored:
    """A message was committed with its seq. ``origin`` is the connection
    that sent it, opaque to the handlers (the realtime layer does not echo
    a message to the socket it came from); None when sent over REST."""

    message: Message
    origin: object | None = None


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """``cyphr_id`` became a member of ``chat_id`` (a new direct chat, a new
    group, an added member), whose newest message then had ``last_seq``."""

    chat_id: str
    cyphr_id: str
    last_seq: int = 0


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """``cyphr_id`` left ``chat_id`` or was removed from it."""

    chat_id: str
    cyphr_id: str


@dataclass(frozen=True, slots=True)
class RoleChanged:
    """A group admin gave ``cyphr_id`` the role ``role`` in ``chat_id``."""

    chat_id: str
    cyphr_id: str
    role: str


@dataclass(frozen=True, slots=True)
class SessionsEnded:
    """Sessions of ``cyphr_id`` ended: the one of token ``jti`` (a logout);
    with ``jti`` None, every one of the device whose keyed fingerprint hash
    is ``device`` (the device was removed, or recovered in place); with
    both None, every one (the identity was recovered onto a new device
    alone, or deleted). Their sockets must close, on every node."""

    cyphr_id: str
    jti: str | None = None
    device: str | None = None


@dataclass(frozen=True, slots=True)
class DevicesChanged:
    """The devices of ``cyphr_id`` changed: device ``device_id`` was added
    or removed, or has a new key (``change``: "added", "removed", "key").
    Its contacts and its other devices re-read the device list."""

    cyphr_id: str
    device_id: int
    change: str


@dataclass(frozen=True, slots=True)
class SessionPrekeysLow:
    """A claim left device ``device_id`` of ``cyphr_id`` with fewer than
    cyphr.handlers.sessionkeys.LOW_STOCK unexpired one-time session
    prekeys of a kind: that device publishes more."""

    cyphr_id: str
    device_id: int
    one_time: int
    kem_one_time: int


@dataclass(frozen=True, slots=True)
class IdentityDeleted:
    """The identity ``cyphr_id`` is gone, with its keys and memberships
    (its sessions ended first: SessionsEnded comes before this)."""

    cyphr_id: str


Change = (MessageStored | MemberJoined | MemberLeft | RoleChanged | SessionsEnded | DevicesChanged
          | SessionPrekeysLow | IdentityDeleted)
C = TypeVar("C")


class ChangeFeed:
    """Typed changes from the handlers to their subscribers."""

    def __init__(self) -> None:
        self._subscribers: dict[type, list[Callable[[Any], None]]] = {}

    def subscribe(self, kind: type[C], subscriber: Callable[[C], None]) -> None:
        """Call ``subscriber(change)`` for every change of type ``kind``."""
        if kind not in _KINDS:
            raise TypeError(f"{kind!r} is not a kind of change")
        self._subscribers.setdefault(kind, []).append(subscriber)

    def publish(self, change: Change) -> None:
        for subscriber in self._subscribers.get(type(change), ()):
            try:
                subscriber(change)
            except Exception:  # noqa: BLE001 - the change is committed: tell the others
                _log.failure("A subscriber to {kind} failed", kind=type(change).__name__)


_KINDS = frozenset(Change.__args__)  # type: ignore[attr-defined]
