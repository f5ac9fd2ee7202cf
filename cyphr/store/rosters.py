"""Group rosters (cyphr.rosters): each group's chain of signed changes, and
its members made to follow it, in one transaction."""

from __future__ import annotations

from dataclasses import dataclass

from cyphr.db import Database, IntegrityError, Transaction


@dataclass(frozen=True, slots=True)
class StoredChange:
    epoch: int
    change: bytes       # cyphr.rosters.SignedChange, as signed
    author_key: bytes   # the author's Ed25519 identity key when it was stored


@dataclass(frozen=True, slots=True)
class Followed:
    """What a change did to the group's members."""

    added: tuple[tuple[str, int], ...]    # (Cyphr ID, joined_seq)
    removed: tuple[str, ...]
    roles: tuple[tuple[str, str], ...]    # (Cyphr ID, new role)


class RosterConflict(Exception):
    """Another change took the epoch first (the roster is at ``epoch``)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(epoch)
        self.epoch = epoch


class RosterStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def chain(self, chat_id: str) -> list[StoredChange]:
        rows = await self._db.run_query(
            "SELECT epoch, change, author_key FROM group_rosters WHERE chat_id = ? ORDER BY epoch",
            (chat_id,))
        return [StoredChange(epoch, bytes(change), bytes(key)) for epoch, change, key in rows]

    async def has_roster(self, chat_id: str) -> bool:
        rows = await self._db.run_query("SELECT 1 FROM group_rosters WHERE chat_id = ? LIMIT 1",
                                        (chat_id,))
        return bool(rows)

    async def append(self, chat_id: str, epoch: int, change: bytes, author: str, author_key: bytes,
                     added: dict[str, str], removed: list[str], roles: dict[str, str],
                     now: int) -> Followed:
        """Store the change of ``epoch`` and do to the group's members what
        it does: ``added`` (Cyphr ID to role), ``removed``, ``roles`` (new
        roles of members it keeps). RosterConflict if the roster is not at
        ``epoch - 1`` now."""
        return await self._db.run_interaction("append_roster", _append_txn, chat_id, epoch, change,
                                              author, author_key, added, removed, roles, now)


async def _append_txn(txn: Transaction, chat_id: str, epoch: int, change: bytes, author: str,
                      author_key: bytes, added: dict[str, str], removed: list[str],
                      roles: dict[str, str], now: int) -> Followed:
    # The chat's row, locked: changes and member changes of one group take turns.
    await txn.execute("UPDATE chats SET updated_at = updated_at WHERE id = ?", (chat_id,))
    [(current,)] = await txn.execute(
        "SELECT COALESCE(MAX(epoch), 0) FROM group_rosters WHERE chat_id = ?", (chat_id,))
    if current != epoch - 1:
        raise RosterConflict(current)
    try:
        await txn.execute(
            "INSERT INTO group_rosters (chat_id, epoch, change, author, author_key, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", (chat_id, epoch, change, author, author_key, now))
    except IntegrityError:
        raise RosterConflict(epoch) from None
    gone = []
    for cyphr_id in sorted(removed):
        await txn.execute("DELETE FROM chat_participants WHERE chat_id = ? AND user_id = ?",
                          (chat_id, cyphr_id))
        if txn.rowcount:
            gone.append(cyphr_id)
    joined = []
    for cyphr_id, role in sorted(added.items()):
        rows = await txn.execute(
            "INSERT INTO chat_participants (chat_id, user_id, role, joined_at, read_up_to_seq,"
            " delivered_up_to_seq, joined_seq) SELECT ?, ?, ?, ?, last_seq, last_seq, last_seq"
            " FROM chats WHERE id = ? ON CONFLICT (chat_id, user_id) DO NOTHING RETURNING joined_seq",
            (chat_id, cyphr_id, role, now, chat_id))
        if rows:
            joined.append((cyphr_id, rows[0][0]))
    changed = []
    for cyphr_id, role in sorted(roles.items()):
        await txn.execute("UPDATE chat_participants SET role = ? WHERE chat_id = ? AND user_id = ?",
                          (role, chat_id, cyphr_id))
        if txn.rowcount:
            changed.append((cyphr_id, role))
    return Followed(tuple(joined), tuple(gone), tuple(changed))
