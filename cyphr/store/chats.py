"""Chats, their members and roles, and what each member has read."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from cyphr.db import Database, IntegrityError, Transaction, pg_array
from cyphr.store.envelopes import drop_envelope
from cyphr.store.messages import Message, for_member

_CHAT_COLUMNS = (
    "c.id, c.chat_type, c.encrypted_name, c.encrypted_settings, c.created_by, c.created_at,"
    " c.updated_at, c.last_message_at, c.last_seq"
)


@dataclass(frozen=True)
class Chat:
    id: str
    chat_type: str
    encrypted_name: str | None
    encrypted_settings: str | None
    created_by: str | None
    created_at: int
    updated_at: int
    last_message_at: int | None
    last_seq: int


@dataclass(frozen=True)
class Membership:
    chat: Chat
    role: str
    # The chat's last_seq when the member joined: it sees later messages only.
    joined_seq: int = 0


@dataclass(frozen=True)
class Member:
    cyphr_id: str
    role: str
    joined_at: int


@dataclass(frozen=True)
class ChatSummary:
    chat: Chat
    role: str
    participants: list[str]
    unread: int

    @property
    def activity(self) -> int:
        """What the chat list is ordered by (newest first): its last message's
        time, or its creation for a chat with none."""
        return self.chat.last_message_at if self.chat.last_message_at is not None else self.chat.created_at


@dataclass(frozen=True)
class MessageReceipts:
    """Who of the chat's other members a message reached and who read it,
    each sorted. A read counts as reached: ``read`` is within ``delivered``."""

    delivered: tuple[str, ...] = ()
    read: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatPage:
    """A page of a member's chat list, and where the next one starts (None:
    this is the last): the activity and id of the page's last chat."""

    chats: list[ChatSummary]
    next_after: tuple[int, str] | None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery receipt to record: ``cyphr_id``'s device (user id, device
    id) acknowledged the message, of the chat named (None: an old client
    that names none), at ``at`` (ms)."""

    message_id: str
    chat_id: str | None
    cyphr_id: str
    device: tuple[str, int]
    at: int


@dataclass(frozen=True, slots=True)
class Delivered:
    """A delivery receipt recorded: the message's id, chat and sender, and
    whether this was the member's first receipt for it (False for its own
    message, which records none)."""

    message_id: str
    chat_id: str
    sender_id: str
    first: bool


class AlreadyMember(Exception):
    pass


class LastAdmin(Exception):
    pass


def direct_key(a: str, b: str) -> str:
    return ":".join(sorted((a, b)))


class ChatStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def direct_chat(self, a: str, b: str, now: int) -> tuple[str, bool]:
        """The one direct chat between ``a`` and ``b``, created on first use,
        and whether this call created it. The unique direct_key makes two
        first messages at once agree on one."""
        key = direct_key(a, b)
        rows = await self._db.run_query("SELECT id FROM chats WHERE direct_key = ?", (key,))
        if rows:
            return rows[0][0], False
        return await self._db.run_interaction("create_direct_chat", _direct_txn, a, b, key, now)

    async def membership(self, chat_id: str, cyphr_id: str) -> Membership | None:
        rows = await self._db.run_query(
            "SELECT " + _CHAT_COLUMNS + ", p.role, p.joined_seq FROM chats c JOIN chat_participants p"
            " ON p.chat_id = c.id WHERE c.id = ? AND p.user_id = ?", (chat_id, cyphr_id))
        if not rows:
            return None
        return Membership(Chat(*rows[0][:9]), rows[0][9], rows[0][10])

    async def create_group(self, creator: str, members: list[str], encrypted_name: str | None,
                           encrypted_settings: str | None, now: int) -> str:
        return await self._db.run_interaction(
            "create_group", _group_txn, creator, members, encrypted_name, encrypted_settings, now)

    async def members(self, chat_id: str) -> list[Member]:
        rows = await self._db.run_query(
            "SELECT user_id, role, joined_at FROM chat_participants WHERE chat_id = ?"
            " ORDER BY joined_at, user_id", (chat_id,))
        return [Member(*row) for row in rows]

    async def add_member(self, chat_id: str, cyphr_id: str, now: int) -> int:
        """Add a member, who starts at the chat's newest message (its seq is
        the answer, kept as its joined_seq): what came before was not
        encrypted for it, and it sees none of it (schema 008)."""
        try:
            rows = await self._db.run_query(
                "INSERT INTO chat_participants (chat_id, user_id, role, joined_at, read_up_to_seq,"
                " delivered_up_to_seq, joined_seq) SELECT ?, ?, 'member', ?, last_seq, last_seq, last_seq"
                " FROM chats WHERE id = ? RETURNING joined_seq", (chat_id, cyphr_id, now, chat_id))
        except IntegrityError:
            raise AlreadyMember() from None
        return rows[0][0] if rows else 0

    async def remove_member(self, chat_id: str, cyphr_id: str) -> bool:
        """Remove a member; answer False if it was none. The last admin's
        role passes to the oldest remaining member; an empty chat goes."""
        return await self._db.run_interaction("remove_member", _remove_txn, chat_id, cyphr_id)

    async def set_role(self, chat_id: str, cyphr_id: str, role: str) -> bool:
        """Answer False if ``cyphr_id`` is no member; LastAdmin if this would
        leave the group without an admin."""
        return await self._db.run_interaction("set_role", _role_txn, chat_id, cyphr_id, role)

    async def chats_of(self, cyphr_id: str, limit: int,
                       after: tuple[int, str] | None = None) -> ChatPage:
        """A page of the member's chats, most recently active first (ties by
        id), with their members and how many messages of others it has not
        read: the first ``limit``, or those that come after ``after`` (the
        activity and id of the previous page's last chat), keyset-style, so
        that a page costs the same however deep it lies."""
        where, params = "", [cyphr_id]
        if after is not None:
            where = (" AND (COALESCE(c.last_message_at, c.created_at) < ?"
                     " OR (COALESCE(c.last_message_at, c.created_at) = ? AND c.id > ?))")
            params += [after[0], after[0], after[1]]
        rows = await self._db.run_query(
            "SELECT " + _CHAT_COLUMNS + ", p.role,"
            " (SELECT COUNT(*) FROM messages m WHERE m.chat_id = c.id AND m.seq > p.read_up_to_seq"
            "  AND m.sender_id <> p.user_id AND m.deleted_at IS NULL)"
            " FROM chat_participants p JOIN chats c ON c.id = p.chat_id WHERE p.user_id = ?" + where +
            " ORDER BY COALESCE(c.last_message_at, c.created_at) DESC, c.id LIMIT ?", [*params, limit + 1])
        more = len(rows) > limit
        rows = rows[:limit]
        if not rows:
            return ChatPage([], None)
        ids = [row[0] for row in rows]
        members = await self._db.run_query(
            "SELECT chat_id, user_id FROM chat_participants WHERE chat_id IN ("
            + ", ".join("?" for _ in ids) + ") ORDER BY joined_at, user_id", ids)
        by_chat: dict[str, list[str]] = {}
        for chat_id, user in members:
            by_chat.setdefault(str(chat_id), []).append(user)
        page = [ChatSummary(Chat(*row[:9]), row[9], by_chat.get(str(row[0]), []), row[10]) for row in rows]
        last = page[-1]
        return ChatPage(page, (last.activity, str(last.chat.id)) if more else None)

    async def mark_read(self, chat_id: str, cyphr_id: str, up_to_seq: int) -> bool:
        """The member has read the chat up to ``up_to_seq`` (never moves
        back); False if the mark was there already (nothing changed)."""
        moved = await self._db.run_operation(
            "UPDATE chat_participants SET read_up_to_seq = ?,"
            " delivered_up_to_seq = CASE WHEN delivered_up_to_seq < ? THEN ? ELSE delivered_up_to_seq END"
            " WHERE chat_id = ? AND user_id = ? AND read_up_to_seq < ?",
            (up_to_seq, up_to_seq, up_to_seq, chat_id, cyphr_id, up_to_seq))
        return moved == 1

    async def record_deliveries(self, deliveries: list[Delivery]) -> list[Delivered | None]:
        """Record delivery receipts, in one transaction: for each, None if
        the member may not see the message (not a member of its chat, or
        of the chat named; sent before the member joined; no such message),
        else what was recorded. Another's message gets the member's receipt
        (the first one only), moves the member's delivered mark (when the
        message is the next one, or nothing the member is to receive lies
        between) and the device's (device_delivered); the member's own
        message, sent from another of its devices, moves that device's mark
        only (a sender is not told of reaching itself).

        Raises only for the whole batch (the caller decides what to
        retry). On PostgreSQL one statement (schema 021, whose steps are
        these). The receipts are recorded in the order of (chat named,
        member), each's own order kept within: the rows a batch locks are
        then taken in one order, and two nodes' batches do not wait on each
        other in a cycle."""
        if not deliveries:
            return []
        order = sorted(range(len(deliveries)),
                       key=lambda i: (deliveries[i].chat_id or "", deliveries[i].cyphr_id))
        ordered = [deliveries[i] for i in order]
        answers: list[Delivered | None] = [None] * len(deliveries)
        if self._db.engine != "postgresql":
            recorded = await self._db.run_interaction("record_deliveries", _deliveries_txn, ordered)
            for i, answer in zip(order, recorded):
                answers[i] = answer
            return answers
        rows = await self._db.run_query(
            "SELECT n, message_id, chat_id, sender_id, first_receipt FROM record_deliveries("
            "?::uuid[], ?::uuid[], ?::text[], ?::uuid[], ?::integer[], ?::bigint[])",
            (pg_array([d.message_id for d in ordered]), pg_array([d.chat_id for d in ordered]),
             pg_array([d.cyphr_id for d in ordered]), pg_array([d.device[0] for d in ordered]),
             pg_array([d.device[1] for d in ordered]), pg_array([d.at for d in ordered])))
        for n, message_id, chat_id, sender_id, first in rows:
            answers[order[n - 1]] = Delivered(str(message_id), str(chat_id), sender_id, first)
        return answers

    async def last_seqs(self, chat_ids: list[str]) -> dict[str, int]:
        """Each existing chat's last seq, by id (up to 100 ids a query)."""
        found: dict[str, int] = {}
        for start in range(0, len(chat_ids), 100):
            chunk = chat_ids[start:start + 100]
            rows = await self._db.run_query(
                "SELECT id, last_seq FROM chats WHERE id IN (" + ", ".join("?" * len(chunk)) + ")",
                chunk)
            found.update((str(chat_id), last_seq) for chat_id, last_seq in rows)
        return found

    async def chat_positions(self, cyphr_id: str, device: tuple[str, int]
                             ) -> list[tuple[str, int, int]]:
        """The member's chats, each with the seq of its newest message and
        the highest seq the device (user id, device id) acknowledged as
        delivered, or from which it counts (the member's joined_seq, when
        the device has no mark there)."""
        rows = await self._db.run_query(
            "SELECT c.id, c.last_seq, CASE WHEN dd.delivered_up_to_seq > p.joined_seq"
            " THEN dd.delivered_up_to_seq ELSE p.joined_seq END"
            " FROM chat_participants p JOIN chats c ON c.id = p.chat_id"
            " LEFT JOIN device_deliveries dd ON dd.user_id = ? AND dd.device_id = ?"
            "  AND dd.chat_id = p.chat_id"
            " WHERE p.user_id = ?", (*device, cyphr_id))
        return [(str(chat_id), last_seq, delivered) for chat_id, last_seq, delivered in rows]

    async def partners(self, cyphr_id: str) -> list[str]:
        """Everyone who shares a chat with ``cyphr_id``."""
        rows = await self._db.run_query(
            "SELECT DISTINCT o.user_id FROM chat_participants p JOIN chat_participants o"
            " ON o.chat_id = p.chat_id WHERE p.user_id = ? AND o.user_id <> ?", (cyphr_id, cyphr_id))
        return [row[0] for row in rows]

    async def sharing(self, cyphr_id: str, others: list[str]) -> set[str]:
        """Those of ``others`` who share a chat with ``cyphr_id`` (oneself
        counts as sharing)."""
        if not others:
            return set()
        rows = await self._db.run_query(
            "SELECT DISTINCT o.user_id FROM chat_participants p JOIN chat_participants o"
            " ON o.chat_id = p.chat_id WHERE p.user_id = ? AND o.user_id IN ("
            + ", ".join("?" for _ in others) + ")", [cyphr_id, *others])
        return {row[0] for row in rows} | ({cyphr_id} & set(others))

    async def direct_partners(self, cyphr_id: str, others: list[str]) -> set[str]:
        """Those of ``others`` with whom ``cyphr_id`` has a direct chat (its
        contacts: the one kind of chat two users make between themselves),
        both still members of it (a deleted identity is nobody's contact)."""
        if not others:
            return set()
        keys = [direct_key(cyphr_id, other) for other in others]
        rows = await self._db.run_query(
            "SELECT p.user_id FROM chats c JOIN chat_participants p ON p.chat_id = c.id"
            " WHERE c.direct_key IN (" + ", ".join("?" for _ in keys) + ") AND p.user_id <> ?",
            [*keys, cyphr_id])
        return {row[0] for row in rows} & set(others)

    async def share_a_chat(self, a: str, b: str) -> bool:
        rows = await self._db.run_query(
            "SELECT 1 FROM chat_participants p JOIN chat_participants o ON o.chat_id = p.chat_id"
            " WHERE p.user_id = ? AND o.user_id = ? LIMIT 1", (a, b))
        return bool(rows)

    async def unread_senders(self, chat_id: str, cyphr_id: str, up_to_seq: int) -> list[str]:
        """Who sent the messages that reading up to ``up_to_seq`` marks read."""
        rows = await self._db.run_query(
            "SELECT DISTINCT m.sender_id FROM messages m JOIN chat_participants p"
            " ON p.chat_id = m.chat_id AND p.user_id = ?"
            " WHERE m.chat_id = ? AND m.seq > p.read_up_to_seq AND m.seq <= ? AND m.sender_id <> ?",
            (cyphr_id, chat_id, up_to_seq, cyphr_id))
        return [row[0] for row in rows]

    async def receipts_of(self, sender: str,
                          spans: dict[str, tuple[int, int]]) -> dict[str, MessageReceipts]:
        """The receipts of ``sender``'s messages in each chat of ``spans``
        with a seq from its first to its last number, by message id (a
        message nobody has acknowledged is left out), in one query.

        A member counts for a message sent after it joined (schema 008),
        when it has a receipt for the message (delivered, or read by id)
        or marks past its seq (delivered_up_to_seq, or read_up_to_seq from
        ``message_read {upToSeq}``). Only the chat's present members count:
        one who left or was removed, or whose account is gone, takes its
        read mark with it, and so its receipts go too. The joins follow
        primary keys: messages by (chat_id, seq), members by (chat_id,
        user_id), receipts by (chat_id, message_id, user_id)."""
        if not spans:
            return {}
        where: list[str] = []
        params: list[Any] = [sender]
        for chat_id, (first, last) in sorted(spans.items()):
            where.append("(m.chat_id = ? AND m.seq >= ? AND m.seq <= ?)")
            params += [chat_id, first, last]
        rows = await self._db.run_query(
            "SELECT m.id, o.user_id,"
            " CASE WHEN o.read_up_to_seq >= m.seq OR r.read_at IS NOT NULL THEN 1 ELSE 0 END"
            " FROM messages m JOIN chat_participants o ON o.chat_id = m.chat_id"
            " LEFT JOIN message_receipts r"
            "  ON r.chat_id = m.chat_id AND r.message_id = m.id AND r.user_id = o.user_id"
            " WHERE m.sender_id = ? AND (" + " OR ".join(where) + ")"
            " AND o.user_id <> m.sender_id AND o.joined_seq < m.seq"
            " AND (o.delivered_up_to_seq >= m.seq OR o.read_up_to_seq >= m.seq"
            "  OR r.delivered_at IS NOT NULL OR r.read_at IS NOT NULL)", params)
        delivered: dict[str, list[str]] = {}
        read: dict[str, list[str]] = {}
        for message_id, user, was_read in rows:
            delivered.setdefault(str(message_id), []).append(user)
            if was_read:
                read.setdefault(str(message_id), []).append(user)
        return {message_id: MessageReceipts(tuple(sorted(users)), tuple(sorted(read.get(message_id, []))))
                for message_id, users in delivered.items()}

    async def mark_message_read(self, chat_id: str, message_id: str, cyphr_id: str, now: int) -> bool:
        """Record that the member read the message (and so received it);
        False if its read was recorded already (nothing changed)."""
        changed = await self._db.run_operation(
            "INSERT INTO message_receipts (chat_id, message_id, user_id, delivered_at, read_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (chat_id, message_id, user_id) DO UPDATE"
            " SET read_at = excluded.read_at,"
            " delivered_at = COALESCE(message_receipts.delivered_at, excluded.delivered_at)"
            " WHERE message_receipts.read_at IS NULL",
            (chat_id, message_id, cyphr_id, now, now))
        return changed == 1


