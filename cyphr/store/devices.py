"""Devices: each identity's devices, with their keys and token cut-offs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyphr.db import Database, Transaction
from cyphr.store.identities import MainKey, key_from_row, key_values
from cyphr.store.envelopes import drop_device_envelopes

_COLUMNS = (
    "d.user_id, d.device_id, d.fingerprint_hash, d.encrypted_name, d.tokens_valid_after,"
    " d.created_at, d.last_seen, d.kyber_public_key, d.kyber_key_signature, d.kyber_key_id,"
    " d.kyber_key_created_at, d.kyber_key_expires_at, d.kyber_key_signature_version"
)
_KEY_COLUMNS = (
    "kyber_public_key, kyber_key_signature, kyber_key_id, kyber_key_created_at,"
    " kyber_key_expires_at, kyber_key_signature_version")


@dataclass(frozen=True)
class Device:
    user_id: str
    device_id: int
    fingerprint_hash: str
    encrypted_name: bytes | None  # sealed by the owner's client
    tokens_valid_after: int  # ms: this device's tokens issued earlier are refused
    created_at: int
    last_seen: int | None
    key: MainKey


def _device(row: tuple[Any, ...]) -> Device:
    name = row[3]
    return Device(row[0], row[1], row[2], bytes(name) if name is not None else None,
                  row[4], row[5], row[6], key_from_row(row[7:13]))


class DeviceLimit(Exception):
    """The identity already has as many devices as it may."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


@dataclass(frozen=True)
class AddedDevice:
    """What DeviceStore.add did: the device as it now is, whether it is new
    (not re-keyed in place), and the ids of the devices it replaced."""

    device: Device
    new: bool
    removed: tuple[int, ...]


class StaleDeviceKey(Exception):
    """A device key older than the stored one (see IdentityStore.set_kyber_key)."""

    def __init__(self, current_id: int | None) -> None:
        super().__init__(current_id)
        self.current_id = current_id


class DeviceStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def of_user(self, user_id: str) -> list[Device]:
        """The identity's devices, by device id."""
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM devices d WHERE d.user_id = ? ORDER BY d.device_id",
            (user_id,))
        return [_device(row) for row in rows]

    async def get(self, user_id: str, device_id: int) -> Device | None:
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM devices d WHERE d.user_id = ? AND d.device_id = ?",
            (user_id, device_id))
        return _device(rows[0]) if rows else None

    async def of_chat_members(self, chat_id: str) -> list[tuple[str, int]]:
        """(Cyphr ID, device id) of every device of every member of the chat."""
        rows = await self._db.run_query(
            "SELECT p.user_id, d.device_id FROM chat_participants p"
            " JOIN cyphr_identities i ON i.cyphr_id = p.user_id"
            " JOIN devices d ON d.user_id = i.id WHERE p.chat_id = ?", (chat_id,))
        return [(cyphr_id, device_id) for cyphr_id, device_id in rows]

    async def of_identities(self, cyphr_ids: list[str]) -> list[tuple[str, int]]:
        """(Cyphr ID, device id) of every device of these identities."""
        rows = await self._db.run_query(
            "SELECT i.cyphr_id, d.device_id FROM cyphr_identities i JOIN devices d ON d.user_id = i.id"
            " WHERE i.cyphr_id IN (" + ", ".join("?" for _ in cyphr_ids) + ")", tuple(cyphr_ids))
        return [(cyphr_id, device_id) for cyphr_id, device_id in rows]

    async def by_fingerprint(self, user_id: str, fingerprint_hash: str) -> Device | None:
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM devices d WHERE d.user_id = ? AND d.fingerprint_hash = ?",
            (user_id, fingerprint_hash))
        return _device(rows[0]) if rows else None

    async def add(self, user_id: str, fingerprint_hash: str, key: MainKey, cap: int, now: int,
                  *, replace_others: bool = False, tokens_valid_after: int = 0) -> AddedDevice:
        """Give the identity a new device with ``key`` and the next unused
        device id. With ``replace_others`` every other device goes first (and
        with it its prekeys): recovery on a lost phone. A device whose
        fingerprint is already the identity's is re-keyed in place instead,
        its earlier tokens refused from ``tokens_valid_after`` (recovery on
        the same device). DeviceLimit past ``cap``."""
        return await self._db.run_interaction(
            "add_device", _add_txn, user_id, fingerprint_hash, key, cap, now, replace_others,
            tokens_valid_after)

    async def rename(self, user_id: str, device_id: int, encrypted_name: bytes | None) -> bool:
        changed = await self._db.run_operation(
            "UPDATE devices SET encrypted_name = ? WHERE user_id = ? AND device_id = ?",
            (encrypted_name, user_id, device_id))
        return changed == 1

    async def remove(self, user_id: str, device_id: int) -> Device | None:
        """Delete the device (its prekeys go with it); the device as it was,
        or None when there was none. Never the identity's last device: that
        one stays, and LastDevice is raised."""
        return await self._db.run_interaction("remove_device", _remove_txn, user_id, device_id)

    async def set_key(self, user_id: str, device_id: int, key: MainKey, now: int) -> None:
        """Replace the device's key unless it is stale (StaleDeviceKey: a
        lower id, or the same id with other bytes, or an older kind of
        signature than the stored one). A key signed in a newer version
        drops the device's prekeys signed in version 1."""
        await self._db.run_interaction("set_device_key", _set_key_txn, user_id, device_id, key, now)

    async def seen(self, user_id: str, device_id: int, at: int) -> None:
        await self._db.run_operation(
            "UPDATE devices SET last_seen = ? WHERE user_id = ? AND device_id = ?",
            (at, user_id, device_id))


