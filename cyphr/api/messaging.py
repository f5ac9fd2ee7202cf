"""/api/messaging and /api/chats: messages, chats, groups and members."""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any

from klein import Klein

from cyphr.api.guard import authenticated
from cyphr.api.http import answer, read_json
from cyphr.clock import iso
from cyphr.errors import (
    CHAT_NOT_FOUND,
    INVALID_QUERY,
    MESSAGE_NOT_FOUND,
    BadRequest,
    NotFound,
)
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.messaging import MessagingHandler, check_payload, parse_send
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.validation import Fields, check_cyphr_id, invalid
from cyphr.wire import message_json, sent_json

HISTORY_DEFAULT, HISTORY_MAX = 50, 200
SYNC_DEFAULT, SYNC_MAX = 100, 500
CHATS_DEFAULT, CHATS_MAX = 100, 500
MAX_CURSOR = 128  # characters: an activity time and a chat id, encoded
MAX_GROUP_MEMBERS = 1000
MAX_ENCRYPTED_NAME = 4096
MAX_ENCRYPTED_SETTINGS = 65536


def _uuid_or_404(value: str, code: str, what: str) -> str:
    try:
        if len(value) == 36:
            return str(uuid.UUID(value))
    except ValueError:
        pass
    raise NotFound(f"No such {what}", code=code)


def _query_int(request: Any, name: str, minimum: int, maximum: int) -> int | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    text = values[0]
    if not text.isdigit() or len(text) > 19 or not minimum <= int(text) <= maximum:
        raise BadRequest(f"{name} must be an integer from {minimum} to {maximum}", code=INVALID_QUERY,
                         details={"field": name})
    return int(text)


def chats_cursor(after: tuple[int, str]) -> str:
    """The opaque ``nextCursor`` of a chat list page: where the next begins."""
    return base64.urlsafe_b64encode(f"{after[0]}:{after[1]}".encode("ascii")).decode("ascii").rstrip("=")


def _chats_after(request: Any) -> tuple[int, str] | None:
    """The position a ``cursor`` query parameter names (None without one);
    400 INVALID_QUERY for anything the server did not hand out."""
    values = request.args.get(b"cursor")
    if not values:
        return None
    try:
        text = values[0]
        if len(text) > MAX_CURSOR:
            raise ValueError
        activity, chat_id = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4)).decode("ascii").split(":")
        if not activity.isdigit() or len(activity) > 19 or len(chat_id) != 36:
            raise ValueError
        return int(activity), str(uuid.UUID(chat_id))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("cursor must be a nextCursor this server answered", code=INVALID_QUERY,
                         details={"field": "cursor"}) from None


