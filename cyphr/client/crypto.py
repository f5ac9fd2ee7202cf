"""
The end-to-end scheme of Cyphr's clients (version 2, ``cyphr-hybrid-v2``,
and per device, version 3).

Everything here runs on the client; the server sees only what
:func:`seal` returns, and stores it as an opaque JSON object. Every
signature goes through :mod:`cyphr.signing` (labelled, length-prefixed
encodings): nothing signed or authenticated here is JSON.

Identity
    A 24-word BIP-39 recovery phrase gives a 64-byte seed (BIP-39's own
    PBKDF2 step, empty passphrase). HKDF-SHA256 expands that seed into the
    Ed25519 identity key's 32-byte seed and the ML-KEM-1024 key pair's
    64-byte seed (FIPS 203 ``d || z``): the phrase alone re-creates both on
    a new device. The identity key signs, each under its own label, the
    main ML-KEM key and every one-time prekey as a
    :class:`~cyphr.signing.KeyBinding` (kind, owner's Cyphr ID, key id,
    validity), each device's own ML-KEM key as a
    :class:`~cyphr.signing.DeviceKeyBinding` (the same and the device's
    id), every message, and the login statements the client builds itself.

A message, for every recipient including the sender itself
    1. The plaintext is padded to a size bucket (256 B, 1 KiB, 4 KiB,
       16 KiB, then multiples of 64 KiB) so that its length leaks little.
    2. A fresh 32-byte content key encrypts it with XChaCha20-Poly1305;
       the associated data is ``MessageHeader.aad()``: the binary encoding
       of the header (scheme, chat, sender, type, client message id, the
       sorted recipients, the ephemeral X25519 key).
    3. For each recipient the content key is wrapped with a key derived by
       HKDF-SHA256 from two secrets: an ML-KEM-1024 encapsulation to the
       recipient's one-time prekey (or its main key when none could be
       claimed), and an X25519 exchange between the message's ephemeral key
       and the recipient's identity key converted to X25519. Each wrapped
       key names the key it was sealed to (``keyId``, ``oneTime``).
    4. The sender signs ``message_content(header, nonce, ciphertext, tag,
       wrapped keys)`` under the label ``message``.

Since devices, a message is sealed per device (version 3,
``cyphr-hybrid-v3``, :func:`seal_to_devices`): the header lists devices
(Cyphr ID, device id), and each wrapped key is for one device, derived and
signed with its device id; each device opens its own entry with its own
key (docs/encryption.rst, "Sealing per device"). :func:`seal` (version 2,
one wrapped key per user) is kept for tests of old history; both open.

Opening a message checks, in order: the shape (strictly: no unknown field),
the signature (against the sender's identity key as the reader pinned it),
the header against what the server says of the message (sender, chat,
type, client message id), that the reader is a recipient, the wrapped key,
then the content. A version 1 payload still opens (old history), but is
reported unverified: v1 clients signed raw login challenges with the same
key, so a v1 signature proves nothing about its sender.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import (
    MLKEM1024PrivateKey,
    MLKEM1024PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from mnemonic import Mnemonic
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import BadSignatureError
from nacl.exceptions import CryptoError as NaclCryptoError
from nacl.signing import SigningKey, VerifyKey

from cyphr import signing
from cyphr.clock import iso, parse_iso
from cyphr.crypto import MLKEM1024_KEY_BYTES, is_mlkem1024_key
from cyphr.signing import (
    DeviceKeyBinding,
    DeviceMessageHeader,
    DeviceWrappedKey,
    KeyBinding,
    MessageHeader,
    WrappedKey,
)

VERSION = 2
SCHEME = "cyphr-hybrid-v2"  # ML-KEM-1024 + X25519, HKDF-SHA256, XChaCha20-Poly1305, Ed25519
# Sealed per device: the same primitives, each wrapped key for one device.
DEVICE_VERSION = 3
DEVICE_SCHEME = "cyphr-hybrid-v3"
V1_VERSION = 1
V1_SCHEME = "cyphr-hybrid-v1"  # read only: old history
PHRASE_WORDS = 24

_V1_HEADER_CONTEXT = b"cyphr-message-header-v1\x00"
_V1_SIGNATURE_CONTEXT = b"cyphr-message-signature-v1\x00"
# The wrapping key's derivation is unchanged from v1 (its salt is the hash
# of the header's associated data, which is now MessageHeader.aad()).
_WRAP_INFO = b"cyphr-message-wrap-v1\x00"
_DEVICE_WRAP_INFO = b"cyphr-message-wrap-v3\x00"
_ED25519_INFO = b"cyphr-identity-ed25519-v1"
_MLKEM_INFO = b"cyphr-identity-ml-kem-1024-v1"
_SAFETY_CONTEXT = b"cyphr-safety-number-v1\x00"
_PIN_BACKUP_INFO = b"cyphr-v2 pin-backup-key"
_PIN_BACKUP_AAD_LABEL = "cyphr-v2 pin-backup"

KEY_BYTES = 32
NONCE_BYTES = 24
TAG_BYTES = 16
MLKEM1024_CIPHERTEXT_BYTES = 1568
MAX_KEY_ID = 2**53 - 1  # what JSON carries exactly
_BUCKETS = (256, 1024, 4096, 16384)
_LARGE_BUCKET = 65536

DAY_MS = 24 * 3600 * 1000
MAIN_KEY_LIFETIME_MS = 180 * DAY_MS
MAIN_KEY_RENEW_MS = 150 * DAY_MS  # renewed when fewer than this remain
PREKEY_LIFETIME_MS = 90 * DAY_MS
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000  # how far ahead a key's createdAt may be


class CryptoError(Exception):
    """A message, key or phrase that cannot be used; the text says why."""


class InvalidPhrase(CryptoError):
    pass


class MalformedPayload(CryptoError):
    pass


class BadSignature(CryptoError):
    pass


class TamperedHeader(CryptoError):
    pass


class NotARecipient(CryptoError):
    pass


class UnknownPrekey(CryptoError):
    pass


class TamperedMessage(CryptoError):
    pass


class KeyRefused(CryptoError):
    """A published ML-KEM key that its reader must not seal to."""


# -- encoding ---------------------------------------------------------------

def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def unb64(value: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise MalformedPayload(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise MalformedPayload(f"{what} is not valid base64") from None
    if size is not None and len(raw) != size:
        raise MalformedPayload(f"{what} is {len(raw)} bytes, not {size}")
    return raw


def _v1_canonical(value: Any) -> bytes:
    # Only to check what a v1 client signed (old history): nothing new is
    # signed as JSON.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _hkdf(ikm: bytes, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def iso_ms(ms: int) -> str:
    """A time as the wire carries it: ISO 8601 UTC with milliseconds."""
    text = iso(ms)
    assert text is not None
    return text


def parse_iso_ms(value: Any, what: str) -> int:
    """ms since the epoch of a wire time; strictly the form :func:`iso_ms` makes."""
    ms = parse_iso(value)
    if ms is None:
        raise KeyRefused(f"{what} is not a valid time of the form 2026-01-31T12:00:00.000Z")
    return ms


# -- the recovery phrase and the identity ---------------------------------

_mnemonic = Mnemonic("english")


def new_phrase() -> str:
    """24 words from the BIP-39 English list: 256 bits of entropy."""
    return _mnemonic.generate(strength=256)


def normalize_phrase(phrase: str) -> str:
    words = phrase.lower().split()
    if len(words) != PHRASE_WORDS:
        raise InvalidPhrase(f"a recovery phrase has {PHRASE_WORDS} words, not {len(words)}")
    unknown = [w for w in words if w not in _mnemonic.wordlist]
    if unknown:
        raise InvalidPhrase(f"not a word of the recovery phrase list: {unknown[0]!r}")
    normalized = " ".join(words)
    if not _mnemonic.check(normalized):
        raise InvalidPhrase("the recovery phrase's checksum does not match: a word is wrong")
    return normalized


def phrase_seed(phrase: str) -> bytes:
    return Mnemonic.to_seed(normalize_phrase(phrase), passphrase="")


class Identity:
    """The secret keys of one Cyphr ID, all from one 64-byte seed.

    It signs nothing raw: only labelled structures (:mod:`cyphr.signing`),
    so that no signature of one kind can pass for another."""

    def __init__(self, seed: bytes, generation: int = 0) -> None:
        if len(seed) != 64:
            raise CryptoError("an identity seed is 64 bytes")
        if not 0 <= generation < 2**32:
            raise CryptoError("a key generation is between 0 and 2^32 - 1")
        self.seed = seed
        self.generation = generation
        self.signing_key = SigningKey(_hkdf(seed, 32, _ED25519_INFO))
        self.kem_key = self.kem_key_of(generation)
        self.public_key = bytes(self.signing_key.verify_key)
        self.kyber_public_key = self.kem_key.public_key().public_bytes_raw()
        self._x25519 = X25519PrivateKey.from_private_bytes(
            bytes(self.signing_key.to_curve25519_private_key()))

    def kem_key_of(self, generation: int) -> MLKEM1024PrivateKey:
        """The main ML-KEM key of a generation: rotating the key moves to the
        next one, and every earlier one can be derived again from the seed
        (so that older messages still open)."""
        if not 0 <= generation < 2**32:
            raise CryptoError("a key generation is between 0 and 2^32 - 1")
        return MLKEM1024PrivateKey.from_seed_bytes(
            _hkdf(self.seed, 64, _MLKEM_INFO + generation.to_bytes(4, "big")))

    def kem_keys(self) -> list[MLKEM1024PrivateKey]:
        """The current generation's key first, then the earlier ones."""
        return [self.kem_key] + [self.kem_key_of(g) for g in range(self.generation - 1, -1, -1)]

    @classmethod
    def from_phrase(cls, phrase: str, generation: int = 0) -> Identity:
        return cls(phrase_seed(phrase), generation)

    def main_key_binding(self, owner: str, created_at: int, expires_at: int) -> KeyBinding:
        """What the main key's signature binds: this generation's key, as the
        key ``generation`` of ``owner`` (a Cyphr ID), valid between the two
        times (ms)."""
        return KeyBinding(False, owner, self.generation, created_at, expires_at,
                          self.kyber_public_key)

    def main_key_form(self, owner: str, created_at: int) -> dict[str, Any]:
        """The main key fields of a register, recover or store-public-key
        body, signed now for :data:`MAIN_KEY_LIFETIME_MS`."""
        binding = self.main_key_binding(owner, created_at, created_at + MAIN_KEY_LIFETIME_MS)
        return {"kyberPublicKey": b64(self.kyber_public_key),
                "kyberKeySignature": b64(binding.sign(self.signing_key)),
                "kyberKeyId": binding.key_id,
                "kyberKeyCreatedAt": iso_ms(binding.created_at),
                "kyberKeyExpiresAt": iso_ms(binding.expires_at)}

    def sign_with_label(self, label: str, content: bytes) -> bytes:
        return signing.sign_with_label(self.signing_key, label, content)

    def x25519_exchange(self, peer: bytes) -> bytes:
        return _x25519(self._x25519, peer)


