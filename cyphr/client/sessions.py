"""
Sessions between devices (``cyphr-s1``): the PQXDH handshake and a Double
Ratchet with ML-KEM-1024 re-keying. docs/encryption.rst ("Sessions")
specifies every structure and derivation byte for byte, and
tests/vectors/sessions-v1.json holds vectors that every implementation
must reproduce (tools/make_vectors.py writes them).

The pieces, as Signal's PQXDH (revision 3) and Double Ratchet (revision 4)
specifications name them:

- Each identity has an X25519 identity key of its own (``IK``, derived
  from the seed under its own label, never the Ed25519 key converted),
  certified by the Ed25519 identity key (label ``identity-dh``).
- Each device publishes a signed X25519 prekey (``SPK``), a last-resort
  ML-KEM-1024 prekey (``PQSPK``), and one-time X25519 (``OPK``) and
  ML-KEM-1024 (``PQOPK``) prekeys, each signed by the identity key and bound
  to its owner, device, kind, id and validity (labels ``dh-prekey`` and
  ``kem-prekey``). A :class:`Bundle` is what a server hands out for one
  device; :func:`check_bundle` refuses any part the pinned identity key
  did not sign.
- :func:`initiate` runs the handshake to a bundle and answers a
  :class:`Session` and the handshake that the first message carries;
  :func:`respond` runs it on the receiving device from that handshake and
  its prekeys' secrets (the one-time ones are then erased by the caller).
- A :class:`Session` encrypts and decrypts with the Double Ratchet. Every
  message key is used once and deleted; keys of skipped messages are kept
  at most :data:`MAX_SKIP` per chain, :data:`MAX_SKIPPED_KEYS` per session
  and :data:`SKIPPED_KEY_TTL_MS` long. A replayed message finds no key and
  is refused.
- ML-KEM re-keying, as Apple's PQ3 does it: each side keeps a ratchet
  ML-KEM-1024 key pair and advertises its public key; at most every
  :data:`REKEY_MESSAGES` messages sent (or :data:`REKEY_MS`), a new sending
  chain encapsulates to the peer's latest key and mixes the shared secret
  into the root key with the X25519 output. An attacker who stole a
  device's state, and who can even compute every X25519 secret (a quantum
  computer), loses the session at the next re-keying to a key generated
  after the theft.

What this module does not do: choose which prekeys to claim, store state,
or carry messages. The client does (cyphr.client.client), and the server
stores bundles and routes the messages as opaque bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey, MLKEM1024PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError
from nacl.signing import SigningKey

from cyphr import signing
from cyphr.signing import EncodingError, Reader, opaque, text, uint8, uint64

VERSION = 1
X25519_BYTES = 32
MLKEM_PUBLIC_BYTES = 1568
MLKEM_CIPHERTEXT_BYTES = 1568
MLKEM_SEED_BYTES = 64
KEY_HASH_BYTES = 8  # how a ratchet ML-KEM key is named in a header

# The kinds of prekey (the byte the signature covers: cyphr.signing).
DH_SIGNED = signing.DH_SIGNED_PREKEY
DH_ONE_TIME = signing.DH_ONE_TIME_PREKEY
KEM_LAST_RESORT = signing.KEM_LAST_RESORT_PREKEY
KEM_ONE_TIME = signing.KEM_ONE_TIME_PREKEY

# Derivations (HKDF-SHA-256 infos, HMAC constants): each its own label.
_IDENTITY_DH_INFO = b"cyphr-s1 identity x25519"
_PQXDH_INFO = b"cyphr-s1 pqxdh X25519 SHA-256 ML-KEM-1024"
_AD_LABEL = "cyphr-s1 associated data"
_ROOT_INFO = b"cyphr-s1 root"
_MESSAGE_INFO = b"cyphr-s1 message"
_KEM_SEED_INFO = b"cyphr-s1 ratchet ml-kem"
_PQXDH_F = b"\xff" * 32
_MESSAGE_KEY_CONSTANT = b"\x01"
_CHAIN_KEY_CONSTANT = b"\x02"

MAX_SKIP = 1000                    # message keys one header may make us skip
MAX_SKIPPED_KEYS = 2000            # skipped message keys kept per session
SKIPPED_KEY_TTL_MS = 30 * 86_400_000  # and for at most this long
REKEY_MESSAGES = 50                # ML-KEM re-keying at least this often ...
REKEY_MS = 7 * 86_400_000          # ... or after this long, whichever first
OLD_REMOTE_KEYS = 32               # the peer's earlier ratchet keys known (replays)
MAX_MESSAGE_BYTES = 1 << 24


class SessionError(Exception):
    """A handshake, bundle or message this module refuses; the text says why."""


class Replayed(SessionError):
    """A message whose key was used already (or dropped as too old)."""


# -- small pieces ---------------------------------------------------------------

def _hkdf(ikm: bytes, length: int, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: an all-zero secret
        raise SessionError("an X25519 public key gives no shared secret") from None


def _x25519(private: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(private)


def _public(private: bytes) -> bytes:
    return _x25519(private).public_key().public_bytes_raw()


def key_hash(public_key: bytes) -> bytes:
    """How a header names a ratchet ML-KEM key: SHA-256's first 8 bytes."""
    return hashlib.sha256(public_key).digest()[:KEY_HASH_BYTES]


