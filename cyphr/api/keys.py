"""Keys: the caller's Kyber key, others' public keys, one-time prekeys."""

from __future__ import annotations

from typing import Any

from klein import Klein

from cyphr.api.guard import authenticated
from cyphr.api.http import answer, read_json
from cyphr.api.identity import MAIN_KEY_FIELDS, main_key, main_key_fields
from cyphr.clock import iso
from cyphr.crypto import ED25519_KEY_BYTES, ED25519_SIGNATURE_BYTES, MLKEM1024_KEY_BYTES
from cyphr.errors import DUPLICATE_KEY_ID, MISSING_FIELD, BadRequest, Forbidden
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.api.devices import parse_device_id
from cyphr.handlers.keys import MAX_PREKEYS_PER_CALL, ClaimedKey, KeysHandler
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.validation import Fields, b64, check_cyphr_id, invalid
from cyphr.store.keys import Prekey

MAX_KEY_ID = 2**31 - 1


class KeysAPI:
    app = Klein()

    def __init__(self, keys: KeysHandler, authenticator: Authenticator, limits: RateLimits) -> None:
        self._keys = keys
        self.authenticator = authenticator
        self.limits = limits

    async def _store_public_key(self, request: Any, user: AuthUser) -> bytes:
        # The original clients also send userId and publicKey: accepted
        # when they name the caller, refused when they name anyone else.
        fields = Fields(read_json(request), {*MAIN_KEY_FIELDS, "userId", "publicKey"})
        claimed = fields.text("userId", required=False, max_length=64)
        if claimed is not None and claimed not in (user.cyphr_id, user.user_id):
            raise Forbidden("Only your own key can be stored")
        identity_key = fields.base64("publicKey", length=ED25519_KEY_BYTES, required=False)
        key = main_key(fields, required=True)
        assert key is not None
        if identity_key is not None:
            current = await self._keys.public_key(user.cyphr_id)
            if identity_key != current.public_key:
                raise Forbidden("The identity key cannot be changed; recover the identity instead")
        await self._keys.rotate(user, key)
        return answer(request, {"success": True})

    @app.route("/api/messaging/store-public-key", methods=["POST"])
    @authenticated()
    async def store_public_key(self, request: Any, user: AuthUser) -> bytes:
        return await self._store_public_key(request, user)

    @app.route("/api/auth/register-public-key", methods=["POST"])
    @authenticated(ip_limited=True)
    async def register_public_key(self, request: Any, user: AuthUser) -> bytes:
        """The original backend's name for store-public-key."""
        return await self._store_public_key(request, user)

    @app.route("/api/messaging/public-key/<cyphr_id>", methods=["GET"])
    @authenticated()
    async def public_key(self, request: Any, user: AuthUser, cyphr_id: str) -> bytes:
        identity = await self._keys.public_key(check_cyphr_id(cyphr_id))
        return answer(request, {
            "success": True,
            "cyphrId": identity.cyphr_id,
            "publicKey": b64(identity.public_key),
            **main_key_fields(identity),
            "deviceId": identity.primary_device_id,
        })

    @app.route("/api/keys/prekeys", methods=["POST"])
    @authenticated()
    async def add_prekeys(self, request: Any, user: AuthUser) -> bytes:
        items = Fields(read_json(request), {"prekeys"}).list("prekeys", max_items=MAX_PREKEYS_PER_CALL)
        prekeys = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise invalid(f"prekeys[{index}]", "each prekey must be an object")
            fields = Fields(item, {"keyId", "kyberPublicKey", "signature", "createdAt", "expiresAt"})
            where = f"prekeys[{index}]"
            created_at = fields.timestamp("createdAt", required=False, field=f"{where}.createdAt")
            expires_at = fields.timestamp("expiresAt", required=False, field=f"{where}.expiresAt")
            # v2 has both times, v1 neither (accepted only under accept_v1_auth).
            if (created_at is None) != (expires_at is None):
                missing = "createdAt" if created_at is None else "expiresAt"
                raise BadRequest(f"{where}.{missing} is required with the other time",
                                 code=MISSING_FIELD, details={"field": f"{where}.{missing}"})
            prekeys.append(Prekey(
                key_id=fields.integer("keyId", minimum=0, maximum=MAX_KEY_ID),
                kyber_public_key=fields.base64("kyberPublicKey", length=MLKEM1024_KEY_BYTES),
                signature=fields.base64("signature", length=ED25519_SIGNATURE_BYTES),
                created_at=created_at,
                expires_at=expires_at,
            ))
        if len({p.key_id for p in prekeys}) != len(prekeys):
            raise BadRequest("Each keyId may appear once", code=DUPLICATE_KEY_ID,
                             details={"field": "prekeys"})
        stored, total = await self._keys.add_prekeys(user, prekeys)
        return answer(request, {"success": True, "stored": stored, "total": total})

    @app.route("/api/keys/claim/<cyphr_id>", methods=["POST"])
    @authenticated()
    async def claim(self, request: Any, user: AuthUser, cyphr_id: str) -> bytes:
        """A prekey of the target's lowest-numbered device."""
        Fields(read_json(request, required=False), set())
        claimed = await self._keys.claim(user, check_cyphr_id(cyphr_id))
        return self._claimed(request, claimed)

    @app.route("/api/keys/claim/<cyphr_id>/<device_id>", methods=["POST"])
    @authenticated()
    async def claim_device(self, request: Any, user: AuthUser, cyphr_id: str,
                           device_id: str) -> bytes:
        """A prekey of one device of the target."""
        Fields(read_json(request, required=False), set())
        claimed = await self._keys.claim(user, check_cyphr_id(cyphr_id), parse_device_id(device_id))
        return self._claimed(request, claimed)

    @staticmethod
    def _claimed(request: Any, claimed: ClaimedKey) -> bytes:
        return answer(request, {
            "success": True,
            "keyId": claimed.key_id,
            "kyberPublicKey": b64(claimed.kyber_public_key),
            "signature": b64(claimed.signature),
            "oneTime": claimed.one_time,
            "createdAt": iso(claimed.created_at),
            "expiresAt": iso(claimed.expires_at),
            "signatureVersion": claimed.signature_version,
            "deviceId": claimed.device_id,
        })

    @app.route("/api/keys/count", methods=["GET"])
    @authenticated()
    async def count(self, request: Any, user: AuthUser) -> bytes:
        return answer(request, {"success": True, "remaining": await self._keys.remaining(user)})
