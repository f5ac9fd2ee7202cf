"""
Blob stores: where the bytes of attachments live. The server never reads
them: each blob is what a client encrypted (docs/encryption.rst,
"Attachments"), stored under a random id.

A blob is written once, in order, by appends that may come over several
requests (a resumable upload), then completed, then only read, and at last
deleted. What a store must remember between appends besides the bytes (an
S3 multipart upload's id and its parts) is the upload's *state*: a small
JSON-able dict that the attachments table keeps and gives back to every
call, so that any node can take the next append.

Every call answers a Deferred and none blocks the reactor: disk and network
work runs on the store's I/O pool. A writer holds at most a few blocks in
memory and pauses its producer (the request's connection) past that, so an
upload of any size costs the server the same memory.

Stores: cyphr.blobs.local (files under the data directory, the default)
and cyphr.blobs.s3 (any S3-compatible object store).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

# 128 random bits as 32 lowercase hex digits: unguessable, and the same name
# on every file system (base64 would collide on a case-insensitive one).
BLOB_ID = re.compile(r"[0-9a-f]{32}")


class BlobStoreError(Exception):
    """The store could not do what was asked (a full disk, an object store
    that failed or did not answer). The upload keeps what was made durable
    before, and stays resumable from there."""


@dataclass(frozen=True)
class Durable:
    """What an append made durable: the blob's length now stored, and the
    upload's state to keep for the next call."""

    offset: int
    state: dict[str, Any] = field(default_factory=dict)


class Flow(Protocol):
    """What feeds a writer (the upload's connection): paused while the
    writer holds as much as it may, resumed once it has room."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


class BlobWriter(Protocol):
    def write(self, data: bytes) -> None:
        """Take the next bytes of the upload (after a failure: dropped,
        and ``finish`` reports it)."""

    def finish(self) -> Deferred[Durable]:
        """Make everything written durable (the request's body ended, or
        its connection was lost: what arrived is kept all the same, as far
        as the store can keep it). Fails with BlobStoreError when the store
        failed; what was durable before stays so."""


class BlobReader(Protocol):
    def read(self, size: int) -> Deferred[bytes]:
        """The next bytes of the range asked for, at most ``size``; b"" at its end."""

    def close(self) -> None:
        """Let the range go (read to its end or not)."""


class BlobStore(Protocol):
    kind: str  # "local" or "s3": for logs and metrics

    def begin(self, blob_id: str, length: int) -> Deferred[dict[str, Any]]:
        """Make room for a new upload of ``length`` bytes; its first state."""

    def append(self, blob_id: str, state: dict[str, Any], offset: int,
               flow: Flow) -> Deferred[BlobWriter]:
        """A writer that appends at ``offset`` (the durable offset the
        attachments table holds)."""

    def complete(self, blob_id: str, state: dict[str, Any], length: int) -> Deferred[None]:
        """The upload reached its length: make the blob whole and readable."""

    def open(self, blob_id: str, start: int, end: int) -> Deferred[BlobReader]:
        """Read bytes ``start`` to ``end`` (exclusive) of a completed blob."""

    def delete(self, blob_id: str, state: dict[str, Any]) -> Deferred[None]:
        """Remove the blob, completed or not; nothing there is no error."""

    def stop(self) -> None:
        """End the store's threads (with the process)."""


class BufferedWriter:
    """
    The part of a writer that both stores share: bytes gather into blocks of
    ``block`` bytes, each handed to ``put`` (which runs on the I/O pool) one
    after the other, in order. While one block is being put and a second has
    gathered, the flow is paused; it resumes once the first is put.

    A store's writer calls ``drain()`` and then decides what to do with
    ``rest()``, the bytes that did not fill a block.
    """

    def __init__(self, block: int, flow: Flow, put: Callable[[bytes], Deferred[None]]) -> None:
        self._block = block
        self._flow = flow
        self._put = put
        self._gathered = bytearray()
        self._putting: Deferred[None] | None = None
        self._failure: Failure | None = None
        self._paused = False
        self._looping = False
        self._drained: list[Deferred[None]] = []
        self.put_bytes = 0  # how many bytes ``put`` took so far

    def write(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._gathered += data
        self._next()

    def _next(self) -> None:
        """Put the next whole blocks, one at a time. A loop rather than
        recursion: a put that finishes at once (an inline pool) comes back
        here through ``_put_done`` while the loop runs."""
        if self._looping:
            return
        self._looping = True
        try:
            while (self._putting is None and self._failure is None
                   and len(self._gathered) >= self._block):
                block = bytes(self._gathered[:self._block])
                del self._gathered[:self._block]
                self._putting = self._put(block)
                self._putting.addCallbacks(self._put_done, self._put_failed,
                                           callbackArgs=(len(block),))
        finally:
            self._looping = False
        self._update_flow()
        if self._putting is None:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def _update_flow(self) -> None:
        # Full: a block is being put and the next one has gathered.
        full = (self._failure is None and self._putting is not None
                and len(self._gathered) >= self._block)
        if full and not self._paused:
            self._paused = True
            self._flow.pauseProducing()
        elif not full and self._paused:
            # After a failure too: the rest of the body comes, to be
            # dropped, and the request ends and is answered with it.
            self._paused = False
            self._flow.resumeProducing()

    def _put_done(self, _: Any, size: int) -> None:
        self._putting = None
        self.put_bytes += size
        self._next()

    def _put_failed(self, failure: Failure) -> None:
        self._putting = None
        self._failure = failure
        self._gathered.clear()
        self._next()

    def drain(self) -> Deferred[None]:
        """Fires once every whole block is put; fails with what failed."""
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        self._next()

        def failed(_: Any) -> None:
            if self._failure is not None:
                self._failure.raiseException()
        return d.addCallback(failed)

    def rest(self) -> bytes:
        """The bytes gathered that fill no block (after ``drain``)."""
        rest = bytes(self._gathered)
        self._gathered.clear()
        return rest
