"""
Attachments (docs/encryption.rst, "Attachments"): a file encrypted on the
client under a fresh key of its own, uploaded as an opaque blob, and named
to its readers by a :class:`Pointer` inside an end-to-end encrypted
message. The server holds the blob and never a key.

The blob, byte for byte (``cyphr-a1``, format 1)::

    blob   = 0x01 || prefix (16, random) || chunk_0 || ... || chunk_last
    chunk_i = XChaCha20-Poly1305(key, nonce_i, padded[i * 64 KiB : (i + 1) * 64 KiB], ad)
    nonce_i = prefix || uint56(i) || (0x01 if i is the last chunk else 0x00)
    ad     = opaque("cyphr-a1 attachment chunk") || uint8(1) || uint64(size)
    padded = the file || zeros, to bucket(size) bytes (Padmé, at least 1 KiB)
    digest = SHA-256(blob)

This is STREAM (Hoang, Reyhanitabar, Rogaway and Vizár, "Online
Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO
2015): every chunk's nonce says where it stands and whether it is the last,
so a reader streaming the blob refuses a chunk moved, dropped, repeated,
altered or cut off, and a blob that ends early or goes on after its last
chunk. The true size is in every chunk's associated data: a pointer whose
size is not the blob's opens no chunk. There are always at least one chunk
and a final one (a stream of no bytes would be one final empty chunk; the
padding makes every stream at least 1 KiB).

:class:`Encryptor` and :class:`Decryptor` take their input piece by piece
and hold at most a chunk of it; :func:`encrypt_file` and
:func:`decrypt_file` stream between files. Nothing here talks to the
server.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tempfile
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError as NaclCryptoError

from cyphr.client.crypto import CryptoError, b64, unb64
from cyphr.signing import text, uint8, uint64

VERSION = 1
LABEL = "cyphr-a1 attachment chunk"
KEY_BYTES = 32
PREFIX_BYTES = 16
COUNTER_BYTES = 7
TAG_BYTES = 16
DIGEST_BYTES = 32
HEADER_BYTES = 1 + PREFIX_BYTES  # the version byte, then the nonce prefix
CHUNK_BYTES = 64 * 1024  # plaintext per chunk, the last one possibly shorter
MAX_CHUNKS = 2 ** (8 * COUNTER_BYTES)  # chunk indices are 0 .. 2^56 - 1
MIN_PADDED = 1024  # every file pads to at least this much
MAX_SIZE = 2**53 - 1  # what JSON carries exactly; far fewer than MAX_CHUNKS chunks
MAX_FILE_NAME_BYTES = 255  # UTF-8, one path component on common file systems
MAX_THUMBNAIL_BYTES = 32 * 1024
# A ThumbHash (cyphr.client.thumbhash) is 13 to 25 bytes: 5 or 6 of header,
# then the terms. Room around that for later versions of it.
MIN_THUMBHASH_BYTES = 5
MAX_THUMBHASH_BYTES = 32
MAX_DIMENSION = 2**31 - 1  # PNG's limit
_READ_BYTES = 16 * CHUNK_BYTES  # how much encrypt_file and decrypt_file read at once
_ZEROS = bytes(CHUNK_BYTES)

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# RFC 6838's restricted-name, type and subtype, no parameters.
_MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
                        r"/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_REQUIRED = {"id", "key", "digest", "size", "mimeType", "fileName"}
_OPTIONAL = {"width", "height", "thumbnail", "thumbhash"}
# Characters that make a name read as another ("invoice\u202efdp.exe" shows
# as "invoiceexe.pdf"): the bidirectional controls.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                           "\u2066\u2067\u2068\u2069")
# Control characters, surrogates, line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
# safe_file_name also replaces the other invisible format characters.
_REPLACED_CATEGORIES = _FORBIDDEN_CATEGORIES | {"Cf"}
# What Windows refuses in a name, on top of the above.
_WINDOWS_CHARACTERS = frozenset('<>:"|?*')
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{p}{n}" for p in ("COM", "LPT") for n in range(1, 10)])


class AttachmentError(CryptoError, ValueError):
    """An attachment, blob or pointer refused; the text says which check failed."""


# -- sizes ----------------------------------------------------------------------------

def _check_size(size: Any) -> int:
    if type(size) is not int or not 0 <= size <= MAX_SIZE:
        raise AttachmentError(f"a size is an integer from 0 to {MAX_SIZE}")
    return size


def padded_size(size: int) -> int:
    """The bucket of a file of ``size`` bytes: Padmé (Nikitin et al.,
    "Reducing Metadata Leakage from Encrypted Files and Communication with
    PURBs", PETS 2019) of ``max(size, 1024)``. With ``L`` that, ``E`` =
    floor(log2 L) and ``S`` = floor(log2 E) + 1, ``L`` rounded up to a
    multiple of 2^(E - S). Integers only, so every implementation agrees to
    the byte. The padding is under L / 2^S: below 6.25% of the file from
    1 KiB, 3.125% from 64 KiB, 1.5625% from 4 GiB."""
    length = max(_check_size(size), MIN_PADDED)
    exponent = length.bit_length() - 1
    mask = (1 << (exponent - exponent.bit_length())) - 1
    return (length + mask) & ~mask


def chunk_count(padded: int) -> int:
    """Chunks of a stream of ``padded`` bytes: at least one, the last one
    not empty unless the stream is."""
    return max(1, -(-padded // CHUNK_BYTES))


def encrypted_size(size: int) -> int:
    """The blob's exact length for a file of ``size`` bytes (an uploader's
    ``Upload-Length``, before it encrypts anything)."""
    padded = padded_size(size)
    return HEADER_BYTES + padded + TAG_BYTES * chunk_count(padded)


# -- the construction -----------------------------------------------------------------

def new_key() -> bytes:
    """A fresh random key: one per file, never reused."""
    return os.urandom(KEY_BYTES)


def associated_data(size: int) -> bytes:
    """Every chunk's associated data: opaque(label) || uint8(1) || uint64(size)."""
    return text(LABEL) + uint8(VERSION) + uint64(_check_size(size))


