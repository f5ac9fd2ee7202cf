"""
The client's encryption for devices (docs/encryption.rst, "The sealed seed"
and "Device names"): the identity seed sealed by an approving device to the
ephemeral key of a device being linked, and device names sealed under a
key only the identity's own devices can derive.

Everything here is a pure function of its inputs and its randomness; the
``*_with`` functions take that randomness as arguments, so that the test
vectors (tools/make_vectors.py, tests/vectors/devices-v2.json) are made
and checked by the very code that seals.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Mapping

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey, MLKEM1024PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from cyphr import signing
from cyphr.client.crypto import (
    KEY_BYTES,
    MLKEM1024_CIPHERTEXT_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    CryptoError,
    _aead_decrypt,
    _aead_encrypt,
    _hkdf,
    pad,
    unpad,
)
from cyphr.crypto import MLKEM1024_KEY_BYTES

LINK_SEED_LABEL = "cyphr-v2 link-seed"
_LINK_SEED_INFO = b"cyphr-v2 link-seed-key"
LINK_SEED_FORMAT = 1
X25519_BYTES = 32
EPHEMERAL_KEY_BYTES = X25519_BYTES + MLKEM1024_KEY_BYTES  # 1600, as the server fixes it
# What the server relays at most (cyphr.handlers.linking.MAX_SEALED_BYTES):
# group name keys past it are left out (the new device finds them in the
# history, as any device that missed them).
MAX_SEALED_BYTES = 8192
_SEALED_OVERHEAD = 1 + X25519_BYTES + MLKEM1024_CIPHERTEXT_BYTES + NONCE_BYTES + TAG_BYTES
SEED_BYTES = 64

DEVICE_NAME_LABEL = "cyphr-v2 device-name"
_DEVICE_NAME_INFO = b"cyphr-v2 device-name-key"
# Names are padded to one size (crypto.pad's first bucket, 256 bytes with
# its 4-byte length), so a sealed name says nothing of the name's length.
MAX_DEVICE_NAME_BYTES = 252


class LinkSeedError(CryptoError):
    """A sealed seed that does not open: altered, sealed to another key, or
    for another provisioning or Cyphr ID."""


def link_fingerprint(ephemeral_key: bytes) -> str:
    """What both screens show: the first 8 bytes of SHA-256 of the
    ephemeral key, in hex (as cyphr.handlers.linking.ephemeral_fingerprint)."""
    return hashlib.sha256(ephemeral_key).digest()[:8].hex()


# -- the new device's ephemeral key -------------------------------------------

class EphemeralKey:
    """The key pair a device being linked makes for one provisioning. Its
    private halves live only in this object (never on disk): drop it once
    the seed is open."""

    def __init__(self, x25519: X25519PrivateKey | None = None,
                 mlkem: MLKEM1024PrivateKey | None = None) -> None:
        self._x25519: X25519PrivateKey | None = x25519 or X25519PrivateKey.generate()
        self._mlkem: MLKEM1024PrivateKey | None = mlkem or MLKEM1024PrivateKey.generate()
        self.public = (self._x25519.public_key().public_bytes_raw()
                       + self._mlkem.public_key().public_bytes_raw())

    @property
    def fingerprint(self) -> str:
        return link_fingerprint(self.public)

    def erase(self) -> None:
        """Forget the private keys (Python cannot overwrite them in place;
        the objects go with their last reference)."""
        self._x25519 = self._mlkem = None

    def open(self, sealed: bytes, provisioning_id: str, cyphr_id: str) -> LinkSeed:
        if self._x25519 is None or self._mlkem is None:
            raise LinkSeedError("the ephemeral key was erased: this link is over, start again")
        return open_link_seed(sealed, self._x25519, self._mlkem, provisioning_id, cyphr_id)


# -- the sealed seed ----------------------------------------------------------

@dataclass(frozen=True)
class LinkSeed:
    """What the approving device gives the new one: the identity seed, the
    main ML-KEM key's generation, and the group name keys it holds."""

    seed: bytes
    generation: int
    group_keys: Mapping[str, bytes]  # chat id -> 32-byte name key

    def encode(self) -> bytes:
        if len(self.seed) != SEED_BYTES:
            raise CryptoError("an identity seed is 64 bytes")
        entries = sorted(self.group_keys.items())
        if any(len(key) != KEY_BYTES for _, key in entries):
            raise CryptoError("a group name key is 32 bytes")
        return (signing.opaque(self.seed) + signing.uint64(self.generation)
                + signing.uint64(len(entries))
                + b"".join(signing.text(chat_id) + signing.opaque(key) for chat_id, key in entries))

    @classmethod
    def decode(cls, data: bytes) -> LinkSeed:
        reader = signing.Reader(data)
        try:
            seed = reader.opaque(SEED_BYTES)
            generation = reader.uint64()
            count = reader.uint64()
            group_keys = {}
            for _ in range(min(count, len(data))):
                chat_id = reader.text(256)
                group_keys[chat_id] = reader.opaque(KEY_BYTES)
            reader.end()
        except signing.EncodingError as e:
            raise LinkSeedError(f"the sealed seed's content is malformed: {e}") from None
        if len(seed) != SEED_BYTES or generation >= 2**32 or len(group_keys) != count \
                or any(len(k) != KEY_BYTES for k in group_keys.values()):
            raise LinkSeedError("the sealed seed's content is malformed")
        return cls(seed, generation, group_keys)


