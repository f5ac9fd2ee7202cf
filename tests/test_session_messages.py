"""
Messages over sessions (cyphr.client.sessionmessages and its counters,
cyphr.client.counters; issue #22 item 3):
one body for every reader, its content key sealed to each device through
that pair's session. Round trips for a pair and a group, the two attacks
the format closes (a sender's equivocation with a two-key Poly1305
collision; a server's re-dated replay), gaps, every refusal leaving the
session usable, the counter tracker's bounds and storage, and
tests/vectors/messages-v4.json rebuilt byte for byte and opened with a
second implementation of the body's cipher. Real cryptography, no server.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from twisted.trial.unittest import SynchronousTestCase

from cyphr.client import crypto, sessions
from cyphr.client.counters import Counters
from cyphr.client.sessionmessages import (
    MESSAGE,
    PREKEY,
    BodyHeader,
    Duplicate,
    MessageRefused,
    Opened,
    Recipient,
    Sealed,
    body_key,
    decode_envelope,
    encode_envelope,
    envelope_kind,
    envelope_plaintext,
    handshake_of,
    key_commitment,
    message_digest,
    open_message,
    read_envelope_plaintext,
    reopen,
    seal,
)
from cyphr.client.sessions import Handshake, Session, initiate, respond
from tests.test_sessions import Device, ReplayedVectors

NOW = 1_790_000_000_000
CHAT = "0b8e4f8a-54a3-4f5e-a1f7-2f0f5e0c9a11"
ALICE_SEED, BOB_SEED, CAROL_SEED = os.urandom(64), os.urandom(64), os.urandom(64)


class Phone:
    """One device, with its sessions (by peer device), the handshakes of
    those it started, and its counters: what a client keeps in its vault."""

    def __init__(self, owner: str, device_id: int, seed: bytes) -> None:
        self.device = Device(owner, device_id, seed)
        self.id = (owner, device_id)
        self.sessions: dict[tuple[str, int], Session] = {}
        self.handshakes: dict[tuple[str, int], Handshake] = {}
        self.counters = Counters()
        self.sent: dict[str | None, int] = {}  # this device's last counter in each chat

    def session_with(self, other: Phone) -> None:
        """Start a session with ``other`` from its bundle (its messages
        carry the handshake until ``other`` answers)."""
        session, handshake = initiate(self.device.me, other.device.bundle(),
                                      other.device.identity_key, NOW)
        self.sessions[other.id], self.handshakes[other.id] = session, handshake

    def send(self, to: list[Phone], text: str, *, chat_id: str | None = CHAT,
             direct_with: str | None = None, sent_at: int = NOW,
             message_type: str = "text") -> Sealed:
        for phone in to:
            if phone.id not in self.sessions:
                self.session_with(phone)
        counter = self.sent[chat_id] = self.sent.get(chat_id, 0) + 1
        header = BodyHeader(chat_id, self.id[0], self.id[1], message_type,
                            f"message {counter} in {chat_id}", counter, sent_at, direct_with)
        return seal(text.encode("utf-8"), header, [
            Recipient(self.sessions[p.id], self.handshakes.get(p.id)) for p in to])

    def receive(self, message: dict[str, Any], sender: Phone, *, now: int = NOW,
                direct_members: frozenset[str] | None = None) -> Opened:
        """Open ``message`` from ``sender`` as a client would: with the
        session with its device, or one made from the handshake its
        envelope carries, kept only once the message opens."""
        session = self.sessions.get(sender.id)
        handshake = handshake_of(message)
        if session is None:
            assert handshake is not None
            session = respond(self.device.me, handshake, sender.device.identity_key,
                              self.device.secrets_for(handshake), now)
        opened = open_message(message, session, now, counters=self.counters,
                              direct_members=direct_members)
        self.sessions[sender.id] = session
        return opened


def delivered(sealed: Sealed, to: Phone, **changes: Any) -> dict[str, Any]:
    """The message as the server gives it to ``to``: its own envelope next
    to the body, and what the server says of the message."""
    header = sealed.header
    [entry] = [e for e in sealed.envelopes if (e["cyphrId"], e["deviceId"]) == to.id]
    message = {"id": os.urandom(8).hex(), "chatId": header.chat_id or "direct-chat",
               "seq": 1, "senderId": header.sender_id, "senderDeviceId": header.sender_device_id,
               "encryptedPayload": json.loads(json.dumps(sealed.payload)),
               "messageType": header.message_type, "clientMessageId": header.client_message_id,
               "timestamp": "2026-09-21T12:00:00.000Z",
               "envelope": {"kind": entry["kind"], "envelope": entry["envelope"]}}
    message.update(changes)
    return message


def pair() -> tuple[Phone, Phone]:
    return Phone("alice", 1, ALICE_SEED), Phone("bob", 1, BOB_SEED)


class PairTests(SynchronousTestCase):
    def test_a_pair_talks(self) -> None:
        """Alice's first messages to bob carry the handshake (kind prekey);
        bob's answer and everything after it do not (kind message). Each
        opens to its text and header, and the shown time is the sender's."""
        alice, bob = pair()
        first = alice.send([bob], "hello bob", sent_at=NOW - 5000)
        self.assertEqual([e["kind"] for e in first.envelopes], [PREKEY])
        opened = bob.receive(delivered(first, bob), alice)
        self.assertEqual(opened.plaintext, b"hello bob")
        self.assertEqual(opened.header, first.header)
        self.assertEqual(opened.header.sent_at, NOW - 5000)
        self.assertEqual(opened.arrival.missing, range(0))
        answer = bob.send([alice], "hello alice")
        self.assertEqual([e["kind"] for e in answer.envelopes], [MESSAGE])
        self.assertEqual(alice.receive(delivered(answer, alice), bob).plaintext, b"hello alice")
        again = alice.send([bob], "how are you?")
        self.assertEqual([e["kind"] for e in again.envelopes], [MESSAGE])
        self.assertEqual(bob.receive(delivered(again, bob), alice).plaintext, b"how are you?")

    def test_the_kind_follows_the_session(self) -> None:
        """envelope_kind says prekey for an unanswered session started
        here, message otherwise; the envelope's first byte says the same."""
        alice, bob = pair()
        alice.session_with(bob)
        session, handshake = alice.sessions[bob.id], alice.handshakes[bob.id]
        self.assertEqual(envelope_kind(session, handshake), PREKEY)
        self.assertEqual(envelope_kind(session, None), MESSAGE)
        data = encode_envelope(b"a session message", handshake)
        self.assertEqual(decode_envelope(data), (PREKEY, handshake, b"a session message"))
        self.assertEqual(decode_envelope(encode_envelope(b"m", None)), (MESSAGE, None, b"m"))

    def test_out_of_order_first_messages(self) -> None:
        """Two messages before bob answers both carry the handshake; the
        second arriving first starts bob's session and shows message 1
        missing, which the first then fills."""
        alice, bob = pair()
        one, two = alice.send([bob], "one"), alice.send([bob], "two")
        self.assertEqual([one.envelopes[0]["kind"], two.envelopes[0]["kind"]], [PREKEY, PREKEY])
        later = bob.receive(delivered(two, bob), alice)
        self.assertEqual((later.plaintext, later.arrival.missing), (b"two", range(1, 2)))
        self.assertEqual(bob.counters.missing(CHAT, "alice", 1), [1])
        earlier = bob.receive(delivered(one, bob), alice)
        self.assertEqual((earlier.plaintext, earlier.arrival.late), (b"one", True))
        self.assertEqual(bob.counters.missing(CHAT, "alice", 1), [])

    def test_a_first_direct_message_names_the_other_member(self) -> None:
        """With no chat yet, the header names the other member: it opens in
        the direct chat of those two, and nowhere else."""
        alice, bob = pair()
        sealed = alice.send([bob], "first", chat_id=None, direct_with="bob")
        message = delivered(sealed, bob)
        for members in (None, frozenset({"alice", "carol"}), frozenset({"alice", "bob", "c"})):
            with self.assertRaisesRegex(MessageRefused, "outside their direct chat"):
                bob.receive(message, alice, direct_members=members)
        opened = bob.receive(message, alice, direct_members=frozenset({"alice", "bob"}))
        self.assertEqual(opened.plaintext, b"first")
        self.assertEqual(bob.counters.missing("direct-chat", "alice", 1), [])
        with self.assertRaisesRegex(crypto.CryptoError, "names its chat"):
            alice.send([bob], "both", chat_id=CHAT, direct_with="bob")


