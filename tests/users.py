"""
Test users with real keys: an Ed25519 identity key (pynacl), an ML-KEM-1024
key pair (cryptography), a device fingerprint, and the calls a client makes
to register, log in, recover and delete.

By default a User signs as a v2 client does (cyphr.signing): login
statements for the origin of the HTTP helper it talks through, and key
bindings whose validity starts at the server's time (``http.now_ms()``,
which a test may move). ``User(..., v1=True)`` signs as a v1 client did:
the raw challenge, and ``"cyphr-kyber-key:" || key``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from nacl.signing import SigningKey

from cyphr.clock import iso
from cyphr.crypto import KYBER_KEY_CONTEXT
from cyphr.signing import DELETE, LOGIN, RECOVER, REGISTER, AuthStatement, KeyBinding, device_hash
from tests.helpers import JsonCalls, Response

DAY_MS = 24 * 3600 * 1000
# The lifetimes the reference client gives its keys.
MAIN_KEY_LIFETIME_MS = 180 * DAY_MS
PREKEY_LIFETIME_MS = 90 * DAY_MS
PROOF_FIELDS = ("statement", "signature")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def new_kyber_key() -> bytes:
    return MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()


def _text(value: Any, default: str) -> str:
    """A body value as a statement would name it; the user's own when the
    test put something there that is not text (bad-input tests)."""
    return value if isinstance(value, str) and value.isascii() else default


@dataclass
class User:
    cyphr_id: str
    signing_key: SigningKey = field(default_factory=SigningKey.generate)
    kyber_key: bytes = field(default_factory=new_kyber_key)
    fingerprint: str = field(default_factory=lambda: hashlib.sha256(os.urandom(16)).hexdigest())
    token: str | None = None
    user_id: str | None = None
    v1: bool = False
    # The main key's id and validity (set from the server's time when first used).
    kyber_key_id: int = 1
    kyber_key_created_at: int | None = None
    kyber_key_expires_at: int | None = None
    # The time source: the HTTP helper's (the server's clock) once the user
    # has talked to a server.
    now_ms: Callable[[], int] = field(default=lambda: int(time.time() * 1000), repr=False)
    origin: str | None = None

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    def encode_signature(self, signature: bytes) -> str:
        """Every signature the user makes goes through here, as base64."""
        return b64(signature)

    def sign(self, message: bytes) -> str:
        """A raw Ed25519 signature (what a v1 client made of a challenge)."""
        return self.encode_signature(self.signing_key.sign(message).signature)

    def auth(self, token: str | None = None) -> dict[bytes, list[bytes]]:
        return {b"Authorization": [f"Bearer {token or self.token}".encode("ascii")]}

    def use(self, http: JsonCalls) -> None:
        """Talk to the server behind ``http``: its origin, its time."""
        self.now_ms = http.now_ms
        self.origin = http.origin

    # -- key signatures -----------------------------------------------------

    def v1_kyber_signature(self, kyber_key: bytes | None = None) -> str:
        return self.sign(KYBER_KEY_CONTEXT + (kyber_key if kyber_key is not None else self.kyber_key))

    def key_binding(self, key: bytes, *, one_time: bool, key_id: int, created_at: int,
                    expires_at: int, owner: str | None = None) -> KeyBinding:
        return KeyBinding(one_time=one_time, owner=owner or self.cyphr_id, key_id=key_id,
                          created_at=created_at, expires_at=expires_at, public_key=key)

    def main_key_times(self) -> tuple[int, int]:
        if self.kyber_key_created_at is None or self.kyber_key_expires_at is None:
            self.kyber_key_created_at = self.now_ms()
            self.kyber_key_expires_at = self.kyber_key_created_at + MAIN_KEY_LIFETIME_MS
        return self.kyber_key_created_at, self.kyber_key_expires_at

    def main_key_fields(self, key: bytes | None = None, *, key_id: int | None = None,
                        created_at: int | None = None, expires_at: int | None = None,
                        one_time: bool = False, owner: str | None = None,
                        signer: SigningKey | None = None, v1: bool | None = None) -> dict[str, Any]:
        """The fields of a main key upload: the user's own key, or ``key``
        (with, unless given, a fresh validity from now and the next key
        id), signed as a main key of this user; each part may be changed."""
        v1 = self.v1 if v1 is None else v1
        own = key is None or key == self.kyber_key
        key = self.kyber_key if key is None else key
        if v1:
            signature = (signer or self.signing_key).sign(KYBER_KEY_CONTEXT + key).signature
            return {"kyberPublicKey": b64(key), "kyberKeySignature": self.encode_signature(signature)}
        if own and created_at is None and expires_at is None:
            created_at, expires_at = self.main_key_times()
        if created_at is None:
            created_at = self.now_ms()
        if expires_at is None:
            expires_at = created_at + MAIN_KEY_LIFETIME_MS
        if key_id is None:
            key_id = self.kyber_key_id if own else self.kyber_key_id + 1
        binding = self.key_binding(key, one_time=one_time, key_id=key_id, created_at=created_at,
                                   expires_at=expires_at, owner=owner)
        return {
            "kyberPublicKey": b64(key),
            "kyberKeySignature": self.encode_signature(binding.sign(signer or self.signing_key)),
            "kyberKeyId": key_id,
            "kyberKeyCreatedAt": iso(created_at),
            "kyberKeyExpiresAt": iso(expires_at),
        }

    def adopt(self, fields: dict[str, Any]) -> None:
        """Take a main key upload the server accepted as the user's own."""
        self.kyber_key = base64.b64decode(fields["kyberPublicKey"])
        self.kyber_key_id = fields.get("kyberKeyId", self.kyber_key_id)
        self.kyber_key_created_at = self.kyber_key_expires_at = None

    def kyber_signature(self, key: bytes | None = None) -> str:
        """The signature of a main key upload of ``key`` as main_key_fields makes it."""
        return self.main_key_fields(key)["kyberKeySignature"]

    def prekey(self, key_id: int, key: bytes | None = None, *, created_at: int | None = None,
               expires_at: int | None = None, one_time: bool = True, owner: str | None = None,
               signed_key_id: int | None = None, signer: SigningKey | None = None,
               v1: bool | None = None) -> dict[str, Any]:
        """One entry of a prekey upload, signed as a one-time prekey of this
        user valid 90 days from now; each part may be changed."""
        key = key if key is not None else new_kyber_key()
        if self.v1 if v1 is None else v1:
            signature = (signer or self.signing_key).sign(KYBER_KEY_CONTEXT + key).signature
            return {"keyId": key_id, "kyberPublicKey": b64(key), "signature": self.encode_signature(signature)}
        created_at = self.now_ms() if created_at is None else created_at
        expires_at = created_at + PREKEY_LIFETIME_MS if expires_at is None else expires_at
        binding = self.key_binding(key, one_time=one_time,
                                   key_id=key_id if signed_key_id is None else signed_key_id,
                                   created_at=created_at, expires_at=expires_at, owner=owner)
        return {"keyId": key_id, "kyberPublicKey": b64(key),
                "signature": self.encode_signature(binding.sign(signer or self.signing_key)),
                "createdAt": iso(created_at), "expiresAt": iso(expires_at)}

    # -- login statements -------------------------------------------------------

    def statement(self, purpose: str, challenge_id: str, challenge: bytes, *,
                  origin: str | None = None, cyphr_id: str | None = None,
                  fingerprint: str | None = None) -> AuthStatement:
        return AuthStatement(
            purpose=purpose, origin=origin or self.origin or "http://127.0.0.1",
            cyphr_id=cyphr_id or self.cyphr_id, device=device_hash(fingerprint or self.fingerprint),
            challenge_id=challenge_id, challenge=challenge)

    def proof(self, statement: AuthStatement, signer: SigningKey | None = None) -> dict[str, str]:
        """``statement`` and ``signature`` of a body: the encoded statement
        and its labelled signature (v2), or the raw challenge's signature (v1)."""
        if self.v1:
            return {"signature": self.encode_signature(
                (signer or self.signing_key).sign(statement.challenge).signature)}
        return {"statement": b64(statement.encode()),
                "signature": self.encode_signature(statement.sign(signer or self.signing_key))}

    async def challenge(self, http: JsonCalls, cyphr_id: str | None = None) -> tuple[str, bytes]:
        self.use(http)
        response = await http.post("/api/cyphr-id/challenge", {"cyphrId": cyphr_id or self.cyphr_id})
        assert response.code == 200, response.body
        body = response.json()
        return body["challengeId"], base64.b64decode(body["challenge"])

    async def _signed_body(self, http: JsonCalls, purpose: str, body: dict[str, Any],
                           fingerprint_field: str | None, overrides: dict[str, Any],
                           challenge: tuple[str, bytes] | None) -> dict[str, Any]:
        """``body`` with a fresh challenge (or ``challenge``), the overrides,
        and a proof built from the body as it then is (so that a test
        changing the device or Cyphr ID gets a statement that says so);
        ``statement`` and ``signature`` may be overridden too."""
        challenge_id, raw = challenge or await self.challenge(http)
        self.use(http)
        body["challengeId"] = challenge_id
        body.update({k: v for k, v in overrides.items() if k not in PROOF_FIELDS})
        fingerprint = body.get(fingerprint_field) if fingerprint_field else None
        statement = self.statement(
            purpose, _text(body.get("challengeId"), challenge_id), raw,
            cyphr_id=_text(body.get("cyphrId"), self.cyphr_id),
            fingerprint=_text(fingerprint, self.fingerprint))
        body.update(self.proof(statement))
        body.update({k: v for k, v in overrides.items() if k in PROOF_FIELDS})
        return body

    async def register_body(self, http: JsonCalls, challenge: tuple[str, bytes] | None = None,
                            **overrides: Any) -> dict[str, Any]:
        self.use(http)
        body = {
            "cyphrId": self.cyphr_id,
            "publicKey": b64(self.public_key),
            **self.main_key_fields(),
            "deviceFingerprint": self.fingerprint,
            "displayName": self.cyphr_id.title(),
        }
        return await self._signed_body(http, REGISTER, body, "deviceFingerprint", overrides, challenge)

    async def register(self, http: JsonCalls) -> Response:
        response = await http.post("/api/cyphr-id/register", await self.register_body(http))
        assert response.code == 201, response.body
        self.token = response.json()["token"]
        self.user_id = response.json()["userId"]
        return response

    async def login_body(self, http: JsonCalls, challenge: tuple[str, bytes] | None = None,
                         **overrides: Any) -> dict[str, Any]:
        body = {"cyphrId": self.cyphr_id, "deviceFingerprint": self.fingerprint}
        return await self._signed_body(http, LOGIN, body, "deviceFingerprint", overrides, challenge)

    async def login(self, http: JsonCalls, **overrides: Any) -> Response:
        response = await http.post("/api/cyphr-id/login", await self.login_body(http, **overrides))
        if response.code == 200:
            self.token = response.json()["token"]
        return response

    async def recover_body(self, http: JsonCalls, new_fingerprint: str, *,
                           challenge: tuple[str, bytes] | None = None, **overrides: Any) -> dict[str, Any]:
        body = {"cyphrId": self.cyphr_id, "newDeviceFingerprint": new_fingerprint}
        return await self._signed_body(http, RECOVER, body, "newDeviceFingerprint", overrides, challenge)

    async def recover(self, http: JsonCalls, new_fingerprint: str, **overrides: Any) -> Response:
        return await http.post("/api/cyphr-id/recover",
                               await self.recover_body(http, new_fingerprint, **overrides))

    async def delete_body(self, http: JsonCalls, *, challenge: tuple[str, bytes] | None = None,
                          **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {} if self.v1 else {"deviceFingerprint": self.fingerprint}
        return await self._signed_body(http, DELETE, body, "deviceFingerprint", overrides, challenge)

    async def delete_account(self, http: JsonCalls, **overrides: Any) -> Response:
        import json

        body = await self.delete_body(http, **overrides)
        return await http.request("DELETE", "/api/cyphr-id/account", data=json.dumps(body).encode(),
                                  headers={**self.auth(), b"Content-Type": [b"application/json"]})
