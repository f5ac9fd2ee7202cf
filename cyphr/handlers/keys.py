"""The public-key directory: devices' Kyber keys and one-time prekeys.

The single-device calls (public-key/:cyphrId, claim/:cyphrId) answer for
an identity's lowest-numbered device; claim/:cyphrId/:deviceId for any."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyphr.clock import now_ms
from cyphr.cpu import CpuPool
from cyphr.errors import (
    DEVICE_NOT_FOUND,
    DUPLICATE_KEY_ID,
    PREKEY_LIMIT,
    TOKEN_REVOKED,
    USER_NOT_FOUND,
    Conflict,
    NotFound,
    Unauthorized,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.identity import IdentityHandler
from cyphr.handlers.keycheck import KeyFields, check_key
from cyphr.handlers.ratelimit import RateLimit
from cyphr.store.devices import DeviceStore
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
    device_id: int


class KeysHandler:
    def __init__(self, identities: IdentityStore, identity: IdentityHandler, prekeys: PrekeyStore,
                 devices: DeviceStore, cpu: CpuPool, claim_limit: RateLimit, max_prekeys: int,
                 clock: Any) -> None:
        self._identities = identities
        self._devices = devices
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
        """Store signed one-time prekeys of the caller's device, all or
        none; (stored, total)."""
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
            total = await self._prekeys.add(user.user_id, user.device_id, prekeys,
                                            self._max_prekeys, now)
        except LookupError:
            raise Unauthorized("The session token was revoked", code=TOKEN_REVOKED) from None
        except PrekeyLimit as e:
            raise Conflict(f"At most {self._max_prekeys} one-time prekeys may be stored",
                           code=PREKEY_LIMIT,
                           details={"limit": self._max_prekeys, "stored": e.total}) from None
        except DuplicatePrekey:
            raise Conflict("A prekey with this keyId is already stored",
                           code=DUPLICATE_KEY_ID) from None
        return len(prekeys), total

    async def claim(self, user: AuthUser, cyphr_id: str, device_id: int | None = None
                    ) -> ClaimedKey:
        """One of the unexpired one-time prekeys of the target's device
        ``device_id`` (None: its lowest-numbered device), handed out once;
        that device's key when none is left. An unknown target or device is
        404 before the rate limit counts anything: the limit's table is keyed
        by (caller, target, device) and holds only devices that exist."""
        target = await self._target(cyphr_id)
        if device_id is None:
            devices = await self._devices.of_user(target.id)
            device = devices[0] if devices else None
        else:
            device = await self._devices.get(target.id, device_id)
        if device is None:
            raise NotFound("No such device", code=DEVICE_NOT_FOUND)
        self._claim_limit.hit((user.user_id, target.id, device.device_id))
        prekey = await self._prekeys.claim(target.id, device.device_id, now_ms(self._clock))
        if prekey is not None:
            return ClaimedKey(prekey.key_id, prekey.kyber_public_key, prekey.signature, True,
                              prekey.created_at, prekey.expires_at, prekey.signature_version,
                              device.device_id)
        key = device.key
        return ClaimedKey(key.key_id, key.kyber_public_key, key.signature, False, key.created_at,
                          key.expires_at, key.signature_version, device.device_id)

    async def remaining(self, user: AuthUser) -> int:
        """The one-time prekeys of the caller's device that have not expired."""
        return await self._prekeys.count(user.user_id, user.device_id, now_ms(self._clock))
