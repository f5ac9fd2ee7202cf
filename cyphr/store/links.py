"""Device links: provisionings of new devices, their approval, the sealed
seed until received, and the single-use link token (cyphr.handlers.linking)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyphr.db import Database, Transaction
from cyphr.store.devices import Device, add_reserved_txn, reserve_device_id_txn
from cyphr.store.identities import MainKey

_COLUMNS = (
    "p.id, p.ephemeral_key, p.secret_hash, p.created_at, p.expires_at, p.user_id, i.cyphr_id,"
    " p.device_id, p.sealed, p.received_at, p.linked_at"
)


@dataclass(frozen=True)
class Provisioning:
    provisioning_id: str
    ephemeral_key: bytes
    secret_hash: bytes  # SHA-256 of the new device's secret
    created_at: int
    expires_at: int  # ms
    user_id: str | None  # the approving identity; None until approved
    cyphr_id: str | None
    device_id: int | None  # reserved at approval
    sealed: bytes | None  # the sealed seed, from approval until received
    received_at: int | None
    linked_at: int | None


def _provisioning(row: tuple[Any, ...]) -> Provisioning:
    sealed = row[8]
    return Provisioning(str(row[0]), bytes(row[1]), bytes(row[2]), row[3], row[4],
                        str(row[5]) if row[5] is not None else None, row[6], row[7],
                        bytes(sealed) if sealed is not None else None, row[9], row[10])


class TooManyProvisionings(Exception):
    """The table holds as many provisionings as it may."""


class ProvisioningClosed(Exception):
    """Unknown, expired or already approved."""


class InvalidLink(Exception):
    """No unexpired, unused link of this identity has that token."""


class LinkStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def create(self, provisioning_id: str, ephemeral_key: bytes, secret_hash: bytes,
                     now: int, expires_at: int, max_rows: int) -> None:
        """Store a new provisioning, unless the table already holds
        ``max_rows`` of them (TooManyProvisionings): expired rows count
        until purged, so that the table stays bounded however fast they come."""
        await self._db.run_interaction("create_provisioning", _create_txn, provisioning_id,
                                       ephemeral_key, secret_hash, now, expires_at, max_rows)

    async def get(self, provisioning_id: str) -> Provisioning | None:
        """The provisioning in any state (the caller judges it), with the
        Cyphr ID of the identity that approved it."""
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM device_provisionings p"
            " LEFT JOIN cyphr_identities i ON i.id = p.user_id WHERE p.id = ?", (provisioning_id,))
        return _provisioning(rows[0]) if rows else None

    async def approve(self, provisioning_id: str, user_id: str, sealed: bytes, cap: int,
                      now: int) -> int:
        """In one transaction: the provisioning must be open (unexpired, not
        approved: else ProvisioningClosed), the identity under ``cap``
        devices (DeviceLimit); its next device id is reserved and recorded
        with the approver and ``sealed``. Answers that device id."""
        return await self._db.run_interaction("approve_provisioning", _approve_txn,
                                              provisioning_id, user_id, sealed, cap, now)

    async def receive(self, provisioning_id: str, link_token_hash: bytes, now: int,
                      link_expires_at: int) -> bool:
        """Mark an approved, unexpired, not yet received provisioning
        received: its sealed blob goes, the link token's hash is recorded,
        valid until ``link_expires_at``. False when it was not in that state
        (another request received it first). One statement: two requests
        cannot both receive it."""
        rows = await self._db.run_query(
            "UPDATE device_provisionings SET sealed = NULL, received_at = ?, link_token_hash = ?,"
            " expires_at = ? WHERE id = ? AND user_id IS NOT NULL AND received_at IS NULL"
            " AND expires_at > ? RETURNING id",
            (now, link_token_hash, link_expires_at, provisioning_id, now))
        return bool(rows)

    async def reserved_device(self, user_id: str, link_token_hash: bytes, now: int) -> int | None:
        """The device id of the identity's usable link (received, unexpired,
        unused) with that token, or None."""
        rows = await self._db.run_query(
            "SELECT device_id FROM device_provisionings WHERE link_token_hash = ? AND user_id = ?"
            " AND received_at IS NOT NULL AND linked_at IS NULL AND expires_at > ?",
            (link_token_hash, user_id, now))
        return rows[0][0] if rows else None

    async def link(self, user_id: str, link_token_hash: bytes, fingerprint_hash: str,
                   key: MainKey, cap: int, now: int, tokens_valid_after: int) -> Device:
        """In one transaction: use up the link token (InvalidLink unless it
        is the identity's, received, unexpired and unused) and add the device
        under the id reserved for it (DeviceExists for a fingerprint that is
        already the identity's, DeviceLimit past ``cap``). A refusal
        changes nothing, the token included."""
        return await self._db.run_interaction("link_device", _link_txn, user_id, link_token_hash,
                                              fingerprint_hash, key, cap, now, tokens_valid_after)

    async def purge(self, now: int, batch: int = 1000) -> int:
        """Delete up to ``batch`` expired provisionings (with their sealed
        blobs, if never received); answer how many."""
        return await self._db.run_operation(
            "DELETE FROM device_provisionings WHERE id IN"
            " (SELECT id FROM device_provisionings WHERE expires_at <= ? LIMIT ?)", (now, batch))


async def _create_txn(txn: Transaction, provisioning_id: str, ephemeral_key: bytes,
                      secret_hash: bytes, now: int, expires_at: int, max_rows: int) -> None:
    # Counting stops at the cap: the check costs no more as the table fills.
    rows = await txn.execute(
        "SELECT COUNT(*) FROM (SELECT 1 FROM device_provisionings LIMIT ?) AS held", (max_rows,))
    if rows[0][0] >= max_rows:
        raise TooManyProvisionings()
    await txn.execute(
        "INSERT INTO device_provisionings (id, ephemeral_key, secret_hash, created_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?)", (provisioning_id, ephemeral_key, secret_hash, now, expires_at))


async def _approve_txn(txn: Transaction, provisioning_id: str, user_id: str, sealed: bytes,
                       cap: int, now: int) -> int:
    open_ = await txn.execute(
        "SELECT 1 FROM device_provisionings WHERE id = ? AND user_id IS NULL AND expires_at > ?",
        (provisioning_id, now))
    if not open_:
        raise ProvisioningClosed()
    device_id = await reserve_device_id_txn(txn, user_id, cap)
    # Conditional again: of two approvals at once, one finds it taken here
    # (and its reserved id is rolled back with it).
    approved = await txn.execute(
        "UPDATE device_provisionings SET user_id = ?, device_id = ?, sealed = ?"
        " WHERE id = ? AND user_id IS NULL AND expires_at > ? RETURNING id",
        (user_id, device_id, sealed, provisioning_id, now))
    if not approved:
        raise ProvisioningClosed()
    return device_id


async def _link_txn(txn: Transaction, user_id: str, link_token_hash: bytes, fingerprint_hash: str,
                    key: MainKey, cap: int, now: int, tokens_valid_after: int) -> Device:
    used = await txn.execute(
        "UPDATE device_provisionings SET linked_at = ? WHERE link_token_hash = ? AND user_id = ?"
        " AND received_at IS NOT NULL AND linked_at IS NULL AND expires_at > ? RETURNING device_id",
        (now, link_token_hash, user_id, now))
    if not used:
        raise InvalidLink()
    return await add_reserved_txn(txn, user_id, used[0][0], fingerprint_hash, key, cap, now,
                                  tokens_valid_after)
