"""
The events a signed-in client sends. Each is one short method: parse,
call the handler that holds the rule (the same one the REST route calls),
fan the outcome out, answer the ack. New events go here; what only a
socket has (its session, its welcome and catch-up, the pacing of what goes
out to it) stays in cyphr.realtime.events.

Sent names every event the server sends, and the AsyncAPI document
(cyphr/api/asyncapi.json) is checked against it (tests.test_asyncapi).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

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
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.calls import CALL_TYPES, CallsHandler
from cyphr.handlers.messaging import MessagingHandler, parse_send
from cyphr.handlers.receipts import Receipt, ReceiptsHandler
from cyphr.handlers.validation import Fields, invalid
from cyphr.realtime.codec import EncodedJson
from cyphr.realtime.fanout import FanOut
from cyphr.realtime.socketio import Namespace, RateExceeded, Socket, UnknownEvent
from cyphr.store.messages import Message
from cyphr.wire import receipt_json, sent_text

_log = Logger()


def _send_ack(message: Message) -> EncodedJson:
    return EncodedJson(sent_text(message))


class Sent:
    """The name of every event the server sends. The realtime modules emit
    these and no other, and tests.test_asyncapi checks that the AsyncAPI document
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
    DEVICES_CHANGED = "devices_changed"
    SESSION_PREKEYS_LOW = "session_prekeys_low"


SENT_EVENTS = frozenset(value for name, value in vars(Sent).items() if name.isupper())


def ok(**fields: Any) -> dict[str, Any]:
    """A successful ack."""
    return {"success": True, **fields}


def event_body(data: Any) -> dict[str, Any]:
    """An event's data, which must be a JSON object."""
    if not isinstance(data, dict):
        raise BadRequest("The event's data must be a JSON object", code=INVALID_BODY)
    return data


def _message_ref(body: dict[str, Any]) -> tuple[str, str | None]:
    """``{messageId, chatId?}`` (old clients leave chatId out)."""
    fields = Fields(body, body.keys())
    message_id = fields.uuid("messageId")
    chat_id = fields.uuid("chatId") if body.get("chatId") is not None else None
    assert message_id is not None
    return message_id, chat_id


class ClientEvents:
    """The signed-in events of the ``/`` namespace (register). ``join``
    puts a socket in a chat's room and opens the chat's feed (the
    Realtime's, which owns rooms and feeds)."""

    def __init__(self, *, messaging: MessagingHandler, receipts: ReceiptsHandler,
                 calls: CallsHandler, fanout: FanOut, clock: Any, max_payload: int,
                 join: Callable[[Socket, str, int], None]) -> None:
        self._messaging = messaging
        self._receipts = receipts
        self._calls = calls
        self.fanout = fanout
        self._clock = clock
        self._max_payload = max_payload
        self._join = join

    def register(self, ns: Namespace) -> None:
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

    def _signed_in(self, handler: Any) -> Any:
        # One optional argument, as every signed-in event takes: the
        # namespace reads this signature to refuse extra arguments (400).
        # Not a coroutine itself: it answers the handler's coroutine or
        # Deferred, and the namespace runs either.
        def guarded(socket: Socket, data: Any = None) -> Any:
            user: AuthUser | None = socket.state.user
            if user is None:
                raise Unauthorized("Authenticate first", code=UNAUTHORIZED)
            if user.expires_at <= self._clock.seconds():
                # Refused whether or not the expiry timer (which ends the
                # socket) has run yet: a busy reactor may run it late.
                raise Unauthorized("The session token has expired", code=TOKEN_EXPIRED)
            return handler(socket, user, event_body(data))
        return guarded

    def _send_message(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> Deferred[EncodedJson]:
        # A Deferred rather than a coroutine: see MessagingHandler.send.
        sent = self._messaging.send(user, origin=socket, **parse_send(body, self._max_payload))
        return sent.addCallback(_send_ack)

    async def _message_delivered(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        message_id, chat_id = _message_ref(body)
        receipt = await self._receipts.delivered(user, message_id, chat_id)
        self._tell(receipt, Sent.MESSAGE_DELIVERED)
        return ok(messageId=receipt.message_id, chatId=receipt.chat_id)

    async def _message_read(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("messageId") is not None:
            message_id, chat_id = _message_ref(body)
            receipt = await self._receipts.read(user, message_id, chat_id)
            self._tell(receipt, Sent.MESSAGE_READ, reader_too=True)
            return ok(messageId=receipt.message_id, chatId=receipt.chat_id)
        fields = Fields(body, body.keys())
        chat_id = fields.uuid("chatId")
        up_to = fields.integer("upToSeq", minimum=0, maximum=2**62)
        assert up_to is not None
        receipt = await self._receipts.read_up_to(user, chat_id, up_to)
        self._tell(receipt, Sent.MESSAGE_READ, reader_too=True)
        return ok(chatId=receipt.chat_id, upToSeq=receipt.up_to_seq)

    def _tell(self, receipt: Receipt, event: str, *, reader_too: bool = False) -> None:
        """Tell the receipt's senders; with ``reader_too``, the reader's own
        sockets as well (read state is the user's: its other devices clear
        their unread counts; the socket that read gets its own ack too)."""
        if receipt.tell:
            users = (*receipt.tell, receipt.reader) if reader_too else receipt.tell
            self.fanout.to_users(users, event, receipt_json(receipt))

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
        return ok()

    async def _join_chat(self, socket: Socket, user: AuthUser, body: dict[str, Any]) -> dict[str, Any]:
        chat_id = Fields(body, body.keys()).uuid("chatId")
        await self._enter(socket, user, chat_id)
        return ok(chatId=chat_id)

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
        return ok()

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
    def error_ack(failure: Failure) -> dict[str, Any]:
        if failure.check(ApiError):
            return failure.value.to_json()
        if failure.check(RateExceeded):
            return {"success": False, "error": "Too many events", "code": RATE_LIMITED}
        if failure.check(UnknownEvent):
            return {"success": False, "error": "Unknown event", "code": "UNKNOWN_EVENT"}
        _log.failure("Unexpected error answering an event", failure)
        return {"success": False, "error": "Internal server error", "code": INTERNAL_ERROR}
