"""Session keys (schema 014): an identity's X25519 key for sessions and
each device's signed, last-resort and one-time prekeys."""

from __future__ import annotations

from dataclasses import dataclass

from cyphr.db import Database, IntegrityError, Transaction
from cyphr.signing import (
    DH_ONE_TIME_PREKEY,
    DH_SIGNED_PREKEY,
    KEM_LAST_RESORT_PREKEY,
    KEM_ONE_TIME_PREKEY,
)

ONE_TIME_KINDS = (DH_ONE_TIME_PREKEY, KEM_ONE_TIME_PREKEY)
_COLUMNS = "kind, key_id, public_key, signature, key_created_at, key_expires_at"


@dataclass(frozen=True)
class SessionPrekey:
    """A prekey as its owner signed it (kind: cyphr.signing's prekey kinds)."""

    kind: int
    key_id: int
    public_key: bytes
    signature: bytes
    created_at: int  # ms
    expires_at: int  # ms


@dataclass(frozen=True)
class IdentityDh:
    public_key: bytes
    signature: bytes


@dataclass(frozen=True)
class DeviceBundle:
    """What one device hands out to start a session: its signed prekey,
    an ML-KEM prekey (one-time, or its last-resort one) and a one-time
    X25519 prekey when one is left."""

    device_id: int
    signed_prekey: SessionPrekey
    kem_prekey: SessionPrekey
    one_time_prekey: SessionPrekey | None


@dataclass(frozen=True)
class Upload:
    """One upload of a device's session keys; None or empty: unchanged."""

    identity_dh: IdentityDh | None
    signed_prekey: SessionPrekey | None
    last_resort_prekey: SessionPrekey | None
    one_time_prekeys: list[SessionPrekey]


@dataclass(frozen=True)
class Stock:
    """A device's session keys now: its signed and last-resort prekeys (or
    None) and how many unexpired one-time prekeys of each kind it has."""

    identity_dh: IdentityDh | None
    signed_prekey: SessionPrekey | None
    last_resort_prekey: SessionPrekey | None
    one_time: int
    kem_one_time: int


class IdentityDhMismatch(Exception):
    """The identity already has another X25519 key for sessions."""


class OneTimeLimit(Exception):
    def __init__(self, kind: int, total: int) -> None:
        super().__init__(kind, total)
        self.kind = kind
        self.total = total


class DuplicateSessionPrekey(Exception):
    pass


class SessionKeyStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def put(self, user_id: str, device_id: int, upload: Upload, cap: int,
                  now: int) -> Stock:
        """Store all of ``upload`` for the device, or none of it. The signed
        and last-resort prekeys replace the device's; one-time prekeys are
        added, at most ``cap`` unexpired ones of each kind (OneTimeLimit),
        each keyId once per kind (DuplicateSessionPrekey). The identity's
        X25519 key is set once (IdentityDhMismatch for another one).
        LookupError when the device is gone."""
        return await self._db.run_interaction("put_session_keys", _put_txn, user_id, device_id,
                                              upload, cap, now)

    async def stock(self, user_id: str, device_id: int, now: int) -> Stock:
        return await self._db.run_interaction("session_key_stock", _stock_txn, user_id,
                                              device_id, now)

    async def identity_dh(self, user_id: str) -> IdentityDh | None:
        rows = await self._db.run_query(
            "SELECT public_key, signature FROM session_identity_keys WHERE user_id = ?", (user_id,))
        return IdentityDh(bytes(rows[0][0]), bytes(rows[0][1])) if rows else None

    async def claim(self, user_id: str, device_ids: list[int], now: int, *,
                    one_time: set[int]) -> tuple[list[DeviceBundle], dict[int, tuple[int, int]]]:
        """A bundle of each of ``device_ids`` that has an unexpired signed
        prekey and last-resort prekey (the others have none to give). The
        bundle of a device in ``one_time`` takes one unexpired one-time
        prekey of each kind where the device has one, and deletes it:
        concurrent claims never get the same one. The others carry the
        last-resort key and no one-time prekey. Also answers, for each
        device that gave one-time prekeys, how many unexpired ones of each
        kind (X25519, ML-KEM) it has left."""
        return await self._db.run_interaction("claim_session_bundles", _claim_txn, user_id,
                                              device_ids, now, one_time, self._db.engine)


def _prekey(row: tuple) -> SessionPrekey:
    kind, key_id, public_key, signature, created_at, expires_at = row
    return SessionPrekey(kind, key_id, bytes(public_key), bytes(signature), created_at,
                         expires_at)


