"""Encrypted messages: stored in batches, read by page or by stream position."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from cyphr.db import Database, Transaction, pg_array
from cyphr.store.attachments import attach_txn, unattach_txn
from cyphr.store.envelopes import EnvelopeStore, SealedFor, insert_envelopes
from cyphr.store.push import WakeUps, queue_wake_ups_txn

_COLUMNS = (
    "m.id, m.chat_id, m.seq, m.sender_id, m.encrypted_content, m.message_type,"
    " m.client_message_id, m.created_at, m.edited_at, m.deleted_at, m.stream_position,"
    " m.sender_device"
)
# The same columns for RETURNING, where SQLite takes no table alias.
_RETURNED = _COLUMNS.replace("m.", "")


@dataclass(frozen=True)
class Message:
    id: str
    chat_id: str
    seq: int
    sender_id: str
    payload: str | None  # the encryptedPayload JSON text; None once deleted
    message_type: str
    client_message_id: str | None
    created_at: int
    edited_at: int | None
    deleted_at: int | None
    stream_position: int
    sender_device: int | None = None  # the sender's device; None if stored before schema 013
    # Envelopes (sent over sessions): all of them on its way out of a send,
    # or the reading device's own when read for it (MessageStore.for_reader).
    envelopes: tuple[SealedFor, ...] = ()


def for_member(message_id: str, cyphr_id: str, chat_id: str | None) -> tuple[str, tuple[str, ...]]:
    """The query (and its parameters) of the message as the member may see
    it (MessageStore.by_id_for_member): one row of Message's columns, or
    none."""
    sql = ("SELECT " + _COLUMNS + " FROM messages m JOIN chat_participants p"
           " ON p.chat_id = m.chat_id AND p.user_id = ? WHERE m.id = ? AND m.seq > p.joined_seq")
    if chat_id is None:
        return sql, (cyphr_id, message_id)
    return sql + " AND m.chat_id = ?", (cyphr_id, message_id, chat_id)


@dataclass(frozen=True)
class Outgoing:
    """A message on its way in: everything but its seq and stream position."""

    id: str
    chat_id: str
    sender_id: str
    payload: str
    message_type: str
    client_message_id: str | None
    created_at: int
    sender_device: int | None = None
    envelopes: tuple[SealedFor, ...] = ()  # one per recipient device, when sent over sessions
    # The attachments it names (checked as the sender's, finished and live).
    attachments: tuple[str, ...] = ()

    def stored(self, seq: int, stream_position: int) -> Message:
        """The message as stored with its seq and stream position."""
        return Message(self.id, self.chat_id, seq, self.sender_id, self.payload, self.message_type,
                       self.client_message_id, self.created_at, None, None, stream_position,
                       self.sender_device, self.envelopes)


class NotAMember(Exception):
    """The sender is not (or no longer) a member of the chat."""


class Stored(NamedTuple):
    """What a batch came to: for each message its stored message or
    NotAMember, and how many push wake-ups were queued with them."""

    answers: list[Message | NotAMember]
    woken: int = 0


class MessageStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        self.envelopes = EnvelopeStore(database)

    async def store_batch(self, items: list[Outgoing], wake_ups: WakeUps | None = None) -> Stored:
        """
        Store ``items`` in one transaction and answer, for each, its stored
        message or NotAMember. A resent clientMessageId answers the message
        first stored under it. With ``wake_ups``, the push wake-ups of the
        messages stored now are queued in the same transaction (on
        PostgreSQL in the same statement), so that none is lost to a crash
        between the two. Raises only for the whole batch (the database
        failed, or a concurrent writer made a constraint refuse it): the
        caller then decides what to retry.
        """
        if self._db.engine == "postgresql":
            if any(item.envelopes or item.attachments for item in items):
                return await self._db.run_interaction("store_messages", _store_batch_pg_txn, items,
                                                      wake_ups)
            # One statement, one round trip: schema 005's store_messages (013's
            # arguments), and the wake-ups.
            return _pg_stored(items, await self._db.run_query(*_pg_statement(items, wake_ups)),
                              wake_ups is not None)
        return await self._db.run_interaction("store_messages", _store_batch_txn, items, wake_ups)

    async def for_reader(self, messages: list[Message], cyphr_id: str,
                         device: tuple[str, int]) -> list[Message]:
        """``messages`` each with the reading device's (user id, device id)
        envelope, if the server still holds one for it (one query; none when
        no message of the page can have one)."""
        keys = [(m.chat_id, m.seq) for m in messages
                if m.payload is not None and (m.sender_id != cyphr_id or m.sender_device != device[1])]
        if not keys:
            return messages
        found = await self.envelopes.for_device(cyphr_id, device, keys)
        if not found:
            return messages
        return [replace(m, envelopes=(found[(m.chat_id, m.seq)],)) if (m.chat_id, m.seq) in found
                else m for m in messages]

    async def with_all_envelopes(self, chat_id: str, messages: list[Message]) -> list[Message]:
        """``messages`` of one chat each with every envelope still held of it
        (a node fetching what to push to its sockets)."""
        seqs = [m.seq for m in messages if m.payload is not None]
        found = await self.envelopes.of_messages(chat_id, seqs) if seqs else {}
        if not found:
            return messages
        return [replace(m, envelopes=found[m.seq]) if m.seq in found else m for m in messages]

    async def history(self, chat_id: str, *, before: int | None, after: int | None,
                      limit: int, from_seq: int = 0) -> tuple[list[Message], bool]:
        """A page of the chat in ascending seq, and whether more lie further
        in that direction: after ``after``, before ``before``, or the latest;
        never a message at or below ``from_seq`` (the reader's joined_seq)."""
        if after is not None:
            rows = await self._db.run_query(
                "SELECT " + _COLUMNS + " FROM messages m WHERE m.chat_id = ? AND m.seq > ?"
                " ORDER BY m.seq LIMIT ?", (chat_id, max(after, from_seq), limit + 1))
            page = [Message(*row) for row in rows]
            return page[:limit], len(page) > limit
        if before is not None:
            rows = await self._db.run_query(
                "SELECT " + _COLUMNS + " FROM messages m WHERE m.chat_id = ? AND m.seq < ? AND m.seq > ?"
                " ORDER BY m.seq DESC LIMIT ?", (chat_id, before, from_seq, limit + 1))
        else:
            rows = await self._db.run_query(
                "SELECT " + _COLUMNS + " FROM messages m WHERE m.chat_id = ? AND m.seq > ?"
                " ORDER BY m.seq DESC LIMIT ?", (chat_id, from_seq, limit + 1))
        page = [Message(*row) for row in rows]
        return list(reversed(page[:limit])), len(page) > limit

    async def sync(self, cyphr_id: str, since: int, limit: int) -> tuple[list[Message], bool]:
        """Messages of the member's chats past stream position ``since``, in
        stream order (see schema 004 for why no message is ever skipped),
        each chat's only from after the member joined it (schema 008)."""
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM messages m JOIN chat_participants p"
            " ON p.chat_id = m.chat_id AND p.user_id = ?"
            " WHERE m.stream_position > ? AND m.seq > p.joined_seq ORDER BY m.stream_position LIMIT ?",
            (cyphr_id, since, limit + 1))
        page = [Message(*row) for row in rows]
        return page[:limit], len(page) > limit

    async def undelivered(self, cyphr_id: str, device: tuple[str, int], after: tuple[str, int],
                          limit: int, chats: list[str] | None = None) -> list[Message]:
        """Messages in the member's chats (or in ``chats`` of them) that its
        device (user id, device id) has not acknowledged as delivered, by
        chat and seq, past ``after`` (chat id, seq): the catch-up of a socket
        of that device. Those are the messages of others and those the
        member's other devices sent; not those this device sent, nor the
        member's own from before schema 013 (no sending device known). A device counts from its mark
        in each chat, or from the member's joined_seq where it has none
        (store.chats.ChatStore.record_deliveries). Naming the chats lets
        PostgreSQL look into their partitions only."""
        only = ""
        params: list[Any] = [*device, cyphr_id, device[1], *device, after[0], after[0], after[1]]
        if chats:
            only = " AND m.chat_id IN (" + ", ".join("?" for _ in chats) + ")"
            params += chats
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM chat_participants p JOIN messages m ON m.chat_id = p.chat_id"
            " LEFT JOIN device_deliveries dd ON dd.user_id = ? AND dd.device_id = ?"
            "  AND dd.chat_id = p.chat_id"
            " WHERE p.user_id = ? AND m.seq > p.joined_seq"
            " AND (dd.delivered_up_to_seq IS NULL OR m.seq > dd.delivered_up_to_seq)"
            " AND (m.sender_id <> p.user_id OR m.sender_device <> ?) AND m.deleted_at IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM device_receipts r WHERE r.user_id = ?"
            "  AND r.device_id = ? AND r.chat_id = m.chat_id AND r.message_id = m.id)"
            " AND (m.chat_id > ? OR (m.chat_id = ? AND m.seq > ?))" + only +
            " ORDER BY m.chat_id, m.seq LIMIT ?",
            [*params, limit])
        return [Message(*row) for row in rows]

    async def by_id_for_member(self, message_id: str, cyphr_id: str,
                               chat_id: str | None = None) -> Message | None:
        """The message, if ``cyphr_id`` is a member of its chat (``chat_id``,
        when given) and it was sent after the member joined.

        Given its chat, the look-up reads one partition of ``messages``;
        by id alone it probes the id index of each of the hundred (and, on
        PostgreSQL, plans over all of them). A delivery receipt, look-up and
        mark, costs PostgreSQL 0.48 ms of CPU the first way and 7.9 ms the
        second (benchmarks/store_batch.py). Clients name the chat of what
        they acknowledge (API: message_delivered {messageId, chatId})."""
        rows = await self._db.run_query(*for_member(message_id, cyphr_id, chat_id))
        return Message(*rows[0]) if rows else None

    async def by_seq(self, chat_id: str, seq: int) -> Message | None:
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM messages m WHERE m.chat_id = ? AND m.seq = ?", (chat_id, seq))
        return Message(*rows[0]) if rows else None

    async def stream_position(self) -> int:
        """The position of the newest committed message."""
        rows = await self._db.run_query("SELECT last_position FROM message_stream WHERE id = 1")
        return rows[0][0]

    async def by_id(self, message_id: str) -> Message | None:
        rows = await self._db.run_query("SELECT " + _COLUMNS + " FROM messages m WHERE m.id = ?",
                                        (message_id,))
        return Message(*rows[0]) if rows else None

    async def edit(self, message: Message, payload: str, now: int) -> Message | None:
        """The edited message; None if it was deleted meanwhile, or it is
        not one to edit: sent over sessions (its envelopes name its body's
        digest, which a new body would not match), or its body is gone."""
        rows = await self._db.run_query(
            "UPDATE messages SET encrypted_content = ?, edited_at = ?"
            " WHERE chat_id = ? AND seq = ? AND deleted_at IS NULL AND encrypted_content IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM message_envelopes e"
            "  WHERE e.chat_id = messages.chat_id AND e.seq = messages.seq) RETURNING " + _RETURNED,
            (payload, now, message.chat_id, message.seq))
        return Message(*rows[0]) if rows else None

    async def delete(self, message: Message, now: int) -> Message | None:
        """Erase the blob, keep a tombstone (id, seq, sender, times); None if
        it was deleted already."""
        return await self._db.run_interaction("delete_message", _delete_txn, message, now)

    async def purge_older_than(self, cutoff: int, batch: int) -> int:
        """Delete up to ``batch`` messages created before ``cutoff``, with
        their receipts; answer how many."""
        return await self._db.run_interaction("purge_messages", _purge_txn, cutoff, batch)


