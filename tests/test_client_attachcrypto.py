"""
Attachments' encryption (cyphr.client.attachcrypto; docs/encryption.rst,
"Attachments"): round trips at the sizes around a chunk and in pieces of
any size, every tampering a server could try refused while streaming
(flipped bytes, chunks cut, moved, dropped, repeated or added, another key,
digest or size, padding that is not zeros), the exact blob size, the
padding buckets, the pointer's strict JSON and safe file names, and
tests/vectors/attachments-v1.json rebuilt byte for byte by the module and
by a second implementation written from the spec. Real cryptography, no
server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError
from twisted.trial.unittest import SynchronousTestCase

from cyphr.client import attachcrypto
from cyphr.client.attachcrypto import (
    CHUNK_BYTES,
    HEADER_BYTES,
    MAX_SIZE,
    MIN_PADDED,
    TAG_BYTES,
    AttachmentError,
    Decryptor,
    Encryptor,
    Pointer,
    associated_data,
    chunk_count,
    chunk_nonce,
    decrypt_file,
    encrypt_file,
    encrypted_size,
    file_name_problem,
    new_key,
    padded_size,
    safe_file_name,
)
from cyphr.client.crypto import CryptoError

KEY = bytes(range(32))
PREFIX = bytes(range(100, 116))
SEALED_CHUNK = CHUNK_BYTES + TAG_BYTES
VECTORS = json.loads((Path(__file__).parent / "vectors" / "attachments-v1.json")
                     .read_text("utf-8"))


def seal(data: bytes, key: bytes = KEY, prefix: bytes | None = PREFIX) -> tuple[bytes, bytes]:
    """The blob and digest of ``data``, in one piece."""
    encryptor = Encryptor(key, len(data), nonce_prefix=prefix)
    blob = encryptor.update(data) + encryptor.finish()
    return blob, encryptor.digest


def open_blob(blob: bytes, digest: bytes, size: int, key: bytes = KEY,
              piece: int | None = None) -> bytes:
    """The file of ``blob``, fed to a Decryptor in pieces of ``piece`` bytes
    (or at once), finished."""
    decryptor = Decryptor(key, digest, size)
    piece = piece or max(1, len(blob))
    out = b"".join(decryptor.update(blob[i:i + piece]) for i in range(0, len(blob), piece))
    decryptor.finish()
    return out


def streamed(blob: bytes, digest: bytes, size: int, key: bytes = KEY) -> bytes:
    """What a Decryptor gives for ``blob`` fed a sealed chunk at a time,
    without finishing: a refusal here is a refusal while streaming."""
    decryptor = Decryptor(key, digest, size)
    pieces = [blob[:HEADER_BYTES]] + [blob[i:i + SEALED_CHUNK]
                                      for i in range(HEADER_BYTES, len(blob), SEALED_CHUNK)]
    return b"".join(decryptor.update(p) for p in pieces)


def chunks_of(blob: bytes) -> tuple[bytes, list[bytes]]:
    """The blob's header and its sealed chunks."""
    return blob[:HEADER_BYTES], [blob[i:i + SEALED_CHUNK]
                                 for i in range(HEADER_BYTES, len(blob), SEALED_CHUNK)]


def flipped(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1:]


