"""
The end-to-end scheme of Cyphr's clients (version 1).

Everything here runs on the client; the server sees only what
:func:`seal` returns, and stores it as an opaque JSON object.

Identity
    A 24-word BIP-39 recovery phrase gives a 64-byte seed (BIP-39's own
    PBKDF2 step, empty passphrase). HKDF-SHA256 expands that seed into the
    Ed25519 identity key's 32-byte seed and the ML-KEM-1024 key pair's
    64-byte seed (FIPS 203 ``d || z``): the phrase alone re-creates both on
    a new device. The identity key signs the ML-KEM key (``cyphr-kyber-key:``
    followed by the raw key), the one-time prekeys likewise, and every
    message.

A message, for every recipient including the sender itself
    1. The plaintext is padded to a size bucket (256 B, 1 KiB, 4 KiB,
       16 KiB, then multiples of 64 KiB) so that its length leaks little.
    2. A fresh 32-byte content key encrypts it with XChaCha20-Poly1305;
       the header (chat, sender, type, client message id, recipients, the
       ephemeral X25519 key) is the associated data.
    3. For each recipient the content key is wrapped with a key derived by
       HKDF-SHA256 from two secrets: an ML-KEM-1024 encapsulation to the
       recipient's one-time prekey (or its main key when none could be
       claimed), and an X25519 exchange between the message's ephemeral key
       and the recipient's identity key converted to X25519. Breaking
       either primitive alone does not recover the wrapping key (the hybrid
       of Signal's PQXDH).
    4. The sender signs the whole payload with its Ed25519 identity key.

Opening a message checks, in order: the shape, the signature (against the
sender's identity key as the reader pinned it), the header against what the
server says of the message (sender, chat, type, client message id), that
the reader is a recipient, the wrapped key, then the content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

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

from cyphr.crypto import KYBER_KEY_CONTEXT, MLKEM1024_KEY_BYTES

VERSION = 1
SCHEME = "cyphr-hybrid-v1"  # ML-KEM-1024 + X25519, HKDF-SHA256, XChaCha20-Poly1305, Ed25519
PHRASE_WORDS = 24

_HEADER_CONTEXT = b"cyphr-message-header-v1\x00"
_SIGNATURE_CONTEXT = b"cyphr-message-signature-v1\x00"
_WRAP_INFO = b"cyphr-message-wrap-v1\x00"
_ED25519_INFO = b"cyphr-identity-ed25519-v1"
_MLKEM_INFO = b"cyphr-identity-ml-kem-1024-v1"
_SAFETY_CONTEXT = b"cyphr-safety-number-v1\x00"

KEY_BYTES = 32
NONCE_BYTES = 24
TAG_BYTES = 16
MLKEM1024_CIPHERTEXT_BYTES = 1568
_BUCKETS = (256, 1024, 4096, 16384)
_LARGE_BUCKET = 65536


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


def canonical(value: Any) -> bytes:
    """The one byte string a JSON value signs as: sorted keys, no spaces,
    ASCII only. The server stores and forwards the payload as a JSON
    object, so the reader re-creates exactly these bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _hkdf(ikm: bytes, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


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


def kyber_key_signature(signing_key: SigningKey, kyber_public_key: bytes) -> bytes:
    return signing_key.sign(KYBER_KEY_CONTEXT + kyber_public_key).signature


def verify_kyber_key(identity_key: bytes, kyber_public_key: bytes, signature: bytes) -> bool:
    if len(kyber_public_key) != MLKEM1024_KEY_BYTES:
        return False
    try:
        VerifyKey(identity_key).verify(KYBER_KEY_CONTEXT + kyber_public_key, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


class Identity:
    """The secret keys of one Cyphr ID, all from one 64-byte seed."""

    def __init__(self, seed: bytes, generation: int = 0) -> None:
        if len(seed) != 64:
            raise CryptoError("an identity seed is 64 bytes")
        if generation < 0:
            raise CryptoError("a key generation is not negative")
        self.seed = seed
        self.generation = generation
        self.signing_key = SigningKey(_hkdf(seed, 32, _ED25519_INFO))
        self.kem_key = self.kem_key_of(generation)
        self.public_key = bytes(self.signing_key.verify_key)
        self.kyber_public_key = self.kem_key.public_key().public_bytes_raw()
        self.kyber_key_signature = kyber_key_signature(self.signing_key, self.kyber_public_key)
        self._x25519 = X25519PrivateKey.from_private_bytes(
            bytes(self.signing_key.to_curve25519_private_key()))

    def kem_key_of(self, generation: int) -> MLKEM1024PrivateKey:
        """The main ML-KEM key of a generation: rotating the key moves to the
        next one, and every earlier one can be derived again from the seed
        (so that older messages still open)."""
        return MLKEM1024PrivateKey.from_seed_bytes(
            _hkdf(self.seed, 64, _MLKEM_INFO + generation.to_bytes(4, "big")))

    def kem_keys(self) -> list[MLKEM1024PrivateKey]:
        """The current generation's key first, then the earlier ones."""
        return [self.kem_key] + [self.kem_key_of(g) for g in range(self.generation - 1, -1, -1)]

    @classmethod
    def from_phrase(cls, phrase: str, generation: int = 0) -> Identity:
        return cls(phrase_seed(phrase), generation)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

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

    def upload_form(self, identity: Identity) -> dict[str, Any]:
        public = self.private_key.public_key().public_bytes_raw()
        return {"keyId": self.key_id, "kyberPublicKey": b64(public),
                "signature": b64(kyber_key_signature(identity.signing_key, public))}


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
    the ML-KEM key to encapsulate to (a claimed one-time prekey, ``key_id``
    set, or the main key, ``key_id`` None), already checked against it."""

    cyphr_id: str
    identity_key: bytes
    kyber_public_key: bytes
    key_id: int | None = None


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


def seal(sender: Identity, sender_id: str, recipients: list[Recipient], plaintext: bytes, *,
         chat_id: str | None, message_type: str, client_message_id: str) -> dict[str, Any]:
    """The encryptedPayload of one message. ``chat_id`` is None only for the
    first message of a direct chat (the server creates the chat on it): the
    header's two recipients then name the chat."""
    ids = [r.cyphr_id for r in recipients]
    if len(set(ids)) != len(ids):
        raise CryptoError("a recipient is listed twice")
    if sender_id not in ids:
        raise CryptoError("the sender must be one of the recipients (to read its own history)")
    recipients = sorted(recipients, key=lambda r: r.cyphr_id)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    header = {
        "chatId": chat_id,
        "senderId": sender_id,
        "messageType": message_type,
        "clientMessageId": client_message_id,
        "recipients": [r.cyphr_id for r in recipients],
        "ephemeralKey": b64(ephemeral_public),
    }
    aad = _HEADER_CONTEXT + canonical(header)
    content_key = os.urandom(KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    sealed = _aead_encrypt(content_key, nonce, pad(plaintext), aad)
    keys = []
    for r in recipients:
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
        keys.append({
            "recipientId": r.cyphr_id,
            "keyId": r.key_id,
            "kyberCiphertext": b64(kyber_ciphertext),
            "nonce": b64(wrap_nonce),
            "wrappedKey": b64(_aead_encrypt(wrap, wrap_nonce, content_key,
                                            aad + r.cyphr_id.encode("utf-8"))),
        })
    payload: dict[str, Any] = {
        "version": VERSION,
        "scheme": SCHEME,
        "header": header,
        "nonce": b64(nonce),
        "encryptedMessage": b64(sealed[:-TAG_BYTES]),
        "tag": b64(sealed[-TAG_BYTES:]),
        "keys": keys,
    }
    payload["signature"] = b64(sender.sign(_SIGNATURE_CONTEXT + canonical(payload)))
    return payload


@dataclass(frozen=True)
class Opened:
    plaintext: bytes
    header: dict[str, Any]
    key_id: int | None  # the one-time prekey it was sealed to, or None for the main key
    content_key: bytes  # to open it again once that prekey is erased


def _field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise MalformedPayload(f"{where}{name} is missing or of the wrong type")
    return value


def payload_sender(payload: Any) -> str:
    """Who the payload says sent it (to look up the key to verify with)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("header"), dict):
        raise MalformedPayload("not a Cyphr message payload")
    return _field(payload["header"], "senderId", str, "header.")


def open_sealed(payload: Any, *, reader: Identity, reader_id: str, sender_key: bytes,
                envelope: Mapping[str, Any], prekeys: Mapping[int, bytes] | None = None,
                direct_members: frozenset[str] | None = None,
                content_key: bytes | None = None) -> Opened:
    """Verify and decrypt a payload made by :func:`seal`.

    ``sender_key`` is the identity key the reader holds for the sender (as
    pinned); ``envelope`` is what the server says of the message (its
    ``chatId``, ``senderId``, ``messageType``, ``clientMessageId``);
    ``prekeys`` maps one-time prekey ids to their seeds; ``direct_members``
    names the two members when the chat is a direct chat (a header without
    a chat id is accepted only for those). ``content_key``, kept from an
    earlier opening, opens a message whose one-time prekey is gone.
    """
    if not isinstance(payload, dict):
        raise MalformedPayload("the payload is not a JSON object")
    if payload.get("version") != VERSION or payload.get("scheme") != SCHEME:
        raise MalformedPayload(f"unknown payload version or scheme: "
                               f"{payload.get('version')!r} {payload.get('scheme')!r}")
    header = _field(payload, "header", dict, "")
    signature = unb64(payload.get("signature"), "signature", 64)
    unsigned = {k: v for k, v in payload.items() if k != "signature"}
    try:
        signed = canonical(unsigned)
    except (TypeError, ValueError):
        raise MalformedPayload("the payload holds values JSON cannot sign") from None
    try:
        VerifyKey(sender_key).verify(_SIGNATURE_CONTEXT + signed, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise BadSignature("the signature does not match the sender's identity key") from None

    # The signature is the sender's: now check that the server delivered it
    # where the sender meant it to go.
    for name in ("senderId", "messageType", "clientMessageId"):
        if envelope.get(name) != header.get(name):
            raise TamperedHeader(f"the header's {name} ({header.get(name)!r}) is not the "
                                 f"message's ({envelope.get(name)!r})")
    recipients = _field(header, "recipients", list, "header.")
    if header.get("chatId") is None:
        if direct_members is None or frozenset(recipients) != direct_members:
            raise TamperedHeader("a message without a chat id outside the direct chat it names")
    elif header.get("chatId") != envelope.get("chatId"):
        raise TamperedHeader(f"the message was sealed for chat {header.get('chatId')!r}, "
                             f"not {envelope.get('chatId')!r}")
    keys = _field(payload, "keys", list, "")
    listed = [k.get("recipientId") if isinstance(k, dict) else None for k in keys]
    if listed != recipients:
        raise TamperedHeader("the wrapped keys do not match the header's recipients")
    if reader_id not in recipients:
        raise NotARecipient(f"{reader_id} is not a recipient of this message")
    entry = keys[recipients.index(reader_id)]

    aad = _HEADER_CONTEXT + canonical(header)
    key_id = entry.get("keyId")
    if key_id is not None and (not isinstance(key_id, int) or isinstance(key_id, bool)):
        raise MalformedPayload("keyId is neither a number nor null")
    if content_key is None:
        content_key = _unwrap(entry, aad, reader, reader_id, header, key_id, prekeys or {})
    padded = _aead_decrypt(
        content_key, unb64(payload.get("nonce"), "nonce", NONCE_BYTES),
        unb64(payload.get("encryptedMessage"), "encryptedMessage")
        + unb64(payload.get("tag"), "tag", TAG_BYTES),
        aad)
    if padded is None:
        raise TamperedMessage("the message does not decrypt: its ciphertext or header was altered")
    return Opened(unpad(padded), header, key_id, content_key)


def _unwrap(entry: Mapping[str, Any], aad: bytes, reader: Identity, reader_id: str,
            header: Mapping[str, Any], key_id: int | None, prekeys: Mapping[int, bytes]) -> bytes:
    ephemeral = unb64(header.get("ephemeralKey"), "header.ephemeralKey", 32)
    kyber_ciphertext = unb64(entry.get("kyberCiphertext"), "kyberCiphertext",
                             MLKEM1024_CIPHERTEXT_BYTES)
    nonce = unb64(entry.get("nonce"), "keys.nonce", NONCE_BYTES)
    wrapped = unb64(entry.get("wrappedKey"), "wrappedKey", KEY_BYTES + TAG_BYTES)
    if key_id is None:
        candidates = reader.kem_keys()
    else:
        seed = prekeys.get(key_id)
        if seed is None:
            raise UnknownPrekey(f"one-time prekey {key_id} is not held here (already used?)")
        candidates = [MLKEM1024PrivateKey.from_seed_bytes(seed)]
    my_x25519 = identity_x25519(reader.public_key)
    dh_secret = reader.x25519_exchange(ephemeral)
    for kem_key in candidates:
        try:
            kem_secret = kem_key.decapsulate(kyber_ciphertext)
        except (ValueError, InvalidKey):
            raise TamperedMessage("the ML-KEM ciphertext cannot be decapsulated") from None
        wrap = _wrap_key(kem_secret, dh_secret, aad, reader_id, kyber_ciphertext, ephemeral,
                         my_x25519)
        content_key = _aead_decrypt(wrap, nonce, wrapped, aad + reader_id.encode("utf-8"))
        if content_key is not None:
            return content_key
    raise TamperedMessage("the wrapped content key does not open with this reader's keys")
