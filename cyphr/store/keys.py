"""One-time ML-KEM prekeys, each of one device of an identity."""

from __future__ import annotations

from dataclasses import dataclass

from cyphr.db import Database, IntegrityError, Transaction

_RETURNED = "key_id, kyber_public_key, signature, key_created_at, key_expires_at"
# A prekey that may be handed out or counted at ``now``: v1 prekeys have no
# expiry (they go when their owner stores a v2 main key).
_UNEXPIRED = "(key_expires_at IS NULL OR key_expires_at > ?)"


@dataclass(frozen=True)
class Prekey:
    """A one-time prekey with its signature by the identity key: version 2
    binds its id and validity (KeyBinding, label one-time-prekey); version 1
    has no times."""

    key_id: int
    kyber_public_key: bytes
    signature: bytes
    created_at: int | None = None  # ms, as the owner's client signed it
    expires_at: int | None = None  # ms

    @property
    def signature_version(self) -> int:
        return 1 if self.expires_at is None else 2


class PrekeyLimit(Exception):
    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.total = total


class DuplicatePrekey(Exception):
    pass


class PrekeyStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, user_id: str, device_id: int, prekeys: list[Prekey], cap: int,
                  now: int) -> int:
        """Store all of ``prekeys`` for the device or none; answer how many
        unexpired ones the device now has. The device's expired prekeys are
        deleted first. PrekeyLimit when they would pass ``cap``;
        DuplicatePrekey when a keyId is already there; LookupError when the
        device is gone."""
        return await self._db.run_interaction("add_prekeys", _add_txn, user_id, device_id, prekeys,
                                              cap, now)

    async def count(self, user_id: str, device_id: int, now: int) -> int:
        """The device's prekeys that have not expired at ``now``."""
        rows = await self._db.run_query(
            "SELECT COUNT(*) FROM one_time_prekeys WHERE user_id = ? AND device_id = ? AND "
            + _UNEXPIRED, (user_id, device_id, now))
        return rows[0][0]

    async def claim(self, user_id: str, device_id: int, now: int) -> Prekey | None:
        """Hand out one unexpired prekey and delete it, in one statement:
        concurrent claims never get the same key, and none expired at
        ``now`` is handed out."""
        if self._db.engine == "postgresql":
            # SKIP LOCKED: a concurrent claim takes the next key instead of
            # waiting for this one and then finding it gone.
            sql = (
                "DELETE FROM one_time_prekeys WHERE user_id = ? AND device_id = ? AND key_id ="
                " (SELECT key_id FROM one_time_prekeys WHERE user_id = ? AND device_id = ? AND "
                + _UNEXPIRED +
                "  ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING " + _RETURNED)
        else:
            # SQLite runs one writer at a time.
            sql = (
                "DELETE FROM one_time_prekeys WHERE user_id = ? AND device_id = ? AND key_id ="
                " (SELECT key_id FROM one_time_prekeys WHERE user_id = ? AND device_id = ? AND "
                + _UNEXPIRED +
                "  ORDER BY key_id LIMIT 1)"
                " RETURNING " + _RETURNED)
        rows = await self._db.run_query(sql, (user_id, device_id, user_id, device_id, now))
        return Prekey(*rows[0]) if rows else None


async def _add_txn(txn: Transaction, user_id: str, device_id: int, prekeys: list[Prekey], cap: int,
                   now: int) -> int:
    # Lock the device's row so that two uploads at once cannot both pass
    # the cap (and so that it cannot be removed under this upload).
    await txn.execute("UPDATE devices SET created_at = created_at WHERE user_id = ? AND device_id = ?",
                      (user_id, device_id))
    if not txn.rowcount:
        raise LookupError((user_id, device_id))
    # Expired prekeys are never handed out again: they neither count against
    # the cap nor block their keyId.
    await txn.execute(
        "DELETE FROM one_time_prekeys WHERE user_id = ? AND device_id = ? AND key_expires_at <= ?",
        (user_id, device_id, now))
    existing = (await txn.execute(
        "SELECT COUNT(*) FROM one_time_prekeys WHERE user_id = ? AND device_id = ?",
        (user_id, device_id)))[0][0]
    if existing + len(prekeys) > cap:
        raise PrekeyLimit(existing)
    values = ", ".join("(?, ?, ?, ?, ?, ?, ?, ?, ?)" for _ in prekeys)
    params: list[object] = []
    for prekey in prekeys:
        params += [user_id, device_id, prekey.key_id, prekey.kyber_public_key, prekey.signature,
                   now, prekey.created_at, prekey.expires_at, prekey.signature_version]
    try:
        await txn.execute(
            "INSERT INTO one_time_prekeys (user_id, device_id, key_id, kyber_public_key, signature,"
            " created_at, key_created_at, key_expires_at, signature_version) VALUES " + values,
            params)
    except IntegrityError:
        raise DuplicatePrekey() from None
    return existing + len(prekeys)