def sample(size: int) -> bytes:
    """A file of ``size`` bytes that is not all zeros and does not end in one."""
    return bytes((i * 7 + 3) % 251 + 1 for i in range(min(size, 251))) * (size // 251 + 1)


# -- round trips ------------------------------------------------------------------------

class RoundTripTests(SynchronousTestCase):

    def assertRoundTrip(self, size: int) -> None:
        data = os.urandom(size)
        key = new_key()
        blob, digest = seal(data, key, prefix=None)
        self.assertEqual(len(blob), encrypted_size(size))
        self.assertEqual(digest, hashlib.sha256(blob).digest())
        self.assertEqual(open_blob(blob, digest, size, key), data)

    def test_sizes_around_a_chunk(self) -> None:
        """Files of 0, 1, 65535, 65536 and 65537 bytes come back as they were."""
        for size in (0, 1, 65535, 65536, 65537):
            self.assertRoundTrip(size)

    def test_several_chunks(self) -> None:
        """A file of several chunks, not a multiple of one, comes back as it was."""
        self.assertRoundTrip(5 * CHUNK_BYTES + 123)

    def test_a_few_mebibytes(self) -> None:
        """A file of a few MiB comes back as it was."""
        self.assertRoundTrip(3 * 1024 * 1024 + 5)

    def test_an_empty_file_is_one_final_chunk_of_padding(self) -> None:
        """An empty file is one chunk, flagged final, of the smallest bucket's zeros."""
        blob, digest = seal(b"")
        self.assertEqual(len(blob), HEADER_BYTES + MIN_PADDED + TAG_BYTES)
        padded = crypto_aead_xchacha20poly1305_ietf_decrypt(
            blob[HEADER_BYTES:], associated_data(0), chunk_nonce(PREFIX, 0, True), KEY)
        self.assertEqual(padded, bytes(MIN_PADDED))
        self.assertEqual(open_blob(blob, digest, 0), b"")

    def test_pieces_of_any_size_give_the_same_blob(self) -> None:
        """Feeding the encryptor in odd pieces gives the bytes of feeding it at once."""
        data = os.urandom(3 * CHUNK_BYTES + 4321)
        whole, digest = seal(data)
        for piece in (1, 7, 1000, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 100_003):
            encryptor = Encryptor(KEY, len(data), nonce_prefix=PREFIX)
            parts = [encryptor.update(data[i:i + piece]) for i in range(0, len(data), piece)]
            self.assertEqual(b"".join(parts) + encryptor.finish(), whole, piece)
            self.assertEqual(encryptor.digest, digest)

    def test_the_decryptor_takes_pieces_of_any_size(self) -> None:
        """Feeding the decryptor in odd pieces gives the file back whole."""
        data = os.urandom(2 * CHUNK_BYTES + 999)
        blob, digest = seal(data)
        for piece in (1, 13, HEADER_BYTES, SEALED_CHUNK - 1, SEALED_CHUNK + 1, 77_777):
            self.assertEqual(open_blob(blob, digest, len(data), piece=piece), data, piece)

    def test_pieces_may_be_bytearrays_and_memoryviews(self) -> None:
        """update() takes bytes, a bytearray or a memoryview alike."""
        data = os.urandom(CHUNK_BYTES + 10)
        whole, digest = seal(data)
        encryptor = Encryptor(KEY, len(data), nonce_prefix=PREFIX)
        blob = (encryptor.update(bytearray(data[:500])) + encryptor.update(memoryview(data)[500:])
                + encryptor.finish())
        self.assertEqual(blob, whole)
        decryptor = Decryptor(KEY, digest, len(data))
        out = decryptor.update(bytearray(blob[:9])) + decryptor.update(memoryview(blob)[9:])
        decryptor.finish()
        self.assertEqual(out, data)

    def test_plaintext_comes_out_as_each_chunk_checks_out(self) -> None:
        """The decryptor gives a chunk's plaintext once the chunk is whole, never before."""
        data = os.urandom(3 * CHUNK_BYTES)
        blob, digest = seal(data)
        decryptor = Decryptor(KEY, digest, len(data))
        self.assertEqual(decryptor.update(blob[:HEADER_BYTES + SEALED_CHUNK - 1]), b"")
        self.assertEqual(decryptor.update(blob[HEADER_BYTES + SEALED_CHUNK - 1:
                                               HEADER_BYTES + SEALED_CHUNK]),
                         data[:CHUNK_BYTES])

    def test_the_padding_does_not_come_out(self) -> None:
        """The reader stops at the true size: the padding's zeros are not part of the file."""
        data = b"\x01" * 1025
        blob, digest = seal(data)
        self.assertEqual(padded_size(1025), 1088)
        self.assertEqual(open_blob(blob, digest, 1025, piece=5), data)

    def test_new_keys_and_prefixes_are_fresh(self) -> None:
        """Each key is 32 random bytes, and two encryptions of one file differ."""
        self.assertEqual(len(new_key()), 32)
        self.assertNotEqual(new_key(), new_key())
        self.assertNotEqual(seal(b"same", prefix=None)[0], seal(b"same", prefix=None)[0])


# -- what a server could try --------------------------------------------------------------

class TamperingTests(SynchronousTestCase):
    """A four-chunk file (three full chunks and a short last one); each
    change to its blob is refused."""

    def setUp(self) -> None:
        self.data = sample(3 * CHUNK_BYTES + 5000)
        self.size = len(self.data)
        self.blob, self.digest = seal(self.data)
        self.header, self.chunks = chunks_of(self.blob)
        self.assertEqual(len(self.chunks), 4)
        self.assertLess(len(self.chunks[3]), SEALED_CHUNK)

    def assertRefused(self, blob: bytes, digest: bytes | None = None, size: int | None = None,
                      key: bytes = KEY) -> str:
        with self.assertRaises(AttachmentError) as caught:
            open_blob(blob, digest or self.digest, self.size if size is None else size, key)
        return str(caught.exception)

    def assertRefusedStreaming(self, blob: bytes, digest: bytes | None = None,
                               size: int | None = None, key: bytes = KEY) -> str:
        with self.assertRaises(AttachmentError) as caught:
            streamed(blob, digest or self.digest, self.size if size is None else size, key)
        return str(caught.exception)

    def test_the_genuine_blob_opens(self) -> None:
        """The blob these tests alter opens as it is, in pieces or at once."""
        self.assertEqual(open_blob(self.blob, self.digest, self.size), self.data)
        self.assertEqual(streamed(self.blob, self.digest, self.size), self.data)

    def test_a_flipped_version_byte(self) -> None:
        """A blob of another format byte is refused at its first byte."""
        decryptor = Decryptor(KEY, self.digest, self.size)
        with self.assertRaises(AttachmentError) as caught:
            decryptor.update(flipped(self.blob, 0)[:1])
        self.assertIn("format", str(caught.exception))

    def test_a_flipped_prefix_byte(self) -> None:
        """A flipped byte of the nonce prefix is refused at the first chunk."""
        for at in (1, 8, HEADER_BYTES - 1):
            self.assertIn("chunk 0", self.assertRefusedStreaming(flipped(self.blob, at)))

    def test_a_flipped_body_byte(self) -> None:
        """A flipped byte in any chunk's ciphertext is refused at that chunk."""
        for index, offset in ((0, 0), (1, 12345), (3, 4999)):
            at = HEADER_BYTES + index * SEALED_CHUNK + offset
            self.assertIn(f"chunk {index}", self.assertRefusedStreaming(flipped(self.blob, at)))

    def test_a_flipped_tag_byte(self) -> None:
        """A flipped byte in any chunk's tag is refused at that chunk."""
        for index in range(4):
            at = min(HEADER_BYTES + (index + 1) * SEALED_CHUNK, len(self.blob)) - 1
            self.assertIn(f"chunk {index}", self.assertRefusedStreaming(flipped(self.blob, at)))

    def test_cut_at_a_chunk_boundary(self) -> None:
        """A blob that ends after a whole chunk is refused as cut short."""
        for chunks in (0, 1, 2, 3):
            cut = self.blob[:HEADER_BYTES + chunks * SEALED_CHUNK]
            self.assertIn("cut short", self.assertRefused(cut))

    def test_cut_inside_a_chunk(self) -> None:
        """A blob that ends inside a chunk, or inside its header, is refused as cut short."""
        for end in (0, 5, HEADER_BYTES + 1000, HEADER_BYTES + SEALED_CHUNK + 7,
                    len(self.blob) - 1):
            self.assertIn("cut short", self.assertRefused(self.blob[:end]))

    def test_the_last_chunk_is_flagged(self) -> None:
        """A chunk sealed as not the last does not open as the last, nor the reverse."""
        ad = associated_data(self.size)
        for index, final in ((0, True), (3, False)):
            with self.assertRaises(NaclCryptoError):
                crypto_aead_xchacha20poly1305_ietf_decrypt(
                    self.chunks[index], ad, chunk_nonce(PREFIX, index, final), KEY)

    def test_chunks_reordered(self) -> None:
        """Two chunks swapped are refused."""
        swapped = self.header + self.chunks[1] + self.chunks[0] + b"".join(self.chunks[2:])
        self.assertIn("chunk 0", self.assertRefusedStreaming(swapped))
        swapped = self.header + b"".join(self.chunks[:2]) + self.chunks[3] + self.chunks[2]
        self.assertRefused(swapped)

    def test_a_chunk_dropped(self) -> None:
        """A chunk dropped is refused: in the middle at once, at the end as cut short."""
        self.assertIn("chunk 1", self.assertRefusedStreaming(
            self.header + self.chunks[0] + b"".join(self.chunks[2:])))
        self.assertIn("cut short", self.assertRefused(self.header + b"".join(self.chunks[:3])))

    def test_a_chunk_duplicated(self) -> None:
        """A chunk repeated, in place of another or in addition, is refused."""
        self.assertIn("chunk 1", self.assertRefusedStreaming(
            self.header + self.chunks[0] + self.chunks[0] + b"".join(self.chunks[2:])))
        self.assertIn("chunk 1", self.assertRefusedStreaming(
            self.header + self.chunks[0] + b"".join(self.chunks)))
        self.assertRefusedStreaming(
            self.header + b"".join(self.chunks[:3]) + self.chunks[2] + self.chunks[3])

    def test_bytes_after_the_last_chunk(self) -> None:
        """Anything after the last chunk is refused as it arrives, however it is fed."""
        for extra in (b"\x00", self.chunks[3], self.chunks[0]):
            self.assertIn("past its last chunk", self.assertRefused(self.blob + extra))
        decryptor = Decryptor(KEY, self.digest, self.size)
        decryptor.update(self.blob)
        with self.assertRaises(AttachmentError):
            decryptor.update(b"\x00")

    def test_a_chunk_of_another_blob(self) -> None:
        """Another blob's chunk is refused at once, or by the digest if the prefix was reused."""
        other, _ = seal(bytes(self.size), prefix=bytes(16))
        mixed = self.header + self.chunks[0] + chunks_of(other)[1][1] + b"".join(self.chunks[2:])
        self.assertIn("chunk 1", self.assertRefusedStreaming(mixed))
        # The same key and prefix twice never happens (a key per file, a
        # random prefix): its chunks open in each other's place, and only
        # the digest tells the blobs apart.
        other, _ = seal(bytes(self.size))
        mixed = self.header + self.chunks[0] + chunks_of(other)[1][1] + b"".join(self.chunks[2:])
        self.assertIn("digest", self.assertRefused(mixed))

    def test_a_wrong_key(self) -> None:
        """A blob opened with another key is refused at its first chunk."""
        self.assertIn("chunk 0", self.assertRefusedStreaming(self.blob, key=new_key()))

    def test_a_wrong_digest(self) -> None:
        """A blob whose digest is not the pointer's is refused at the end."""
        wrong = bytes(32)
        self.assertEqual(streamed(self.blob, wrong, self.size), self.data)
        self.assertIn("digest", self.assertRefused(self.blob, digest=wrong))

    def test_a_wrong_size(self) -> None:
        """A size larger or smaller than the file's is refused, in its bucket or not."""
        self.assertEqual(padded_size(self.size + 1), padded_size(self.size))
        self.assertEqual(padded_size(self.size - 1), padded_size(self.size))
        for size in (self.size + 1, self.size - 1, self.size + CHUNK_BYTES):
            self.assertIn("chunk 0", self.assertRefusedStreaming(self.blob, size=size))
        for size in (0, 1, self.size - CHUNK_BYTES, self.size - 10_000):
            self.assertRefused(self.blob, size=size)

    def test_a_smaller_size_for_a_file_ending_in_zeros(self) -> None:
        """A file ending in zeros still does not open with a smaller size in its bucket."""
        data = b"text" + bytes(100)
        blob, digest = seal(data)
        with self.assertRaises(AttachmentError):
            open_blob(blob, digest, 4)

    def test_padding_that_is_not_zeros(self) -> None:
        """A blob whose padding holds a non-zero byte is refused, even with a valid tag."""
        data = b"short"
        padded = bytearray(data + bytes(padded_size(len(data)) - len(data)))
        padded[-1] = 1
        blob = bytes([1]) + PREFIX + crypto_aead_xchacha20poly1305_ietf_encrypt(
            bytes(padded), associated_data(len(data)), chunk_nonce(PREFIX, 0, True), KEY)
        with self.assertRaises(AttachmentError) as caught:
            open_blob(blob, hashlib.sha256(blob).digest(), len(data))
        self.assertIn("padding", str(caught.exception))

    def test_a_refused_decryptor_stays_refused(self) -> None:
        """After a refusal, the decryptor refuses every further call."""
        decryptor = Decryptor(KEY, self.digest, self.size)
        with self.assertRaises(AttachmentError):
            decryptor.update(flipped(self.blob, 20))
        with self.assertRaises(AttachmentError):
            decryptor.update(b"")
        with self.assertRaises(AttachmentError):
            decryptor.finish()

    def test_refusals_are_crypto_and_value_errors(self) -> None:
        """AttachmentError is both the client's CryptoError and a ValueError."""
        self.assertTrue(issubclass(AttachmentError, CryptoError))
        self.assertTrue(issubclass(AttachmentError, ValueError))


class MisuseTests(SynchronousTestCase):

    def test_more_than_the_size_announced(self) -> None:
        """An encryptor refuses a byte past the size it was given."""
        encryptor = Encryptor(KEY, 3)
        encryptor.update(b"abc")
        with self.assertRaises(AttachmentError):
            encryptor.update(b"d")

    def test_less_than_the_size_announced(self) -> None:
        """An encryptor refuses to finish before the size it was given."""
        encryptor = Encryptor(KEY, 3)
        encryptor.update(b"ab")
        with self.assertRaises(AttachmentError):
            encryptor.finish()

    def test_the_digest_waits_for_the_end(self) -> None:
        """The digest is not given before the encryptor finishes, nor anything after."""
        encryptor = Encryptor(KEY, 0)
        with self.assertRaises(AttachmentError):
            encryptor.digest
        encryptor.finish()
        with self.assertRaises(AttachmentError):
            encryptor.update(b"")

    def test_bad_parameters(self) -> None:
        """Keys, prefixes, digests and sizes of the wrong shape are refused."""
        for make in (lambda: Encryptor(KEY[:31], 1), lambda: Encryptor("k" * 32, 1),
                     lambda: Encryptor(KEY, -1), lambda: Encryptor(KEY, MAX_SIZE + 1),
                     lambda: Encryptor(KEY, True), lambda: Encryptor(KEY, 1.0),
                     lambda: Encryptor(KEY, 1, nonce_prefix=bytes(15)),
                     lambda: Decryptor(KEY, bytes(31), 1), lambda: Decryptor(KEY, bytes(32), -1),
                     lambda: Decryptor(bytes(33), bytes(32), 1)):
            self.assertRaises(AttachmentError, make)

    def test_the_chunk_counter_is_capped(self) -> None:
        """Chunk indices run from 0 to 2^56 - 1, in 7 bytes, and no further."""
        self.assertEqual(chunk_nonce(PREFIX, 2**56 - 1, True),
                         PREFIX + b"\xff" * 7 + b"\x01")
        self.assertEqual(chunk_nonce(PREFIX, 258, False), PREFIX + bytes(5) + b"\x01\x02\x00")
        for index in (2**56, -1):
            self.assertRaises(AttachmentError, chunk_nonce, PREFIX, index, False)
        self.assertLess(chunk_count(padded_size(MAX_SIZE)), 2**56)


# -- sizes ------------------------------------------------------------------------------

class SizeTests(SynchronousTestCase):

    def test_encrypted_size_is_the_blob_size(self) -> None:
        """encrypted_size is the real blob's length, at sizes around buckets and chunks."""
        sizes = set(range(0, 3000, 37)) | {1023, 1024, 1025, 1088, 1089}
        for chunks in range(1, 5):
            sizes |= {chunks * CHUNK_BYTES + d for d in (-17, -1, 0, 1, 17)}
        for size in sorted(sizes):
            encryptor = Encryptor(KEY, size)
            blob = encryptor.update(bytes(size)) + encryptor.finish()
            self.assertEqual(len(blob), encrypted_size(size), size)
            self.assertEqual(encryptor.blob_size, len(blob))

    def test_encrypted_size_formula(self) -> None:
        """A blob is 17 bytes of header, the padded file, and 16 bytes per chunk."""
        self.assertEqual(encrypted_size(0), 17 + 1024 + 16)
        self.assertEqual(encrypted_size(65537), 17 + 67584 + 2 * 16)
        self.assertEqual(encrypted_size(2**30), 17 + 2**30 + 16 * 2**14)

    def test_buckets_are_monotonic_and_bounded(self) -> None:
        """Buckets never shrink as a file grows, hold it, and add at most 1/16, 1/32, 1/64."""
        sizes = list(range(0, 140_000)) + [2**k + d for k in range(17, 53) for d in (-1, 0, 1)]
        sizes += [int.from_bytes(os.urandom(7), "big") >> (5 + i % 40) for i in range(2000)]
        previous = 0
        for size in sorted(sizes):
            padded = padded_size(size)
            self.assertGreaterEqual(padded, max(size, MIN_PADDED))
            self.assertGreaterEqual(padded, previous)
            self.assertEqual(padded_size(padded), padded)
            previous = padded
            for floor, share in ((MIN_PADDED, 16), (2**16, 32), (2**32, 64)):
                if size >= floor:
                    self.assertLess((padded - size) * share, size, size)

    def test_buckets_are_padme(self) -> None:
        """Buckets are Padmé's (the paper's formula, in floating point where it is exact)."""
        for size in list(range(MIN_PADDED, 300_000, 7)) + [10**6, 10**7 + 3, 2**31 - 5]:
            exponent = math.floor(math.log2(size))
            bits = math.floor(math.log2(exponent)) + 1
            mask = (1 << (exponent - bits)) - 1
            self.assertEqual(padded_size(size), (size + mask) & ~mask, size)
        self.assertEqual({padded_size(s) for s in range(MIN_PADDED + 1)}, {MIN_PADDED})

    def test_few_buckets(self) -> None:
        """From 64 KiB to 4 GiB, each doubling of size has 32 buckets."""
        buckets = set()
        size = 2**20 + 1
        while size <= 2**21:
            buckets.add(padded_size(size))
            size = padded_size(size) + 1
        self.assertEqual(len(buckets), 32)


# -- files ------------------------------------------------------------------------------

class FileTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def test_file_round_trip(self) -> None:
        """A file encrypted to a blob file decrypts to the same file; the fields make a pointer."""
        data = os.urandom(3 * CHUNK_BYTES + 17)
        (self.dir / "photo.jpg").write_bytes(data)
        fields = encrypt_file(self.dir / "photo.jpg", self.dir / "blob")
        blob = (self.dir / "blob").read_bytes()
        self.assertEqual(len(blob), encrypted_size(len(data)))
        self.assertEqual(fields["size"], len(data))
        self.assertEqual(base64.b64decode(fields["digest"]), hashlib.sha256(blob).digest())
        pointer = Pointer.from_json({**fields, "id": "att_1", "mimeType": "image/jpeg",
                                     "fileName": "photo.jpg"})
        decrypt_file(self.dir / "blob", self.dir / "out", pointer.key, pointer.digest,
                     pointer.size)
        self.assertEqual((self.dir / "out").read_bytes(), data)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["blob", "out", "photo.jpg"])

    def test_an_empty_file(self) -> None:
        """An empty file goes through encrypt_file and decrypt_file."""
        (self.dir / "empty").write_bytes(b"")
        fields = encrypt_file(self.dir / "empty", self.dir / "blob")
        decrypt_file(self.dir / "blob", self.dir / "out", base64.b64decode(fields["key"]),
                     base64.b64decode(fields["digest"]), 0)
        self.assertEqual((self.dir / "out").read_bytes(), b"")

    def test_a_refused_blob_writes_nothing(self) -> None:
        """A blob refused halfway leaves no file, and no temporary one, behind."""
        data = os.urandom(2 * CHUNK_BYTES)
        (self.dir / "in").write_bytes(data)
        fields = encrypt_file(self.dir / "in", self.dir / "blob")
        blob = (self.dir / "blob").read_bytes()
        (self.dir / "blob").write_bytes(flipped(blob, len(blob) - 1))
        with self.assertRaises(AttachmentError):
            decrypt_file(self.dir / "blob", self.dir / "out", base64.b64decode(fields["key"]),
                         base64.b64decode(fields["digest"]), len(data))
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["blob", "in"])


