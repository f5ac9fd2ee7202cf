"""
Messages over sessions (``cyphr-s1-message``, payload version 4): one
format for direct chats and groups (issue #22, item 3). docs/encryption.rst
("Messages over sessions") specifies every structure byte for byte, and
tests/vectors/messages-v4.json holds a message that every implementation
must rebuild (tools/make_vectors.py writes it).

- The body is encrypted once, the same for every reader: XChaCha20-Poly1305
  under a key and nonce derived from a fresh 32-byte content key ``K``,
  over the padded plaintext (:func:`cyphr.client.crypto.pad`), with the
  header's bytes as associated data.
- The header commits to ``K``. A reader handed another key refuses the
  message before it decrypts anything, so a body reads the same for every
  reader or for none: a sender cannot give readers keys that open one
  ciphertext to different texts (the two-key Poly1305 collision).
- ``K`` reaches each recipient device, the sender's other devices
  included, in an envelope sealed by that pair's session
  (cyphr.client.sessions): the envelope holds ``K`` and the digest of the
  body, so an envelope opens one body only. Nothing is signed: the
  sessions authenticate the sender, deniably, as in Signal.
- The header carries a counter per chat and sending device and the
  sender's clock: :class:`~cyphr.client.counters.Counters` refuses
  duplicates and tells gaps, and the time to show is the header's, not
  the server's.

What this module does not do: fetch bundles, store sessions, counters or
keys, or talk to the server. The caller does, and keeps the session
exports, each message's :attr:`Opened.reopen_key` (an envelope opens
once) and :meth:`Counters.export`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError

from cyphr.client.counters import Arrival, Counters
from cyphr.client.crypto import CryptoError, b64, pad, unb64, unpad
from cyphr.client.sessions import MAX_MESSAGE_BYTES, Handshake, Replayed, Session, SessionError
from cyphr.signing import EncodingError, Reader, opaque, text, uint8, uint64

VERSION = 4
SCHEME = "cyphr-s1-message"
PREKEY, MESSAGE = "prekey", "message"  # the kinds of envelope
KEY_BYTES = 32
HASH_BYTES = 32  # the commitment, the body's digest and a roster hash
MAX_JSON_INT = 2**53 - 1  # what JSON carries exactly

_HEADER_LABEL = "cyphr-s1 message-header"
_COMMITMENT_LABEL = "cyphr-s1 key commitment"
_BODY_INFO = b"cyphr-s1 message body"
_DIGEST_LABEL = "cyphr-s1 message digest"
_ENVELOPE_LABEL = "cyphr-s1 envelope"
_ENVELOPE_TYPES = {MESSAGE: 1, PREKEY: 2}  # an envelope's first byte
_ENVELOPE_KINDS = {byte: kind for kind, byte in _ENVELOPE_TYPES.items()}
_BODY_FIELDS = {"version", "scheme", "header", "ciphertext"}
_HEADER_FIELDS = {"chatId", "directWith", "senderId", "senderDeviceId", "messageType",
                  "clientMessageId", "counter", "sentAt", "rosterEpoch", "rosterHash",
                  "keyCommitment"}


class MessageRefused(CryptoError):
    """A message this device does not open; the text says which check failed."""


class Duplicate(MessageRefused):
    """A message opened before (a replay): its envelope's key is used, or
    its counter was seen."""


def _b64(value: Any, what: str, size: int | None = None) -> bytes:
    try:
        return unb64(value, what, size)
    except CryptoError as e:
        raise MessageRefused(str(e)) from None


def _count(value: Any, lowest: int) -> bool:
    return type(value) is int and lowest <= value <= MAX_JSON_INT


# -- the body --------------------------------------------------------------------

@dataclass(frozen=True)
class BodyHeader:
    """What every reader of a message sees identically. ``chat_id`` is None
    only for the first message of a direct chat (the server makes the chat
    on it), which then names the other member, ``direct_with``. The roster
    fields stay None until groups have signed rosters; the commitment is
    :func:`seal`'s."""

    chat_id: str | None
    sender_id: str
    sender_device_id: int
    message_type: str
    client_message_id: str
    counter: int                      # per chat and sending device, from 1
    sent_at: int                      # the sender's clock, ms since the epoch
    direct_with: str | None = None
    roster_epoch: int | None = None
    roster_hash: bytes | None = None
    key_commitment: bytes = b""

    def problem(self) -> str | None:
        """Why this header is not one to seal or open, or None."""
        if (self.chat_id is None) == (self.direct_with is None) or "" in (self.chat_id,
                                                                         self.direct_with):
            return "a header names its chat, or (a first direct message) the other member"
        for name in ("sender_id", "message_type", "client_message_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                return f"the header's {name} is empty"
        if not _count(self.sender_device_id, 1) or not _count(self.counter, 1):
            return "the header's device id and counter are between 1 and 2^53 - 1"
        if not _count(self.sent_at, 0):
            return "the header's time is between 0 and 2^53 - 1"
        if (self.roster_epoch is None) != (self.roster_hash is None) or not (
                self.roster_epoch is None or _count(self.roster_epoch, 1)
                and len(self.roster_hash or b"") == HASH_BYTES):
            return "a roster epoch (1 or more) comes with a 32-byte roster hash, or neither"
        if len(self.key_commitment) != HASH_BYTES:
            return "the key commitment is 32 bytes"
        try:
            self.encode()
        except UnicodeEncodeError:
            return "a text of the header is not Unicode text"
        return None

    def encode(self) -> bytes:
        """The header's bytes: the associated data of the body, as
        docs/encryption.rst gives them. Absent fields are empty or 0."""
        return (text(_HEADER_LABEL) + text(self.chat_id or "") + text(self.direct_with or "")
                + text(self.sender_id) + uint64(self.sender_device_id)
                + text(self.message_type) + text(self.client_message_id)
                + uint64(self.counter) + uint64(self.sent_at) + uint64(self.roster_epoch or 0)
                + opaque(self.roster_hash or b"") + opaque(self.key_commitment))

    def to_json(self) -> dict[str, Any]:
        return {"chatId": self.chat_id, "directWith": self.direct_with,
                "senderId": self.sender_id, "senderDeviceId": self.sender_device_id,
                "messageType": self.message_type, "clientMessageId": self.client_message_id,
                "counter": self.counter, "sentAt": self.sent_at,
                "rosterEpoch": self.roster_epoch,
                "rosterHash": None if self.roster_hash is None else b64(self.roster_hash),
                "keyCommitment": b64(self.key_commitment)}

    @classmethod
    def from_json(cls, obj: Any) -> BodyHeader:
        if not isinstance(obj, dict) or set(obj) != _HEADER_FIELDS:
            raise MessageRefused("the header is not an object of exactly the fields "
                                 + ", ".join(sorted(_HEADER_FIELDS)))
        for names, kind, what in (("senderId messageType clientMessageId", str, "text"),
                                  ("senderDeviceId counter sentAt", int, "an integer"),
                                  ("chatId directWith", (str, type(None)), "text or null"),
                                  ("rosterEpoch", (int, type(None)), "an integer or null")):
            for name in names.split():
                if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
                    raise MessageRefused(f"header.{name} is not {what}")
        roster_hash = obj["rosterHash"]
        header = cls(obj["chatId"], obj["senderId"], obj["senderDeviceId"], obj["messageType"],
                     obj["clientMessageId"], obj["counter"], obj["sentAt"], obj["directWith"],
                     obj["rosterEpoch"],
                     None if roster_hash is None else _b64(roster_hash, "header.rosterHash"),
                     _b64(obj["keyCommitment"], "header.keyCommitment"))
        problem = header.problem()
        if problem is not None:
            raise MessageRefused(problem)
        return header


def key_commitment(content_key: bytes) -> bytes:
    """SHA-256(text("cyphr-s1 key commitment") || K): collision-resistant
    in K, so no two keys match one header."""
    return hashlib.sha256(text(_COMMITMENT_LABEL) + content_key).digest()


def body_key(content_key: bytes) -> tuple[bytes, bytes]:
    """The body's XChaCha20-Poly1305 key and nonce: HKDF-SHA-256(IKM = K,
    no salt, info = "cyphr-s1 message body", 56 bytes) split 32 + 24."""
    out = HKDF(algorithm=hashes.SHA256(), length=56, salt=None, info=_BODY_INFO).derive(
        content_key)
    return out[:32], out[32:]


def message_digest(header: bytes, ciphertext: bytes) -> bytes:
    """SHA-256(text("cyphr-s1 message digest") || opaque(header bytes) ||
    opaque(ciphertext)): the one body an envelope opens."""
    return hashlib.sha256(text(_DIGEST_LABEL) + opaque(header) + opaque(ciphertext)).digest()


def envelope_plaintext(content_key: bytes, digest: bytes) -> bytes:
    """What a session seals for each device: text("cyphr-s1 envelope") ||
    opaque(K) || opaque(digest)."""
    return text(_ENVELOPE_LABEL) + opaque(content_key) + opaque(digest)


def read_envelope_plaintext(data: bytes) -> tuple[bytes, bytes]:
    """(K, digest) of an envelope's plaintext (or a reopen key)."""
    try:
        r = Reader(data)
        label, key, digest = r.text(64), r.opaque(KEY_BYTES), r.opaque(HASH_BYTES)
        r.end()
    except EncodingError as e:
        raise MessageRefused(f"the envelope holds no content key: {e}") from None
    if label != _ENVELOPE_LABEL or (len(key), len(digest)) != (KEY_BYTES, HASH_BYTES):
        raise MessageRefused("the envelope holds no content key")
    return key, digest


# -- envelopes -------------------------------------------------------------------

def encode_envelope(session_message: bytes, handshake: Handshake | None) -> bytes:
    """``uint8(1) || opaque(session message)`` (kind "message"), or
    ``uint8(2) || opaque(handshake) || opaque(session message)`` ("prekey")."""
    if handshake is None:
        return uint8(_ENVELOPE_TYPES[MESSAGE]) + opaque(session_message)
    return uint8(_ENVELOPE_TYPES[PREKEY]) + opaque(handshake.encode()) + opaque(session_message)


def decode_envelope(data: bytes) -> tuple[str, Handshake | None, bytes]:
    """(kind, handshake or None, session message) of an envelope's bytes."""
    try:
        r = Reader(data)
        kind = _ENVELOPE_KINDS.get(r.uint8())
        handshake = r.opaque(8192) if kind == PREKEY else None
        message = r.opaque(MAX_MESSAGE_BYTES)
        r.end()
    except EncodingError as e:
        raise MessageRefused(f"a malformed envelope: {e}") from None
    if kind is None:
        raise MessageRefused("an envelope of an unknown kind")
    try:
        return kind, None if handshake is None else Handshake.decode(handshake), message
    except SessionError as e:
        raise MessageRefused(f"the envelope's {e}") from None


def envelope_kind(session: Session, handshake: Handshake | None) -> str:
    """"prekey" while the session's messages still carry ``handshake``:
    this device started it, and the session has received nothing from its
    peer yet (the caller may drop the handshake once this says "message")."""
    return _kind(session.export(), handshake)


def _kind(state: Mapping[str, Any], handshake: Handshake | None) -> str:
    return PREKEY if handshake is not None and state["receiveChain"] is None else MESSAGE


def _delivered(message: Mapping[str, Any]) -> tuple[Handshake | None, bytes]:
    """The handshake and session message of the envelope the server gave
    this device with ``message``, whose kind it must tell truly."""
    envelope = message.get("envelope")
    if not isinstance(envelope, dict) or set(envelope) != {"kind", "envelope"}:
        raise MessageRefused("the message carries no envelope {kind, envelope} for this device")
    kind, handshake, session_message = decode_envelope(_b64(envelope["envelope"], "envelope"))
    if kind != envelope["kind"]:
        raise MessageRefused(f"the envelope is of kind {kind!r}, not {envelope['kind']!r}")
    return handshake, session_message


def handshake_of(message: Mapping[str, Any]) -> Handshake | None:
    """The handshake a "prekey" envelope carries (None for a "message"
    one): with no session with the sender's device yet, the reader
    responds to it (sessions.respond) and then opens the message."""
    return _delivered(message)[0]


# -- sealing ---------------------------------------------------------------------

@dataclass(frozen=True)
class Recipient:
    """A device to seal to: the sending device's session with it, and the
    handshake that started it if the sending device did (kept until the
    peer answers: :func:`envelope_kind`)."""

    session: Session
    handshake: Handshake | None = None


@dataclass(frozen=True)
class Sealed:
    payload: dict[str, Any]           # encryptedPayload, the same for every reader
    envelopes: list[dict[str, Any]]   # the send's envelopes, one per recipient device
    header: BodyHeader
    reopen_key: bytes                 # the sender's own copy: reopen() with it


def seal(plaintext: bytes, header: BodyHeader, recipients: Sequence[Recipient], *,
         random: Callable[[int], bytes] = os.urandom) -> Sealed:
    """Encrypt ``plaintext`` once and seal its key to every device of
    ``recipients`` (each member's devices, the sender's other devices
    included, never the sending one) through their sessions, which this
    advances. ``header`` is complete but for its key commitment."""
    sender = (header.sender_id, header.sender_device_id)
    devices = [(r.session.peer.owner, r.session.peer.device_id) for r in recipients]
    if len(set(devices)) != len(devices) or sender in devices:
        raise CryptoError("a device is listed twice, or the sending device is listed")
    kinds = []
    for r, (cyphr_id, device_id) in zip(recipients, devices):
        state = r.session.export()
        if (r.session.me.owner, r.session.me.device_id) != sender:
            raise CryptoError(f"the session with device {device_id} of {cyphr_id} is not the "
                              f"sending device's")
        if state["sendChain"] is None:
            raise CryptoError(f"the session with device {device_id} of {cyphr_id} cannot send "
                              f"before it has received")
        kinds.append(_kind(state, r.handshake))
    content_key = random(KEY_BYTES)
    header = replace(header, key_commitment=key_commitment(content_key))
    problem = header.problem()
    if problem is not None:
        raise CryptoError(problem)
    encoded = header.encode()
    key, nonce = body_key(content_key)
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(pad(plaintext), encoded, nonce, key)
    inner = envelope_plaintext(content_key, message_digest(encoded, ciphertext))
    envelopes = []
    for (cyphr_id, device_id), r, kind in sorted(zip(devices, recipients, kinds),
                                                 key=lambda p: p[0]):
        data = encode_envelope(r.session.encrypt(inner, header.sent_at),
                               r.handshake if kind == PREKEY else None)
        envelopes.append({"cyphrId": cyphr_id, "deviceId": device_id, "kind": kind,
                          "envelope": b64(data)})
    payload = {"version": VERSION, "scheme": SCHEME, "header": header.to_json(),
               "ciphertext": b64(ciphertext)}
    return Sealed(payload, envelopes, header, inner)


# -- opening ---------------------------------------------------------------------

@dataclass(frozen=True)
class Opened:
    plaintext: bytes
    header: BodyHeader                # header.sent_at is the time to show
    reopen_key: bytes                 # keep it to read the message again: an envelope opens once
    arrival: Arrival | None = None    # what the counters made of it, when given


def _body(message: Mapping[str, Any]) -> tuple[BodyHeader, bytes, bytes]:
    payload = message.get("encryptedPayload")
    if not isinstance(payload, dict):
        raise MessageRefused("the payload is not a JSON object")
    version, scheme = payload.get("version"), payload.get("scheme")
    if type(version) is not int or version != VERSION or scheme != SCHEME:
        raise MessageRefused(f"not a message over sessions: version {version!r}, scheme "
                             f"{scheme!r}")
    if set(payload) != _BODY_FIELDS:
        raise MessageRefused("the payload is not an object of exactly the fields "
                             + ", ".join(sorted(_BODY_FIELDS)))
    header = BodyHeader.from_json(payload["header"])
    return header, header.encode(), _b64(payload["ciphertext"], "ciphertext")


def _check_delivery(header: BodyHeader, message: Mapping[str, Any], reader_id: str,
                    direct_members: frozenset[str] | None) -> str:
    """That the server delivered the message where its sender meant it to
    go; answers the chat whose counters it counts in."""
    said = header.to_json()
    for name in ("senderId", "senderDeviceId", "messageType", "clientMessageId"):
        ours, theirs = said[name], message.get(name)
        if ours != theirs or type(ours) is not type(theirs):
            raise MessageRefused(f"the header's {name} ({ours!r}) is not the message's "
                                 f"({theirs!r})")
    chat_id = message.get("chatId")
    if header.chat_id is None:
        named = frozenset((header.sender_id, header.direct_with))
        if not isinstance(chat_id, str) or not chat_id or direct_members != named \
                or reader_id not in named:
            raise MessageRefused(f"a first direct message between {header.sender_id} and "
                                 f"{header.direct_with} outside their direct chat")
    elif header.chat_id != chat_id:
        raise MessageRefused(f"the message was sealed for chat {header.chat_id!r}, not "
                             f"{chat_id!r}")
    return chat_id


def _open_body(header: BodyHeader, encoded: bytes, ciphertext: bytes, opening: bytes) -> bytes:
    content_key, digest = read_envelope_plaintext(opening)
    if not hmac.compare_digest(digest, message_digest(encoded, ciphertext)):
        raise MessageRefused("the envelope was made for another body: its header or ciphertext "
                             "was altered, or another message's body put in its place")
    if not hmac.compare_digest(key_commitment(content_key), header.key_commitment):
        raise MessageRefused("the content key does not match the header's key commitment: the "
                             "sender gave this device a key other readers do not have")
    key, nonce = body_key(content_key)
    try:
        padded = crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, encoded, nonce, key)
    except NaclCryptoError:
        raise MessageRefused("the body does not decrypt under its committed key") from None
    try:
        return unpad(padded)
    except CryptoError as e:
        raise MessageRefused(f"the body is malformed: {e}") from None


