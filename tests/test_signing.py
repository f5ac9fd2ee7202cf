"""
The v2 labelled signatures (cyphr.signing): the test vectors that every
implementation shares, the byte layouts as docs/encryption.rst gives them,
strict decoding, and the property that no two kinds or contents ever sign
the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from stellar_sdk import Keypair
from twisted.trial import unittest

from cyphr import signing

VECTORS = json.loads((Path(__file__).parent / "vectors" / "signatures-v2.json").read_text("utf-8"))
KEY = SigningKey(bytes.fromhex(VECTORS["ed25519Seed"]))
PUBLIC = bytes(KEY.verify_key)
ALL_LABELS = signing.LABELS


def _device_binding(vector: dict) -> signing.DeviceKeyBinding:
    inputs = vector["inputs"]
    if inputs["algorithm"] != signing.KEY_ALGORITHM:
        raise AssertionError(f"{vector['name']} is not an {signing.KEY_ALGORITHM} key")
    return signing.DeviceKeyBinding(
        owner=inputs["owner"], device_id=inputs["deviceId"], key_id=inputs["keyId"],
        created_at=inputs["createdAt"], expires_at=inputs["expiresAt"],
        public_key=bytes.fromhex(inputs["publicKey"]))


def _device_message(inputs: dict) -> bytes:
    """The signed content of a message sealed per device (v3)."""
    h = inputs["header"]
    header = signing.DeviceMessageHeader(
        h["scheme"], h["chatId"], h["senderId"], h["messageType"], h["clientMessageId"],
        tuple((r["cyphrId"], r["deviceId"]) for r in h["recipients"]),
        bytes.fromhex(h["ephemeralKey"]))
    keys = [signing.DeviceWrappedKey(k["recipientId"], k["deviceId"], k["oneTime"], k["keyId"],
                                     bytes.fromhex(k["kyberCiphertext"]),
                                     bytes.fromhex(k["nonce"]), bytes.fromhex(k["wrappedKey"]))
            for k in inputs["keys"]]
    if header.aad().hex() != inputs["headerAad"]:
        raise AssertionError("the v3 message header's associated data differs from the vector")
    return signing.message_content(header, bytes.fromhex(inputs["nonce"]),
                                   bytes.fromhex(inputs["ciphertext"]),
                                   bytes.fromhex(inputs["tag"]), keys)


def _rebuild(vector: dict) -> tuple[str, bytes]:
    """The label and content of a vector, made from its inputs alone."""
    inputs = vector["inputs"]
    if vector["name"].startswith("auth-"):
        statement = signing.AuthStatement(
            purpose=inputs["purpose"], origin=inputs["origin"], cyphr_id=inputs["cyphrId"],
            device=signing.device_hash(inputs["deviceFingerprint"]),
            challenge_id=inputs["challengeId"], challenge=bytes.fromhex(inputs["challenge"]))
        return signing.AUTH, statement.encode()
    if vector["name"] in ("ml-kem-key", "one-time-prekey"):
        binding = signing.KeyBinding(
            one_time=vector["name"] == "one-time-prekey", owner=inputs["owner"],
            key_id=inputs["keyId"], created_at=inputs["createdAt"],
            expires_at=inputs["expiresAt"], public_key=bytes.fromhex(inputs["publicKey"]))
        return binding.label, binding.encode()
    if vector["name"].startswith("device-key-"):
        return signing.DEVICE_KEY, _device_binding(vector).encode()
    if vector["name"] == "identity-dh":
        return signing.IDENTITY_DH, signing.identity_dh_content(
            inputs["owner"], bytes.fromhex(inputs["publicKey"]))
    if vector["name"] in ("dh-prekey", "kem-prekey"):
        prekey = signing.SessionPrekeyBinding(
            inputs["kind"], inputs["owner"], inputs["deviceId"], inputs["keyId"],
            inputs["createdAt"], inputs["expiresAt"], bytes.fromhex(inputs["publicKey"]))
        return prekey.label, prekey.encode()
    if vector["name"] == "message-v3":
        return signing.MESSAGE, _device_message(inputs)
    assert vector["name"] == "message", vector["name"]
    h = inputs["header"]
    header = signing.MessageHeader(h["scheme"], h["chatId"], h["senderId"], h["messageType"],
                                   h["clientMessageId"], tuple(h["recipients"]),
                                   bytes.fromhex(h["ephemeralKey"]))
    keys = [signing.WrappedKey(k["recipientId"], k["oneTime"], k["keyId"],
                               bytes.fromhex(k["kyberCiphertext"]), bytes.fromhex(k["nonce"]),
                               bytes.fromhex(k["wrappedKey"])) for k in inputs["keys"]]
    if header.aad().hex() != inputs["headerAad"]:
        raise AssertionError("the message header's associated data differs from the vector")
    return signing.MESSAGE, signing.message_content(
        header, bytes.fromhex(inputs["nonce"]), bytes.fromhex(inputs["ciphertext"]),
        bytes.fromhex(inputs["tag"]), keys)


class VectorTests(unittest.TestCase):
    def test_the_vectors_cover_every_kind(self) -> None:
        """There is a vector for every label (a roster change's in
        rosters-v1.json, with the states it chains), and for every login
        purpose."""
        labels = {v["label"] for v in VECTORS["vectors"]} | {VECTORS["walletLink"]["label"]}
        rosters = json.loads((Path(__file__).parent / "vectors" / "rosters-v1.json").read_text())
        self.assertIn(signing.PREFIX + signing.ROSTER, json.dumps(rosters))
        self.assertEqual(labels | {signing.PREFIX + signing.ROSTER},
                         {signing.PREFIX + label for label in ALL_LABELS})
        purposes = {v["inputs"]["purpose"] for v in VECTORS["vectors"] if v["name"].startswith("auth-")}
        self.assertEqual(purposes, set(signing.PURPOSES))
        self.assertEqual(bytes.fromhex(VECTORS["ed25519PublicKey"]), PUBLIC)

    def test_every_vector_rebuilds_byte_for_byte(self) -> None:
        """From its inputs alone, each vector's content, signing input and
        signature come out exactly as stored."""
        for vector in VECTORS["vectors"]:
            label, content = _rebuild(vector)
            self.assertEqual(signing.PREFIX + label, vector["label"], vector["name"])
            self.assertEqual(content.hex(), vector["content"], vector["name"])
            self.assertEqual(signing.sign_content(label, content).hex(), vector["signContent"],
                             vector["name"])
            signature = signing.sign_with_label(KEY, label, content)
            self.assertEqual(signature.hex(), vector["signature"], vector["name"])
            self.assertTrue(signing.verify_with_label(PUBLIC, label, content, signature))

    def test_a_signature_verifies_under_no_other_label(self) -> None:
        """A vector's signature, checked as any other kind, fails."""
        for vector in VECTORS["vectors"]:
            label, content = _rebuild(vector)
            signature = bytes.fromhex(vector["signature"])
            for other in ALL_LABELS:
                if other != label:
                    self.assertFalse(signing.verify_with_label(PUBLIC, other, content, signature),
                                     f"{vector['name']} as {other}")

    def test_wallet_link_vector(self) -> None:
        """The wallet link text and its SEP-53 signature rebuild exactly,
        and stellar-sdk's verify_message accepts the signature."""
        wallet = VECTORS["walletLink"]
        stellar = Keypair.from_raw_ed25519_seed(bytes.fromhex(VECTORS["stellarSeed"]))
        inputs = wallet["inputs"]
        self.assertEqual(stellar.public_key, inputs["stellarAddress"])
        text = signing.wallet_link_text(inputs["origin"], inputs["cyphrId"],
                                        inputs["stellarAddress"], inputs["challengeId"],
                                        bytes.fromhex(inputs["challenge"]))
        self.assertEqual(text, wallet["text"])
        self.assertTrue(text.startswith("cyphr-v2 wallet-link\n"))
        self.assertEqual(signing.sep53_digest(text.encode()).hex(), wallet["sep53Digest"])
        self.assertEqual(stellar.sign_message(text).hex(), wallet["signature"])
        stellar.verify_message(text, bytes.fromhex(wallet["signature"]))  # raises if not

    def test_the_file_is_what_the_code_makes(self) -> None:
        """tools/make_vectors.py would write exactly the shipped file."""
        import sys

        sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
        try:
            import make_vectors
        finally:
            sys.path.pop(0)
        self.assertEqual(make_vectors.build(), VECTORS)


