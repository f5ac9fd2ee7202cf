"""
Labelled signatures (version 2): the one way a Cyphr client signs anything,
and the one way the server checks what it can check.

Every signature is Ed25519 over ``SignContent(label, content)``::

    SignContent = opaque label<V>      "cyphr-v2 " + the kind's name
                  opaque content<V>    the kind's structure, below

``opaque x<V>`` is a 4-byte big-endian length followed by that many bytes;
``uint64`` is 8 bytes big-endian; text is UTF-8. Every field of every
structure is length-prefixed or of fixed width, so an encoding is read in
exactly one way, and one kind's signature can never be taken for another's
(the label differs, and the label comes first). This is MLS's
``SignWithLabel`` (RFC 9420, section 5.1.2) with our own prefix.

The kinds and their labels (docs/encryption.rst specifies each structure
byte for byte; tests/vectors/ holds test vectors every implementation must
reproduce):

============================  ===========================================
label                         what is signed
============================  ===========================================
``cyphr-v2 auth``             a login statement the client builds itself
``cyphr-v2 ml-kem-key``       a main ML-KEM-1024 key, bound to its owner
``cyphr-v2 one-time-prekey``  a one-time ML-KEM-1024 prekey, likewise
``cyphr-v2 device-key``       a device's own ML-KEM-1024 key, bound to its
                              owner and to the device's id
``cyphr-v2 message``          a sealed message (header, ciphertext, keys)
``cyphr-v2 wallet-link``      a Stellar account link (SEP-53 text, below)
``cyphr-v2 identity-dh``      the identity's X25519 key for sessions, bound
                              to its owner (cyphr.client.sessions)
``cyphr-v2 dh-prekey``        a device's signed or one-time X25519 prekey
``cyphr-v2 kem-prekey``       a device's last-resort or one-time
                              ML-KEM-1024 prekey for sessions
``cyphr-v2 roster-change``    a change of a group's roster, signed by an
                              admin of the state it changes (cyphr.rosters)
============================  ===========================================

The Stellar key cannot use this framing (wallets sign SEP-53 messages
only), so a wallet link is a SEP-53 signed message: Ed25519 over
``SHA-256("Stellar Signed Message:\\n" || text)``, where the text is
built by :func:`wallet_link_text` and starts with its label on a line of
its own. A SEP-53 signature can never be a transaction signature.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

PREFIX = "cyphr-v2 "
AUTH = "auth"
MLKEM_KEY = "ml-kem-key"
ONE_TIME_PREKEY = "one-time-prekey"
MESSAGE = "message"
WALLET_LINK = "wallet-link"
DEVICE_KEY = "device-key"
IDENTITY_DH = "identity-dh"
DH_PREKEY = "dh-prekey"
KEM_PREKEY = "kem-prekey"
ROSTER = "roster-change"
LABELS = (AUTH, MLKEM_KEY, ONE_TIME_PREKEY, MESSAGE, WALLET_LINK, DEVICE_KEY, IDENTITY_DH,
          DH_PREKEY, KEM_PREKEY, ROSTER)

# Purposes of a login statement.
REGISTER = "register"
LOGIN = "login"
RECOVER = "recover"
DELETE = "delete"
PURPOSES = (REGISTER, LOGIN, RECOVER, DELETE)

KEY_ALGORITHM = "ml-kem-1024"
CHALLENGE_BYTES = 32
DEVICE_HASH_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
_U32 = 2**32
_U64 = 2**64


class EncodingError(ValueError):
    """Bytes that are not the structure they claim to be."""


# -- the encoding -------------------------------------------------------------

def opaque(value: bytes) -> bytes:
    if len(value) >= _U32:
        raise EncodingError("a field is longer than 2^32 - 1 bytes")
    return len(value).to_bytes(4, "big") + value


def text(value: str) -> bytes:
    return opaque(value.encode("utf-8"))


def uint64(value: int) -> bytes:
    if not 0 <= value < _U64:
        raise EncodingError(f"{value} does not fit in a uint64")
    return value.to_bytes(8, "big")


def uint8(value: int) -> bytes:
    if not 0 <= value < 256:
        raise EncodingError(f"{value} does not fit in a uint8")
    return bytes([value])


def vector(items: Iterable[bytes]) -> bytes:
    """A counted list: uint32 count, then each item as encoded."""
    items = list(items)
    return len(items).to_bytes(4, "big") + b"".join(items)


class Reader:
    """Reads an encoding strictly: every read must fit, nothing may be left."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def _take(self, n: int) -> bytes:
        if self._at + n > len(self._data):
            raise EncodingError("the structure ends early")
        value = self._data[self._at:self._at + n]
        self._at += n
        return value

    def opaque(self, max_length: int = 65536) -> bytes:
        length = int.from_bytes(self._take(4), "big")
        if length > max_length:
            raise EncodingError(f"a field of {length} bytes is longer than {max_length}")
        return self._take(length)

    def text(self, max_length: int = 1024) -> str:
        try:
            return self.opaque(max_length).decode("utf-8")
        except UnicodeDecodeError:
            raise EncodingError("a text field is not UTF-8") from None

    def uint64(self) -> int:
        return int.from_bytes(self._take(8), "big")

    def uint8(self) -> int:
        return self._take(1)[0]

    def end(self) -> None:
        if self._at != len(self._data):
            raise EncodingError(f"{len(self._data) - self._at} bytes follow the structure")