def chunk_nonce(prefix: bytes, index: int, final: bool) -> bytes:
    """The 24-byte nonce of chunk ``index``: prefix (16) || uint56(index)
    || uint8(final)."""
    if len(prefix) != PREFIX_BYTES:
        raise AttachmentError(f"the nonce prefix is {PREFIX_BYTES} bytes")
    if not 0 <= index < MAX_CHUNKS:
        raise AttachmentError(f"a blob has at most 2^{8 * COUNTER_BYTES} chunks")
    return prefix + index.to_bytes(COUNTER_BYTES, "big") + (b"\x01" if final else b"\x00")


def _check_key(key: Any, what: str = "the key") -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise AttachmentError(f"{what} is {KEY_BYTES} bytes")
    return key


class _Chunks:
    """Cuts a stream given piece by piece into chunks of known lengths and
    hands each, whole, to :meth:`_chunk`; holds at most one chunk."""

    def __init__(self, padded: int, overhead: int) -> None:
        self._last = chunk_count(padded) - 1
        self._last_bytes = padded - self._last * CHUNK_BYTES + overhead
        self._full_bytes = CHUNK_BYTES + overhead
        self._index = 0
        self._buffer = bytearray()

    def _length(self) -> int:
        return self._full_bytes if self._index < self._last else self._last_bytes

    def _chunk(self, data: bytes, index: int, final: bool) -> bytes:
        raise NotImplementedError

    def _cut(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """What the chunks completed by ``data`` give. ``data`` never goes
        past the last chunk (the callers count)."""
        out: list[bytes] = []
        view = memoryview(data).cast("B")
        if self._buffer:
            wanted = self._length() - len(self._buffer)
            self._buffer += view[:wanted]
            view = view[wanted:]
            if len(self._buffer) < self._length():
                return out
            out.append(self._next(bytes(self._buffer)))
            self._buffer.clear()
        while self._index <= self._last and len(view) >= self._length():
            length = self._length()
            out.append(self._next(bytes(view[:length])))
            view = view[length:]
        self._buffer += view
        return out

    def _next(self, data: bytes) -> bytes:
        index = self._index
        self._index += 1
        return self._chunk(data, index, index == self._last)

    @property
    def _complete(self) -> bool:
        return self._index > self._last


class Encryptor(_Chunks):
    """Encrypts a file of ``size`` bytes (known before the first byte: it
    decides the padding and which chunk is the last) under ``key``.
    :meth:`update` takes the file piece by piece and answers the blob's
    bytes ready so far; :meth:`finish` (after exactly ``size`` bytes) the
    rest, padding included. Then :attr:`digest` is the blob's SHA-256.

    ``nonce_prefix`` is for tests and vectors only: it is otherwise 16
    random bytes, and must never repeat under one key."""

    def __init__(self, key: bytes, size: int, *, nonce_prefix: bytes | None = None) -> None:
        self.key = _check_key(key)
        self.size = _check_size(size)
        self.padded = padded_size(size)
        self.blob_size = encrypted_size(size)
        prefix = os.urandom(PREFIX_BYTES) if nonce_prefix is None else nonce_prefix
        if not isinstance(prefix, bytes) or len(prefix) != PREFIX_BYTES:
            raise AttachmentError(f"the nonce prefix is {PREFIX_BYTES} bytes")
        super().__init__(self.padded, 0)
        self._prefix = prefix
        self._ad = associated_data(size)
        self._hash = hashlib.sha256()
        self._header: bytes | None = bytes([VERSION]) + prefix
        self._taken = 0
        self._zeros = self.padded - size  # the padding still to encrypt
        self._digest: bytes | None = None

    def _chunk(self, data: bytes, index: int, final: bool) -> bytes:
        return crypto_aead_xchacha20poly1305_ietf_encrypt(
            data, self._ad, chunk_nonce(self._prefix, index, final), self.key)

    def _out(self, pieces: list[bytes]) -> bytes:
        if self._header is not None:
            pieces.insert(0, self._header)
            self._header = None
        out = b"".join(pieces)
        self._hash.update(out)
        return out

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """The blob's bytes that ``data``, the file's next bytes, completes."""
        if self._digest is not None:
            raise AttachmentError("the attachment is encrypted already")
        length = memoryview(data).nbytes
        if self._taken + length > self.size:
            raise AttachmentError(f"the file is longer than the {self.size} bytes announced")
        self._taken += length
        return self._out(self._cut(data))

    def finish_pieces(self) -> Iterator[bytes]:
        """:meth:`finish` a chunk at a time, so that a large file's padding
        is never held whole (run it to its end)."""
        if self._digest is not None:
            raise AttachmentError("the attachment is encrypted already")
        if self._taken != self.size:
            raise AttachmentError(f"the file ended after {self._taken} of the {self.size} "
                                  f"bytes announced")
        while True:
            # At most up to the end of the chunk under way: one chunk a piece.
            zeros = min(self._zeros, CHUNK_BYTES - len(self._buffer))
            self._zeros -= zeros
            out = self._out(self._cut(_ZEROS[:zeros]))
            if out:
                yield out
            if not self._zeros:
                break
        assert self._complete and not self._buffer
        self._digest = self._hash.digest()

    def finish(self) -> bytes:
        """The rest of the blob: the last chunks, padding included."""
        return b"".join(self.finish_pieces())

    @property
    def digest(self) -> bytes:
        """SHA-256 of the whole blob, once finished."""
        if self._digest is None:
            raise AttachmentError("the digest is known once the attachment is encrypted")
        return self._digest


class Decryptor(_Chunks):
    """Decrypts a blob piece by piece for a file of ``size`` bytes under
    ``key``. :meth:`update` answers the file's bytes that the blob's next
    bytes complete, each chunk authenticated before any of it comes out;
    :meth:`finish` refuses a blob cut short or whose SHA-256 is not
    ``digest``. Until it returns, what came out is authentic but maybe not
    the whole file: keep it aside (a temporary file) until then. After a
    refusal, every call refuses."""

    def __init__(self, key: bytes, digest: bytes, size: int) -> None:
        self.key = _check_key(key)
        if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
            raise AttachmentError(f"the digest is {DIGEST_BYTES} bytes")
        self.expected_digest = digest
        self.size = _check_size(size)
        self.padded = padded_size(size)
        self.blob_size = encrypted_size(size)
        super().__init__(self.padded, TAG_BYTES)
        self._ad = associated_data(size)
        self._hash = hashlib.sha256()
        self._header = bytearray()
        self._prefix = b""
        self._received = 0
        self._refused: str | None = None
        self._finished = False

    def _refuse(self, why: str) -> AttachmentError:
        self._refused = why
        self._buffer.clear()
        return AttachmentError(why)

    def _chunk(self, data: bytes, index: int, final: bool) -> bytes:
        try:
            plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
                data, self._ad, chunk_nonce(self._prefix, index, final), self.key)
        except NaclCryptoError:
            raise self._refuse(f"chunk {index} does not open: altered, moved, cut, of another "
                               f"blob or key, or the size is not the blob's") from None
        start = index * CHUNK_BYTES
        keep = max(0, min(len(plain), self.size - start))
        padding = plain[keep:]
        if padding.count(0) != len(padding):
            raise self._refuse("the padding is not all zeros")
        return plain[:keep] if keep < len(plain) else plain

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        """The file's bytes that ``data``, the blob's next bytes, completes."""
        if self._refused is not None:
            raise AttachmentError(self._refused)
        if self._finished:
            raise AttachmentError("the attachment is decrypted already")
        view = memoryview(data).cast("B")
        self._received += len(view)
        if self._received > self.blob_size:
            raise self._refuse(f"the blob goes on past its last chunk ({self.blob_size} bytes "
                               f"for a file of {self.size})")
        self._hash.update(view)
        if len(self._header) < HEADER_BYTES:
            wanted = HEADER_BYTES - len(self._header)
            self._header += view[:wanted]
            view = view[wanted:]
            if self._header[:1] not in (b"", bytes([VERSION])):
                raise self._refuse(f"the blob is not of format {VERSION}")
            if len(self._header) < HEADER_BYTES:
                return b""
            self._prefix = bytes(self._header[1:])
        return b"".join(self._cut(view))

    def finish(self) -> None:
        """Refuses a blob that ended early or is not the one of ``digest``."""
        if self._refused is not None:
            raise AttachmentError(self._refused)
        if self._finished:
            return
        if self._received < self.blob_size:
            raise self._refuse(f"the blob is cut short: {self._received} of {self.blob_size} "
                               f"bytes")
        assert self._complete
        if not hmac.compare_digest(self._hash.digest(), self.expected_digest):
            raise self._refuse("the blob's digest is not the pointer's")
        self._finished = True


