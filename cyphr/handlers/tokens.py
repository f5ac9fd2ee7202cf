"""
Session tokens: JWT, HS256 only, with the claims of the contract
``{sub, cyphrId, dev, authMethod, jti, iat, exp}``. Expiry is checked
against the injected clock; revocation is checked by the Authenticator.

Signing and checking are done here rather than with a JWT library: every
authenticated request checks a token, and a general library spends most of
its time on the algorithms and options this server never accepts. The check
is stricter than a library's: the header must be exactly the one this
server writes, so "alg": "none", other algorithms and key confusion cannot
even be expressed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cyphr.errors import INVALID_TOKEN, TOKEN_EXPIRED, Unauthorized

ALGORITHM = "HS256"
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64url_decode(data: bytes) -> bytes:
    """
    Exactly the form _b64url writes: the URL-safe alphabet, no padding, no
    stray bits in the last character; ValueError otherwise. A token is one
    string, so no other spelling of the same bytes (standard base64, ``=``
    padding) passes as it.
    """
    # b64decode maps altchars onto "+/" before validating, so it would take
    # "+" and "/" too: the alphabet is checked here.
    if _BASE64URL.fullmatch(data) is None:
        raise ValueError("not unpadded base64url")
    raw = base64.b64decode(data + b"=" * (-len(data) % 4), altchars=b"-_", validate=True)
    if _b64url(raw) != data:  # unused low bits set: another spelling
        raise ValueError("not canonical base64url")
    return raw


# Tokens whose check is remembered. A token is kept while it is used: one
# unused for TOKEN_CACHE_IDLE seconds (its user left) is forgotten at the
# next check of any token, so the cache follows the users active now, not
# every token ever seen; TOKEN_CACHE_SIZE caps it besides (the least
# recently used goes first). A forgotten token is only checked again.
TOKEN_CACHE_SIZE = 10_000
TOKEN_CACHE_IDLE = 60.0


_HEADER = _b64url(json.dumps({"alg": ALGORITHM, "typ": "JWT"}, separators=(",", ":")).encode())


def _invalid() -> Unauthorized:
    return Unauthorized("The session token is not valid", code=INVALID_TOKEN)


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
    def __init__(self, key: bytes, lifetime: int, clock: Any, *,
                 cache_size: int = TOKEN_CACHE_SIZE, cache_idle: float = TOKEN_CACHE_IDLE) -> None:
        self._key = key
        self._lifetime = lifetime
        self._clock = clock
        # A client presents the same token on every request: its signature
        # and claims are checked once. Only tokens that verified are kept
        # (exceptions are not cached); expiry is checked on every use.
        # token -> (claims, when last used), in order of last use.
        self._cache: OrderedDict[str, tuple[Claims, float]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_idle = cache_idle

    def memory_tables(self) -> dict[str, int]:
        """The size of each table, for the memory metrics."""
        return {"token_checks": len(self._cache)}

    def _checked(self, token: str) -> Claims:
        now = self._clock.seconds()
        cache = self._cache
        entry = cache.get(token)
        if entry is None:
            claims = self._check(token)
        else:
            claims = entry[0]
        cache[token] = (claims, now)
        cache.move_to_end(token)
        self.expire(now)
        while len(cache) > self._cache_size:
            cache.popitem(last=False)
        return claims

    def expire(self, now: float | None = None) -> None:
        """Forget the tokens unused for TOKEN_CACHE_IDLE, from the cache's
        old end (each is popped once in its life: amortised O(1) per use).
        Also called on a timer (build_server), for a cache no longer used."""
        if now is None:
            now = self._clock.seconds()
        cache = self._cache
        while cache:
            oldest = next(iter(cache))
            if now - cache[oldest][1] <= self._cache_idle:
                break
            del cache[oldest]

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
        signing_input = _HEADER + b"." + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signature = hmac.new(self._key, signing_input, hashlib.sha256).digest()
        token = (signing_input + b"." + _b64url(signature)).decode("ascii")
        return IssuedToken(token, jti, now, now + self._lifetime)

    def verify(self, token: str) -> Claims:
        """The token's claims if it is ours and unexpired; Unauthorized otherwise."""
        claims = self._checked(token)
        if claims.expires_at <= self._clock.seconds():
            raise Unauthorized("The session token has expired", code=TOKEN_EXPIRED)
        return claims

    def _check(self, token: str) -> Claims:
        try:
            header, payload, signature = token.encode("ascii").split(b".")
        except (UnicodeEncodeError, ValueError):
            raise _invalid() from None
        if not hmac.compare_digest(header, _HEADER):
            raise _invalid()
        expected = hmac.new(self._key, header + b"." + payload, hashlib.sha256).digest()
        try:
            if not hmac.compare_digest(_b64url_decode(signature), expected):
                raise _invalid()
            claims = json.loads(_b64url_decode(payload))
        except (ValueError, UnicodeDecodeError):
            raise _invalid() from None
        if not isinstance(claims, dict):
            raise _invalid()
        fields = (claims.get("sub"), claims.get("cyphrId"), claims.get("dev"), claims.get("jti"))
        times = (claims.get("iat"), claims.get("exp"))
        if not all(isinstance(v, str) for v in fields) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in times
        ) or claims.get("authMethod") != "cyphr_id":
            raise _invalid()
        return Claims(claims["sub"], claims["cyphrId"], claims["dev"], claims["jti"],
                      claims["iat"], claims["exp"])
