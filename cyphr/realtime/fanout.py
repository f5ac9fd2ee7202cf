"""
The fan-out adapter beneath the rooms: every routing action does its part
on this node, then publishes an envelope so that the other nodes that need
it do theirs (as python-socketio's pubsub_manager and socketioxide's
adapter do).

What "its part here" means is the realtime layer's business (which sockets
are in which room, which chats have feeds): the adapter asks its ``Here``
for it, with the same calls for an action begun on this node and for one
that arrived from another. The adapter knows envelopes, the bus and which
node wants what, and nothing of sockets.

Routing: a node is sent only what it has sockets for.

- A message (MessageAnnounced) goes to the nodes *watching* its chat. A
  node watches a chat while it has a feed for it (a socket of a member is
  there), and says so on the bus (Watching, Unwatching), gathered over a
  turn of the reactor.
- An event for ``chat:`` rooms goes to the nodes watching those chats; for
  ``user:`` rooms, to the nodes where the user is online (presence); for
  any other room, to all.
- Joins, leaves, ended sessions, presence and the nodes' own envelopes go
  to all: they are rare, and an ended session must also reach a socket
  whose presence is still on its way.

So a node alone publishes no message and no event at all (on a single node,
``bus.shared`` is False, nothing is published whatever it is).

The window: node B opens a chat's feed after the chat's last seq L, read
from the database, and then publishes Watching. Until node A has taken that
in, A does not send B the chat's messages it commits, and B's feed would
wait for L+1. So each node answers a Watching with WatchNoted (to that node
alone), and B, hearing it, looks in the database for what those feeds
missed (``Here.recheck``): a message A committed before taking the Watching
in was committed before A answered, so B's read sees it; one A commits
after, A sends to B. A node that starts (Hello) is sent the whole list of
chats every other node watches, with the same answer and recheck.
Momentary events (typing, receipts, call signals) for a socket that new are
not recovered: they are as momentary as for a user offline.

Versions: a node of a version before this routing says neither Watching nor
``routed`` in its Hello and heartbeats. While one is heard, every message
and event goes to all, as it expects.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from twisted.logger import Logger

from cyphr.realtime.bus import Bus
from cyphr.realtime.envelopes import (
    CHATS_PER_WATCH,
    ROOMS_PER_EMIT,
    Emitted,
    EndSessions,
    Envelope,
    Heartbeat,
    Hello,
    Joined,
    Left,
    MalformedEnvelope,
    MessageAnnounced,
    PresenceChanged,
    PresenceList,
    Unwatching,
    WatchNoted,
    Watching,
    decode,
    encode,
)
from cyphr.wire import Outbound

_log = Logger()

# How long a Watching waits for the other nodes' WatchNoted: after that, a
# node that has not answered is silent, and is forgotten (NODE_SILENCE).
NOTED_WITHIN = 120.0


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

    def nodes_of(self, cyphr_id: str) -> Iterable[str]:
        """The other nodes where the user is online."""

    def watched_here(self) -> Iterable[str]:
        """The chats with a feed here."""

    def recheck(self, chat_ids: tuple[str, ...]) -> None:
        """Look in the database for what these chats' feeds here missed."""