# -- files ------------------------------------------------------------------------------

@contextmanager
def _replacing(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A new file (mode 0600) that becomes ``path`` only if the block ends
    without an exception; otherwise it is gone and ``path`` untouched."""
    target = os.path.abspath(os.fspath(path))
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".",
                                     suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


def encrypt_file(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]
                 ) -> dict[str, Any]:
    """Encrypt the file at ``src_path`` under a new key into a blob at
    ``dst_path`` (``encrypted_size(size)`` bytes), streaming; answers the
    pointer's fields it decides, as in its JSON: ``key``, ``digest``
    (base64) and ``size``. A file that changes size meanwhile is refused."""
    key = new_key()
    with open(src_path, "rb") as src, _replacing(dst_path) as dst:
        encryptor = Encryptor(key, os.fstat(src.fileno()).st_size)
        while piece := src.read(_READ_BYTES):
            dst.write(encryptor.update(piece))
        for piece in encryptor.finish_pieces():
            dst.write(piece)
    return {"key": b64(key), "digest": b64(encryptor.digest), "size": encryptor.size}


def decrypt_file(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str],
                 key: bytes, digest: bytes, size: int) -> None:
    """Decrypt the blob at ``src_path`` into ``dst_path``, streaming. The
    file appears at ``dst_path`` (replacing what was there) only once the
    whole blob checked out; AttachmentError otherwise, and nothing is
    written. ``dst_path`` is the caller's choice: for a name from a
    pointer, see :func:`safe_file_name`."""
    decryptor = Decryptor(key, digest, size)
    with open(src_path, "rb") as src, _replacing(dst_path) as dst:
        while piece := src.read(_READ_BYTES):
            dst.write(decryptor.update(piece))
        decryptor.finish()


# -- the pointer ------------------------------------------------------------------------

def file_name_problem(name: Any) -> str | None:
    """Why ``name`` is not a file name a pointer may carry, or None: text
    of 1 to 255 UTF-8 bytes, not "." or "..", with no "/" or "\\", no
    control character, line or paragraph separator, and no bidirectional
    control."""
    if not isinstance(name, str) or name in ("", ".", ".."):
        return "fileName is a name: not empty, not '.' or '..'"
    for c in name:
        if c in "/\\":
            return "fileName holds a path separator"
        if unicodedata.category(c) in _FORBIDDEN_CATEGORIES or c in _BIDI_CONTROLS:
            return f"fileName holds the control character U+{ord(c):04X}"
    if len(name.encode("utf-8")) > MAX_FILE_NAME_BYTES:
        return f"fileName is longer than {MAX_FILE_NAME_BYTES} bytes"
    return None


def safe_file_name(name: Any, fallback: str = "attachment") -> str:
    """A name to create a received file under in a download directory,
    whatever ``name`` is: one path component on POSIX and Windows alike.
    Path separators, control and format characters (the bidirectional
    ones among them), and what Windows refuses become "_"; leading dots
    and spaces (hidden files, "..") and trailing ones go; a Windows device
    name ("CON", "nul.txt") gets a "_" in front; a name longer than 255
    UTF-8 bytes is cut, keeping its extension; nothing left gives
    ``fallback``."""
    if not isinstance(name, str):
        return fallback
    name = "".join(
        "_" if c in "/\\" or c in _WINDOWS_CHARACTERS
        or unicodedata.category(c) in _REPLACED_CATEGORIES else c
        for c in name)
    name = name.strip(". ")
    if name.split(".")[0].upper() in _WINDOWS_DEVICES:
        name = "_" + name
    if len(name.encode("utf-8")) > MAX_FILE_NAME_BYTES:
        stem, dot, extension = name.rpartition(".")
        if not dot or not stem or len(extension.encode("utf-8")) > 16:
            stem, dot, extension = name, "", ""
        room = MAX_FILE_NAME_BYTES - len((dot + extension).encode("utf-8"))
        stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore").rstrip(". ")
        name = stem + dot + extension if stem else ""
    return name or fallback


def _b64_field(obj: dict[str, Any], name: str, size: int | None = None) -> bytes:
    value = obj[name]
    try:
        raw = unb64(value, name, size)
    except CryptoError as e:
        raise AttachmentError(str(e)) from None
    if b64(raw) != value:  # one encoding only: no stray bits in the last character
        raise AttachmentError(f"{name} is not canonical base64")
    return raw


@dataclass(frozen=True)
class Pointer:
    """What a message carries for an attachment: the server's ``id`` for
    the blob, the ``key`` and the blob's ``digest``, the file's true
    ``size``, ``mime_type`` and ``file_name``, and for an image its
    ``width`` and ``height``, a small ``thumbnail`` (an image file) and a
    ``thumbhash`` (a placeholder of about 25 bytes: cyphr.client.thumbhash).
    A Pointer that exists is valid (AttachmentError otherwise). Its JSON::

        {"id", "key", "digest", "size", "mimeType", "fileName",
         "width"?, "height"?, "thumbnail"?, "thumbhash"?}

    binary fields in standard base64, absent ones left out (never null),
    no other field."""

    id: str
    key: bytes
    digest: bytes
    size: int
    mime_type: str
    file_name: str
    width: int | None = None
    height: int | None = None
    thumbnail: bytes | None = None
    thumbhash: bytes | None = None

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise AttachmentError(problem)

    def problem(self) -> str | None:
        """Why this is not a pointer to send or follow, or None."""
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            return "id is 1 to 64 of A-Z, a-z, 0-9, '_' and '-'"
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            return f"key is {KEY_BYTES} bytes"
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_BYTES:
            return f"digest is {DIGEST_BYTES} bytes"
        if type(self.size) is not int or not 0 <= self.size <= MAX_SIZE:
            return f"size is an integer from 0 to {MAX_SIZE}"
        if not isinstance(self.mime_type, str) or not _MIME_TYPE.fullmatch(self.mime_type):
            return "mimeType is a type/subtype (RFC 6838), without parameters"
        problem = file_name_problem(self.file_name)
        if problem is not None:
            return problem
        if (self.width is None) != (self.height is None):
            return "width and height come together, or neither"
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int
                                      or not 1 <= value <= MAX_DIMENSION):
                return f"{name} is an integer from 1 to {MAX_DIMENSION}"
        if self.thumbnail is not None and (not isinstance(self.thumbnail, bytes)
                                           or not 1 <= len(self.thumbnail)
                                           <= MAX_THUMBNAIL_BYTES):
            return f"thumbnail is 1 to {MAX_THUMBNAIL_BYTES} bytes"
        if self.thumbhash is not None and (not isinstance(self.thumbhash, bytes)
                                           or not MIN_THUMBHASH_BYTES <= len(self.thumbhash)
                                           <= MAX_THUMBHASH_BYTES):
            return f"thumbhash is {MIN_THUMBHASH_BYTES} to {MAX_THUMBHASH_BYTES} bytes"
        return None

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": self.id, "key": b64(self.key), "digest": b64(self.digest),
                               "size": self.size, "mimeType": self.mime_type,
                               "fileName": self.file_name}
        if self.width is not None:
            obj["width"], obj["height"] = self.width, self.height
        if self.thumbnail is not None:
            obj["thumbnail"] = b64(self.thumbnail)
        if self.thumbhash is not None:
            obj["thumbhash"] = b64(self.thumbhash)
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> Pointer:
        """The pointer ``obj`` is, or AttachmentError saying what is wrong."""
        if not isinstance(obj, dict) or not _REQUIRED <= set(obj) <= _REQUIRED | _OPTIONAL:
            raise AttachmentError("a pointer is an object of the fields "
                                  + ", ".join(sorted(_REQUIRED))
                                  + " and maybe " + ", ".join(sorted(_OPTIONAL)))
        for name, kind in (("id", str), ("mimeType", str), ("fileName", str), ("size", int),
                           ("width", int), ("height", int)):
            if name in obj and (not isinstance(obj[name], kind) or isinstance(obj[name], bool)):
                raise AttachmentError(f"{name} is not {'text' if kind is str else 'an integer'}")
        return cls(obj["id"], _b64_field(obj, "key", KEY_BYTES),
                   _b64_field(obj, "digest", DIGEST_BYTES), obj["size"], obj["mimeType"],
                   obj["fileName"], obj.get("width"), obj.get("height"),
                   _b64_field(obj, "thumbnail") if "thumbnail" in obj else None,
                   _b64_field(obj, "thumbhash") if "thumbhash" in obj else None)
