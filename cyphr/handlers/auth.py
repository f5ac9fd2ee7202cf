"""Who is calling: the bearer token of a request, checked all the way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from cyphr.errors import INVALID_TOKEN, TOKEN_REVOKED, UNAUTHORIZED, Unauthorized
from cyphr.handlers.tokens import TokenService
from cyphr.store.identities import AuthState, IdentityStore

MAX_LOOKUPS_PER_QUERY = 500


class AuthStateLoader:
    """
    Looks up the state behind tokens for every request that arrives in the
    same turn of the reactor with one query, rather than one query each:
    under load, authenticating stops costing a round trip per request. A
    lone request still waits for nobody.
    """

    def __init__(self, identities: IdentityStore, reactor: Any) -> None:
        self._identities = identities
        self._reactor = reactor
        self._pending: dict[tuple[str, str, str], list[Deferred[AuthState | None]]] = {}
        self._scheduled: Any = None

    def load(self, user_id: str, jti: str, device_hash: str) -> Deferred[AuthState | None]:
        d: Deferred[AuthState | None] = Deferred()
        self._pending.setdefault((user_id, jti, device_hash), []).append(d)
        if self._scheduled is None:
            self._scheduled = self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._scheduled = None
        pending, self._pending = self._pending, {}
        keys = list(pending)
        for start in range(0, len(keys), MAX_LOOKUPS_PER_QUERY):
            chunk = keys[start:start + MAX_LOOKUPS_PER_QUERY]
            lookup = Deferred.fromCoroutine(self._identities.auth_states(chunk))
            lookup.addCallbacks(self._deliver, self._fail, callbackArgs=(chunk, pending),
                                errbackArgs=(chunk, pending))

    @staticmethod
    def _deliver(states: dict[tuple[str, str, str], AuthState], chunk: list[tuple[str, str, str]],
                 pending: dict[tuple[str, str, str], list[Deferred[AuthState | None]]]) -> None:
        for key in chunk:
            for d in pending[key]:
                d.callback(states.get(key))

    @staticmethod
    def _fail(failure: Any, chunk: list[tuple[str, str, str]],
              pending: dict[tuple[str, str, str], list[Deferred[AuthState | None]]]) -> None:
        for key in chunk:
            for d in pending[key]:
                d.errback(failure)


@dataclass(frozen=True)
class AuthUser:
    """The authenticated caller."""

    user_id: str
    cyphr_id: str
    jti: str
    expires_at: int  # seconds
    device_hash: str  # the keyed fingerprint hash the token names
    device_id: int  # the identity's device of that fingerprint


class Authenticator:
    def __init__(self, tokens: TokenService, identities: IdentityStore, reactor: Any) -> None:
        self._tokens = tokens
        self._states = AuthStateLoader(identities, reactor)

    async def authenticate(self, authorization: bytes | str | None) -> AuthUser:
        """
        The caller of an ``Authorization: Bearer <JWT>`` header. The token
        must be ours, unexpired and unrevoked, and its identity must still
        exist and still have the token's device, and neither the identity
        nor the device may have revoked every token older than this one
        (recovery). Unauthorized otherwise.
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
        state = await self._states.load(claims.user_id, claims.jti, claims.device_hash)
        if state is None or state.cyphr_id != claims.cyphr_id:
            raise Unauthorized("The session token is not valid", code=INVALID_TOKEN)
        if state.revoked:
            raise Unauthorized("The session token was revoked", code=TOKEN_REVOKED)
        # The device was found by its fingerprint hash, compared in the
        # database: the hash is keyed by a server secret, so it is no secret
        # a timing could reveal to whoever holds the token naming it.
        if (
            state.device_id is None
            or claims.issued_at * 1000 < state.tokens_valid_after
            or claims.issued_at * 1000 < state.device_tokens_valid_after
        ):
            raise Unauthorized("The session token was revoked", code=TOKEN_REVOKED)
        return AuthUser(claims.user_id, claims.cyphr_id, claims.jti, claims.expires_at,
                        claims.device_hash, state.device_id)