def _values(rows: int, columns: int = 2) -> str:
    """``(VALUES (?, ?), ...)``: ``rows`` rows of ``columns`` placeholders."""
    row = "(" + ", ".join(["?"] * columns) + ")"
    return "(VALUES " + ", ".join([row] * rows) + ")"


def _pg_arguments(items: list[Outgoing]) -> tuple[str, ...]:
    return (pg_array([item.chat_id for item in items]), pg_array([item.sender_id for item in items]),
            pg_array([item.id for item in items]), pg_array([item.payload for item in items]),
            pg_array([item.message_type for item in items]),
            pg_array([item.client_message_id for item in items]),
            pg_array([item.created_at for item in items]),
            pg_array([item.sender_device for item in items]))


def _pg_statement(items: list[Outgoing], wake_ups: WakeUps | None) -> tuple[str, tuple[Any, ...]]:
    if wake_ups is None:
        return _STORE_MESSAGES, _pg_arguments(items)
    return _STORE_MESSAGES_WAKING, (*_pg_arguments(items), wake_ups.now, wake_ups.live_since)


def _pg_stored(items: list[Outgoing], rows: list[Any], waking: bool) -> Stored:
    """The answers from rows of _STORE_MESSAGES, or of _STORE_MESSAGES_WAKING
    (``waking``), whose every row ends with the number of wake-ups queued."""
    if waking:
        return Stored(_pg_answers(items, [row[:-1] for row in rows]), rows[0][-1] if rows else 0)
    return Stored(_pg_answers(items, rows))


