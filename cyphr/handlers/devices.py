"""
Devices: the list anyone signed in may read (each device's id and signed
key, which a client checks against the identity key it pinned), and what
the account's own devices may do to it (read their names, rename, remove).

A removed device's tokens stop at once (authentication finds no device of
their fingerprint), its one-time prekeys go with it, and its sockets close
on every node.
"""

from __future__ import annotations

from typing import Any

from cyphr.changes import ChangeFeed, DevicesChanged, SessionsEnded
from cyphr.errors import DEVICE_NOT_FOUND, LAST_DEVICE, USER_NOT_FOUND, Conflict, NotFound
from cyphr.handlers.auth import AuthUser
from cyphr.store.devices import Device, DeviceStore, LastDevice
from cyphr.store.identities import Identity, IdentityStore

# The most bytes of a device's sealed name (the client encrypts a short name
# such as "Alice's laptop"; the server stores the bytes as they come).
MAX_NAME_BYTES = 512


def _no_device() -> NotFound:
    return NotFound("Your identity has no such device", code=DEVICE_NOT_FOUND)


class DevicesHandler:
    def __init__(self, identities: IdentityStore, devices: DeviceStore, changes: ChangeFeed,
                 clock: Any) -> None:
        self._identities = identities
        self._devices = devices
        self._changes = changes
        self._clock = clock

    async def of(self, cyphr_id: str) -> tuple[Identity, list[Device]]:
        """An identity with its devices: 404 for an unknown Cyphr ID."""
        identity = await self._identities.by_cyphr_id(cyphr_id)
        if identity is None:
            raise NotFound("No such user", code=USER_NOT_FOUND)
        return identity, await self._devices.of_user(identity.id)

    async def mine(self, user: AuthUser) -> list[Device]:
        return await self._devices.of_user(user.user_id)

    async def rename(self, user: AuthUser, device_id: int, encrypted_name: bytes | None) -> Device:
        """Set the sealed name of one of the caller's devices (None clears it)."""
        if not await self._devices.rename(user.user_id, device_id, encrypted_name):
            raise _no_device()
        device = await self._devices.get(user.user_id, device_id)
        if device is None:
            raise _no_device()
        return device

    async def remove(self, user: AuthUser, device_id: int) -> None:
        """Remove one of the caller's devices (the calling one too): its
        tokens stop, its prekeys go, its sockets close. The identity's last
        device stays (409 LAST_DEVICE): deleting the account is the way to
        leave altogether."""
        try:
            removed = await self._devices.remove(user.user_id, device_id)
        except LastDevice:
            raise Conflict("This is the identity's only device; delete the account instead",
                           code=LAST_DEVICE) from None
        if removed is None:
            raise _no_device()
        self._changes.publish(SessionsEnded(user.cyphr_id, device=removed.fingerprint_hash))
        self._changes.publish(DevicesChanged(user.cyphr_id, device_id, "removed"))
