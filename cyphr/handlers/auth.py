"""Who is calling: the bearer token of a request, checked all the way."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cyphr.errors import INVALID_TOKEN, TOKEN_REVOKED, UNAUTHORIZED, Unauthorized
from cyphr.handlers.tokens import TokenService
from cyphr.store.identities import IdentityStore


@dataclass(frozen=True)
class AuthUser:
    """The authenticated caller."""

    user_id: str
    cyphr_id: str
    jti: str
    expires_at: int  # seconds
    device_hash: str


class Authenticator:
    def __init__(self, tokens: TokenService, identities: IdentityStore) -> None:
        self._tokens = tokens
        self._identities = identities

    async def authenticate(self, authorization: bytes | str | None) -> AuthUser:
        """
        The caller of an ``Authorization: Bearer <JWT>`` header. The token
        must be ours, unexpired and unrevoked, and its identity must still
        exist, be bound to the token's device, and not have revoked every
        token older than this one (recovery). Unauthorized otherwise.
        """
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        if not authorization:
            raise Unauthorized("Authentication required", code=UNAUTHORIZED)
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Use Authorization: Bearer <token>", code=UNAUTHORIZED)
        return await self.authenticate_token(token.strip())

    async def authenticate_token(self, token: str) -> AuthUser:
        claims = self._tokens.verify(token)
        state = await self._identities.auth_state(claims.user_id, claims.jti)
        if state is None or state.cyphr_id != claims.cyphr_id:
            raise Unauthorized("The session token is not valid", code=INVALID_TOKEN)
        if state.revoked:
            raise Unauthorized("The session token was revoked", code=TOKEN_REVOKED)
        if (
            state.device_fingerprint_hash is None
            or not hmac.compare_digest(state.device_fingerprint_hash, claims.device_hash)
            or claims.issued_at * 1000 < state.tokens_valid_after
        ):
            raise Unauthorized("The session token was revoked", code=TOKEN_REVOKED)
        return AuthUser(claims.user_id, claims.cyphr_id, claims.jti, claims.expires_at,
                        claims.device_hash)
