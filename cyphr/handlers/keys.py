"""The public-key directory: main Kyber keys and one-time prekeys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyphr.clock import now_ms
from cyphr.cpu import CpuPool
from cyphr.errors import (
    DUPLICATE_KEY_ID,
    PREKEY_LIMIT,
    USER_NOT_FOUND,
    Conflict,
    NotFound,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.identity import IdentityHandler
from cyphr.handlers.keycheck import KeyFields, check_key
from cyphr.handlers.ratelimit import RateLimit
from cyphr.store.identities import Identity, IdentityStore, MainKey
from cyphr.store.keys import DuplicatePrekey, Prekey, PrekeyLimit, PrekeyStore

MAX_PREKEYS_PER_CALL = 100


@dataclass(frozen=True)
class ClaimedKey:
    key_id: int | None  # None: a v1 main key
    kyber_public_key: bytes
    signature: bytes
    one_time: bool
    created_at: int | None  # ms; None for a v1 key
    expires_at: int | None
    signature_version: int


class KeysHandler:
    def __init__(self, identities: IdentityStore, identity: IdentityHandler, prekeys: PrekeyStore,
                 cpu: CpuPool, claim_limit: RateLimit, max_prekeys: int, clock: Any) -> None:
        self._identities = identities
        self._identity = identity
        self._prekeys = prekeys
        self._cpu = cpu
        self._claim_limit = claim_limit
        self._max_prekeys = max_prekeys
        self._clock = clock

    async def _target(self, cyphr_id: str) -> Identity:
        identity = await self._identities.by_cyphr_id(cyphr_id)
        if identity is None or identity.kyber_public_key is None:
            raise NotFound("No such user", code=USER_NOT_FOUND)
        return identity

    async def public_key(self, cyphr_id: str) -> Identity:
        return await self._target(cyphr_id)

    async def rotate(self, user: AuthUser, key: MainKey) -> None:
        await self._identity.set_kyber_key(user, key)

    async def add_prekeys(self, user: AuthUser, prekeys: list[Prekey]) -> tuple[int, int]:
        """Store signed one-time prekeys, all or none; (stored, total)."""
        identity = await self._identity.me(user)
        now = now_ms(self._clock)
        accept_v1 = self._identity.accept_v1

        def check_all() -> None:
            for index, prekey in enumerate(prekeys):
                check_key(prekey, identity_key=identity.public_key, owner=identity.cyphr_id,
                          key_id=prekey.key_id, one_time=True, now=now, accept_v1=accept_v1,
                          fields=KeyFields.prekey(index))

        # Up to 100 key and signature checks: off the reactor.
        await self._cpu.run(check_all)
        try:
            total = await self._prekeys.add(user.user_id, prekeys, self._max_prekeys, now)
        except PrekeyLimit as e:
            raise Conflict(f"At most {self._max_prekeys} one-time prekeys may be stored",
                           code=PREKEY_LIMIT,
                           details={"limit": self._max_prekeys, "stored": e.total}) from None
        except DuplicatePrekey:
            raise Conflict("A prekey with this keyId is already stored",
                           code=DUPLICATE_KEY_ID) from None
        return len(prekeys), total

    async def claim(self, user: AuthUser, cyphr_id: str) -> ClaimedKey:
        """One of the target's unexpired one-time prekeys, handed out once;
        its main Kyber key when none is left. An unknown target is 404
        before the rate limit counts anything: the limit's table is keyed by
        (caller, target) and holds only targets that exist."""
        target = await self._target(cyphr_id)
        self._claim_limit.hit((user.user_id, target.id))
        prekey = await self._prekeys.claim(target.id, now_ms(self._clock))
        if prekey is not None:
            return ClaimedKey(prekey.key_id, prekey.kyber_public_key, prekey.signature, True,
                              prekey.created_at, prekey.expires_at, prekey.signature_version)
        assert target.kyber_public_key is not None and target.kyber_key_signature is not None
        return ClaimedKey(target.kyber_key_id, target.kyber_public_key, target.kyber_key_signature,
                          False, target.kyber_key_created_at, target.kyber_key_expires_at,
                          target.kyber_key_signature_version)

    async def remaining(self, user: AuthUser) -> int:
        """The caller's one-time prekeys that have not expired."""
        return await self._prekeys.count(user.user_id, now_ms(self._clock))