Encapsulate = Callable[[bytes], "tuple[bytes, bytes]"]  # public key -> (secret, ciphertext)


def encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
    """ML-KEM-1024 encapsulation (OpenSSL): (shared secret, ciphertext)."""
    try:
        key = MLKEM1024PublicKey.from_public_bytes(public_key)
    except ValueError:
        raise SessionError("not an ML-KEM-1024 public key") from None
    return key.encapsulate()


def _decapsulate(seed: bytes, ciphertext: bytes) -> bytes:
    if len(ciphertext) != MLKEM_CIPHERTEXT_BYTES:
        raise SessionError("an ML-KEM-1024 ciphertext is 1568 bytes")
    try:
        return MLKEM1024PrivateKey.from_seed_bytes(seed).decapsulate(ciphertext)
    except ValueError:
        raise SessionError("the ML-KEM ciphertext cannot be decapsulated") from None


def _kem_public(seed: bytes) -> bytes:
    return MLKEM1024PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()


# -- the identity's X25519 key ------------------------------------------------------

def identity_dh_private(seed: bytes) -> bytes:
    """The identity's X25519 private key for sessions, from its 64-byte
    seed under its own label (the Ed25519 key is never used for DH)."""
    if len(seed) != 64:
        raise SessionError("an identity seed is 64 bytes")
    return _hkdf(seed, X25519_BYTES, _IDENTITY_DH_INFO)


identity_dh_content = signing.identity_dh_content


def sign_identity_dh(signing_key: SigningKey, owner: str, public_key: bytes) -> bytes:
    return signing.sign_with_label(signing_key, signing.IDENTITY_DH,
                                   identity_dh_content(owner, public_key))


# -- prekeys -----------------------------------------------------------------------

@dataclass(frozen=True)
class Prekey(signing.SessionPrekeyBinding):
    """A published prekey of a device (its kind, owner, device, id,
    validity and key: cyphr.signing.SessionPrekeyBinding) with the identity
    key's signature."""

    signature: bytes = b""

    def content(self) -> bytes:
        return self.encode()

    def signed(self, signing_key: SigningKey) -> Prekey:
        return replace(self, signature=signing.sign_with_label(signing_key, self.label,
                                                               self.content()))

    def check(self, identity_key: bytes, owner: str, device_id: int, kinds: tuple[int, ...],
              now: int) -> None:
        """SessionError unless this is a prekey of one of ``kinds``, of that
        owner's device, valid now and signed by ``identity_key``."""
        what = f"the prekey {self.key_id} of {owner}'s device {device_id}"
        if self.kind not in kinds:
            raise SessionError(f"{what} is not of the kind expected here")
        if (self.owner, self.device_id) != (owner, device_id):
            raise SessionError(f"{what} is bound to another device")
        if len(self.public_key) != signing.PREKEY_KINDS[self.kind][1]:
            raise SessionError(f"{what} has a key of the wrong size")
        if not self.created_at <= now < self.expires_at:
            raise SessionError(f"{what} is not valid now")
        try:
            content = self.content()
        except EncodingError:
            raise SessionError(f"{what} is malformed") from None
        if not signing.verify_with_label(identity_key, self.label, content, self.signature):
            raise SessionError(f"{what} is not signed by {owner}'s identity key")


@dataclass(frozen=True)
class Bundle:
    """What a server hands out to start a session with one device: the
    identity's X25519 key and its certificate, the device's signed
    prekey, one ML-KEM prekey (one-time, or the last-resort one when none
    is left), and a one-time X25519 prekey if any is left."""

    owner: str
    device_id: int
    identity_dh: bytes
    identity_dh_signature: bytes
    signed_prekey: Prekey
    kem_prekey: Prekey
    one_time_prekey: Prekey | None = None