# -- the pointer ------------------------------------------------------------------------

def pointer_json(**changes: Any) -> dict[str, Any]:
    obj = {"id": "att_0b8e-4f8a", "key": base64.b64encode(KEY).decode(),
           "digest": base64.b64encode(bytes(range(32, 64))).decode(), "size": 123_456,
           "mimeType": "image/jpeg", "fileName": "Beach 10:30 ☀.jpg", "width": 4032,
           "height": 3024, "thumbnail": base64.b64encode(b"\xff\xd8 a small jpeg").decode()}
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not ...}


class PointerTests(SynchronousTestCase):

    def test_round_trip(self) -> None:
        """A pointer's JSON reads back to the same pointer, with or without its optional fields."""
        for obj in (pointer_json(), pointer_json(width=..., height=..., thumbnail=...)):
            pointer = Pointer.from_json(obj)
            self.assertEqual(pointer.to_json(), obj)
            self.assertEqual(Pointer.from_json(pointer.to_json()), pointer)
        self.assertEqual(Pointer.from_json(pointer_json()).key, KEY)

    def assertRefused(self, obj: Any) -> None:
        self.assertRaises(AttachmentError, Pointer.from_json, obj)

    def test_shape(self) -> None:
        """Not an object, a missing field, an unknown field or a null optional one is refused."""
        for obj in (None, [], "x", pointer_json(id=...), pointer_json(key=...),
                    pointer_json(digest=...), pointer_json(size=...),
                    pointer_json(mimeType=...), pointer_json(fileName=...),
                    pointer_json(extra=1), pointer_json(thumbnail=None),
                    pointer_json(width=None, height=None)):
            self.assertRefused(obj)

    def test_id(self) -> None:
        """An id that is not 1 to 64 of [A-Za-z0-9_-] is refused."""
        for value in ("", "a" * 65, "a/b", "../x", "a b", "a.b", "é", 1, None):
            self.assertRefused(pointer_json(id=value))
        Pointer.from_json(pointer_json(id="A-z_9" * 12 + "abcd"))

    def test_key_and_digest(self) -> None:
        """A key or digest not of 32 bytes in standard, canonical base64 is refused."""
        standard = base64.b64encode(b"\xfb" * 32).decode()
        self.assertIn("+", standard)
        Pointer.from_json(pointer_json(key=standard))
        for name in ("key", "digest"):
            for value in (base64.b64encode(bytes(31)).decode(),
                          base64.b64encode(bytes(33)).decode(),
                          base64.urlsafe_b64encode(b"\xfb" * 32).decode(),
                          standard.rstrip("="), standard[:-2] + "9=", "not base64!", 32,
                          None):
                self.assertRefused(pointer_json(**{name: value}))

    def test_size(self) -> None:
        """A size that is not an integer from 0 to 2^53 - 1 is refused."""
        for value in (-1, MAX_SIZE + 1, 1.0, True, "1", None):
            self.assertRefused(pointer_json(size=value))
        Pointer.from_json(pointer_json(size=0))
        Pointer.from_json(pointer_json(size=MAX_SIZE))

    def test_mime_type(self) -> None:
        """A MIME type that is not a bare type/subtype is refused."""
        for value in ("", "image", "image/", "/jpeg", "text/plain; charset=utf-8",
                      "../x/y", "a/b/c", "image/jpeg\n", "x" * 128 + "/y", 1):
            self.assertRefused(pointer_json(mimeType=value))
        Pointer.from_json(pointer_json(mimeType="application/vnd.openxmlformats-officedocument"
                                                ".wordprocessingml.document"))

    def test_file_name(self) -> None:
        """A file name with a separator, a control character, too long, empty or dots is refused."""
        for value in ("../x", "/etc/passwd", "a\\b", "a\x00b", "a\nb", "a\rb", "a\x7fb",
                      "a\x85b", "a\u2028b", "evil\u202egpj.exe", "", ".", "..", "x" * 256,
                      "é" * 128, "\udc80", 1, None):
            self.assertRefused(pointer_json(fileName=value))
            self.assertIsNotNone(file_name_problem(value))
        for value in ("x" * 255, "é" * 127, ".profile", "a..b", "Beach 10:30 ☀.jpg"):
            Pointer.from_json(pointer_json(fileName=value))

    def test_dimensions_and_thumbnail(self) -> None:
        """Dimensions come together, from 1 to 2^31 - 1; a thumbnail is 1 to 32 KiB."""
        for changes in ({"width": ...}, {"height": ...}, {"width": 0}, {"height": -1},
                        {"width": 2**31}, {"width": True}, {"width": 1.5},
                        {"thumbnail": ""},
                        {"thumbnail": base64.b64encode(bytes(32 * 1024 + 1)).decode()}):
            self.assertRefused(pointer_json(**changes))
        Pointer.from_json(pointer_json(width=1, height=2**31 - 1,
                                       thumbnail=base64.b64encode(bytes(32 * 1024)).decode()))

    def test_a_pointer_that_exists_is_valid(self) -> None:
        """Constructing a Pointer with a bad field raises, as reading one does."""
        self.assertRaises(AttachmentError, Pointer, "id", KEY, bytes(32), 1, "text/plain",
                          "../x")
        self.assertRaises(AttachmentError, Pointer, "id", KEY[:5], bytes(32), 1, "text/plain",
                          "x")