def open_message(message: Mapping[str, Any], session: Session, now: int, *,
                 counters: Counters | None = None,
                 direct_members: frozenset[str] | None = None) -> Opened:
    """Check and open ``message`` as the server gave it (its
    ``encryptedPayload``, this device's ``envelope``, and ``senderId``,
    ``senderDeviceId``, ``chatId``, ``messageType``, ``clientMessageId``)
    with this device's ``session`` with the sender's device.
    ``direct_members`` are the members of the chat the server put it in
    when that is a direct chat. ``counters``, if given, refuses a
    duplicate and records the message.

    Every check runs before anything changes: the envelope opens first on
    a copy of the session; only once the body has opened and the counter
    is new does ``session`` itself take the message (and ``counters``
    record it). A refused message leaves both as they were."""
    header, encoded, ciphertext = _body(message)
    chat_id = _check_delivery(header, message, session.me.owner, direct_members)
    peer = session.peer
    if (header.sender_id, header.sender_device_id) != (peer.owner, peer.device_id):
        raise MessageRefused(f"the header names device {header.sender_device_id} of "
                             f"{header.sender_id} as its sender, not the session's device "
                             f"{peer.device_id} of {peer.owner}")
    _, session_message = _delivered(message)
    trial = Session.load(session.export(), policy=session.policy)
    try:
        opening = trial.decrypt(session_message, now)
    except Replayed as e:
        raise Duplicate(f"the envelope was opened before: {e}") from None
    except SessionError as e:
        raise MessageRefused(f"the envelope does not open: {e}") from None
    plaintext = _open_body(header, encoded, ciphertext, opening)
    arrival = None
    if counters is not None:
        arrival = counters.check(chat_id, header.sender_id, header.sender_device_id,
                                 header.counter)
        if arrival.duplicate:
            raise Duplicate(arrival.reason)
    if session.decrypt(session_message, now) != opening:  # the same state: the same answer
        raise MessageRefused("the session opened the envelope differently the second time")
    if counters is not None:
        counters.record(chat_id, header.sender_id, header.sender_device_id, header.counter)
    return Opened(plaintext, header, opening, arrival)


def reopen(message: Mapping[str, Any], reopen_key: bytes, reader_id: str, *,
           direct_members: frozenset[str] | None = None) -> Opened:
    """A message opened before (or sent from this device) read again with
    its :attr:`Opened.reopen_key`: the same checks but the envelope's."""
    header, encoded, ciphertext = _body(message)
    _check_delivery(header, message, reader_id, direct_members)
    return Opened(_open_body(header, encoded, ciphertext, reopen_key), header, reopen_key)