def check_bundle(bundle: Bundle, identity_key: bytes, now: int) -> None:
    """SessionError unless every part of ``bundle`` is signed by the
    pinned ``identity_key`` (Ed25519) for its owner and device, and valid."""
    owner, device = bundle.owner, bundle.device_id
    if len(bundle.identity_dh) != X25519_BYTES or not signing.verify_with_label(
            identity_key, signing.IDENTITY_DH, identity_dh_content(owner, bundle.identity_dh),
            bundle.identity_dh_signature):
        raise SessionError(f"{owner}'s X25519 identity key is not signed by its identity key")
    bundle.signed_prekey.check(identity_key, owner, device, (DH_SIGNED,), now)
    bundle.kem_prekey.check(identity_key, owner, device, (KEM_LAST_RESORT, KEM_ONE_TIME), now)
    if bundle.one_time_prekey is not None:
        bundle.one_time_prekey.check(identity_key, owner, device, (DH_ONE_TIME,), now)


# -- who is talking to whom -------------------------------------------------------

@dataclass(frozen=True)
class Party:
    """One end of a session: a device of an identity, with that identity's
    Ed25519 key and its X25519 identity key."""

    owner: str
    device_id: int
    identity_key: bytes   # Ed25519
    identity_dh: bytes    # X25519


def associated_data(initiator: Party, responder: Party) -> bytes:
    """What every message of the session authenticates besides itself:
    ``text("cyphr-s1 associated data")``, then for the initiator and then
    the responder ``text(owner) || uint64(device_id) || opaque(Ed25519 key)
    || opaque(X25519 identity key)``."""
    parts = [text(_AD_LABEL)]
    for party in (initiator, responder):
        parts += [text(party.owner), uint64(party.device_id), opaque(party.identity_key),
                  opaque(party.identity_dh)]
    return b"".join(parts)


# -- the handshake ----------------------------------------------------------------

@dataclass(frozen=True)
class Handshake:
    """What the first messages of a session carry so that the responder
    can run the handshake: who starts it (with the certificate of its
    X25519 identity key), its ephemeral key, the ML-KEM ciphertext, and
    which of the responder's prekeys were used."""

    sender: Party
    identity_dh_signature: bytes
    ephemeral: bytes
    kem_ciphertext: bytes
    signed_prekey_id: int
    kem_kind: int
    kem_prekey_id: int
    one_time_prekey_id: int | None

    def encode(self) -> bytes:
        """``uint8(1) || text(owner) || uint64(device_id) || opaque(Ed25519
        key) || opaque(X25519 identity key) || opaque(its signature) ||
        opaque(ephemeral) || opaque(kem_ciphertext) || uint64(signed prekey
        id) || uint8(kem kind) || uint64(kem prekey id) || uint8(1 if a
        one-time prekey was used, else 0) || uint64(its id, else 0)``."""
        s = self.sender
        one_time = self.one_time_prekey_id
        return (uint8(VERSION) + text(s.owner) + uint64(s.device_id) + opaque(s.identity_key)
                + opaque(s.identity_dh) + opaque(self.identity_dh_signature)
                + opaque(self.ephemeral) + opaque(self.kem_ciphertext)
                + uint64(self.signed_prekey_id) + uint8(self.kem_kind)
                + uint64(self.kem_prekey_id) + uint8(0 if one_time is None else 1)
                + uint64(one_time or 0))

    @classmethod
    def decode(cls, data: bytes) -> Handshake:
        try:
            r = Reader(data)
            if r.uint8() != VERSION:
                raise SessionError("a handshake of an unknown version")
            sender = Party(r.text(256), r.uint64(), r.opaque(32), r.opaque(32))
            signature = r.opaque(64)
            ephemeral = r.opaque(32)
            ciphertext = r.opaque(MLKEM_CIPHERTEXT_BYTES)
            signed_id, kem_kind, kem_id = r.uint64(), r.uint8(), r.uint64()
            has_one_time, one_time_id = r.uint8(), r.uint64()
            r.end()
        except EncodingError as e:
            raise SessionError(f"a malformed handshake: {e}") from None
        if has_one_time not in (0, 1) or kem_kind not in (KEM_LAST_RESORT, KEM_ONE_TIME):
            raise SessionError("a malformed handshake")
        if (len(sender.identity_key), len(sender.identity_dh), len(ephemeral),
                len(ciphertext)) != (32, 32, 32, MLKEM_CIPHERTEXT_BYTES):
            raise SessionError("a handshake with a key of the wrong size")
        return cls(sender, signature, ephemeral, ciphertext, signed_id, kem_kind, kem_id,
                   one_time_id if has_one_time else None)