async def _deliveries_txn(txn: Transaction, deliveries: list[Delivery]) -> list[Delivered | None]:
    answers: list[Delivered | None] = []
    for delivery in deliveries:
        rows = await txn.execute(*for_member(delivery.message_id, delivery.cyphr_id, delivery.chat_id))
        if not rows:
            answers.append(None)
            continue
        message = Message(*rows[0])
        first = False
        if message.sender_id != delivery.cyphr_id:
            first = await _delivered_txn(txn, message.chat_id, message.id, delivery.cyphr_id, delivery.at,
                                         message.seq, delivery.device)
        elif message.sender_device is not None and message.sender_device != delivery.device[1]:
            await device_delivered(txn, message.chat_id, message.id, delivery.cyphr_id, message.seq,
                                   delivery.device)
        answers.append(Delivered(message.id, message.chat_id, message.sender_id, first))
    return answers


async def _delivered_txn(txn: Transaction, chat_id: str, message_id: str, cyphr_id: str, now: int,
                         seq: int, device: tuple[str, int]) -> bool:
    """Another's message with ``seq`` reached the member's ``device``:
    the member's receipt (True if its first), the member's mark, the
    device's."""
    await txn.execute(
        "INSERT INTO message_receipts (chat_id, message_id, user_id, delivered_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (chat_id, message_id, user_id) DO NOTHING", (chat_id, message_id, cyphr_id, now))
    first = txn.rowcount == 1
    await txn.execute(
        "UPDATE chat_participants SET delivered_up_to_seq = ?"
        " WHERE chat_id = ? AND user_id = ? AND delivered_up_to_seq = ?",
        (seq, chat_id, cyphr_id, seq - 1))
    if not txn.rowcount:
        await txn.execute(_MEMBER_MARK_OVER_GAP, (seq, chat_id, cyphr_id, seq, chat_id, seq))
    await device_delivered(txn, chat_id, message_id, cyphr_id, seq, device)
    return first


