"""
Cyphr's realtime events (API.md, "Realtime") on the Socket.IO layer:
authentication, rooms, messages and their receipts, typing, presence, call
signalling, offline catch-up, and fan-out to the other nodes over the bus.

Rooms: ``user:<cyphrId>`` holds a user's sockets, ``chat:<chatId>`` the
sockets of a chat's members. Every event is checked against the database
or against room membership, which follows the database (joins and leaves
are broadcast to every node).

Order: messages pass through the chat's feed (cyphr.realtime.feeds), so
that every socket sees its chats in seq order without gaps. A socket that
comes back first gets what it has not acknowledged as
delivered (the catch-up), then ``sync_complete``; what arrives live during
the catch-up is held and sent after it, without duplicates.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cyphr.clock import iso, now_ms
from cyphr.errors import (
    CHAT_NOT_FOUND,
    INTERNAL_ERROR,
    INVALID_BODY,
    MESSAGE_NOT_FOUND,
    RATE_LIMITED,
    TOKEN_EXPIRED,
    UNAUTHORIZED,
    USER_NOT_FOUND,
    ApiError,
    BadRequest,
    NotFound,
    Unauthorized,
)
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.messaging import MessagingHandler, parse_send
from cyphr.handlers.validation import Fields, invalid
from cyphr.realtime.bus import Bus, LocalBus
from cyphr.realtime.codec import EVENT, SocketPacket, encode_packet
from cyphr.realtime.feeds import ChatFeeds, message_text, new_message_frames
from cyphr.realtime.presence import Presence
from cyphr.realtime.socketio import (
    ConnectRefused,
    RateExceeded,
    Socket,
    SocketServer,
    UnknownEvent,
)
from cyphr.store.chats import ChatStore
from cyphr.store.identities import IdentityStore
from cyphr.store.messages import Message, MessageStore

_log = Logger()

AUTH_TIMEOUT = 10.0          # seconds an unauthenticated socket may stay
CATCH_UP_PAGE = 200          # messages per catch-up query
MAX_NAMED_CHATS = 500        # beyond this, the catch-up query does not list the chats
HEARTBEAT = 15.0             # seconds between a node's heartbeats on the bus
NODE_SILENCE = 60.0          # a node silent this long has its presence forgotten
PARTNER_CACHE = 60.0         # seconds "these two share a chat" is believed
CALL_TYPES = ("audio", "video")
_FIRST = ("00000000-0000-0000-0000-000000000000", -1)


class Client:
    """What a socket is, to Cyphr."""

    __slots__ = ("auth_timer", "catching_up", "expiry_timer", "seen", "user", "welcomed")

    def __init__(self) -> None:
        self.user: AuthUser | None = None
        self.auth_timer: Any = None
        self.expiry_timer: Any = None  # ends the socket when its token expires
        self.welcomed = False
        # While catching up: the live messages that arrive meanwhile.
        self.catching_up: list[tuple[str, int, list[str | bytes]]] | None = None
        # chat -> the highest seq the catch-up sent (live ones up to it are dropped).
        self.seen: dict[str, int] | None = None


def _ok(**fields: Any) -> dict[str, Any]:
    return {"success": True, **fields}


def _frames(event: str, data: Any) -> list[str | bytes]:
    return encode_packet(SocketPacket(EVENT, "/", [event, data]))


def _body(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadRequest("The event's data must be a JSON object", code=INVALID_BODY)
    return data


class Realtime:
    def __init__(self, *, sockets: SocketServer, authenticator: Authenticator,
                 messaging: MessagingHandler, chats: ChatStore, messages: MessageStore,
                 identities: IdentityStore, bus: Bus, clock: Any, max_payload: int,
                 reactor: Any = None) -> None:
        self.sockets = sockets
        self._authenticator = authenticator
        self._messaging = messaging
        self._chats = chats
        self._messages = messages
        self._identities = identities
        self.bus = bus
        self._single_node = isinstance(bus, LocalBus)
        self._clock = clock
        # Business time (timeouts, lastSeen) comes from the clock; "soon"
        # (the next turn, a short wait) from the reactor.
        self._reactor = reactor if reactor is not None else clock
        self._max_payload = max_payload
        self.presence = Presence(clock)
        self.feeds = ChatFeeds(messages, self._reactor, self._deliver, self._spawn)
        self._partners: dict[tuple[str, str], float] = {}
        # Every socket whose token was accepted, from that moment (before its
        # welcome), by user and by token: ending sessions finds them here,
        # including those not yet in their ``user:`` room.
        self._by_user: dict[str, set[Socket]] = {}
        self._by_jti: dict[str, set[Socket]] = {}
        # How many times sessions were ended here (by this node or the bus):
        # see _check_token.
        self._endings = 0
        self._heartbeat: Any = None
        # For metrics: first delivery receipts and read marks recorded here.
        self.delivered_count = 0
        self.read_count = 0

        ns = self.ns = sockets.namespace("/")
        ns.connect_handler = self._connect
        ns.connected_handler = self._connected
        ns.disconnect_handler = self._disconnected
        ns.error_ack = self._error_ack
        ns.on("authenticate", self._authenticate)
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
            ns.on(event, self._signed_in(handler))
        messaging.listener = self
        bus.on_event = self._bus_event
        bus.on_restored = self._bus_restored
        bus.on_listening = self._hello
        self._started = False
        self._said_hello = False

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Start once the database is ready (events go out through it)."""
        self._started = True
        self._hello()
        self._heartbeat = self._clock.callLater(HEARTBEAT, self._beat)

    def _hello(self) -> None:
        # Asks the other nodes who is online there; they answer on the bus,
        # so it waits until this node listens too.
        if self._started and self.bus.listening and not self._said_hello:
            self._said_hello = True
            self._publish({"t": "hello", "n": self.bus.node_id})

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
            self._publish({"t": "h", "n": self.bus.node_id})
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
        if not users:
            return
        now = now_ms(self._clock)
        for user in users:
            self._spawn(self._identities.set_last_seen(user, now))
            self._spawn(self._announce(user, {"userId": user, "lastSeen": iso(now)}, "user_offline",
                                       here_only=True))

    def stats(self) -> dict[str, int]:
        return {"connections": self.presence.connections, "users": self.presence.users}

    def is_online(self, cyphr_id: str) -> bool:
        return self.presence.is_online(cyphr_id)

    # -- authentication -------------------------------------------------------

    async def _connect(self, socket: Socket, auth: Any) -> None:
        client = socket.state = Client()
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
        self._by_user.setdefault(user.cyphr_id, set()).add(socket)
        self._by_jti.setdefault(user.jti, set()).add(socket)
        delay = max(0.0, user.expires_at - self._clock.seconds())
        client.expiry_timer = self._clock.callLater(delay, self._token_expired, socket)

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

    @staticmethod
    def _token_expired(socket: Socket) -> None:
        _end_socket(socket, "session token expired")

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
            positions = await self._chats.chat_positions(me)
        except ApiError:
            socket.session.close("database unavailable")
            return
        if not socket.connected:
            return  # ended meanwhile (logout, expiry): no rooms, no presence
        socket.join("user:" + me)
        behind = []  # chats with messages past what this user acknowledged
        for chat_id, last_seq, delivered in positions:
            self._join(socket, chat_id, last_seq)
            if last_seq > delivered:
                behind.append(chat_id)
        if self.presence.add(me, socket):
            self._publish({"t": "p", "n": self.bus.node_id, "u": me, "o": 1})
            if not self.presence.elsewhere(me):
                self._spawn(self._announce(me, {"userId": me}, "user_online"))
        socket.emit("authenticated", {"userId": me, "cyphrId": me})
        try:
            await self._catch_up(socket, me, behind)
        except ApiError:
            socket.session.close("database unavailable")
            return
        except Exception:
            _log.failure("A catch-up failed")  # who it was is not for the log
            socket.session.close("server error")
            return

    async def _catch_up(self, socket: Socket, me: str, behind: list[str]) -> None:
        """Push what ``me`` has not acknowledged, in the chats ``behind``
        (any chat whose newest message is past the member's delivered
        mark; the others have nothing to push)."""
        client: Client = socket.state
        cursor = await self._messages.stream_position()
        after = _FIRST
        seen: dict[str, int] = {}
        chats = sorted(behind) if len(behind) <= MAX_NAMED_CHATS else None
        while socket.connected and behind:
            page = await self._messages.undelivered(me, after, CATCH_UP_PAGE, chats)
            if not socket.connected:
                return
            for message in page:
                socket.send_frames(new_message_frames(message_text(message)))
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
        socket.emit("sync_complete", {"cursor": cursor})

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
            now = now_ms(self._clock)
            self._publish({"t": "p", "n": self.bus.node_id, "u": me, "o": 0})
            self._spawn(self._identities.set_last_seen(me, now))
            if not self.presence.elsewhere(me):
                self._spawn(self._announce(me, {"userId": me, "lastSeen": iso(now)}, "user_offline"))

    async def _announce(self, me: str, data: dict[str, Any], event: str, *,
                        here_only: bool = False) -> None:
        """Tell everyone who shares a chat with ``me``, on every node (or,
        ``here_only``, on this one)."""
        partners = await self._chats.partners(me)
        if here_only:
            self._emit_local(["user:" + u for u in partners], event, data, None)
        else:
            self.emit_to_users(partners, event, data)

    # -- events ---------------------------------------------------------------

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
            return await handler(socket, user, data)
        return guarded

    async def _send_message(self, socket: Socket, user: AuthUser, data: Any = None) -> dict[str, Any]:
        arguments = parse_send(_body(data), self._max_payload)
        message = await self._messaging.send(user, origin=socket, **arguments)
        return _ok(messageId=message.id, chatId=message.chat_id, seq=message.seq,
                   timestamp=iso(message.created_at))

    async def _member_message(self, user: AuthUser, body: dict[str, Any]) -> Message:
        fields = Fields(body, body.keys())
        message_id = fields.uuid("messageId")
        chat_id = fields.uuid("chatId") if body.get("chatId") is not None else None
        message = await self._messages.by_id_for_member(message_id, user.cyphr_id)
        if message is None or (chat_id is not None and message.chat_id != chat_id):
            raise NotFound("No such message", code=MESSAGE_NOT_FOUND)
        return message

    async def _message_delivered(self, socket: Socket, user: AuthUser, data: Any = None) -> dict[str, Any]:
        message = await self._member_message(user, _body(data))
        if message.sender_id != user.cyphr_id:
            now = now_ms(self._clock)
            first = await self._chats.mark_delivered(message.chat_id, message.id, user.cyphr_id, now,
                                                     seq=message.seq)
            if first:  # the sender hears of it once, whichever socket says it
                self.delivered_count += 1
                self.emit_to_users([message.sender_id], "message_delivered", {
                    "messageId": message.id, "chatId": message.chat_id, "userId": user.cyphr_id,
                    "at": iso(now)})
        return _ok(messageId=message.id, chatId=message.chat_id)

    async def _message_read(self, socket: Socket, user: AuthUser, data: Any = None) -> dict[str, Any]:
        body = _body(data)
        now = now_ms(self._clock)
        if body.get("messageId") is not None:
            message = await self._member_message(user, body)
            if message.sender_id != user.cyphr_id:
                await self._chats.mark_message_read(message.chat_id, message.id, user.cyphr_id, now)
                self.read_count += 1
                self.emit_to_users([message.sender_id], "message_read", {
                    "messageId": message.id, "chatId": message.chat_id, "userId": user.cyphr_id,
                    "at": iso(now)})
            return _ok(messageId=message.id, chatId=message.chat_id)
        fields = Fields(body, body.keys())
        chat_id = fields.uuid("chatId")
        up_to = fields.integer("upToSeq", minimum=0, maximum=2**62)
        assert up_to is not None
        membership = await self._chats.membership(chat_id, user.cyphr_id)
        if membership is None:
            raise NotFound("No such chat", code=CHAT_NOT_FOUND)
        up_to = min(up_to, membership.chat.last_seq)
        senders = await self._chats.unread_senders(chat_id, user.cyphr_id, up_to)
        await self._chats.mark_read(chat_id, user.cyphr_id, up_to)
        self.read_count += 1
        if senders:
            self.emit_to_users(senders, "message_read", {
                "upToSeq": up_to, "chatId": chat_id, "userId": user.cyphr_id, "at": iso(now)})
        return _ok(chatId=chat_id, upToSeq=up_to)

    async def _typing(self, socket: Socket, user: AuthUser, data: Any = None) -> dict[str, Any]:
        body = _body(data)
        fields = Fields(body, body.keys())
        chat_id = fields.uuid("chatId")
        typing = body.get("isTyping", True)
        if not isinstance(typing, bool):
            raise invalid("isTyping", "isTyping must be true or false")
        if "chat:" + chat_id not in socket.rooms:
            raise NotFound("No such chat", code=CHAT_NOT_FOUND)
        self.emit_to_rooms(["chat:" + chat_id], "user_typing", {
            "chatId": chat_id, "userId": user.cyphr_id, "isTyping": typing}, skip_user=user.cyphr_id)
        return _ok()

    async def _join_chat(self, socket: Socket, user: AuthUser, data: Any = None) -> dict[str, Any]:
        body = _body(data)
        chat_id = Fields(body, body.keys()).uuid("chatId")
        membership = await self._chats.membership(chat_id, user.cyphr_id)
        if membership is None:
            raise NotFound("No such chat", code=CHAT_NOT_FOUND)
        if socket.connected:
            self._join(socket, chat_id, membership.chat.last_seq)
        return _ok(chatId=chat_id)

    async def _call_target(self, user: AuthUser, body: dict[str, Any]) -> tuple[Fields, str, str]:
        fields = Fields(body, body.keys())
        call_id = fields.text("callId", max_length=128)
        to = fields.cyphr_id("to")
        assert call_id is not None and to is not None
        if to == user.cyphr_id or not await self._share_a_chat(user.cyphr_id, to):
            # Strangers cannot ring each other, nor learn who exists.
            raise NotFound("No such user", code=USER_NOT_FOUND, details={"to": to})
        return fields, call_id, to

    async def _share_a_chat(self, a: str, b: str) -> bool:
        key = (a, b) if a < b else (b, a)
        now = self._clock.seconds()
        at = self._partners.get(key)
        if at is not None and now - at < PARTNER_CACHE:
            return True
        if not await self._chats.share_a_chat(a, b):
            return False
        if len(self._partners) > 100_000:
            self._partners.clear()
        self._partners[key] = now
        return True

    def _relay(self, to: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
        if not self.emit_to_users([to], event, data):
            raise ApiError("The event is too large to relay", code="PAYLOAD_TOO_LARGE", status=413)
        return _ok()

    async def _call_offer(self, socket: Socket, user: AuthUser, data: Any = None) -> dict[str, Any]:
        body = _body(data)
        fields, call_id, to = await self._call_target(user, body)
        call_type = fields.text("callType", required=False, max_length=16) or "audio"
        if call_type not in CALL_TYPES:
            raise invalid("callType", "callType must be audio or video")
        offer = fields.value("offer")
        return self._relay(to, "incoming_call", {
            "callId": call_id, "from": user.cyphr_id, "offer": offer, "callType": call_type})

    async def _call_answer(self, socket: Socket, user: AuthUser, data: Any = None) -> dict[str, Any]:
        fields, call_id, to = await self._call_target(user, _body(data))
        return self._relay(to, "call_answer", {
            "callId": call_id, "from": user.cyphr_id, "answer": fields.value("answer")})

    async def _call_ice_candidate(self, socket: Socket, user: AuthUser, data: Any = None) -> dict[str, Any]:
        fields, call_id, to = await self._call_target(user, _body(data))
        return self._relay(to, "call_ice_candidate", {
            "callId": call_id, "from": user.cyphr_id, "candidate": fields.value("candidate")})

    async def _call_end(self, socket: Socket, user: AuthUser, data: Any = None) -> dict[str, Any]:
        fields, call_id, to = await self._call_target(user, _body(data))
        reason = fields.text("reason", required=False, max_length=64)
        return self._relay(to, "call_end", {
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

    # -- emitting, here and on the other nodes ----------------------------------

    def emit_to_users(self, users: list[str], event: str, data: dict[str, Any]) -> bool:
        return self.emit_to_rooms(["user:" + u for u in users], event, data)

    def emit_to_rooms(self, rooms: list[str], event: str, data: dict[str, Any],
                      skip_user: str | None = None) -> bool:
        """Emit to these rooms' sockets on every node, once per socket.
        False if the event was too large for the other nodes (it still
        reached this node's sockets)."""
        self._emit_local(rooms, event, data, skip_user)
        published = True
        for start in range(0, len(rooms), 100):
            envelope = {"t": "e", "r": rooms[start:start + 100], "e": event, "d": data}
            if skip_user is not None:
                envelope["u"] = skip_user
            published = self._publish(envelope) and published
        return published

    def _emit_local(self, rooms: list[str], event: str, data: Any, skip_user: str | None) -> None:
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

    def _publish(self, event: dict[str, Any]) -> bool:
        if self._single_node:
            return True
        try:
            self.bus.publish(event)
        except ValueError:
            return False
        return True

    @staticmethod
    def _spawn(coroutine: Any) -> None:
        ensureDeferred(coroutine).addErrback(_quiet_failure)

    # -- rooms and feeds --------------------------------------------------------

    def _join(self, socket: Socket, chat_id: str, last_seq: int) -> None:
        socket.join("chat:" + chat_id)
        self.feeds.open(chat_id, last_seq)

    def _joined(self, chat_id: str, cyphr_id: str, last_seq: int) -> None:
        for socket in list(self.presence.sockets(cyphr_id)):
            if socket.connected:
                self._join(socket, chat_id, last_seq)

    def _left(self, chat_id: str, cyphr_id: str) -> None:
        room = "chat:" + chat_id
        for socket in list(self.presence.sockets(cyphr_id)):
            socket.leave(room)
        if not self.ns.room_size(room):
            self.feeds.close(chat_id)

    def end_sessions(self, cyphr_id: str, jti: str | None = None) -> None:
        """The user logged out (``jti``: that token's sockets), recovered its
        identity on a new device or deleted it (every socket): on every node,
        its sockets are disconnected."""
        self._end_sessions(cyphr_id, jti)
        self._publish({"t": "k", "u": cyphr_id, "j": jti})

    def _end_sessions(self, cyphr_id: str, jti: str | None) -> None:
        # Here and from the bus alike: every registered socket of the token
        # (or of the user), welcomed or still in its welcome.
        self._endings += 1
        sockets = self._by_user.get(cyphr_id, ()) if jti is None else self._by_jti.get(jti, ())
        for socket in list(sockets):
            user = socket.state.user
            if user is not None and user.cyphr_id == cyphr_id:
                _end_socket(socket, "session ended")

    # MessagingListener: what the REST routes and the events change.

    def member_joined(self, chat_id: str, cyphr_id: str, last_seq: int = 0) -> None:
        self._joined(chat_id, cyphr_id, last_seq)
        self._publish({"t": "j", "c": chat_id, "u": cyphr_id, "s": last_seq})

    def member_left(self, chat_id: str, cyphr_id: str) -> None:
        self._left(chat_id, cyphr_id)
        self._publish({"t": "l", "c": chat_id, "u": cyphr_id})

    def message_stored(self, message: Message, origin: Any) -> None:
        as_json = message_text(message)
        self.feeds.arrive(message.chat_id, message.seq, as_json, origin)
        if self._single_node:
            return
        event = {"t": "m", "c": message.chat_id, "s": message.seq, "m": as_json}
        try:
            self.bus.publish(event)
        except ValueError:
            del event["m"]  # too large: the other nodes fetch it
            self._publish(event)

    # -- delivery: what a feed hands on, to the chat's sockets here ------------

    def _deliver(self, chat_id: str, seq: int, message: str, origin: Socket | None) -> None:
        members = self.ns.rooms.get("chat:" + chat_id)
        if not members:
            return
        frames = new_message_frames(message)
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

    # -- the bus ----------------------------------------------------------------

    def _bus_event(self, event: dict[str, Any]) -> None:
        kind = event.get("t")
        node = event.get("n", "")
        if node:
            self.presence.heard(node)
        if kind == "m":
            chat_id, seq = event["c"], event["s"]
            if isinstance(event.get("m"), str):
                self.feeds.arrive(chat_id, seq, event["m"])
            else:
                self.feeds.fetch(chat_id, seq)
        elif kind == "e":
            self._emit_local(event["r"], event["e"], event["d"], event.get("u"))
        elif kind == "j":
            self._joined(event["c"], event["u"], event.get("s", 0))
        elif kind == "l":
            self._left(event["c"], event["u"])
        elif kind == "k":
            self._end_sessions(event["u"], event.get("j"))
        elif kind == "p" and node:
            if event.get("o"):
                self.presence.remote_online(node, event["u"])
            else:
                self.presence.remote_offline(node, event["u"])
        elif kind == "P" and node:
            for user in event.get("us", ()):
                self.presence.remote_online(node, user)
        elif kind == "hello":
            self._announce_users()

    def _announce_users(self) -> None:
        users = list(self.presence.local)
        for start in range(0, len(users), 200):
            self._publish({"t": "P", "n": self.bus.node_id, "us": users[start:start + 200]})

    def _bus_restored(self) -> None:
        """The bus was down: others may have missed our presence, and our
        feeds may have missed messages. Catch up on both."""
        self._announce_users()
        self.feeds.resync()


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