def _shared_key(dh_outputs: list[bytes], kem_secret: bytes) -> bytes:
    """SK = HKDF-SHA-256(salt = 32 zero bytes, IKM = 32 0xFF bytes || DH1 ||
    DH2 || DH3 [|| DH4] || SS, info = "cyphr-s1 pqxdh X25519 SHA-256
    ML-KEM-1024", 32 bytes), as PQXDH's KDF."""
    return _hkdf(_PQXDH_F + b"".join(dh_outputs) + kem_secret, 32, _PQXDH_INFO,
                 salt=b"\x00" * 32)


@dataclass(frozen=True)
class Me:
    """This device, as a session needs it: who it is, and the private half
    of the identity's X25519 key (its Ed25519 key signs nothing here)."""

    party: Party
    identity_dh_private: bytes
    identity_dh_signature: bytes


def initiate(me: Me, bundle: Bundle, identity_key: bytes, now: int, *,
             ephemeral: bytes | None = None, encapsulate_with: Encapsulate = encapsulate,
             random: Callable[[int], bytes] = os.urandom,
             policy: Policy | None = None) -> tuple[Session, Handshake]:
    """Start a session with the device of ``bundle``, whose identity key
    the caller pinned (``identity_key``): the bundle is checked, then
    DH1 = DH(IK_A, SPK_B), DH2 = DH(EK_A, IK_B), DH3 = DH(EK_A, SPK_B),
    DH4 = DH(EK_A, OPK_B) if a one-time prekey was handed out, and the
    ML-KEM prekey is encapsulated to. ``ephemeral``, ``encapsulate_with``
    and ``random`` are for test vectors only."""
    check_bundle(bundle, identity_key, now)
    ephemeral = ephemeral if ephemeral is not None else random(32)
    ek = _x25519(ephemeral)
    ik = _x25519(me.identity_dh_private)
    spk = bundle.signed_prekey.public_key
    outputs = [_dh(ik, spk), _dh(ek, bundle.identity_dh), _dh(ek, spk)]
    if bundle.one_time_prekey is not None:
        outputs.append(_dh(ek, bundle.one_time_prekey.public_key))
    kem_secret, ciphertext = encapsulate_with(bundle.kem_prekey.public_key)
    peer = Party(bundle.owner, bundle.device_id, identity_key, bundle.identity_dh)
    handshake = Handshake(me.party, me.identity_dh_signature, ek.public_key().public_bytes_raw(),
                          ciphertext, bundle.signed_prekey.key_id, bundle.kem_prekey.kind,
                          bundle.kem_prekey.key_id,
                          None if bundle.one_time_prekey is None else bundle.one_time_prekey.key_id)
    session = Session.initiator(_shared_key(outputs, kem_secret), me.party, peer, spk, now,
                                random=random, encapsulate_with=encapsulate_with,
                                policy=policy or Policy())
    return session, handshake


@dataclass(frozen=True)
class PrekeySecrets:
    """The responder's private keys that a handshake names (the caller
    looks them up by id and kind); None where it has none by that id (an
    unknown or erased prekey)."""

    signed_prekey: bytes | None       # X25519 private key
    kem_prekey_seed: bytes | None     # ML-KEM-1024 seed (64 bytes)
    one_time_prekey: bytes | None     # X25519 private key, if the handshake names one