class MessagingAPI:
    app = Klein()

    def __init__(self, messaging: MessagingHandler, authenticator: Authenticator, limits: RateLimits,
                 max_payload: int) -> None:
        self._messaging = messaging
        self.authenticator = authenticator
        self.limits = limits
        self._max_payload = max_payload

    @app.route("/api/messaging/send", methods=["POST"])
    @authenticated()
    async def send(self, request: Any, user: AuthUser) -> bytes:
        message = await self._messaging.send(user, **parse_send(read_json(request), self._max_payload))
        return answer(request, sent_json(message), 201)

    @app.route("/api/messaging/chat/<chat_id>", methods=["GET"])
    @authenticated()
    async def history(self, request: Any, user: AuthUser, chat_id: str) -> bytes:
        chat_id = _uuid_or_404(chat_id, CHAT_NOT_FOUND, "chat")
        before = _query_int(request, "before", 1, 2**62)
        after = _query_int(request, "after", 0, 2**62)
        if before is not None and after is not None:
            raise BadRequest("Give before or after, not both", code=INVALID_QUERY, details={"field": "after"})
        limit = _query_int(request, "limit", 1, HISTORY_MAX) or HISTORY_DEFAULT
        messages, has_more = await self._messaging.history(user, chat_id, before=before, after=after,
                                                           limit=limit)
        receipts = await self._messaging.own_receipts(user, messages)
        device = (user.cyphr_id, user.device_id)
        return answer(request, {"success": True, "messages": [message_json(m, receipts.get(m.id), device)
                                                              for m in messages], "hasMore": has_more})

    @app.route("/api/messaging/chats", methods=["GET"])
    @authenticated()
    async def chats(self, request: Any, user: AuthUser) -> bytes:
        """A page of the caller's chats, newest activity first: without a
        cursor the first (the original call, whose answer keeps its shape),
        with ``cursor`` the one after the page that answered it."""
        after = _chats_after(request)
        limit = _query_int(request, "limit", 1, CHATS_MAX) or CHATS_DEFAULT
        page = await self._messaging.chats(user, limit, after)
        return answer(request, {"success": True, "chats": [{
            "chatId": summary.chat.id,
            "chatType": summary.chat.chat_type,
            "participants": summary.participants,
            "encryptedName": summary.chat.encrypted_name,
            "lastMessageAt": iso(summary.chat.last_message_at),
            "unreadCount": summary.unread,
            "role": summary.role,
        } for summary in page.chats],
            "nextCursor": chats_cursor(page.next_after) if page.next_after is not None else None})

    @app.route("/api/messaging/sync", methods=["GET"])
    @authenticated()
    async def sync(self, request: Any, user: AuthUser) -> bytes:
        since = _query_int(request, "since", 0, 2**62) or 0
        limit = _query_int(request, "limit", 1, SYNC_MAX) or SYNC_DEFAULT
        messages, has_more = await self._messaging.sync(user, since, limit)
        receipts = await self._messaging.own_receipts(user, messages)
        cursor = messages[-1].stream_position if messages else since
        device = (user.cyphr_id, user.device_id)
        return answer(request, {"success": True, "messages": [message_json(m, receipts.get(m.id), device)
                                                              for m in messages],
                                "cursor": cursor, "hasMore": has_more})

    @app.route("/api/messaging/create-group", methods=["POST"])
    @authenticated()
    async def create_group(self, request: Any, user: AuthUser) -> bytes:
        fields = Fields(read_json(request), {"encryptedName", "members", "encryptedSettings"})
        members = fields.list("members", max_items=MAX_GROUP_MEMBERS)
        for index, member in enumerate(members):
            check_cyphr_id(member, f"members[{index}]")
        chat_id = await self._messaging.create_group(
            user, members,
            fields.text("encryptedName", required=False, max_length=MAX_ENCRYPTED_NAME),
            fields.text("encryptedSettings", required=False, max_length=MAX_ENCRYPTED_SETTINGS))
        return answer(request, {"success": True, "chatId": chat_id}, 201)

    @app.route("/api/messaging/message/<message_id>", methods=["PUT"])
    @authenticated()
    async def edit(self, request: Any, user: AuthUser, message_id: str) -> bytes:
        message_id = _uuid_or_404(message_id, MESSAGE_NOT_FOUND, "message")
        fields = Fields(read_json(request), {"encryptedPayload"})
        message = await self._messaging.edit(user, message_id, check_payload(fields.value("encryptedPayload"), self._max_payload))
        return answer(request, {"success": True, "message": message_json(message)})

    @app.route("/api/messaging/message/<message_id>", methods=["DELETE"])
    @authenticated()
    async def delete(self, request: Any, user: AuthUser, message_id: str) -> bytes:
        message_id = _uuid_or_404(message_id, MESSAGE_NOT_FOUND, "message")
        Fields(read_json(request, required=False), set())
        message = await self._messaging.delete(user, message_id)
        return answer(request, {"success": True, "message": message_json(message)})


class ChatsAPI:
    app = Klein()

    def __init__(self, messaging: MessagingHandler, authenticator: Authenticator, limits: RateLimits) -> None:
        self._messaging = messaging
        self.authenticator = authenticator
        self.limits = limits

    @app.route("/api/chats/<chat_id>/members", methods=["GET"])
    @authenticated()
    async def members(self, request: Any, user: AuthUser, chat_id: str) -> bytes:
        members = await self._messaging.members(user, _uuid_or_404(chat_id, CHAT_NOT_FOUND, "chat"))
        return answer(request, {"success": True, "members": [
            {"cyphrId": m.cyphr_id, "role": m.role, "joinedAt": iso(m.joined_at)} for m in members]})

    @app.route("/api/chats/<chat_id>/members/<cyphr_id>", methods=["POST"])
    @authenticated()
    async def add_member(self, request: Any, user: AuthUser, chat_id: str, cyphr_id: str) -> bytes:
        Fields(read_json(request, required=False), set())
        await self._messaging.add_member(user, _uuid_or_404(chat_id, CHAT_NOT_FOUND, "chat"),
                                         check_cyphr_id(cyphr_id))
        return answer(request, {"success": True})

    @app.route("/api/chats/<chat_id>/members/<cyphr_id>", methods=["DELETE"])
    @authenticated()
    async def remove_member(self, request: Any, user: AuthUser, chat_id: str, cyphr_id: str) -> bytes:
        Fields(read_json(request, required=False), set())
        await self._messaging.remove_member(user, _uuid_or_404(chat_id, CHAT_NOT_FOUND, "chat"),
                                            check_cyphr_id(cyphr_id))
        return answer(request, {"success": True})

    @app.route("/api/chats/<chat_id>/members/<cyphr_id>/role", methods=["PUT"])
    @authenticated()
    async def set_role(self, request: Any, user: AuthUser, chat_id: str, cyphr_id: str) -> bytes:
        fields = Fields(read_json(request), {"role"})
        role = fields.text("role", max_length=16)
        if role not in ("admin", "member"):
            raise invalid("role", "role must be admin or member")
        await self._messaging.set_role(user, _uuid_or_404(chat_id, CHAT_NOT_FOUND, "chat"),
                                       check_cyphr_id(cyphr_id), role)
        return answer(request, {"success": True})