async def _put_txn(txn: Transaction, user_id: str, device_id: int, upload: Upload, cap: int,
                   now: int) -> Stock:
    # Lock the device's row: two uploads at once cannot both pass the cap,
    # and the device cannot be removed under this one.
    await txn.execute("UPDATE devices SET created_at = created_at WHERE user_id = ? AND device_id = ?",
                      (user_id, device_id))
    if not txn.rowcount:
        raise LookupError((user_id, device_id))
    if upload.identity_dh is not None:
        rows = await txn.execute(
            "SELECT public_key FROM session_identity_keys WHERE user_id = ?", (user_id,))
        if not rows:
            await txn.execute(
                "INSERT INTO session_identity_keys (user_id, public_key, signature, created_at)"
                " VALUES (?, ?, ?, ?)",
                (user_id, upload.identity_dh.public_key, upload.identity_dh.signature, now))
        elif bytes(rows[0][0]) != upload.identity_dh.public_key:
            raise IdentityDhMismatch()
    # Expired one-time prekeys are never handed out: they neither count
    # against the cap nor block their keyId.
    await txn.execute(
        "DELETE FROM session_prekeys WHERE user_id = ? AND device_id = ? AND kind IN (?, ?)"
        " AND key_expires_at <= ?", (user_id, device_id, *ONE_TIME_KINDS, now))
    for prekey in (upload.signed_prekey, upload.last_resort_prekey):
        if prekey is not None:
            await txn.execute(
                "DELETE FROM session_prekeys WHERE user_id = ? AND device_id = ? AND kind = ?",
                (user_id, device_id, prekey.kind))
    for kind in ONE_TIME_KINDS:
        adding = sum(1 for p in upload.one_time_prekeys if p.kind == kind)
        if not adding:
            continue
        existing = (await txn.execute(
            "SELECT COUNT(*) FROM session_prekeys WHERE user_id = ? AND device_id = ? AND kind = ?",
            (user_id, device_id, kind)))[0][0]
        if existing + adding > cap:
            raise OneTimeLimit(kind, existing)
    rows = [p for p in (upload.signed_prekey, upload.last_resort_prekey) if p is not None]
    rows += upload.one_time_prekeys
    if rows:
        params: list[object] = []
        for p in rows:
            params += [user_id, device_id, p.kind, p.key_id, p.public_key, p.signature,
                       p.created_at, p.expires_at]
        try:
            await txn.execute(
                "INSERT INTO session_prekeys (user_id, device_id, kind, key_id, public_key,"
                " signature, key_created_at, key_expires_at) VALUES "
                + ", ".join("(?, ?, ?, ?, ?, ?, ?, ?)" for _ in rows), params)
        except IntegrityError:
            raise DuplicateSessionPrekey() from None
    return await _stock_txn(txn, user_id, device_id, now)


async def _stock_txn(txn: Transaction, user_id: str, device_id: int, now: int) -> Stock:
    identity = await txn.execute(
        "SELECT public_key, signature FROM session_identity_keys WHERE user_id = ?", (user_id,))
    single = await txn.execute(
        "SELECT " + _COLUMNS + " FROM session_prekeys WHERE user_id = ? AND device_id = ?"
        " AND kind IN (?, ?)", (user_id, device_id, DH_SIGNED_PREKEY, KEM_LAST_RESORT_PREKEY))
    by_kind = {row[0]: _prekey(row) for row in single}
    counts = dict(await txn.execute(
        "SELECT kind, COUNT(*) FROM session_prekeys WHERE user_id = ? AND device_id = ?"
        " AND kind IN (?, ?) AND key_expires_at > ? GROUP BY kind",
        (user_id, device_id, *ONE_TIME_KINDS, now)))
    return Stock(IdentityDh(bytes(identity[0][0]), bytes(identity[0][1])) if identity else None,
                 by_kind.get(DH_SIGNED_PREKEY), by_kind.get(KEM_LAST_RESORT_PREKEY),
                 counts.get(DH_ONE_TIME_PREKEY, 0), counts.get(KEM_ONE_TIME_PREKEY, 0))


async def _claim_txn(txn: Transaction, user_id: str, device_ids: list[int], now: int,
                     one_time: set[int], engine: str
                     ) -> tuple[list[DeviceBundle], dict[int, tuple[int, int]]]:
    if not device_ids:
        return [], {}
    marks = ", ".join("?" for _ in device_ids)
    rows = await txn.execute(
        "SELECT device_id, " + _COLUMNS + " FROM session_prekeys WHERE user_id = ?"
        " AND device_id IN (" + marks + ") AND kind IN (?, ?) AND key_expires_at > ?",
        (user_id, *device_ids, DH_SIGNED_PREKEY, KEM_LAST_RESORT_PREKEY, now))
    single: dict[int, dict[int, SessionPrekey]] = {}
    for device_id, *row in rows:
        single.setdefault(device_id, {})[row[0]] = _prekey(tuple(row))
    # SKIP LOCKED (PostgreSQL): a concurrent claim takes the next key
    # instead of waiting for this one and then finding it gone. SQLite runs
    # one writer at a time.
    skip = " FOR UPDATE SKIP LOCKED" if engine == "postgresql" else ""
    bundles = []
    left: dict[int, tuple[int, int]] = {}
    for device_id in sorted(single):
        keys = single[device_id]
        if DH_SIGNED_PREKEY not in keys or KEM_LAST_RESORT_PREKEY not in keys:
            continue
        taken: dict[int, SessionPrekey] = {}
        if device_id in one_time:
            for kind in ONE_TIME_KINDS:
                found = await txn.execute(
                    "DELETE FROM session_prekeys WHERE user_id = ? AND device_id = ? AND kind = ?"
                    " AND key_id = (SELECT key_id FROM session_prekeys WHERE user_id = ?"
                    "  AND device_id = ? AND kind = ? AND key_expires_at > ?"
                    "  ORDER BY key_id LIMIT 1" + skip + ") RETURNING " + _COLUMNS,
                    (user_id, device_id, kind, user_id, device_id, kind, now))
                if found:
                    taken[kind] = _prekey(found[0])
            counts = dict(await txn.execute(
                "SELECT kind, COUNT(*) FROM session_prekeys WHERE user_id = ? AND device_id = ?"
                " AND kind IN (?, ?) AND key_expires_at > ? GROUP BY kind",
                (user_id, device_id, *ONE_TIME_KINDS, now)))
            left[device_id] = (counts.get(DH_ONE_TIME_PREKEY, 0),
                               counts.get(KEM_ONE_TIME_PREKEY, 0))
        bundles.append(DeviceBundle(device_id, keys[DH_SIGNED_PREKEY],
                                    taken.get(KEM_ONE_TIME_PREKEY, keys[KEM_LAST_RESORT_PREKEY]),
                                    taken.get(DH_ONE_TIME_PREKEY)))
    return bundles, left
