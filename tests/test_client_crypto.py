"""The client's end-to-end scheme (v2: labelled signatures, binary
associated data, key bindings), v1 payloads as old history, the pin backup,
and the profile vault, without a server."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import stat
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mlkem import (
    MLKEM1024PrivateKey,
    MLKEM1024PublicKey,
)
from kyber_py.ml_kem import ML_KEM_1024
from twisted.trial.unittest import SynchronousTestCase

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt

from cyphr import signing
from cyphr.client import crypto
from cyphr.client.crypto import (
    BadSignature,
    Identity,
    InvalidPhrase,
    KeyRefused,
    MalformedPayload,
    NotARecipient,
    Prekey,
    Recipient,
    TamperedHeader,
    TamperedMessage,
    UnknownPrekey,
    b64,
)
from cyphr.client.profile import Profile, ProfileError
from cyphr.crypto import is_mlkem1024_key, verify_kyber_key_signature

STRONG = "correct horse battery staple 4711"

PHRASE = ("abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon "
          "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon "
          "abandon abandon abandon art")


class User:
    """An identity with a few one-time prekeys, as a device holds them."""

    def __init__(self, cyphr_id: str) -> None:
        self.cyphr_id = cyphr_id
        self.identity = Identity.from_phrase(crypto.new_phrase())
        self.prekeys = {key_id: Prekey.generate(key_id) for key_id in (1, 2, 3)}

    def as_recipient(self, key_id: int | None = None) -> Recipient:
        if key_id is None:
            return Recipient(self.cyphr_id, self.identity.public_key,
                             self.identity.kyber_public_key, self.identity.generation)
        return Recipient(self.cyphr_id, self.identity.public_key, self.prekeys[key_id].public_key,
                         key_id, one_time=True)

    def prekey_seeds(self) -> dict[int, bytes]:
        return {key_id: prekey.seed for key_id, prekey in self.prekeys.items()}


def envelope(payload: dict[str, Any], chat_id: str = "chat-1") -> dict[str, Any]:
    header = payload["header"]
    return {"chatId": chat_id, "senderId": header["senderId"],
            "messageType": header["messageType"], "clientMessageId": header["clientMessageId"]}


def signed_content(payload: dict[str, Any]) -> bytes:
    """What a v2 payload's signature covers, rebuilt from its JSON."""
    parsed = crypto._parse_v2(payload)
    return signing.message_content(parsed.header, parsed.nonce, parsed.ciphertext, parsed.tag,
                                   parsed.keys)


def resign(payload: dict[str, Any], sender: User) -> dict[str, Any]:
    """The payload signed again by its sender: what a tampering that also
    had the sender's key would give, to reach the checks behind the
    signature."""
    return dict(payload, signature=b64(sender.identity.sign_with_label(
        signing.MESSAGE, signed_content(payload))))


def seal_v1(sender: Identity, sender_id: str, recipients: list[Recipient], plaintext: bytes, *,
            chat_id: str | None, message_type: str, client_message_id: str) -> dict[str, Any]:
    """A payload as the v1 client sealed it (JSON header as associated data,
    a raw Ed25519 signature over canonical JSON): old history."""
    recipients = sorted(recipients, key=lambda r: r.cyphr_id)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    header = {"chatId": chat_id, "senderId": sender_id, "messageType": message_type,
              "clientMessageId": client_message_id,
              "recipients": [r.cyphr_id for r in recipients], "ephemeralKey": b64(ephemeral_public)}
    aad = crypto._V1_HEADER_CONTEXT + crypto._v1_canonical(header)
    content_key, nonce = os.urandom(32), os.urandom(24)
    sealed = crypto._aead_encrypt(content_key, nonce, crypto.pad(plaintext), aad)
    keys = []
    for r in recipients:
        kem_secret, kyber_ciphertext = MLKEM1024PublicKey.from_public_bytes(
            r.kyber_public_key).encapsulate()
        their_x25519 = crypto.identity_x25519(r.identity_key)
        wrap = crypto._wrap_key(kem_secret, crypto._x25519(ephemeral, their_x25519), aad,
                                r.cyphr_id, kyber_ciphertext, ephemeral_public, their_x25519)
        wrap_nonce = os.urandom(24)
        keys.append({"recipientId": r.cyphr_id, "keyId": r.key_id if r.one_time else None,
                     "kyberCiphertext": b64(kyber_ciphertext), "nonce": b64(wrap_nonce),
                     "wrappedKey": b64(crypto._aead_encrypt(wrap, wrap_nonce, content_key,
                                                            aad + r.cyphr_id.encode()))})
    payload: dict[str, Any] = {"version": 1, "scheme": "cyphr-hybrid-v1", "header": header,
                               "nonce": b64(nonce), "encryptedMessage": b64(sealed[:-16]),
                               "tag": b64(sealed[-16:]), "keys": keys}
    payload["signature"] = b64(sender.signing_key.sign(
        crypto._V1_SIGNATURE_CONTEXT + crypto._v1_canonical(payload)).signature)
    return payload


class SealTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.alice = User("alice")
        self.others = [User(name) for name in ("bob", "carol", "dave", "erin")]

    def seal(self, text: bytes, recipients: list[Recipient], **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("chat_id", "chat-1")
        kwargs.setdefault("message_type", "text")
        kwargs.setdefault("client_message_id", "cm-1")
        return crypto.seal(self.alice.identity, "alice", recipients, text, **kwargs)

    def open(self, payload: Any, reader: User, **kwargs: Any) -> crypto.Opened:
        kwargs.setdefault("envelope", envelope(payload) if isinstance(payload, dict)
                          and isinstance(payload.get("header"), dict) else {})
        kwargs.setdefault("sender_key", self.alice.identity.public_key)
        kwargs.setdefault("prekeys", reader.prekey_seeds())
        return crypto.open_sealed(payload, reader=reader.identity, reader_id=reader.cyphr_id,
                                  **kwargs)

    def test_one_recipient_and_the_sender(self) -> None:
        """A message sealed to one recipient's prekey opens for that recipient
        (naming the key) and for the sender with its main key; the payload
        is plain JSON with the original field names and version 2."""
        bob = self.others[0]
        payload = self.seal("hello, bob ☃".encode(),
                            [self.alice.as_recipient(), bob.as_recipient(key_id=2)])
        opened = self.open(payload, bob)
        self.assertEqual(opened.plaintext, "hello, bob ☃".encode())
        self.assertEqual(opened.key_id, 2)
        # The sender reads its own history with its main key.
        self.assertEqual(self.open(payload, self.alice).plaintext, "hello, bob ☃".encode())
        # The original field names are kept; the payload is plain JSON.
        for name in ("encryptedMessage", "nonce", "tag", "version", "signature"):
            self.assertIn(name, payload)
        self.assertEqual((payload["version"], payload["scheme"]), (2, "cyphr-hybrid-v2"))
        self.assertEqual(json.loads(json.dumps(payload)), payload)
        # Each wrapped key names the key it was sealed to.
        self.assertEqual([(k["recipientId"], k["keyId"], k["oneTime"]) for k in payload["keys"]],
                         [("alice", 0, False), ("bob", 2, True)])
        self.assertTrue(opened.verified)

    def test_five_recipients(self) -> None:
        """A message sealed to five people opens for each of them and for
        nobody else (NotARecipient)."""
        text = os.urandom(3000)
        recipients = [self.alice.as_recipient()] + [u.as_recipient(key_id=1) for u in self.others]
        payload = self.seal(text, recipients)
        self.assertEqual(len(payload["keys"]), 5)
        for reader in [self.alice] + self.others:
            self.assertEqual(self.open(payload, reader).plaintext, text)
        stranger = User("mallory")
        with self.assertRaises(NotARecipient):
            self.open(payload, stranger)

    def test_padding_hides_the_length(self) -> None:
        """Plaintexts are padded to fixed sizes (256 bytes, then 1024), so
        nearby lengths give equal ciphertext lengths; pad and unpad
        round-trip at every size."""
        recipients = [self.alice.as_recipient()]
        short = self.seal(b"hi", recipients)
        longer = self.seal(b"x" * 200, recipients)
        self.assertEqual(len(short["encryptedMessage"]), len(longer["encryptedMessage"]))
        self.assertEqual(len(base64.b64decode(short["encryptedMessage"])), 256)
        bigger = self.seal(b"x" * 300, recipients)
        self.assertEqual(len(base64.b64decode(bigger["encryptedMessage"])), 1024)
        for size in (0, 251, 252, 253, 5000, 70000):
            data = os.urandom(size)
            self.assertEqual(crypto.unpad(crypto.pad(data)), data)

    def bob_payload(self) -> tuple[User, dict[str, Any]]:
        bob = self.others[0]
        return bob, self.seal(b"secret", [self.alice.as_recipient(), bob.as_recipient(key_id=1)])

    def test_tampered_ciphertext(self) -> None:
        """A changed ciphertext byte breaks the signature; signed again, the
        AEAD still refuses it."""
        bob, payload = self.bob_payload()
        raw = bytearray(base64.b64decode(payload["encryptedMessage"]))
        raw[10] ^= 1
        payload["encryptedMessage"] = b64(bytes(raw))
        with self.assertRaises(BadSignature):
            self.open(payload, bob)
        # Behind the signature, the AEAD refuses it too.
        with self.assertRaises(TamperedMessage):
            self.open(resign(payload, self.alice), bob)

    def test_tampered_tag_and_nonce(self) -> None:
        """A changed tag or nonce breaks the signature; signed again, the AEAD
        still refuses it."""
        bob, payload = self.bob_payload()
        for name in ("tag", "nonce"):
            altered = copy.deepcopy(payload)
            raw = bytearray(base64.b64decode(altered[name]))
            raw[0] ^= 0x80
            altered[name] = b64(bytes(raw))
            with self.assertRaises(BadSignature):
                self.open(altered, bob)
            with self.assertRaises(TamperedMessage):
                self.open(resign(altered, self.alice), bob)

    def test_tampered_header(self) -> None:
        """A changed header field breaks the signature; signed again it must
        still match what the server says of the message, and the AEAD binds
        the header the sender sealed with."""
        bob, payload = self.bob_payload()
        for name, value in (("messageType", "payment"), ("chatId", "chat-2"),
                            ("senderId", "bob"), ("clientMessageId", "cm-2")):
            altered = copy.deepcopy(payload)
            altered["header"][name] = value
            with self.assertRaises(BadSignature):
                self.open(altered, bob, envelope=envelope(payload))
            # Signed again (by the sender), the header still must match
            # what the server says of the message...
            with self.assertRaises(TamperedHeader):
                self.open(resign(altered, self.alice), bob, envelope=envelope(payload))
        # ...and when the envelope is made to match, the AEAD binds the
        # header the sender sealed with.
        altered = copy.deepcopy(payload)
        altered["header"]["messageType"] = "payment"
        with self.assertRaises(TamperedMessage):
            self.open(resign(altered, self.alice), bob, envelope=envelope(altered))

    def test_delivered_to_another_chat(self) -> None:
        """A message the server delivers in another chat than it was sealed for
        is refused as a tampered header."""
        bob, payload = self.bob_payload()
        with self.assertRaises(TamperedHeader):
            self.open(payload, bob, envelope=envelope(payload, chat_id="chat-2"))

    def test_first_direct_message_names_its_chat_by_members(self) -> None:
        """A first direct message (no chat id yet) opens only when the reader
        knows the chat as the direct chat of exactly those two members."""
        bob = self.others[0]
        payload = self.seal(b"first", [self.alice.as_recipient(), bob.as_recipient()], chat_id=None)
        members = frozenset({"alice", "bob"})
        self.assertEqual(self.open(payload, bob, direct_members=members).plaintext, b"first")
        with self.assertRaises(TamperedHeader):
            self.open(payload, bob)  # not known as a direct chat
        with self.assertRaises(TamperedHeader):
            self.open(payload, bob, direct_members=frozenset({"bob", "carol"}))

    def test_bad_signature(self) -> None:
        """A message checked against another sender's key, or with a changed
        signature, is refused BadSignature."""
        bob, payload = self.bob_payload()
        with self.assertRaises(BadSignature):
            self.open(payload, bob, sender_key=bob.identity.public_key)
        signature = bytearray(base64.b64decode(payload["signature"]))
        signature[0] ^= 1
        payload["signature"] = b64(bytes(signature))
        with self.assertRaises(BadSignature):
            self.open(payload, bob)

    def test_recipient_list(self) -> None:
        """Adding a recipient to the header or dropping a wrapped key breaks
        the signature; signed again, an added recipient is still refused."""
        bob, payload = self.bob_payload()
        carol = self.others[1]
        # Adding a recipient to the header.
        altered = copy.deepcopy(payload)
        altered["header"]["recipients"].append("carol")
        with self.assertRaises(BadSignature):
            self.open(altered, carol)
        with self.assertRaises(TamperedHeader):
            self.open(resign(altered, self.alice), carol)
        # Dropping one.
        altered = copy.deepcopy(payload)
        altered["keys"] = altered["keys"][1:]
        with self.assertRaises(BadSignature):
            self.open(altered, bob)
        with self.assertRaises(TamperedHeader):
            self.open(resign(altered, self.alice), bob)
        # Renaming an entry for another reader.
        altered = copy.deepcopy(payload)
        altered["keys"][1]["recipientId"] = "carol"
        altered["header"]["recipients"] = ["alice", "carol"]
        with self.assertRaises(BadSignature):
            self.open(altered, carol, envelope=envelope(payload))
        with self.assertRaises(TamperedMessage):
            self.open(resign(altered, self.alice), carol, envelope=envelope(payload),
                      prekeys=bob.prekey_seeds())

    def test_swapped_wrapped_keys(self) -> None:
        """Wrapped keys swapped between two recipients break the signature;
        signed again, neither recipient can open the message."""
        bob = self.others[0]
        carol = self.others[1]
        payload = self.seal(b"three", [self.alice.as_recipient(), bob.as_recipient(),
                                       carol.as_recipient()])
        altered = copy.deepcopy(payload)
        b, c = altered["keys"][1], altered["keys"][2]
        for name in ("kyberCiphertext", "nonce", "wrappedKey"):
            b[name], c[name] = c[name], b[name]
        with self.assertRaises(BadSignature):
            self.open(altered, bob)
        for reader in (bob, carol):
            with self.assertRaises(TamperedMessage):
                self.open(resign(altered, self.alice), reader)

    def test_malformed(self) -> None:
        """Every malformed payload (wrong types, versions, scheme, base64,
        extra fields, unsorted recipients, a null key id) is refused as
        malformed or badly signed, never crashes."""
        bob, payload = self.bob_payload()
        unsorted = copy.deepcopy(payload)
        unsorted["header"]["recipients"].reverse()
        null_key_id = copy.deepcopy(payload)
        null_key_id["keys"][0]["keyId"] = None
        for bad in (None, [], "text", {}, {"version": 2, "scheme": crypto.SCHEME},
                    dict(payload, version=3), dict(payload, version=2.0), dict(payload, version=True),
                    dict(payload, scheme="cyphr-hybrid-v1"),
                    dict(payload, signature="not base64!"), dict(payload, header=[]),
                    dict(payload, extra="x"), unsorted, null_key_id):
            with self.assertRaises((MalformedPayload, BadSignature)):
                self.open(bad, bob, envelope={})

    def test_unknown_fields_are_refused(self) -> None:
        """A field the signature does not cover (in the payload, the header
        or a wrapped key) is refused rather than ignored."""
        bob, payload = self.bob_payload()
        for where in ("payload", "header", "key"):
            altered = copy.deepcopy(payload)
            target = {"payload": altered, "header": altered["header"],
                      "key": altered["keys"][1]}[where]
            target["note"] = "added by the server"
            with self.assertRaises(MalformedPayload):
                self.open(altered, bob)

    def test_every_field_is_signed(self) -> None:
        """Changing any one field of the payload, the header or a wrapped
        key (scheme, ids, flags, bytes) breaks the signature."""
        bob, payload = self.bob_payload()
        self.assertEqual(self.open(payload, bob).plaintext, b"secret")

        def flip(value: str) -> str:
            raw = bytearray(base64.b64decode(value))
            raw[-1] ^= 1
            return b64(bytes(raw))

        changes: list[tuple[str, Any]] = [
            ("nonce", lambda p: p.update(nonce=flip(p["nonce"]))),
            ("encryptedMessage", lambda p: p.update(encryptedMessage=flip(p["encryptedMessage"]))),
            ("tag", lambda p: p.update(tag=flip(p["tag"]))),
            ("header.chatId", lambda p: p["header"].update(chatId="chat-2")),
            ("header.chatId null", lambda p: p["header"].update(chatId=None)),
            ("header.senderId", lambda p: p["header"].update(senderId="bob")),
            ("header.messageType", lambda p: p["header"].update(messageType="payment")),
            ("header.clientMessageId", lambda p: p["header"].update(clientMessageId="cm-2")),
            ("header.recipients", lambda p: p["header"].update(recipients=["alice", "bob", "carol"])),
            ("header.ephemeralKey", lambda p: p["header"].update(
                ephemeralKey=flip(p["header"]["ephemeralKey"]))),
        ]
        for name in ("kyberCiphertext", "nonce", "wrappedKey"):
            changes.append((f"keys.{name}", lambda p, name=name: p["keys"][1].update(
                {name: flip(p["keys"][1][name])})))
        changes += [
            ("keys.keyId", lambda p: p["keys"][1].update(keyId=2)),
            ("keys.oneTime", lambda p: p["keys"][1].update(oneTime=False)),
            ("keys.recipientId", lambda p: p["keys"][0].update(recipientId="alicf")),
            ("keys order", lambda p: p["keys"].reverse()),
        ]
        for what, change in changes:
            altered = copy.deepcopy(payload)
            change(altered)
            with self.assertRaises((BadSignature, MalformedPayload), msg=what):
                self.open(altered, bob, envelope=envelope(payload),
                          direct_members=frozenset({"alice", "bob"}))

    def test_the_key_entry_names_the_key(self) -> None:
        """A reader opens with the key the entry names and tries no other:
        a main key's id is its generation; a newer generation than the
        reader's, or a one-time flag the sender did not set, does not open."""
        bob = self.others[0]
        rotated = Identity(bob.identity.seed, 1)
        to_main = self.seal(b"to gen 1", [self.alice.as_recipient(),
                                          Recipient("bob", rotated.public_key,
                                                    rotated.kyber_public_key, 1)])
        opened = crypto.open_sealed(to_main, reader=rotated, reader_id="bob",
                                    sender_key=self.alice.identity.public_key,
                                    envelope=envelope(to_main))
        self.assertEqual((opened.plaintext, opened.key_id), (b"to gen 1", None))
        with self.assertRaises(UnknownPrekey):
            self.open(to_main, bob)  # bob's device still at generation 0
        # Signed as sealed to generation 0 though it went to generation 1:
        # generation 0 is the only one tried, and it does not open.
        altered = copy.deepcopy(to_main)
        altered["keys"][1]["keyId"] = 0
        with self.assertRaises(TamperedMessage):
            crypto.open_sealed(resign(altered, self.alice), reader=rotated, reader_id="bob",
                               sender_key=self.alice.identity.public_key, envelope=envelope(to_main))
        # A prekey entry relabelled as the main key (and re-signed).
        _, payload = self.bob_payload()
        altered = copy.deepcopy(payload)
        altered["keys"][1]["oneTime"] = False
        altered["keys"][1]["keyId"] = 0
        with self.assertRaises(TamperedMessage):
            self.open(resign(altered, self.alice), bob)

    def test_content_is_bound_to_the_binary_header(self) -> None:
        """The content's associated data is MessageHeader.aad(): the binary
        encoding, not JSON."""
        bob, payload = self.bob_payload()
        opened = self.open(payload, bob)
        header = crypto._parse_v2(payload).header
        self.assertEqual(header.recipients, ("alice", "bob"))
        padded = crypto_aead_xchacha20poly1305_ietf_decrypt(
            base64.b64decode(payload["encryptedMessage"]) + base64.b64decode(payload["tag"]),
            header.aad(), base64.b64decode(payload["nonce"]), opened.content_key)
        self.assertEqual(crypto.unpad(padded), b"secret")

    def test_message_signature_is_no_other_kind(self) -> None:
        """A message's signature verifies only under the label message:
        not as a login statement, a key binding or a wallet link, and not
        as a raw Ed25519 signature of its content."""
        _, payload = self.bob_payload()
        content = signed_content(payload)
        signature = base64.b64decode(payload["signature"])
        key = self.alice.identity.public_key
        self.assertTrue(signing.verify_with_label(key, signing.MESSAGE, content, signature))
        for label in signing.LABELS:
            if label != signing.MESSAGE:
                self.assertFalse(signing.verify_with_label(key, label, content, signature), label)
        from nacl.signing import VerifyKey
        for raw in (content, signing.opaque(content)):
            self.assertRaises(Exception, VerifyKey(key).verify, raw, signature)

    def test_v1_payload_is_shown_unverified(self) -> None:
        """A v1 payload (old history) still opens, but is reported as not
        verified: its signature cannot prove the sender. Its checks still
        hold (a bad v1 signature or another chat is refused)."""
        bob = self.others[0]
        payload = seal_v1(self.alice.identity, "alice",
                          [self.alice.as_recipient(), bob.as_recipient(key_id=1)], b"old times",
                          chat_id="chat-1", message_type="text", client_message_id="cm-1")
        opened = self.open(payload, bob)
        self.assertEqual((opened.plaintext, opened.version, opened.verified, opened.key_id),
                         (b"old times", 1, False, 1))
        self.assertIn("v1", crypto.V1_UNVERIFIED)
        self.assertIn("cannot prove the sender", crypto.V1_UNVERIFIED)
        # The sender's own copy, to its main key (v1 named no generation).
        self.assertFalse(self.open(payload, self.alice).verified)
        with self.assertRaises(BadSignature):
            self.open(payload, bob, sender_key=bob.identity.public_key)
        with self.assertRaises(TamperedHeader):
            self.open(payload, bob, envelope=envelope(payload, chat_id="chat-2"))
        # A v1 payload cannot pass for v2 (or the reverse) by its version.
        with self.assertRaises((MalformedPayload, BadSignature)):
            self.open(dict(payload, version=2, scheme=crypto.SCHEME), bob)

    def test_prekey_is_used_once(self) -> None:
        """Once the prekey's secret is erased after first use, the message no
        longer opens with it, but still opens with the content key the
        device kept."""
        bob, payload = self.bob_payload()
        opened = self.open(payload, bob)
        self.assertEqual(opened.key_id, 1)
        # The device erases the prekey's secret once it has opened a message
        # with it; the message still opens with the content key kept.
        del bob.prekeys[1]
        with self.assertRaises(UnknownPrekey):
            self.open(payload, bob)
        again = self.open(payload, bob, content_key=opened.content_key)
        self.assertEqual(again.plaintext, b"secret")

    def test_sender_must_be_a_recipient(self) -> None:
        """Sealing refuses a recipient list without the sender, or with a
        recipient twice."""
        with self.assertRaises(crypto.CryptoError):
            self.seal(b"x", [self.others[0].as_recipient()])
        with self.assertRaises(crypto.CryptoError):
            self.seal(b"x", [self.alice.as_recipient(), self.alice.as_recipient()])


class IdentityTests(SynchronousTestCase):
    def test_phrase_re_derives_the_same_keys(self) -> None:
        """A 24-word phrase (whatever its case and spacing) derives the same
        identity and ML-KEM keys every time; another phrase derives other
        keys."""
        phrase = crypto.new_phrase()
        self.assertEqual(len(phrase.split()), 24)
        one, two = Identity.from_phrase(phrase), Identity.from_phrase("  " + phrase.upper() + "\n")
        self.assertEqual(one.public_key, two.public_key)
        self.assertEqual(one.kyber_public_key, two.kyber_public_key)
        self.assertEqual(one.kem_key.private_bytes_raw(), two.kem_key.private_bytes_raw())
        other = Identity.from_phrase(crypto.new_phrase())
        self.assertNotEqual(one.public_key, other.public_key)
        self.assertNotEqual(one.kyber_public_key, other.kyber_public_key)

    def test_known_phrase(self) -> None:
        """A fixed phrase gives fixed keys: a change of derivation would lock
        every user out of their identity."""
        identity = Identity.from_phrase(PHRASE)
        self.assertEqual(identity.seed.hex()[:32], "408b285c123836004f4b8842c89324c1")
        self.assertEqual(identity.public_key.hex(),
                         "52885a87f0e0d35999035c6f1191c912c6753afcfbe6b12606f3ae9f9f7b074a")
        self.assertEqual(hashlib.sha256(identity.kyber_public_key).hexdigest(),
                         "772d2ce55bd934310b76ce6bbf11a039307c86f019944f92a160ae5a4b63f6e9")

    def test_keys_are_signed_as_v2_bindings(self) -> None:
        """The main key is signed as the owner's key number ``generation``
        for 180 days; a prekey as a one-time prekey for 90 days; neither
        signature passes for the other kind, another owner or other times."""
        identity = Identity(Identity.from_phrase(crypto.new_phrase()).seed, 3)
        self.assertTrue(is_mlkem1024_key(identity.kyber_public_key))
        now = 1_800_000_000_123
        form = identity.main_key_form("alice", now)
        self.assertEqual(set(form), {"kyberPublicKey", "kyberKeySignature", "kyberKeyId",
                                     "kyberKeyCreatedAt", "kyberKeyExpiresAt"})
        self.assertEqual(form["kyberKeyId"], 3)
        self.assertEqual(form["kyberKeyCreatedAt"], "2027-01-15T08:00:00.123Z")
        expires = now + 180 * 86400 * 1000
        self.assertEqual(crypto.parse_iso_ms(form["kyberKeyExpiresAt"], "x"), expires)
        signature = base64.b64decode(form["kyberKeySignature"])
        main = signing.KeyBinding(False, "alice", 3, now, expires, identity.kyber_public_key)
        self.assertTrue(main.verify(identity.public_key, signature))
        for other in (signing.KeyBinding(True, "alice", 3, now, expires, identity.kyber_public_key),
                      signing.KeyBinding(False, "bob", 3, now, expires, identity.kyber_public_key),
                      signing.KeyBinding(False, "alice", 2, now, expires, identity.kyber_public_key),
                      signing.KeyBinding(False, "alice", 3, now, expires + 1,
                                         identity.kyber_public_key)):
            self.assertFalse(other.verify(identity.public_key, signature))
        # No v1 signature any more.
        self.assertFalse(verify_kyber_key_signature(identity.public_key, identity.kyber_public_key,
                                                    signature))
        prekey = Prekey.generate(5)
        entry = prekey.upload_form(identity, "alice", now)
        self.assertEqual((entry["keyId"], entry["createdAt"]), (5, "2027-01-15T08:00:00.123Z"))
        binding = signing.KeyBinding(True, "alice", 5, now, now + 90 * 86400 * 1000,
                                     prekey.public_key)
        self.assertTrue(binding.verify(identity.public_key, base64.b64decode(entry["signature"])))
        self.assertFalse(signing.KeyBinding(False, "alice", 5, now, now + 90 * 86400 * 1000,
                                            prekey.public_key).verify(
            identity.public_key, base64.b64decode(entry["signature"])))
        self.assertFalse(hasattr(identity, "sign"))  # nothing is signed raw

    def test_rotated_generations(self) -> None:
        """A rotated generation keeps the identity key and gets a new ML-KEM
        key, and still holds the older ones: a message sealed to generation
        0 opens after two rotations."""
        identity = Identity.from_phrase(crypto.new_phrase())
        rotated = Identity(identity.seed, 2)
        self.assertNotEqual(rotated.kyber_public_key, identity.kyber_public_key)
        self.assertEqual(rotated.public_key, identity.public_key)
        self.assertEqual([k.public_key().public_bytes_raw() for k in rotated.kem_keys()][-1],
                         identity.kyber_public_key)
        # A message sealed to generation 0 still opens after two rotations.
        payload = crypto.seal(identity, "me", [Recipient("me", identity.public_key,
                                                         identity.kyber_public_key, 0)],
                              b"old", chat_id="c", message_type="text", client_message_id="m")
        opened = crypto.open_sealed(payload, reader=rotated, reader_id="me",
                                    sender_key=identity.public_key, envelope=envelope(payload, "c"))
        self.assertEqual(opened.plaintext, b"old")

    def test_bad_phrases(self) -> None:
        """A phrase too short, with an unknown word or a wrong checksum is
        refused InvalidPhrase."""
        words = crypto.new_phrase().split()
        for bad in (" ".join(words[:12]), " ".join(words[:-1] + ["notaword"]),
                    " ".join(words[:-1] + [words[0] if words[-1] != words[0] else words[1]])):
            with self.assertRaises(InvalidPhrase):
                Identity.from_phrase(bad)

    def test_safety_number(self) -> None:
        """The safety number of two people is the same from either side, is
        twelve groups of five digits, and changes when a key changes."""
        a, b = Identity.from_phrase(crypto.new_phrase()), Identity.from_phrase(crypto.new_phrase())
        number = crypto.safety_number("alice", a.public_key, "bob", b.public_key)
        self.assertEqual(number, crypto.safety_number("bob", b.public_key, "alice", a.public_key))
        self.assertRegex(number, r"^(\d{5} ){11}\d{5}$")
        c = Identity.from_phrase(crypto.new_phrase())
        self.assertNotEqual(number, crypto.safety_number("alice", a.public_key, "bob", c.public_key))


class MLKEMInteroperabilityTests(SynchronousTestCase):
    """cryptography (OpenSSL) and kyber-py are two implementations of FIPS
    203: each opens what the other sealed, and both derive the same keys
    from the same seed."""

    def test_same_keys_from_a_seed(self) -> None:
        """cryptography and kyber-py derive the same ML-KEM-1024 public key
        from one seed."""
        seed = os.urandom(64)
        ek, _ = ML_KEM_1024.key_derive(seed)
        self.assertEqual(MLKEM1024PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw(), ek)

    def test_cryptography_encapsulates_kyber_py_decapsulates(self) -> None:
        """A secret encapsulated by cryptography is recovered by kyber-py."""
        ek, dk = ML_KEM_1024.keygen()
        secret, ciphertext = MLKEM1024PublicKey.from_public_bytes(ek).encapsulate()
        self.assertEqual(len(ciphertext), 1568)
        self.assertEqual(ML_KEM_1024.decaps(dk, ciphertext), secret)

    def test_kyber_py_encapsulates_cryptography_decapsulates(self) -> None:
        """A secret encapsulated by kyber-py is recovered by cryptography."""
        private = MLKEM1024PrivateKey.generate()
        secret, ciphertext = ML_KEM_1024.encaps(private.public_key().public_bytes_raw())
        self.assertEqual(private.decapsulate(ciphertext), secret)

    def test_a_message_sealed_to_a_kyber_py_key(self) -> None:
        """The whole scheme, with the recipient's key made by kyber-py from
        the recipient's seed."""
        reader = Identity.from_phrase(crypto.new_phrase())
        seed = reader.kem_key.private_bytes_raw()
        ek, _ = ML_KEM_1024.key_derive(seed)
        sender = Identity.from_phrase(crypto.new_phrase())
        payload = crypto.seal(sender, "s", [Recipient("s", sender.public_key,
                                                      sender.kyber_public_key, 0),
                                            Recipient("r", reader.public_key, ek, 0)],
                              b"interop", chat_id="c", message_type="text", client_message_id="m")
        opened = crypto.open_sealed(payload, reader=reader, reader_id="r",
                                    sender_key=sender.public_key, envelope=envelope(payload, "c"))
        self.assertEqual(opened.plaintext, b"interop")


class ProfileTests(SynchronousTestCase):
    def test_vault_is_sealed_and_private(self) -> None:
        """The profile's files are private (0600 in a 0700 directory) and hold
        no seed, fingerprint or passphrase in any encoding; the vault
        reopens with the passphrase."""
        directory = self.mktemp()
        seed = os.urandom(64)
        profile = Profile.create(directory, STRONG, {"server": "http://x"},
                                 {"seed": b64(seed), "fingerprint": "ab" * 32})
        for name in ("vault.json", "profile.json"):
            mode = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            self.assertEqual(mode, 0o600, name)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        raw = b"".join(open(os.path.join(directory, n), "rb").read() for n in os.listdir(directory))
        for needle in (seed, b64(seed).encode(), seed.hex().encode(), b"ab" * 32, STRONG.encode()):
            self.assertNotIn(needle, raw)
        profile.vault["token"] = "t"
        profile.save()
        again = Profile.open(directory, STRONG)
        self.assertEqual(again.vault["seed"], b64(seed))
        self.assertEqual(again.vault["token"], "t")
        with self.assertRaises(ProfileError):
            Profile.open(directory, "wrong horse")
        with self.assertRaises(ProfileError):
            Profile.create(directory, "x", {}, {})
        with self.assertRaises(ProfileError):
            Profile.open(self.mktemp(), STRONG)

    def test_damaged_vault(self) -> None:
        """A vault whose ciphertext was changed, or that is no JSON, is refused
        with a ProfileError."""
        directory = self.mktemp()
        Profile.create(directory, STRONG, {}, {"seed": "x"})
        path = os.path.join(directory, "vault.json")
        sealed = json.load(open(path))
        raw = bytearray(base64.b64decode(sealed["ciphertext"]))
        raw[0] ^= 1
        sealed["ciphertext"] = b64(bytes(raw))
        json.dump(sealed, open(path, "w"))
        with self.assertRaises(ProfileError):
            Profile.open(directory, STRONG)
        open(path, "w").write("not json")
        with self.assertRaises(ProfileError):
            Profile.open(directory, STRONG)


class PinBackupTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """The backup opens with the same seed and Cyphr ID, and holds what
        was sealed."""
        seed = os.urandom(64)
        pins = {"bob": {"identityKey": b64(os.urandom(32)), "verified": True, "highestKeyId": 4}}
        blob = crypto.seal_pin_backup(seed, "alice", {"counter": 7, "pins": pins})
        self.assertEqual(crypto.open_pin_backup(seed, "alice", blob),
                         {"counter": 7, "pins": pins})
        # A fresh nonce each time.
        self.assertNotEqual(blob[:24], crypto.seal_pin_backup(seed, "alice", {"pins": {}})[:24])

    def test_the_construction(self) -> None:
        """Key = HKDF-SHA256(seed, info "cyphr-v2 pin-backup-key"); blob =
        24-byte nonce || XChaCha20-Poly1305 with AAD text("cyphr-v2
        pin-backup") + text(cyphr_id): what another client must rebuild."""
        seed = os.urandom(64)
        blob = crypto.seal_pin_backup(seed, "alice", {"pins": {}})
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"cyphr-v2 pin-backup-key").derive(seed)
        aad = signing.text("cyphr-v2 pin-backup") + signing.text("alice")
        plaintext = crypto_aead_xchacha20poly1305_ietf_decrypt(blob[24:], aad, blob[:24], key)
        self.assertEqual(json.loads(plaintext), {"pins": {}})

    def test_refused(self) -> None:
        """Another seed, another Cyphr ID, a flipped bit or a short blob:
        refused."""
        seed = os.urandom(64)
        blob = crypto.seal_pin_backup(seed, "alice", {"pins": {}})
        damaged = bytearray(blob)
        damaged[30] ^= 1
        for other_seed, cyphr_id, data in ((os.urandom(64), "alice", blob), (seed, "bob", blob),
                                           (seed, "alice", bytes(damaged)),
                                           (seed, "alice", blob[:30])):
            with self.assertRaises(TamperedMessage):
                crypto.open_pin_backup(other_seed, cyphr_id, data)


