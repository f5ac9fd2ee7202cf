"""Identities: who is who, with their public keys and profile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyphr.db import Database, IntegrityError, Transaction
from cyphr.store.challenges import CONSUME
from cyphr.store.envelopes import drop_device_envelopes

_COLUMNS = (
    "i.id, i.cyphr_id, i.public_key, d.kyber_public_key, d.kyber_key_signature,"
    " d.kyber_key_id, d.kyber_key_created_at, d.kyber_key_expires_at,"
    " COALESCE(d.kyber_key_signature_version, 1),"
    " i.display_name, i.avatar_url, i.encrypted_settings,"
    " i.tokens_valid_after, i.created_at, i.updated_at, i.last_seen,"
    " COALESCE(t.enabled, FALSE), d.device_id"
)
# The key an identity shows in the single-device API (its profile,
# public-key/:cyphrId) is its lowest-numbered device's.
_PRIMARY_DEVICE = (
    " LEFT JOIN devices d ON d.user_id = i.id"
    " AND d.device_id = (SELECT MIN(device_id) FROM devices WHERE user_id = i.id)")
_FROM = " FROM cyphr_identities i LEFT JOIN totp_secrets t ON t.user_id = i.id" + _PRIMARY_DEVICE


@dataclass(frozen=True)
class MainKey:
    """A device's ML-KEM key with its signature by the identity key:
    version 3 binds the device id too (DeviceKeyBinding, label device-key);
    version 2 binds its id and validity (KeyBinding, label ml-kem-key), as
    clients of the single-device API sign; version 1, from before, has
    neither."""

    kyber_public_key: bytes
    signature: bytes
    key_id: int | None = None
    created_at: int | None = None  # ms, as the owner's client signed it
    expires_at: int | None = None  # ms
    device_bound: bool = False  # signed as a DeviceKeyBinding (version 3)

    @property
    def signature_version(self) -> int:
        if self.expires_at is None:
            return 1
        return 3 if self.device_bound else 2


def key_from_row(row: tuple[Any, ...]) -> MainKey:
    """A MainKey from (key, signature, id, created, expires, version) columns."""
    key, signature, key_id, created_at, expires_at, version = row
    return MainKey(bytes(key), bytes(signature), key_id, created_at, expires_at,
                   device_bound=version == 3)


def key_values(key: MainKey) -> tuple[Any, ...]:
    """The columns of key_from_row, to store ``key``."""
    return (key.kyber_public_key, key.signature, key.key_id, key.created_at, key.expires_at,
            key.signature_version)


@dataclass(frozen=True)
class Identity:
    id: str
    cyphr_id: str
    public_key: bytes
    kyber_public_key: bytes | None
    kyber_key_signature: bytes | None
    kyber_key_id: int | None
    kyber_key_created_at: int | None
    kyber_key_expires_at: int | None
    kyber_key_signature_version: int
    display_name: str | None
    avatar_url: str | None
    encrypted_settings: str | None
    tokens_valid_after: int
    created_at: int
    updated_at: int
    last_seen: int | None
    totp_enabled: bool
    # The lowest-numbered device, whose key the kyber_* fields are (None:
    # the identity has no device).
    primary_device_id: int | None = None


def _identity(row: tuple[Any, ...]) -> Identity:
    return Identity(*row[:16], totp_enabled=bool(row[16]), primary_device_id=row[17])


@dataclass(frozen=True)
class AuthState:
    """What authenticating a token needs to know of its identity and device
    (``device_id`` None: the identity has no device of the token's
    fingerprint, removed or never linked)."""

    cyphr_id: str
    tokens_valid_after: int  # ms, of the identity
    device_id: int | None
    device_tokens_valid_after: int  # ms, of the device
    revoked: bool


PROFILE_COLUMNS = {
    "display_name": "display_name = ?",
    "avatar_url": "avatar_url = ?",
    "encrypted_settings": "encrypted_settings = ?",
}


class IdentityTaken(Exception):
    pass


class StaleKey(Exception):
    """A main key older than the stored one (a lower id, or the same id
    with other bytes): storing it would roll the directory back."""

    def __init__(self, current_id: int | None) -> None:
        super().__init__(current_id)
        self.current_id = current_id


class IdentityStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def is_available(self, cyphr_id: str) -> bool:
        rows = await self._db.run_query(
            "SELECT 1 FROM cyphr_identities WHERE cyphr_id = ?"
            " UNION ALL SELECT 1 FROM retired_cyphr_ids WHERE cyphr_id = ?",
            (cyphr_id, cyphr_id))
        return not rows

    async def create(self, identity: Identity, device_fingerprint_hash: str, key: MainKey) -> None:
        """Store a new identity with its device 1 holding ``key``;
        IdentityTaken if the name is in use or retired."""
        try:
            await self._db.run_interaction("create_identity", _create_txn, identity,
                                           device_fingerprint_hash, key)
        except IntegrityError:
            raise IdentityTaken() from None

    async def by_cyphr_id(self, cyphr_id: str) -> Identity | None:
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + _FROM + " WHERE i.cyphr_id = ?", (cyphr_id,))
        return _identity(rows[0]) if rows else None

    async def by_id(self, user_id: str) -> Identity | None:
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + _FROM + " WHERE i.id = ?", (user_id,))
        return _identity(rows[0]) if rows else None

    async def consume_challenge_and_get(self, challenge_id: str, cyphr_id: str, now: int
                                        ) -> tuple[bytes | None, Identity | None]:
        """Use up a challenge issued for ``cyphr_id`` (see ChallengeStore.consume)
        and read that identity: the challenge's bytes (None if it was not
        usable) and the identity (None if there is none). Login does this on
        every call, so on PostgreSQL it is one round trip, the UPDATE running
        in a WITH clause; SQLite has no data-modifying WITH, and runs two
        statements on its local file."""
        if self._db.engine == "postgresql":
            rows = await self._db.run_query(
                "WITH used AS (" + CONSUME + ")"
                " SELECT (SELECT challenge FROM used), " + _COLUMNS +
                " FROM (SELECT 1) AS one LEFT JOIN"
                " (cyphr_identities i LEFT JOIN totp_secrets t ON t.user_id = i.id"
                + _PRIMARY_DEVICE + ") ON i.cyphr_id = ?", (now, challenge_id, cyphr_id, now, cyphr_id))
            challenge, identity = rows[0][0], rows[0][1:]
            return challenge, (_identity(identity) if identity[0] is not None else None)
        rows = await self._db.run_query(CONSUME, (now, challenge_id, cyphr_id, now))
        return (rows[0][0] if rows else None), await self.by_cyphr_id(cyphr_id)

    async def auth_states(self, keys: list[tuple[str, str, str]]
                          ) -> dict[tuple[str, str, str], AuthState]:
        """What authenticating needs to know, for many (user id, jti, device
        fingerprint hash) triples in one round trip (see AuthStateLoader);
        triples whose identity is gone are missing from the answer."""
        users = sorted({user for user, _, _ in keys})
        jtis = sorted({jti for _, jti, _ in keys})
        devices = sorted({device for _, _, device in keys})
        user_marks = ", ".join("?" for _ in users)
        rows = await self._db.run_query(
            "SELECT i.id, i.cyphr_id, i.tokens_valid_after, d.fingerprint_hash, d.device_id,"
            " d.tokens_valid_after, NULL"
            " FROM cyphr_identities i LEFT JOIN devices d ON d.user_id = i.id"
            " AND d.fingerprint_hash IN (" + ", ".join("?" for _ in devices) + ")"
            " WHERE i.id IN (" + user_marks + ")"
            " UNION ALL SELECT r.user_id, NULL, NULL, NULL, NULL, NULL, r.jti FROM revoked_tokens r"
            " WHERE r.user_id IN (" + user_marks + ") AND r.jti IN ("
            + ", ".join("?" for _ in jtis) + ")",
            (*devices, *users, *users, *jtis))
        identities: dict[str, tuple[str, int]] = {}
        found: dict[tuple[str, str], tuple[int, int]] = {}
        revoked: set[tuple[str, str]] = set()
        for user, cyphr_id, valid_after, device, device_id, device_valid_after, jti in rows:
            if jti is not None:
                revoked.add((user, jti))
                continue
            identities[user] = (cyphr_id, valid_after)
            if device is not None:
                found[(user, device)] = (device_id, device_valid_after)
        states = {}
        for user, jti, device in keys:
            if user not in identities:
                continue
            device_id, device_valid_after = found.get((user, device), (None, 0))
            states[(user, jti, device)] = AuthState(
                *identities[user], device_id, device_valid_after, (user, jti) in revoked)
        return states

    async def search(self, prefix: str, limit: int) -> list[Identity]:
        # A range on the (binary-collated) unique index: every character a
        # Cyphr ID may hold sorts below DEL (0x7f).
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + _FROM + " WHERE i.cyphr_id >= ? AND i.cyphr_id < ?"
            " ORDER BY i.cyphr_id LIMIT ?", (prefix, prefix + "\x7f", limit))
        return [_identity(row) for row in rows]

    async def update_profile(self, user_id: str, changes: dict[str, Any], now: int) -> None:
        """Set the given profile columns (keys of PROFILE_COLUMNS) to their values."""
        unknown = set(changes) - set(PROFILE_COLUMNS)
        if unknown:
            raise ValueError(f"not profile columns: {sorted(unknown)}")
        # The statement is assembled from the constant fragments only.
        assignments = ", ".join(PROFILE_COLUMNS[name] for name in changes)
        await self._db.run_operation(
            "UPDATE cyphr_identities SET " + assignments + ", updated_at = ? WHERE id = ?",
            (*changes.values(), now, user_id))

    async def set_last_seen(self, cyphr_id: str, at: int) -> None:
        await self._db.run_operation(
            "UPDATE cyphr_identities SET last_seen = ? WHERE cyphr_id = ?", (at, cyphr_id))

    async def delete(self, identity: Identity, now: int) -> None:
        await self._db.run_interaction("delete_identity", _delete_txn, identity, now)


async def _create_txn(txn: Transaction, identity: Identity, device_fingerprint_hash: str,
                      key: MainKey) -> None:
    rows = await txn.execute(
        "INSERT INTO cyphr_identities (id, cyphr_id, public_key, display_name, next_device_id,"
        " created_at, updated_at)"
        " SELECT ?, ?, ?, ?, 2, ?, ? WHERE NOT EXISTS"
        " (SELECT 1 FROM retired_cyphr_ids WHERE cyphr_id = ?) RETURNING id",
        (identity.id, identity.cyphr_id, identity.public_key, identity.display_name,
         identity.created_at, identity.updated_at, identity.cyphr_id))
    if not rows:
        raise IdentityTaken()
    await txn.execute(
        "INSERT INTO devices (user_id, device_id, fingerprint_hash, kyber_public_key,"
        " kyber_key_signature, kyber_key_id, kyber_key_created_at, kyber_key_expires_at,"
        " kyber_key_signature_version, created_at, last_seen) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (identity.id, device_fingerprint_hash, *key_values(key), identity.created_at,
         identity.created_at))


async def _delete_txn(txn: Transaction, identity: Identity, now: int) -> None:
    """Delete an identity and everything that is only its own. Its sent
    messages stay in their chats; a group it alone administered passes to its
    oldest remaining member; a chat left with no member goes."""
    user, name = identity.id, identity.cyphr_id
    chats = [row[0] for row in await txn.execute(
        "SELECT chat_id FROM chat_participants WHERE user_id = ?", (name,))]
    orphaned_groups = await txn.execute(
        "SELECT p.chat_id FROM chat_participants p JOIN chats c ON c.id = p.chat_id"
        " WHERE p.user_id = ? AND p.role = 'admin' AND c.chat_type = 'group'"
        " AND NOT EXISTS (SELECT 1 FROM chat_participants o"
        "  WHERE o.chat_id = p.chat_id AND o.user_id <> p.user_id AND o.role = 'admin')",
        (name,))
    for (chat_id,) in orphaned_groups:
        await txn.execute(
            "UPDATE chat_participants SET role = 'admin' WHERE chat_id = ? AND user_id ="
            " (SELECT user_id FROM chat_participants WHERE chat_id = ? AND user_id <> ?"
            "  ORDER BY joined_at, user_id LIMIT 1)", (chat_id, chat_id, name))
    await txn.execute("DELETE FROM auth_challenges WHERE cyphr_id = ?", (name,))
    await drop_device_envelopes(txn, user)
    # Cascades to revoked tokens, prekeys, TOTP, wallet link, pin backup,
    # memberships and receipts.
    await txn.execute("DELETE FROM cyphr_identities WHERE id = ?", (user,))
    await txn.execute(
        "INSERT INTO retired_cyphr_ids (cyphr_id, retired_at) VALUES (?, ?)", (name, now))
    for chat_id in chats:
        await txn.execute(
            "DELETE FROM chats WHERE id = ? AND NOT EXISTS"
            " (SELECT 1 FROM chat_participants WHERE chat_id = ?)", (chat_id, chat_id))
