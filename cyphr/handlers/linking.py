"""
Linking a device, in the shape of Signal's provisioning
(docs/encryption.rst, "Linking a device"):

1. the new device asks for a provisioning, giving an ephemeral public key
   of its own, and gets an id and a secret only it knows;
2. a signed-in device of the account fetches that ephemeral key, and
   approves by leaving the identity seed sealed to it: a device id is
   reserved for the new device;
3. the new device, with its secret, receives the sealed seed (deleted from
   the server at once) and a single-use link token;
4. it registers its device key, signed by the identity key for the
   reserved device id, with that token, and is signed in.

The server relays the sealed seed and cannot open it. Everything expires
within minutes, is single use, and is rate limited; the table is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import uuid
from dataclasses import dataclass
from typing import Any

from cyphr.changes import ChangeFeed, DevicesChanged
from cyphr.clock import now_ms
from cyphr.cpu import CpuPool
from cyphr.crypto import ED25519_KEY_BYTES, MLKEM1024_KEY_BYTES, fingerprint_hash, is_mlkem1024_key
from cyphr.errors import (
    DEVICE_EXISTS,
    DEVICE_LIMIT,
    INVALID_FIELD,
    INVALID_KEY_SIGNATURE,
    INVALID_KYBER_KEY,
    INVALID_LINK_TOKEN,
    PROVISION_NOT_FOUND,
    SERVER_BUSY,
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    Unauthorized,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.identity import IdentityHandler, Session
from cyphr.handlers.tokens import TokenService
from cyphr.store.devices import DeviceExists, DeviceLimit
from cyphr.store.identities import IdentityStore, MainKey
from cyphr.store.links import InvalidLink, LinkStore, ProvisioningClosed, TooManyProvisionings

# The new device's ephemeral public key: an X25519 key, then an ML-KEM-1024
# key, as the message scheme pairs them.
X25519_KEY_BYTES = ED25519_KEY_BYTES
EPHEMERAL_KEY_BYTES = X25519_KEY_BYTES + MLKEM1024_KEY_BYTES  # 1600
# The identity seed sealed to it, as the approver's client made it: opaque.
MAX_SEALED_BYTES = 8192
SECRET_BYTES = 32
LINK_TOKEN_BYTES = 32
# A provisioning can be approved and received for this long after it is made;
# the link token, for this long after it is received.
PROVISION_LIFETIME_MS = 10 * 60 * 1000
LINK_TOKEN_LIFETIME_MS = 10 * 60 * 1000
# Most provisionings the table holds at once, expired ones included until
# purged: past it, 503. Each row is about 2 KB (10 KB while it holds a sealed
# seed), so a flood from many addresses cannot fill the disk.
MAX_OPEN_PROVISIONINGS = 100_000


def token_text(raw: bytes) -> str:
    """A secret or link token as the wire carries it: base64url, no padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _hash(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def ephemeral_fingerprint(ephemeral_key: bytes) -> str:
    """What both screens show for the user to compare: the first 8 bytes of
    SHA-256 of the ephemeral key, in hex."""
    return hashlib.sha256(ephemeral_key).digest()[:8].hex()


def _not_found() -> NotFound:
    # One answer for unknown, expired, used and a wrong secret: it tells
    # nothing of which provisionings exist.
    return NotFound("No such provisioning: unknown, expired or already used",
                    code=PROVISION_NOT_FOUND)


def _invalid_link() -> Unauthorized:
    return Unauthorized("The link token is unknown, expired, used or for another Cyphr ID",
                        code=INVALID_LINK_TOKEN)


@dataclass(frozen=True)
class NewProvisioning:
    provisioning_id: str
    secret: bytes
    expires_at: int  # ms


@dataclass(frozen=True)
class OpenProvisioning:
    ephemeral_key: bytes
    expires_at: int


@dataclass(frozen=True)
class Received:
    """What the new device receives once approved; ``None`` fields never."""

    cyphr_id: str
    device_id: int
    sealed: bytes
    link_token: bytes


class LinkingHandler:
    def __init__(self, links: LinkStore, identities: IdentityStore, identity: IdentityHandler,
                 tokens: TokenService, changes: ChangeFeed, cpu: CpuPool, fingerprint_key: bytes,
                 max_devices: int, clock: Any) -> None:
        self._links = links
        self._identities = identities
        self._identity = identity  # for its device key check
        self._tokens = tokens
        self._changes = changes
        self._cpu = cpu
        self._fingerprint_key = fingerprint_key
        self.max_devices = max_devices
        self._clock = clock

    def is_online(self, cyphr_id: str) -> bool:
        return self._identity.is_online(cyphr_id)

    def _device_limit(self, count: int) -> Conflict:
        return Conflict(f"This identity has {count} devices, as many as it may; remove one first",
                        code=DEVICE_LIMIT, details={"limit": self.max_devices})

    # -- the new device ---------------------------------------------------------

    async def provision(self, ephemeral_key: bytes) -> NewProvisioning:
        """A provisioning for ``ephemeral_key`` (EPHEMERAL_KEY_BYTES long,
        its ML-KEM half a valid key: 400 INVALID_KYBER_KEY otherwise), valid
        PROVISION_LIFETIME_MS. 503 SERVER_BUSY when the table is full."""
        if len(ephemeral_key) != EPHEMERAL_KEY_BYTES:
            raise BadRequest(f"ephemeralKey must be {EPHEMERAL_KEY_BYTES} bytes",
                             code=INVALID_FIELD, details={"field": "ephemeralKey"})
        if not await self._cpu.run(is_mlkem1024_key, ephemeral_key[X25519_KEY_BYTES:]):
            raise BadRequest("ephemeralKey's last 1568 bytes are not a valid ML-KEM-1024 key",
                             code=INVALID_KYBER_KEY, details={"field": "ephemeralKey"})
        now = now_ms(self._clock)
        provisioning = NewProvisioning(str(uuid.uuid4()), os.urandom(SECRET_BYTES),
                                       now + PROVISION_LIFETIME_MS)
        try:
            await self._links.create(provisioning.provisioning_id, ephemeral_key,
                                     _hash(provisioning.secret), now, provisioning.expires_at,
                                     MAX_OPEN_PROVISIONINGS)
        except TooManyProvisionings:
            raise ApiError("Too many devices are being linked right now; try again later",
                           code=SERVER_BUSY, status=503, headers={"Retry-After": "60"}) from None
        return provisioning

    async def receive(self, provisioning_id: str, secret: bytes) -> Received | None:
        """The sealed seed, the new device's id and a fresh link token, once
        approved (the sealed seed is then deleted and the provisioning
        cannot be received again); None while not yet approved. 404 for an
        unknown, expired or received provisioning and for a wrong secret,
        alike."""
        now = now_ms(self._clock)
        found = await self._links.get(provisioning_id)
        if (found is None or found.expires_at <= now or found.received_at is not None
                or not hmac.compare_digest(_hash(secret), found.secret_hash)):
            raise _not_found()
        if found.user_id is None:
            return None
        assert found.cyphr_id is not None and found.device_id is not None
        assert found.sealed is not None
        token = os.urandom(LINK_TOKEN_BYTES)
        if not await self._links.receive(provisioning_id, _hash(token), now,
                                         now + LINK_TOKEN_LIFETIME_MS):
            raise _not_found()
        return Received(found.cyphr_id, found.device_id, found.sealed, token)

    async def link(self, *, cyphr_id: str, link_token: bytes, device_fingerprint: str,
                   key: MainKey) -> Session:
        """Add the new device with ``key``, signed by the identity key as the
        key of the device id reserved for it (version 3; else 400
        INVALID_KEY_SIGNATURE), using up the link token (401
        INVALID_LINK_TOKEN unless it is an unexpired, unused link of this
        Cyphr ID); 409 DEVICE_EXISTS for a fingerprint already the
        identity's, DEVICE_LIMIT past the cap. Signed in as that device."""
        now = now_ms(self._clock)
        token_hash = _hash(link_token)
        identity = await self._identities.by_cyphr_id(cyphr_id)
        if identity is None:
            raise _invalid_link()
        device_id = await self._links.reserved_device(identity.id, token_hash, now)
        if device_id is None:
            raise _invalid_link()
        key = self._identity.check_device_key(key, identity.public_key, identity.cyphr_id,
                                              device_id)
        if key.signature_version != 3:
            raise BadRequest(f"The key must be signed as the key of device {device_id} "
                             "(a device-key signature)", code=INVALID_KEY_SIGNATURE,
                             details={"field": "kyberKeySignature"})
        fingerprint = fingerprint_hash(self._fingerprint_key, device_fingerprint)
        try:
            # Tokens carry whole seconds: any token of this fingerprint from
            # before (a device once removed) stays refused.
            device = await self._links.link(identity.id, token_hash, fingerprint, key,
                                            self.max_devices, now, now - now % 1000)
        except InvalidLink:
            raise _invalid_link() from None
        except DeviceExists:
            raise Conflict("This device is already one of the identity's devices: log in there",
                           code=DEVICE_EXISTS) from None
        except DeviceLimit as e:
            raise self._device_limit(e.count) from None
        except LookupError:
            raise _invalid_link() from None
        self._changes.publish(DevicesChanged(identity.cyphr_id, device.device_id, "added"))
        linked = await self._identities.by_id(identity.id)
        if linked is None:
            raise _invalid_link()
        return Session(self._tokens.issue(identity.id, identity.cyphr_id, fingerprint), linked,
                       device.device_id)

    # -- the approving device -------------------------------------------------

    async def open(self, user: AuthUser, provisioning_id: str) -> OpenProvisioning:
        """The ephemeral key of an open provisioning (unexpired, not
        approved), for a signed-in device to seal to; 404 otherwise."""
        found = await self._links.get(provisioning_id)
        if found is None or found.expires_at <= now_ms(self._clock) or found.user_id is not None:
            raise _not_found()
        return OpenProvisioning(found.ephemeral_key, found.expires_at)

    async def approve(self, user: AuthUser, provisioning_id: str, sealed: bytes) -> int:
        """Leave ``sealed`` (the seed sealed to the ephemeral key) for the
        new device and reserve its device id, which is answered; 404 unless
        the provisioning is open, 409 DEVICE_LIMIT when the caller's
        identity has as many devices as it may."""
        try:
            return await self._links.approve(provisioning_id, user.user_id, sealed,
                                             self.max_devices, now_ms(self._clock))
        except ProvisioningClosed:
            raise _not_found() from None
        except DeviceLimit as e:
            raise self._device_limit(e.count) from None
