"""
The server's checks of published ML-KEM-1024 keys (cyphr.crypto): the
FIPS 203 modulus check at its boundary, so that a change of backend that
dropped it would be noticed.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from twisted.trial import unittest

from cyphr.crypto import MLKEM1024_KEY_BYTES, is_mlkem1024_key

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