class SafeFileNameTests(SynchronousTestCase):

    def assertSafe(self, name: Any) -> str:
        """``safe_file_name(name)``, checked to be one harmless path component."""
        safe = safe_file_name(name)
        self.assertIsNone(file_name_problem(safe), repr(name))
        self.assertNotIn(safe[0], ". ")
        self.assertNotIn(safe[-1], ". ")
        self.assertFalse(set(safe) & set('<>:"|?*'))
        downloads = os.path.join(os.sep, "home", "u", "Downloads")
        joined = os.path.normpath(os.path.join(downloads, safe))
        self.assertEqual(os.path.dirname(joined), downloads)
        self.assertEqual(os.path.basename(joined), safe)
        return safe

    def test_paths_are_neutralised(self) -> None:
        """Relative, absolute and Windows paths become one name inside the directory."""
        self.assertEqual(self.assertSafe("../x"), "_x")
        self.assertEqual(self.assertSafe("/etc/passwd"), "_etc_passwd")
        self.assertEqual(self.assertSafe("a\\b"), "a_b")
        self.assertEqual(self.assertSafe("..\\..\\Windows\\win.ini"), "_.._Windows_win.ini")
        self.assertEqual(self.assertSafe("C:\\x"), "C__x")

    def test_control_characters_are_neutralised(self) -> None:
        """NUL, newlines and bidirectional overrides become '_'."""
        self.assertEqual(self.assertSafe("a\x00b"), "a_b")
        self.assertEqual(self.assertSafe("a\nb\r"), "a_b_")
        self.assertEqual(self.assertSafe("evil\u202egpj.exe"), "evil_gpj.exe")

    def test_empty_and_dot_names_fall_back(self) -> None:
        """An empty name, dots or spaces only, or no text at all give the fallback."""
        for name in ("", ".", "..", "...", " . ", None, 5):
            self.assertEqual(self.assertSafe(name), "attachment")
        self.assertEqual(safe_file_name("", "file.bin"), "file.bin")

    def test_hidden_and_device_names(self) -> None:
        """A leading dot goes; a Windows device name gets a '_' in front."""
        self.assertEqual(self.assertSafe(".bashrc"), "bashrc")
        self.assertEqual(self.assertSafe("CON"), "_CON")
        self.assertEqual(self.assertSafe("nul.txt"), "_nul.txt")
        self.assertEqual(self.assertSafe("console.txt"), "console.txt")

    def test_long_names_are_cut_keeping_the_extension(self) -> None:
        """A name over 255 UTF-8 bytes is cut, on a character boundary, keeping its extension."""
        for name in ("x" * 300, "é" * 200 + ".pdf", "☀" * 100 + ".jpeg",
                     "y" * 300 + "." + "z" * 40):
            safe = self.assertSafe(name)
            self.assertLessEqual(len(safe.encode("utf-8")), 255)
            self.assertGreater(len(safe.encode("utf-8")), 240)
            if name.endswith((".pdf", ".jpeg")):
                self.assertEqual(safe.rsplit(".", 1)[1], name.rsplit(".", 1)[1])

    def test_good_names_are_kept(self) -> None:
        """An ordinary name, in any script, is kept as it is."""
        for name in ("photo.jpg", "Résumé (final).pdf", "写真.png", "a..b", "x" * 255):
            self.assertEqual(self.assertSafe(name), name)