def link_seed_header(provisioning_id: str, cyphr_id: str, ephemeral_key: bytes,
                     approver_key: bytes, kyber_ciphertext: bytes) -> bytes:
    """The associated data of the seal, and (hashed) the HKDF salt: binds the
    provisioning, the Cyphr ID, the new device's ephemeral key and this
    seal's own key exchange."""
    return (signing.text(LINK_SEED_LABEL) + signing.text(provisioning_id)
            + signing.text(cyphr_id) + signing.opaque(ephemeral_key)
            + signing.opaque(approver_key) + signing.opaque(kyber_ciphertext))


def link_seed_key(kem_secret: bytes, dh_secret: bytes, header: bytes) -> bytes:
    return _hkdf(kem_secret + dh_secret, KEY_BYTES, _LINK_SEED_INFO,
                 salt=hashlib.sha256(header).digest())


def _split_ephemeral(ephemeral_key: bytes) -> tuple[bytes, bytes]:
    if len(ephemeral_key) != EPHEMERAL_KEY_BYTES:
        raise CryptoError(f"the ephemeral key is {len(ephemeral_key)} bytes, not "
                          f"{EPHEMERAL_KEY_BYTES}")
    return ephemeral_key[:X25519_BYTES], ephemeral_key[X25519_BYTES:]


def _fit(content: LinkSeed) -> LinkSeed:
    """``content`` with as many group keys as the server relays."""
    keys = dict(sorted(content.group_keys.items()))
    while keys and _SEALED_OVERHEAD + len(LinkSeed(content.seed, content.generation,
                                                   keys).encode()) > MAX_SEALED_BYTES:
        keys.pop(next(reversed(keys)))
    return LinkSeed(content.seed, content.generation, keys)


def seal_link_seed_with(content: LinkSeed, ephemeral_key: bytes, provisioning_id: str,
                        cyphr_id: str, *, approver: X25519PrivateKey, kem_secret: bytes,
                        kyber_ciphertext: bytes, nonce: bytes) -> bytes:
    """The seal with its randomness given: the approver's X25519 key, the
    ML-KEM encapsulation's secret and ciphertext, the nonce."""
    their_x25519, _ = _split_ephemeral(ephemeral_key)
    try:
        dh_secret = approver.exchange(X25519PublicKey.from_public_bytes(their_x25519))
    except ValueError:
        raise CryptoError("the ephemeral X25519 key gives no secret (a bad public key)") from None
    approver_key = approver.public_key().public_bytes_raw()
    header = link_seed_header(provisioning_id, cyphr_id, ephemeral_key, approver_key,
                              kyber_ciphertext)
    key = link_seed_key(kem_secret, dh_secret, header)
    return (bytes([LINK_SEED_FORMAT]) + approver_key + kyber_ciphertext + nonce
            + _aead_encrypt(key, nonce, content.encode(), header))


def seal_link_seed(content: LinkSeed, ephemeral_key: bytes, provisioning_id: str,
                   cyphr_id: str) -> bytes:
    """The identity seed (and what goes with it) sealed to a new device's
    ephemeral key, for one provisioning of one Cyphr ID: hybrid ML-KEM-1024
    and X25519 with a fresh key of the approver, HKDF-SHA256,
    XChaCha20-Poly1305. At most MAX_SEALED_BYTES (group keys past that are
    left out)."""
    _, their_mlkem = _split_ephemeral(ephemeral_key)
    try:
        kem_secret, kyber_ciphertext = MLKEM1024PublicKey.from_public_bytes(
            their_mlkem).encapsulate()
    except ValueError:
        raise CryptoError("the ephemeral ML-KEM key is not a valid ML-KEM-1024 key") from None
    return seal_link_seed_with(_fit(content), ephemeral_key, provisioning_id, cyphr_id,
                               approver=X25519PrivateKey.generate(), kem_secret=kem_secret,
                               kyber_ciphertext=kyber_ciphertext, nonce=os.urandom(NONCE_BYTES))