class LayoutTests(unittest.TestCase):
    """The layouts of docs/encryption.rst, written out with struct."""

    def test_sign_content_layout(self) -> None:
        """SignContent is the label and the content, each behind a 4-byte
        big-endian length."""
        got = signing.sign_content(signing.AUTH, b"xyz")
        self.assertEqual(got, struct.pack(">I", 13) + b"cyphr-v2 auth" + struct.pack(">I", 3) + b"xyz")

    def test_auth_statement_layout(self) -> None:
        """An auth statement: purpose, origin, cyphrId, device hash,
        challenge id, challenge, each length-prefixed."""
        device, challenge = bytes(range(32)), bytes(range(32, 64))
        statement = signing.AuthStatement("login", "http://localhost:3001", "bob", device,
                                          "id-1", challenge)

        def v(data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + data

        self.assertEqual(statement.encode(), v(b"login") + v(b"http://localhost:3001") + v(b"bob")
                         + v(device) + v(b"id-1") + v(challenge))

    def test_key_binding_layout(self) -> None:
        """A key binding: algorithm, owner, key id, created, expires (uint64
        big-endian) and the key."""
        binding = signing.KeyBinding(True, "bob", 7, 1000, 2000, b"K" * 5)
        self.assertEqual(binding.encode(),
                         struct.pack(">I", 11) + b"ml-kem-1024" + struct.pack(">I", 3) + b"bob"
                         + struct.pack(">QQQ", 7, 1000, 2000) + struct.pack(">I", 5) + b"KKKKK")
        self.assertEqual(binding.label, signing.ONE_TIME_PREKEY)
        self.assertEqual(signing.KeyBinding(False, "bob", 7, 1000, 2000, b"K").label,
                         signing.MLKEM_KEY)


    def test_device_key_binding_layout(self) -> None:
        """A device key binding: algorithm, owner, device id, key id,
        created, expires (uint64 big-endian) and the key, under the label
        device-key."""
        binding = signing.DeviceKeyBinding("bob", 2, 7, 1000, 2000, b"K" * 5)
        self.assertEqual(binding.encode(),
                         struct.pack(">I", 11) + b"ml-kem-1024" + struct.pack(">I", 3) + b"bob"
                         + struct.pack(">QQQQ", 2, 7, 1000, 2000) + struct.pack(">I", 5)
                         + b"KKKKK")
        self.assertEqual(binding.label, signing.DEVICE_KEY)
        self.assertEqual(signing.PREFIX + binding.label, "cyphr-v2 device-key")

    def test_device_message_layout(self) -> None:
        """A v3 message header: scheme, chat id, sender, type, client message
        id, the count of devices then each device as its Cyphr ID and its
        device id (uint64), and the ephemeral key; a v3 wrapped key: Cyphr
        ID, device id, one-time flag (one byte), key id, then the KEM
        ciphertext, nonce and wrapped key, each length-prefixed."""
        def v(data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + data

        header = signing.DeviceMessageHeader("cyphr-hybrid-v3", None, "al", "text", "m",
                                             (("al", 1), ("bo", 2)), b"E" * 3)
        self.assertEqual(header.encode(),
                         v(b"cyphr-hybrid-v3") + v(b"") + v(b"al") + v(b"text") + v(b"m")
                         + struct.pack(">I", 2) + v(b"al") + struct.pack(">Q", 1) + v(b"bo")
                         + struct.pack(">Q", 2) + v(b"EEE"))
        self.assertEqual(header.aad(), v(b"cyphr-v2 message-header") + v(header.encode()))
        key = signing.DeviceWrappedKey("bo", 2, True, 9, b"C", b"N", b"W")
        self.assertEqual(key.encode(), v(b"bo") + struct.pack(">QBQ", 2, 1, 9) + v(b"C") + v(b"N")
                         + v(b"W"))
        with self.assertRaises(signing.EncodingError):
            signing.DeviceWrappedKey("bo", 0, True, 9, b"C", b"N", b"W").encode()


class DeviceKeyTests(unittest.TestCase):
    """A device key's signature binds exactly its owner, device id, key id,
    validity and key, and only as a device key."""

    def setUp(self) -> None:
        [vector] = [v for v in VECTORS["vectors"] if v["name"] == "device-key-2"]
        self.binding = _device_binding(vector)
        self.signature = bytes.fromhex(vector["signature"])

    def test_the_vector_verifies(self) -> None:
        """The vector's signature verifies for its own binding (so that the
        refusals below are the changes' doing)."""
        self.assertTrue(self.binding.verify(PUBLIC, self.signature))
        self.assertEqual(self.binding.sign(KEY), self.signature)

    def test_any_other_field_does_not_verify(self) -> None:
        """The signature does not verify for another device id, owner, key
        id, creation or expiry time, key, or identity key."""
        b = self.binding
        other_key = bytes([b.public_key[0] ^ 1]) + b.public_key[1:]
        for changes in ({"device_id": 1}, {"device_id": 3}, {"owner": "alice_02"},
                        {"owner": "Alice_01"}, {"key_id": 2}, {"key_id": 4},
                        {"created_at": b.created_at + 1}, {"expires_at": b.expires_at + 1},
                        {"expires_at": b.expires_at * 2}, {"public_key": other_key},
                        {"public_key": b.public_key[:-1]}):
            moved = dataclasses.replace(b, **changes)
            self.assertFalse(moved.verify(PUBLIC, self.signature), changes)
        other = bytes(SigningKey(bytes(range(1, 33))).verify_key)
        self.assertFalse(b.verify(other, self.signature))
        self.assertFalse(b.verify(PUBLIC, self.signature[:-1]))
        self.assertFalse(b.verify(PUBLIC, bytes([self.signature[0] ^ 1]) + self.signature[1:]))

    def test_no_swap_with_main_keys_or_prekeys(self) -> None:
        """A device key's signature does not verify as a main key or a
        one-time prekey with the same owner, id, times and key (nor with the
        device id taken as the key id), and theirs do not verify as a
        device key."""
        b = self.binding
        for one_time in (False, True):
            for key_id in (b.key_id, b.device_id):
                as_key = signing.KeyBinding(one_time, b.owner, key_id, b.created_at,
                                            b.expires_at, b.public_key)
                self.assertFalse(as_key.verify(PUBLIC, self.signature), (one_time, key_id))
                self.assertFalse(b.verify(PUBLIC, as_key.sign(KEY)), (one_time, key_id))
        for vector in VECTORS["vectors"]:
            if vector["name"] in ("ml-kem-key", "one-time-prekey"):
                inputs = vector["inputs"]
                as_device = signing.DeviceKeyBinding(
                    inputs["owner"], 1, inputs["keyId"], inputs["createdAt"],
                    inputs["expiresAt"], bytes.fromhex(inputs["publicKey"]))
                self.assertFalse(as_device.verify(PUBLIC, bytes.fromhex(vector["signature"])),
                                 vector["name"])

    def test_device_id_zero_is_refused(self) -> None:
        """Device ids start at 1: a binding for device 0 cannot be encoded
        or signed, and verifies as nothing (False, no exception), even with a
        signature over the bytes it would have had."""
        zero = dataclasses.replace(self.binding, device_id=0)
        self.assertRaises(signing.EncodingError, zero.encode)
        self.assertRaises(signing.EncodingError, zero.sign, KEY)
        would_be = (signing.text(signing.KEY_ALGORITHM) + signing.text(zero.owner)
                    + signing.uint64(0) + signing.uint64(zero.key_id)
                    + signing.uint64(zero.created_at) + signing.uint64(zero.expires_at)
                    + signing.opaque(zero.public_key))
        forged = signing.sign_with_label(KEY, signing.DEVICE_KEY, would_be)
        self.assertFalse(zero.verify(PUBLIC, forged))

    def test_verify_never_raises(self) -> None:
        """Values that do not encode (negative or over 64 bits) and keys or
        signatures of the wrong size give False, not an exception."""
        b = self.binding
        for changes in ({"device_id": -1}, {"device_id": 2**64}, {"key_id": -1},
                        {"key_id": 2**64}, {"created_at": -1}, {"expires_at": 2**64}):
            self.assertFalse(dataclasses.replace(b, **changes).verify(PUBLIC, self.signature),
                             changes)
        self.assertFalse(b.verify(PUBLIC[:31], self.signature))
        self.assertFalse(b.verify(PUBLIC, b""))

    def test_the_client_makes_and_checks_the_same_signature(self) -> None:
        """cyphr.client.crypto's sign_device_key gives the vector's
        signature, verify_device_key accepts it and refuses it for another
        device, and device_key_form carries the fields of a device key
        upload, signed for the device."""
        from cyphr.client import crypto

        b = self.binding
        values = (b.owner, b.device_id, b.key_id, b.created_at, b.expires_at, b.public_key)
        self.assertEqual(crypto.sign_device_key(KEY, *values), self.signature)
        self.assertTrue(crypto.verify_device_key(PUBLIC, *values, self.signature))
        self.assertFalse(crypto.verify_device_key(PUBLIC, b.owner, 1, *values[2:],
                                                  self.signature))
        self.assertRaises(signing.EncodingError, crypto.sign_device_key, KEY, b.owner, 0,
                          *values[2:])
        identity = crypto.Identity(bytes(range(64)))
        form = crypto.device_key_form(identity, "alice_01", 3, 1, b.public_key, b.created_at)
        self.assertEqual(set(form), {"kyberPublicKey", "kyberKeyId", "kyberKeyCreatedAt",
                                     "kyberKeyExpiresAt", "kyberKeySignature"})
        self.assertEqual(form["kyberKeyId"], 1)
        created = crypto.parse_iso_ms(form["kyberKeyCreatedAt"], "created")
        expires = crypto.parse_iso_ms(form["kyberKeyExpiresAt"], "expires")
        self.assertEqual((created, expires - created), (b.created_at, crypto.MAIN_KEY_LIFETIME_MS))
        self.assertTrue(crypto.verify_device_key(
            identity.public_key, "alice_01", 3, 1, created, expires,
            crypto.unb64(form["kyberPublicKey"], "key"),
            crypto.unb64(form["kyberKeySignature"], "signature")))


class DecodeTests(unittest.TestCase):
    def statement(self, **changes: object) -> signing.AuthStatement:
        values: dict = dict(purpose="recover", origin="https://a.example", cyphr_id="carol",
                            device=b"d" * 32, challenge_id="c-1", challenge=b"c" * 32)
        values.update(changes)
        return signing.AuthStatement(**values)

    def test_round_trip(self) -> None:
        """A statement decodes to itself."""
        statement = self.statement()
        self.assertEqual(signing.AuthStatement.decode(statement.encode()), statement)

    def test_strict(self) -> None:
        """Trailing bytes, a short encoding, an unknown purpose, or a device
        or challenge of another length are refused."""
        good = self.statement().encode()
        for bad in (good + b"\x00", good[:-1], b"",
                    self.statement(purpose="login").encode().replace(b"login", b"logon"),
                    good.replace(struct.pack(">I", 32) + b"c" * 32, struct.pack(">I", 31) + b"c" * 31)):
            self.assertRaises(signing.EncodingError, signing.AuthStatement.decode, bad)
        self.assertRaises(signing.EncodingError, self.statement(challenge=b"c" * 31).encode)
        self.assertRaises(signing.EncodingError, self.statement(device=b"d" * 33).encode)
        self.assertRaises(signing.EncodingError, self.statement(purpose="pay").encode)

    def test_a_huge_length_is_refused_without_reading_it(self) -> None:
        """A length prefix far past the data is refused, not allocated."""
        self.assertRaises(signing.EncodingError, signing.AuthStatement.decode,
                          b"\xff\xff\xff\xff" + b"x" * 10)


class OriginTests(unittest.TestCase):
    def test_normalize(self) -> None:
        """Origins are scheme://host[:port] in lower case, default ports
        and paths dropped, IPv6 in brackets."""
        cases = {
            "https://Chat.Example.org/": "https://chat.example.org",
            "https://chat.example.org:443/api": "https://chat.example.org",
            "http://localhost:3001": "http://localhost:3001",
            "HTTP://127.0.0.1:80": "http://127.0.0.1",
            "https://[::1]:3443/x?y": "https://[::1]:3443",
        }
        for url, origin in cases.items():
            self.assertEqual(signing.normalize_origin(url), origin, url)

    def test_refused(self) -> None:
        """Anything but an http(s) URL with a host is refused."""
        for url in ("ftp://a.example", "https://", "localhost:3001", "https://u:p@a.example",
                    "https://a.example:99999", ""):
            self.assertRaises(ValueError, signing.normalize_origin, url)

    def test_loopback(self) -> None:
        """Loopback origins are those of localhost, 127/8 and ::1 only."""
        for origin in ("http://localhost:3001", "http://127.0.0.5", "https://[::1]:1",
                       "http://app.localhost"):
            self.assertTrue(signing.is_loopback_origin(origin), origin)
        for origin in ("https://chat.example.org", "http://10.0.0.1", "http://localhost.example"):
            self.assertFalse(signing.is_loopback_origin(origin), origin)


_labels = st.sampled_from(ALL_LABELS)
_bytes = st.binary(max_size=64)


class PropertyTests(unittest.TestCase):
    @given(_labels, _bytes, _labels, _bytes)
    @settings(max_examples=400, deadline=None)
    def test_sign_contents_never_coincide(self, label_a: str, content_a: bytes,
                                          label_b: str, content_b: bytes) -> None:
        """Two signing inputs are equal only for the same kind and the same
        content."""
        same = label_a == label_b and content_a == content_b
        self.assertEqual(signing.sign_content(label_a, content_a)
                         == signing.sign_content(label_b, content_b), same)

    @given(st.lists(st.text(max_size=8), min_size=6, max_size=6),
           st.lists(st.text(max_size=8), min_size=6, max_size=6))
    @settings(max_examples=300, deadline=None)
    def test_statements_never_coincide(self, a: list[str], b: list[str]) -> None:
        """Two auth statements encode alike only when every field is equal:
        no shifting of bytes between fields makes another statement."""
        def make(fields: list[str]) -> signing.AuthStatement:
            return signing.AuthStatement(
                signing.PURPOSES[len(fields[0]) % 4], fields[1], fields[2],
                (fields[3].encode() * 32 + b"\x00" * 32)[:32], fields[4],
                (fields[5].encode() * 32 + b"\x01" * 32)[:32])

        sa, sb = make(a), make(b)
        self.assertEqual(sa.encode() == sb.encode(), sa == sb)

    @given(st.booleans(), st.text(max_size=10), st.integers(0, 2**64 - 1),
           st.integers(0, 2**64 - 1), st.booleans(), st.text(max_size=10),
           st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
    @settings(max_examples=300, deadline=None)
    def test_key_bindings_never_coincide(self, one_a: bool, owner_a: str, id_a: int, t_a: int,
                                         one_b: bool, owner_b: str, id_b: int, t_b: int) -> None:
        """Two key bindings sign the same bytes only when kind, owner, id,
        times and key are all equal."""
        a = signing.KeyBinding(one_a, owner_a, id_a, t_a, t_a, b"k")
        b = signing.KeyBinding(one_b, owner_b, id_b, t_b, t_b, b"k")
        self.assertEqual(signing.sign_content(a.label, a.encode())
                         == signing.sign_content(b.label, b.encode()), a == b)

    @given(st.text(max_size=10), st.integers(1, 2**64 - 1), st.integers(0, 2**64 - 1),
           st.integers(0, 2**64 - 1), st.text(max_size=10), st.integers(1, 2**64 - 1),
           st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
    @settings(max_examples=300, deadline=None)
    def test_device_key_bindings_never_coincide(self, owner_a: str, device_a: int, id_a: int,
                                                t_a: int, owner_b: str, device_b: int,
                                                id_b: int, t_b: int) -> None:
        """Two device key bindings encode alike only when owner, device id,
        key id, times and key are all equal."""
        a = signing.DeviceKeyBinding(owner_a, device_a, id_a, t_a, t_a, b"k")
        b = signing.DeviceKeyBinding(owner_b, device_b, id_b, t_b, t_b, b"k")
        self.assertEqual(a.encode() == b.encode(), a == b)

    @given(st.lists(st.tuples(st.text(max_size=6), st.integers(1, 2**64 - 1)), max_size=4),
           st.lists(st.tuples(st.text(max_size=6), st.integers(1, 2**64 - 1)), max_size=4))
    @settings(max_examples=300, deadline=None)
    def test_device_headers_never_coincide(self, a: list[tuple[str, int]],
                                           b: list[tuple[str, int]]) -> None:
        """Two v3 headers encode alike only when their device lists are
        equal: no Cyphr ID can run into a device id or the next device."""
        def header(devices: list[tuple[str, int]]) -> signing.DeviceMessageHeader:
            return signing.DeviceMessageHeader("cyphr-hybrid-v3", "c", "s", "text", "m",
                                               tuple(devices), b"e")
        self.assertEqual(header(a).encode() == header(b).encode(), a == b)

    @given(_labels, _bytes)
    @settings(max_examples=40, deadline=None)
    def test_no_label_encoding_is_a_sep53_or_v1_input(self, label: str, content: bytes) -> None:
        """A labelled signing input starts with its length-prefixed label:
        never like a SEP-53 message, a v1 key signature or an earlier
        message signature, and a 32-byte value (a raw challenge, a Stellar
        transaction hash) would need 13 or more chosen leading bytes."""
        data = signing.sign_content(label, content)
        head = signing.text(signing.PREFIX + label)
        self.assertTrue(data.startswith(head))
        self.assertGreaterEqual(len(head), 4 + 13)
        self.assertFalse(data.startswith(signing.SEP53_PREFIX))
        self.assertFalse(data.startswith(b"cyphr-kyber-key:"))
        self.assertFalse(data.startswith(b"cyphr-message-signature-v1"))


class StellarAccountTests(unittest.TestCase):
    """cyphr.signing reads Stellar account IDs and checks SEP-53 signatures
    itself (the server does not import stellar-sdk); stellar-sdk, what
    wallets use, is the reference here."""

    def test_account_ids_agree_with_stellar_sdk(self) -> None:
        """Every account ID stellar-sdk makes gives its public key back; a
        secret seed, a muxed account, lower case, one character changed, a
        bad checksum and non-strings are refused, as stellar-sdk refuses
        them."""
        from stellar_sdk import MuxedAccount, StrKey

        for _ in range(50):
            keypair = Keypair.random()
            address = keypair.public_key
            self.assertEqual(signing.stellar_account_key(address), keypair.raw_public_key())
            wrong = [keypair.secret, address.lower(), address[:-1], address + "A",
                     MuxedAccount(address, 7).account_muxed]
            for index in (0, 1, 30, 54, 55):
                for other in ("A", "B", "Z", "7"):
                    if address[index] != other:
                        wrong.append(address[:index] + other + address[index + 1:])
            for candidate in wrong:
                self.assertEqual(signing.stellar_account_key(candidate) is not None,
                                 StrKey.is_valid_ed25519_public_key(candidate), candidate)
                if len(candidate) == signing.STELLAR_ACCOUNT_LENGTH and candidate != address:
                    self.assertIsNone(signing.stellar_account_key(candidate), candidate)
        for nonsense in (None, 7, b"G" * 56, "G" * 56, "é" * 56, "=" * 56, ""):
            self.assertIsNone(signing.stellar_account_key(nonsense), repr(nonsense))

    def test_sep53_signatures_agree_with_stellar_sdk(self) -> None:
        """A message signed with stellar-sdk's Keypair.sign_message (SEP-53)
        verifies; another message, another key, a changed or truncated
        signature, or a signature over the raw message do not."""
        keypair, other = Keypair.random(), Keypair.random()
        key = signing.stellar_account_key(keypair.public_key)
        assert key is not None
        message = "Link this Stellar account\nto a Cyphr ID: é".encode()
        signature = keypair.sign_message(message)
        self.assertTrue(signing.verify_sep53(key, message, signature))
        self.assertFalse(signing.verify_sep53(key, message + b"!", signature))
        self.assertFalse(signing.verify_sep53(key, message, other.sign_message(message)))
        self.assertFalse(signing.verify_sep53(key, message, signature[:-1]))
        self.assertFalse(signing.verify_sep53(key, message, bytes([signature[0] ^ 1]) + signature[1:]))
        self.assertFalse(signing.verify_sep53(key, message, keypair.sign(message)))
        self.assertFalse(signing.verify_sep53(key[:31], message, signature))