class WireTimeTests(SynchronousTestCase):
    def test_times(self) -> None:
        """Times are ISO 8601 UTC with milliseconds, parsed strictly."""
        self.assertEqual(crypto.iso_ms(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(crypto.iso_ms(1_800_000_000_007), "2027-01-15T08:00:00.007Z")
        self.assertEqual(crypto.parse_iso_ms("2027-01-15T08:00:00.007Z", "t"), 1_800_000_000_007)
        for bad in ("2027-01-15T08:00:00Z", "2027-01-15T08:00:00.007+00:00",
                    "2027-01-15 08:00:00.007Z", "2027-13-15T08:00:00.007Z", 1800000000007, None):
            with self.assertRaises(KeyRefused):
                crypto.parse_iso_ms(bad, "t")

    def test_safety_number_input(self) -> None:
        """A typed safety number may have spaces or dashes, nothing else."""
        digits = "0123456789" * 6
        spaced = " ".join(digits[i:i + 5] for i in range(0, 60, 5))
        self.assertEqual(crypto.normalize_safety_number(spaced), digits)
        self.assertEqual(crypto.normalize_safety_number(spaced.replace(" ", "-")), digits)
        for bad in (digits[:-1], digits + "1", digits[:-1] + "x"):
            with self.assertRaises(ValueError):
                crypto.normalize_safety_number(bad)


class DeviceSealTests(SynchronousTestCase):
    """Messages sealed per device (v3, cyphr-hybrid-v3)."""

    def setUp(self) -> None:
        self.alice = User("alice")
        self.bob = User("bob")
        # Alice's linked device 2 has a key of its own (and the same seed).
        self.laptop_key = MLKEM1024PrivateKey.generate()

    def devices(self) -> list[crypto.DeviceRecipient]:
        a, b = self.alice.identity, self.bob
        return [crypto.DeviceRecipient("alice", 1, a.public_key, a.kyber_public_key, 0),
                crypto.DeviceRecipient("alice", 2, a.public_key,
                                       self.laptop_key.public_key().public_bytes_raw(), 4),
                crypto.DeviceRecipient("bob", 1, b.identity.public_key,
                                       b.prekeys[1].public_key, 1, True)]

    def seal(self, recipients: list[crypto.DeviceRecipient] | None = None) -> dict[str, Any]:
        return crypto.seal_to_devices(self.alice.identity, "alice", 1,
                                      self.devices() if recipients is None else recipients,
                                      b"to every device", chat_id="chat-1", message_type="text",
                                      client_message_id="cm-1")

    def open(self, payload: dict[str, Any], reader: User, device: int,
             **kwargs: Any) -> crypto.Opened:
        return crypto.open_sealed(payload, reader=reader.identity, reader_id=reader.cyphr_id,
                                  reader_device=device, sender_key=self.alice.identity.public_key,
                                  envelope=envelope(payload), prekeys=reader.prekey_seeds(),
                                  **kwargs)

    def test_each_device_opens_its_own_key(self) -> None:
        """Each device opens the wrapped key addressed to it with its own
        key (device 1 the main key, a linked device its device key, bob his
        prekey); the header lists the devices, each key names its device."""
        payload = self.seal()
        self.assertEqual((payload["version"], payload["scheme"]), (3, "cyphr-hybrid-v3"))
        self.assertEqual(payload["header"]["recipients"], [
            {"cyphrId": "alice", "deviceId": 1}, {"cyphrId": "alice", "deviceId": 2},
            {"cyphrId": "bob", "deviceId": 1}])
        self.assertEqual([(k["recipientId"], k["deviceId"]) for k in payload["keys"]],
                         [("alice", 1), ("alice", 2), ("bob", 1)])
        laptop = {4: self.laptop_key.private_bytes_raw()}
        for reader, device, kwargs, key_id in ((self.alice, 1, {}, None),
                                               (self.alice, 2, {"device_keys": laptop}, None),
                                               (self.bob, 1, {}, 1)):
            opened = self.open(payload, reader, device, **kwargs)
            self.assertEqual((opened.plaintext, opened.version, opened.key_id),
                             (b"to every device", 3, key_id))

    def test_a_device_not_sealed_to_is_told_so(self) -> None:
        """Bob's device 2 (not among the recipients) cannot open it: it is
        not a recipient, and the error says which device."""
        with self.assertRaises(NotARecipient) as caught:
            self.open(self.seal(), self.bob, 2)
        self.assertIn("device 2 of bob is not a recipient", str(caught.exception))

    def test_the_main_key_entry_opens_on_a_recovered_device(self) -> None:
        """An entry sealed to the identity's main key (device 1's) opens on
        another device of the identity that holds the seed (a recovered
        device 3); an entry sealed to a device key or a prekey does not."""
        payload = self.seal()
        self.assertEqual(self.open(payload, self.alice, 3).plaintext, b"to every device")
        only_laptop = self.seal([self.devices()[1], crypto.DeviceRecipient(
            "alice", 1, self.alice.identity.public_key,
            self.alice.prekeys[1].public_key, 1, True)])
        with self.assertRaises(NotARecipient):
            self.open(only_laptop, self.alice, 3)

    def test_moving_a_key_to_another_device_breaks_the_signature(self) -> None:
        """A server that relabels a wrapped key (or the header) as another
        device's changes what the sender signed: refused."""
        payload = self.seal()
        moved = json.loads(json.dumps(payload))
        moved["keys"][2]["deviceId"] = 2
        with self.assertRaises(BadSignature):
            self.open(moved, self.bob, 1)
        renamed = json.loads(json.dumps(payload))
        renamed["header"]["recipients"][2]["deviceId"] = 2
        with self.assertRaises(BadSignature):
            self.open(renamed, self.bob, 1)

    def test_the_wrap_binds_the_device(self) -> None:
        """The wrapping key is derived for one (Cyphr ID, device id): the
        wrapped key of device 1, re-signed as device 2's by the sender's own
        key, does not open for device 2."""
        payload = self.seal()
        moved = json.loads(json.dumps(payload))
        moved["header"]["recipients"] = [{"cyphrId": "alice", "deviceId": 1},
                                         {"cyphrId": "alice", "deviceId": 2},
                                         {"cyphrId": "bob", "deviceId": 2}]
        moved["keys"][2]["deviceId"] = 2
        parsed = crypto._parse_v3(moved)
        moved["signature"] = b64(self.alice.identity.sign_with_label(
            signing.MESSAGE, signing.message_content(parsed.header, parsed.nonce,
                                                     parsed.ciphertext, parsed.tag,
                                                     parsed.keys)))
        with self.assertRaises(TamperedMessage):
            self.open(moved, self.bob, 2)

    def test_strict_shape(self) -> None:
        """Unsorted or repeated devices, a device id 0 or missing, and an
        unknown field are malformed; the sending device must be sealed to."""
        payload = self.seal()
        for change in (lambda p: p["header"]["recipients"].reverse(),
                       lambda p: p["header"]["recipients"].append(p["header"]["recipients"][-1]),
                       lambda p: p["header"]["recipients"][0].update(deviceId=0),
                       lambda p: p["keys"][0].pop("deviceId"),
                       lambda p: p["keys"][0].update(extra=1)):
            bad = json.loads(json.dumps(payload))
            change(bad)
            with self.assertRaises(MalformedPayload):
                self.open(bad, self.bob, 1)
        with self.assertRaises(crypto.CryptoError):
            self.seal(self.devices()[1:])
        with self.assertRaises(crypto.CryptoError):
            self.seal(self.devices() + [self.devices()[2]])


class DeviceMessageVectorTests(SynchronousTestCase):
    """tests/vectors/messages-v3.json: a message sealed per device, rebuilt
    byte for byte and opened by each of its devices."""

    def setUp(self) -> None:
        from pathlib import Path

        path = Path(__file__).parent / "vectors" / "messages-v3.json"
        self.vector = json.loads(path.read_text("utf-8"))
        self.inputs = self.vector["inputs"]

    def test_rebuilt_byte_for_byte(self) -> None:
        """From the vector's inputs (the encapsulations from its fixed
        messages m), the payload, the header's associated data and each
        entry's wrapping key come out exactly as the vector has them."""
        i = self.inputs
        alice = Identity(bytes.fromhex(i["senderSeed"]))
        bob = Identity(bytes.fromhex(i["bobSeed"]))
        keys = {("alice_01", 1): alice.kyber_public_key,
                ("alice_01", 2): MLKEM1024PrivateKey.from_seed_bytes(
                    bytes.fromhex(i["alice2DeviceKeySeed"])).public_key().public_bytes_raw(),
                ("bob_02", 1): MLKEM1024PrivateKey.from_seed_bytes(
                    bytes.fromhex(i["bobPrekeySeed"])).public_key().public_bytes_raw()}
        identities = {"alice_01": alice.public_key, "bob_02": bob.public_key}
        recipients = [crypto.DeviceRecipient(r["cyphrId"], r["deviceId"],
                                             identities[r["cyphrId"]],
                                             keys[(r["cyphrId"], r["deviceId"])], r["keyId"],
                                             r["oneTime"]) for r in i["recipients"]]
        ms = iter(bytes.fromhex(m) for m in i["encapsulationM"])
        nonces = iter(bytes.fromhex(n) for n in i["wrapNonces"])
        payload = crypto.seal_to_devices_with(
            alice, i["senderId"], i["senderDevice"], recipients, bytes.fromhex(i["plaintext"]),
            chat_id=i["chatId"], message_type=i["messageType"],
            client_message_id=i["clientMessageId"],
            ephemeral=X25519PrivateKey.from_private_bytes(
                bytes.fromhex(i["ephemeralX25519Private"])),
            content_key=bytes.fromhex(i["contentKey"]), nonce=bytes.fromhex(i["nonce"]),
            encapsulate=lambda key: ML_KEM_1024._encaps_internal(key, next(ms)),
            wrap_nonce=lambda: next(nonces))
        self.assertEqual(payload, self.vector["payload"])
        parsed = crypto._parse_v3(payload)
        self.assertEqual(parsed.header.aad().hex(), self.vector["headerAad"])
        for entry, key in zip(self.vector["entries"], parsed.keys):
            self.assertEqual(crypto._device_wrap_key(
                bytes.fromhex(entry["kemSecret"]), bytes.fromhex(entry["dhSecret"]),
                parsed.header.aad(), entry["cyphrId"], entry["deviceId"], key.kyber_ciphertext,
                parsed.header.ephemeral_key, bytes.fromhex(entry["recipientX25519"])).hex(),
                entry["wrapKey"])

    def test_each_device_opens_it(self) -> None:
        """Device 1 of alice (main key), her device 2 (device key 3) and
        bob's device 1 (prekey 17) each open the vector's payload to its
        plaintext; bob's device 2 is not a recipient."""
        i = self.inputs
        payload = self.vector["payload"]
        alice = Identity(bytes.fromhex(i["senderSeed"]))
        bob = Identity(bytes.fromhex(i["bobSeed"]))
        envelope = {"chatId": i["chatId"], "senderId": i["senderId"],
                    "messageType": i["messageType"], "clientMessageId": i["clientMessageId"]}
        for reader, reader_id, device, extra in (
                (alice, "alice_01", 1, {}),
                (alice, "alice_01", 2,
                 {"device_keys": {3: bytes.fromhex(i["alice2DeviceKeySeed"])}}),
                (bob, "bob_02", 1, {"prekeys": {17: bytes.fromhex(i["bobPrekeySeed"])}})):
            opened = crypto.open_sealed(payload, reader=reader, reader_id=reader_id,
                                        reader_device=device, sender_key=alice.public_key,
                                        envelope=envelope, **extra)
            self.assertEqual(opened.plaintext.hex(), i["plaintext"])
        with self.assertRaises(NotARecipient):
            crypto.open_sealed(payload, reader=bob, reader_id="bob_02", reader_device=2,
                               sender_key=alice.public_key, envelope=envelope)

    def test_the_file_is_current(self) -> None:
        """tools/make_vectors.py would write exactly the shipped file."""
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
        try:
            import make_vectors
        finally:
            sys.path.pop(0)
        self.assertEqual(make_vectors.build_messages(), self.vector)
