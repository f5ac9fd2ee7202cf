"""
Test users with real keys: an Ed25519 identity key (pynacl), an ML-KEM-1024
key pair (cryptography), a device fingerprint, and the calls a client makes
to register and log in.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from nacl.signing import SigningKey

from cyphr.crypto import KYBER_KEY_CONTEXT
from tests.helpers import InProcessHTTP, Response


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def new_kyber_key() -> bytes:
    return MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()


@dataclass
class User:
    cyphr_id: str
    signing_key: SigningKey = field(default_factory=SigningKey.generate)
    kyber_key: bytes = field(default_factory=new_kyber_key)
    fingerprint: str = field(default_factory=lambda: hashlib.sha256(os.urandom(16)).hexdigest())
    token: str | None = None
    user_id: str | None = None

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    def sign(self, message: bytes) -> str:
        return b64(self.signing_key.sign(message).signature)

    def kyber_signature(self, kyber_key: bytes | None = None) -> str:
        return self.sign(KYBER_KEY_CONTEXT + (kyber_key if kyber_key is not None else self.kyber_key))

    def auth(self, token: str | None = None) -> dict[bytes, list[bytes]]:
        return {b"Authorization": [f"Bearer {token or self.token}".encode("ascii")]}

    async def challenge(self, http: InProcessHTTP, cyphr_id: str | None = None) -> tuple[str, bytes]:
        response = await http.post("/api/cyphr-id/challenge", {"cyphrId": cyphr_id or self.cyphr_id})
        assert response.code == 200, response.body
        body = response.json()
        return body["challengeId"], base64.b64decode(body["challenge"])

    async def register_body(self, http: InProcessHTTP, **overrides: Any) -> dict[str, Any]:
        challenge_id, challenge = await self.challenge(http)
        body = {
            "cyphrId": self.cyphr_id,
            "publicKey": b64(self.public_key),
            "kyberPublicKey": b64(self.kyber_key),
            "kyberKeySignature": self.kyber_signature(),
            "deviceFingerprint": self.fingerprint,
            "displayName": self.cyphr_id.title(),
            "challengeId": challenge_id,
            "signature": self.sign(challenge),
        }
        body.update(overrides)
        return body

    async def register(self, http: InProcessHTTP) -> Response:
        response = await http.post("/api/cyphr-id/register", await self.register_body(http))
        assert response.code == 201, response.body
        self.token = response.json()["token"]
        self.user_id = response.json()["userId"]
        return response

    async def login_body(self, http: InProcessHTTP, **overrides: Any) -> dict[str, Any]:
        challenge_id, challenge = await self.challenge(http)
        body = {
            "cyphrId": self.cyphr_id,
            "deviceFingerprint": self.fingerprint,
            "challengeId": challenge_id,
            "signature": self.sign(challenge),
        }
        body.update(overrides)
        return body

    async def login(self, http: InProcessHTTP, **overrides: Any) -> Response:
        response = await http.post("/api/cyphr-id/login", await self.login_body(http, **overrides))
        if response.code == 200:
            self.token = response.json()["token"]
        return response