class LastDevice(Exception):
    """The device is the identity's only one."""


async def _lock_identity(txn: Transaction, user_id: str) -> int | None:
    """Lock the identity's row (an UPDATE that changes nothing), so that
    device changes of one identity run one after the other; its next
    device id, None if it is gone."""
    await txn.execute(
        "UPDATE cyphr_identities SET next_device_id = next_device_id WHERE id = ?", (user_id,))
    rows = await txn.execute("SELECT next_device_id FROM cyphr_identities WHERE id = ?", (user_id,))
    return rows[0][0] if rows else None


async def _add_txn(txn: Transaction, user_id: str, fingerprint_hash: str, key: MainKey, cap: int,
                   now: int, replace_others: bool, tokens_valid_after: int) -> AddedDevice:
    next_id = await _lock_identity(txn, user_id)
    if next_id is None:
        raise LookupError(user_id)
    removed: tuple[int, ...] = ()
    if replace_others:
        others = [row[0] for row in await txn.execute(
            "SELECT device_id FROM devices WHERE user_id = ? AND fingerprint_hash <> ?",
            (user_id, fingerprint_hash))]
        await drop_device_envelopes(txn, user_id, others)
        removed = tuple(sorted(row[0] for row in await txn.execute(
            "DELETE FROM devices WHERE user_id = ? AND fingerprint_hash <> ? RETURNING device_id",
            (user_id, fingerprint_hash))))
        # A link the lost devices approved must not finish after them.
        await txn.execute("DELETE FROM device_provisionings WHERE user_id = ?", (user_id,))
    existing = await txn.execute(
        "SELECT device_id FROM devices WHERE user_id = ? AND fingerprint_hash = ?",
        (user_id, fingerprint_hash))
    if existing:
        device_id = existing[0][0]
        await txn.execute(
            "UPDATE devices SET " + ", ".join(c.strip() + " = ?" for c in _KEY_COLUMNS.split(","))
            + ", tokens_valid_after = ?, last_seen = ? WHERE user_id = ? AND device_id = ?",
            (*key_values(key), tokens_valid_after, now, user_id, device_id))
        # The prekeys it published before were made with secrets it may no
        # longer hold (a reinstall): they go.
        await txn.execute("DELETE FROM one_time_prekeys WHERE user_id = ? AND device_id = ?",
                          (user_id, device_id))
    else:
        count = (await txn.execute("SELECT COUNT(*) FROM devices WHERE user_id = ?",
                                   (user_id,)))[0][0]
        if count >= cap:
            raise DeviceLimit(count)
        device_id = next_id
        # No other device can take this fingerprint meanwhile: the identity's
        # row is locked.
        await txn.execute(
            "INSERT INTO devices (user_id, device_id, fingerprint_hash, " + _KEY_COLUMNS
            + ", tokens_valid_after, created_at, last_seen)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (user_id, device_id, fingerprint_hash, *key_values(key), tokens_valid_after, now, now))
        # A device that replaces them all (a lost phone) also receives what
        # none of them had acknowledged.
        await _start_delivery(txn, user_id, device_id, from_member_marks=replace_others)
        await txn.execute("UPDATE cyphr_identities SET next_device_id = ? WHERE id = ?",
                          (device_id + 1, user_id))
    rows = await txn.execute(
        "SELECT " + _COLUMNS + " FROM devices d WHERE d.user_id = ? AND d.device_id = ?",
        (user_id, device_id))
    return AddedDevice(_device(rows[0]), not existing, removed)


async def _remove_txn(txn: Transaction, user_id: str, device_id: int) -> Device | None:
    if await _lock_identity(txn, user_id) is None:
        return None
    rows = await txn.execute(
        "SELECT " + _COLUMNS + " FROM devices d WHERE d.user_id = ? AND d.device_id = ?",
        (user_id, device_id))
    if not rows:
        return None
    count = (await txn.execute("SELECT COUNT(*) FROM devices WHERE user_id = ?", (user_id,)))[0][0]
    if count <= 1:
        raise LastDevice()
    await drop_device_envelopes(txn, user_id, [device_id])
    await txn.execute("DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id))
    return _device(rows[0])


async def _set_key_txn(txn: Transaction, user_id: str, device_id: int, key: MainKey,
                       now: int) -> None:
    await _lock_identity(txn, user_id)
    rows = await txn.execute(
        "SELECT kyber_public_key, kyber_key_id, kyber_key_signature_version FROM devices"
        " WHERE user_id = ? AND device_id = ?", (user_id, device_id))
    if not rows:
        raise LookupError((user_id, device_id))
    current_key, current_id, current_version = rows[0]
    if current_version >= 2 and (
        key.signature_version < current_version
        or key.key_id < current_id  # type: ignore[operator]
        or (key.key_id == current_id and bytes(current_key) != key.kyber_public_key)
    ):
        raise StaleDeviceKey(current_id)
    await txn.execute(
        "UPDATE devices SET " + ", ".join(c.strip() + " = ?" for c in _KEY_COLUMNS.split(","))
        + " WHERE user_id = ? AND device_id = ?", (*key_values(key), user_id, device_id))
    await txn.execute("UPDATE cyphr_identities SET updated_at = ? WHERE id = ?", (now, user_id))
    if key.signature_version >= 2:
        await txn.execute(
            "DELETE FROM one_time_prekeys WHERE user_id = ? AND device_id = ?"
            " AND signature_version = 1", (user_id, device_id))


# -- for linking (cyphr.store.links): a device id reserved at approval, the
# device inserted under it later, each inside the caller's transaction.


class DeviceExists(Exception):
    """The fingerprint is already one of the identity's devices."""


async def reserve_device_id_txn(txn: Transaction, user_id: str, cap: int) -> int:
    """Lock the identity, check it is under ``cap`` devices (DeviceLimit)
    and take its next device id for a device added later: the id is then
    nobody else's, even if that device never comes. LookupError when the
    identity is gone."""
    next_id = await _lock_identity(txn, user_id)
    if next_id is None:
        raise LookupError(user_id)
    count = (await txn.execute("SELECT COUNT(*) FROM devices WHERE user_id = ?", (user_id,)))[0][0]
    if count >= cap:
        raise DeviceLimit(count)
    await txn.execute("UPDATE cyphr_identities SET next_device_id = ? WHERE id = ?",
                      (next_id + 1, user_id))
    return next_id


async def add_reserved_txn(txn: Transaction, user_id: str, device_id: int, fingerprint_hash: str,
                           key: MainKey, cap: int, now: int, tokens_valid_after: int) -> Device:
    """Insert the device under ``device_id`` (reserved by
    reserve_device_id_txn), after locking the identity: DeviceExists when
    its fingerprint is already the identity's (it is never re-keyed here),
    DeviceLimit past ``cap``, LookupError when the identity is gone."""
    if await _lock_identity(txn, user_id) is None:
        raise LookupError(user_id)
    if await txn.execute("SELECT 1 FROM devices WHERE user_id = ? AND fingerprint_hash = ?",
                         (user_id, fingerprint_hash)):
        raise DeviceExists()
    count = (await txn.execute("SELECT COUNT(*) FROM devices WHERE user_id = ?", (user_id,)))[0][0]
    if count >= cap:
        raise DeviceLimit(count)
    await txn.execute(
        "INSERT INTO devices (user_id, device_id, fingerprint_hash, " + _KEY_COLUMNS
        + ", tokens_valid_after, created_at, last_seen)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (user_id, device_id, fingerprint_hash, *key_values(key), tokens_valid_after, now, now))
    await _start_delivery(txn, user_id, device_id, from_member_marks=False)
    rows = await txn.execute(
        "SELECT " + _COLUMNS + " FROM devices d WHERE d.user_id = ? AND d.device_id = ?",
        (user_id, device_id))
    return _device(rows[0])


async def _start_delivery(txn: Transaction, user_id: str, device_id: int, *,
                          from_member_marks: bool) -> None:
    """Where a new device's delivery starts in each chat of the identity
    (schema 012): at the chat's newest message, so that it receives what is
    sent from now on (earlier messages are in the history); or, with
    ``from_member_marks``, at the member's own delivered mark, so that it
    also receives what no device of the member has acknowledged."""
    start = "p.delivered_up_to_seq" if from_member_marks else "c.last_seq"
    await txn.execute(
        "INSERT INTO device_deliveries (user_id, device_id, chat_id, delivered_up_to_seq)"
        " SELECT i.id, ?, p.chat_id, " + start + " FROM cyphr_identities i"
        " JOIN chat_participants p ON p.user_id = i.cyphr_id JOIN chats c ON c.id = p.chat_id"
        " WHERE i.id = ?", (device_id, user_id))