# -- the vectors ------------------------------------------------------------------------

def spec_blob(key: bytes, prefix: bytes, plaintext: bytes) -> bytes:
    """The blob as docs/encryption.rst describes it, written apart from the module."""
    length = max(len(plaintext), 1024)
    e = length.bit_length() - 1
    mask = (1 << (e - e.bit_length())) - 1
    padded = plaintext + bytes(((length + mask) & ~mask) - len(plaintext))
    label = b"cyphr-a1 attachment chunk"
    ad = len(label).to_bytes(4, "big") + label + b"\x01" + len(plaintext).to_bytes(8, "big")
    pieces = [padded[i:i + 65536] for i in range(0, len(padded), 65536)] or [b""]
    return b"\x01" + prefix + b"".join(
        crypto_aead_xchacha20poly1305_ietf_encrypt(
            piece, ad, prefix + i.to_bytes(7, "big") + bytes([i == len(pieces) - 1]), key)
        for i, piece in enumerate(pieces))


class VectorTests(SynchronousTestCase):
    """tests/vectors/attachments-v1.json, rebuilt from its inputs."""

    def test_the_blobs_rebuild_byte_for_byte(self) -> None:
        """Each file encrypts, with the fixed key and prefix, to the vector's blob and digest."""
        key, prefix = bytes.fromhex(VECTORS["key"]), bytes.fromhex(VECTORS["noncePrefix"])
        self.assertEqual(VECTORS["label"], attachcrypto.LABEL)
        self.assertEqual(VECTORS["chunkBytes"], CHUNK_BYTES)
        self.assertGreaterEqual(len(VECTORS["files"]), 4)
        for v in VECTORS["files"]:
            plaintext = bytes.fromhex(v["plaintext"])
            self.assertEqual(len(plaintext), v["size"])
            blob, digest = seal(plaintext, key, prefix)
            self.assertEqual(blob.hex(), v["blob"], v["name"])
            self.assertEqual(digest.hex(), v["digest"])
            self.assertEqual(spec_blob(key, prefix, plaintext).hex(), v["blob"])
            self.assertEqual(padded_size(v["size"]), v["paddedSize"])
            self.assertEqual(encrypted_size(v["size"]), v["blobSize"])
            self.assertEqual(associated_data(v["size"]).hex(), v["associatedData"])
            count = len(v["chunks"])
            self.assertEqual(count, chunk_count(v["paddedSize"]))
            for i, chunk in enumerate(v["chunks"]):
                self.assertEqual(chunk_nonce(prefix, i, i == count - 1).hex(), chunk["nonce"])

    def test_the_blobs_decrypt(self) -> None:
        """Each vector's blob decrypts to its plaintext, in pieces as at once."""
        key = bytes.fromhex(VECTORS["key"])
        for v in VECTORS["files"]:
            blob, digest = bytes.fromhex(v["blob"]), bytes.fromhex(v["digest"])
            for piece in (None, 1000):
                self.assertEqual(open_blob(blob, digest, v["size"], key, piece).hex(),
                                 v["plaintext"])

    def test_the_vectors_cover_the_edges(self) -> None:
        """The vectors hold an empty file and one of just over one chunk."""
        sizes = {v["size"] for v in VECTORS["files"]}
        self.assertIn(0, sizes)
        self.assertIn(CHUNK_BYTES + 1, sizes)

    def test_the_pointer(self) -> None:
        """The vector's pointer reads back to itself and names the short text's blob."""
        pointer = Pointer.from_json(VECTORS["pointer"])
        self.assertEqual(pointer.to_json(), VECTORS["pointer"])
        short = next(v for v in VECTORS["files"] if v["name"] == "short text")
        self.assertEqual(pointer.digest.hex(), short["digest"])
        self.assertEqual(pointer.key.hex(), VECTORS["key"])
        self.assertEqual(pointer.size, short["size"])
