"""/api/cyphr-id: Cyphr IDs, login by signed statement, profiles, pin backups."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from klein import Klein

from cyphr.blobs import BLOB_ID
from cyphr.api.guard import authenticated, public
from cyphr.api.http import answer, read_json
from cyphr.clock import iso
from cyphr.crypto import ED25519_KEY_BYTES, ED25519_SIGNATURE_BYTES, MLKEM1024_KEY_BYTES
from cyphr.errors import INVALID_QUERY, MISSING_FIELD, BadRequest
from cyphr.handlers.attachments import AttachmentsHandler
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.identity import IdentityHandler, Proof, Session
from cyphr.handlers.pins import MAX_PIN_BACKUP_BYTES, PinBackupHandler
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.validation import (
    CYPHR_ID_PREFIX,
    Fields,
    b64,
    check_cyphr_id,
    invalid,
)
from cyphr.store.identities import Identity, MainKey

SEARCH_DEFAULT_LIMIT = 20
SEARCH_MAX_LIMIT = 50
TOTP_CODE_LENGTH = 6
# A main key's id is its owner's key generation: any integer JSON carries exactly.
MAX_MAIN_KEY_ID = 2**53 - 1
# An AuthStatement is at most about 750 bytes (signing.AuthStatement.decode).
MAX_STATEMENT_BYTES = 1024
MAIN_KEY_FIELDS = ("kyberPublicKey", "kyberKeySignature", "kyberKeyId", "kyberKeyCreatedAt",
                   "kyberKeyExpiresAt")
PROOF_FIELDS = ("challengeId", "statement", "signature")


def main_key_fields(identity: Identity) -> dict[str, Any]:
    """The main key as the directory shows it, with what its signature binds."""
    return {
        "kyberPublicKey": b64(identity.kyber_public_key),
        "kyberKeySignature": b64(identity.kyber_key_signature),
        "kyberKeyId": identity.kyber_key_id,
        "kyberKeyCreatedAt": iso(identity.kyber_key_created_at),
        "kyberKeyExpiresAt": iso(identity.kyber_key_expires_at),
        "kyberKeySignatureVersion": identity.kyber_key_signature_version,
    }


def public_profile(identity: Identity, online: bool | None) -> dict[str, Any]:
    """What anyone signed in may see of a user; with its presence
    (``isOnline``, ``lastSeen``) only for those who may know it, ``online``
    None for a stranger (IdentityHandler.presence_for)."""
    profile = {
        "cyphrId": identity.cyphr_id,
        "displayName": identity.display_name,
        "avatarUrl": identity.avatar_url,
        "publicKey": b64(identity.public_key),
        **main_key_fields(identity),
    }
    if online is not None:
        profile["isOnline"] = online
        profile["lastSeen"] = iso(identity.last_seen)
    return profile


def own_profile(identity: Identity, online: bool) -> dict[str, Any]:
    """What users see of themselves."""
    return {
        **public_profile(identity, online),
        "userId": identity.id,
        "encryptedSettings": identity.encrypted_settings,
        "totpEnabled": identity.totp_enabled,
        "createdAt": iso(identity.created_at),
        "updatedAt": iso(identity.updated_at),
    }


def totp_code(fields: Fields, name: str = "totpCode", *, required: bool = False) -> str | None:
    code = fields.text(name, required=required, max_length=TOTP_CODE_LENGTH)
    if code is not None and (len(code) != TOTP_CODE_LENGTH or not code.isascii() or not code.isdigit()):
        raise invalid(name, f"{name} must be {TOTP_CODE_LENGTH} digits")
    return code


def main_key(fields: Fields, *, required: bool) -> MainKey | None:
    """The main key fields of a body: v2 (kyberKeyId and both times) or v1
    (neither); some but not all of them is MISSING_FIELD. None when the key
    is optional and absent."""
    key = fields.base64("kyberPublicKey", length=MLKEM1024_KEY_BYTES, required=required)
    signature = fields.base64("kyberKeySignature", length=ED25519_SIGNATURE_BYTES, required=required)
    key_id = fields.integer("kyberKeyId", minimum=0, maximum=MAX_MAIN_KEY_ID, required=False)
    created_at = fields.timestamp("kyberKeyCreatedAt", required=False)
    expires_at = fields.timestamp("kyberKeyExpiresAt", required=False)
    given = {"kyberPublicKey": key, "kyberKeySignature": signature, "kyberKeyId": key_id,
             "kyberKeyCreatedAt": created_at, "kyberKeyExpiresAt": expires_at}
    if key is None and signature is None and not required:
        present = [name for name, value in given.items() if value is not None]
        if present:
            raise BadRequest("kyberKeyId and the key times come with kyberPublicKey",
                             code=MISSING_FIELD, details={"field": "kyberPublicKey"})
        return None
    if key is None or signature is None:
        raise BadRequest("kyberPublicKey and kyberKeySignature go together", code=MISSING_FIELD,
                         details={"field": "kyberKeySignature" if key is not None else "kyberPublicKey"})
    v2 = ("kyberKeyId", "kyberKeyCreatedAt", "kyberKeyExpiresAt")
    missing = [name for name in v2 if given[name] is None]
    if missing and len(missing) < len(v2):
        raise BadRequest(f"{missing[0]} is required with the other v2 key fields",
                         code=MISSING_FIELD, details={"field": missing[0]})
    return MainKey(key, signature, key_id, created_at, expires_at)


def proof(fields: Fields) -> Proof:
    """challengeId, signature and (v2) statement; see IdentityHandler."""
    return Proof(
        challenge_id=fields.uuid("challengeId"),
        signature=fields.base64("signature", length=ED25519_SIGNATURE_BYTES),
        statement=fields.base64("statement", max_length=MAX_STATEMENT_BYTES, required=False),
    )


class IdentityAPI:
    app = Klein()

    def __init__(self, identity: IdentityHandler, authenticator: Authenticator, limits: RateLimits,
                 pins: PinBackupHandler, attachments: AttachmentsHandler | None = None) -> None:
        self._identity = identity
        self._attachments = attachments
        self._pins = pins
        self.authenticator = authenticator
        self.limits = limits

    def _session(self, request: Any, session: Session, status: int = 200) -> bytes:
        return answer(request, {
            "success": True,
            "token": session.token.token,
            "expiresAt": iso(session.token.expires_at * 1000),
            "deviceId": session.device_id,
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
            "cyphrId", "publicKey", *MAIN_KEY_FIELDS, "deviceFingerprint", "displayName",
            *PROOF_FIELDS})
        cyphr_id = fields.cyphr_id()
        public_key = fields.base64("publicKey", length=ED25519_KEY_BYTES)
        key = main_key(fields, required=True)
        assert key is not None
        session = await self._identity.register(
            cyphr_id=cyphr_id,
            public_key=public_key,
            main_key=key,
            device_fingerprint=fields.fingerprint("deviceFingerprint"),
            display_name=fields.text("displayName", required=False, max_length=100),
            proof=proof(fields),
        )
        return answer(request, {
            "success": True,
            "token": session.token.token,
            "userId": session.identity.id,
            "cyphrId": session.identity.cyphr_id,
            "expiresAt": iso(session.token.expires_at * 1000),
            "deviceId": session.device_id,
        }, 201)

    @app.route("/api/cyphr-id/login", methods=["POST"])
    @public(ip_limited=True)
    async def login(self, request: Any) -> bytes:
        fields = Fields(read_json(request), {
            "cyphrId", "deviceFingerprint", *PROOF_FIELDS, "totpCode"})
        session = await self._identity.login(
            cyphr_id=fields.cyphr_id(),
            device_fingerprint=fields.fingerprint("deviceFingerprint"),
            proof=proof(fields),
            totp_code=totp_code(fields),
        )
        return self._session(request, session)

    @app.route("/api/cyphr-id/recover", methods=["POST"])
    @public(ip_limited=True)
    async def recover(self, request: Any) -> bytes:
        fields = Fields(read_json(request), {
            "cyphrId", "newDeviceFingerprint", *PROOF_FIELDS, *MAIN_KEY_FIELDS, "totpCode",
            "keepOtherDevices"})
        cyphr_id = fields.cyphr_id()
        fingerprint = fields.fingerprint("newDeviceFingerprint")
        key = main_key(fields, required=False)
        session = await self._identity.recover(
            cyphr_id=cyphr_id,
            new_device_fingerprint=fingerprint,
            proof=proof(fields),
            kyber=key,
            totp_code=totp_code(fields),
            keep_other_devices=fields.boolean("keepOtherDevices", default=False),
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
        presence = await self._identity.presence_for(user, found)
        return answer(request, {
            "success": True,
            "users": [public_profile(i, online) for i, online in zip(found, presence)],
        })

    @app.route("/api/cyphr-id/user/<cyphr_id>", methods=["GET"])
    @authenticated(ip_limited=True)
    async def user(self, request: Any, user: AuthUser, cyphr_id: str) -> bytes:
        identity = await self._identity.user(check_cyphr_id(cyphr_id))
        [online] = await self._identity.presence_for(user, [identity])
        return answer(request, {"success": True, "user": public_profile(identity, online)})

    @app.route("/api/cyphr-id/update-profile", methods=["POST"])
    @authenticated(ip_limited=True)
    async def update_profile(self, request: Any, user: AuthUser) -> bytes:
        fields = Fields(read_json(request), {"displayName", "avatarUrl", "encryptedSettings"})
        changes: dict[str, Any] = {}
        if fields.present("displayName"):
            changes["display_name"] = fields.text("displayName", required=False, max_length=100)
        if fields.present("avatarUrl"):
            url = fields.text("avatarUrl", required=False, max_length=2048)
            if url is not None and BLOB_ID.fullmatch(url) and self._attachments is not None:
                # An encrypted avatar: a finished attachment of the user's,
                # kept while it is the avatar; its key goes to contacts in a
                # sealed message.
                await self._attachments.check_named(user, [url], field="avatarUrl")
            elif url is not None and (urlsplit(url).scheme != "https" or not urlsplit(url).hostname):
                raise invalid("avatarUrl", "avatarUrl must be an attachment id or an https:// URL")
            changes["avatar_url"] = url
        if fields.present("encryptedSettings"):
            changes["encrypted_settings"] = fields.text("encryptedSettings", required=False,
                                                        max_length=65536)
        before = await self._identity.user(user.cyphr_id) if "avatar_url" in changes else None
        identity = await self._identity.update_profile(user, changes)
        if before is not None and self._attachments is not None:
            await self._attachments.avatar_changed(user, before.avatar_url, identity.avatar_url)
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
        fields = Fields(read_json(request), {*PROOF_FIELDS, "deviceFingerprint"})
        given = proof(fields)
        # A v2 statement names the device, so the device comes with it; a
        # v1 proof (where accepted) may leave it out.
        fingerprint = (fields.fingerprint("deviceFingerprint")
                       if given.statement is not None or fields.present("deviceFingerprint") else None)
        await self._identity.delete_account(user, fingerprint, given)
        return answer(request, {"success": True})

    @app.route("/api/cyphr-id/pin-backup", methods=["PUT"])
    @authenticated(ip_limited=True)
    async def put_pin_backup(self, request: Any, user: AuthUser) -> bytes:
        fields = Fields(read_json(request), {"blob"})
        blob = fields.base64("blob", max_length=MAX_PIN_BACKUP_BYTES)
        assert blob is not None
        if not blob:
            raise invalid("blob", "blob must not be empty")
        updated_at = await self._pins.put(user, blob)
        return answer(request, {"success": True, "updatedAt": iso(updated_at)})

    @app.route("/api/cyphr-id/pin-backup", methods=["GET"])
    @authenticated(ip_limited=True)
    async def get_pin_backup(self, request: Any, user: AuthUser) -> bytes:
        backup = await self._pins.get(user)
        return answer(request, {"success": True, "blob": b64(backup.blob),
                                "updatedAt": iso(backup.updated_at)})


def _query_text(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not valid UTF-8", code=INVALID_QUERY, details={"field": name}) from None