def sign_content(label: str, content: bytes) -> bytes:
    """The bytes an Ed25519 key signs for ``content`` of kind ``label``."""
    if label not in LABELS:
        raise ValueError(f"unknown signature label {label!r}")
    return text(PREFIX + label) + opaque(content)


def sign_with_label(key: SigningKey, label: str, content: bytes) -> bytes:
    return key.sign(sign_content(label, content)).signature


def verify_with_label(public_key: bytes, label: str, content: bytes, signature: bytes) -> bool:
    if len(public_key) != 32 or len(signature) != ED25519_SIGNATURE_BYTES:
        return False
    try:
        VerifyKey(public_key).verify(sign_content(label, content), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


# -- origins ------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(url: str) -> str:
    """A server's origin as it is signed: ``scheme://host[:port]``, the
    scheme and host in lower case, IPv6 hosts in brackets, the port only
    when it is not the scheme's default, no path. ValueError for anything
    that is not an http(s) URL with a host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"not a URL: {url!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL with a host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"a server URL holds no user name or password: {url!r}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def is_loopback_origin(origin: str) -> bool:
    host = urlsplit(origin).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- login statements ---------------------------------------------------------

def device_hash(fingerprint: str) -> bytes:
    """What a statement names a device by: SHA-256 of its fingerprint (the
    64 hex characters, as ASCII)."""
    return hashlib.sha256(fingerprint.encode("ascii")).digest()


@dataclass(frozen=True)
class AuthStatement:
    """What a client signs to register, log in, recover or delete: built by
    the client from its own knowledge, never from bytes the server chose
    (except the 32-byte challenge, which sits in its own field)."""

    purpose: str
    origin: str
    cyphr_id: str
    device: bytes  # device_hash() of the fingerprint (the new one, for recovery)
    challenge_id: str
    challenge: bytes

    def encode(self) -> bytes:
        if self.purpose not in PURPOSES:
            raise EncodingError(f"unknown purpose {self.purpose!r}")
        if len(self.device) != DEVICE_HASH_BYTES or len(self.challenge) != CHALLENGE_BYTES:
            raise EncodingError("a device hash and a challenge are 32 bytes each")
        return (text(self.purpose) + text(self.origin) + text(self.cyphr_id)
                + opaque(self.device) + text(self.challenge_id) + opaque(self.challenge))

    @classmethod
    def decode(cls, data: bytes) -> AuthStatement:
        reader = Reader(data)
        statement = cls(reader.text(16), reader.text(512), reader.text(64),
                        reader.opaque(DEVICE_HASH_BYTES), reader.text(64),
                        reader.opaque(CHALLENGE_BYTES))
        reader.end()
        if statement.purpose not in PURPOSES:
            raise EncodingError(f"unknown purpose {statement.purpose!r}")
        if len(statement.device) != DEVICE_HASH_BYTES:
            raise EncodingError("the device hash is not 32 bytes")
        if len(statement.challenge) != CHALLENGE_BYTES:
            raise EncodingError("the challenge is not 32 bytes")
        return statement

    def sign(self, key: SigningKey) -> bytes:
        return sign_with_label(key, AUTH, self.encode())


# -- key signatures -----------------------------------------------------------

@dataclass(frozen=True)
class KeyBinding:
    """What a key signature binds a public key to: its kind (the label:
    main key or one-time prekey), its owner, its id, and its validity."""

    one_time: bool
    owner: str  # the owner's Cyphr ID
    key_id: int
    created_at: int  # ms since the epoch, as the owner's client says
    expires_at: int  # ms since the epoch: refused from then on
    public_key: bytes

    @property
    def label(self) -> str:
        return ONE_TIME_PREKEY if self.one_time else MLKEM_KEY

    def encode(self) -> bytes:
        return (text(KEY_ALGORITHM) + text(self.owner) + uint64(self.key_id)
                + uint64(self.created_at) + uint64(self.expires_at) + opaque(self.public_key))

    def sign(self, key: SigningKey) -> bytes:
        return sign_with_label(key, self.label, self.encode())

    def verify(self, identity_key: bytes, signature: bytes) -> bool:
        try:
            content = self.encode()
        except EncodingError:
            return False
        return verify_with_label(identity_key, self.label, content, signature)


@dataclass(frozen=True)
class DeviceKeyBinding:
    """What a device key's signature binds a device's own ML-KEM key to:
    its owner, the device's id within that identity, the key's generation
    and its validity. Signed by the identity key, so a server can neither
    invent a device nor move one device's key to another device id."""

    owner: str  # the owner's Cyphr ID
    device_id: int  # 1, 2, ... within the identity; never reused
    key_id: int  # the device key's generation: a rotated key has a higher one
    created_at: int  # ms since the epoch, as the owner's client says
    expires_at: int  # ms since the epoch: refused from then on
    public_key: bytes

    @property
    def label(self) -> str:
        return DEVICE_KEY

    def encode(self) -> bytes:
        # Device ids start at 1; a 0 would be a key of no device at all.
        if self.device_id < 1:
            raise EncodingError(f"device id {self.device_id} is not 1 or more")
        return (text(KEY_ALGORITHM) + text(self.owner) + uint64(self.device_id)
                + uint64(self.key_id) + uint64(self.created_at) + uint64(self.expires_at)
                + opaque(self.public_key))

    def sign(self, key: SigningKey) -> bytes:
        return sign_with_label(key, DEVICE_KEY, self.encode())

    def verify(self, identity_key: bytes, signature: bytes) -> bool:
        try:
            content = self.encode()
        except EncodingError:
            return False
        return verify_with_label(identity_key, DEVICE_KEY, content, signature)


# -- session keys (cyphr.client.sessions) ---------------------------------------

# The kinds of a device's session prekey: the kind byte is signed, and the
# X25519 and ML-KEM kinds are signed under different labels.
DH_SIGNED_PREKEY, DH_ONE_TIME_PREKEY, KEM_LAST_RESORT_PREKEY, KEM_ONE_TIME_PREKEY = 1, 2, 3, 4
PREKEY_KINDS = {DH_SIGNED_PREKEY: (DH_PREKEY, 32), DH_ONE_TIME_PREKEY: (DH_PREKEY, 32),
                KEM_LAST_RESORT_PREKEY: (KEM_PREKEY, 1568), KEM_ONE_TIME_PREKEY: (KEM_PREKEY, 1568)}


def identity_dh_content(owner: str, public_key: bytes) -> bytes:
    """What the identity key signs (label ``identity-dh``) to certify the
    identity's X25519 key for sessions: ``text(owner) || opaque(key)``."""
    return text(owner) + opaque(public_key)


@dataclass(frozen=True)
class SessionPrekeyBinding:
    """What a session prekey's signature binds the key to: its owner, the
    device, its kind (signed or one-time X25519, last-resort or one-time
    ML-KEM-1024), its id and its validity."""

    kind: int
    owner: str
    device_id: int
    key_id: int
    created_at: int  # ms
    expires_at: int  # ms
    public_key: bytes

    @property
    def label(self) -> str:
        return PREKEY_KINDS[self.kind][0]

    def encode(self) -> bytes:
        """``text(owner) || uint64(device_id) || uint8(kind) || uint64(key_id)
        || uint64(created_at) || uint64(expires_at) || opaque(public_key)``."""
        if self.kind not in PREKEY_KINDS:
            raise EncodingError(f"no prekey kind {self.kind}")
        if self.device_id < 1:
            raise EncodingError(f"device id {self.device_id} is not 1 or more")
        return (text(self.owner) + uint64(self.device_id) + uint8(self.kind)
                + uint64(self.key_id) + uint64(self.created_at) + uint64(self.expires_at)
                + opaque(self.public_key))


# -- wallet links (SEP-53) ----------------------------------------------------

SEP53_PREFIX = b"Stellar Signed Message:\n"


def wallet_link_text(origin: str, cyphr_id: str, stellar_address: str, challenge_id: str,
                     challenge: bytes) -> str:
    """The message a Stellar key signs (SEP-53) to link its account to a
    Cyphr ID: readable in a wallet, one field a line, no field holding a
    line break."""
    fields = (origin, cyphr_id, stellar_address, challenge_id)
    if any("\n" in f or "\r" in f for f in fields):
        raise EncodingError("a wallet link field holds a line break")
    if len(challenge) != CHALLENGE_BYTES:
        raise EncodingError("the challenge is not 32 bytes")
    # Lines joined by "\n", none after the last: wallets' sign-message
    # boxes tend to drop a final line break, which would change the text.
    return "\n".join((
        f"{PREFIX}{WALLET_LINK}",
        "Link this Stellar account to a Cyphr ID. This is not a transaction.",
        f"origin: {origin}",
        f"cyphrId: {cyphr_id}",
        f"stellarAddress: {stellar_address}",
        f"challengeId: {challenge_id}",
        f"challenge: {base64.b64encode(challenge).decode('ascii')}"))


def sep53_digest(message: bytes) -> bytes:
    """What the Ed25519 key of a SEP-53 signature signs."""
    return hashlib.sha256(SEP53_PREFIX + message).digest()


def verify_sep53(account_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the SEP-53 signature of ``message`` by the
    Ed25519 key of a Stellar account (``stellar_account_key``)."""
    if len(account_key) != 32 or len(signature) != ED25519_SIGNATURE_BYTES:
        return False
    try:
        VerifyKey(account_key).verify(sep53_digest(message), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


# A Stellar account ID (StrKey, SEP-23): base32 of a version byte (6 << 3,
# "G..."), the 32-byte Ed25519 public key, and the CRC16-XModem of those 33
# bytes, little-endian: 35 bytes, 56 characters, no padding.
_STRKEY_ACCOUNT_VERSION = 6 << 3
STELLAR_ACCOUNT_LENGTH = 56


def _crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = (crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1
        crc &= 0xFFFF
    return crc


def stellar_account_key(address: object) -> bytes | None:
    """The Ed25519 public key of a Stellar account ID (``G...``), or None
    when ``address`` is not one: another kind of StrKey (a secret seed, a
    muxed account), lower case, a bad checksum, anything else."""
    if not isinstance(address, str) or len(address) != STELLAR_ACCOUNT_LENGTH \
            or not address.isascii():
        return None
    try:
        raw = base64.b32decode(address)  # upper case only, no padding needed
    except ValueError:  # binascii.Error
        return None
    body, checksum = raw[:33], raw[33:]
    if body[0] != _STRKEY_ACCOUNT_VERSION \
            or checksum != _crc16_xmodem(body).to_bytes(2, "little"):
        return None
    return body[1:]



# -- messages -----------------------------------------------------------------

MESSAGE_HEADER_AAD_LABEL = PREFIX + "message-header"


@dataclass(frozen=True)
class MessageHeader:
    """The clear header of a sealed message (v2)."""

    scheme: str
    chat_id: str | None  # None only for the first message of a direct chat
    sender_id: str
    message_type: str
    client_message_id: str
    recipients: tuple[str, ...]  # sorted
    ephemeral_key: bytes  # X25519, 32 bytes

    def encode(self) -> bytes:
        return (text(self.scheme) + text(self.chat_id or "") + text(self.sender_id)
                + text(self.message_type) + text(self.client_message_id)
                + vector(text(r) for r in self.recipients) + opaque(self.ephemeral_key))

    def aad(self) -> bytes:
        """The associated data of the content's encryption."""
        return text(MESSAGE_HEADER_AAD_LABEL) + opaque(self.encode())


@dataclass(frozen=True)
class WrappedKey:
    """The content key wrapped for one recipient (v2)."""

    recipient_id: str
    one_time: bool  # sealed to a one-time prekey (else to the main key)
    key_id: int  # the prekey's id, or the main key's id
    kyber_ciphertext: bytes
    nonce: bytes
    wrapped_key: bytes

    def encode(self) -> bytes:
        return (text(self.recipient_id) + uint8(1 if self.one_time else 0) + uint64(self.key_id)
                + opaque(self.kyber_ciphertext) + opaque(self.nonce) + opaque(self.wrapped_key))


def message_content(header: MessageHeader | DeviceMessageHeader, nonce: bytes,
                    ciphertext: bytes, tag: bytes,
                    keys: Iterable[WrappedKey | DeviceWrappedKey]) -> bytes:
    """What a message's signature (label ``message``) covers: everything in
    the payload but the signature itself (v2 or v3 structures alike: the
    scheme, first in the header, tells them apart)."""
    return (opaque(header.encode()) + opaque(nonce) + opaque(ciphertext) + opaque(tag)
            + vector(k.encode() for k in keys))


# -- messages sealed per device (v3) ----------------------------------------------

def device_recipient(cyphr_id: str, device_id: int) -> bytes:
    """One device a v3 message is sealed for: its identity's Cyphr ID, then
    the device id (1 or more)."""
    if device_id < 1:
        raise EncodingError(f"device id {device_id} is not 1 or more")
    return text(cyphr_id) + uint64(device_id)


@dataclass(frozen=True)
class DeviceMessageHeader:
    """The clear header of a message sealed per device (v3): as
    :class:`MessageHeader`, but each recipient is a device, (Cyphr ID,
    device id), sorted by Cyphr ID then device id."""

    scheme: str
    chat_id: str | None
    sender_id: str
    message_type: str
    client_message_id: str
    recipients: tuple[tuple[str, int], ...]  # sorted (cyphrId, deviceId)
    ephemeral_key: bytes  # X25519, 32 bytes

    def encode(self) -> bytes:
        return (text(self.scheme) + text(self.chat_id or "") + text(self.sender_id)
                + text(self.message_type) + text(self.client_message_id)
                + vector(device_recipient(c, d) for c, d in self.recipients)
                + opaque(self.ephemeral_key))

    def aad(self) -> bytes:
        return text(MESSAGE_HEADER_AAD_LABEL) + opaque(self.encode())


@dataclass(frozen=True)
class DeviceWrappedKey:
    """The content key wrapped for one device (v3): the device is named, and
    signed, beside its identity's Cyphr ID."""

    recipient_id: str
    device_id: int
    one_time: bool  # sealed to one of the device's one-time prekeys (else its own key)
    key_id: int  # the prekey's id, or the device key's id (device 1: the main key's)
    kyber_ciphertext: bytes
    nonce: bytes
    wrapped_key: bytes

    def encode(self) -> bytes:
        return (device_recipient(self.recipient_id, self.device_id)
                + uint8(1 if self.one_time else 0) + uint64(self.key_id)
                + opaque(self.kyber_ciphertext) + opaque(self.nonce) + opaque(self.wrapped_key))