def open_link_seed(sealed: bytes, x25519: X25519PrivateKey, mlkem: MLKEM1024PrivateKey,
                   provisioning_id: str, cyphr_id: str) -> LinkSeed:
    """Open a seal made by :func:`seal_link_seed` for this provisioning and
    Cyphr ID with the ephemeral private keys; LinkSeedError otherwise."""
    if len(sealed) < _SEALED_OVERHEAD or sealed[0] != LINK_SEED_FORMAT:
        raise LinkSeedError("the sealed seed is not one (too short, or of an unknown format)")
    at = 1
    approver_key = sealed[at:at + X25519_BYTES]
    at += X25519_BYTES
    kyber_ciphertext = sealed[at:at + MLKEM1024_CIPHERTEXT_BYTES]
    at += MLKEM1024_CIPHERTEXT_BYTES
    nonce, ciphertext = sealed[at:at + NONCE_BYTES], sealed[at + NONCE_BYTES:]
    try:
        kem_secret = mlkem.decapsulate(kyber_ciphertext)
        dh_secret = x25519.exchange(X25519PublicKey.from_public_bytes(approver_key))
    except (ValueError, InvalidKey):
        raise LinkSeedError("the sealed seed's key exchange fails: it was altered") from None
    ephemeral_key = (x25519.public_key().public_bytes_raw()
                     + mlkem.public_key().public_bytes_raw())
    header = link_seed_header(provisioning_id, cyphr_id, ephemeral_key, approver_key,
                              kyber_ciphertext)
    plaintext = _aead_decrypt(link_seed_key(kem_secret, dh_secret, header), nonce, ciphertext,
                              header)
    if plaintext is None:
        raise LinkSeedError(f"the sealed seed does not open: it was altered, or sealed for "
                            f"another key, provisioning or Cyphr ID than {cyphr_id}'s link "
                            f"{provisioning_id}")
    return LinkSeed.decode(plaintext)


# -- device names -------------------------------------------------------------

def device_name_key(seed: bytes) -> bytes:
    return _hkdf(seed, KEY_BYTES, _DEVICE_NAME_INFO)


def device_name_aad(cyphr_id: str, device_id: int) -> bytes:
    return signing.text(DEVICE_NAME_LABEL) + signing.text(cyphr_id) + signing.uint64(device_id)


def seal_device_name_with(seed: bytes, cyphr_id: str, device_id: int, name: str,
                          nonce: bytes) -> bytes:
    raw = name.encode("utf-8")
    if not raw or len(raw) > MAX_DEVICE_NAME_BYTES:
        raise CryptoError(f"a device name is 1 to {MAX_DEVICE_NAME_BYTES} bytes of UTF-8")
    return nonce + _aead_encrypt(device_name_key(seed), nonce, pad(raw),
                                 device_name_aad(cyphr_id, device_id))


def seal_device_name(seed: bytes, cyphr_id: str, device_id: int, name: str) -> bytes:
    """``nonce (24) || XChaCha20-Poly1305(padded name)`` under a key from
    the seed, bound to the Cyphr ID and the device id: 296 bytes."""
    return seal_device_name_with(seed, cyphr_id, device_id, name, os.urandom(NONCE_BYTES))


def open_device_name(seed: bytes, cyphr_id: str, device_id: int, sealed: bytes) -> str:
    """The name, or CryptoError when it was altered or sealed for another
    device or identity."""
    plaintext = None
    if len(sealed) >= NONCE_BYTES + TAG_BYTES:
        plaintext = _aead_decrypt(device_name_key(seed), sealed[:NONCE_BYTES],
                                  sealed[NONCE_BYTES:], device_name_aad(cyphr_id, device_id))
    if plaintext is None:
        raise CryptoError(f"the name of device {device_id} does not open (altered, or moved "
                          f"from another device)")
    try:
        return unpad(plaintext).decode("utf-8")
    except UnicodeDecodeError:
        raise CryptoError(f"the name of device {device_id} is not UTF-8") from None
