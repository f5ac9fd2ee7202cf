"""
Session tokens: JWT, HS256 only, with the claims of the contract
``{sub, cyphrId, dev, authMethod, jti, iat, exp}``. Expiry is checked
against the injected clock; revocation is checked by the Authenticator.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from cyphr.errors import INVALID_TOKEN, TOKEN_EXPIRED, Unauthorized

ALGORITHM = "HS256"


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


_HEADER = _b64url(json.dumps({"alg": ALGORITHM, "typ": "JWT"}, separators=(",", ":")).encode())


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    issued_at: int  # seconds
    expires_at: int  # seconds


@dataclass(frozen=True)
class Claims:
    user_id: str
    cyphr_id: str
    device_hash: str
    jti: str
    issued_at: int
    expires_at: int


class TokenService:
    def __init__(self, key: bytes, lifetime: int, clock: Any) -> None:
        self._key = key
        self._lifetime = lifetime
        self._clock = clock

    def issue(self, user_id: str, cyphr_id: str, device_hash: str) -> IssuedToken:
        now = int(self._clock.seconds())
        jti = uuid.uuid4().hex
        claims = {
            "sub": user_id,
            "cyphrId": cyphr_id,
            "dev": device_hash,
            "authMethod": "cyphr_id",
            "jti": jti,
            "iat": now,
            "exp": now + self._lifetime,
        }
        # Signing is done here (a fifth of PyJWT's cost on the login path);
        # verifying stays with PyJWT, below.
        signing_input = _HEADER + b"." + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signature = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        token = (signing_input + b"." + _b64url(signature)).decode("ascii")
        return IssuedToken(token, jti, now, now + self._lifetime)

    def verify(self, token: str) -> Claims:
        """The token's claims if it is ours and unexpired; Unauthorized otherwise."""
        try:
            # Only HS256: "none" and every other algorithm are refused here.
            claims = jwt.decode(
                token, self._key, algorithms=[ALGORITHM],
                # Expiry is checked below against the injected clock.
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                         "require": ["sub", "cyphrId", "dev", "jti", "iat", "exp"]},
            )
        except jwt.InvalidTokenError:
            raise Unauthorized("The session token is not valid", code=INVALID_TOKEN) from None
        fields = (claims.get("sub"), claims.get("cyphrId"), claims.get("dev"), claims.get("jti"))
        times = (claims.get("iat"), claims.get("exp"))
        if not all(isinstance(v, str) for v in fields) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in times
        ) or claims.get("authMethod") != "cyphr_id":
            raise Unauthorized("The session token is not valid", code=INVALID_TOKEN)
        if claims["exp"] <= self._clock.seconds():
            raise Unauthorized("The session token has expired", code=TOKEN_EXPIRED)
        return Claims(claims["sub"], claims["cyphrId"], claims["dev"], claims["jti"],
                      claims["iat"], claims["exp"])