class GroupTests(SynchronousTestCase):
    def test_every_other_device_reads_the_same_text(self) -> None:
        """Alice on two devices, bob on three: the message from alice's
        device 1 is one body and an envelope for each of the four other
        devices (her own device 2 included), each of which opens it to the
        same text; alice's device 1 reads its own copy with its reopen key."""
        alice1, alice2 = Phone("alice", 1, ALICE_SEED), Phone("alice", 2, ALICE_SEED)
        bobs = [Phone("bob", d, BOB_SEED) for d in (1, 2, 3)]
        # bob's device 2 already talks with alice's device 1: its envelope is a message.
        warmup = alice1.send([bobs[1]], "warm-up", chat_id="direct")
        bobs[1].receive(delivered(warmup, bobs[1]), alice1)
        reply = bobs[1].send([alice1], "ok", chat_id="direct")
        alice1.receive(delivered(reply, alice1), bobs[1])
        sealed = alice1.send([alice2, *bobs], "to the group ☃")
        self.assertEqual([(e["cyphrId"], e["deviceId"], e["kind"]) for e in sealed.envelopes],
                         [("alice", 2, PREKEY), ("bob", 1, PREKEY), ("bob", 2, MESSAGE),
                          ("bob", 3, PREKEY)])
        for reader in (alice2, *bobs):
            opened = reader.receive(delivered(sealed, reader), alice1)
            self.assertEqual(opened.plaintext, "to the group ☃".encode("utf-8"))
            self.assertEqual(opened.header, sealed.header)
        mine = delivered(sealed, alice2)
        self.assertEqual(reopen(mine, sealed.reopen_key, "alice").plaintext,
                         "to the group ☃".encode("utf-8"))

    def test_seal_refuses_what_it_cannot_send(self) -> None:
        """The sending device among the recipients, a device twice, another
        device's session, or a session that cannot send yet: refused
        before any session is used."""
        alice, bob = pair()
        alice.session_with(bob)
        carol = Phone("carol", 1, CAROL_SEED)
        carol.session_with(bob)
        header = BodyHeader(CHAT, "alice", 1, "text", "m", 1, NOW)
        ours = Recipient(alice.sessions[bob.id], alice.handshakes[bob.id])
        before = alice.sessions[bob.id].export()
        handshake = alice.handshakes[bob.id]
        answering = respond(bob.device.me, handshake, alice.device.identity_key,
                            bob.device.secrets_for(handshake), NOW)
        for recipients, why in (([ours, ours], "listed twice"),
                                ([Recipient(answering)], "the sending device is listed"),
                                ([Recipient(carol.sessions[bob.id])], "not the sending")):
            with self.assertRaisesRegex(crypto.CryptoError, why):
                seal(b"x", header, recipients)
        bob_header = BodyHeader(CHAT, "bob", 1, "text", "m", 1, NOW)
        with self.assertRaisesRegex(crypto.CryptoError, "cannot send before"):
            seal(b"x", bob_header, [Recipient(answering)])
        self.assertEqual(alice.sessions[bob.id].export(), before)


