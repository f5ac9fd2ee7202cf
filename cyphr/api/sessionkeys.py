"""The session key directory: /api/sessions/keys and /api/sessions/bundles
(cyphr.handlers.sessionkeys; docs/encryption.rst, "Sessions")."""

from __future__ import annotations

from typing import Any

from klein import Klein

from cyphr.api.devices import parse_device_id
from cyphr.api.guard import authenticated
from cyphr.api.http import answer, read_json
from cyphr.clock import iso
from cyphr.crypto import ED25519_SIGNATURE_BYTES
from cyphr.errors import MISSING_FIELD
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.sessionkeys import MAX_ONE_TIME_PER_CALL, SessionKeysHandler
from cyphr.handlers.validation import (
    Fields,
    b64,
    check_cyphr_id,
    decode_base64,
    invalid,
    parse_timestamp,
)
from cyphr.signing import (
    DH_ONE_TIME_PREKEY,
    DH_SIGNED_PREKEY,
    KEM_LAST_RESORT_PREKEY,
    KEM_ONE_TIME_PREKEY,
    PREKEY_KINDS,
)
from cyphr.store.sessionkeys import DeviceBundle, IdentityDh, SessionPrekey, Stock, Upload

MAX_KEY_ID = 2**53 - 1  # JSON numbers stay exact up to here
_PREKEY_FIELDS = {"keyId", "publicKey", "signature", "createdAt", "expiresAt"}


def _prekey(value: Any, field: str, kind: int) -> SessionPrekey:
    if not isinstance(value, dict):
        raise invalid(field, f"{field} must be an object")
    Fields(value, _PREKEY_FIELDS)
    for name in sorted(_PREKEY_FIELDS):
        if value.get(name) is None:
            raise invalid(f"{field}.{name}", f"{field}.{name} is required", MISSING_FIELD)
    key_id = value["keyId"]
    if isinstance(key_id, bool) or not isinstance(key_id, int) or not 0 <= key_id <= MAX_KEY_ID:
        raise invalid(f"{field}.keyId", f"{field}.keyId must be an integer from 0 to {MAX_KEY_ID}")
    size = PREKEY_KINDS[kind][1]
    return SessionPrekey(
        kind, key_id,
        decode_base64(value["publicKey"], f"{field}.publicKey", length=size, max_length=size),
        decode_base64(value["signature"], f"{field}.signature", length=ED25519_SIGNATURE_BYTES),
        parse_timestamp(value["createdAt"], f"{field}.createdAt"),
        parse_timestamp(value["expiresAt"], f"{field}.expiresAt"))


def prekey_json(prekey: SessionPrekey) -> dict[str, Any]:
    return {"kind": prekey.kind, "keyId": prekey.key_id, "publicKey": b64(prekey.public_key),
            "signature": b64(prekey.signature), "createdAt": iso(prekey.created_at),
            "expiresAt": iso(prekey.expires_at)}


def _brief(prekey: SessionPrekey | None) -> dict[str, Any] | None:
    if prekey is None:
        return None
    return {"keyId": prekey.key_id, "createdAt": iso(prekey.created_at),
            "expiresAt": iso(prekey.expires_at)}


def stock_json(stock: Stock, user: AuthUser) -> dict[str, Any]:
    return {"success": True, "deviceId": user.device_id,
            "identityDh": stock.identity_dh is not None,
            "signedPrekey": _brief(stock.signed_prekey),
            "lastResortPrekey": _brief(stock.last_resort_prekey),
            "oneTimePrekeys": stock.one_time, "kemOneTimePrekeys": stock.kem_one_time}


def bundle_json(bundle: DeviceBundle) -> dict[str, Any]:
    return {"deviceId": bundle.device_id, "signedPrekey": prekey_json(bundle.signed_prekey),
            "kemPrekey": prekey_json(bundle.kem_prekey),
            "oneTimePrekey": prekey_json(bundle.one_time_prekey)
            if bundle.one_time_prekey is not None else None}


