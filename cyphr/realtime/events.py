"""
Cyphr's realtime events on the Socket.IO layer, as the AsyncAPI document
describes them (cyphr/api/asyncapi.json, served at /api/asyncapi.json).

Each event is one short method: parse, call the handler that holds the
rule (the same one the REST route calls), fan the outcome out, answer the
ack. What this module keeps for itself is what only a socket has: its
session (the token it was accepted with, its expiry), its welcome (rooms,
presence, the offline catch-up) and the pacing of what goes out to it.

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

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cyphr.changes import ChangeFeed, MemberJoined, MemberLeft, MessageStored, SessionsEnded
from cyphr.clock import iso, now_ms
from cyphr.errors import (
    INTERNAL_ERROR,
    INVALID_BODY,
    RATE_LIMITED,
    TOKEN_EXPIRED,
    UNAUTHORIZED,
    ApiError,
    BadRequest,
    Unauthorized,
)
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.calls import CALL_TYPES, CallsHandler
from cyphr.handlers.delivery import CATCH_UP_PAGE, DeliveryHandler
from cyphr.handlers.messaging import MessagingHandler, parse_send
from cyphr.handlers.receipts import Receipt, ReceiptsHandler
from cyphr.handlers.validation import Fields, invalid
from cyphr.realtime.bus import Bus
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
    RateExceeded,
    Socket,
    SocketServer,
    UnknownEvent,
)
from cyphr.wire import message_text, receipt_json, sent_json

_log = Logger()

AUTH_TIMEOUT = 10.0          # seconds an unauthenticated socket may stay
HEARTBEAT = 15.0             # seconds between a node's heartbeats on the bus
NODE_SILENCE = 60.0          # a node silent this long has its presence forgotten

Frames = list[str | bytes]


class Sent:
    """The name of every event the server sends. The code below emits these
    and no other, and tests.test_asyncapi checks that the AsyncAPI document
    (cyphr/api/asyncapi.json) describes exactly these (SENT_EVENTS)."""

    AUTHENTICATED = "authenticated"
    NEW_MESSAGE = "new_message"
    SYNC_COMPLETE = "sync_complete"
    MESSAGE_DELIVERED = "message_delivered"
    MESSAGE_READ = "message_read"
    USER_TYPING = "user_typing"
    USER_ONLINE = "user_online"
    USER_OFFLINE = "user_offline"
    INCOMING_CALL = "incoming_call"
    CALL_ANSWER = "call_answer"
    CALL_ICE_CANDIDATE = "call_ice_candidate"
    CALL_END = "call_end"


SENT_EVENTS = frozenset(value for name, value in vars(Sent).items() if name.isupper())


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


def _ok(**fields: Any) -> dict[str, Any]:
    return {"success": True, **fields}


def _frames(event: str, data: Any) -> Frames:
    return encode_packet(SocketPacket(EVENT, "/", [event, data]))


def _new_message_frames(text: str) -> Frames:
    return encode_event_json(Sent.NEW_MESSAGE, '{"message":' + text + "}")


def _body(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadRequest("The event's data must be a JSON object", code=INVALID_BODY)
    return data


class Realtime:
    def __init__(self, *, sockets: SocketServer, authenticator: Authenticator,
                 messaging: MessagingHandler, receipts: ReceiptsHandler, calls: CallsHandler,
                 delivery: DeliveryHandler, presence: Presence, bus: Bus, changes: ChangeFeed,
                 clock: Any, reactor: Any, max_payload: int) -> None:
        self.sockets = sockets
        self._authenticator = authenticator
        self._messaging = messaging
        self._receipts = receipts
        self._calls = calls
        self._delivery = delivery
        self.presence = presence
        self._bus = bus
        self._clock = clock
        # Business time (timeouts, lastSeen) comes from the clock; "soon"
        # (the next turn, a short wait) from the reactor.
        self._reactor = reactor
        self._max_payload = max_payload
        # What _spawn began and has not finished (last_seen writes,
        # announcements, feed fills): the stop waits for them (tasks_done).
        self._tasks: set[Deferred[Any]] = set()
        self.feeds = ChatFeeds(delivery, reactor, self._deliver, self._spawn)
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
                                    disconnected=self._disconnected, error_ack=self._error_ack)
        self.ns.on("authenticate", self._authenticate)
        for event, handler in (
            ("send_message", self._send_message),
            ("message_delivered", self._message_delivered),
            ("message_read", self._message_read),
            ("typing", self._typing),
            ("join_chat", self._join_chat),
            ("call_offer", self._call_offer),
            ("call_answer", self._call_answer),
            ("call_ice_candidate", self._call_ice_candidate),
            ("call_end", self._call_end),
        ):
            self.ns.on(event, self._signed_in(handler))
        self.fanout = FanOut(bus, self)
        changes.subscribe(MessageStored, self._message_stored)
        changes.subscribe(MemberJoined, lambda c: self.fanout.join(c.chat_id, c.cyphr_id, c.last_seq))
        changes.subscribe(MemberLeft, lambda c: self.fanout.leave(c.chat_id, c.cyphr_id))
        changes.subscribe(SessionsEnded, lambda c: self.fanout.end_sessions(c.cyphr_id, c.jti))

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
                "realtime_chat_feeds": len(self.feeds), "realtime_tasks": len(self._tasks)}

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
        body = _body(data)
        if client.user is not None:
            return _ok(userId=client.user.cyphr_id, cyphrId=client.user.cyphr_id)
        token = body.get("token")
        if not isinstance(token, str) or not token:
            # The original {userId, publicKey} proves nothing.
            raise Unauthorized("Authenticate with a session token", code=UNAUTHORIZED)
        user = await self._check_token(token)
        if client.user is not None or not socket.connected:
            return _ok(userId=user.cyphr_id, cyphrId=user.cyphr_id)
        self._register(socket, user)  # with no await since the check: see _check_token
        if client.auth_timer is not None and client.auth_timer.active():
            client.auth_timer.cancel()
        client.auth_timer = None
        # The ack first, then the welcome (rooms, catch-up).
        self._reactor.callLater(0, self._start_welcome, socket)
        return _ok(userId=user.cyphr_id, cyphrId=user.cyphr_id)

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
            positions = await self._delivery.positions(me)
        except ApiError:
            socket.session.close("database unavailable")
            return
        if not socket.connected:
            return  # ended meanwhile (logout, expiry): no rooms, no presence
        socket.join("user:" + me)
        for chat_id, last_seq in positions.chats:
            self._join(socket, chat_id, last_seq)
        if self.presence.add(me, socket):
            self.fanout.publish(PresenceChanged(self.fanout.node_id, me, True))
            if not self.presence.elsewhere(me):
                self._spawn(self._announce(me, Sent.USER_ONLINE, {"userId": me}))
        socket.emit(Sent.AUTHENTICATED, {"userId": me, "cyphrId": me})
        try:
            await self._catch_up(socket, me, positions.behind)
        except ApiError:
            socket.session.close("database unavailable")
        except Exception:
            _log.failure("A catch-up failed")  # who it was is not for the log
            socket.session.close("server error")

    async def _catch_up(self, socket: Socket, me: str, behind: tuple[str, ...]) -> None:
        """Push what ``me`` has not acknowledged, in the chats ``behind``
        (any chat whose newest message is past the member's delivered
        mark; the others have nothing to push)."""
        client: Client = socket.state
        cursor = await self._delivery.cursor()
        after: tuple[str, int] | None = None
        seen: dict[str, int] = {}
        while socket.connected and behind:
            page = await self._delivery.undelivered_page(me, after, behind)
            if not socket.connected:
                return
            for message in page:
                socket.send_frames(_new_message_frames(message_text(message)))
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
        me = user.cyphr_id
        if self.presence.remove(me, socket):
            self.fanout.publish(PresenceChanged(self.fanout.node_id, me, False))
            self._went_offline(me, here_only=False)

    def _went_offline(self, me: str, *, here_only: bool) -> None:
        """``me`` has no socket left (here, or on a silent node): record its
        last_seen and, unless it is online elsewhere, say so."""
        now = now_ms(self._clock)
        self._spawn(self._delivery.went_offline(me))  # records the same now
        if here_only or not self.presence.elsewhere(me):
            self._spawn(self._announce(me, Sent.USER_OFFLINE, {"userId": me, "lastSeen": iso(now)},
                                       here_only=here_only))

    async def _announce(self, me: str, event: str, data: dict[str, Any], *,
                        here_only: bool = False) -> None:
        """Tell everyone who shares a chat with ``me``, on every node (or,
        ``here_only``, on this one)."""
        partners = await self._delivery.partners(me)
        rooms = ["user:" + u for u in partners]
        if here_only:
            self.emit_here(rooms, event, data, None)
        else:
            self.fanout.to_rooms(rooms, event, data)

    # -- events: parse, handler, fan-out, ack ------------------------------------

    def _signed_in(self, handler: Any) -> Any:
        # One optional argument, as every signed-in event takes: the
        # namespace reads this signature to refuse extra arguments (400).
        async def guarded(socket: Socket, data: Any = None) -> Any:
            client: Client = socket.state
            user = client.user
            if user is None:
                raise Unauthorized("Authenticate first", code=UNAUTHORIZED)
            if user.expires_at <= self._clock.seconds():
                # Refused whether or not the expiry timer (which ends the
                # socket) has run yet: a busy reactor may run it late.
                raise Unauthorized("The session token has expired", code=TOKEN_EXPIRED)
            return await handler(socket, user, _body(data))
        return guarded

    async def _send_message(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        message = await self._messaging.send(user, origin=socket, **parse_send(body, self._max_payload))
        return sent_json(message)

    async def _message_delivered(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        message_id, chat_id = _message_ref(body)
        receipt = await self._receipts.delivered(user, message_id, chat_id)
        self._tell(receipt, Sent.MESSAGE_DELIVERED)
        return _ok(messageId=receipt.message_id, chatId=receipt.chat_id)

    async def _message_read(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("messageId") is not None:
            message_id, chat_id = _message_ref(body)
            receipt = await self._receipts.read(user, message_id, chat_id)
            self._tell(receipt, Sent.MESSAGE_READ)
            return _ok(messageId=receipt.message_id, chatId=receipt.chat_id)
        fields = Fields(body, body.keys())
        chat_id = fields.uuid("chatId")
        up_to = fields.integer("upToSeq", minimum=0, maximum=2**62)
        assert up_to is not None
        receipt = await self._receipts.read_up_to(user, chat_id, up_to)
        self._tell(receipt, Sent.MESSAGE_READ)
        return _ok(chatId=receipt.chat_id, upToSeq=receipt.up_to_seq)

    def _tell(self, receipt: Receipt, event: str) -> None:
        if receipt.tell:
            self.fanout.to_users(receipt.tell, event, receipt_json(receipt))

    async def _typing(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        fields = Fields(body, body.keys())
        chat_id = fields.uuid("chatId")
        typing = body.get("isTyping", True)
        if not isinstance(typing, bool):
            raise invalid("isTyping", "isTyping must be true or false")
        if "chat:" + chat_id not in socket.rooms:
            # The room is the membership the handler last said; not in it,
            # ask (a chat joined meanwhile: this socket then joins it too).
            await self._enter(socket, user, chat_id)
        self.fanout.to_rooms(["chat:" + chat_id], Sent.USER_TYPING, {
            "chatId": chat_id, "userId": user.cyphr_id, "isTyping": typing}, skip_user=user.cyphr_id)
        return _ok()

    async def _join_chat(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        chat_id = Fields(body, body.keys()).uuid("chatId")
        await self._enter(socket, user, chat_id)
        return _ok(chatId=chat_id)

    async def _enter(self, socket: Socket, user: AuthUser, chat_id: str) -> None:
        """Join ``socket`` to the chat's room if its user is a member
        (MessagingHandler.membership refuses otherwise, as for REST)."""
        membership = await self._messaging.membership(user, chat_id)
        if socket.connected:
            self._join(socket, chat_id, membership.chat.last_seq)

    async def _call_peer(self, user: AuthUser, body: dict[str, Any]) -> tuple[Fields, str, str]:
        fields = Fields(body, body.keys())
        call_id = fields.text("callId", max_length=128)
        to = fields.cyphr_id("to")
        assert call_id is not None and to is not None
        await self._calls.check_peer(user, to)
        return fields, call_id, to

    def _relay(self, to: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
        if not self.fanout.to_users([to], event, data):
            raise ApiError("The event is too large to relay", code="PAYLOAD_TOO_LARGE", status=413)
        return _ok()

    async def _call_offer(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        fields, call_id, to = await self._call_peer(user, body)
        call_type = fields.text("callType", required=False, max_length=16) or "audio"
        if call_type not in CALL_TYPES:
            raise invalid("callType", "callType must be audio or video")
        return self._relay(to, Sent.INCOMING_CALL, {
            "callId": call_id, "from": user.cyphr_id, "offer": fields.value("offer"),
            "callType": call_type})

    async def _call_answer(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        fields, call_id, to = await self._call_peer(user, body)
        return self._relay(to, Sent.CALL_ANSWER, {
            "callId": call_id, "from": user.cyphr_id, "answer": fields.value("answer")})

    async def _call_ice_candidate(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        fields, call_id, to = await self._call_peer(user, body)
        return self._relay(to, Sent.CALL_ICE_CANDIDATE, {
            "callId": call_id, "from": user.cyphr_id, "candidate": fields.value("candidate")})

    async def _call_end(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        fields, call_id, to = await self._call_peer(user, body)
        reason = fields.text("reason", required=False, max_length=64)
        return self._relay(to, Sent.CALL_END, {
            "callId": call_id, "from": user.cyphr_id, "reason": reason or "ended"})

    @staticmethod
    def _error_ack(failure: Failure) -> dict[str, Any]:
        if failure.check(ApiError):
            return failure.value.to_json()
        if failure.check(RateExceeded):
            return {"success": False, "error": "Too many events", "code": RATE_LIMITED}
        if failure.check(UnknownEvent):
            return {"success": False, "error": "Unknown event", "code": "UNKNOWN_EVENT"}
        _log.failure("Unexpected error answering an event", failure)
        return {"success": False, "error": "Internal server error", "code": INTERNAL_ERROR}

    # -- changes from the handlers ------------------------------------------------

    def _message_stored(self, change: MessageStored) -> None:
        message = change.message
        self.fanout.message(message.chat_id, message.seq, message_text(message), change.origin)

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

    def end_here(self, cyphr_id: str, jti: str | None) -> None:
        # Every registered socket of the token (or of the user), welcomed
        # or still in its welcome.
        self._endings += 1
        sockets = self._by_user.get(cyphr_id, ()) if jti is None else self._by_jti.get(jti, ())
        for socket in list(sockets):
            user = socket.state.user
            if user is not None and user.cyphr_id == cyphr_id:
                _end_socket(socket, "session ended")

    def message_here(self, chat_id: str, seq: int, text: str | None, origin: Any) -> None:
        if text is None:
            self.feeds.fetch(chat_id, seq)
        else:
            self.feeds.arrive(chat_id, seq, text, origin)

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

    def _deliver(self, chat_id: str, seq: int, message: str, origin: Socket | None) -> None:
        """What a feed hands on, to the chat's sockets here."""
        members = self.ns.rooms.get("chat:" + chat_id)
        if not members:
            return
        frames = _new_message_frames(message)
        # A copy: a socket closed on the way (slow consumer) leaves the room.
        for socket in list(members):
            if socket is origin:
                continue
            client: Client = socket.state
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


def _message_ref(body: dict[str, Any]) -> tuple[str, str | None]:
    """``{messageId, chatId?}`` (old clients leave chatId out)."""
    fields = Fields(body, body.keys())
    message_id = fields.uuid("messageId")
    chat_id = fields.uuid("chatId") if body.get("chatId") is not None else None
    assert message_id is not None
    return message_id, chat_id


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