def respond(me: Me, handshake: Handshake, sender_identity_key: bytes, secrets: PrekeySecrets,
            now: int, *, random: Callable[[int], bytes] = os.urandom,
            encapsulate_with: Encapsulate = encapsulate,
            policy: Policy | None = None) -> Session:
    """The responder's side of the handshake. ``sender_identity_key`` is
    the sender's Ed25519 key the caller pinned: the handshake's X25519
    identity key must be certified by it. The caller erases the one-time
    prekeys once the first message opens (:meth:`Session.decrypt`)."""
    sender = handshake.sender
    if sender.identity_key != sender_identity_key:
        raise SessionError(f"{sender.owner}'s identity key is not the one pinned")
    if not signing.verify_with_label(sender_identity_key, signing.IDENTITY_DH,
                                     identity_dh_content(sender.owner, sender.identity_dh),
                                     handshake.identity_dh_signature):
        raise SessionError(f"{sender.owner}'s X25519 identity key is not signed by its "
                           f"identity key")
    if secrets.signed_prekey is None:
        raise SessionError(f"the handshake names signed prekey {handshake.signed_prekey_id}, "
                           f"which this device does not have (unknown or erased)")
    if secrets.kem_prekey_seed is None:
        raise SessionError(f"the handshake names ML-KEM prekey {handshake.kem_prekey_id}, "
                           f"which this device does not have (unknown or erased)")
    if (handshake.one_time_prekey_id is None) != (secrets.one_time_prekey is None):
        raise SessionError(f"the handshake names one-time prekey "
                           f"{handshake.one_time_prekey_id}, which this device does not have "
                           f"(unknown or erased)")
    spk = _x25519(secrets.signed_prekey)
    ik = _x25519(me.identity_dh_private)
    outputs = [_dh(spk, sender.identity_dh), _dh(ik, handshake.ephemeral),
               _dh(spk, handshake.ephemeral)]
    if secrets.one_time_prekey is not None:
        outputs.append(_dh(_x25519(secrets.one_time_prekey), handshake.ephemeral))
    kem_secret = _decapsulate(secrets.kem_prekey_seed, handshake.kem_ciphertext)
    return Session.responder(_shared_key(outputs, kem_secret), sender, me.party,
                             secrets.signed_prekey, now, random=random,
                             encapsulate_with=encapsulate_with, policy=policy or Policy())


# -- the Double Ratchet -------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    """The bounds of one session (the defaults are the module's)."""

    max_skip: int = MAX_SKIP
    max_skipped_keys: int = MAX_SKIPPED_KEYS
    skipped_key_ttl_ms: int = SKIPPED_KEY_TTL_MS
    rekey_messages: int = REKEY_MESSAGES
    rekey_ms: int = REKEY_MS


@dataclass(frozen=True)
class Header:
    """A ratchet message's header: the sender's ratchet X25519 key, the
    length of its previous sending chain, the message's number in this one,
    and for ML-KEM re-keying the sender's new ratchet ML-KEM key (or empty)
    and a ciphertext to the receiver's key named by its hash (or empty)."""

    dh: bytes
    previous_chain: int
    number: int
    kem_public: bytes = b""
    kem_ciphertext: bytes = b""
    kem_target: bytes = b""

    def encode(self) -> bytes:
        """``uint8(1) || opaque(dh) || uint64(previous_chain) || uint64(number)
        || opaque(kem_public) || opaque(kem_ciphertext) || opaque(kem_target)``."""
        return (uint8(VERSION) + opaque(self.dh) + uint64(self.previous_chain)
                + uint64(self.number) + opaque(self.kem_public) + opaque(self.kem_ciphertext)
                + opaque(self.kem_target))

    @classmethod
    def decode(cls, data: bytes) -> Header:
        try:
            r = Reader(data)
            if r.uint8() != VERSION:
                raise SessionError("a message of an unknown version")
            header = cls(r.opaque(32), r.uint64(), r.uint64(), r.opaque(MLKEM_PUBLIC_BYTES),
                         r.opaque(MLKEM_CIPHERTEXT_BYTES), r.opaque(KEY_HASH_BYTES))
            r.end()
        except EncodingError as e:
            raise SessionError(f"a malformed message header: {e}") from None
        if len(header.dh) != X25519_BYTES or len(header.kem_public) not in (0, MLKEM_PUBLIC_BYTES):
            raise SessionError("a message header with a key of the wrong size")
        if (len(header.kem_ciphertext), len(header.kem_target)) not in (
                (0, 0), (MLKEM_CIPHERTEXT_BYTES, KEY_HASH_BYTES)):
            raise SessionError("a message header with a malformed ML-KEM ciphertext")
        return header


def encode_message(header: Header, ciphertext: bytes) -> bytes:
    """A ratchet message: ``opaque(header) || opaque(ciphertext)``."""
    return opaque(header.encode()) + opaque(ciphertext)


def decode_message(data: bytes) -> tuple[Header, bytes, bytes]:
    """(header, its encoding, ciphertext)."""
    try:
        r = Reader(data)
        encoded = r.opaque(4096)
        ciphertext = r.opaque(MAX_MESSAGE_BYTES)
        r.end()
    except EncodingError as e:
        raise SessionError(f"a malformed message: {e}") from None
    return Header.decode(encoded), encoded, ciphertext