def _x25519(private: X25519PrivateKey, peer: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError:  # a low-order point: all-zero shared secret
        raise CryptoError("the X25519 key agreement gave no secret (a bad public key)") from None


def identity_x25519(identity_key: bytes) -> bytes:
    """An Ed25519 identity key as the X25519 key of the same secret."""
    try:
        return bytes(VerifyKey(identity_key).to_curve25519_public_key())
    except (ValueError, TypeError, NaclCryptoError):
        raise CryptoError("not an Ed25519 public key") from None


@dataclass(frozen=True)
class Prekey:
    """A one-time ML-KEM-1024 key pair: its seed stays on the device."""

    key_id: int
    seed: bytes

    @classmethod
    def generate(cls, key_id: int) -> Prekey:
        return cls(key_id, MLKEM1024PrivateKey.generate().private_bytes_raw())

    @property
    def private_key(self) -> MLKEM1024PrivateKey:
        return MLKEM1024PrivateKey.from_seed_bytes(self.seed)

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    def upload_form(self, identity: Identity, owner: str, created_at: int) -> dict[str, Any]:
        """One entry of a prekey upload, signed now as a one-time prekey of
        ``owner`` for :data:`PREKEY_LIFETIME_MS`."""
        binding = KeyBinding(True, owner, self.key_id, created_at,
                             created_at + PREKEY_LIFETIME_MS, self.public_key)
        return {"keyId": self.key_id, "kyberPublicKey": b64(binding.public_key),
                "signature": b64(binding.sign(identity.signing_key)),
                "createdAt": iso_ms(binding.created_at), "expiresAt": iso_ms(binding.expires_at)}


def sign_device_key(signing_key: SigningKey, owner: str, device_id: int, key_id: int,
                    created_at: int, expires_at: int, public_key: bytes) -> bytes:
    """The identity key's signature (label device-key) on a device's own
    ML-KEM key, binding it to ``owner`` (a Cyphr ID), to the device
    ``device_id`` (1 or more: signing.EncodingError otherwise), to its
    generation ``key_id`` and to its validity (ms)."""
    return DeviceKeyBinding(owner, device_id, key_id, created_at, expires_at,
                            public_key).sign(signing_key)


def verify_device_key(identity_key: bytes, owner: str, device_id: int, key_id: int,
                      created_at: int, expires_at: int, public_key: bytes,
                      signature: bytes) -> bool:
    """Whether ``signature`` is ``identity_key``'s device-key signature on
    exactly this key, owner, device id, key id and validity: a key signed
    for another device, another identity, or as a main key or prekey does
    not verify. Never raises for bad values: False."""
    return DeviceKeyBinding(owner, device_id, key_id, created_at, expires_at,
                            public_key).verify(identity_key, signature)


def device_key_form(identity: Identity, owner: str, device_id: int, key_id: int,
                    public_key: bytes, created_at: int) -> dict[str, Any]:
    """The fields of a device key upload (store-public-key, by the device
    itself: its token names the device), signed as device ``device_id`` of
    ``owner`` (docs/encryption.rst, "Device keys") for
    :data:`MAIN_KEY_LIFETIME_MS` from ``created_at``. The server lists it
    with ``kyberKeySignatureVersion`` 3."""
    expires_at = created_at + MAIN_KEY_LIFETIME_MS
    signature = sign_device_key(identity.signing_key, owner, device_id, key_id, created_at,
                                expires_at, public_key)
    return {"kyberPublicKey": b64(public_key), "kyberKeyId": key_id,
            "kyberKeyCreatedAt": iso_ms(created_at), "kyberKeyExpiresAt": iso_ms(expires_at),
            "kyberKeySignature": b64(signature)}


@dataclass(frozen=True)
class PublishedKey:
    """An ML-KEM key as its owner signed it, every part checked."""

    owner: str
    one_time: bool
    key_id: int
    public_key: bytes
    created_at: int
    expires_at: int


def check_published_key(identity_key: bytes, owner: str, *, one_time: Any, key_id: Any,
                        public_key: Any, signature: Any, created_at: Any, expires_at: Any,
                        signature_version: Any, now: int) -> PublishedKey:
    """A key the server handed out for ``owner`` (the Cyphr ID asked for),
    checked as a reader must: a v2 signature by ``identity_key`` under the
    label of the kind the server names (``one_time``), over this owner, this
    key id and these times; not expired (``now``, ms), not made more than
    five minutes ahead. KeyRefused says what is wrong."""
    if signature_version == 1:
        raise KeyRefused(f"{owner} has not upgraded to v2 key signatures")
    if signature_version != 2:
        raise KeyRefused(f"the server gave no v2 key signature for {owner} "
                         f"(signature version {signature_version!r})")
    if not isinstance(one_time, bool):
        raise KeyRefused(f"the server does not say whether {owner}'s key is a one-time prekey")
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= MAX_KEY_ID:
        raise KeyRefused(f"{owner}'s key has no valid key id")
    try:
        key = unb64(public_key, "the ML-KEM key", MLKEM1024_KEY_BYTES)
        signature_bytes = unb64(signature, "the key signature", signing.ED25519_SIGNATURE_BYTES)
    except MalformedPayload as e:
        raise KeyRefused(f"{owner}'s key: {e}") from None
    created = parse_iso_ms(created_at, f"{owner}'s key createdAt")
    expires = parse_iso_ms(expires_at, f"{owner}'s key expiresAt")
    kind = "one-time prekey" if one_time else "main ML-KEM key"
    binding = KeyBinding(one_time, owner, key_id, created, expires, key)
    if not binding.verify(identity_key, signature_bytes):
        raise KeyRefused(f"the {kind} {key_id} handed out for {owner} is not signed by "
                         f"{owner}'s identity key as such (its kind, owner, id or times "
                         f"differ from what was signed): refusing it")
    if expires <= now:
        raise KeyRefused(f"{owner}'s {kind} {key_id} expired at {iso_ms(expires)}")
    if created > now + MAX_CLOCK_SKEW_MS:
        raise KeyRefused(f"{owner}'s {kind} {key_id} claims to be made in the future "
                         f"({iso_ms(created)})")
    if not is_mlkem1024_key(key):
        raise KeyRefused(f"{owner}'s {kind} {key_id} is not a valid ML-KEM-1024 key")
    return PublishedKey(owner, one_time, key_id, key, created, expires)


def safety_number(cyphr_id_a: str, key_a: bytes, cyphr_id_b: str, key_b: bytes) -> str:
    """60 digits two users compare out of band: equal on both sides exactly
    when each holds the other's true identity key."""

    def half(cyphr_id: str, key: bytes) -> str:
        digest = _SAFETY_CONTEXT + cyphr_id.encode("utf-8") + b"\x00" + key
        for _ in range(5200):  # slows a search for a key with a chosen number
            digest = hashlib.sha512(digest + key).digest()
        return "".join(f"{int.from_bytes(digest[i:i + 5], 'big') % 100000:05d}"
                       for i in range(0, 30, 5))

    halves = sorted([half(cyphr_id_a, key_a), half(cyphr_id_b, key_b)])
    digits = "".join(halves)
    return " ".join(digits[i:i + 5] for i in range(0, 60, 5))


def normalize_safety_number(number: str) -> str:
    """The 60 digits of a number as typed (spaces, dashes or none); ValueError
    for anything else."""
    digits = re.sub(r"[\s\-]", "", number)
    if not re.fullmatch(r"\d{60}", digits):
        raise ValueError("a safety number is 60 digits")
    return digits


# -- the pin backup -----------------------------------------------------------

def _pin_backup_key(seed: bytes) -> bytes:
    return _hkdf(seed, KEY_BYTES, _PIN_BACKUP_INFO)


def _pin_backup_aad(cyphr_id: str) -> bytes:
    return signing.text(_PIN_BACKUP_AAD_LABEL) + signing.text(cyphr_id)


def seal_pin_backup(seed: bytes, cyphr_id: str, backup: Mapping[str, Any]) -> bytes:
    """The identity's pins, sealed so that only the phrase opens them:
    ``nonce (24 bytes) || XChaCha20-Poly1305(JSON)`` under a key derived
    from the seed, bound to the Cyphr ID."""
    nonce = os.urandom(NONCE_BYTES)
    plaintext = json.dumps(backup, sort_keys=True).encode("utf-8")
    return nonce + _aead_encrypt(_pin_backup_key(seed), nonce, plaintext, _pin_backup_aad(cyphr_id))


def open_pin_backup(seed: bytes, cyphr_id: str, blob: bytes) -> dict[str, Any]:
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise TamperedMessage("the pin backup is too short")
    plaintext = _aead_decrypt(_pin_backup_key(seed), blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                              _pin_backup_aad(cyphr_id))
    if plaintext is None:
        raise TamperedMessage("the pin backup does not open with this identity's key "
                              "(altered, or another identity's)")
    try:
        backup = json.loads(plaintext)
    except ValueError:
        raise TamperedMessage("the pin backup is not JSON") from None
    if not isinstance(backup, dict) or not isinstance(backup.get("pins"), dict):
        raise TamperedMessage("the pin backup holds no pins")
    return backup


# -- padding ------------------------------------------------------------------

def pad(data: bytes) -> bytes:
    needed = len(data) + 4
    for bucket in _BUCKETS:
        if needed <= bucket:
            size = bucket
            break
    else:
        size = -(-needed // _LARGE_BUCKET) * _LARGE_BUCKET
    return len(data).to_bytes(4, "big") + data + bytes(size - needed)


def unpad(padded: bytes) -> bytes:
    if len(padded) < 4:
        raise TamperedMessage("the padded plaintext is too short")
    length = int.from_bytes(padded[:4], "big")
    if length > len(padded) - 4 or any(padded[4 + length:]):
        raise TamperedMessage("the padding is malformed")
    return padded[4:4 + length]


# -- sealing and opening --------------------------------------------------

@dataclass(frozen=True)
class Recipient:
    """Whom a message is for: the identity key as the sender pinned it, and
    the ML-KEM key to encapsulate to, already checked against it: a claimed
    one-time prekey (``one_time``, ``key_id`` its id) or the main key
    (``key_id`` its id, the owner's key generation)."""

    cyphr_id: str
    identity_key: bytes
    kyber_public_key: bytes
    key_id: int
    one_time: bool = False


def _aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def _aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except NaclCryptoError:
        return None


def _wrap_key(kem_secret: bytes, dh_secret: bytes, aad: bytes, recipient_id: str,
              kyber_ciphertext: bytes, ephemeral: bytes, recipient_x25519: bytes) -> bytes:
    info = (_WRAP_INFO + recipient_id.encode("utf-8") + b"\x00" + ephemeral + recipient_x25519
            + hashlib.sha256(kyber_ciphertext).digest())
    return _hkdf(kem_secret + dh_secret, KEY_BYTES, info, salt=hashlib.sha256(aad).digest())


def _wrap_aad(aad: bytes, recipient_id: str) -> bytes:
    # The header's associated data is self-delimiting; the recipient's id
    # follows it length-prefixed.
    return aad + signing.text(recipient_id)


def seal(sender: Identity, sender_id: str, recipients: list[Recipient], plaintext: bytes, *,
         chat_id: str | None, message_type: str, client_message_id: str) -> dict[str, Any]:
    """The encryptedPayload of one message. ``chat_id`` is None only for the
    first message of a direct chat (the server creates the chat on it): the
    header's two recipients then name the chat."""
    if chat_id == "":
        raise CryptoError("a chat id is not empty (None names a first direct message)")
    ids = [r.cyphr_id for r in recipients]
    if len(set(ids)) != len(ids):
        raise CryptoError("a recipient is listed twice")
    if sender_id not in ids:
        raise CryptoError("the sender must be one of the recipients (to read its own history)")
    recipients = sorted(recipients, key=lambda r: r.cyphr_id)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    header = MessageHeader(SCHEME, chat_id, sender_id, message_type, client_message_id,
                           tuple(r.cyphr_id for r in recipients), ephemeral_public)
    aad = header.aad()
    content_key = os.urandom(KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    sealed = _aead_encrypt(content_key, nonce, pad(plaintext), aad)
    ciphertext, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
    keys = []
    for r in recipients:
        if not 0 <= r.key_id <= MAX_KEY_ID:
            raise CryptoError(f"{r.cyphr_id}'s key id {r.key_id} is out of range")
        try:
            public = MLKEM1024PublicKey.from_public_bytes(r.kyber_public_key)
        except ValueError:
            raise CryptoError(f"{r.cyphr_id}'s ML-KEM key is not a valid ML-KEM-1024 key") from None
        kem_secret, kyber_ciphertext = public.encapsulate()
        their_x25519 = identity_x25519(r.identity_key)
        dh_secret = _x25519(ephemeral, their_x25519)
        wrap = _wrap_key(kem_secret, dh_secret, aad, r.cyphr_id, kyber_ciphertext,
                         ephemeral_public, their_x25519)
        wrap_nonce = os.urandom(NONCE_BYTES)
        keys.append(WrappedKey(r.cyphr_id, r.one_time, r.key_id, kyber_ciphertext, wrap_nonce,
                               _aead_encrypt(wrap, wrap_nonce, content_key,
                                             _wrap_aad(aad, r.cyphr_id))))
    signature = sender.sign_with_label(
        signing.MESSAGE, signing.message_content(header, nonce, ciphertext, tag, keys))
    return {
        "version": VERSION,
        "scheme": SCHEME,
        "header": {
            "chatId": chat_id,
            "senderId": sender_id,
            "messageType": message_type,
            "clientMessageId": client_message_id,
            "recipients": list(header.recipients),
            "ephemeralKey": b64(ephemeral_public),
        },
        "nonce": b64(nonce),
        "encryptedMessage": b64(ciphertext),
        "tag": b64(tag),
        "keys": [{"recipientId": k.recipient_id, "keyId": k.key_id, "oneTime": k.one_time,
                  "kyberCiphertext": b64(k.kyber_ciphertext), "nonce": b64(k.nonce),
                  "wrappedKey": b64(k.wrapped_key)} for k in keys],
        "signature": b64(signature),
    }


@dataclass(frozen=True)
class DeviceRecipient:
    """One device a message is for (v3): its identity key as the sender
    pinned it, and the ML-KEM key to encapsulate to, already checked: one of
    the device's one-time prekeys (``one_time``), or the device's own key
    (device 1 and recovered devices: the identity's main key)."""

    cyphr_id: str
    device_id: int
    identity_key: bytes
    kyber_public_key: bytes
    key_id: int
    one_time: bool = False


def _device_wrap_key(kem_secret: bytes, dh_secret: bytes, aad: bytes, cyphr_id: str,
                     device_id: int, kyber_ciphertext: bytes, ephemeral: bytes,
                     recipient_x25519: bytes) -> bytes:
    info = (_DEVICE_WRAP_INFO + signing.device_recipient(cyphr_id, device_id) + ephemeral
            + recipient_x25519 + hashlib.sha256(kyber_ciphertext).digest())
    return _hkdf(kem_secret + dh_secret, KEY_BYTES, info, salt=hashlib.sha256(aad).digest())


def _device_wrap_aad(aad: bytes, cyphr_id: str, device_id: int) -> bytes:
    return aad + signing.device_recipient(cyphr_id, device_id)


def seal_to_devices(sender: Identity, sender_id: str, sender_device: int,
                    recipients: list[DeviceRecipient], plaintext: bytes, *,
                    chat_id: str | None, message_type: str,
                    client_message_id: str) -> dict[str, Any]:
    """The encryptedPayload of one message sealed per device (v3,
    ``cyphr-hybrid-v3``): one wrapped key for each device of
    ``recipients``, which must include the sending device itself
    (``sender_id``, ``sender_device``: to read its own history)."""
    return seal_to_devices_with(sender, sender_id, sender_device, recipients, plaintext,
                                chat_id=chat_id, message_type=message_type,
                                client_message_id=client_message_id,
                                ephemeral=X25519PrivateKey.generate(),
                                content_key=os.urandom(KEY_BYTES), nonce=os.urandom(NONCE_BYTES))


Encapsulate = Callable[[bytes], tuple[bytes, bytes]]  # ML-KEM public key -> (secret, ciphertext)


def _encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
    return MLKEM1024PublicKey.from_public_bytes(public_key).encapsulate()


def seal_to_devices_with(sender: Identity, sender_id: str, sender_device: int,
                         recipients: list[DeviceRecipient], plaintext: bytes, *,
                         chat_id: str | None, message_type: str, client_message_id: str,
                         ephemeral: X25519PrivateKey, content_key: bytes, nonce: bytes,
                         encapsulate: Encapsulate = _encapsulate,
                         wrap_nonce: Callable[[], bytes] = lambda: os.urandom(NONCE_BYTES)
                         ) -> dict[str, Any]:
    """:func:`seal_to_devices` with its randomness given: the test vectors
    (tools/make_vectors.py) seal with fixed values."""
    if chat_id == "":
        raise CryptoError("a chat id is not empty (None names a first direct message)")
    named = [(r.cyphr_id, r.device_id) for r in recipients]
    if len(set(named)) != len(named):
        raise CryptoError("a device is listed twice")
    if (sender_id, sender_device) not in named:
        raise CryptoError("the sending device must be one of the recipients (to read its own "
                          "history)")
    if any(not 1 <= d <= MAX_KEY_ID for _, d in named):
        raise CryptoError("a device id is between 1 and 2^53 - 1")
    recipients = sorted(recipients, key=lambda r: (r.cyphr_id, r.device_id))
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    header = DeviceMessageHeader(DEVICE_SCHEME, chat_id, sender_id, message_type,
                                 client_message_id,
                                 tuple((r.cyphr_id, r.device_id) for r in recipients),
                                 ephemeral_public)
    aad = header.aad()
    sealed = _aead_encrypt(content_key, nonce, pad(plaintext), aad)
    ciphertext, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
    keys = []
    for r in recipients:
        who = f"device {r.device_id} of {r.cyphr_id}"
        if not 0 <= r.key_id <= MAX_KEY_ID:
            raise CryptoError(f"the key id {r.key_id} of {who} is out of range")
        try:
            kem_secret, kyber_ciphertext = encapsulate(r.kyber_public_key)
        except ValueError:
            raise CryptoError(f"the ML-KEM key of {who} is not a valid ML-KEM-1024 key") from None
        their_x25519 = identity_x25519(r.identity_key)
        wrap = _device_wrap_key(kem_secret, _x25519(ephemeral, their_x25519), aad, r.cyphr_id,
                                r.device_id, kyber_ciphertext, ephemeral_public, their_x25519)
        entry_nonce = wrap_nonce()
        keys.append(DeviceWrappedKey(
            r.cyphr_id, r.device_id, r.one_time, r.key_id, kyber_ciphertext, entry_nonce,
            _aead_encrypt(wrap, entry_nonce, content_key,
                          _device_wrap_aad(aad, r.cyphr_id, r.device_id))))
    signature = sender.sign_with_label(
        signing.MESSAGE, signing.message_content(header, nonce, ciphertext, tag, keys))
    return {
        "version": DEVICE_VERSION,
        "scheme": DEVICE_SCHEME,
        "header": {
            "chatId": chat_id,
            "senderId": sender_id,
            "messageType": message_type,
            "clientMessageId": client_message_id,
            "recipients": [{"cyphrId": c, "deviceId": d} for c, d in header.recipients],
            "ephemeralKey": b64(ephemeral_public),
        },
        "nonce": b64(nonce),
        "encryptedMessage": b64(ciphertext),
        "tag": b64(tag),
        "keys": [{"recipientId": k.recipient_id, "deviceId": k.device_id, "keyId": k.key_id,
                  "oneTime": k.one_time, "kyberCiphertext": b64(k.kyber_ciphertext),
                  "nonce": b64(k.nonce), "wrappedKey": b64(k.wrapped_key)} for k in keys],
        "signature": b64(signature),
    }


def payload_devices(payload: Any) -> list[tuple[str, int]] | None:
    """The devices a v3 payload's header names (unchecked: for display and
    tests), or None for another version."""
    if not isinstance(payload, dict) or payload.get("scheme") != DEVICE_SCHEME:
        return None
    header = payload.get("header")
    recipients = header.get("recipients") if isinstance(header, dict) else None
    if not isinstance(recipients, list):
        return None
    return [(r.get("cyphrId"), r.get("deviceId")) for r in recipients if isinstance(r, dict)]


@dataclass(frozen=True)
class Opened:
    plaintext: bytes
    header: dict[str, Any]
    key_id: int | None  # the one-time prekey it was sealed to, or None for the main key
    content_key: bytes  # to open it again once that prekey is erased
    version: int = VERSION
    # True when the signature proves the sender (v2). A v1 payload opens
    # (old history) but proves nothing: see V1_UNVERIFIED.
    verified: bool = True


V1_UNVERIFIED = ("sealed under v1 (cyphr-hybrid-v1): its signature cannot prove the sender "
                 "(v1 clients signed raw login challenges with the same key)")


def _field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise MalformedPayload(f"{where}{name} is missing or of the wrong type")
    return value


def _only(obj: Mapping[str, Any], names: set[str], where: str) -> None:
    extra = set(obj) - names
    if extra:
        raise MalformedPayload(f"{where} holds unknown fields: {', '.join(sorted(extra))}")


def payload_sender(payload: Any) -> str:
    """Who the payload says sent it (to look up the key to verify with)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("header"), dict):
        raise MalformedPayload("not a Cyphr message payload")
    return _field(payload["header"], "senderId", str, "header.")


_PAYLOAD_FIELDS = {"version", "scheme", "header", "nonce", "encryptedMessage", "tag", "keys",
                   "signature"}
_HEADER_FIELDS = {"chatId", "senderId", "messageType", "clientMessageId", "recipients",
                  "ephemeralKey"}
_KEY_FIELDS = {"recipientId", "keyId", "oneTime", "kyberCiphertext", "nonce", "wrappedKey"}
_DEVICE_KEY_FIELDS = _KEY_FIELDS | {"deviceId"}
_DEVICE_FIELDS = {"cyphrId", "deviceId"}


@dataclass(frozen=True)
class _Parsed:
    header: MessageHeader | DeviceMessageHeader
    nonce: bytes
    ciphertext: bytes
    tag: bytes
    keys: list[Any]  # WrappedKey (v2) or DeviceWrappedKey (v3)
    signature: bytes


def _device_id(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_KEY_ID:
        raise MalformedPayload(f"{what} is not a device id")
    return value


def _parse_v3(payload: dict[str, Any]) -> _Parsed:
    """A v3 payload (sealed per device), as strictly as :func:`_parse_v2`."""
    _only(payload, _PAYLOAD_FIELDS, "the payload")
    header = _field(payload, "header", dict, "")
    _only(header, _HEADER_FIELDS, "the header")
    chat_id = header.get("chatId")
    if chat_id is not None and not isinstance(chat_id, str) or chat_id == "":
        raise MalformedPayload("header.chatId is neither text nor null")
    recipients = []
    for entry in _field(header, "recipients", list, "header."):
        if not isinstance(entry, dict):
            raise MalformedPayload("a header recipient is not an object {cyphrId, deviceId}")
        _only(entry, _DEVICE_FIELDS, "a header recipient")
        cyphr_id = _field(entry, "cyphrId", str, "header.recipients.")
        if not cyphr_id:
            raise MalformedPayload("header.recipients names an empty Cyphr ID")
        recipients.append((cyphr_id, _device_id(entry.get("deviceId"),
                                                "header.recipients.deviceId")))
    if not recipients or recipients != sorted(set(recipients)):
        raise MalformedPayload("header.recipients is empty, not sorted, or names a device twice")
    sender, message_type, client_message_id = _header_texts(header)
    parsed_header = DeviceMessageHeader(
        payload.get("scheme"), chat_id, sender, message_type, client_message_id,
        tuple(recipients), unb64(header.get("ephemeralKey"), "header.ephemeralKey", 32))
    keys = [DeviceWrappedKey(_field(entry, "recipientId", str, "keys."),
                             _device_id(entry.get("deviceId"), "keys.deviceId"),
                             _field(entry, "oneTime", bool, "keys."), *_wrapped_parts(entry))
            for entry in _key_entries(payload, _DEVICE_KEY_FIELDS)]
    return _parsed(payload, parsed_header, keys)


def _header_texts(header: Mapping[str, Any]) -> tuple[str, str, str]:
    """A header's senderId, messageType and clientMessageId (v2 and v3)."""
    return (_field(header, "senderId", str, "header."),
            _field(header, "messageType", str, "header."),
            _field(header, "clientMessageId", str, "header."))


def _key_entries(payload: Mapping[str, Any], allowed: set[str]) -> list[Mapping[str, Any]]:
    """The payload's wrapped keys, each an object of ``allowed`` fields."""
    entries = _field(payload, "keys", list, "")
    for entry in entries:
        if not isinstance(entry, dict):
            raise MalformedPayload("a wrapped key is not an object")
        _only(entry, allowed, "a wrapped key")
    return entries


def _parsed(payload: Mapping[str, Any], header: Any, keys: list[Any]) -> _Parsed:
    """The parsed payload around its header and keys (v2 and v3)."""
    return _Parsed(header, unb64(payload.get("nonce"), "nonce", NONCE_BYTES),
                   unb64(payload.get("encryptedMessage"), "encryptedMessage"),
                   unb64(payload.get("tag"), "tag", TAG_BYTES), keys,
                   unb64(payload.get("signature"), "signature", signing.ED25519_SIGNATURE_BYTES))


def _wrapped_parts(entry: Mapping[str, Any]) -> tuple[int, bytes, bytes, bytes]:
    """A wrapped key's key id, ML-KEM ciphertext, nonce and wrapped key (v2
    and v3 alike), each checked for its type and size."""
    key_id = entry.get("keyId")
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= MAX_KEY_ID:
        raise MalformedPayload("keys.keyId is not a key id")
    return (key_id,
            unb64(entry.get("kyberCiphertext"), "kyberCiphertext", MLKEM1024_CIPHERTEXT_BYTES),
            unb64(entry.get("nonce"), "keys.nonce", NONCE_BYTES),
            unb64(entry.get("wrappedKey"), "wrappedKey", KEY_BYTES + TAG_BYTES))


def _parse_v2(payload: dict[str, Any]) -> _Parsed:
    """The payload's fields as the structures they encode: every field
    present, of its type and size, and nothing else."""
    _only(payload, _PAYLOAD_FIELDS, "the payload")
    header = _field(payload, "header", dict, "")
    _only(header, _HEADER_FIELDS, "the header")
    chat_id = header.get("chatId")
    if chat_id is not None and not isinstance(chat_id, str) or chat_id == "":
        raise MalformedPayload("header.chatId is neither text nor null")
    recipients = _field(header, "recipients", list, "header.")
    if not recipients or not all(isinstance(r, str) and r for r in recipients):
        raise MalformedPayload("header.recipients is not a list of Cyphr IDs")
    if recipients != sorted(set(recipients)):
        raise MalformedPayload("header.recipients is not sorted, or names someone twice")
    sender, message_type, client_message_id = _header_texts(header)
    parsed_header = MessageHeader(
        payload.get("scheme"), chat_id, sender, message_type, client_message_id,
        tuple(recipients), unb64(header.get("ephemeralKey"), "header.ephemeralKey", 32))
    keys = [WrappedKey(_field(entry, "recipientId", str, "keys."),
                       _field(entry, "oneTime", bool, "keys."), *_wrapped_parts(entry))
            for entry in _key_entries(payload, _KEY_FIELDS)]
    return _parsed(payload, parsed_header, keys)


def _check_delivery(header: Mapping[str, Any], recipients: list[Any], listed: list[Any],
                    reader_id: Any, envelope: Mapping[str, Any],
                    direct_members: frozenset[str] | None,
                    users: list[str] | None = None) -> int:
    """The signature is the sender's: check that the server delivered the
    message where the sender meant it to go. Answers the reader's index.
    ``recipients`` are Cyphr IDs (v1, v2) or (Cyphr ID, device id) pairs
    (v3, whose ``users`` are then the Cyphr IDs among them)."""
    for name in ("senderId", "messageType", "clientMessageId"):
        if envelope.get(name) != header.get(name):
            raise TamperedHeader(f"the header's {name} ({header.get(name)!r}) is not the "
                                 f"message's ({envelope.get(name)!r})")
    if header.get("chatId") is None:
        named = frozenset(recipients if users is None else users)
        if direct_members is None or named != direct_members:
            raise TamperedHeader("a message without a chat id outside the direct chat it names")
    elif header.get("chatId") != envelope.get("chatId"):
        raise TamperedHeader(f"the message was sealed for chat {header.get('chatId')!r}, "
                             f"not {envelope.get('chatId')!r}")
    if listed != recipients:
        raise TamperedHeader("the wrapped keys do not match the header's recipients")
    if reader_id not in recipients:
        if isinstance(reader_id, tuple):
            raise NotARecipient(f"device {reader_id[1]} of {reader_id[0]} is not a recipient of "
                                f"this message (sealed before the device was linked, or for "
                                f"its other devices only)")
        raise NotARecipient(f"{reader_id} is not a recipient of this message")
    return recipients.index(reader_id)


def open_sealed(payload: Any, *, reader: Identity, reader_id: str, sender_key: bytes,
                envelope: Mapping[str, Any], prekeys: Mapping[int, bytes] | None = None,
                direct_members: frozenset[str] | None = None,
                content_key: bytes | None = None, reader_device: int | None = None,
                device_keys: Mapping[int, bytes] | None = None) -> Opened:
    """Verify and decrypt a payload made by :func:`seal`.

    ``sender_key`` is the identity key the reader holds for the sender (as
    pinned); ``envelope`` is what the server says of the message (its
    ``chatId``, ``senderId``, ``messageType``, ``clientMessageId``);
    ``prekeys`` maps one-time prekey ids to their seeds; ``direct_members``
    names the two members when the chat is a direct chat (a header without
    a chat id is accepted only for those). ``content_key``, kept from an
    earlier opening, opens a message whose one-time prekey is gone.

    A version 3 payload (sealed per device) opens with the wrapped key of
    the reader's device ``reader_device``: its one-time ``prekeys``, or its
    own key, which is ``device_keys`` (key id to ML-KEM seed: a linked
    device's keys) or, without them, the identity's main keys (device 1 and
    recovered devices).

    A version 1 payload is checked as v1 did and opened, with
    ``verified`` False (see :data:`V1_UNVERIFIED`).
    """
    if not isinstance(payload, dict):
        raise MalformedPayload("the payload is not a JSON object")
    version, scheme = payload.get("version"), payload.get("scheme")
    if type(version) is int and version == V1_VERSION and scheme == V1_SCHEME:
        return _open_v1(payload, reader=reader, reader_id=reader_id, sender_key=sender_key,
                        envelope=envelope, prekeys=prekeys or {}, direct_members=direct_members,
                        content_key=content_key)
    if type(version) is int and version == DEVICE_VERSION and scheme == DEVICE_SCHEME:
        if reader_device is None:
            raise CryptoError("a message sealed per device opens only on a device that knows "
                              "its device id")
        return _open_v3(payload, reader=reader, reader_id=reader_id,
                        reader_device=reader_device, sender_key=sender_key, envelope=envelope,
                        prekeys=prekeys or {}, device_keys=device_keys,
                        direct_members=direct_members, content_key=content_key)
    if type(version) is not int or version != VERSION or scheme != SCHEME:
        raise MalformedPayload(f"unknown payload version or scheme: {version!r} {scheme!r}")
    parsed = _parse_v2(payload)
    content = signing.message_content(parsed.header, parsed.nonce, parsed.ciphertext, parsed.tag,
                                      parsed.keys)
    if not signing.verify_with_label(sender_key, signing.MESSAGE, content, parsed.signature):
        raise BadSignature("the signature does not match the sender's identity key")

    header = payload["header"]
    index = _check_delivery(header, list(parsed.header.recipients),
                            [k.recipient_id for k in parsed.keys], reader_id, envelope,
                            direct_members)
    entry = parsed.keys[index]
    aad = parsed.header.aad()
    if content_key is None:
        if entry.one_time:
            seed = (prekeys or {}).get(entry.key_id)
            if seed is None:
                raise UnknownPrekey(f"one-time prekey {entry.key_id} is not held here "
                                    f"(already used?)")
            kem_key = MLKEM1024PrivateKey.from_seed_bytes(seed)
        elif entry.key_id <= reader.generation:
            kem_key = reader.kem_key_of(entry.key_id)
        else:
            raise UnknownPrekey(f"sealed to main key {entry.key_id}, newer than this "
                                f"device's ({reader.generation})")
        content_key = _unwrap(kem_key, reader, reader_id, aad, parsed.header.ephemeral_key,
                              entry.kyber_ciphertext, entry.nonce, entry.wrapped_key)
    padded = _aead_decrypt(content_key, parsed.nonce, parsed.ciphertext + parsed.tag, aad)
    if padded is None:
        raise TamperedMessage("the message does not decrypt: its ciphertext or header was altered")
    return Opened(unpad(padded), header, entry.key_id if entry.one_time else None, content_key)


def _unwrap(kem_key: MLKEM1024PrivateKey, reader: Identity, reader_id: str, aad: bytes,
            ephemeral: bytes, kyber_ciphertext: bytes, nonce: bytes, wrapped: bytes) -> bytes:
    try:
        kem_secret = kem_key.decapsulate(kyber_ciphertext)
    except (ValueError, InvalidKey):
        raise TamperedMessage("the ML-KEM ciphertext cannot be decapsulated") from None
    wrap = _wrap_key(kem_secret, reader.x25519_exchange(ephemeral), aad, reader_id,
                     kyber_ciphertext, ephemeral, identity_x25519(reader.public_key))
    content_key = _aead_decrypt(wrap, nonce, wrapped, _wrap_aad(aad, reader_id))
    if content_key is None:
        raise TamperedMessage("the wrapped content key does not open with the key it names")
    return content_key


def _open_device_entry(entry: DeviceWrappedKey, reader: Identity, reader_id: str, aad: bytes,
                       ephemeral: bytes, prekeys: Mapping[int, bytes],
                       device_keys: Mapping[int, bytes] | None) -> bytes | None:
    """The content key of one v3 wrapped key of ``reader_id``'s (None when it
    does not open): with the prekey or key it names, of this device."""
    if entry.one_time:
        seed = prekeys.get(entry.key_id)
        if seed is None:
            raise UnknownPrekey(f"one-time prekey {entry.key_id} is not held here "
                                f"(already used?)")
        kem_key = MLKEM1024PrivateKey.from_seed_bytes(seed)
    elif device_keys is not None:
        seed = device_keys.get(entry.key_id)
        if seed is None:
            raise UnknownPrekey(f"sealed to this device's key {entry.key_id}, not held here")
        kem_key = MLKEM1024PrivateKey.from_seed_bytes(seed)
    elif entry.key_id <= reader.generation:
        kem_key = reader.kem_key_of(entry.key_id)
    else:
        raise UnknownPrekey(f"sealed to main key {entry.key_id}, newer than this "
                            f"device's ({reader.generation})")
    try:
        kem_secret = kem_key.decapsulate(entry.kyber_ciphertext)
    except (ValueError, InvalidKey):
        raise TamperedMessage("the ML-KEM ciphertext cannot be decapsulated") from None
    wrap = _device_wrap_key(kem_secret, reader.x25519_exchange(ephemeral), aad, reader_id,
                            entry.device_id, entry.kyber_ciphertext, ephemeral,
                            identity_x25519(reader.public_key))
    return _aead_decrypt(wrap, entry.nonce, entry.wrapped_key,
                         _device_wrap_aad(aad, reader_id, entry.device_id))


def _open_v3(payload: dict[str, Any], *, reader: Identity, reader_id: str, reader_device: int,
             sender_key: bytes, envelope: Mapping[str, Any], prekeys: Mapping[int, bytes],
             device_keys: Mapping[int, bytes] | None, direct_members: frozenset[str] | None,
             content_key: bytes | None) -> Opened:
    parsed = _parse_v3(payload)
    content = signing.message_content(parsed.header, parsed.nonce, parsed.ciphertext, parsed.tag,
                                      parsed.keys)
    if not signing.verify_with_label(sender_key, signing.MESSAGE, content, parsed.signature):
        raise BadSignature("the signature does not match the sender's identity key")
    recipients = list(parsed.header.recipients)
    me = (reader_id, reader_device)
    # Not addressed to this device, an entry of its identity sealed to the
    # identity's main key still opens here: every device holding the seed
    # derives that key (device 1's own history, read after a recovery).
    mine = [i for i, k in enumerate(parsed.keys) if k.recipient_id == reader_id
            and not k.one_time and k.key_id <= reader.generation]
    addressed = me in recipients
    index = _check_delivery(payload["header"], recipients,
                            [(k.recipient_id, k.device_id) for k in parsed.keys],
                            me if addressed or not mine else recipients[mine[0]], envelope,
                            direct_members, users=[c for c, _ in recipients])
    candidates = [index] if addressed else mine
    entry = parsed.keys[candidates[0]]
    aad = parsed.header.aad()
    if content_key is None:
        for at in candidates:
            entry = parsed.keys[at]
            content_key = _open_device_entry(entry, reader, reader_id, aad,
                                             parsed.header.ephemeral_key, prekeys,
                                             device_keys if addressed else None)
            if content_key is not None:
                break
        else:
            if addressed:
                raise TamperedMessage("the wrapped content key does not open with the key it "
                                      "names")
            raise NotARecipient(f"device {reader_device} of {reader_id} is not a recipient of "
                                f"this message (sealed before the device was linked, or for "
                                f"its other devices only)")
    padded = _aead_decrypt(content_key, parsed.nonce, parsed.ciphertext + parsed.tag, aad)
    if padded is None:
        raise TamperedMessage("the message does not decrypt: its ciphertext or header was altered")
    return Opened(unpad(padded), payload["header"], entry.key_id if entry.one_time else None,
                  content_key, DEVICE_VERSION)


# -- version 1 (read only) ----------------------------------------------------

def _open_v1(payload: dict[str, Any], *, reader: Identity, reader_id: str, sender_key: bytes,
             envelope: Mapping[str, Any], prekeys: Mapping[int, bytes],
             direct_members: frozenset[str] | None, content_key: bytes | None) -> Opened:
    """A v1 payload, checked as v1 checked it (JSON signature, delivery,
    wrapped key, content), opened but never reported verified."""
    header = _field(payload, "header", dict, "")
    signature = unb64(payload.get("signature"), "signature", 64)
    unsigned = {k: v for k, v in payload.items() if k != "signature"}
    try:
        signed = _v1_canonical(unsigned)
    except (TypeError, ValueError):
        raise MalformedPayload("the payload holds values JSON cannot sign") from None
    try:
        VerifyKey(sender_key).verify(_V1_SIGNATURE_CONTEXT + signed, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise BadSignature("the signature does not match the sender's identity key") from None
    recipients = _field(header, "recipients", list, "header.")
    keys = _field(payload, "keys", list, "")
    listed = [k.get("recipientId") if isinstance(k, dict) else None for k in keys]
    entry = keys[_check_delivery(header, recipients, listed, reader_id, envelope,
                                 direct_members)]
    aad = _V1_HEADER_CONTEXT + _v1_canonical(header)
    key_id = entry.get("keyId")
    if key_id is not None and (not isinstance(key_id, int) or isinstance(key_id, bool)):
        raise MalformedPayload("keyId is neither a number nor null")
    if content_key is None:
        ephemeral = unb64(header.get("ephemeralKey"), "header.ephemeralKey", 32)
        kyber_ciphertext = unb64(entry.get("kyberCiphertext"), "kyberCiphertext",
                                 MLKEM1024_CIPHERTEXT_BYTES)
        nonce = unb64(entry.get("nonce"), "keys.nonce", NONCE_BYTES)
        wrapped = unb64(entry.get("wrappedKey"), "wrappedKey", KEY_BYTES + TAG_BYTES)
        if key_id is None:
            candidates = reader.kem_keys()  # v1 named no generation
        else:
            seed = prekeys.get(key_id)
            if seed is None:
                raise UnknownPrekey(f"one-time prekey {key_id} is not held here (already used?)")
            candidates = [MLKEM1024PrivateKey.from_seed_bytes(seed)]
        dh_secret = reader.x25519_exchange(ephemeral)
        my_x25519 = identity_x25519(reader.public_key)
        for kem_key in candidates:
            try:
                kem_secret = kem_key.decapsulate(kyber_ciphertext)
            except (ValueError, InvalidKey):
                raise TamperedMessage("the ML-KEM ciphertext cannot be decapsulated") from None
            wrap = _wrap_key(kem_secret, dh_secret, aad, reader_id, kyber_ciphertext, ephemeral,
                             my_x25519)
            content_key = _aead_decrypt(wrap, nonce, wrapped, aad + reader_id.encode("utf-8"))
            if content_key is not None:
                break
        else:
            raise TamperedMessage("the wrapped content key does not open with this reader's keys")
    padded = _aead_decrypt(
        content_key, unb64(payload.get("nonce"), "nonce", NONCE_BYTES),
        unb64(payload.get("encryptedMessage"), "encryptedMessage")
        + unb64(payload.get("tag"), "tag", TAG_BYTES), aad)
    if padded is None:
        raise TamperedMessage("the message does not decrypt: its ciphertext or header was altered")
    return Opened(unpad(padded), header, key_id, content_key, V1_VERSION, verified=False)
