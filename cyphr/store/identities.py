"""Identities: who is who, with their public keys and profile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyphr.db import Database, IntegrityError, Transaction
from cyphr.store.challenges import CONSUME

_COLUMNS = (
    "i.id, i.cyphr_id, i.public_key, i.kyber_public_key, i.kyber_key_signature,"
    " i.kyber_key_id, i.kyber_key_created_at, i.kyber_key_expires_at,"
    " i.kyber_key_signature_version,"
    " i.device_fingerprint_hash, i.display_name, i.avatar_url, i.encrypted_settings,"
    " i.tokens_valid_after, i.created_at, i.updated_at, i.last_seen,"
    " COALESCE(t.enabled, FALSE)"
)
_FROM = " FROM cyphr_identities i LEFT JOIN totp_secrets t ON t.user_id = i.id"


@dataclass(frozen=True)
class MainKey:
    """An identity's main ML-KEM key with its signature by the identity key:
    version 2 binds its id and validity (KeyBinding, label ml-kem-key);
    version 1, from before, has neither."""

    kyber_public_key: bytes
    signature: bytes
    key_id: int | None = None
    created_at: int | None = None  # ms, as the owner's client signed it
    expires_at: int | None = None  # ms

    @property
    def signature_version(self) -> int:
        return 1 if self.expires_at is None else 2


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
    device_fingerprint_hash: str | None
    display_name: str | None
    avatar_url: str | None
    encrypted_settings: str | None
    tokens_valid_after: int
    created_at: int
    updated_at: int
    last_seen: int | None
    totp_enabled: bool


def _identity(row: tuple[Any, ...]) -> Identity:
    return Identity(*row[:17], totp_enabled=bool(row[17]))


@dataclass(frozen=True)
class AuthState:
    """What authenticating a token needs to know of its identity."""

    cyphr_id: str
    device_fingerprint_hash: str | None
    tokens_valid_after: int
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

    async def create(self, identity: Identity) -> None:
        """Store a new identity; IdentityTaken if the name is in use or retired."""
        try:
            changed = await self._db.run_operation(
                "INSERT INTO cyphr_identities (id, cyphr_id, public_key, kyber_public_key,"
                " kyber_key_signature, kyber_key_id, kyber_key_created_at, kyber_key_expires_at,"
                " kyber_key_signature_version, device_fingerprint_hash, display_name, created_at,"
                " updated_at)"
                " SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
                " WHERE NOT EXISTS (SELECT 1 FROM retired_cyphr_ids WHERE cyphr_id = ?)",
                (identity.id, identity.cyphr_id, identity.public_key, identity.kyber_public_key,
                 identity.kyber_key_signature, identity.kyber_key_id, identity.kyber_key_created_at,
                 identity.kyber_key_expires_at, identity.kyber_key_signature_version,
                 identity.device_fingerprint_hash, identity.display_name, identity.created_at,
                 identity.updated_at, identity.cyphr_id))
        except IntegrityError:
            raise IdentityTaken() from None
        if changed != 1:
            raise IdentityTaken()

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
                " (cyphr_identities i LEFT JOIN totp_secrets t ON t.user_id = i.id)"
                " ON i.cyphr_id = ?", (now, challenge_id, cyphr_id, now, cyphr_id))
            challenge, identity = rows[0][0], rows[0][1:]
            return challenge, (_identity(identity) if identity[0] is not None else None)
        rows = await self._db.run_query(CONSUME, (now, challenge_id, cyphr_id, now))
        return (rows[0][0] if rows else None), await self.by_cyphr_id(cyphr_id)

    async def auth_states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], AuthState]:
        """What authenticating needs to know, for many (user id, jti) pairs
        in one round trip (see AuthStateLoader); pairs whose identity is
        gone are missing from the answer."""
        users = sorted({user for user, _ in keys})
        jtis = sorted({jti for _, jti in keys})
        rows = await self._db.run_query(
            "SELECT i.id, i.cyphr_id, i.device_fingerprint_hash, i.tokens_valid_after, r.jti"
            " FROM cyphr_identities i LEFT JOIN revoked_tokens r ON r.user_id = i.id AND r.jti IN ("
            + ", ".join("?" for _ in jtis) + ") WHERE i.id IN (" + ", ".join("?" for _ in users) + ")",
            (*jtis, *users))
        identities: dict[str, tuple[str, str | None, int]] = {}
        revoked: set[tuple[str, str]] = set()
        for user, cyphr_id, device, valid_after, jti in rows:
            identities[user] = (cyphr_id, device, valid_after)
            if jti is not None:
                revoked.add((user, jti))
        return {
            (user, jti): AuthState(*identities[user], (user, jti) in revoked)
            for user, jti in keys if user in identities
        }

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

    async def set_kyber_key(self, user_id: str, key: MainKey, now: int) -> None:
        """Replace the main key, unless it is stale (StaleKey): a v2 key must
        have a higher id than the stored v2 key, or the same id and the same
        bytes (a renewal: new times); a v1 key cannot replace a v2 one.
        Storing a v2 key deletes the user's v1 one-time prekeys in the same
        transaction: v2 readers refuse them, and the client uploads fresh
        ones."""
        await self._db.run_interaction("set_kyber_key", _set_kyber_key_txn, user_id, key, now)

    async def rebind_device(self, user_id: str, device_hash: str, tokens_valid_after: int,
                            kyber: MainKey | None, now: int) -> None:
        """Recovery: the identity moves to a new device; earlier tokens stop
        working, and the one-time prekeys published by the old device go
        (their secrets stayed on it: a message sealed to one could not be
        opened on the new device)."""
        await self._db.run_interaction("rebind_device", _rebind_txn, user_id, device_hash,
                                       tokens_valid_after, kyber, now)

    async def set_last_seen(self, cyphr_id: str, at: int) -> None:
        await self._db.run_operation(
            "UPDATE cyphr_identities SET last_seen = ? WHERE cyphr_id = ?", (at, cyphr_id))

    async def delete(self, identity: Identity, now: int) -> None:
        await self._db.run_interaction("delete_identity", _delete_txn, identity, now)


_SET_MAIN_KEY = (
    "kyber_public_key = ?, kyber_key_signature = ?, kyber_key_id = ?, kyber_key_created_at = ?,"
    " kyber_key_expires_at = ?, kyber_key_signature_version = ?")


def _main_key_values(key: MainKey) -> tuple[Any, ...]:
    return (key.kyber_public_key, key.signature, key.key_id, key.created_at, key.expires_at,
            key.signature_version)


async def _set_kyber_key_txn(txn: Transaction, user_id: str, key: MainKey, now: int) -> None:
    # Locks the row (an UPDATE that changes nothing), so that two uploads at
    # once are compared one after the other.
    await txn.execute("UPDATE cyphr_identities SET updated_at = updated_at WHERE id = ?", (user_id,))
    rows = await txn.execute(
        "SELECT kyber_public_key, kyber_key_id, kyber_key_signature_version FROM cyphr_identities"
        " WHERE id = ?", (user_id,))
    if rows:
        current_key, current_id, current_version = rows[0]
        if current_version == 2 and (
            key.signature_version == 1
            or key.key_id < current_id  # type: ignore[operator]
            or (key.key_id == current_id and bytes(current_key) != key.kyber_public_key)
        ):
            raise StaleKey(current_id)
    await txn.execute("UPDATE cyphr_identities SET " + _SET_MAIN_KEY + ", updated_at = ? WHERE id = ?",
                      (*_main_key_values(key), now, user_id))
    if key.signature_version == 2:
        await txn.execute(
            "DELETE FROM one_time_prekeys WHERE user_id = ? AND signature_version = 1", (user_id,))


async def _rebind_txn(txn: Transaction, user_id: str, device_hash: str, tokens_valid_after: int,
                      kyber: MainKey | None, now: int) -> None:
    if kyber is None:
        await txn.execute(
            "UPDATE cyphr_identities SET device_fingerprint_hash = ?, tokens_valid_after = ?,"
            " updated_at = ? WHERE id = ?", (device_hash, tokens_valid_after, now, user_id))
    else:
        await txn.execute(
            "UPDATE cyphr_identities SET device_fingerprint_hash = ?, tokens_valid_after = ?, "
            + _SET_MAIN_KEY + ", updated_at = ? WHERE id = ?",
            (device_hash, tokens_valid_after, *_main_key_values(kyber), now, user_id))
    await txn.execute("DELETE FROM one_time_prekeys WHERE user_id = ?", (user_id,))


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
    # Cascades to revoked tokens, prekeys, TOTP, wallet link, pin backup,
    # memberships and receipts.
    await txn.execute("DELETE FROM cyphr_identities WHERE id = ?", (user,))
    await txn.execute(
        "INSERT INTO retired_cyphr_ids (cyphr_id, retired_at) VALUES (?, ?)", (name, now))
    for chat_id in chats:
        await txn.execute(
            "DELETE FROM chats WHERE id = ? AND NOT EXISTS"
            " (SELECT 1 FROM chat_participants WHERE chat_id = ?)", (chat_id, chat_id))