# A delivered mark is the highest seq up to which everything that its
# owner is to receive was acknowledged. It moves to an acknowledged seq
# over the messages in between that the owner does not receive (its own,
# deleted ones, those from before it joined) or acknowledged out of order
# (a receipt): else it would stop for good at the member's first own
# message, and every later acknowledgement would be a receipt row.

# The member's mark: what the member receives is the others' messages.
_MEMBER_MARK_OVER_GAP = (
    "UPDATE chat_participants SET delivered_up_to_seq = ?"
    " WHERE chat_id = ? AND user_id = ? AND delivered_up_to_seq < ?"
    " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.chat_id = ?"
    "  AND m.seq > chat_participants.delivered_up_to_seq AND m.seq < ?"
    "  AND m.seq > chat_participants.joined_seq AND m.sender_id <> chat_participants.user_id"
    "  AND m.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM message_receipts r"
    "   WHERE r.chat_id = m.chat_id AND r.message_id = m.id"
    "   AND r.user_id = chat_participants.user_id))")

# A device's mark: what a device receives is what its catch-up sends
# (store.messages.MessageStore.undelivered).
_DEVICE_MARK_OVER_GAP = (
    "UPDATE device_deliveries SET delivered_up_to_seq = ?"
    " WHERE user_id = ? AND device_id = ? AND chat_id = ? AND delivered_up_to_seq < ?"
    " AND NOT EXISTS (SELECT 1 FROM messages m JOIN chat_participants p"
    "  ON p.chat_id = m.chat_id AND p.user_id = ? WHERE m.chat_id = ?"
    "  AND m.seq > device_deliveries.delivered_up_to_seq AND m.seq < ? AND m.seq > p.joined_seq"
    "  AND (m.sender_id <> p.user_id OR m.sender_device <> device_deliveries.device_id)"
    "  AND m.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM device_receipts r"
    "   WHERE r.user_id = device_deliveries.user_id AND r.device_id = device_deliveries.device_id"
    "   AND r.chat_id = m.chat_id AND r.message_id = m.id))")