def _pg_answers(items: list[Outgoing], rows: list[Any]) -> list[Message | NotAMember]:
    answers: list[Message | NotAMember | None] = [None] * len(items)
    for n, *columns in rows:
        item = items[n - 1]
        if columns[0] is None:
            answers[n - 1] = NotAMember()
        elif columns[0] == item.id:  # stored now: the row holds its seq and position
            answers[n - 1] = item.stored(columns[2], columns[10])
        else:  # a resend: the message stored before
            answers[n - 1] = Message(*columns)
    return _answer_repeats(items, answers)


async def _store_batch_pg_txn(txn: Transaction, items: list[Outgoing],
                              wake_ups: WakeUps | None) -> Stored:
    """A batch with envelopes: the messages (and wake-ups) as always, then
    the envelopes of those stored now (not a resend's: the first send's
    stand), in one transaction."""
    stored = _pg_stored(items, await txn.execute(*_pg_statement(items, wake_ups)), wake_ups is not None)
    await _store_envelopes(txn, "postgresql", items, stored.answers)
    await _store_attachments(txn, items, stored.answers)
    return stored


async def _store_envelopes(txn: Transaction, engine: str, items: list[Outgoing],
                           answers: list[Message | NotAMember]) -> None:
    rows = [(answer.chat_id, answer.seq, sealed, answer.created_at)
            for item, answer in zip(items, answers)
            if isinstance(answer, Message) and answer.id == item.id
            for sealed in item.envelopes]
    if rows:
        await insert_envelopes(txn, engine, rows)


