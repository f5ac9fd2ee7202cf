"""
The server's checks of published ML-KEM-1024 keys: the FIPS 203 modulus
check at its boundary (cyphr.crypto), so that a change of backend that
dropped it would be noticed, and the checks of an uploaded device key
(cyphr.handlers.keycheck.check_device_key), each refusal with its code.
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from nacl.signing import SigningKey
from twisted.trial import unittest

from cyphr import errors
from cyphr.crypto import MLKEM1024_KEY_BYTES, is_mlkem1024_key
from cyphr.handlers.keycheck import MAX_VALIDITY_MS, KeyFields, check_device_key
from cyphr.signing import (
    DEVICE_KEY,
    KEY_ALGORITHM,
    DeviceKeyBinding,
    KeyBinding,
    opaque,
    sign_with_label,
    text,
    uint64,
)
from cyphr.store.identities import MainKey

Q = 3329  # the ML-KEM modulus


def with_coefficient(key: bytes, index: int, value: int) -> bytes:
    """``key`` with its ``index``-th 12-bit coefficient (of 1024) set to
    ``value``: two coefficients are packed into every three bytes."""
    raw = bytearray(key)
    at = 3 * (index // 2)
    if index % 2 == 0:
        raw[at] = value & 0xFF
        raw[at + 1] = (raw[at + 1] & 0xF0) | (value >> 8)
    else:
        raw[at + 1] = (raw[at + 1] & 0x0F) | ((value & 0x0F) << 4)
        raw[at + 2] = value >> 4
    return bytes(raw)


class ModulusCheckTests(unittest.TestCase):
    def setUp(self) -> None:
        self.key = MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()

    def test_a_coefficient_below_q_is_accepted(self) -> None:
        """A coefficient of q - 1, first or last, is a valid key."""
        for index in (0, 1, 517, 1023):
            self.assertTrue(is_mlkem1024_key(with_coefficient(self.key, index, Q - 1)), index)

    def test_a_coefficient_of_q_or_more_is_refused(self) -> None:
        """A coefficient equal to q (or up to 4095), anywhere, is refused."""
        for index in (0, 1, 517, 1023):
            for value in (Q, 4095):
                self.assertFalse(is_mlkem1024_key(with_coefficient(self.key, index, value)),
                                 (index, value))

    def test_length(self) -> None:
        """Only 1568 bytes make a key."""
        self.assertEqual(len(self.key), MLKEM1024_KEY_BYTES)
        self.assertFalse(is_mlkem1024_key(self.key[:-1]))
        self.assertFalse(is_mlkem1024_key(self.key + b"\x00"))


NOW = 1_790_000_000_000
DAY_MS = 24 * 3600 * 1000


class DeviceKeyCheckTests(unittest.TestCase):
    """check_device_key accepts a device key signed by the identity key for
    this owner, device id, key id and validity, and refuses anything else
    with the code the contract gives it."""

    def setUp(self) -> None:
        self.identity = SigningKey(bytes(range(32)))
        self.public = bytes(self.identity.verify_key)
        self.kem = MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()

    def signed(self, *, signer: SigningKey | None = None, public_key: bytes | None = None,
               **changes: object) -> MainKey:
        """A device key of alice, device 2, key 5, valid from NOW for 180
        days, signed with ``changes`` made to what is signed (not to what
        is uploaded, unless the change is of the key or the times)."""
        key = self.kem if public_key is None else public_key
        binding = DeviceKeyBinding("alice", 2, 5, NOW, NOW + 180 * DAY_MS, key)
        signed = dataclasses.replace(binding, **changes)
        signature = signed.sign(signer or self.identity)
        return MainKey(key, signature, 5, signed.created_at, signed.expires_at)

    def check(self, key: MainKey, *, device_id: int = 2, key_id: int = 5,
              owner: str = "alice", now: int = NOW) -> None:
        check_device_key(key, identity_key=self.public, owner=owner, device_id=device_id,
                         key_id=key_id, now=now, fields=KeyFields.device_key())

    def refused(self, code: str, key: MainKey, field: str = "kyberPublicKey",
                **where: object) -> None:
        e = self.assertRaises(errors.BadRequest, self.check, key, **where)
        self.assertEqual((e.status, e.code, e.details), (400, code, {"field": field}))

    def test_a_good_key_is_accepted(self) -> None:
        """A key signed for exactly this owner, device, key id and validity
        passes, also a minute before it expires and when made 4 minutes
        ahead of the server's clock."""
        self.check(self.signed())
        self.check(self.signed(), now=NOW + 180 * DAY_MS - 60_000)
        self.check(self.signed(), now=NOW - 4 * 60_000)

    def test_the_fields_are_the_main_keys(self) -> None:
        """A device key's fields are named as the main key's."""
        self.assertEqual(KeyFields.device_key(),
                         KeyFields("kyberPublicKey", "kyberKeyCreatedAt", "kyberKeyExpiresAt"))

    def test_a_key_without_times_is_refused(self) -> None:
        """A key with no validity (a v1 signature, or none at all) is
        refused as an unsupported signature version."""
        good = self.signed()
        self.refused(errors.UNSUPPORTED_SIGNATURE_VERSION, MainKey(self.kem, good.signature))
        self.refused(errors.UNSUPPORTED_SIGNATURE_VERSION,
                     MainKey(self.kem, good.signature, 5, good.created_at, None))

    def test_implausible_validity_is_refused(self) -> None:
        """Expiry not after creation, a validity over 400 days, or a
        creation more than 5 minutes ahead: INVALID_FIELD naming the field;
        a key that has expired: KEY_EXPIRED."""
        self.refused(errors.INVALID_FIELD, self.signed(expires_at=NOW), "kyberKeyExpiresAt")
        self.refused(errors.INVALID_FIELD, self.signed(expires_at=NOW + MAX_VALIDITY_MS + 1),
                     "kyberKeyExpiresAt")
        self.refused(errors.INVALID_FIELD, self.signed(), "kyberKeyCreatedAt",
                     now=NOW - 6 * 60_000)
        self.refused(errors.KEY_EXPIRED, self.signed(), "kyberKeyExpiresAt",
                     now=NOW + 180 * DAY_MS)

    def test_an_invalid_ml_kem_key_is_refused(self) -> None:
        """A key of the wrong length, or with a coefficient of q, signed as
        it is, is refused as INVALID_KYBER_KEY."""
        for bad in (self.kem[:-1], with_coefficient(self.kem, 3, Q)):
            self.refused(errors.INVALID_KYBER_KEY, self.signed(public_key=bad))

    def test_a_signature_over_anything_else_is_refused(self) -> None:
        """A signature by another identity, or over another device id,
        owner or key id: INVALID_KEY_SIGNATURE."""
        other = SigningKey(bytes(range(1, 33)))
        for key in (self.signed(signer=other), self.signed(device_id=1),
                    self.signed(device_id=3), self.signed(owner="mallory"),
                    self.signed(key_id=4)):
            self.refused(errors.INVALID_KEY_SIGNATURE, key)

    def test_a_key_moved_to_another_device_is_refused(self) -> None:
        """Device 2's key, uploaded for device 1, for another owner or with
        another key id, is refused: the device id is signed."""
        key = self.signed()
        self.refused(errors.INVALID_KEY_SIGNATURE, key, device_id=1)
        self.refused(errors.INVALID_KEY_SIGNATURE, key, owner="bob")
        self.refused(errors.INVALID_KEY_SIGNATURE, key, key_id=6)

    def test_device_zero_is_refused(self) -> None:
        """There is no device 0: even a key signed over the bytes device 0
        would have is refused, with no exception but BadRequest."""
        expires = NOW + 180 * DAY_MS
        device_zero = (text(KEY_ALGORITHM) + text("alice") + uint64(0) + uint64(5)
                       + uint64(NOW) + uint64(expires) + opaque(self.kem))
        forged = sign_with_label(self.identity, DEVICE_KEY, device_zero)
        self.refused(errors.INVALID_KEY_SIGNATURE, MainKey(self.kem, forged, 5, NOW, expires),
                     device_id=0)
        self.refused(errors.INVALID_KEY_SIGNATURE, self.signed(), device_id=-1)

    def test_a_main_key_or_prekey_signature_is_refused(self) -> None:
        """The same key, owner, id and times signed as a main key or a
        one-time prekey (ml-kem-key, one-time-prekey) is not a device key."""
        for one_time in (False, True):
            binding = KeyBinding(one_time, "alice", 5, NOW, NOW + 180 * DAY_MS, self.kem)
            key = MainKey(self.kem, binding.sign(self.identity), 5, NOW, NOW + 180 * DAY_MS)
            self.refused(errors.INVALID_KEY_SIGNATURE, key)