async def device_delivered(txn: Transaction, chat_id: str, message_id: str, cyphr_id: str,
                           seq: int, device: tuple[str, int]) -> None:
    """The device (user id, device id) acknowledged the message with
    ``seq``: its mark moves there when the message is the next one, or
    when nothing it is to receive lies between; else a receipt records
    the message past the mark. A mark that moved goes on over the receipts
    it reaches, which are then dropped. A device with no mark in the chat
    counts from the member's joined_seq. Its envelope of the message, if
    any, goes (and the body with the last one)."""
    user_id, device_id = device
    await drop_envelope(txn, device, chat_id, seq)
    await txn.execute(
        "UPDATE device_deliveries SET delivered_up_to_seq = ?"
        " WHERE user_id = ? AND device_id = ? AND chat_id = ? AND delivered_up_to_seq = ?",
        (seq, user_id, device_id, chat_id, seq - 1))
    if not txn.rowcount:
        await txn.execute(
            "INSERT INTO device_deliveries (user_id, device_id, chat_id, delivered_up_to_seq)"
            " SELECT ?, ?, ?, p.joined_seq FROM chat_participants p"
            " WHERE p.chat_id = ? AND p.user_id = ?"
            " ON CONFLICT (user_id, device_id, chat_id) DO NOTHING",
            (user_id, device_id, chat_id, chat_id, cyphr_id))
        await txn.execute(_DEVICE_MARK_OVER_GAP,
                          (seq, user_id, device_id, chat_id, seq, cyphr_id, chat_id, seq))
        if not txn.rowcount:
            await txn.execute(
                "INSERT INTO device_receipts (user_id, device_id, chat_id, message_id)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, device_id, chat_id, message_id) DO NOTHING",
                (user_id, device_id, chat_id, message_id))
            return
    [(top,)] = await txn.execute(
        "SELECT MAX(m.seq) FROM device_receipts r JOIN messages m"
        " ON m.chat_id = ? AND m.id = r.message_id"
        " WHERE r.user_id = ? AND r.device_id = ? AND r.chat_id = ?",
        (chat_id, user_id, device_id, chat_id))
    if top is None:
        return
    mark = seq
    if top > seq:
        await txn.execute(_DEVICE_MARK_OVER_GAP,
                          (top, user_id, device_id, chat_id, top, cyphr_id, chat_id, top))
        if txn.rowcount:
            mark = top
    await txn.execute(
        "DELETE FROM device_receipts WHERE user_id = ? AND device_id = ? AND chat_id = ?"
        " AND EXISTS (SELECT 1 FROM messages m WHERE m.chat_id = ?"
        "  AND m.id = device_receipts.message_id AND m.seq <= ?)",
        (user_id, device_id, chat_id, chat_id, mark))


