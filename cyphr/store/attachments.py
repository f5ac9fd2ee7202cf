"""Attachments: uploads, their durable offsets, and the messages that name them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cyphr.db import Database, Transaction


@dataclass(frozen=True)
class Attachment:
    id: str
    owner_id: str | None  # None once the uploader's account is gone
    length: int
    received: int
    state: dict[str, Any]
    created_at: int
    completed_at: int | None
    expires_at: int | None
    busy_until: int | None
    gone_at: int | None

    @property
    def complete(self) -> bool:
        return self.completed_at is not None

    def live(self, now: int) -> bool:
        """Whether it is served: its owner exists, it is not gone, not expired."""
        return (self.owner_id is not None and self.gone_at is None
                and (self.expires_at is None or self.expires_at > now))


_COLUMNS = ("id, owner_id, length, received, store_state, created_at, completed_at,"
            " expires_at, busy_until, gone_at")


def _attachment(row: tuple[Any, ...]) -> Attachment:
    return Attachment(row[0], None if row[1] is None else str(row[1]), row[2], row[3],
                      json.loads(row[4]), *row[5:])


@dataclass(frozen=True)
class Usage:
    """What an owner holds: unfinished uploads, and the bytes of every
    attachment not yet gone (declared lengths, finished or not)."""

    pending: int
    stored: int


class QuotaRefused(Exception):
    """The owner holds too many unfinished uploads (``pending``) or too
    many bytes (``stored``)."""

    def __init__(self, reason: str, usage: Usage) -> None:
        super().__init__(reason)
        self.reason = reason
        self.usage = usage


def _json(state: dict[str, Any]) -> str:
    return json.dumps(state, separators=(",", ":"), sort_keys=True)


async def _usage(txn: Transaction, owner_id: str, now: int) -> Usage:
    # What expired counts no more, even before the clean-up marks it.
    rows = await txn.execute(
        "SELECT COUNT(*) FILTER (WHERE completed_at IS NULL), COALESCE(SUM(length), 0)"
        " FROM attachments WHERE owner_id = ? AND gone_at IS NULL"
        " AND (expires_at IS NULL OR expires_at > ?)", (owner_id, now))
    return Usage(int(rows[0][0]), int(rows[0][1]))


class AttachmentStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def create(self, attachment_id: str, owner_id: str, length: int, state: dict[str, Any],
                     now: int, expires_at: int, *, max_pending: int, quota: int) -> Usage:
        """Record a new upload, within the owner's limits (checked and taken
        in one transaction, the owner's row locked: two creates at once on
        two nodes cannot both slip under a limit). Answers the usage
        before it; raises QuotaRefused."""
        async def create(txn: Transaction) -> Usage:
            await txn.execute("UPDATE cyphr_identities SET id = id WHERE id = ?", (owner_id,))
            usage = await _usage(txn, owner_id, now)
            if usage.pending >= max_pending:
                raise QuotaRefused("pending", usage)
            if usage.stored + length > quota:
                raise QuotaRefused("stored", usage)
            await txn.execute(
                "INSERT INTO attachments (id, owner_id, length, store_state, created_at,"
                " expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (attachment_id, owner_id, length, _json(state), now, expires_at))
            return usage
        return await self._db.run_interaction("attachment_create", create)

    async def get(self, attachment_id: str) -> Attachment | None:
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM attachments WHERE id = ?", (attachment_id,))
        return _attachment(rows[0]) if rows else None

    async def usage(self, owner_id: str, now: int) -> Usage:
        return await self._db.run_interaction("attachment_usage", _usage, owner_id, now)

    async def hold(self, attachment_id: str, owner_id: str, offset: int, now: int,
                   until: int) -> Attachment | None:
        """Hold an unfinished upload of ``owner_id`` whose durable offset is
        ``offset`` for one append, until ``until`` (ms) at the latest.
        None when there is no such upload free to hold now: unknown, not
        the owner's, finished, gone, expired, at another offset, or held."""
        rows = await self._db.run_query(
            "UPDATE attachments SET busy_until = ? WHERE id = ? AND owner_id = ?"
            " AND received = ? AND completed_at IS NULL AND gone_at IS NULL AND expires_at > ?"
            " AND (busy_until IS NULL OR busy_until <= ?) RETURNING " + _COLUMNS,
            (until, attachment_id, owner_id, offset, now, now))
        return _attachment(rows[0]) if rows else None

    async def appended(self, attachment_id: str, received: int, state: dict[str, Any],
                       completed_at: int | None = None, expires_at: int | None = None) -> None:
        """Record an append's durable offset and state, and let the upload
        go; when ``completed_at`` is given the upload is finished, and
        ``expires_at`` is its new expiry (None: kept)."""
        if completed_at is None:
            await self._db.run_operation(
                "UPDATE attachments SET received = ?, store_state = ?, busy_until = NULL"
                " WHERE id = ?", (received, _json(state), attachment_id))
        else:
            await self._db.run_operation(
                "UPDATE attachments SET received = ?, store_state = ?, busy_until = NULL,"
                " completed_at = ?, expires_at = ? WHERE id = ?",
                (received, _json(state), completed_at, expires_at, attachment_id))

    async def extend(self, attachment_id: str, until: int) -> None:
        """A running append keeps its hold until ``until`` (ms)."""
        await self._db.run_operation(
            "UPDATE attachments SET busy_until = ? WHERE id = ? AND busy_until IS NOT NULL",
            (until, attachment_id))

    async def release(self, attachment_id: str) -> None:
        """Let a held upload go without changing it (the append failed)."""
        await self._db.run_operation(
            "UPDATE attachments SET busy_until = NULL WHERE id = ?", (attachment_id,))

    async def terminate(self, attachment_id: str, owner_id: str, now: int) -> bool:
        """The owner deletes an upload (TUS termination): it is gone at once
        (the clean-up removes its blob). Whether there was such an upload."""
        return await self._db.run_operation(
            "UPDATE attachments SET gone_at = ? WHERE id = ? AND owner_id = ? AND gone_at IS NULL",
            (now, attachment_id, owner_id)) > 0

    async def unusable(self, owner_id: str, attachment_ids: list[str], now: int) -> list[str]:
        """Of ``attachment_ids``, those a message of ``owner_id`` may not name:
        not the sender's, unknown, unfinished, gone or expired."""
        if not attachment_ids:
            return []
        marks = ", ".join("?" for _ in attachment_ids)
        rows = await self._db.run_query(
            "SELECT id FROM attachments WHERE id IN (" + marks + ") AND owner_id = ?"
            " AND completed_at IS NOT NULL AND gone_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
            (*attachment_ids, owner_id, now))
        found = {row[0] for row in rows}
        return [a for a in attachment_ids if a not in found]

    async def avatar_changed(self, owner_id: str, old: str | None, new: str | None,
                             retention_ms: int) -> None:
        """The owner's avatar is now ``new`` (an attachment id, or not one):
        it is kept while it is (no expiry); ``old``, if an attachment of the
        owner's, expires as any other from now on (``retention_ms`` after
        its upload finished; 0: kept)."""
        async def change(txn: Transaction) -> None:
            if old is not None and old != new:
                await txn.execute(
                    "UPDATE attachments SET expires_at = CASE WHEN ? > 0 THEN completed_at + ?"
                    " ELSE NULL END WHERE id = ? AND owner_id = ? AND completed_at IS NOT NULL",
                    (retention_ms, retention_ms, old, owner_id))
            if new is not None:
                await txn.execute("UPDATE attachments SET expires_at = NULL WHERE id = ?"
                                  " AND owner_id = ?", (new, owner_id))
        await self._db.run_interaction("attachment_avatar", change)

    # -- the clean-up ---------------------------------------------------------

    async def mark_gone(self, now: int, batch: int) -> int:
        """Mark what is due as gone: expired (unfinished past its upload
        expiry, or completed past its retention), orphaned (its owner's
        account deleted), or named by messages once and by none now.
        Answers how many were marked."""
        # An owner's avatar (its avatarUrl names it) is kept while it is.
        return await self._db.run_operation(
            "UPDATE attachments SET gone_at = ? WHERE id IN (SELECT id FROM attachments"
            " WHERE gone_at IS NULL AND (owner_id IS NULL OR ((expires_at <= ?"
            "  OR (referenced AND NOT EXISTS (SELECT 1 FROM message_attachments m"
            "   WHERE m.attachment_id = attachments.id)))"
            "  AND NOT EXISTS (SELECT 1 FROM cyphr_identities i"
            "   WHERE i.id = attachments.owner_id AND i.avatar_url = attachments.id)))"
            " LIMIT ?)", (now, now, batch))

    async def stored(self) -> tuple[int, int]:
        """How many finished attachments are kept, and their bytes."""
        rows = await self._db.run_query(
            "SELECT COUNT(*), COALESCE(SUM(length), 0) FROM attachments"
            " WHERE completed_at IS NOT NULL AND gone_at IS NULL")
        return int(rows[0][0]), int(rows[0][1])

    async def gone(self, batch: int) -> list[Attachment]:
        """Attachments marked gone, whose blobs are to be removed."""
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM attachments WHERE gone_at IS NOT NULL"
            " ORDER BY gone_at LIMIT ?", (batch,))
        return [_attachment(row) for row in rows]

    async def forget(self, attachment_id: str) -> bool:
        """Its blob is removed: the row goes (and with it any message's
        mention of it). Whether this call removed it (two clean-ups at once,
        on two nodes, may both remove a blob; one removes the row)."""
        return await self._db.run_operation(
            "DELETE FROM attachments WHERE id = ?", (attachment_id,)) > 0


async def attach_txn(txn: Transaction, chat_id: str, seq: int, attachment_ids: list[str]) -> None:
    """In a send's transaction: message (chat_id, seq) names these
    attachments (those not gone: one its owner deleted since the send was
    checked is not named)."""
    for attachment_id in attachment_ids:
        await txn.execute(
            "INSERT INTO message_attachments (chat_id, seq, attachment_id)"
            " SELECT ?, ?, id FROM attachments WHERE id = ? AND gone_at IS NULL",
            (chat_id, seq, attachment_id))
    marks = ", ".join("?" for _ in attachment_ids)
    await txn.execute("UPDATE attachments SET referenced = TRUE WHERE id IN (" + marks + ")",
                      attachment_ids)


async def unattach_txn(txn: Transaction, keys: list[tuple[str, int]]) -> None:
    """In a deletion's transaction: these messages (chat id, seq) no longer
    name anything (the clean-up then removes what no message names)."""
    for chat_id, seq in keys:
        await txn.execute("DELETE FROM message_attachments WHERE chat_id = ? AND seq = ?",
                          (chat_id, seq))
