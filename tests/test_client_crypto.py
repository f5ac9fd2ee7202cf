"""The client's end-to-end scheme and its profile vault, without a server."""

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

from cyphr.client import crypto
from cyphr.client.crypto import (
    BadSignature,
    Identity,
    InvalidPhrase,
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
            return Recipient(self.cyphr_id, self.identity.public_key, self.identity.kyber_public_key)
        public = self.prekeys[key_id].private_key.public_key().public_bytes_raw()
        return Recipient(self.cyphr_id, self.identity.public_key, public, key_id)

    def prekey_seeds(self) -> dict[int, bytes]:
        return {key_id: prekey.seed for key_id, prekey in self.prekeys.items()}


def envelope(payload: dict[str, Any], chat_id: str = "chat-1") -> dict[str, Any]:
    header = payload["header"]
    return {"chatId": chat_id, "senderId": header["senderId"],
            "messageType": header["messageType"], "clientMessageId": header["clientMessageId"]}


def resign(payload: dict[str, Any], sender: User) -> dict[str, Any]:
    """The payload signed again by its sender: what a tampering that also
    had the sender's key would give, to reach the checks behind the
    signature."""
    unsigned = {k: v for k, v in payload.items() if k != "signature"}
    unsigned["signature"] = b64(sender.identity.sign(
        crypto._SIGNATURE_CONTEXT + crypto.canonical(unsigned)))
    return unsigned


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
        self.assertIn("kyberCiphertext", payload["keys"][0])
        self.assertEqual(json.loads(json.dumps(payload)), payload)

    def test_five_recipients(self) -> None:
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
        bob, payload = self.bob_payload()
        with self.assertRaises(TamperedHeader):
            self.open(payload, bob, envelope=envelope(payload, chat_id="chat-2"))

    def test_first_direct_message_names_its_chat_by_members(self) -> None:
        bob = self.others[0]
        payload = self.seal(b"first", [self.alice.as_recipient(), bob.as_recipient()], chat_id=None)
        members = frozenset({"alice", "bob"})
        self.assertEqual(self.open(payload, bob, direct_members=members).plaintext, b"first")
        with self.assertRaises(TamperedHeader):
            self.open(payload, bob)  # not known as a direct chat
        with self.assertRaises(TamperedHeader):
            self.open(payload, bob, direct_members=frozenset({"bob", "carol"}))

    def test_bad_signature(self) -> None:
        bob, payload = self.bob_payload()
        with self.assertRaises(BadSignature):
            self.open(payload, bob, sender_key=bob.identity.public_key)
        signature = bytearray(base64.b64decode(payload["signature"]))
        signature[0] ^= 1
        payload["signature"] = b64(bytes(signature))
        with self.assertRaises(BadSignature):
            self.open(payload, bob)

    def test_recipient_list(self) -> None:
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
        bob, payload = self.bob_payload()
        for bad in (None, [], "text", {}, {"version": 2, "scheme": crypto.SCHEME},
                    dict(payload, signature="not base64!"), dict(payload, header=[])):
            with self.assertRaises((MalformedPayload, BadSignature)):
                self.open(bad, bob, envelope={})

    def test_prekey_is_used_once(self) -> None:
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
        with self.assertRaises(crypto.CryptoError):
            self.seal(b"x", [self.others[0].as_recipient()])
        with self.assertRaises(crypto.CryptoError):
            self.seal(b"x", [self.alice.as_recipient(), self.alice.as_recipient()])


class IdentityTests(SynchronousTestCase):
    def test_phrase_re_derives_the_same_keys(self) -> None:
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

    def test_keys_are_what_the_server_accepts(self) -> None:
        identity = Identity.from_phrase(crypto.new_phrase())
        self.assertTrue(is_mlkem1024_key(identity.kyber_public_key))
        self.assertTrue(verify_kyber_key_signature(identity.public_key, identity.kyber_public_key,
                                                   identity.kyber_key_signature))
        prekey = Prekey.generate(5).upload_form(identity)
        self.assertTrue(verify_kyber_key_signature(identity.public_key,
                                                   base64.b64decode(prekey["kyberPublicKey"]),
                                                   base64.b64decode(prekey["signature"])))

    def test_rotated_generations(self) -> None:
        identity = Identity.from_phrase(crypto.new_phrase())
        rotated = Identity(identity.seed, 2)
        self.assertNotEqual(rotated.kyber_public_key, identity.kyber_public_key)
        self.assertEqual(rotated.public_key, identity.public_key)
        self.assertEqual([k.public_key().public_bytes_raw() for k in rotated.kem_keys()][-1],
                         identity.kyber_public_key)
        # A message sealed to generation 0 still opens after two rotations.
        payload = crypto.seal(identity, "me", [Recipient("me", identity.public_key,
                                                         identity.kyber_public_key)],
                              b"old", chat_id="c", message_type="text", client_message_id="m")
        opened = crypto.open_sealed(payload, reader=rotated, reader_id="me",
                                    sender_key=identity.public_key, envelope=envelope(payload, "c"))
        self.assertEqual(opened.plaintext, b"old")

    def test_bad_phrases(self) -> None:
        words = crypto.new_phrase().split()
        for bad in (" ".join(words[:12]), " ".join(words[:-1] + ["notaword"]),
                    " ".join(words[:-1] + [words[0] if words[-1] != words[0] else words[1]])):
            with self.assertRaises(InvalidPhrase):
                Identity.from_phrase(bad)

    def test_safety_number(self) -> None:
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
        seed = os.urandom(64)
        ek, _ = ML_KEM_1024.key_derive(seed)
        self.assertEqual(MLKEM1024PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw(), ek)

    def test_cryptography_encapsulates_kyber_py_decapsulates(self) -> None:
        ek, dk = ML_KEM_1024.keygen()
        secret, ciphertext = MLKEM1024PublicKey.from_public_bytes(ek).encapsulate()
        self.assertEqual(len(ciphertext), 1568)
        self.assertEqual(ML_KEM_1024.decaps(dk, ciphertext), secret)

    def test_kyber_py_encapsulates_cryptography_decapsulates(self) -> None:
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
        payload = crypto.seal(sender, "s", [Recipient("s", sender.public_key, sender.kyber_public_key),
                                            Recipient("r", reader.public_key, ek)],
                              b"interop", chat_id="c", message_type="text", client_message_id="m")
        opened = crypto.open_sealed(payload, reader=reader, reader_id="r",
                                    sender_key=sender.public_key, envelope=envelope(payload, "c"))
        self.assertEqual(opened.plaintext, b"interop")


class ProfileTests(SynchronousTestCase):
    def test_vault_is_sealed_and_private(self) -> None:
        directory = self.mktemp()
        seed = os.urandom(64)
        profile = Profile.create(directory, "correct horse", {"server": "http://x"},
                                 {"seed": b64(seed), "fingerprint": "ab" * 32})
        for name in ("vault.json", "profile.json"):
            mode = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            self.assertEqual(mode, 0o600, name)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        raw = b"".join(open(os.path.join(directory, n), "rb").read() for n in os.listdir(directory))
        for needle in (seed, b64(seed).encode(), seed.hex().encode(), b"ab" * 32, b"correct horse"):
            self.assertNotIn(needle, raw)
        profile.vault["token"] = "t"
        profile.save()
        again = Profile.open(directory, "correct horse")
        self.assertEqual(again.vault["seed"], b64(seed))
        self.assertEqual(again.vault["token"], "t")
        with self.assertRaises(ProfileError):
            Profile.open(directory, "wrong horse")
        with self.assertRaises(ProfileError):
            Profile.create(directory, "x", {}, {})
        with self.assertRaises(ProfileError):
            Profile.open(self.mktemp(), "correct horse")

    def test_damaged_vault(self) -> None:
        directory = self.mktemp()
        Profile.create(directory, "pw", {}, {"seed": "x"})
        path = os.path.join(directory, "vault.json")
        sealed = json.load(open(path))
        raw = bytearray(base64.b64decode(sealed["ciphertext"]))
        raw[0] ^= 1
        sealed["ciphertext"] = b64(bytes(raw))
        json.dump(sealed, open(path, "w"))
        with self.assertRaises(ProfileError):
            Profile.open(directory, "pw")
        open(path, "w").write("not json")
        with self.assertRaises(ProfileError):
            Profile.open(directory, "pw")
