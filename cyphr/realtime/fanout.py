"""
The fan-out adapter beneath the rooms: every routing action does its part
on this node, then publishes an envelope so that every other node does its
part (as python-socketio's pubsub_manager and socketioxide's adapter do).

What "its part here" means is the realtime layer's business (which sockets
are in which room, which chats have feeds): the adapter asks its ``Here``
for it, with the same calls for an action begun on this node and for one
that arrived from another. The adapter knows envelopes and the bus, and
nothing of sockets.

On a single node (``bus.shared`` is False) nothing is published.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger

from cyphr.realtime.bus import Bus
from cyphr.realtime.envelopes import (
    ROOMS_PER_EMIT,
    Emitted,
    EndSessions,
    Envelope,
    Joined,
    Left,
    MalformedEnvelope,
    MessageAnnounced,
    decode,
    encode,
)
from cyphr.wire import Outbound

_log = Logger()


class Here(Protocol):
    """This node's part of each action (implemented by the realtime layer)."""

    def emit_here(self, rooms: tuple[str, ...] | list[str], event: str, data: Any,
                  skip_user: str | None) -> None:
        """Send ``event`` to the sockets here in any of ``rooms``, once each."""

    def join_here(self, chat_id: str, cyphr_id: str, last_seq: int) -> None:
        """The user's sockets here join the chat's room."""

    def leave_here(self, chat_id: str, cyphr_id: str) -> None:
        """The user's sockets here leave the chat's room."""

    def end_here(self, cyphr_id: str, jti: str | None, device: str | None) -> None:
        """Close the user's sockets here (of token ``jti``, or of the device
        of keyed fingerprint hash ``device``, or all)."""

    def message_here(self, chat_id: str, seq: int, message: Outbound | None, origin: Any) -> None:
        """A committed message for the chat's sockets here (None: fetch it)."""

    def node_event(self, envelope: Envelope) -> None:
        """An envelope about the nodes themselves (presence, hello,
        heartbeat), from another node."""

    def bus_listening(self) -> None:
        """Events from the other nodes can first arrive."""

    def bus_restored(self) -> None:
        """The bus was down and listens again: things may have been missed."""


class FanOut:
    def __init__(self, bus: Bus, here: Here) -> None:
        self._bus = bus
        self._here = here
        self._shared = bus.shared
        self.node_id = bus.node_id
        self.malformed = 0  # envelopes from the bus that were not
        bus.listen(self)

    # -- actions: here, then everywhere else --------------------------------

    def to_rooms(self, rooms: list[str], event: str, data: Any,
                 skip_user: str | None = None) -> bool:
        """``event`` to these rooms' sockets on every node. False if it was
        too large for the bus (it still reached this node's sockets)."""
        self._here.emit_here(rooms, event, data, skip_user)
        published = True
        for start in range(0, len(rooms), ROOMS_PER_EMIT):
            chunk = tuple(rooms[start:start + ROOMS_PER_EMIT])
            published = self.publish(Emitted(chunk, event, data, skip_user)) and published
        return published

    def to_users(self, users: list[str] | tuple[str, ...], event: str, data: Any) -> bool:
        """``event`` to every socket of these users, on every node."""
        return self.to_rooms(["user:" + user for user in users], event, data)

    def join(self, chat_id: str, cyphr_id: str, last_seq: int = 0) -> None:
        self._here.join_here(chat_id, cyphr_id, last_seq)
        self.publish(Joined(chat_id, cyphr_id, last_seq))

    def leave(self, chat_id: str, cyphr_id: str) -> None:
        self._here.leave_here(chat_id, cyphr_id)
        self.publish(Left(chat_id, cyphr_id))

    def end_sessions(self, cyphr_id: str, jti: str | None, device: str | None = None) -> None:
        self._here.end_here(cyphr_id, jti, device)
        self.publish(EndSessions(cyphr_id, jti, device))

    def message(self, chat_id: str, seq: int, message: Outbound, origin: Any) -> None:
        """A committed message: to its chat's sockets here, and announced
        with its text (or without, and the other nodes fetch it: when too
        large for the bus, and when sent over sessions, whose envelopes
        rarely fit)."""
        self._here.message_here(chat_id, seq, message, origin)
        if not self._shared:
            return
        if message.envelopes or not self.publish(MessageAnnounced(chat_id, seq, message.text)):
            self.publish(MessageAnnounced(chat_id, seq))

    def publish(self, envelope: Envelope) -> bool:
        """Tell the other nodes; False if the envelope is over the bus's size
        limit (nothing was sent)."""
        if not self._shared:
            return True
        try:
            self._bus.publish(encode(envelope))
        except ValueError:
            return False
        return True

    # -- the bus: the other nodes' actions, done here -------------------------

    def bus_event(self, event: dict[str, Any]) -> None:
        try:
            envelope = decode(event)
        except MalformedEnvelope as e:
            self.malformed += 1
            # Anyone who can connect to the database can NOTIFY: say so,
            # but not once per envelope of a flood.
            if self.malformed & (self.malformed - 1) == 0:
                _log.warn("Ignored {count} malformed bus envelope(s), the last: {reason}",
                          count=self.malformed, reason=str(e))
            return
        here = self._here
        match envelope:
            case None:
                return  # a kind from a newer version
            case MessageAnnounced(chat_id, seq, text):
                here.message_here(chat_id, seq, Outbound(text) if text is not None else None, None)
            case Emitted(rooms, event_name, data, skip_user):
                here.emit_here(rooms, event_name, data, skip_user)
            case Joined(chat_id, cyphr_id, last_seq):
                here.join_here(chat_id, cyphr_id, last_seq)
            case Left(chat_id, cyphr_id):
                here.leave_here(chat_id, cyphr_id)
            case EndSessions(cyphr_id, jti, device):
                here.end_here(cyphr_id, jti, device)
            case _:
                here.node_event(envelope)

    def bus_listening(self) -> None:
        self._here.bus_listening()

    def bus_restored(self) -> None:
        self._here.bus_restored()