def kdf_root(root_key: bytes, dh_output: bytes, kem_secret: bytes) -> tuple[bytes, bytes]:
    """(root key, chain key) = HKDF-SHA-256(salt = root key, IKM = DH output
    || ML-KEM secret (empty when the step has none), info = "cyphr-s1 root"
    || uint8(1 if there is an ML-KEM secret, else 0), 64 bytes)."""
    out = _hkdf(dh_output + kem_secret, 64, _ROOT_INFO + uint8(1 if kem_secret else 0),
                salt=root_key)
    return out[:32], out[32:]


def kdf_chain(chain_key: bytes) -> tuple[bytes, bytes]:
    """(chain key, message key) = (HMAC-SHA-256(chain key, 0x02),
    HMAC-SHA-256(chain key, 0x01))."""
    return (hmac.new(chain_key, _CHAIN_KEY_CONSTANT, hashlib.sha256).digest(),
            hmac.new(chain_key, _MESSAGE_KEY_CONSTANT, hashlib.sha256).digest())


def _message_key_material(message_key: bytes) -> tuple[bytes, bytes]:
    """XChaCha20-Poly1305 key and nonce: HKDF-SHA-256(IKM = message key, no
    salt, info = "cyphr-s1 message", 56 bytes) split 32 + 24."""
    out = _hkdf(message_key, 56, _MESSAGE_INFO)
    return out[:32], out[32:]


def seal_with(message_key: bytes, plaintext: bytes, ad: bytes, header: bytes) -> bytes:
    key, nonce = _message_key_material(message_key)
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad + opaque(header), nonce, key)


def open_with(message_key: bytes, ciphertext: bytes, ad: bytes, header: bytes) -> bytes | None:
    key, nonce = _message_key_material(message_key)
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad + opaque(header), nonce,
                                                          key)
    except NaclCryptoError:
        return None


@dataclass
class _State:
    root_key: bytes
    dh_private: bytes                   # our current ratchet X25519 private key
    dh_remote: bytes | None             # the peer's current ratchet X25519 key
    send_chain: bytes | None
    receive_chain: bytes | None
    sent: int = 0                        # Ns
    received: int = 0                    # Nr
    previous_chain: int = 0              # PN
    skipped: dict[tuple[bytes, int], tuple[bytes, int]] = field(default_factory=dict)
    kem_seed: bytes = b""                # our ratchet ML-KEM key (seed) ...
    kem_public: bytes = b""              # ... and its public key
    kem_remote: bytes = b""              # the peer's latest ratchet ML-KEM public key
    advertise: bool = True               # send our ML-KEM public key in this chain's headers
    kem_ciphertext: bytes = b""          # this sending chain's encapsulation, and its target
    kem_target: bytes = b""
    sent_since_rekey: int = 0
    rekeyed_at: int = 0
    old_remotes: list[bytes] = field(default_factory=list)  # the peer's earlier ratchet keys


