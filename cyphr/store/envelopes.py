"""
Envelopes: a message sent over sessions carries one body, stored in the
message's row, and one envelope per recipient device (docs/encryption.rst,
"Messages over sessions"). Each device is given only its own. An envelope
goes once its device acknowledges the message, when its device is
removed, or after the envelope retention; the body goes with the last
envelope of its message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cyphr.db import Database, Transaction

KINDS = ("prekey", "message")
ROWS_PER_STATEMENT = 500   # envelopes inserted per statement (SQLite's variable limit)


@dataclass(frozen=True, slots=True)
class SealedFor:
    """One envelope of a message: for the device ``device_id`` of ``cyphr_id``."""

    cyphr_id: str
    device_id: int
    kind: str       # KINDS
    envelope: bytes


async def insert_envelopes(txn: Transaction, engine: str,
                           rows: list[tuple[str, int, SealedFor, int]]) -> None:
    """Store ``(chat id, seq, envelope, created at)`` rows. An envelope for
    a device that is not there (removed since the send's device check)
    is left out, rather than failing the whole batch."""
    if engine == "postgresql":
        # Arrays, typed: one statement whatever the count.
        await txn.execute(
            _INSERT + "FROM unnest(?::text[], ?::integer[], ?::uuid[], ?::bigint[], ?::text[],"
            " ?::bytea[], ?::bigint[]) AS v (cyphr_id, device_id, chat_id, seq, kind, envelope,"
            " created_at)" + _TO_DEVICES,
            ([sealed.cyphr_id for _, _, sealed, _ in rows], [sealed.device_id for _, _, sealed, _ in rows],
             [chat_id for chat_id, _, _, _ in rows], [seq for _, seq, _, _ in rows],
             [sealed.kind for _, _, sealed, _ in rows], [sealed.envelope for _, _, sealed, _ in rows],
             [created_at for _, _, _, created_at in rows]))
        return
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start:start + ROWS_PER_STATEMENT]
        values: list[Any] = []
        for chat_id, seq, sealed, created_at in chunk:
            values += [sealed.cyphr_id, sealed.device_id, chat_id, seq, sealed.kind,
                       sealed.envelope, created_at]
        await txn.execute(
            _INSERT + "FROM (" + " UNION ALL ".join(
                ["SELECT ? AS cyphr_id, ? AS device_id, ? AS chat_id, ? AS seq, ? AS kind,"
                 " ? AS envelope, ? AS created_at"] * len(chunk)) + ") v" + _TO_DEVICES, values)


_INSERT = (
    "INSERT INTO message_envelopes (user_id, device_id, chat_id, seq, kind, envelope, created_at)"
    " SELECT d.user_id, d.device_id, v.chat_id, v.seq, v.kind, v.envelope, v.created_at ")
_TO_DEVICES = (
    " JOIN cyphr_identities i ON i.cyphr_id = v.cyphr_id"
    " JOIN devices d ON d.user_id = i.id AND d.device_id = v.device_id")


async def drop_envelope(txn: Transaction, device: tuple[str, int], chat_id: str, seq: int) -> None:
    """The device (user id, device id) acknowledged the message: its
    envelope goes, and the body with the message's last one."""
    await txn.execute(
        "DELETE FROM message_envelopes WHERE user_id = ? AND device_id = ? AND chat_id = ? AND seq = ?",
        (*device, chat_id, seq))
    if txn.rowcount:
        await erase_bare_bodies(txn, [(chat_id, seq)])


async def drop_device_envelopes(txn: Transaction, user_id: str,
                                device_ids: Iterable[int] | None = None) -> None:
    """The devices (all the identity's, when None) are going: their
    envelopes go, and the bodies that had no other. (The foreign key would
    delete the envelopes too, but leave the bodies.)"""
    where, params = "user_id = ?", [user_id]
    if device_ids is not None:
        ids = list(device_ids)
        if not ids:
            return
        where += " AND device_id IN (" + ", ".join("?" for _ in ids) + ")"
        params += ids
    rows = await txn.execute("DELETE FROM message_envelopes WHERE " + where + " RETURNING chat_id, seq",
                             params)
    await erase_bare_bodies(txn, [(str(chat_id), seq) for chat_id, seq in rows])


async def erase_bare_bodies(txn: Transaction, keys: list[tuple[str, int]]) -> None:
    """Erase the bodies of these messages (chat id, seq) that have no
    envelope left. Their rows stay, as a deleted message's do: seqs,
    receipts and the sender's history keep their place.

    The rows are locked first (an UPDATE that changes nothing): two devices
    acknowledging the last two envelopes of a message at once would each
    see the other's envelope still there and neither would erase the body.
    Locked, the second waits for the first, and its next statement sees
    the first's deletion."""
    by_chat: dict[str, set[int]] = {}
    for chat_id, seq in keys:
        by_chat.setdefault(chat_id, set()).add(seq)
    for chat_id, seqs in sorted(by_chat.items()):
        ordered = sorted(seqs)
        for start in range(0, len(ordered), ROWS_PER_STATEMENT):
            chunk = ordered[start:start + ROWS_PER_STATEMENT]
            marks = ", ".join("?" for _ in chunk)
            await txn.execute(
                "UPDATE messages SET encrypted_content = encrypted_content"
                " WHERE chat_id = ? AND seq IN (" + marks + ")", (chat_id, *chunk))
            await txn.execute(
                "UPDATE messages SET encrypted_content = NULL WHERE chat_id = ? AND seq IN (" + marks + ")"
                " AND encrypted_content IS NOT NULL AND NOT EXISTS (SELECT 1 FROM message_envelopes e"
                "  WHERE e.chat_id = messages.chat_id AND e.seq = messages.seq)", (chat_id, *chunk))


class EnvelopeStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def for_device(self, cyphr_id: str, device: tuple[str, int],
                         keys: list[tuple[str, int]]) -> dict[tuple[str, int], SealedFor]:
        """The device's envelopes among these messages (chat id, seq)."""
        by_chat: dict[str, list[int]] = {}
        for chat_id, seq in keys:
            by_chat.setdefault(chat_id, []).append(seq)
        found: dict[tuple[str, int], SealedFor] = {}
        for chat_id, seqs in by_chat.items():
            for start in range(0, len(seqs), ROWS_PER_STATEMENT):
                chunk = seqs[start:start + ROWS_PER_STATEMENT]
                rows = await self._db.run_query(
                    "SELECT seq, kind, envelope FROM message_envelopes WHERE user_id = ?"
                    " AND device_id = ? AND chat_id = ? AND seq IN ("
                    + ", ".join("?" for _ in chunk) + ")", (*device, chat_id, *chunk))
                for seq, kind, envelope in rows:
                    found[(chat_id, seq)] = SealedFor(cyphr_id, device[1], kind, bytes(envelope))
        return found

    async def of_messages(self, chat_id: str, seqs: list[int]) -> dict[int, tuple[SealedFor, ...]]:
        """Every envelope still held of these messages of one chat, by seq
        (for a node that fetches a message to push it to its sockets)."""
        found: dict[int, list[SealedFor]] = {}
        for start in range(0, len(seqs), ROWS_PER_STATEMENT):
            chunk = seqs[start:start + ROWS_PER_STATEMENT]
            rows = await self._db.run_query(
                "SELECT e.seq, i.cyphr_id, e.device_id, e.kind, e.envelope FROM message_envelopes e"
                " JOIN cyphr_identities i ON i.id = e.user_id"
                " WHERE e.chat_id = ? AND e.seq IN (" + ", ".join("?" for _ in chunk) + ")",
                (chat_id, *chunk))
            for seq, cyphr_id, device_id, kind, envelope in rows:
                found.setdefault(seq, []).append(SealedFor(cyphr_id, device_id, kind, bytes(envelope)))
        return {seq: tuple(envelopes) for seq, envelopes in found.items()}

    async def purge_older_than(self, cutoff: int, batch: int) -> int:
        """Delete up to ``batch`` envelopes made before ``cutoff`` (their
        devices never acknowledged them), with the bodies they leave bare;
        answer how many."""
        return await self._db.run_interaction("purge_envelopes", _purge_txn, cutoff, batch)


async def _purge_txn(txn: Transaction, cutoff: int, batch: int) -> int:
    rows = await txn.execute(
        "DELETE FROM message_envelopes WHERE (user_id, device_id, chat_id, seq) IN"
        " (SELECT user_id, device_id, chat_id, seq FROM message_envelopes WHERE created_at < ?"
        "  ORDER BY created_at LIMIT ?) RETURNING chat_id, seq", (cutoff, batch))
    await erase_bare_bodies(txn, [(str(chat_id), seq) for chat_id, seq in rows])
    return len(rows)
