"""Devices: /api/devices (see cyphr.handlers.devices)."""

from __future__ import annotations

from typing import Any

from klein import Klein

from cyphr.api.guard import authenticated
from cyphr.api.http import answer, read_json
from cyphr.clock import iso
from cyphr.errors import DEVICE_NOT_FOUND, NotFound
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.devices import MAX_NAME_BYTES, DevicesHandler
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.validation import Fields, b64, check_cyphr_id
from cyphr.store.devices import Device

# Device ids are small integers given in order; anything larger is no device.
MAX_DEVICE_ID = 2**31 - 1


def device_key_fields(device: Device) -> dict[str, Any]:
    """A device as the directory shows it to anyone signed in: its id and
    its key with what the signature binds (version 3 binds the device id;
    version 2 and 1 are keys of the single-device API, bound to no device)."""
    key = device.key
    return {
        "deviceId": device.device_id,
        "kyberPublicKey": b64(key.kyber_public_key),
        "kyberKeySignature": b64(key.signature),
        "kyberKeyId": key.key_id,
        "kyberKeyCreatedAt": iso(key.created_at),
        "kyberKeyExpiresAt": iso(key.expires_at),
        "kyberKeySignatureVersion": key.signature_version,
        "createdAt": iso(device.created_at),
    }


def own_device(device: Device, user: AuthUser) -> dict[str, Any]:
    """What the account's own devices see of each: also its sealed name, when
    it was last seen, and which one is the caller."""
    return {
        **device_key_fields(device),
        "encryptedName": b64(device.encrypted_name),
        "lastSeen": iso(device.last_seen),
        "current": device.device_id == user.device_id,
    }


def parse_device_id(value: str) -> int:
    """A device id in a route. The route takes any segment: one that is not
    a device id is a device the identity does not have (404)."""
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_DEVICE_ID:
        raise NotFound("No such device", code=DEVICE_NOT_FOUND)
    return int(value)


class DevicesAPI:
    app = Klein()

    def __init__(self, devices: DevicesHandler, authenticator: Authenticator,
                 limits: RateLimits) -> None:
        self._devices = devices
        self.authenticator = authenticator
        self.limits = limits

    @app.route("/api/devices/me", methods=["GET"])
    @authenticated()
    async def mine(self, request: Any, user: AuthUser) -> bytes:
        devices = await self._devices.mine(user)
        return answer(request, {
            "success": True,
            "cyphrId": user.cyphr_id,
            "devices": [own_device(d, user) for d in devices],
        })

    @app.route("/api/devices/me/<device_id>", methods=["PUT"])
    @authenticated()
    async def rename(self, request: Any, user: AuthUser, device_id: str) -> bytes:
        fields = Fields(read_json(request), {"encryptedName"})
        name = fields.base64("encryptedName", max_length=MAX_NAME_BYTES, required=False)
        device = await self._devices.rename(user, parse_device_id(device_id), name)
        return answer(request, {"success": True, "device": own_device(device, user)})

    @app.route("/api/devices/me/<device_id>", methods=["DELETE"])
    @authenticated()
    async def remove(self, request: Any, user: AuthUser, device_id: str) -> bytes:
        Fields(read_json(request, required=False), set())
        await self._devices.remove(user, parse_device_id(device_id))
        return answer(request, {"success": True})

    @app.route("/api/devices/<cyphr_id>", methods=["GET"])
    @authenticated()
    async def of(self, request: Any, user: AuthUser, cyphr_id: str) -> bytes:
        identity, devices = await self._devices.of(check_cyphr_id(cyphr_id))
        return answer(request, {
            "success": True,
            "cyphrId": identity.cyphr_id,
            "publicKey": b64(identity.public_key),
            "devices": [device_key_fields(d) for d in devices],
        })