async def _direct_txn(txn: Transaction, a: str, b: str, key: str, now: int) -> tuple[str, bool]:
    chat_id = str(uuid.uuid4())
    await txn.execute(
        "INSERT INTO chats (id, chat_type, direct_key, created_by, created_at, updated_at)"
        " VALUES (?, 'direct', ?, ?, ?, ?) ON CONFLICT (direct_key) DO NOTHING",
        (chat_id, key, a, now, now))
    if txn.rowcount == 1:
        for member in sorted({a, b}):
            await txn.execute(
                "INSERT INTO chat_participants (chat_id, user_id, role, joined_at) VALUES (?, ?, 'member', ?)",
                (chat_id, member, now))
        return chat_id, True
    # The other side created it a moment ago.
    return (await txn.execute("SELECT id FROM chats WHERE direct_key = ?", (key,)))[0][0], False


async def _group_txn(txn: Transaction, creator: str, members: list[str], encrypted_name: str | None,
                     encrypted_settings: str | None, now: int) -> str:
    chat_id = str(uuid.uuid4())
    await txn.execute(
        "INSERT INTO chats (id, chat_type, encrypted_name, encrypted_settings, created_by, created_at,"
        " updated_at) VALUES (?, 'group', ?, ?, ?, ?, ?)",
        (chat_id, encrypted_name, encrypted_settings, creator, now, now))
    values: list[Any] = [chat_id, creator, "admin", now]
    for member in members:
        values += [chat_id, member, "member", now]
    await txn.execute(
        "INSERT INTO chat_participants (chat_id, user_id, role, joined_at) VALUES "
        + ", ".join("(?, ?, ?, ?)" for _ in range(len(members) + 1)), values)
    return chat_id