class FanOut:
    def __init__(self, bus: Bus, here: Here, reactor: Any) -> None:
        self._bus = bus
        self._here = here
        self._reactor = reactor
        self._shared = bus.shared
        self.node_id = bus.node_id
        self.malformed = 0  # envelopes from the bus that were not
        # Who watches what: chat -> the other nodes watching it, and node ->
        # its chats. Memory: the chats with a socket on another node.
        self._watchers: dict[str, set[str]] = {}
        self._watched_by: dict[str, set[str]] = {}
        # Other nodes heard: those that route, and those that do not (an
        # older version); while any of the latter is heard, send to all.
        self._routed: set[str] = set()
        self._legacy: set[str] = set()
        # This node's watch changes of the current turn, and the Watching
        # sent whose WatchNoted may still come: token -> (chats, when).
        self._watch: set[str] = set()
        self._unwatch: set[str] = set()
        self._flush_call: Any = None
        self._token = 0
        self._noting: dict[int, tuple[tuple[str, ...], float]] = {}
        bus.listen(self)

    # -- actions: here, then everywhere else --------------------------------

    def to_rooms(self, rooms: list[str], event: str, data: Any,
                 skip_user: str | None = None, *, everywhere: bool = False) -> bool:
        """``event`` to these rooms' sockets on every node (sent to the nodes
        that have some; with ``everywhere``, to all, as a barrier: what each
        node was sent before it has arrived). False if it was too large for
        the bus (it still reached this node's sockets)."""
        self._here.emit_here(rooms, event, data, skip_user)
        if not self._shared:
            return True
        published = True
        for start in range(0, len(rooms), ROOMS_PER_EMIT):
            chunk = tuple(rooms[start:start + ROOMS_PER_EMIT])
            to = None if everywhere else self._nodes_for(chunk)
            if to is None or to:
                published = self.publish(Emitted(chunk, event, data, skip_user), to) and published
        return published

    def _nodes_for(self, rooms: tuple[str, ...]) -> set[str] | None:
        """The other nodes with sockets in ``rooms``; None: all of them."""
        if self._legacy:
            return None
        nodes: set[str] = set()
        for room in rooms:
            if room.startswith("chat:"):
                nodes.update(self._watchers.get(room[5:], ()))
            elif room.startswith("user:"):
                nodes.update(self._here.nodes_of(room[5:]))
            else:
                return None
        return nodes

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
        to = None
        if not self._legacy:
            to = self._watchers.get(chat_id)
            if not to:
                return  # no other node has a socket for it
        if message.envelopes or not self.publish(MessageAnnounced(chat_id, seq, message.text), to):
            self.publish(MessageAnnounced(chat_id, seq), to)

    def publish(self, envelope: Envelope, to: Iterable[str] | None = None) -> bool:
        """Tell the other nodes (or those ``to`` names); False if the
        envelope is over the bus's size limit (nothing was sent)."""
        if not self._shared:
            return True
        try:
            self._bus.publish(encode(envelope), to)
        except ValueError:
            return False
        return True

    # -- what this node watches ----------------------------------------------

    def watch(self, chat_id: str) -> None:
        """A feed opened here: this node wants the chat's messages."""
        if self._shared:
            self._unwatch.discard(chat_id)
            self._watch.add(chat_id)
            self._flush_soon()

    def unwatch(self, chat_id: str) -> None:
        """The chat's feed here closed."""
        if self._shared:
            self._watch.discard(chat_id)
            self._unwatch.add(chat_id)
            self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Publish now this turn's watch changes (at the end of the turn
        otherwise; at a stop, before the bus stops, so that the others stop
        sending this node what it no longer has feeds for)."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        gone, self._unwatch = sorted(self._unwatch), set()
        for start in range(0, len(gone), CHATS_PER_WATCH):
            self.publish(Unwatching(self.node_id, tuple(gone[start:start + CHATS_PER_WATCH])))
        new, self._watch = sorted(self._watch), set()
        self._announce(new)

    def _announce(self, chats: list[str], to: Iterable[str] | None = None, *,
                  whole: bool = False) -> None:
        """Watching for ``chats``, in chunks, each with a token that the
        nodes' WatchNoted will echo. ``whole``: the node's whole list, which
        replaces what they knew of it (and is said even when empty)."""
        now = self._reactor.seconds()
        noting = self._noting
        while noting:
            oldest = next(iter(noting))
            if now - noting[oldest][1] <= NOTED_WITHIN:
                break
            del noting[oldest]
        for start in range(0, max(len(chats), 1 if whole else 0), CHATS_PER_WATCH):
            chunk = tuple(chats[start:start + CHATS_PER_WATCH])
            self._token += 1
            if chunk:
                noting[self._token] = (chunk, now)
            self.publish(Watching(self.node_id, chunk, self._token, whole and start == 0), to)

    def announce_watched(self, to: Iterable[str] | None = None) -> None:
        """Say this node's whole list of watched chats (to all, or to a node
        that has just started)."""
        if self._shared:
            self._announce(sorted(self._here.watched_here()), to, whole=True)

    # -- what the other nodes watch --------------------------------------------

    def _watched(self, node: str, chats: tuple[str, ...]) -> None:
        mine = self._watched_by.setdefault(node, set())
        for chat_id in chats:
            mine.add(chat_id)
            self._watchers.setdefault(chat_id, set()).add(node)

    def _unwatched(self, node: str, chats: Iterable[str]) -> None:
        mine = self._watched_by.get(node)
        for chat_id in chats:
            if mine is not None:
                mine.discard(chat_id)
            nodes = self._watchers.get(chat_id)
            if nodes is not None:
                nodes.discard(node)
                if not nodes:
                    del self._watchers[chat_id]
        if mine is not None and not mine:
            del self._watched_by[node]

    def forget_node(self, node: str) -> None:
        """A node went silent (or started again under its name): it watches
        nothing any more."""
        self._unwatched(node, list(self._watched_by.get(node, ())))
        self._routed.discard(node)
        self._legacy.discard(node)

    def _heard(self, node: str, routed: bool) -> None:
        if routed:
            self._routed.add(node)
            self._legacy.discard(node)
        elif node not in self._routed:
            self._legacy.add(node)

    def memory_tables(self) -> dict[str, int]:
        """The size of each table, for the memory metrics."""
        return {"fanout_watched_chats": len(self._watchers), "fanout_watch_tokens": len(self._noting)}

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
            case Watching(node, chats, token, reset):
                if node == self.node_id:
                    return
                if reset:
                    self.forget_node(node)
                self._heard(node, True)
                self._watched(node, chats)
                self.publish(WatchNoted(self.node_id, token), (node,))
            case Unwatching(node, chats):
                self._unwatched(node, chats)
            case WatchNoted(node, token):
                self._heard(node, True)
                noted = self._noting.get(token)
                if noted is not None:
                    here.recheck(noted[0])
            case Hello(node, routed):
                # Started (again, if under a name heard before): no feed yet.
                self.forget_node(node)
                self._heard(node, routed)
                if routed:
                    self.announce_watched((node,))
                here.node_event(envelope)
            case Heartbeat(node, routed):
                self._heard(node, routed)
                here.node_event(envelope)
            case PresenceChanged(node) | PresenceList(node):
                if node not in self._routed:
                    self._legacy.add(node)  # until its heartbeat says otherwise
                here.node_event(envelope)
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
        # Feeds opened before the bus listened were announced, but no
        # WatchNoted could reach this node: say them again. (None at all,
        # usually: then nothing is said, and the others know this node has
        # none from its Hello.)
        if self._here.watched_here():
            self.announce_watched()
        self._here.bus_listening()

    def bus_restored(self) -> None:
        # The others may have missed some Watching or Unwatching meanwhile.
        self.announce_watched()
        self._here.bus_restored()
