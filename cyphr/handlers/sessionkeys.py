"""
The session key directory (docs/encryption.rst, "Sessions"): devices
publish their identity's X25519 key and their prekeys; anyone signed in
claims a bundle per device of a user to start a session with it.

The server checks every signature (owner, device, kind, id, validity) as
the clients do, so that nothing unsigned is stored; clients check again,
against the identity key they pinned, so that a server cannot hand out a
key of its own. One-time prekeys are handed out once. Claims are limited
per claimer and target device (--rate-limit-bundle-claim); past a second
limit per target device, all claimers together (--rate-limit-bundle-drain),
a bundle carries only the device's last-resort keys, so that nobody can
drain a device's stock of one-time prekeys and everybody can still reach it.
"""

from __future__ import annotations

from typing import Any

from cyphr.changes import ChangeFeed, SessionPrekeysLow
from cyphr.clock import now_ms
from cyphr.cpu import CpuPool
from cyphr.crypto import is_mlkem1024_key
from cyphr.errors import (
    DEVICE_NOT_FOUND,
    DUPLICATE_KEY_ID,
    IDENTITY_DH_MISMATCH,
    INVALID_FIELD,
    INVALID_KEY_SIGNATURE,
    INVALID_KYBER_KEY,
    PREKEY_LIMIT,
    TOKEN_REVOKED,
    USER_NOT_FOUND,
    BadRequest,
    Conflict,
    NotFound,
    RateLimited,
    Unauthorized,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.keycheck import KeyFields, check_validity
from cyphr.handlers.ratelimit import RateLimits
from cyphr.signing import (
    IDENTITY_DH,
    PREKEY_KINDS,
    SessionPrekeyBinding,
    identity_dh_content,
    verify_with_label,
)
from cyphr.store.devices import DeviceStore
from cyphr.store.identities import Identity, IdentityStore
from cyphr.store.sessionkeys import (
    DeviceBundle,
    DuplicateSessionPrekey,
    IdentityDh,
    IdentityDhMismatch,
    OneTimeLimit,
    SessionKeyStore,
    SessionPrekey,
    Stock,
    Upload,
)

MAX_ONE_TIME_PER_CALL = 100  # of each kind
LOW_STOCK = 10  # a claim that leaves fewer of a kind tells the device (session_prekeys_low)
# The field each kind travels in, for the errors' details.
KIND_FIELDS = {1: "signedPrekey", 2: "oneTimePrekeys", 3: "lastResortPrekey",
               4: "kemOneTimePrekeys"}


def _x25519_key_ok(key: bytes) -> bool:
    # 32 bytes, not all zero (the one value every implementation refuses
    # outright; clients refuse the other low-order points when they agree).
    return len(key) == 32 and any(key)


class SessionKeysHandler:
    def __init__(self, identities: IdentityStore, devices: DeviceStore, keys: SessionKeyStore,
                 cpu: CpuPool, limits: RateLimits, changes: ChangeFeed, max_one_time: int,
                 clock: Any) -> None:
        self._changes = changes
        self._identities = identities
        self._devices = devices
        self._keys = keys
        self._cpu = cpu
        self._limits = limits  # bundle_claim and bundle_drain
        self._max_one_time = max_one_time
        self._clock = clock

    async def _identity(self, cyphr_id: str) -> Identity:
        identity = await self._identities.by_cyphr_id(cyphr_id)
        if identity is None:
            raise NotFound("No such user", code=USER_NOT_FOUND)
        return identity

    async def publish(self, user: AuthUser, upload: Upload, fields: dict[int, str]) -> Stock:
        """Store the caller's device's session keys, all of them or none,
        each checked first; ``fields`` names each prekey's field (by its
        position in ``upload.one_time_prekeys``, keyed as ``-1`` and ``-3``
        for the signed and last-resort prekeys) for the errors."""
        identity = await self._identities.by_id(user.user_id)
        if identity is None:
            raise Unauthorized("The session token was revoked", code=TOKEN_REVOKED)
        now = now_ms(self._clock)
        prekeys: list[tuple[str, SessionPrekey]] = []
        if upload.signed_prekey is not None:
            prekeys.append((fields[-1], upload.signed_prekey))
        if upload.last_resort_prekey is not None:
            prekeys.append((fields[-3], upload.last_resort_prekey))
        prekeys += [(fields[i], p) for i, p in enumerate(upload.one_time_prekeys)]
        seen: set[tuple[int, int]] = set()
        for field, prekey in prekeys:
            if (prekey.kind, prekey.key_id) in seen:
                raise BadRequest("Each keyId may appear once per kind", code=DUPLICATE_KEY_ID,
                                 details={"field": field})
            seen.add((prekey.kind, prekey.key_id))

        def check_all() -> None:
            dh = upload.identity_dh
            if dh is not None and not (_x25519_key_ok(dh.public_key) and verify_with_label(
                    identity.public_key, IDENTITY_DH,
                    identity_dh_content(identity.cyphr_id, dh.public_key), dh.signature)):
                raise BadRequest("The X25519 identity key is not signed by the identity key "
                                 "(cyphr-v2 identity-dh, over its owner and the key)",
                                 code=INVALID_KEY_SIGNATURE, details={"field": "identityDh"})
            for field, prekey in prekeys:
                _check_prekey(prekey, identity, user.device_id, now, field)

        # Up to 200 key and signature checks: off the reactor.
        await self._cpu.run(check_all)
        try:
            return await self._keys.put(user.user_id, user.device_id, upload,
                                        self._max_one_time, now)
        except LookupError:
            raise Unauthorized("The session token was revoked", code=TOKEN_REVOKED) from None
        except IdentityDhMismatch:
            raise Conflict("This identity has another X25519 identity key; it never changes",
                           code=IDENTITY_DH_MISMATCH, details={"field": "identityDh"}) from None
        except OneTimeLimit as e:
            raise Conflict(f"At most {self._max_one_time} one-time prekeys of each kind may be "
                           f"stored", code=PREKEY_LIMIT,
                           details={"limit": self._max_one_time, "stored": e.total,
                                    "field": KIND_FIELDS[e.kind]}) from None
        except DuplicateSessionPrekey:
            raise Conflict("A prekey of this kind with this keyId is already stored",
                           code=DUPLICATE_KEY_ID) from None

    async def stock(self, user: AuthUser) -> Stock:
        return await self._keys.stock(user.user_id, user.device_id, now_ms(self._clock))

    async def bundles(self, user: AuthUser, cyphr_id: str, device_id: int | None = None
                      ) -> tuple[Identity, IdentityDh | None, list[DeviceBundle]]:
        """A bundle of each device of ``cyphr_id`` that has published its
        session keys (or of ``device_id`` only): the identity, its X25519
        identity key (None when it published none: then no bundle), and the
        bundles. An unknown user or device is 404 before the limits count."""
        target = await self._identity(cyphr_id)
        devices = [d.device_id for d in await self._devices.of_user(target.id)]
        if device_id is not None:
            if device_id not in devices:
                raise NotFound("No such device", code=DEVICE_NOT_FOUND)
            devices = [device_id]
        for device in devices:
            self._limits.bundle_claim.hit((user.user_id, target.id, device))
        identity_dh = await self._keys.identity_dh(target.id)
        if identity_dh is None:
            return target, None, []
        one_time = set()
        for device in devices:
            try:
                self._limits.bundle_drain.hit((target.id, device))
            except RateLimited:
                continue  # its last-resort keys only
            one_time.add(device)
        bundles, left = await self._keys.claim(target.id, devices, now_ms(self._clock),
                                               one_time=one_time)
        for device, (dh, kem) in sorted(left.items()):
            if dh < LOW_STOCK or kem < LOW_STOCK:
                self._changes.publish(SessionPrekeysLow(target.cyphr_id, device, dh, kem))
        return target, identity_dh, bundles


def _check_prekey(prekey: SessionPrekey, identity: Identity, device_id: int, now: int,
                  field: str) -> None:
    names = KeyFields(field, f"{field}.createdAt", f"{field}.expiresAt")
    check_validity(prekey.created_at, prekey.expires_at, now, names)
    label, size = PREKEY_KINDS[prekey.kind]
    if len(prekey.public_key) != size or (
            size == 32 and not _x25519_key_ok(prekey.public_key)) or (
            size != 32 and not is_mlkem1024_key(prekey.public_key)):
        kind = "X25519" if size == 32 else "ML-KEM-1024"
        raise BadRequest(f"{field}.publicKey is not a valid {kind} public key",
                         code=INVALID_KYBER_KEY if size != 32 else INVALID_FIELD,
                         details={"field": f"{field}.publicKey"})
    binding = SessionPrekeyBinding(prekey.kind, identity.cyphr_id, device_id, prekey.key_id,
                                   prekey.created_at, prekey.expires_at, prekey.public_key)
    if not verify_with_label(identity.public_key, label, binding.encode(), prekey.signature):
        raise BadRequest("The prekey's signature does not verify with the identity key for "
                         "this key, its owner, device, kind, id and validity",
                         code=INVALID_KEY_SIGNATURE, details={"field": field})