async def _promote_if_adminless(txn: Transaction, chat_id: str) -> None:
    admins = await txn.execute(
        "SELECT COUNT(*) FROM chat_participants WHERE chat_id = ? AND role = 'admin'", (chat_id,))
    if admins[0][0] == 0:
        await txn.execute(
            "UPDATE chat_participants SET role = 'admin' WHERE chat_id = ? AND user_id ="
            " (SELECT user_id FROM chat_participants WHERE chat_id = ? ORDER BY joined_at, user_id LIMIT 1)",
            (chat_id, chat_id))


async def _remove_txn(txn: Transaction, chat_id: str, cyphr_id: str) -> bool:
    # Lock the chat row: concurrent removals of its members take turns, so
    # two admins leaving at once cannot both think the other one stays.
    await txn.execute("UPDATE chats SET updated_at = updated_at WHERE id = ?", (chat_id,))
    await txn.execute("DELETE FROM chat_participants WHERE chat_id = ? AND user_id = ?", (chat_id, cyphr_id))
    if txn.rowcount != 1:
        return False
    remaining = await txn.execute("SELECT COUNT(*) FROM chat_participants WHERE chat_id = ?", (chat_id,))
    if remaining[0][0] == 0:
        await txn.execute("DELETE FROM chats WHERE id = ?", (chat_id,))
    else:
        await _promote_if_adminless(txn, chat_id)
    return True


async def _role_txn(txn: Transaction, chat_id: str, cyphr_id: str, role: str) -> bool:
    await txn.execute("UPDATE chats SET updated_at = updated_at WHERE id = ?", (chat_id,))
    await txn.execute("UPDATE chat_participants SET role = ? WHERE chat_id = ? AND user_id = ?",
                      (role, chat_id, cyphr_id))
    if txn.rowcount != 1:
        return False
    admins = await txn.execute(
        "SELECT COUNT(*) FROM chat_participants WHERE chat_id = ? AND role = 'admin'", (chat_id,))
    if admins[0][0] == 0:
        raise LastAdmin()
    return True
