"""
Cyphr IDs: registration, login by challenge signature, recovery on a new
device, profiles, search, logout and deletion.

Every proof of identity is an Ed25519 signature over a challenge the server
issued for that Cyphr ID: single use, valid five minutes. A challenge is
used up by the first request that presents it, whether or not the rest of
that request succeeds.
"""

from __future__ import annotations

import hmac
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from cyphr.clock import now_ms
from cyphr.crypto import (
    fingerprint_hash,
    is_mlkem1024_key,
    verify_ed25519,
    verify_kyber_key_signature,
)
from cyphr.errors import (
    CYPHR_ID_TAKEN,
    DEVICE_MISMATCH,
    INVALID_CHALLENGE,
    INVALID_KEY_SIGNATURE,
    INVALID_KYBER_KEY,
    INVALID_SIGNATURE,
    USER_NOT_FOUND,
    BadRequest,
    Conflict,
    NotFound,
    Unauthorized,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.security import TotpHandler
from cyphr.handlers.tokens import IssuedToken, TokenService
from cyphr.store.challenges import ChallengeStore
from cyphr.store.identities import Identity, IdentityStore, IdentityTaken
from cyphr.store.tokens import TokenStore

CHALLENGE_BYTES = 32
CHALLENGE_LIFETIME_MS = 5 * 60 * 1000


@dataclass(frozen=True)
class Challenge:
    challenge_id: str
    challenge: bytes
    expires_at: int  # ms


@dataclass(frozen=True)
class Session:
    token: IssuedToken
    identity: Identity


def _challenge_refused() -> Unauthorized:
    return Unauthorized("The challenge is unknown, used, expired or for another Cyphr ID",
                        code=INVALID_CHALLENGE)


def check_kyber_key(identity_key: bytes, kyber_key: bytes, signature: bytes,
                    field: str = "kyberPublicKey") -> None:
    """Refuse a Kyber key that is not a valid ML-KEM-1024 key, or that the
    identity key did not sign."""
    if not is_mlkem1024_key(kyber_key):
        raise BadRequest(f"{field} is not a valid ML-KEM-1024 public key",
                         code=INVALID_KYBER_KEY, details={"field": field})
    if not verify_kyber_key_signature(identity_key, kyber_key, signature):
        raise BadRequest("The Kyber key signature does not verify with the identity key",
                         code=INVALID_KEY_SIGNATURE, details={"field": field})


class IdentityHandler:
    def __init__(
        self,
        identities: IdentityStore,
        challenges: ChallengeStore,
        revocations: TokenStore,
        tokens: TokenService,
        totp: TotpHandler,
        fingerprint_key: bytes,
        clock: Any,
        is_online: Callable[[str], bool] = lambda cyphr_id: False,
    ) -> None:
        self._identities = identities
        self._challenges = challenges
        self._revocations = revocations
        self._tokens = tokens
        self._totp = totp
        self._fingerprint_key = fingerprint_key
        self._clock = clock
        self.is_online = is_online
        # Told when tokens of a user end: (cyphrId, jti), or (cyphrId, None)
        # for all of them. The realtime layer disconnects their sockets.
        self.sessions_ended: Callable[[str, str | None], None] = lambda cyphr_id, jti: None

    def _device(self, fingerprint: str) -> str:
        return fingerprint_hash(self._fingerprint_key, fingerprint)

    # -- challenges -----------------------------------------------------

    async def issue_challenge(self, cyphr_id: str) -> Challenge:
        now = now_ms(self._clock)
        challenge = Challenge(str(uuid.uuid4()), os.urandom(CHALLENGE_BYTES), now + CHALLENGE_LIFETIME_MS)
        await self._challenges.create(challenge.challenge_id, cyphr_id, challenge.challenge,
                                      now, challenge.expires_at)
        return challenge

    async def consume_challenge(self, challenge_id: str, cyphr_id: str) -> bytes:
        challenge = await self._challenges.consume(challenge_id, cyphr_id, now_ms(self._clock))
        if challenge is None:
            raise _challenge_refused()
        return challenge

    # -- accounts -------------------------------------------------------

    async def is_available(self, cyphr_id: str) -> bool:
        return await self._identities.is_available(cyphr_id)

    async def register(self, *, cyphr_id: str, public_key: bytes, kyber_public_key: bytes,
                       kyber_key_signature: bytes, device_fingerprint: str,
                       display_name: str | None, challenge_id: str, signature: bytes) -> Session:
        check_kyber_key(public_key, kyber_public_key, kyber_key_signature)
        challenge = await self.consume_challenge(challenge_id, cyphr_id)
        if not verify_ed25519(public_key, challenge, signature):
            raise Unauthorized("The signature does not verify with publicKey", code=INVALID_SIGNATURE)
        now = now_ms(self._clock)
        identity = Identity(
            id=str(uuid.uuid4()), cyphr_id=cyphr_id, public_key=public_key,
            kyber_public_key=kyber_public_key, kyber_key_signature=kyber_key_signature,
            device_fingerprint_hash=self._device(device_fingerprint), display_name=display_name,
            avatar_url=None, encrypted_settings=None, recovery_phrase_hint=None,
            tokens_valid_after=0, created_at=now, updated_at=now, last_seen=None,
            totp_enabled=False)
        try:
            await self._identities.create(identity)
        except IdentityTaken:
            raise Conflict("This Cyphr ID is taken", code=CYPHR_ID_TAKEN) from None
        return Session(self._issue(identity, identity.device_fingerprint_hash), identity)

    def _issue(self, identity: Identity, device_hash: str | None) -> IssuedToken:
        assert device_hash is not None
        return self._tokens.issue(identity.id, identity.cyphr_id, device_hash)

    async def _proven(self, cyphr_id: str, challenge_id: str, signature: bytes) -> Identity:
        """The identity ``cyphr_id``, whose key signed a fresh challenge. An
        unknown Cyphr ID is refused like a wrong signature (after the
        challenge is used up all the same), so as to tell no more."""
        challenge, identity = await self._identities.consume_challenge_and_get(
            challenge_id, cyphr_id, now_ms(self._clock))
        if challenge is None:
            raise _challenge_refused()
        if identity is None or not verify_ed25519(identity.public_key, challenge, signature):
            raise Unauthorized("The signature does not verify", code=INVALID_SIGNATURE)
        return identity

    async def login(self, *, cyphr_id: str, device_fingerprint: str, challenge_id: str,
                    signature: bytes, totp_code: str | None) -> Session:
        identity = await self._proven(cyphr_id, challenge_id, signature)
        device = self._device(device_fingerprint)
        if identity.device_fingerprint_hash is None or not hmac.compare_digest(
            identity.device_fingerprint_hash, device
        ):
            raise Unauthorized("This identity is bound to another device; recover it to move it here",
                               code=DEVICE_MISMATCH)
        if identity.totp_enabled:
            await self._totp.check_login(identity.id, totp_code)
        return Session(self._issue(identity, device), identity)

    async def recover(self, *, cyphr_id: str, new_device_fingerprint: str, challenge_id: str,
                      signature: bytes, kyber: tuple[bytes, bytes] | None,
                      totp_code: str | None) -> Session:
        """The recovery phrase re-creates the identity key on a new device;
        proving it moves the identity there and revokes every earlier token."""
        identity = await self._proven(cyphr_id, challenge_id, signature)
        if kyber is not None:
            check_kyber_key(identity.public_key, *kyber)
        if identity.totp_enabled:
            await self._totp.check_login(identity.id, totp_code)
        now = now_ms(self._clock)
        device = self._device(new_device_fingerprint)
        # Tokens carry whole seconds: every token issued before this second
        # stops working (those of the old device stop anyway: their device
        # no longer matches).
        await self._identities.rebind_device(identity.id, device, now - now % 1000, kyber, now)
        self.sessions_ended(identity.cyphr_id, None)
        recovered = await self._identities.by_id(identity.id)
        assert recovered is not None
        return Session(self._issue(recovered, device), recovered)

    async def logout(self, user: AuthUser) -> None:
        await self._revocations.revoke(user.jti, user.user_id, user.expires_at * 1000)
        self.sessions_ended(user.cyphr_id, user.jti)

    async def delete_account(self, user: AuthUser, challenge_id: str, signature: bytes) -> None:
        identity = await self._proven(user.cyphr_id, challenge_id, signature)
        if identity.id != user.user_id:
            raise Unauthorized("The session token is not valid")
        await self._identities.delete(identity, now_ms(self._clock))
        self.sessions_ended(identity.cyphr_id, None)

    # -- profiles -------------------------------------------------------

    async def me(self, user: AuthUser) -> Identity:
        identity = await self._identities.by_id(user.user_id)
        if identity is None:
            raise Unauthorized("The session token is not valid")
        return identity

    async def user(self, cyphr_id: str) -> Identity:
        identity = await self._identities.by_cyphr_id(cyphr_id)
        if identity is None:
            raise NotFound("No such user", code=USER_NOT_FOUND)
        return identity

    async def search(self, prefix: str, limit: int) -> list[Identity]:
        return await self._identities.search(prefix, limit)

    async def update_profile(self, user: AuthUser, changes: dict[str, Any]) -> Identity:
        if changes:
            await self._identities.update_profile(user.user_id, changes, now_ms(self._clock))
        return await self.me(user)

    async def set_kyber_key(self, user: AuthUser, kyber_key: bytes, signature: bytes) -> None:
        identity = await self.me(user)
        check_kyber_key(identity.public_key, kyber_key, signature)
        await self._identities.set_kyber_key(user.user_id, kyber_key, signature, now_ms(self._clock))