class SessionKeysAPI:
    app = Klein()

    def __init__(self, keys: SessionKeysHandler, authenticator: Authenticator) -> None:
        self._keys = keys
        self.authenticator = authenticator

    @app.route("/api/sessions/keys", methods=["PUT"])
    @authenticated()
    async def publish(self, request: Any, user: AuthUser) -> bytes:
        body = read_json(request)
        fields = Fields(body, {"identityDh", "signedPrekey", "lastResortPrekey",
                               "oneTimePrekeys", "kemOneTimePrekeys"})
        # Every part is optional (absent or null: unchanged).
        identity_dh = None
        if body.get("identityDh") is not None:
            value = body["identityDh"]
            if not isinstance(value, dict):
                raise invalid("identityDh", "identityDh must be an object")
            Fields(value, {"publicKey", "signature"})
            for name in ("publicKey", "signature"):
                if value.get(name) is None:
                    raise invalid(f"identityDh.{name}", f"identityDh.{name} is required",
                                  MISSING_FIELD)
            identity_dh = IdentityDh(
                decode_base64(value["publicKey"], "identityDh.publicKey", length=32),
                decode_base64(value["signature"], "identityDh.signature",
                              length=ED25519_SIGNATURE_BYTES))
        names: dict[int, str] = {}
        single: dict[int, SessionPrekey | None] = {}
        for name, kind, slot in (("signedPrekey", DH_SIGNED_PREKEY, -1),
                                 ("lastResortPrekey", KEM_LAST_RESORT_PREKEY, -3)):
            value = body.get(name)
            single[kind] = _prekey(value, name, kind) if value is not None else None
            names[slot] = name
        one_time: list[SessionPrekey] = []
        for name, kind in (("oneTimePrekeys", DH_ONE_TIME_PREKEY),
                           ("kemOneTimePrekeys", KEM_ONE_TIME_PREKEY)):
            if body.get(name) is None:
                continue
            items = fields.list(name, max_items=MAX_ONE_TIME_PER_CALL, allow_empty=True)
            for index, item in enumerate(items):
                names[len(one_time)] = f"{name}[{index}]"
                one_time.append(_prekey(item, f"{name}[{index}]", kind))
        upload = Upload(identity_dh, single[DH_SIGNED_PREKEY], single[KEM_LAST_RESORT_PREKEY],
                        one_time)
        stock = await self._keys.publish(user, upload, names)
        return answer(request, stock_json(stock, user))

    @app.route("/api/sessions/keys", methods=["GET"])
    @authenticated()
    async def stock(self, request: Any, user: AuthUser) -> bytes:
        return answer(request, stock_json(await self._keys.stock(user), user))

    async def _bundles(self, request: Any, user: AuthUser, cyphr_id: str,
                       device_id: int | None) -> bytes:
        Fields(read_json(request, required=False), set())
        identity, identity_dh, bundles = await self._keys.bundles(
            user, check_cyphr_id(cyphr_id), device_id)
        return answer(request, {
            "success": True,
            "cyphrId": identity.cyphr_id,
            "identityKey": b64(identity.public_key),
            "identityDh": None if identity_dh is None else {
                "publicKey": b64(identity_dh.public_key), "signature": b64(identity_dh.signature)},
            "bundles": [bundle_json(b) for b in bundles],
        })

    @app.route("/api/sessions/bundles/<cyphr_id>", methods=["POST"])
    @authenticated()
    async def bundles(self, request: Any, user: AuthUser, cyphr_id: str) -> bytes:
        """A bundle of each of the user's devices that published its keys."""
        return await self._bundles(request, user, cyphr_id, None)

    @app.route("/api/sessions/bundles/<cyphr_id>/<device_id>", methods=["POST"])
    @authenticated()
    async def device_bundle(self, request: Any, user: AuthUser, cyphr_id: str,
                            device_id: str) -> bytes:
        """The bundle of one device."""
        return await self._bundles(request, user, cyphr_id, parse_device_id(device_id))