async def _store_attachments(txn: Transaction, items: list[Outgoing],
                             answers: list[Message | NotAMember]) -> None:
    """What the messages stored now name (not a resend's: the first send's
    stand). The handler checked each attachment before the send; one gone
    since (its owner deleted it) is not named."""
    for item, answer in zip(items, answers):
        if isinstance(answer, Message) and answer.id == item.id and item.attachments:
            await attach_txn(txn, answer.chat_id, answer.seq, list(item.attachments))


_STORED = ("n, id, chat_id, seq, sender_id, encrypted_content, message_type, client_message_id,"
           " created_at, edited_at, deleted_at, stream_position, sender_device")
_STORE_MESSAGES = (
    "SELECT " + _STORED + " FROM store_messages("
    "?::uuid[], ?::text[], ?::uuid[], ?::text[], ?::text[], ?::text[], ?::bigint[], ?::integer[])")
# The same, with the wake-ups of the messages stored now (not a resend's,
# whose row names the first message; not a refused one's, which names
# none) queued in the same call (schema 020): one round trip a batch, not
# two. Each row is a stored_message (the columns of _STORED, in order) and
# the number of wake-ups queued.
_STORE_MESSAGES_WAKING = (
    "SELECT (w.message).*, w.woken FROM store_messages_waking("
    "?::uuid[], ?::text[], ?::uuid[], ?::text[], ?::text[], ?::text[], ?::bigint[], ?::integer[],"
    " ?::bigint, ?::bigint) w")


def _answer_repeats(items: list[Outgoing],
                    answers: list[Message | NotAMember | None]) -> list[Message | NotAMember]:
    """Fill in the messages that repeat a clientMessageId of an earlier one
    in the same batch: they answer the first one's message."""
    first: dict[tuple[str, str, str | None], Message | NotAMember] = {}
    for item, answer in zip(items, answers):
        if answer is not None:
            first.setdefault((item.chat_id, item.sender_id, item.client_message_id), answer)
    return [answer if answer is not None
            else first[(item.chat_id, item.sender_id, item.client_message_id)]
            for item, answer in zip(items, answers)]


