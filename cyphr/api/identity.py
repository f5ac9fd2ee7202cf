"""/api/cyphr-id: Cyphr IDs, login by challenge signature, profiles."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from klein import Klein

from cyphr.api.guard import authenticated, public
from cyphr.api.http import answer, read_json
from cyphr.clock import iso
from cyphr.crypto import ED25519_KEY_BYTES, ED25519_SIGNATURE_BYTES, MLKEM1024_KEY_BYTES
from cyphr.errors import INVALID_QUERY, MISSING_FIELD, BadRequest
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.identity import IdentityHandler, Session
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.validation import (
    CYPHR_ID_PREFIX,
    Fields,
    b64,
    check_cyphr_id,
    invalid,
)
from cyphr.store.identities import Identity

SEARCH_DEFAULT_LIMIT = 20
SEARCH_MAX_LIMIT = 50
TOTP_CODE_LENGTH = 6


def public_profile(identity: Identity, online: bool) -> dict[str, Any]:
    """What anyone signed in may see of a user."""
    return {
        "cyphrId": identity.cyphr_id,
        "displayName": identity.display_name,
        "avatarUrl": identity.avatar_url,
        "publicKey": b64(identity.public_key),
        "kyberPublicKey": b64(identity.kyber_public_key),
        "kyberKeySignature": b64(identity.kyber_key_signature),
        "isOnline": online,
        "lastSeen": iso(identity.last_seen),
    }


def own_profile(identity: Identity, online: bool) -> dict[str, Any]:
    """What users see of themselves."""
    return {
        **public_profile(identity, online),
        "userId": identity.id,
        "encryptedSettings": identity.encrypted_settings,
        "recoveryPhraseHint": identity.recovery_phrase_hint,
        "totpEnabled": identity.totp_enabled,
        "createdAt": iso(identity.created_at),
        "updatedAt": iso(identity.updated_at),
    }


def totp_code(fields: Fields, name: str = "totpCode", *, required: bool = False) -> str | None:
    code = fields.text(name, required=required, max_length=TOTP_CODE_LENGTH)
    if code is not None and (len(code) != TOTP_CODE_LENGTH or not code.isascii() or not code.isdigit()):
        raise invalid(name, f"{name} must be {TOTP_CODE_LENGTH} digits")
    return code


class IdentityAPI:
    app = Klein()

    def __init__(self, identity: IdentityHandler, authenticator: Authenticator, limits: RateLimits) -> None:
        self._identity = identity
        self.authenticator = authenticator
        self.limits = limits

    def _session(self, request: Any, session: Session, status: int = 200) -> bytes:
        return answer(request, {
            "success": True,
            "token": session.token.token,
            "expiresAt": iso(session.token.expires_at * 1000),
            "user": own_profile(session.identity, self._identity.is_online(session.identity.cyphr_id)),
        }, status)

    @app.route("/api/cyphr-id/check", methods=["POST"])
    @public(ip_limited=True)
    async def check(self, request: Any) -> bytes:
        fields = Fields(read_json(request), {"cyphrId"})
        cyphr_id = fields.cyphr_id()
        available = await self._identity.is_available(cyphr_id)
        return answer(request, {"success": True, "available": available, "cyphrId": cyphr_id})

    @app.route("/api/cyphr-id/challenge", methods=["POST"])
    @public(ip_limited=True)
    async def challenge(self, request: Any) -> bytes:
        fields = Fields(read_json(request), {"cyphrId"})
        challenge = await self._identity.issue_challenge(fields.cyphr_id())
        return answer(request, {
            "success": True,
            "challengeId": challenge.challenge_id,
            "challenge": b64(challenge.challenge),
            "expiresAt": iso(challenge.expires_at),
        })

    @app.route("/api/cyphr-id/register", methods=["POST"])
    @public(ip_limited=True)
    async def register(self, request: Any) -> bytes:
        fields = Fields(read_json(request), {
            "cyphrId", "publicKey", "kyberPublicKey", "kyberKeySignature", "deviceFingerprint",
            "displayName", "challengeId", "signature"})
        session = await self._identity.register(
            cyphr_id=fields.cyphr_id(),
            public_key=fields.base64("publicKey", length=ED25519_KEY_BYTES),
            kyber_public_key=fields.base64("kyberPublicKey", length=MLKEM1024_KEY_BYTES),
            kyber_key_signature=fields.base64("kyberKeySignature", length=ED25519_SIGNATURE_BYTES),
            device_fingerprint=fields.fingerprint("deviceFingerprint"),
            display_name=fields.text("displayName", required=False, max_length=100),
            challenge_id=fields.uuid("challengeId"),
            signature=fields.base64("signature", length=ED25519_SIGNATURE_BYTES),
        )
        return answer(request, {
            "success": True,
            "token": session.token.token,
            "userId": session.identity.id,
            "cyphrId": session.identity.cyphr_id,
            "expiresAt": iso(session.token.expires_at * 1000),
        }, 201)

    @app.route("/api/cyphr-id/login", methods=["POST"])
    @public(ip_limited=True)
    async def login(self, request: Any) -> bytes:
        fields = Fields(read_json(request), {
            "cyphrId", "deviceFingerprint", "challengeId", "signature", "totpCode"})
        session = await self._identity.login(
            cyphr_id=fields.cyphr_id(),
            device_fingerprint=fields.fingerprint("deviceFingerprint"),
            challenge_id=fields.uuid("challengeId"),
            signature=fields.base64("signature", length=ED25519_SIGNATURE_BYTES),
            totp_code=totp_code(fields),
        )
        return self._session(request, session)

    @app.route("/api/cyphr-id/recover", methods=["POST"])
    @public(ip_limited=True)
    async def recover(self, request: Any) -> bytes:
        fields = Fields(read_json(request), {
            "cyphrId", "newDeviceFingerprint", "challengeId", "signature", "kyberPublicKey",
            "kyberKeySignature", "totpCode"})
        key = fields.base64("kyberPublicKey", length=MLKEM1024_KEY_BYTES, required=False)
        signature = fields.base64("kyberKeySignature", length=ED25519_SIGNATURE_BYTES, required=False)
        if (key is None) != (signature is None):
            raise BadRequest("kyberPublicKey and kyberKeySignature go together",
                             code=MISSING_FIELD,
                             details={"field": "kyberKeySignature" if key else "kyberPublicKey"})
        session = await self._identity.recover(
            cyphr_id=fields.cyphr_id(),
            new_device_fingerprint=fields.fingerprint("newDeviceFingerprint"),
            challenge_id=fields.uuid("challengeId"),
            signature=fields.base64("signature", length=ED25519_SIGNATURE_BYTES),
            kyber=(key, signature) if key is not None and signature is not None else None,
            totp_code=totp_code(fields),
        )
        return self._session(request, session)

    @app.route("/api/cyphr-id/search", methods=["GET"])
    @authenticated(ip_limited=True)
    async def search(self, request: Any, user: AuthUser) -> bytes:
        query = _query_text(request, "q")
        if query is None or not CYPHR_ID_PREFIX.fullmatch(query):
            raise BadRequest("q must be 1 to 30 characters of a-z, 0-9 and _", code=INVALID_QUERY,
                             details={"field": "q"})
        limit_text = _query_text(request, "limit")
        limit = SEARCH_DEFAULT_LIMIT
        if limit_text is not None:
            if not limit_text.isascii() or not limit_text.isdigit() or not (
                1 <= int(limit_text) <= SEARCH_MAX_LIMIT
            ):
                raise BadRequest(f"limit must be from 1 to {SEARCH_MAX_LIMIT}", code=INVALID_QUERY,
                                 details={"field": "limit"})
            limit = int(limit_text)
        self.limits.search.hit(user.user_id)
        found = await self._identity.search(query, limit)
        return answer(request, {
            "success": True,
            "users": [public_profile(i, self._identity.is_online(i.cyphr_id)) for i in found],
        })

    @app.route("/api/cyphr-id/user/<cyphr_id>", methods=["GET"])
    @authenticated(ip_limited=True)
    async def user(self, request: Any, user: AuthUser, cyphr_id: str) -> bytes:
        identity = await self._identity.user(check_cyphr_id(cyphr_id))
        return answer(request, {
            "success": True, "user": public_profile(identity, self._identity.is_online(cyphr_id))})

    @app.route("/api/cyphr-id/update-profile", methods=["POST"])
    @authenticated(ip_limited=True)
    async def update_profile(self, request: Any, user: AuthUser) -> bytes:
        fields = Fields(read_json(request), {
            "displayName", "avatarUrl", "encryptedSettings", "recoveryPhraseHint"})
        changes: dict[str, Any] = {}
        if fields.present("displayName"):
            changes["display_name"] = fields.text("displayName", required=False, max_length=100)
        if fields.present("avatarUrl"):
            url = fields.text("avatarUrl", required=False, max_length=2048)
            if url is not None and (urlsplit(url).scheme != "https" or not urlsplit(url).hostname):
                raise invalid("avatarUrl", "avatarUrl must be an https:// URL")
            changes["avatar_url"] = url
        if fields.present("encryptedSettings"):
            changes["encrypted_settings"] = fields.text("encryptedSettings", required=False,
                                                        max_length=65536)
        if fields.present("recoveryPhraseHint"):
            changes["recovery_phrase_hint"] = fields.text("recoveryPhraseHint", required=False,
                                                          max_length=255)
        identity = await self._identity.update_profile(user, changes)
        return answer(request, {
            "success": True, "user": own_profile(identity, self._identity.is_online(user.cyphr_id))})

    @app.route("/api/cyphr-id/logout", methods=["POST"])
    @authenticated(ip_limited=True)
    async def logout(self, request: Any, user: AuthUser) -> bytes:
        Fields(read_json(request, required=False), set())
        await self._identity.logout(user)
        return answer(request, {"success": True})

    @app.route("/api/cyphr-id/account", methods=["DELETE"])
    @authenticated(ip_limited=True)
    async def delete_account(self, request: Any, user: AuthUser) -> bytes:
        fields = Fields(read_json(request), {"challengeId", "signature"})
        await self._identity.delete_account(
            user, fields.uuid("challengeId"), fields.base64("signature", length=ED25519_SIGNATURE_BYTES))
        return answer(request, {"success": True})


def _query_text(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not valid UTF-8", code=INVALID_QUERY, details={"field": name}) from None
