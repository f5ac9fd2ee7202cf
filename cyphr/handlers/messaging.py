"""
Chats and messages: sending (through group commit), history, the chat list,
sync, edits and deletions, groups and roles. A non-member learns nothing of
a chat: every refusal of that kind is 404 CHAT_NOT_FOUND, as for a chat that
does not exist.

Who may be put in a group: a user may add (at creation or later) only its
contacts, the users it has a direct chat with, as messengers let their
users refuse additions by strangers. Anyone else is 404 USER_NOT_FOUND, as
for a Cyphr ID that does not exist, so the refusal tells a stranger nothing.
Group creations and additions are rate limited per user.

A member sees a chat's messages from when it joined (its joined_seq):
history and sync never show one sent before, also to a member re-added
after leaving.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import orjson
from twisted.internet.defer import Deferred

from cyphr.changes import ChangeFeed, MemberJoined, MemberLeft, MessageStored, RoleChanged
from cyphr.clock import now_ms
from cyphr.errors import (
    ALREADY_MEMBER,
    CHAT_NOT_FOUND,
    LAST_ADMIN,
    MESSAGE_DELETED,
    MESSAGE_NOT_FOUND,
    MISSING_FIELD,
    NOT_A_GROUP,
    NOT_A_MEMBER,
    NOT_ADMIN,
    NOT_EDITABLE,
    NOT_SENDER,
    ROSTER_IN_USE,
    USER_NOT_FOUND,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.ratelimit import RateLimit
from cyphr.handlers.recipients import RecipientDevices, Sealed
from cyphr.handlers.sending import SendBatcher
from cyphr.handlers.validation import Fields, invalid
from cyphr.ids import new_uuid
from cyphr.store.chats import (
    AlreadyMember,
    ChatPage,
    ChatStore,
    LastAdmin,
    Member,
    Membership,
    MessageReceipts,
)
from cyphr.blobs import BLOB_ID
from cyphr.handlers.attachments import MAX_ATTACHMENTS_PER_MESSAGE
from cyphr.store.envelopes import KINDS as ENVELOPE_KINDS
from cyphr.store.envelopes import SealedFor
from cyphr.store.identities import IdentityStore
from cyphr.store.messages import Message, MessageStore, NotAMember, Outgoing
from cyphr.store.rosters import RosterStore

DIRECT_CHAT_CACHE = 60.0        # seconds
DIRECT_CHAT_CACHE_SIZE = 100_000
MESSAGE_TYPES = ("text", "image", "file", "audio", "video", "call", "payment", "system")
# The most devices one message may name as sealed for (cyphr.handlers.recipients).
MAX_SEALED_DEVICES = 10_000
# The largest envelope: a session message carrying a 32-byte content key,
# the handshake (about 1.8 KB) and an ML-KEM re-keying (about 3.3 KB) fits
# with room to spare.
MAX_ENVELOPE = 16 * 1024


_SEND_FIELDS = frozenset({"recipientId", "chatId", "encryptedPayload", "messageType", "clientMessageId",
                          "devices", "envelopes", "attachments"})


def parse_send(body: dict[str, Any], max_payload: int) -> dict[str, Any]:
    """The arguments of MessagingHandler.send from a send request's JSON
    object (REST body or realtime event), checked; ApiError otherwise."""
    fields = Fields(body, _SEND_FIELDS)
    recipient = fields.cyphr_id("recipientId", required=False)
    chat_id = fields.uuid("chatId") if fields.present("chatId") else None
    if (recipient is None) == (chat_id is None):
        raise BadRequest("Give either recipientId or chatId", code=MISSING_FIELD,
                         details={"field": "recipientId"})
    message_type = fields.text("messageType", required=False, max_length=16) or "text"
    if message_type not in MESSAGE_TYPES:
        raise invalid("messageType", f"messageType must be one of {', '.join(MESSAGE_TYPES)}")
    client_message_id = fields.text("clientMessageId", required=False, max_length=128)
    if client_message_id == "":
        raise invalid("clientMessageId", "clientMessageId must not be empty")
    payload = check_payload(fields.value("encryptedPayload"), max_payload)
    devices = _sealed_for(fields) if fields.present("devices") else None
    envelopes = _envelopes(fields) if fields.present("envelopes") else None
    if devices is not None and envelopes is not None:
        raise invalid("envelopes", "Give either devices (a message sealed per device) or envelopes"
                                   " (a message over sessions), not both")
    attachments = _attachment_ids(fields) if fields.present("attachments") else None
    return {"payload": payload, "message_type": message_type, "client_message_id": client_message_id,
            "chat_id": chat_id, "recipient_id": recipient, "devices": devices, "envelopes": envelopes,
            "attachments": attachments}


def _attachment_ids(fields: Fields) -> tuple[str, ...]:
    """``attachments: [id]``: the attachments whose pointers the encrypted
    payload carries, each once, so that the server can tell when no
    message names one any more (it never reads the payload)."""
    ids: list[str] = []
    for index, value in enumerate(fields.list("attachments", max_items=MAX_ATTACHMENTS_PER_MESSAGE,
                                              allow_empty=True)):
        where = f"attachments[{index}]"
        if not isinstance(value, str) or not BLOB_ID.fullmatch(value):
            raise invalid(where, f"{where} must be an attachment id (32 hexadecimal digits)")
        if value in ids:
            raise invalid(where, f"{where} names an attachment already named")
        ids.append(value)
    return tuple(ids)


def _listed_devices(fields: Fields, name: str, shape: tuple[str, ...]
                    ) -> Iterator[tuple[str, Fields, tuple[str, int]]]:
    """The entries of the list ``name`` (at most MAX_SEALED_DEVICES; empty:
    a chat with no device but the sender's), objects of the fields
    ``shape`` that name a device by cyphrId and deviceId, each device at
    most once: (where, its fields, the device)."""
    named: set[tuple[str, int]] = set()
    for index, item in enumerate(fields.list(name, max_items=MAX_SEALED_DEVICES,
                                             allow_empty=True)):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise invalid(where, f"{where} must be an object {{{', '.join(shape)}}}")
        entry = Fields(item, set(shape))
        device = (entry.cyphr_id("cyphrId"), entry.integer("deviceId", minimum=1, maximum=2**31 - 1))
        if device in named:
            raise invalid(where, f"{where} names a device already named")
        named.add(device)  # type: ignore[arg-type]
        yield where, entry, device  # type: ignore[misc]


def _envelopes(fields: Fields) -> tuple[SealedFor, ...]:
    """``envelopes: [{cyphrId, deviceId, kind, envelope}]``, one per device."""
    envelopes: list[SealedFor] = []
    for where, entry, (cyphr_id, device_id) in _listed_devices(
            fields, "envelopes", ("cyphrId", "deviceId", "kind", "envelope")):
        kind = entry.text("kind", max_length=16)
        if kind not in ENVELOPE_KINDS:
            raise invalid("kind", f"{where}.kind must be one of {', '.join(ENVELOPE_KINDS)}")
        data = entry.base64("envelope", max_length=MAX_ENVELOPE)
        if not data:
            raise invalid("envelope", f"{where}.envelope must not be empty")
        envelopes.append(SealedFor(cyphr_id, device_id, kind, data))
    return tuple(envelopes)


def _sealed_for(fields: Fields) -> Sealed:
    """``devices: [{cyphrId, deviceId}]``, each at most once."""
    return frozenset(device for _, _, device in _listed_devices(
        fields, "devices", ("cyphrId", "deviceId")))


# Made once: json.dumps with options builds an encoder at every call, which
# is 0.7 µs of the 2.4 µs a 250-byte payload takes.
_encode_payload = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _payload_text(value: dict[str, Any]) -> str:
    """``value`` as compact JSON text. orjson writes a 200-byte payload in
    0.3 µs where json takes 3.3 µs (the send path's largest JSON cost in a
    profile at 6,000 msg/s); its text is json's but for the form of some
    numbers (1e-7 for 1e-07), the same JSON. What orjson writes otherwise
    goes to json, whose answer or error stands: what orjson refuses (an
    integer past 64 bits, a lone surrogate) and what it writes as null
    (NaN and infinities, which json refuses). A payload that really holds
    null (or "null" in a string) is written by json too, as before."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _encode_payload(value)
    if b"null" in text:
        return _encode_payload(value)
    return text.decode("utf-8")


def check_payload(value: Any, max_payload: int) -> str:
    """An encryptedPayload as the text to store: a JSON object, within size."""
    if not isinstance(value, dict):
        raise invalid("encryptedPayload", "encryptedPayload must be a JSON object")
    try:
        payload = _payload_text(value)
    except ValueError:
        raise invalid("encryptedPayload", "encryptedPayload holds a number JSON cannot carry") from None
    except (TypeError, RecursionError):
        # Fields.value refuses these first; kept for any other caller.
        raise invalid("encryptedPayload", "encryptedPayload holds a value JSON cannot carry") from None
    try:
        size = len(payload.encode("utf-8"))
    except UnicodeEncodeError:
        raise invalid("encryptedPayload", "encryptedPayload holds a lone surrogate, which is not text") from None
    if size > max_payload:
        raise PayloadTooLarge(f"encryptedPayload is larger than {max_payload} bytes",
                              details={"field": "encryptedPayload", "limit": max_payload})
    return payload


def _no_chat() -> NotFound:
    return NotFound("No such chat", code=CHAT_NOT_FOUND)


class MessagingHandler:
    def __init__(self, chats: ChatStore, messages: MessageStore, identities: IdentityStore,
                 batcher: SendBatcher, send_limit: RateLimit, changes: ChangeFeed, clock: Any, *,
                 group_limit: RateLimit, member_limit: RateLimit, recipients: RecipientDevices,
                 rosters: RosterStore | None = None, attachments: Any = None,
                 cache_size: int = DIRECT_CHAT_CACHE_SIZE) -> None:
        self._chats = chats
        # cyphr.handlers.attachments.AttachmentsHandler: what a message may name.
        self._attachments = attachments
        self._rosters = rosters
        self._recipients = recipients
        self._messages = messages
        self._identities = identities
        self._batcher = batcher
        self._send_limit = send_limit
        self._group_limit = group_limit     # groups created, per user
        self._member_limit = member_limit   # members added to existing groups, per user
        self._clock = clock
        self._changes = changes
        # (cyphrId, cyphrId) -> (direct chat id, when learnt): a send by
        # recipientId then costs no lookup. Believed for DIRECT_CHAT_CACHE
        # seconds, so that a recipient deleted on another node is soon
        # refused here too (this node forgets at once, see forget_user).
        # Memory: in the order learnt, so entries past DIRECT_CHAT_CACHE are
        # trimmed from the old end as new ones come (the table holds the
        # pairs that sent in the last minute, not every pair ever seen), and
        # never more than DIRECT_CHAT_CACHE_SIZE (the oldest go first).
        self._direct_chats: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._direct_chats_size = cache_size

    def memory_tables(self) -> dict[str, int]:
        """The size of each table, for the memory metrics."""
        return {"direct_chats": len(self._direct_chats)}

    def _known_direct_chat(self, a: str, b: str) -> str | None:
        key = (a, b) if a < b else (b, a)
        entry = self._direct_chats.get(key)
        if entry is None:
            return None
        if self._clock.seconds() - entry[1] > DIRECT_CHAT_CACHE:
            del self._direct_chats[key]
            return None
        return entry[0]

    def _remember_direct_chat(self, a: str, b: str, chat_id: str) -> None:
        key = (a, b) if a < b else (b, a)
        now = self._clock.seconds()
        cache = self._direct_chats
        cache[key] = (chat_id, now)
        cache.move_to_end(key)  # learnt twice at once: it stays in time order
        self.expire(now)
        if len(cache) > self._direct_chats_size:
            cache.popitem(last=False)

    def expire(self, now: float | None = None) -> None:
        """Forget the direct chats learnt more than DIRECT_CHAT_CACHE ago,
        from the cache's old end (each popped once in its life: amortised
        O(1) per entry learnt). Also called on a timer (build_server)."""
        if now is None:
            now = self._clock.seconds()
        cache = self._direct_chats
        while cache:
            oldest = next(iter(cache))
            if now - cache[oldest][1] <= DIRECT_CHAT_CACHE:
                break
            del cache[oldest]

    def forget_user(self, cyphr_id: str) -> None:
        """The identity is gone: no send may reach it from memory (build_server
        subscribes this to IdentityDeleted)."""
        for key in [key for key in self._direct_chats if cyphr_id in key]:
            del self._direct_chats[key]

    async def membership(self, user: AuthUser, chat_id: str) -> Membership:
        """The user's membership of the chat: what a member may see of it
        (history, typing, its realtime room). A non-member, like a chat that
        does not exist, is 404 CHAT_NOT_FOUND."""
        membership = await self._chats.membership(chat_id, user.cyphr_id)
        if membership is None:
            raise _no_chat()
        return membership

    async def _exists(self, cyphr_id: str) -> None:
        if await self._identities.by_cyphr_id(cyphr_id) is None:
            raise NotFound("No such user", code=USER_NOT_FOUND, details={"cyphrId": cyphr_id})

    # -- messages -------------------------------------------------------

    def send(self, user: AuthUser, *, payload: str, message_type: str,
             client_message_id: str | None, chat_id: str | None = None,
             recipient_id: str | None = None, devices: Sealed | None = None,
             envelopes: tuple[SealedFor, ...] | None = None,
             attachments: tuple[str, ...] | None = None, origin: Any = None) -> Deferred[Message]:
        """Store one message, in a chat the sender belongs to or in the
        direct chat with ``recipient_id`` (created on first use). The REST
        route and the realtime event both come here; MessageStored goes on
        the change feed once the message is committed (``origin``: the
        socket that sent it, which is not told). ``devices``, when given,
        must be the chat's devices (cyphr.handlers.recipients), checked
        before anything is stored or created; so must the devices of
        ``envelopes`` (a message over sessions), one for each device but the
        sending one. ``attachments`` must be finished uploads of the
        sender's that are still served. Fires with the stored message;
        raises or fails with ApiError.

        A plain message to a chat, or to a user whose direct chat is known,
        needs nothing from the database before it is stored: it goes to the
        send batcher at once, with no coroutine between (about 8 µs of a
        message's 100 under load). Anything else is checked first
        (``_send_checked``)."""
        if envelopes is not None:
            for index, sealed in enumerate(envelopes):
                if (sealed.cyphr_id, sealed.device_id) == (user.cyphr_id, user.device_id):
                    raise invalid(f"envelopes[{index}]", f"envelopes[{index}] is for the sending device,"
                                  " which keeps what it sent itself")
            devices = frozenset((sealed.cyphr_id, sealed.device_id) for sealed in envelopes)
        self._send_limit.hit(user.user_id)
        if recipient_id is not None:
            chat_id = self._known_direct_chat(user.cyphr_id, recipient_id)
        if attachments or devices is not None or chat_id is None:
            return Deferred.fromCoroutine(self._send_checked(
                user, payload=payload, message_type=message_type, client_message_id=client_message_id,
                chat_id=chat_id, recipient_id=recipient_id, devices=devices, envelopes=envelopes,
                attachments=attachments, origin=origin))
        return self._submit(user, chat_id, payload, message_type, client_message_id,
                            now_ms(self._clock), envelopes, attachments, origin)

    async def _send_checked(self, user: AuthUser, *, payload: str, message_type: str,
                            client_message_id: str | None, chat_id: str | None,
                            recipient_id: str | None, devices: Sealed | None,
                            envelopes: tuple[SealedFor, ...] | None,
                            attachments: tuple[str, ...] | None, origin: Any) -> Message:
        """The rest of ``send`` when something must be looked up first: the
        attachments, the devices named, the direct chat (``chat_id`` is the
        known one, or None)."""
        if attachments:  # before anything is created
            if self._attachments is None:
                raise invalid("attachments", "This server keeps no attachments")
            await self._attachments.check_named(user, list(attachments))
        now = now_ms(self._clock)
        if recipient_id is not None:
            if devices is not None:
                if chat_id is None:
                    await self._exists(recipient_id)
                await self._recipients.check(user, devices, chat_id=chat_id,
                                             recipient_id=recipient_id)
            if chat_id is None:
                await self._exists(recipient_id)
                chat_id, created = await self._chats.direct_chat(user.cyphr_id, recipient_id, now)
                if created:
                    for member in sorted({user.cyphr_id, recipient_id}):
                        self._changes.publish(MemberJoined(chat_id, member))
                self._remember_direct_chat(user.cyphr_id, recipient_id, chat_id)
        assert chat_id is not None
        if devices is not None and recipient_id is None:
            await self._recipients.check(user, devices, chat_id=chat_id)
        return await self._submit(user, chat_id, payload, message_type, client_message_id, now,
                                  envelopes, attachments, origin)

    def _submit(self, user: AuthUser, chat_id: str, payload: str, message_type: str,
                client_message_id: str | None, now: int, envelopes: tuple[SealedFor, ...] | None,
                attachments: tuple[str, ...] | None, origin: Any) -> Deferred[Message]:
        stored = self._batcher.submit(Outgoing(
            id=new_uuid(), chat_id=chat_id, sender_id=user.cyphr_id, payload=payload,
            message_type=message_type, client_message_id=client_message_id, created_at=now,
            sender_device=user.device_id, envelopes=envelopes or (), attachments=attachments or ()))
        return stored.addCallback(self._committed, origin)

    def _committed(self, result: Message | NotAMember, origin: Any) -> Message:
        if isinstance(result, NotAMember):
            raise _no_chat()
        self._changes.publish(MessageStored(result, origin))
        return result

    async def history(self, user: AuthUser, chat_id: str, *, before: int | None, after: int | None,
                      limit: int) -> tuple[list[Message], bool]:
        """A page of the chat's history, from after the member joined only,
        each message with the user's device's envelope if it has one."""
        membership = await self.membership(user, chat_id)
        page, more = await self._messages.history(chat_id, before=before, after=after, limit=limit,
                                                  from_seq=membership.joined_seq)
        return await self._for_device(user, page), more

    async def sync(self, user: AuthUser, since: int, limit: int) -> tuple[list[Message], bool]:
        """Messages of the user's chats past ``since``, each chat's from
        after the user joined it, with the device's envelopes."""
        page, more = await self._messages.sync(user.cyphr_id, since, limit)
        return await self._for_device(user, page), more

    async def _for_device(self, user: AuthUser, page: list[Message]) -> list[Message]:
        return await self._messages.for_reader(page, user.cyphr_id, (user.user_id, user.device_id))

    async def own_receipts(self, user: AuthUser,
                           messages: list[Message]) -> dict[str, MessageReceipts]:
        """The receipt state of ``user``'s own messages among ``messages``
        (a page that history or sync gave ``user``, so a member's), by
        message id, each one present (empty before any receipt): one query
        for the page. Others' messages get none: who read them is their
        sender's business."""
        spans: dict[str, tuple[int, int]] = {}
        for message in messages:
            if message.sender_id == user.cyphr_id:
                first, last = spans.get(message.chat_id, (message.seq, message.seq))
                spans[message.chat_id] = (min(first, message.seq), max(last, message.seq))
        found = await self._chats.receipts_of(user.cyphr_id, spans) if spans else {}
        return {message.id: found.get(message.id, MessageReceipts())
                for message in messages if message.sender_id == user.cyphr_id}

    async def _own_message(self, user: AuthUser, message_id: str) -> Message:
        message = await self._messages.by_id(message_id)
        if message is None or await self._chats.membership(message.chat_id, user.cyphr_id) is None:
            raise NotFound("No such message", code=MESSAGE_NOT_FOUND)
        if message.sender_id != user.cyphr_id:
            raise Forbidden("Only the sender may change a message", code=NOT_SENDER)
        if message.deleted_at is not None:
            raise Conflict("The message was deleted", code=MESSAGE_DELETED)
        return message

    async def edit(self, user: AuthUser, message_id: str, payload: str) -> Message:
        message = await self._own_message(user, message_id)
        edited = await self._messages.edit(message, payload, now_ms(self._clock))
        if edited is None:
            now = await self._messages.by_id(message_id)
            if now is None or now.deleted_at is not None:
                raise Conflict("The message was deleted", code=MESSAGE_DELETED)
            raise Conflict("A message sent over sessions, or whose body the server no longer "
                           "holds, is not edited: send a new one", code=NOT_EDITABLE)
        return edited

    async def delete(self, user: AuthUser, message_id: str) -> Message:
        message = await self._own_message(user, message_id)
        deleted = await self._messages.delete(message, now_ms(self._clock))
        if deleted is None:
            raise Conflict("The message was deleted", code=MESSAGE_DELETED)
        return deleted

    # -- chats and groups -----------------------------------------------

    async def chats(self, user: AuthUser, limit: int, after: tuple[int, str] | None = None) -> ChatPage:
        """A page of the user's chats, most recently active first: the first
        ``limit``, or those after the previous page's last (ChatPage.next_after)."""
        return await self._chats.chats_of(user.cyphr_id, limit, after)

    async def _contacts_only(self, user: AuthUser, others: list[str]) -> None:
        """Refuse, as unknown users, those of ``others`` who are not
        ``user``'s contacts (no direct chat with it)."""
        strangers = sorted(set(others) - await self._chats.direct_partners(user.cyphr_id, others))
        if strangers:
            raise NotFound("No such user", code=USER_NOT_FOUND, details={"members": strangers})

    async def create_group(self, user: AuthUser, members: list[str], encrypted_name: str | None,
                           encrypted_settings: str | None) -> str:
        """A new group of ``user`` (its admin) and ``members``, each one of
        its contacts."""
        self._group_limit.hit(user.user_id)
        others = sorted(set(members) - {user.cyphr_id})
        await self._contacts_only(user, others)
        chat_id = await self._chats.create_group(user.cyphr_id, others, encrypted_name,
                                                 encrypted_settings, now_ms(self._clock))
        for member in [user.cyphr_id, *others]:
            self._changes.publish(MemberJoined(chat_id, member))
        return chat_id

    async def _admin_of_group(self, user: AuthUser, chat_id: str) -> Membership:
        membership = await self.membership(user, chat_id)
        if membership.chat.chat_type != "group":
            raise BadRequest("Members of a direct chat cannot change", code=NOT_A_GROUP)
        if membership.role != "admin":
            raise Forbidden("Only an admin of the group may do this", code=NOT_ADMIN)
        if self._rosters is not None and await self._rosters.has_roster(chat_id):
            raise Conflict("This group's members change by signed roster changes only "
                           "(POST /api/chats/{chatId}/roster)", code=ROSTER_IN_USE)
        return membership

    async def members(self, user: AuthUser, chat_id: str) -> list[Member]:
        await self.membership(user, chat_id)
        return await self._chats.members(chat_id)

    async def add_member(self, user: AuthUser, chat_id: str, cyphr_id: str) -> None:
        """An admin adds one of its contacts to the group."""
        self._member_limit.hit(user.user_id)
        await self._admin_of_group(user, chat_id)
        if cyphr_id != user.cyphr_id and not await self._chats.direct_partners(user.cyphr_id, [cyphr_id]):
            raise NotFound("No such user", code=USER_NOT_FOUND, details={"cyphrId": cyphr_id})
        try:
            last_seq = await self._chats.add_member(chat_id, cyphr_id, now_ms(self._clock))
        except AlreadyMember:
            raise Conflict("Already a member", code=ALREADY_MEMBER) from None
        self._changes.publish(MemberJoined(chat_id, cyphr_id, last_seq))

    async def remove_member(self, user: AuthUser, chat_id: str, cyphr_id: str) -> None:
        """An admin removes a member, or a member leaves."""
        if cyphr_id == user.cyphr_id:
            membership = await self.membership(user, chat_id)
            if membership.chat.chat_type != "group":
                raise BadRequest("A direct chat cannot be left", code=NOT_A_GROUP)
        else:
            await self._admin_of_group(user, chat_id)
        if not await self._chats.remove_member(chat_id, cyphr_id):
            raise NotFound("Not a member of this chat", code=NOT_A_MEMBER)
        self._changes.publish(MemberLeft(chat_id, cyphr_id))

    async def set_role(self, user: AuthUser, chat_id: str, cyphr_id: str, role: str) -> None:
        await self._admin_of_group(user, chat_id)
        try:
            changed = await self._chats.set_role(chat_id, cyphr_id, role)
        except LastAdmin:
            raise Conflict("A group keeps at least one admin", code=LAST_ADMIN) from None
        if not changed:
            raise NotFound("Not a member of this chat", code=NOT_A_MEMBER)
        self._changes.publish(RoleChanged(chat_id, cyphr_id, role))
