"""
Cyphr IDs: registration, login by a signed statement, recovery on a new
device, profiles, search, logout and deletion.

An identity has devices (cyphr.store.devices): registration makes device 1;
login is from one of the identity's devices (its fingerprint names it);
recovery adds a device, removing the others or keeping them.

Every proof of identity answers a challenge the server issued for that
Cyphr ID (single use, valid five minutes, used up by the first request that
presents it whether or not the rest of that request succeeds). Version 2:
the client signs, with the label ``cyphr-v2 auth``, a statement it built
itself (``signing.AuthStatement``: purpose, this server's origin, Cyphr ID,
device, challenge id and challenge), so that a signature made for one
purpose, server, identity or device is refused everywhere else. Version 1,
a signature over the raw challenge, is accepted only under
``accept_v1_auth``.
"""

from __future__ import annotations

import hmac
import os
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable

from cyphr.changes import ChangeFeed, DevicesChanged, IdentityDeleted, SessionsEnded
from cyphr.clock import now_ms
from cyphr.crypto import fingerprint_hash, verify_ed25519
from cyphr.errors import (
    CYPHR_ID_TAKEN,
    DEVICE_LIMIT,
    DEVICE_MISMATCH,
    INVALID_CHALLENGE,
    INVALID_KEY_SIGNATURE,
    INVALID_SIGNATURE,
    MISSING_FIELD,
    STALE_KEY,
    STATEMENT_MISMATCH,
    TOKEN_REVOKED,
    UNSUPPORTED_SIGNATURE_VERSION,
    USER_NOT_FOUND,
    Conflict,
    NotFound,
    BadRequest,
    Unauthorized,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.keycheck import KeyFields, check_device_key, check_key
from cyphr.handlers.origins import AcceptedOrigins
from cyphr.handlers.security import TotpHandler
from cyphr.handlers.tokens import IssuedToken, TokenService
from cyphr.handlers.validation import invalid
from cyphr.signing import (
    AUTH,
    DELETE,
    LOGIN,
    RECOVER,
    REGISTER,
    AuthStatement,
    EncodingError,
    device_hash,
    verify_with_label,
)
from cyphr.store.challenges import ChallengeStore
from cyphr.store.chats import ChatStore
from cyphr.store.devices import DeviceLimit, DeviceStore, StaleDeviceKey
from cyphr.store.identities import Identity, IdentityStore, IdentityTaken, MainKey
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
    device_id: int


@dataclass(frozen=True)
class Proof:
    """What a request presents to prove the identity key: the challenge it
    answers, and either a v2 statement (its encoding, as sent) with the
    signature over it, or (v1, ``statement`` None) a signature over the raw
    challenge."""

    challenge_id: str
    signature: bytes
    statement: bytes | None


def _challenge_refused() -> Unauthorized:
    return Unauthorized("The challenge is unknown, used, expired or for another Cyphr ID",
                        code=INVALID_CHALLENGE)


def _mismatch(field: str, message: str, expected: str | None = None) -> Unauthorized:
    details: dict[str, Any] = {"field": field}
    if expected is not None:
        details["expected"] = expected
    return Unauthorized(message, code=STATEMENT_MISMATCH, details=details)


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
        *,
        devices: DeviceStore,
        max_devices: int,
        is_online: Callable[[str], bool],
        chats: ChatStore,
        changes: ChangeFeed,
        origins: AcceptedOrigins,
        accept_v1: bool,
    ) -> None:
        self._identities = identities
        self._devices = devices
        self.max_devices = max_devices
        self._challenges = challenges
        self._revocations = revocations
        self._tokens = tokens
        self._totp = totp
        self._fingerprint_key = fingerprint_key
        self._clock = clock
        self.is_online = is_online
        self._chats = chats
        self._origins = origins
        self.accept_v1 = accept_v1
        # Told when tokens of a user end (SessionsEnded: the realtime layer
        # closes their sockets) and when an identity is deleted.
        self._changes = changes

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

    # -- proofs ---------------------------------------------------------

    def _check_proof(self, proof: Proof, challenge: bytes, *, purpose: str, cyphr_id: str,
                     device_fingerprint: str | None, identity_key: bytes | None) -> None:
        """Refuse a proof, after its challenge was used up: a v1 signature
        unless v1 is accepted; a malformed statement (400); a statement made
        for another purpose, origin, Cyphr ID, device, challenge id or
        challenge (STATEMENT_MISMATCH); then a signature that does not verify
        with ``identity_key`` (None: an unknown identity, refused the same
        way, so as to tell no more)."""
        if proof.statement is None:
            if not self.accept_v1:
                raise Unauthorized(
                    "v1 login signatures over the raw challenge are not accepted; update the client",
                    code=UNSUPPORTED_SIGNATURE_VERSION)
            valid = identity_key is not None and verify_ed25519(identity_key, challenge, proof.signature)
        else:
            try:
                statement = AuthStatement.decode(proof.statement)
            except EncodingError as e:
                raise invalid("statement", f"statement is not a login statement: {e}") from None
            if statement.purpose != purpose:
                raise _mismatch("purpose", f"The statement is for purpose {statement.purpose}, "
                                f"not {purpose}", purpose)
            if not self._origins.accepts(statement.origin):
                raise _mismatch("origin", "The statement names another server origin than this "
                                f"server accepts ({self._origins.describe()})", self._origins.describe())
            if statement.cyphr_id != cyphr_id:
                raise _mismatch("cyphrId", f"The statement is for another Cyphr ID than {cyphr_id}",
                                cyphr_id)
            if device_fingerprint is not None and not hmac.compare_digest(
                statement.device, device_hash(device_fingerprint)
            ):
                raise _mismatch("device", "The statement is for another device")
            if statement.challenge_id != proof.challenge_id:
                raise _mismatch("challengeId", "The statement is for another challenge id than "
                                f"{proof.challenge_id}", proof.challenge_id)
            if not hmac.compare_digest(statement.challenge, challenge):
                raise _mismatch("challenge", "The statement is for another challenge")
            valid = identity_key is not None and verify_with_label(
                identity_key, AUTH, proof.statement, proof.signature)
        if not valid:
            raise Unauthorized("The signature does not verify", code=INVALID_SIGNATURE)

    async def _proven(self, purpose: str, cyphr_id: str, device_fingerprint: str | None,
                      proof: Proof) -> Identity:
        """The identity ``cyphr_id``, whose key signed a fresh challenge for
        ``purpose``. An unknown Cyphr ID is refused like a wrong signature
        (after the challenge is used up all the same)."""
        challenge, identity = await self._identities.consume_challenge_and_get(
            proof.challenge_id, cyphr_id, now_ms(self._clock))
        if challenge is None:
            raise _challenge_refused()
        self._check_proof(proof, challenge, purpose=purpose, cyphr_id=cyphr_id,
                          device_fingerprint=device_fingerprint,
                          identity_key=identity.public_key if identity is not None else None)
        assert identity is not None
        return identity

    def check_device_key(self, key: MainKey, identity_key: bytes, owner: str,
                         device_id: int | None) -> MainKey:
        """``key`` as checked for device ``device_id`` of ``owner``: signed
        by the identity key as that device's key (version 3, answered with
        ``device_bound`` set), or as the identity's main key with no device
        id (version 2, as clients of the single-device API sign; and version
        1 where accepted). ``device_id`` None (a device whose id is not given
        yet) accepts version 2 only. 400 otherwise (cyphr.handlers.keycheck).

        A signature verifies under one label at most, so which version a key
        is signed in is read from its signature, with no field to say so."""
        now = now_ms(self._clock)
        fields = KeyFields.main_key()
        if key.signature_version != 1 and device_id is not None:
            try:
                check_device_key(key, identity_key=identity_key, owner=owner, device_id=device_id,
                                 key_id=key.key_id, now=now, fields=fields)
                return replace(key, device_bound=True)
            except BadRequest as e:
                if e.code != INVALID_KEY_SIGNATURE:
                    raise
        check_key(key, identity_key=identity_key, owner=owner, key_id=key.key_id, one_time=False,
                  now=now, accept_v1=self.accept_v1, fields=fields)
        return replace(key, device_bound=False)

    # -- accounts -------------------------------------------------------

    async def is_available(self, cyphr_id: str) -> bool:
        return await self._identities.is_available(cyphr_id)

    async def register(self, *, cyphr_id: str, public_key: bytes, main_key: MainKey,
                       device_fingerprint: str, display_name: str | None, proof: Proof) -> Session:
        main_key = self.check_device_key(main_key, public_key, cyphr_id, 1)
        challenge = await self.consume_challenge(proof.challenge_id, cyphr_id)
        self._check_proof(proof, challenge, purpose=REGISTER, cyphr_id=cyphr_id,
                          device_fingerprint=device_fingerprint, identity_key=public_key)
        now = now_ms(self._clock)
        identity = Identity(
            id=str(uuid.uuid4()), cyphr_id=cyphr_id, public_key=public_key,
            kyber_public_key=main_key.kyber_public_key, kyber_key_signature=main_key.signature,
            kyber_key_id=main_key.key_id, kyber_key_created_at=main_key.created_at,
            kyber_key_expires_at=main_key.expires_at,
            kyber_key_signature_version=main_key.signature_version,
            display_name=display_name, avatar_url=None, encrypted_settings=None,
            tokens_valid_after=0, created_at=now, updated_at=now, last_seen=None,
            totp_enabled=False, primary_device_id=1)
        device = self._device(device_fingerprint)
        try:
            await self._identities.create(identity, device, main_key)
        except IdentityTaken:
            raise Conflict("This Cyphr ID is taken", code=CYPHR_ID_TAKEN) from None
        return Session(self._tokens.issue(identity.id, identity.cyphr_id, device), identity, 1)

    async def login(self, *, cyphr_id: str, device_fingerprint: str, proof: Proof,
                    totp_code: str | None) -> Session:
        identity = await self._proven(LOGIN, cyphr_id, device_fingerprint, proof)
        device = await self._devices.by_fingerprint(identity.id, self._device(device_fingerprint))
        if device is None:
            raise Unauthorized("This device is not one of this identity's devices; recover the "
                               "identity here to add it", code=DEVICE_MISMATCH)
        if identity.totp_enabled:
            await self._totp.check_login(identity.id, totp_code)
        now = now_ms(self._clock)
        await self._devices.seen(identity.id, device.device_id, now)
        return Session(self._tokens.issue(identity.id, identity.cyphr_id, device.fingerprint_hash),
                       identity, device.device_id)

    async def recover(self, *, cyphr_id: str, new_device_fingerprint: str, proof: Proof,
                      kyber: MainKey | None, totp_code: str | None,
                      keep_other_devices: bool = False) -> Session:
        """The recovery phrase re-creates the identity key on a device;
        proving it makes that device one of the identity's. By default
        every other device is removed (a lost phone: their tokens stop at
        once); with ``keep_other_devices`` they stay and this one is added
        (up to the device cap). A device that is already the identity's
        (the same fingerprint) is re-keyed in place and its earlier tokens
        stop.

        Without ``kyber`` the device takes the key of the identity's lowest
        device, which the phrase re-creates; a key signed for one device id
        (version 3) cannot be taken by another device, so then ``kyber`` is
        required."""
        identity = await self._proven(RECOVER, cyphr_id, new_device_fingerprint, proof)
        if kyber is not None:
            # The device's id is given in the transaction: a key bound to a
            # device id is uploaded after recovery (store-public-key).
            kyber = self.check_device_key(kyber, identity.public_key, identity.cyphr_id, None)
        elif identity.kyber_public_key is None or identity.kyber_key_signature_version == 3:
            raise BadRequest("kyberPublicKey is required: this identity's key is bound to "
                             "another device", code=MISSING_FIELD,
                             details={"field": "kyberPublicKey"})
        else:
            assert identity.kyber_key_signature is not None
            kyber = MainKey(identity.kyber_public_key, identity.kyber_key_signature,
                            identity.kyber_key_id, identity.kyber_key_created_at,
                            identity.kyber_key_expires_at)
        if identity.totp_enabled:
            await self._totp.check_login(identity.id, totp_code)
        now = now_ms(self._clock)
        fingerprint = self._device(new_device_fingerprint)
        try:
            # Tokens carry whole seconds: every token of this device issued
            # before this second stops working.
            added = await self._devices.add(
                identity.id, fingerprint, kyber, self.max_devices, now,
                replace_others=not keep_other_devices, tokens_valid_after=now - now % 1000)
        except DeviceLimit as e:
            raise Conflict(f"This identity has {e.count} devices, as many as it may; remove one "
                           "or recover without keeping the others", code=DEVICE_LIMIT,
                           details={"limit": self.max_devices}) from None
        if keep_other_devices:
            self._changes.publish(SessionsEnded(identity.cyphr_id, device=fingerprint))
        else:
            self._changes.publish(SessionsEnded(identity.cyphr_id))
        device_id = added.device.device_id
        for removed in added.removed:
            self._changes.publish(DevicesChanged(identity.cyphr_id, removed, "removed"))
        self._changes.publish(DevicesChanged(identity.cyphr_id, device_id,
                                             "added" if added.new else "key"))
        recovered = await self._identities.by_id(identity.id)
        assert recovered is not None
        return Session(self._tokens.issue(identity.id, identity.cyphr_id, fingerprint), recovered,
                       device_id)

    async def logout(self, user: AuthUser) -> None:
        await self._revocations.revoke(user.jti, user.user_id, user.expires_at * 1000)
        self._changes.publish(SessionsEnded(user.cyphr_id, user.jti))

    async def delete_account(self, user: AuthUser, device_fingerprint: str | None,
                             proof: Proof) -> None:
        """Delete the caller's identity, proven by a fresh statement for
        purpose delete, from the device of the session (a v1 proof, where
        accepted, names no device)."""
        identity = await self._proven(DELETE, user.cyphr_id, device_fingerprint, proof)
        if identity.id != user.user_id:
            raise Unauthorized("The session token is not valid")
        if device_fingerprint is not None and not hmac.compare_digest(
            self._device(device_fingerprint), user.device_hash
        ):
            raise Unauthorized("deviceFingerprint is not the device of this session",
                               code=DEVICE_MISMATCH)
        await self._identities.delete(identity, now_ms(self._clock))
        self._changes.publish(SessionsEnded(identity.cyphr_id))
        self._changes.publish(IdentityDeleted(identity.cyphr_id))

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

    async def presence_for(self, viewer: AuthUser, identities: list[Identity]) -> list[bool | None]:
        """For each identity, whether it is online as ``viewer`` may know it:
        True or False for the viewer itself and users who share a chat with
        it, None for strangers, who learn neither that nor when the user was
        last seen (the same rule as ``user_online``/``user_offline``)."""
        shown = await self._chats.sharing(viewer.cyphr_id, [i.cyphr_id for i in identities])
        return [self.is_online(i.cyphr_id) if i.cyphr_id in shown else None for i in identities]

    async def update_profile(self, user: AuthUser, changes: dict[str, Any]) -> Identity:
        if changes:
            await self._identities.update_profile(user.user_id, changes, now_ms(self._clock))
        return await self.me(user)

    async def set_kyber_key(self, user: AuthUser, key: MainKey) -> None:
        """Replace the key of the caller's device: checked as at
        registration (for this device's id), and refused (409 STALE_KEY)
        when older than the stored one."""
        identity = await self.me(user)
        key = self.check_device_key(key, identity.public_key, identity.cyphr_id, user.device_id)
        try:
            await self._devices.set_key(user.user_id, user.device_id, key, now_ms(self._clock))
        except LookupError:
            raise Unauthorized("The session token was revoked", code=TOKEN_REVOKED) from None
        except StaleDeviceKey as e:
            raise Conflict(
                "This key is older than the stored one: a lower kyberKeyId, the same kyberKeyId "
                "with another key, or a key signed in an older version than the stored one",
                code=STALE_KEY,
                details={"field": "kyberKeyId", "currentKeyId": e.current_id}) from None
        self._changes.publish(DevicesChanged(user.cyphr_id, user.device_id, "key"))
