"""One-time ML-KEM prekeys."""

from __future__ import annotations

from dataclasses import dataclass

from cyphr.db import Database, IntegrityError, Transaction


@dataclass(frozen=True)
class Prekey:
    key_id: int
    kyber_public_key: bytes
    signature: bytes


class PrekeyLimit(Exception):
    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.total = total


class DuplicatePrekey(Exception):
    pass


class PrekeyStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, user_id: str, prekeys: list[Prekey], cap: int, now: int) -> int:
        """Store all of ``prekeys`` or none; answer how many the user now has.
        PrekeyLimit when they would pass ``cap``; DuplicatePrekey when a
        keyId is already there."""
        return await self._db.run_interaction("add_prekeys", _add_txn, user_id, prekeys, cap, now)

    async def count(self, user_id: str) -> int:
        rows = await self._db.run_query(
            "SELECT COUNT(*) FROM one_time_prekeys WHERE user_id = ?", (user_id,))
        return rows[0][0]

    async def claim(self, user_id: str) -> Prekey | None:
        """Hand out one prekey and delete it, in one statement: concurrent
        claims never get the same key."""
        if self._db.engine == "postgresql":
            # SKIP LOCKED: a concurrent claim takes the next key instead of
            # waiting for this one and then finding it gone.
            sql = (
                "DELETE FROM one_time_prekeys WHERE user_id = ? AND key_id ="
                " (SELECT key_id FROM one_time_prekeys WHERE user_id = ?"
                "  ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING key_id, kyber_public_key, signature")
        else:
            # SQLite runs one writer at a time.
            sql = (
                "DELETE FROM one_time_prekeys WHERE user_id = ? AND key_id ="
                " (SELECT key_id FROM one_time_prekeys WHERE user_id = ?"
                "  ORDER BY key_id LIMIT 1)"
                " RETURNING key_id, kyber_public_key, signature")
        rows = await self._db.run_query(sql, (user_id, user_id))
        return Prekey(*rows[0]) if rows else None


async def _add_txn(txn: Transaction, user_id: str, prekeys: list[Prekey], cap: int, now: int) -> int:
    # Lock the owner's row so that two uploads at once cannot both pass the cap.
    await txn.execute("UPDATE cyphr_identities SET updated_at = updated_at WHERE id = ?", (user_id,))
    existing = (await txn.execute(
        "SELECT COUNT(*) FROM one_time_prekeys WHERE user_id = ?", (user_id,)))[0][0]
    if existing + len(prekeys) > cap:
        raise PrekeyLimit(existing)
    values = ", ".join("(?, ?, ?, ?, ?)" for _ in prekeys)
    params: list[object] = []
    for prekey in prekeys:
        params += [user_id, prekey.key_id, prekey.kyber_public_key, prekey.signature, now]
    try:
        await txn.execute(
            "INSERT INTO one_time_prekeys (user_id, key_id, kyber_public_key, signature, created_at)"
            " VALUES " + values, params)
    except IntegrityError:
        raise DuplicatePrekey() from None
    return existing + len(prekeys)