class Session:
    """One device's end of a session with another device. Not thread-safe:
    the caller serializes the uses of one session (and stores
    :meth:`export` after each)."""

    def __init__(self, state: _State, ad: bytes, me: Party, peer: Party, policy: Policy,
                 random: Callable[[int], bytes], encapsulate_with: Encapsulate) -> None:
        self._state = state
        self.ad = ad
        self.me = me
        self.peer = peer
        self.policy = policy
        self._random = random
        self._encapsulate = encapsulate_with

    # -- starting -----------------------------------------------------------

    @classmethod
    def initiator(cls, shared_key: bytes, me: Party, peer: Party, peer_signed_prekey: bytes,
                  now: int, *, random: Callable[[int], bytes] = os.urandom,
                  encapsulate_with: Encapsulate = encapsulate,
                  policy: Policy = Policy()) -> Session:
        """The initiator's state: the peer's signed prekey is its first
        ratchet key, and the first sending chain comes from it."""
        dh_private = random(32)
        root, chain = kdf_root(shared_key, _dh(_x25519(dh_private), peer_signed_prekey), b"")
        kem_seed = random(MLKEM_SEED_BYTES)
        state = _State(root_key=root, dh_private=dh_private, dh_remote=peer_signed_prekey,
                       send_chain=chain, receive_chain=None, kem_seed=kem_seed,
                       kem_public=_kem_public(kem_seed), rekeyed_at=now)
        return cls(state, associated_data(me, peer), me, peer, policy, random, encapsulate_with)

    @classmethod
    def responder(cls, shared_key: bytes, peer: Party, me: Party, signed_prekey_private: bytes,
                  now: int, *, random: Callable[[int], bytes] = os.urandom,
                  encapsulate_with: Encapsulate = encapsulate,
                  policy: Policy = Policy()) -> Session:
        """The responder's state: its signed prekey is its first ratchet
        key; the chains come with the first message."""
        kem_seed = random(MLKEM_SEED_BYTES)
        state = _State(root_key=shared_key, dh_private=signed_prekey_private, dh_remote=None,
                       send_chain=None, receive_chain=None, kem_seed=kem_seed,
                       kem_public=_kem_public(kem_seed), rekeyed_at=now)
        return cls(state, associated_data(peer, me), me, peer, policy, random, encapsulate_with)

    # -- sending ------------------------------------------------------------

    def encrypt(self, plaintext: bytes, now: int) -> bytes:
        """One message: its header and ciphertext (:func:`encode_message`)."""
        s = self._state
        if s.send_chain is None:
            raise SessionError("this session cannot send before it has received")
        s.send_chain, message_key = kdf_chain(s.send_chain)
        header = Header(_public(s.dh_private), s.previous_chain, s.sent,
                        s.kem_public if s.advertise else b"", s.kem_ciphertext, s.kem_target)
        s.sent += 1
        s.sent_since_rekey += 1
        encoded = header.encode()
        return opaque(encoded) + opaque(seal_with(message_key, plaintext, self.ad, encoded))

    # -- receiving ----------------------------------------------------------

    def decrypt(self, message: bytes, now: int) -> bytes:
        """The plaintext of ``message``; SessionError (Replayed for a
        message whose key is used or gone) and the state unchanged when it
        does not open."""
        header, encoded, ciphertext = decode_message(message)
        trial = _copy(self._state)
        self._expire(trial, now)
        key = trial.skipped.pop((header.dh, header.number), None)
        if key is not None:
            plaintext = open_with(key[0], ciphertext, self.ad, encoded)
            if plaintext is None:
                raise SessionError("the message does not open: altered, or not of this session")
            self._state = trial
            return plaintext
        if header.dh in trial.old_remotes or (
                header.dh == trial.dh_remote and header.number < trial.received):
            raise Replayed("a message received before (replayed), or one whose key was dropped")
        if header.dh != trial.dh_remote:
            if trial.dh_remote is not None and trial.receive_chain is not None:
                self._skip(trial, header.previous_chain, now)
            self._ratchet(trial, header, now)
        if trial.receive_chain is None:
            raise SessionError("a message on this session's first ratchet key, which the "
                               "peer never sends with")
        self._skip(trial, header.number, now)
        trial.receive_chain, message_key = kdf_chain(trial.receive_chain)
        trial.received += 1
        plaintext = open_with(message_key, ciphertext, self.ad, encoded)
        if plaintext is None:
            raise SessionError("the message does not open: altered, or not of this session")
        self._state = trial
        return plaintext

    def _skip(self, s: _State, until: int, now: int) -> None:
        if s.receive_chain is None:
            return
        if until - s.received > self.policy.max_skip:
            raise SessionError(f"the message is {until - s.received} past the last one "
                               f"received; at most {self.policy.max_skip} may be skipped")
        while s.received < until:
            s.receive_chain, message_key = kdf_chain(s.receive_chain)
            assert s.dh_remote is not None
            s.skipped[(s.dh_remote, s.received)] = (message_key, now)
            s.received += 1
        while len(s.skipped) > self.policy.max_skipped_keys:
            del s.skipped[next(iter(s.skipped))]  # the oldest first

    def _expire(self, s: _State, now: int) -> None:
        ttl = self.policy.skipped_key_ttl_ms
        for index, (_, stored) in list(s.skipped.items()):
            if now - stored > ttl:
                del s.skipped[index]

    def _ratchet(self, s: _State, header: Header, now: int) -> None:
        """A new ratchet key from the peer: a receiving chain from it (with
        the ML-KEM secret it carries, if any), then a new key pair of ours
        and a sending chain (re-keyed with ML-KEM when due)."""
        if s.send_chain is not None:
            # The peer's new key answers our current chain: it has read that
            # chain's headers, and the ML-KEM key they advertised.
            s.advertise = False
        kem_secret = b""
        if header.kem_ciphertext:
            if header.kem_target != key_hash(s.kem_public):
                raise SessionError("the message is re-keyed to an ML-KEM key this device "
                                   "does not have")
            kem_secret = _decapsulate(s.kem_seed, header.kem_ciphertext)
            # Used: a new key pair, advertised in our next chain.
            s.kem_seed = self._random(MLKEM_SEED_BYTES)
            s.kem_public = _kem_public(s.kem_seed)
            s.advertise = True
        if header.kem_public:
            s.kem_remote = header.kem_public
        s.previous_chain, s.sent, s.received = s.sent, 0, 0
        if s.dh_remote is not None:
            s.old_remotes = [*s.old_remotes, s.dh_remote][-OLD_REMOTE_KEYS:]
        s.dh_remote = header.dh
        s.root_key, s.receive_chain = kdf_root(s.root_key, _dh(_x25519(s.dh_private), header.dh),
                                               kem_secret)
        s.dh_private = self._random(32)
        s.kem_ciphertext = s.kem_target = b""
        send_secret = b""
        due = (s.sent_since_rekey >= self.policy.rekey_messages
               or now - s.rekeyed_at >= self.policy.rekey_ms)
        if due and s.kem_remote:
            send_secret, s.kem_ciphertext = self._encapsulate(s.kem_remote)
            s.kem_target = key_hash(s.kem_remote)
            s.sent_since_rekey, s.rekeyed_at = 0, now
        s.root_key, s.send_chain = kdf_root(s.root_key, _dh(_x25519(s.dh_private), header.dh),
                                            send_secret)

    # -- what the caller may keep ------------------------------------------

    @property
    def skipped_keys(self) -> int:
        return len(self._state.skipped)

    def export(self) -> dict[str, Any]:
        """The session's state, for the caller's encrypted store."""
        s = self._state
        return {
            "version": VERSION, "ad": self.ad.hex(),
            "me": _party_json(self.me), "peer": _party_json(self.peer),
            "rootKey": s.root_key.hex(), "dhPrivate": s.dh_private.hex(),
            "dhRemote": s.dh_remote.hex() if s.dh_remote else None,
            "sendChain": s.send_chain.hex() if s.send_chain else None,
            "receiveChain": s.receive_chain.hex() if s.receive_chain else None,
            "sent": s.sent, "received": s.received, "previousChain": s.previous_chain,
            "skipped": [[dh.hex(), n, key.hex(), at] for (dh, n), (key, at) in s.skipped.items()],
            "kemSeed": s.kem_seed.hex(), "kemRemote": s.kem_remote.hex(),
            "advertise": s.advertise, "oldRemotes": [k.hex() for k in s.old_remotes],
            "kemCiphertext": s.kem_ciphertext.hex(), "kemTarget": s.kem_target.hex(),
            "sentSinceRekey": s.sent_since_rekey, "rekeyedAt": s.rekeyed_at,
        }

    @classmethod
    def load(cls, data: dict[str, Any], *, policy: Policy = Policy(),
             random: Callable[[int], bytes] = os.urandom,
             encapsulate_with: Encapsulate = encapsulate) -> Session:
        if data.get("version") != VERSION:
            raise SessionError("a stored session of an unknown version")

        def optional(name: str) -> bytes | None:
            value = data[name]
            return None if value is None else bytes.fromhex(value)

        state = _State(
            root_key=bytes.fromhex(data["rootKey"]), dh_private=bytes.fromhex(data["dhPrivate"]),
            dh_remote=optional("dhRemote"), send_chain=optional("sendChain"),
            receive_chain=optional("receiveChain"), sent=data["sent"],
            received=data["received"], previous_chain=data["previousChain"],
            skipped={(bytes.fromhex(dh), n): (bytes.fromhex(key), at)
                     for dh, n, key, at in data["skipped"]},
            kem_seed=bytes.fromhex(data["kemSeed"]),
            kem_public=_kem_public(bytes.fromhex(data["kemSeed"])),
            kem_remote=bytes.fromhex(data["kemRemote"]), advertise=data["advertise"],
            old_remotes=[bytes.fromhex(k) for k in data["oldRemotes"]],
            kem_ciphertext=bytes.fromhex(data["kemCiphertext"]),
            kem_target=bytes.fromhex(data["kemTarget"]),
            sent_since_rekey=data["sentSinceRekey"], rekeyed_at=data["rekeyedAt"])
        return cls(state, bytes.fromhex(data["ad"]), _party(data["me"]), _party(data["peer"]),
                   policy, random, encapsulate_with)


def _copy(state: _State) -> _State:
    return replace(state, skipped=dict(state.skipped), old_remotes=list(state.old_remotes))


def _party_json(party: Party) -> dict[str, Any]:
    return {"owner": party.owner, "deviceId": party.device_id,
            "identityKey": party.identity_key.hex(), "identityDh": party.identity_dh.hex()}


def _party(data: dict[str, Any]) -> Party:
    return Party(data["owner"], data["deviceId"], bytes.fromhex(data["identityKey"]),
                 bytes.fromhex(data["identityDh"]))