# -- the equivocation attack ---------------------------------------------------------

P1305 = (1 << 130) - 5


def hchacha20(key: bytes, nonce: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha, section 2.2), which neither
    OpenSSL nor PyNaCl exposes: XChaCha20's subkey."""
    s = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key),
         *struct.unpack("<4I", nonce)]

    def quarter(a: int, b: int, c: int, d: int) -> None:
        for x, y, z, n in ((a, b, d, 16), (c, d, b, 12), (a, b, d, 8), (c, d, b, 7)):
            s[x] = (s[x] + s[y]) & 0xFFFFFFFF
            s[z] ^= s[x]
            s[z] = (s[z] << n | s[z] >> (32 - n)) & 0xFFFFFFFF

    for _ in range(10):
        for q in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                  (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            quarter(*q)
    return struct.pack("<8I", *s[:4], *s[12:])


def xchacha20poly1305_decrypt(key: bytes, nonce: bytes, data: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 from its parts, with OpenSSL's ChaCha20-Poly1305."""
    return ChaCha20Poly1305(hchacha20(key, nonce[:16])).decrypt(b"\0" * 4 + nonce[16:], data, ad)


def poly1305_key(key: bytes, nonce: bytes) -> tuple[int, int]:
    """(r, s) of XChaCha20-Poly1305's one-time Poly1305 key (RFC 8439 2.6)."""
    block = Cipher(algorithms.ChaCha20(hchacha20(key, nonce[:16]), b"\0" * 8 + nonce[16:]),
                   mode=None).encryptor().update(b"\0" * 32)
    r = int.from_bytes(block[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    return r, int.from_bytes(block[16:], "little")


def two_key_collision(ad: bytes, ciphertext: bytes, free: int, keys: list[tuple[bytes, bytes]]
                      ) -> bytes | None:
    """``ciphertext`` with its 16-byte block ``free`` replaced so that one
    tag authenticates it under both (key, nonce) of ``keys``: the
    invisible-salamanders construction for Poly1305 (Len, Grubbs and
    Ristenpart, "Partitioning oracle attacks", 2021). Answers the
    ciphertext and tag, or None when this pair of keys gives no solution."""
    def padded(data: bytes) -> bytes:
        return data + bytes(-len(data) % 16)

    mac = (padded(ad) + padded(ciphertext) + struct.pack("<QQ", len(ad), len(ciphertext)))
    blocks = [int.from_bytes(mac[i:i + 16], "little") + (1 << 128) for i in range(0, len(mac), 16)]
    at = len(padded(ad)) // 16 + free
    (r1, s1), (r2, s2) = (poly1305_key(*k) for k in keys)

    def rest(r: int) -> int:  # the polynomial without the free block
        return sum(c * pow(r, len(blocks) - i, P1305) for i, c in enumerate(blocks)
                   if i != at) % P1305

    a1, a2 = rest(r1), rest(r2)
    e1, e2 = pow(r1, len(blocks) - at, P1305), pow(r2, len(blocks) - at, P1305)
    for t in range(-3, 4):
        target = (s2 - s1) % (1 << 128) + t * (1 << 128)  # h1 - h2, as integers
        coefficient = (target - a1 + a2) * pow(e1 - e2, -1, P1305) % P1305
        h1, h2 = (a1 + coefficient * e1) % P1305, (a2 + coefficient * e2) % P1305
        if 0 <= coefficient - (1 << 128) < 1 << 128 and h1 - h2 == target:
            block = (coefficient - (1 << 128)).to_bytes(16, "little")
            forged = ciphertext[:free * 16] + block + ciphertext[free * 16 + 16:]
            return forged + ((h1 + s1) % (1 << 128)).to_bytes(16, "little")
    return None


class EquivocationTests(SynchronousTestCase):
    def test_a_two_key_collision_opens_for_one_reader_only(self) -> None:
        """A sender makes one body that authenticates under two content
        keys (a real two-key Poly1305 collision) and gives bob one key,
        carol the other. Without the commitment each would read a
        different text; with it, bob reads the committed one and carol
        refuses, saying the key does not match the header's commitment."""
        alice, bob = pair()
        carol = Phone("carol", 1, CAROL_SEED)
        for phone in (bob, carol):
            alice.session_with(phone)
        committed = os.urandom(32)
        header = BodyHeader(CHAT, "alice", 1, "text", "vote", 1, NOW,
                            key_commitment=key_commitment(committed))
        encoded = header.encode()
        content = b"APPROVE" + b" " * 21  # its last 16 bytes are the block to solve for
        key1, nonce1 = body_key(committed)
        honest = crypto_aead_xchacha20poly1305_ietf_encrypt(crypto.pad(content), encoded,
                                                            nonce1, key1)[:-16]
        for _ in range(64):
            other = os.urandom(32)
            forged = two_key_collision(encoded, honest, 1, [(key1, nonce1), body_key(other)])
            if forged is not None:
                break
        else:
            self.fail("no collision in 64 tries")
        key2, nonce2 = body_key(other)
        under_committed = crypto_aead_xchacha20poly1305_ietf_decrypt(forged, encoded, nonce1,
                                                                     key1)
        under_other = crypto_aead_xchacha20poly1305_ietf_decrypt(forged, encoded, nonce2, key2)
        self.assertNotEqual(under_committed, under_other)  # the cipher alone opens both
        digest = message_digest(encoded, forged)
        payload = {"version": 4, "scheme": "cyphr-s1-message", "header": header.to_json(),
                   "ciphertext": base64.b64encode(forged).decode()}
        envelopes = []
        for phone, key in ((bob, committed), (carol, other)):
            session = alice.sessions[phone.id]
            data = encode_envelope(session.encrypt(envelope_plaintext(key, digest), NOW),
                                   alice.handshakes[phone.id])
            envelopes.append({"cyphrId": phone.id[0], "deviceId": 1, "kind": PREKEY,
                              "envelope": base64.b64encode(data).decode()})
        sealed = Sealed(payload, envelopes, header, b"")
        self.assertTrue(bob.receive(delivered(sealed, bob), alice).plaintext.startswith(
            b"APPROVE"))
        with self.assertRaisesRegex(MessageRefused, "does not match the header's key "
                                                    "commitment"):
            carol.receive(delivered(sealed, carol), alice)


# -- the re-dated replay, gaps -------------------------------------------------------

class ReplayTests(SynchronousTestCase):
    def test_a_redated_replay_is_refused(self) -> None:
        """The server hands bob an old message again, under a new id and a
        new timestamp: the session refuses its used envelope, and the
        counters refuse it too (here after bob's session was restored from
        a backup taken before it). The time shown is always the sender's."""
        alice, bob = pair()
        bob.receive(delivered(alice.send([bob], "warm-up"), bob), alice)
        backup = bob.sessions[alice.id].export()
        sealed = alice.send([bob], "pay 10", sent_at=NOW - 60_000)
        opened = bob.receive(delivered(sealed, bob), alice)
        self.assertEqual(opened.header.sent_at, NOW - 60_000)
        replayed = delivered(sealed, bob, id="a-new-id", timestamp="2027-01-01T00:00:00.000Z")
        with self.assertRaisesRegex(Duplicate, "the envelope was opened before"):
            bob.receive(replayed, alice, now=NOW + 86_400_000)
        bob.sessions[alice.id] = Session.load(backup)
        with self.assertRaisesRegex(Duplicate, r"message 2 of device 1 of alice in chat "
                                               r".* was received before \(a replay\)"):
            bob.receive(replayed, alice)
        # Refused before the session took it: the restored session still opens it.
        self.assertEqual(open_message(replayed, bob.sessions[alice.id], NOW).plaintext,
                         b"pay 10")

    def test_a_gap_is_shown(self) -> None:
        """Messages 2 and 3 withheld: message 4 arrives with the gap 2-3."""
        alice, bob = pair()
        sent = [alice.send([bob], f"m{i}") for i in range(1, 5)]
        bob.receive(delivered(sent[0], bob), alice)
        arrival = bob.receive(delivered(sent[3], bob), alice).arrival
        self.assertEqual((arrival.duplicate, arrival.missing), (False, range(2, 4)))
        self.assertEqual(bob.counters.missing(CHAT, "alice", 1), [2, 3])

    def test_counters_are_per_chat(self) -> None:
        """Each chat counts alone: bob, in only one of alice's two chats
        with carol, sees no gap for the messages of the other."""
        alice, bob = pair()
        carol = Phone("carol", 1, CAROL_SEED)
        for text in ("one", "two"):
            carol.receive(delivered(alice.send([carol], text, chat_id="other"), carol), alice)
        sealed = alice.send([bob, carol], "to both")
        self.assertEqual(sealed.header.counter, 1)
        for reader in (bob, carol):
            arrival = reader.receive(delivered(sealed, reader), alice).arrival
            self.assertEqual((arrival.duplicate, arrival.missing), (False, range(0)))


# -- refusals --------------------------------------------------------------------

def _envelope_bytes(message: dict[str, Any]) -> bytes:
    return base64.b64decode(message["envelope"]["envelope"])


def _with_envelope(message: dict[str, Any], data: bytes, kind: str | None = None
                   ) -> dict[str, Any]:
    return {**message, "envelope": {"kind": kind or message["envelope"]["kind"],
                                    "envelope": base64.b64encode(data).decode()}}


def _with_body(message: dict[str, Any], **header: Any) -> dict[str, Any]:
    payload = json.loads(json.dumps(message["encryptedPayload"]))
    payload["header"].update(header)
    return {**message, "encryptedPayload": payload}


class RefusalTests(SynchronousTestCase):
    """Each refusal says what failed, and leaves the session as it was:
    the genuine message opens afterwards."""

    def setUp(self) -> None:
        self.alice, self.bob = pair()
        # An answered session (alice's envelopes are messages now).
        self.bob.receive(delivered(self.alice.send([self.bob], "hello"), self.bob), self.alice)
        answer = self.bob.send([self.alice], "hello alice")
        self.alice.receive(delivered(answer, self.alice), self.bob)
        self.sealed = self.alice.send([self.bob], "the genuine text")
        self.message = delivered(self.sealed, self.bob)

    def refused(self, message: dict[str, Any], why: str, *, session: Session | None = None
                ) -> None:
        ours = self.bob.sessions[self.alice.id]
        before, counted = ours.export(), self.bob.counters.export()
        with self.assertRaisesRegex(MessageRefused, why):
            open_message(message, session or ours, NOW, counters=self.bob.counters)
        self.assertEqual((ours.export(), self.bob.counters.export()), (before, counted))
        self.assertEqual(open_message(self.message, Session.load(before), NOW).plaintext,
                         b"the genuine text")

    def test_a_tampered_header(self) -> None:
        """The server changes the body's header (here the sender's time):
        the envelope was made for another body."""
        self.refused(_with_body(self.message, sentAt=NOW + 1), "made for another body")

    def test_a_tampered_body(self) -> None:
        payload = dict(self.message["encryptedPayload"])
        ciphertext = bytearray(base64.b64decode(payload["ciphertext"]))
        ciphertext[5] ^= 1
        payload["ciphertext"] = base64.b64encode(bytes(ciphertext)).decode()
        self.refused({**self.message, "encryptedPayload": payload}, "made for another body")

    def test_a_tampered_envelope(self) -> None:
        data = bytearray(_envelope_bytes(self.message))
        data[-3] ^= 1
        self.refused(_with_envelope(self.message, bytes(data)), "the envelope does not open")

    def test_the_kind_the_server_says_must_be_true(self) -> None:
        self.refused(_with_envelope(self.message, _envelope_bytes(self.message), PREKEY),
                     "of kind 'message', not 'prekey'")

    def test_another_messages_envelope(self) -> None:
        """An envelope of another message of the same sender, next to this
        body: it opens (the session's next key), but not this body."""
        other = delivered(self.alice.send([self.bob], "another"), self.bob)
        self.refused(_with_envelope(self.message, _envelope_bytes(other)),
                     "made for another body")

    def test_the_wrong_chat(self) -> None:
        self.refused({**self.message, "chatId": "another-chat"},
                     f"sealed for chat '{CHAT}', not 'another-chat'")

    def test_the_wrong_sender_device(self) -> None:
        """The server says another device of alice sent it; or the header
        names a device that is not the session's."""
        self.refused({**self.message, "senderDeviceId": 2},
                     r"the header's senderDeviceId \(1\) is not the message's \(2\)")
        carol = Phone("carol", 1, CAROL_SEED)
        carol.session_with(self.bob)
        self.refused({**self.message, "senderId": "carol"}, "senderId")
        self.refused(self.message, "not the session's device 1 of carol",
                     session=respond(self.bob.device.me, carol.handshakes[self.bob.id],
                                     carol.device.identity_key,
                                     self.bob.device.secrets_for(carol.handshakes[self.bob.id]),
                                     NOW))

    def test_the_wrong_type_or_client_id(self) -> None:
        self.refused({**self.message, "messageType": "system"}, "messageType")
        self.refused({**self.message, "clientMessageId": "other"}, "clientMessageId")

    def test_a_malformed_payload(self) -> None:
        payload = self.message["encryptedPayload"]
        for changed, why in (({**payload, "version": 3}, "not a message over sessions"),
                             ({**payload, "extra": 1}, "exactly the fields"),
                             ({**payload, "ciphertext": "%%"}, "not valid base64")):
            self.refused({**self.message, "encryptedPayload": changed}, why)
        self.refused(_with_body(self.message, counter=0), "between 1 and 2")
        self.refused(_with_body(self.message, rosterEpoch=3), "roster epoch")
        self.refused({**self.message, "envelope": None}, "carries no envelope")

    def test_a_body_that_does_not_decrypt(self) -> None:
        """A sender's body whose ciphertext does not open under the key it
        commits to (its envelope made for it all the same) is refused."""
        alice, bob = self.alice, self.bob
        key = os.urandom(32)
        header = replace(self.sealed.header, client_message_id="broken",
                         key_commitment=key_commitment(key))
        ciphertext = os.urandom(272)
        digest = message_digest(header.encode(), ciphertext)
        data = encode_envelope(alice.sessions[bob.id].encrypt(envelope_plaintext(key, digest),
                                                              NOW), None)
        message = {**self.message, "clientMessageId": "broken",
                   "encryptedPayload": {**self.message["encryptedPayload"],
                                        "header": header.to_json(),
                                        "ciphertext": base64.b64encode(ciphertext).decode()}}
        self.refused(_with_envelope(message, data), "does not decrypt under its committed key")

    def test_a_duplicate_counter(self) -> None:
        """A message whose counter was seen (a sender that reused it) is
        refused before its session takes its envelope."""
        header = replace(self.sealed.header, counter=1, client_message_id="again")
        sealed = seal(b"again", header, [Recipient(self.alice.sessions[self.bob.id])])
        ours = self.bob.sessions[self.alice.id]
        before = ours.export()
        with self.assertRaisesRegex(Duplicate, "received before"):
            open_message(delivered(sealed, self.bob), ours, NOW, counters=self.bob.counters)
        self.assertEqual(ours.export(), before)


# -- the counter tracker -----------------------------------------------------------

class CounterTests(SynchronousTestCase):
    def test_export_and_load(self) -> None:
        """The counters survive the vault: the same answers after a load."""
        counters = Counters()
        for chat, counter in (("a", 1), ("a", 4), ("b", 2)):
            counters.record(chat, "alice", 1, counter)
        loaded = Counters.load(json.loads(json.dumps(counters.export())))
        self.assertEqual(loaded.export(), counters.export())
        self.assertEqual(loaded.missing("a", "alice", 1), [2, 3])
        self.assertTrue(loaded.check("a", "alice", 1, 4).duplicate)
        self.assertTrue(loaded.check("a", "alice", 1, 3).late)
        for broken in ({"version": 2, "streams": []}, {"version": 1},
                       {"version": 1, "streams": [{"chatId": "a"}]}):
            with self.assertRaises(ValueError):
                Counters.load(broken)

    def test_memory_is_bounded(self) -> None:
        """A jump of a trillion, and gap after gap, keep at most
        max_missing counters; older missing ones are forgotten, and arrive
        as too old to tell from a replay."""
        counters = Counters(max_missing=10)
        arrival = counters.record("a", "alice", 1, 10**12)
        self.assertEqual(arrival.missing, range(1, 10**12))
        self.assertEqual(counters.missing("a", "alice", 1), list(range(10**12 - 10, 10**12)))
        for counter in range(10**12 + 2, 10**12 + 40, 2):
            counters.record("a", "alice", 1, counter)
        self.assertEqual(len(counters.missing("a", "alice", 1)), 10)
        self.assertLess(len(json.dumps(counters.export())), 400)
        old = counters.check("a", "alice", 1, 5)
        self.assertEqual((old.duplicate, old.reason),
                         (True, "message 5 of device 1 of alice in chat a is too old to tell "
                                "from a replay"))
        self.assertFalse(counters.check("a", "alice", 1, 10**12 + 39).duplicate)
        self.assertTrue(counters.record("a", "alice", 1, 10**12 + 38).duplicate)


# -- the vectors -----------------------------------------------------------------

VECTORS = json.loads((Path(__file__).parent / "vectors" / "messages-v4.json").read_text("utf-8"))


class VectorTests(ReplayedVectors):
    """tests/vectors/messages-v4.json, rebuilt from its inputs alone."""

    vectors = VECTORS

    def me(self, owner: str, device: int) -> sessions.Me:
        identity = self.identities[owner]
        private = sessions.identity_dh_private(identity.seed)
        public = sessions._public(private)
        return sessions.Me(sessions.Party(owner, device, identity.public_key, public), private,
                           sessions.sign_identity_dh(identity.signing_key, owner, public))

    def bundle(self, prekeys: dict[str, Any]) -> tuple[sessions.Bundle, sessions.PrekeySecrets]:
        owner, device = prekeys["cyphrId"], prekeys["deviceId"]
        secrets = sessions.PrekeySecrets(*(bytes.fromhex(prekeys[k]) for k in (
            "signedPrekeyPrivate", "lastResortKemSeed", "oneTimePrekeyPrivate")))
        signing_key = self.identities[owner].signing_key

        def prekey(kind: int, key_id: int, public: bytes) -> sessions.Prekey:
            return sessions.Prekey(kind, owner, device, key_id, self.now - 86_400_000,
                                   self.now + 30 * 86_400_000, public).signed(signing_key)

        me = self.me(owner, device)
        return sessions.Bundle(
            owner, device, me.party.identity_dh, me.identity_dh_signature,
            prekey(sessions.DH_SIGNED, 1, sessions._public(secrets.signed_prekey)),
            prekey(sessions.KEM_LAST_RESORT, 2, sessions._kem_public(secrets.kem_prekey_seed)),
            prekey(sessions.DH_ONE_TIME, 3, sessions._public(secrets.one_time_prekey))), secrets

    def test_the_message_rebuilds_byte_for_byte(self) -> None:
        v, inputs = VECTORS, VECTORS["inputs"]
        options = {"random": self.random, "encapsulate_with": self.encapsulate}
        alice1 = self.me("alice_01", 1)
        alice_key = self.identities["alice_01"].public_key
        (to_alice2_bundle, alice2_secrets), (to_bob_bundle, bob_secrets) = (
            self.bundle(p) for p in inputs["prekeys"])
        ephemerals = [bytes.fromhex(p["senderEphemeralPrivate"]) for p in inputs["prekeys"]]
        to_alice2, handshake = initiate(alice1, to_alice2_bundle, alice_key, self.now,
                                        ephemeral=ephemerals[0], **options)
        self.assertEqual(handshake.encode().hex(), v["setup"]["handshake"])
        first, answer = v["setup"]["messages"]
        made = to_alice2.encrypt(bytes.fromhex(first["plaintext"]), self.now)
        self.assertEqual(made.hex(), first["message"])
        alice2 = respond(self.me("alice_01", 2), handshake, alice_key, alice2_secrets,
                         self.now, **options)
        alice2.decrypt(made, self.now)
        made = alice2.encrypt(bytes.fromhex(answer["plaintext"]), self.now)
        self.assertEqual(made.hex(), answer["message"])
        to_alice2.decrypt(made, self.now)
        to_bob, to_bob_handshake = initiate(alice1, to_bob_bundle,
                                            self.identities["bob_02"].public_key, self.now,
                                            ephemeral=ephemerals[1], **options)
        self.assertEqual(to_bob_handshake.encode().hex(), v["handshakeToBob"])
        h = inputs["header"]
        header = BodyHeader(h["chatId"], h["senderId"], h["senderDeviceId"], h["messageType"],
                            h["clientMessageId"], h["counter"], h["sentAt"], h["directWith"])
        plaintext = bytes.fromhex(inputs["plaintext"])
        sealed = seal(plaintext, header, [Recipient(to_alice2, handshake),
                                          Recipient(to_bob, to_bob_handshake)],
                      random=self.random)
        self.assertEqual(sealed.payload, v["payload"])
        self.assertEqual(sealed.envelopes, v["sendEnvelopes"])
        content_key = bytes.fromhex(v["contentKey"])
        encoded = sealed.header.encode()
        self.assertEqual(encoded.hex(), v["headerBytes"])
        self.assertEqual(key_commitment(content_key).hex(), v["keyCommitment"])
        self.assertEqual([x.hex() for x in body_key(content_key)],
                         [v["bodyKey"], v["bodyNonce"]])
        ciphertext = bytes.fromhex(v["ciphertext"])
        self.assertEqual(message_digest(encoded, ciphertext).hex(), v["digest"])
        self.assertEqual(envelope_plaintext(content_key, bytes.fromhex(v["digest"])).hex(),
                         v["envelopePlaintext"])
        self.assertEqual([(e["kind"], decode_envelope(bytes.fromhex(e["envelope"]))[0])
                          for e in v["envelopes"]], [(MESSAGE, MESSAGE), (PREKEY, PREKEY)])
        # Each device opens it: alice's device 2 with its session, bob's
        # device 2 with the session the envelope's handshake starts.
        bob2 = respond(self.me("bob_02", 2), to_bob_handshake, alice_key, bob_secrets,
                       self.now, **options)
        for entry, reader in zip(v["envelopes"], (alice2, bob2)):
            message = {"encryptedPayload": v["payload"], "senderId": "alice_01",
                       "senderDeviceId": 1, "chatId": h["chatId"], "messageType": "text",
                       "clientMessageId": h["clientMessageId"],
                       "envelope": {"kind": entry["kind"], "envelope": base64.b64encode(
                           bytes.fromhex(entry["envelope"])).decode()}}
            self.assertEqual(open_message(message, reader, self.now).plaintext, plaintext)
        self.assertEqual(next(self.draws, None), None)

    def test_the_body_opens_with_a_second_implementation(self) -> None:
        """From the content key alone, with HKDF, SHA-256 and OpenSSL's
        ChaCha20-Poly1305 under an HChaCha20 subkey (no PyNaCl): the
        commitment, the key and nonce, the header bytes and the text."""
        import hashlib

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        v = VECTORS
        content_key = bytes.fromhex(v["contentKey"])

        def text(value: str) -> bytes:
            return len(value.encode()).to_bytes(4, "big") + value.encode()

        self.assertEqual(hashlib.sha256(text("cyphr-s1 key commitment") + content_key).hexdigest(),
                         v["keyCommitment"])
        derived = HKDF(hashes.SHA256(), 56, None, b"cyphr-s1 message body").derive(content_key)
        h = v["payload"]["header"]
        encoded = (text("cyphr-s1 message-header") + text(h["chatId"]) + text("")
                   + text(h["senderId"]) + h["senderDeviceId"].to_bytes(8, "big")
                   + text(h["messageType"]) + text(h["clientMessageId"])
                   + h["counter"].to_bytes(8, "big") + h["sentAt"].to_bytes(8, "big")
                   + bytes(8) + bytes(4) + (32).to_bytes(4, "big")
                   + base64.b64decode(h["keyCommitment"]))
        self.assertEqual(encoded.hex(), v["headerBytes"])
        padded = xchacha20poly1305_decrypt(derived[:32], derived[32:],
                                           base64.b64decode(v["payload"]["ciphertext"]), encoded)
        self.assertEqual(padded.hex(), v["paddedPlaintext"])
        length = int.from_bytes(padded[:4], "big")
        self.assertEqual(padded[4:4 + length].hex(), v["inputs"]["plaintext"])
        digest = hashlib.sha256(text("cyphr-s1 message digest") + len(encoded).to_bytes(4, "big")
                                + encoded + (len(padded) + 16).to_bytes(4, "big")
                                + base64.b64decode(v["payload"]["ciphertext"])).hexdigest()
        self.assertEqual(digest, v["digest"])
        self.assertEqual(read_envelope_plaintext(bytes.fromhex(v["envelopePlaintext"])),
                         (content_key, bytes.fromhex(digest)))

    def test_the_file_is_current(self) -> None:
        """tools/make_vectors.py would write exactly the shipped file."""
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
        try:
            import make_vectors
        finally:
            sys.path.pop(0)
        self.assertEqual(make_vectors.build_session_messages(), VECTORS)
