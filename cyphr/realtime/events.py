"""
Cyphr's realtime events on the Socket.IO layer, as the AsyncAPI document
describes them (cyphr/api/asyncapi.json, served at /api/asyncapi.json).

The events a signed-in client sends are in cyphr.realtime.client_events,
each one short method that calls the handler holding its rule. This module
keeps what only a socket has: its session (the token it was accepted with,
its expiry), its welcome (rooms, presence, the offline catch-up) and the
pacing of what goes out to it.

Rooms: ``user:<cyphrId>`` holds a user's sockets, ``chat:<chatId>`` the
sockets of a chat's members. Rooms follow the database: the handlers
publish every membership change on the change feed (cyphr.changes), and
the fan-out adapter (cyphr.realtime.fanout) carries it to every node.

Order: messages pass through the chat's feed (cyphr.realtime.feeds), so
that every socket sees its chats in seq order without gaps. A socket that
comes back first gets what it has not acknowledged as delivered (the
catch-up), then ``sync_complete``; what arrives live during the catch-up is
held and sent after it, without duplicates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cyphr.changes import (
    ChangeFeed,
    DevicesChanged,
    MemberJoined,
    MemberLeft,
    MessageStored,
    SessionPrekeysLow,
    SessionsEnded,
)
from cyphr.clock import iso, now_ms
from cyphr.errors import (
    UNAUTHORIZED,
    ApiError,
    Unauthorized,
)
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.calls import CallsHandler
from cyphr.handlers.delivery import CATCH_UP_PAGE, DeliveryHandler
from cyphr.handlers.messaging import MessagingHandler
from cyphr.handlers.push import PushHandler
from cyphr.handlers.receipts import ReceiptsHandler
from cyphr.realtime.bus import Bus
from cyphr.realtime.client_events import ClientEvents, Sent, event_body, ok
from cyphr.realtime.codec import EVENT, SocketPacket, encode_event_json, encode_packet
from cyphr.realtime.envelopes import (
    USERS_PER_LIST,
    Envelope,
    Heartbeat,
    Hello,
    PresenceChanged,
    PresenceList,
)
from cyphr.realtime.fanout import FanOut
from cyphr.realtime.feeds import ChatFeeds
from cyphr.realtime.presence import Presence
from cyphr.realtime.socketio import (
    ConnectRefused,
    Socket,
    SocketServer,
)
from cyphr.wire import Outbound, message_text

_log = Logger()

AUTH_TIMEOUT = 10.0          # seconds an unauthenticated socket may stay
HEARTBEAT = 15.0             # seconds between a node's heartbeats on the bus
NODE_SILENCE = 60.0          # a node silent this long has its presence forgotten

Frames = list[str | bytes]


class Client:
    """What a socket is, to Cyphr."""

    __slots__ = ("auth_timer", "catching_up", "expiry_timer", "seen", "user", "welcomed")

    def __init__(self) -> None:
        self.user: AuthUser | None = None
        self.auth_timer: Any = None
        self.expiry_timer: Any = None  # ends the socket when its token expires
        self.welcomed = False
        # While catching up: the live messages that arrive meanwhile.
        self.catching_up: list[tuple[str, int, Frames]] | None = None
        # chat -> the highest seq the catch-up sent (live ones up to it are dropped).
        self.seen: dict[str, int] | None = None


def _frames(event: str, data: Any) -> Frames:
    return encode_packet(SocketPacket(EVENT, "/", [event, data]))


def _new_message_frames(text: str) -> Frames:
    return encode_event_json(Sent.NEW_MESSAGE, '{"message":' + text + "}")


class Realtime:
    def __init__(self, *, sockets: SocketServer, authenticator: Authenticator,
                 messaging: MessagingHandler, receipts: ReceiptsHandler, calls: CallsHandler,
                 delivery: DeliveryHandler, presence: Presence, bus: Bus, changes: ChangeFeed,
                 clock: Any, reactor: Any, max_payload: int, push: PushHandler) -> None:
        self.sockets = sockets
        # Told of each device's sockets as they come and go (push wakes only
        # devices with none, on any node).
        self._push = push
        self._authenticator = authenticator
        self._delivery = delivery
        self.presence = presence
        self._bus = bus
        self._clock = clock
        # Business time (timeouts, lastSeen) comes from the clock; "soon"
        # (the next turn, a short wait) from the reactor.
        self._reactor = reactor
        # What _spawn began and has not finished (last_seen writes,
        # announcements, feed fills): the stop waits for them (tasks_done).
        self._tasks: set[Deferred[Any]] = set()
        self.fanout = FanOut(bus, self, reactor)
        self.feeds = ChatFeeds(delivery, reactor, self._deliver, self._spawn,
                               opened=self.fanout.watch, closed=self.fanout.unwatch)
        # Every socket whose token was accepted, from that moment (before its
        # welcome), by user and by token: ending sessions finds them here,
        # including those not yet in their ``user:`` room.
        self._by_user: dict[str, set[Socket]] = {}
        self._by_jti: dict[str, set[Socket]] = {}
        # How many times sessions were ended here (by this node or the bus):
        # see _check_token.
        self._endings = 0
        self._heartbeat: Any = None
        self._started = False
        self._said_hello = False

        self.ns = sockets.namespace("/", connect=self._connect, connected=self._connected,
                                    disconnected=self._disconnected, error_ack=ClientEvents.error_ack)
        self.ns.on("authenticate", self._authenticate)
        self.events = ClientEvents(messaging=messaging, receipts=receipts, calls=calls,
                                   fanout=self.fanout, clock=clock, max_payload=max_payload,
                                   join=self._join)
        self.events.register(self.ns)
        changes.subscribe(MessageStored, self._message_stored)
        changes.subscribe(MemberJoined, lambda c: self.fanout.join(c.chat_id, c.cyphr_id, c.last_seq))
        changes.subscribe(MemberLeft, lambda c: self.fanout.leave(c.chat_id, c.cyphr_id))
        changes.subscribe(DevicesChanged, self._devices_changed)
        changes.subscribe(SessionPrekeysLow, self._session_prekeys_low)
        changes.subscribe(SessionsEnded,
                          lambda c: self.fanout.end_sessions(c.cyphr_id, c.jti, c.device))

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Start once the database is ready (events go out through it)."""
        self._started = True
        self._hello()
        self._heartbeat = self._clock.callLater(HEARTBEAT, self._beat)

    def _hello(self) -> None:
        # Asks the other nodes who is online there; they answer on the bus,
        # so it waits until this node listens too.
        if self._started and self._bus.listening and not self._said_hello:
            self._said_hello = True
            self.fanout.publish(Hello(self.fanout.node_id))

    def stop(self) -> None:
        self._started = False
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        self.feeds.stop()
        self.fanout.flush()

    def _beat(self) -> None:
        # The next beat is set first and each step is guarded: a heartbeat
        # that stopped would make this node look silent to the others, who
        # would then take all its users offline.
        self._heartbeat = self._clock.callLater(HEARTBEAT, self._beat)
        try:
            self.fanout.publish(Heartbeat(self.fanout.node_id))
        except Exception:
            _log.failure("The heartbeat could not be published")
        for node in self.presence.silent_nodes(NODE_SILENCE):
            _log.info("Node {node} went silent; forgetting its users", node=node)
            self.fanout.forget_node(node)
            try:
                self._gone_silent(self.presence.forget_node(node))
            except Exception:
                _log.failure("The users of silent node {node} could not be taken offline", node=node)

    def _gone_silent(self, users: list[str]) -> None:
        """``users`` were online only through a node that went silent: it
        will never say that their last socket went, so this node does what
        that would have done (last_seen, ``user_offline``). Every node that
        notices the silence does the same, so each tells only its own
        sockets: each socket hears it once, from the node it is on."""
        for user in users:
            self._went_offline(user, here_only=True)

    def stats(self) -> dict[str, int]:
        return {"connections": self.presence.connections, "users": self.presence.users}

    def memory_tables(self) -> dict[str, int]:
        """The size of each table, for the memory metrics. Each follows the
        sockets connected now: _by_user and _by_jti lose a socket when it
        goes (_unregister), a chat's feed closes with the chat's last socket
        here, a task leaves _tasks when it ends."""
        return {"realtime_sockets_by_user": len(self._by_user),
                "realtime_sockets_by_token": len(self._by_jti),
                "realtime_chat_feeds": len(self.feeds), "realtime_tasks": len(self._tasks),
                **self.fanout.memory_tables()}

    # -- authentication -------------------------------------------------------

    async def _connect(self, socket: Socket, auth: Any) -> None:
        socket.state = Client()
        token = auth.get("token") if isinstance(auth, dict) else None
        if token is not None:
            if not isinstance(token, str):
                raise ConnectRefused("unauthorized", {"code": UNAUTHORIZED})
            try:
                user = await self._check_token(token)
            except ApiError as e:
                raise ConnectRefused(e.message, {"code": e.code}) from None
            connection = socket.connection
            if not connection.open or connection.sockets.get(socket.namespace.name) is not socket:
                return  # gone while its token was checked: never accepted
            # Accepted in this same turn (nothing awaits between here and
            # the CONNECT reply), so the socket is registered once connected.
            self._register(socket, user)

    async def _check_token(self, token: str) -> AuthUser:
        """The token's user, as the Authenticator says, with no session
        ending missed. A logout or recovery commits its revocation and then
        ends the sockets it finds (here, or on the other nodes through the
        bus). A socket registered after that ending is not found; so the
        check must have read the database after the revocation committed.
        If no session ended here while the check ran, any ending still to
        come will find the socket (the caller registers it in this same
        turn), and any earlier one committed before the check began. If one
        did end, the check may have read the state before it: check again.
        A counter rather than a re-check every time: endings are rare, and a
        connect then costs one query, not two."""
        while True:
            endings = self._endings
            user = await self._authenticator.authenticate_token(token)
            if endings == self._endings:
                return user

    def _register(self, socket: Socket, user: AuthUser) -> None:
        client: Client = socket.state
        client.user = user
        socket.trust()  # its packets may now reach the event limit (max_body)
        self._by_user.setdefault(user.cyphr_id, set()).add(socket)
        self._by_jti.setdefault(user.jti, set()).add(socket)
        delay = max(0.0, user.expires_at - self._clock.seconds())
        client.expiry_timer = self._clock.callLater(delay, _end_socket, socket, "session token expired")

    def _unregister(self, socket: Socket) -> None:
        client: Client = socket.state
        if client.expiry_timer is not None and client.expiry_timer.active():
            client.expiry_timer.cancel()
        client.expiry_timer = None
        user = client.user
        if user is None:
            return
        for index, key in ((self._by_user, user.cyphr_id), (self._by_jti, user.jti)):
            sockets = index.get(key)
            if sockets is not None:
                sockets.discard(socket)
                if not sockets:
                    del index[key]

    def _connected(self, socket: Socket) -> Deferred[None] | None:
        client: Client = socket.state
        if client.user is not None:
            return ensureDeferred(self._welcome(socket))
        client.auth_timer = self._clock.callLater(AUTH_TIMEOUT, self._auth_expired, socket)
        return None

    def _auth_expired(self, socket: Socket) -> None:
        socket.state.auth_timer = None
        if socket.state.user is None:
            socket.disconnect()  # the client is told, and does not reconnect
            socket.session.close("authentication timeout")

    async def _authenticate(self, socket: Socket, data: Any = None) -> dict[str, Any]:
        client: Client = socket.state
        body = event_body(data)
        if client.user is not None:
            return ok(userId=client.user.cyphr_id, cyphrId=client.user.cyphr_id)
        token = body.get("token")
        if not isinstance(token, str) or not token:
            # The original {userId, publicKey} proves nothing.
            raise Unauthorized("Authenticate with a session token", code=UNAUTHORIZED)
        user = await self._check_token(token)
        if client.user is not None or not socket.connected:
            return ok(userId=user.cyphr_id, cyphrId=user.cyphr_id)
        self._register(socket, user)  # with no await since the check: see _check_token
        if client.auth_timer is not None and client.auth_timer.active():
            client.auth_timer.cancel()
        client.auth_timer = None
        # The ack first, then the welcome (rooms, catch-up).
        self._reactor.callLater(0, self._start_welcome, socket)
        return ok(userId=user.cyphr_id, cyphrId=user.cyphr_id)

    def _start_welcome(self, socket: Socket) -> None:
        ensureDeferred(self._welcome(socket)).addErrback(
            lambda f: _log.failure("Welcoming a socket failed", f))

    # -- the welcome: rooms, presence, catch-up ---------------------------------

    async def _welcome(self, socket: Socket) -> None:
        """Rooms, presence, ``authenticated``, the catch-up, ``sync_complete``."""
        client: Client = socket.state
        user = client.user
        assert user is not None
        if client.welcomed or not socket.connected:
            return  # ended before it began: nothing to do for it
        client.welcomed = True
        me = user.cyphr_id
        client.catching_up = []
        try:
            positions = await self._delivery.positions(me, (user.user_id, user.device_id))
        except ApiError:
            socket.session.close("database unavailable")
            return
        if not socket.connected:
            return  # ended meanwhile (logout, expiry): no rooms, no presence
        socket.join("user:" + me)
        for chat_id, last_seq in positions.chats:
            self._join(socket, chat_id, last_seq)
        self._push.connected(user.user_id, user.device_id)
        if self.presence.add(me, socket):
            self.fanout.publish(PresenceChanged(self.fanout.node_id, me, True))
            if not self.presence.elsewhere(me):
                self._spawn(self._announce(me, Sent.USER_ONLINE, {"userId": me}))
        socket.emit(Sent.AUTHENTICATED, {"userId": me, "cyphrId": me})
        try:
            await self._catch_up(socket, user, positions.behind)
        except ApiError:
            socket.session.close("database unavailable")
        except Exception:
            _log.failure("A catch-up failed")  # who it was is not for the log
            socket.session.close("server error")

    async def _catch_up(self, socket: Socket, user: AuthUser, behind: tuple[str, ...]) -> None:
        """Push what ``user``'s device has not acknowledged, in the chats
        ``behind`` (any chat whose newest message is past the device's
        delivered mark; the others have nothing to push)."""
        client: Client = socket.state
        cursor = await self._delivery.cursor()
        after: tuple[str, int] | None = None
        seen: dict[str, int] = {}
        while socket.connected and behind:
            page = await self._delivery.undelivered_page(user.cyphr_id, (user.user_id, user.device_id),
                                                         after, behind)
            if not socket.connected:
                return
            for message in page:
                socket.send_frames(_new_message_frames(
                    message_text(message, (user.cyphr_id, user.device_id))))
                seen[message.chat_id] = message.seq
            if len(page) < CATCH_UP_PAGE:
                break
            after = (page[-1].chat_id, page[-1].seq)
            await self._drained(socket)
        held, client.catching_up = client.catching_up or [], None
        client.seen = seen or None
        for chat_id, seq, frames in held:
            if seq > seen.get(chat_id, 0):
                socket.send_frames(frames)
        socket.emit(Sent.SYNC_COMPLETE, {"cursor": cursor})

    async def _drained(self, socket: Socket) -> None:
        """Wait while the socket has much unsent (the catch-up must not
        outrun a slow client into the buffer limit)."""
        session = socket.session
        limit = session.server.buffer_limit // 2
        while socket.connected and session.buffered_bytes > limit:
            d: Deferred[None] = Deferred()
            self._reactor.callLater(0.05, d.callback, None)
            await d

    def _disconnected(self, socket: Socket, reason: str) -> None:
        client: Client | None = socket.state
        if client is None:
            return
        if client.auth_timer is not None and client.auth_timer.active():
            client.auth_timer.cancel()
        client.auth_timer = None
        self._unregister(socket)
        for room in socket.rooms:
            if room.startswith("chat:") and self.ns.room_size(room) <= 1:
                self.feeds.close(room[5:])
        user = client.user
        if user is None or not client.welcomed:
            return
        self._spawn(self._delivery.device_left(user.user_id, user.device_id))
        self._push.disconnected(user.user_id, user.device_id)
        me = user.cyphr_id
        if self.presence.remove(me, socket):
            self.fanout.publish(PresenceChanged(self.fanout.node_id, me, False))
            self._went_offline(me, here_only=False)

    def _went_offline(self, me: str, *, here_only: bool) -> None:
        """``me`` has no socket left (here, or on a silent node): record its
        last_seen and, unless it is online elsewhere, say so."""
        # One reading of the clock: the time recorded is the time told.
        now = now_ms(self._clock)
        self._spawn(self._delivery.went_offline(me, now))
        if here_only or not self.presence.elsewhere(me):
            self._spawn(self._announce(me, Sent.USER_OFFLINE, {"userId": me, "lastSeen": iso(now)},
                                       here_only=here_only))

    async def _announce(self, me: str, event: str, data: dict[str, Any], *,
                        here_only: bool = False, including_me: bool = False) -> None:
        """Tell everyone who shares a chat with ``me`` (and ``me``'s own
        sockets, ``including_me``), on every node (or, ``here_only``, on
        this one)."""
        partners = await self._delivery.partners(me)
        rooms = ["user:" + u for u in partners]
        if including_me:
            rooms.append("user:" + me)
        if here_only:
            self.emit_here(rooms, event, data, None)
        else:
            self.fanout.to_rooms(rooms, event, data)

    # -- changes from the handlers ------------------------------------------------

    def _devices_changed(self, change: DevicesChanged) -> None:
        # The account's own devices and everyone who shares a chat with it
        # re-read its device list before they next seal to it.
        self._spawn(self._announce(
            change.cyphr_id, Sent.DEVICES_CHANGED,
            {"userId": change.cyphr_id, "deviceId": change.device_id, "change": change.change},
            including_me=True))

    def _session_prekeys_low(self, change: SessionPrekeysLow) -> None:
        # To the account's own sockets, on every node: the device named
        # publishes more one-time prekeys (the others ignore it).
        self.fanout.to_users([change.cyphr_id], Sent.SESSION_PREKEYS_LOW, {
            "deviceId": change.device_id, "oneTimePrekeys": change.one_time,
            "kemOneTimePrekeys": change.kem_one_time})

    def _message_stored(self, change: MessageStored) -> None:
        message = change.message
        self.fanout.message(message.chat_id, message.seq, Outbound.of(message), change.origin)

    # -- this node's part of each fan-out (cyphr.realtime.fanout.Here) -------------

    def emit_here(self, rooms: tuple[str, ...] | list[str], event: str, data: Any,
                  skip_user: str | None) -> None:
        targets: set[Socket] = set()
        for room in rooms:
            members = self.ns.rooms.get(room)
            if members:
                targets.update(members)
        if not targets:
            return
        frames = _frames(event, data)
        for socket in targets:
            client = socket.state
            if skip_user is not None and client.user is not None and client.user.cyphr_id == skip_user:
                continue
            socket.send_frames(frames)

    def join_here(self, chat_id: str, cyphr_id: str, last_seq: int) -> None:
        for socket in list(self.presence.sockets(cyphr_id)):
            if socket.connected:
                self._join(socket, chat_id, last_seq)

    def leave_here(self, chat_id: str, cyphr_id: str) -> None:
        room = "chat:" + chat_id
        for socket in list(self.presence.sockets(cyphr_id)):
            socket.leave(room)
        if not self.ns.room_size(room):
            self.feeds.close(chat_id)

    def end_here(self, cyphr_id: str, jti: str | None, device: str | None = None) -> None:
        # Every registered socket of the token (or of the device, or of the
        # user), welcomed or still in its welcome.
        self._endings += 1
        sockets = self._by_user.get(cyphr_id, ()) if jti is None else self._by_jti.get(jti, ())
        for socket in list(sockets):
            user = socket.state.user
            if user is not None and user.cyphr_id == cyphr_id and (
                    device is None or user.device_hash == device):
                _end_socket(socket, "session ended")

    def message_here(self, chat_id: str, seq: int, message: Outbound | None, origin: Any) -> None:
        if message is None:
            self.feeds.fetch(chat_id, seq)
        else:
            self.feeds.arrive(chat_id, seq, message, origin)

    def node_event(self, envelope: Envelope) -> None:
        presence = self.presence
        match envelope:
            case PresenceChanged(node, cyphr_id, online):
                presence.heard(node)
                if online:
                    presence.remote_online(node, cyphr_id)
                else:
                    presence.remote_offline(node, cyphr_id)
            case PresenceList(node, users):
                presence.heard(node)
                for user in users:
                    presence.remote_online(node, user)
            case Hello(node):
                presence.heard(node)
                self._announce_users()
            case Heartbeat(node):
                presence.heard(node)

    def bus_listening(self) -> None:
        self._hello()

    def bus_restored(self) -> None:
        """The bus was down: others may have missed our presence, and our
        feeds may have missed messages. Catch up on both."""
        self._announce_users()
        self.feeds.resync()

    def nodes_of(self, cyphr_id: str) -> Iterable[str]:
        return self.presence.nodes_of(cyphr_id)

    def watched_here(self) -> list[str]:
        return self.feeds.chats()

    def recheck(self, chat_ids: tuple[str, ...]) -> None:
        self.feeds.recheck(chat_ids)

    def _announce_users(self) -> None:
        users = list(self.presence.local)
        for start in range(0, len(users), USERS_PER_LIST):
            self.fanout.publish(PresenceList(self.fanout.node_id, tuple(users[start:start + USERS_PER_LIST])))

    # -- rooms and feeds --------------------------------------------------------

    def _join(self, socket: Socket, chat_id: str, last_seq: int) -> None:
        room = "chat:" + chat_id
        socket.join(room)
        # A socket whose connection is closing is not let into the room:
        # no feed for it either, or nothing would ever close that feed.
        if room in socket.rooms:
            self.feeds.open(chat_id, last_seq)

    def _deliver(self, chat_id: str, seq: int, message: Outbound, origin: Socket | None) -> None:
        """What a feed hands on, to the chat's sockets here: one encoding
        for all, or, for a message sent over sessions, one per device that
        has an envelope of it."""
        members = self.ns.rooms.get("chat:" + chat_id)
        if not members:
            return
        # Made for the first socket told: often the only socket here is the
        # sender's, which is not.
        common: list[str | bytes] | None = None
        # A copy: a socket closed on the way (slow consumer) leaves the room.
        for socket in list(members):
            if socket is origin:
                continue
            client: Client = socket.state
            if message.envelopes and client.user is not None:
                frames = _new_message_frames(
                    message.for_device((client.user.cyphr_id, client.user.device_id)))
            else:
                if common is None:
                    common = _new_message_frames(message.text)
                frames = common
            if client.catching_up is not None:
                client.catching_up.append((chat_id, seq, frames))
                continue
            seen = client.seen
            if seen is not None and chat_id in seen:
                if seq <= seen[chat_id]:
                    continue
                del seen[chat_id]
                if not seen:
                    client.seen = None
            socket.send_frames(frames)

    def _spawn(self, coroutine: Any) -> None:
        task = ensureDeferred(coroutine)
        if task.called:
            task.addErrback(_quiet_failure)
            return
        self._tasks.add(task)

        def done(result: Any) -> Any:
            self._tasks.discard(task)
            return result

        task.addBoth(done).addErrback(_quiet_failure)

    async def tasks_done(self) -> None:
        """Wait until the background tasks begun so far have ended, and
        those they began: at shutdown, the sockets closed last write their
        users' last_seen and announce them offline, and the database must
        not close under them."""
        while self._tasks:
            await DeferredList(list(self._tasks))


def _end_socket(socket: Socket, reason: str) -> None:
    """End a socket whose session ended (logout, recovery, expiry): the
    client is told, so it does not reconnect, and the connection closes too.
    Closing it also ends the socket for a client that missed the DISCONNECT
    (the stock client ignores one that arrives before its connect() has
    returned, and would believe itself connected)."""
    socket.disconnect()
    socket.session.close(reason)


def _quiet_failure(failure: Failure) -> None:
    if failure.check(ApiError):
        _log.info("A realtime task failed: {error}", error=failure.getErrorMessage())
        return
    _log.failure("A realtime task failed", failure)