async def _store_batch_txn(txn: Transaction, items: list[Outgoing],
                           wake_ups: WakeUps | None) -> Stored:
    """SQLite's batch: a fixed number of statements whatever its size, in
    the order of schema 005's store_messages on PostgreSQL: check
    membership, look for resends, take stream positions, advance the chats'
    seqs, insert. (SQLite runs one writer at a time, so no chat needs
    locking. Conditions are row values IN a VALUES list, not an OR per
    message.)"""
    answers: list[Message | NotAMember | None] = [None] * len(items)

    # Who may write where, in one query.
    pairs = sorted({(item.chat_id, item.sender_id) for item in items})
    rows = await txn.execute(
        "SELECT chat_id, user_id FROM chat_participants WHERE (chat_id, user_id) IN "
        + _values(len(pairs)), [value for pair in pairs for value in pair])
    members = {(chat_id, user_id) for chat_id, user_id in rows}

    # Resends: a clientMessageId already stored, or twice in this batch.
    keyed = sorted({(item.chat_id, item.sender_id, item.client_message_id) for item in items
                    if item.client_message_id is not None and (item.chat_id, item.sender_id) in members})
    existing: dict[tuple[str, str, str], Message] = {}
    if keyed:
        rows = await txn.execute(
            "SELECT " + _COLUMNS + " FROM messages m WHERE (m.chat_id, m.sender_id, m.client_message_id) IN "
            + _values(len(keyed), 3), [value for key in keyed for value in key])
        for row in rows:
            message = Message(*row)
            existing[(message.chat_id, message.sender_id, message.client_message_id or "")] = message

    new: list[tuple[int, Outgoing]] = []
    seen: set[tuple[str, str, str]] = set()
    for i, item in enumerate(items):
        if (item.chat_id, item.sender_id) not in members:
            answers[i] = NotAMember()
            continue
        if item.client_message_id is not None:
            key = (item.chat_id, item.sender_id, item.client_message_id)
            if key in existing:
                answers[i] = existing[key]
                continue
            if key in seen:
                continue  # answered with the first one's message
            seen.add(key)
        new.append((i, item))

    if new:
        end = (await txn.execute(
            "UPDATE message_stream SET last_position = last_position + ? WHERE id = 1"
            " RETURNING last_position", (len(new),)))[0][0]
        positions = range(end - len(new) + 1, end + 1)
        per_chat: dict[str, list[int]] = {}
        for n, (i, item) in enumerate(new):
            per_chat.setdefault(item.chat_id, []).append(n)
        # Every chat's seqs in one statement.
        counts = [(chat_id, len(indexes), max(new[n][1].created_at for n in indexes))
                  for chat_id, indexes in sorted(per_chat.items())]
        rows = await txn.execute(
            "UPDATE chats SET last_seq = last_seq + v.column2, last_message_at = v.column3,"
            " updated_at = v.column3 FROM " + _values(len(counts), 3)
            + " AS v WHERE chats.id = v.column1 RETURNING id, last_seq",
            [value for count in counts for value in count])
        last_of = dict(rows)
        values: list[Any] = []
        for chat_id, indexes in per_chat.items():
            first_seq = last_of[chat_id] - len(indexes) + 1
            for offset, n in enumerate(indexes):
                i, item = new[n]
                seq, position = first_seq + offset, positions[n]
                values += [item.chat_id, seq, item.id, item.sender_id, item.payload, item.message_type,
                           item.client_message_id, item.created_at, position, item.sender_device]
                answers[i] = item.stored(seq, position)
        # One multi-row statement for the whole batch.
        await txn.execute(
            "INSERT INTO messages (chat_id, seq, id, sender_id, encrypted_content, message_type,"
            " client_message_id, created_at, stream_position, sender_device) VALUES "
            + ", ".join("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" for _ in new), values)

    answered = _answer_repeats(items, answers)
    await _store_envelopes(txn, "sqlite", items, answered)
    await _store_attachments(txn, items, answered)
    woken = 0
    if wake_ups is not None and new:
        sends = sorted({(item.chat_id, item.sender_id, item.sender_device or 0) for _, item in new})
        woken = await queue_wake_ups_txn(txn, "sqlite", sends, wake_ups)  # type: ignore[arg-type]
    return Stored(answered, woken)


async def _delete_txn(txn: Transaction, message: Message, now: int) -> Message | None:
    rows = await txn.execute(
        "UPDATE messages SET encrypted_content = NULL, deleted_at = ?"
        " WHERE chat_id = ? AND seq = ? AND deleted_at IS NULL RETURNING " + _RETURNED,
        (now, message.chat_id, message.seq))
    # Nobody is to open it now.
    await txn.execute("DELETE FROM message_envelopes WHERE chat_id = ? AND seq = ?",
                      (message.chat_id, message.seq))
    await unattach_txn(txn, [(message.chat_id, message.seq)])
    return Message(*rows[0]) if rows else None


async def _purge_txn(txn: Transaction, cutoff: int, batch: int) -> int:
    rows = await txn.execute("SELECT id, chat_id, seq FROM messages WHERE created_at < ? LIMIT ?",
                             (cutoff, batch))
    if rows:
        ids = [row[0] for row in rows]
        marks = ", ".join("?" for _ in ids)
        await txn.execute("DELETE FROM message_receipts WHERE message_id IN (" + marks + ")", ids)
        await txn.execute("DELETE FROM messages WHERE id IN (" + marks + ")", ids)
        for _, chat_id, seq in rows:
            await txn.execute("DELETE FROM message_envelopes WHERE chat_id = ? AND seq = ?",
                              (chat_id, seq))
        await unattach_txn(txn, [(chat_id, seq) for _, chat_id, seq in rows])
    return len(rows)
