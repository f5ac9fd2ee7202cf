"""
The local blob store (the default): files under ``<data_dir>/attachments``.

An upload grows in ``partial/<id>``; when it reaches its length it is
synced and renamed into ``<id[0:2]>/<id[2:4]>/<id>`` (two levels of 256
directories, so that no directory grows past a few thousand entries for
a billion blobs), and the directory is synced, so a completed blob is
whole after a crash. Bytes of an append are synced before the append
answers: the offset the client then resumes from is on the disk.

Each append writes through the I/O pool in blocks of BLOCK bytes, so the
reactor never waits for the disk.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed

from cyphr.blobs import BLOB_ID, BlobStoreError, BufferedWriter, Durable, Flow
from cyphr.cpu import CpuPool

# A block per thread hop: 1 MiB keeps the hops few (200 MB/s is 200 of them
# a second) and the memory of an upload at two blocks.
BLOCK = 1024 * 1024
IO_THREADS = 8
# Whether the store waits for the disk (fsync) where the module says it
# does. Always, but in the test suite (tests/__init__.py): its blobs go
# with the test run, and a power cut is not what it tests.
SYNC = True


def _fsync_directory(path: Path) -> None:
    if not SYNC:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_directory(path: Path) -> None:
    """``path`` and its missing parents (mode 0700), each new one synced
    into its parent, so that a blob renamed into it survives a crash."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another thread
        _fsync_directory(directory.parent)


def _failed(action: str, e: OSError) -> BlobStoreError:
    reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
    return BlobStoreError(f"{action}: {reason}")


class LocalBlobStore:
    kind = "local"

    def __init__(self, root: str | Path, reactor: Any, *, pool: CpuPool | None = None,
                 block: int = BLOCK) -> None:
        self.root = Path(root)
        self._partial = self.root / "partial"
        self._pool = pool or CpuPool(reactor, IO_THREADS, name="cyphr-blobs")
        self._block = block

    def _final(self, blob_id: str) -> Path:
        if not BLOB_ID.fullmatch(blob_id):  # never a path of the client's making
            raise ValueError(f"not a blob id: {blob_id!r}")
        return self.root / blob_id[0:2] / blob_id[2:4] / blob_id

    def _part(self, blob_id: str) -> Path:
        if not BLOB_ID.fullmatch(blob_id):
            raise ValueError(f"not a blob id: {blob_id!r}")
        return self._partial / blob_id

    # -- uploads ----------------------------------------------------------

    def begin(self, blob_id: str, length: int) -> Deferred[dict[str, Any]]:
        path = self._part(blob_id)

        def begin() -> dict[str, Any]:
            try:
                _make_directory(self._partial)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
                _fsync_directory(self._partial)
            except OSError as e:
                raise _failed("could not begin an upload", e) from None
            return {}
        return self._pool.run(begin)

    def append(self, blob_id: str, state: dict[str, Any], offset: int,
               flow: Flow) -> Deferred[_Writer]:
        path = self._part(blob_id)

        def open_at() -> int:
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError as e:
                raise _failed("could not open an upload", e) from None
            try:
                size = os.fstat(fd).st_size
                if size < offset:
                    raise BlobStoreError(f"the upload holds {size} bytes, fewer than its"
                                         f" recorded offset {offset}")
                # Bytes past the recorded offset were written by an append
                # whose answer never came (the process stopped): the client
                # sends them again.
                if size > offset:
                    os.ftruncate(fd, offset)
            except OSError as e:
                os.close(fd)
                raise _failed("could not open an upload", e) from None
            except BaseException:
                os.close(fd)
                raise
            return fd

        return self._pool.run(open_at).addCallback(
            lambda fd: _Writer(self._pool, fd, offset, self._block, flow))

    def complete(self, blob_id: str, state: dict[str, Any], length: int) -> Deferred[None]:
        part, final = self._part(blob_id), self._final(blob_id)

        def complete() -> None:
            try:
                try:
                    size = part.stat().st_size
                except FileNotFoundError:
                    # Done before, and the process stopped before the table
                    # said so: done.
                    if final.exists() and final.stat().st_size == length:
                        return
                    raise
                if size != length:
                    raise BlobStoreError(f"the upload holds {size} bytes, not {length}")
                _make_directory(final.parent)
                os.replace(part, final)
                _fsync_directory(final.parent)
                _fsync_directory(self._partial)
            except OSError as e:
                raise _failed("could not complete an upload", e) from None
        return self._pool.run(complete)

    # -- reading and deleting -----------------------------------------------

    def open(self, blob_id: str, start: int, end: int) -> Deferred[_Reader]:
        path = self._final(blob_id)

        def open_range() -> _Reader:  # (the id is checked before the pool)
            try:
                handle = open(path, "rb", buffering=0)
            except OSError as e:
                raise _failed("could not open a blob", e) from None
            handle.seek(start)
            return _Reader(self._pool, handle, end - start)
        return self._pool.run(open_range)

    def delete(self, blob_id: str, state: dict[str, Any]) -> Deferred[None]:
        paths = (self._final(blob_id), self._part(blob_id))

        def delete() -> None:
            for path in paths:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise _failed("could not delete a blob", e) from None
        return self._pool.run(delete)

    def stop(self) -> None:
        self._pool.stop()


class _Writer:
    def __init__(self, pool: CpuPool, fd: int, offset: int, block: int, flow: Flow) -> None:
        self._pool = pool
        self._fd = fd
        self._offset = offset
        self._written = offset  # where the next block goes
        self._buffer = BufferedWriter(block, flow, self._put)
        self._finished = False

    def _put(self, block: bytes) -> Deferred[None]:
        position, self._written = self._written, self._written + len(block)
        return self._pool.run(self._write_at, block, position)

    def _write_at(self, data: bytes, position: int) -> None:
        view = memoryview(data)
        try:
            while view:
                done = os.pwrite(self._fd, view, position)
                view, position = view[done:], position + done
        except OSError as e:
            raise _failed("could not write an upload", e) from None

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    async def _finish(self) -> Durable:
        try:
            try:
                await self._buffer.drain()
                rest = self._buffer.rest()
                if rest:
                    await self._put(rest)
            finally:
                # Whatever was written, even before a failure, is kept.
                await self._pool.run(self._sync)
        finally:
            os.close(self._fd)
        return Durable(self._written)

    def _sync(self) -> None:
        if not SYNC:
            return
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise _failed("could not sync an upload", e) from None

    def finish(self) -> Deferred[Durable]:
        assert not self._finished, "finish() is called once"
        self._finished = True
        return Deferred.fromCoroutine(self._finish())


class _Reader:
    def __init__(self, pool: CpuPool, handle: Any, remaining: int) -> None:
        self._pool = pool
        self._handle = handle
        self._remaining = remaining

    def read(self, size: int) -> Deferred[bytes]:
        want = min(size, self._remaining)
        if want <= 0:
            return succeed(b"")

        def read() -> bytes:
            try:
                data = self._handle.read(want)
            except OSError as e:
                raise _failed("could not read a blob", e) from None
            if not data:
                raise BlobStoreError("a blob is shorter than its recorded length")
            return data

        def got(data: bytes) -> bytes:
            self._remaining -= len(data)
            return data
        return self._pool.run(read).addCallback(got)

    def close(self) -> None:
        self._handle.close()
