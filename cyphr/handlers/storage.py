"""
What the server stores and what it never stores, with the row count of
every table: the answer of GET /api/admin/zero-storage-status, for an
operator (or an auditor) to check the zero-knowledge rule against the
database itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from cyphr.store.status import StatusStore

STORES: tuple[str, ...] = (
    "Cyphr IDs, display names and avatar URLs chosen by the users",
    "public Ed25519 identity keys",
    "ML-KEM-1024 public keys, their Ed25519 signatures, ids and validity, and one-time prekeys (public)",
    "encrypted backups of the contact keys users pinned, opaque to the server",
    "encrypted backups of the messages users' devices kept (opt-in), opaque to the server, "
    "with their size and time",
    "encrypted message payloads, opaque to the server, with their chat, sender, type and times",
    "encrypted attachments (files), opaque to the server, in the blob store: their lengths "
    "(padded by the clients), uploaders, upload times and which messages name them",
    "chat memberships (which Cyphr IDs share a chat) and their roles",
    "delivery and read receipts (times, per message and recipient)",
    "encrypted group names and settings, opaque to the server",
    "keyed hashes (HMAC-SHA256) of device fingerprints",
    "each identity's devices: their ids, keys, creation and last-seen times, and names "
    "sealed by their owners, opaque to the server",
    "TOTP secrets encrypted with a server key",
    "login challenges (random bytes, single use, expiring)",
    "identifiers and expiry times of revoked session tokens",
    "linked Stellar account addresses (public)",
    "Cyphr IDs of deleted identities, so that they are never given to anyone else",
)

NEVER_STORES: tuple[str, ...] = (
    "private keys of any kind (identity, ML-KEM, Stellar)",
    "recovery phrases",
    "message plaintext",
    "attachment keys, file names, types or contents (they travel inside the encrypted messages)",
    "passwords (hash-password answers are computed and forgotten)",
    "raw device fingerprints",
    "contact lists or address books",
    "session tokens themselves",
    "client IP addresses (unless the operator turns on access logs)",
)


@dataclass(frozen=True)
class StorageReport:
    counts: dict[str, int]
    engine: str
    schema_version: int | None


class StorageStatus:
    def __init__(self, status: StatusStore) -> None:
        self._status = status

    async def report(self) -> StorageReport:
        counts = await self._status.table_counts()
        return StorageReport(counts, self._status.engine, self._status.schema_version)
