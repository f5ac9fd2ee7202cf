"""
The S3 blob store: objects in a bucket of any S3-compatible object store
(AWS, MinIO, Ceph, ...), named ``<prefix><id>``.

An upload is an S3 multipart upload. Every part but the last must hold at
least 5 MiB, so each append puts whole parts of ``part_size`` bytes; the
bytes it ends with that fill no part (the request ended, or its connection
was lost) are kept as a small object of their own, the upload's *tail*,
which the next append reads back and sends first, as the start of its
first part (tusd's s3store does the same). ``complete`` puts the tail as
the last part, which may be small. The state that the attachments table
keeps is ``{"uploadId": ..., "parts": [{"n", "etag", "size"}], "tail": size}``;
the durable offset is the parts' sizes plus the tail's.

The tail object is named for where it starts in the blob,
``<prefix>tails/<id>.<start>``, not for the blob alone: an append whose
answer never reached the attachments table (the process stopped, the
table's write failed) may have stored a tail of its own already, and the
next append, resumed from the offset the table kept, must still find the
tail that offset counts. A later tail that starts where the kept one
starts only ever extends it (the same upload, appended in order), and one
that starts elsewhere has another name; the kept tail is read by its
recorded length. Tails left behind so go with ``complete`` and ``delete``.

An upload in progress holds up to about three parts in memory (the one
being put, one gathered, what the connection had sent when it was
paused): with S3's 5 MiB floor, 15 MiB or more, where the local store
holds 3 MiB. A blob has at most 10,000 parts: 50 GiB at 5 MiB a part.

Every call runs on the store's thread pool (botocore blocks); the client
is thread-safe. Credentials are taken as arguments and never logged, and
errors say what failed in a few words: no URL (of a request, signed or not)
and no key.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.logger import Logger

from cyphr.blobs import BLOB_ID, BlobStoreError, BufferedWriter, Durable, Flow
from cyphr.cpu import CpuPool

T = TypeVar("T")

_log = Logger()

MIB = 1024 * 1024
# S3's limits: every part but the last holds at least 5 MiB, an upload has
# at most 10,000 parts (so a blob at most 10,000 * part_size bytes).
MIN_PART_SIZE = 5 * MIB
MAX_PARTS = 10_000
# Parts as small as S3 allows: an upload holds up to about three in memory
# (20 parallel uploads grew the server's RSS by 189 MiB with 5 MiB parts,
# 256 MiB with 8 MiB: benchmarks/attachments.py --s3).
PART_SIZE = MIN_PART_SIZE
# Appends one process runs at once (see S3BlobStore): 8 of about 15 MiB each.
MAX_APPENDS = 8
# Requests wait on the network, not on a CPU: more threads than cores.
IO_THREADS = 16

# Answers that mean "already gone", which a delete or an abort accepts.
_GONE = {"NoSuchUpload", "NoSuchKey", "404", "NotFound"}


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code") or "unknown error")


def _reason(e: BaseException) -> str:
    """A few words on what went wrong: never str(e), which may hold a URL."""
    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = _error_code(e)
        return f"{code} (HTTP {status})" if status else code
    if isinstance(e, (ConnectTimeoutError, ReadTimeoutError)):
        return "the object store did not answer in time"
    if isinstance(e, EndpointConnectionError):
        return "the object store could not be reached"
    return type(e).__name__


def _store_error(action: str, e: BaseException) -> BlobStoreError:
    # Not exc_info: a botocore error's text can hold the request's URL.
    _log.debug("S3 {action} failed: {reason}", action=action, reason=_reason(e))
    return BlobStoreError(f"{action}: {_reason(e)}")


def _call(action: str, f: Callable[..., T], **kwargs: Any) -> T:
    """One botocore call; what fails becomes a BlobStoreError."""
    try:
        return f(**kwargs)
    except (BotoCoreError, ClientError, OSError) as e:
        raise _store_error(action, e) from None


def _call_unless_gone(action: str, f: Callable[..., T], **kwargs: Any) -> T | None:
    """One botocore call, answering None when its object or upload is not there."""
    try:
        return f(**kwargs)
    except ClientError as e:
        if _gone(e):
            return None
        raise _store_error(action, e) from None
    except (BotoCoreError, OSError) as e:
        raise _store_error(action, e) from None


def _gone(e: BaseException) -> bool:
    return isinstance(e, ClientError) and _error_code(e) in _GONE


def _md5(data: bytes) -> str:
    # The store checks the bytes it got against it: a part corrupted on the
    # way is refused, not kept (and every S3-compatible store knows it).
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _parse_state(state: dict[str, Any]) -> tuple[str, list[dict[str, Any]], int]:
    """The upload id, parts and tail length of a state, checked."""
    try:
        upload_id = state["uploadId"]
        parts = [{"n": int(p["n"]), "etag": str(p["etag"]), "size": int(p["size"])}
                 for p in state["parts"]]
        tail = int(state.get("tail", 0))
    except (KeyError, TypeError, ValueError):
        raise BlobStoreError("the upload's state is not an S3 upload's") from None
    if not isinstance(upload_id, str) or tail < 0:
        raise BlobStoreError("the upload's state is not an S3 upload's")
    return upload_id, parts, tail


class S3BlobStore:
    kind = "s3"

    def __init__(self, reactor: Any, *, endpoint: str | None, bucket: str, region: str,
                 access_key: str, secret_key: str, prefix: str = "attachments/",
                 part_size: int = PART_SIZE, pool: CpuPool | None = None,
                 threads: int = IO_THREADS, connect_timeout: float = 5,
                 read_timeout: float = 30, max_attempts: int = 3,
                 session: botocore.session.Session | None = None,
                 max_appends: int = MAX_APPENDS) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 parts hold at least {MIN_PART_SIZE} bytes, not {part_size}")
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size
        self._pool = pool or CpuPool(reactor, threads, name="cyphr-s3")
        # Appends running at once: each holds up to about three parts in
        # memory, so the process's share of uploads is capped; the others
        # wait, their connections paused (a client that waits past the
        # request timeout is answered 408 and resumes later).
        self._appends = DeferredSemaphore(max_appends)
        config = Config(
            signature_version="s3v4",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
            # An open reader holds its connection between reads, not a thread.
            max_pool_connections=threads * 4,
            # MinIO, Ceph and the like name the bucket in the path; AWS
            # (no endpoint given) in the host name.
            s3={"addressing_style": "path"} if endpoint else None,
            # The endpoint is ours to say: not the AWS_ENDPOINT_URL of the
            # environment or a profile's.
            ignore_configured_endpoint_urls=True,
            # The CRC checksums botocore sends by default since 1.36 are
            # refused by many S3-compatible stores; parts carry Content-MD5.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # Loading the service model reads files (0.1 s): once, at start; a
        # session given (tests make many stores) has it loaded already.
        session = session or botocore.session.Session()
        self._client = session.create_client(
            "s3", region_name=region, endpoint_url=endpoint, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, config=config)

    def _key(self, blob_id: str) -> str:
        if not BLOB_ID.fullmatch(blob_id):  # never a key of the client's making
            raise ValueError(f"not a blob id: {blob_id!r}")
        return self.prefix + blob_id

    def _tails(self, blob_id: str) -> str:
        return f"{self.prefix}tails/{blob_id}."

    def _tail_key(self, blob_id: str, start: int) -> str:
        return f"{self._tails(blob_id)}{start}"

    # -- blocking calls, on the pool -----------------------------------------

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        answer = _call("could not upload a part", self._client.upload_part,
                       Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                       Body=data, ContentMD5=_md5(data))
        return answer["ETag"]

    def _put_object(self, action: str, key: str, data: bytes) -> None:
        _call(action, self._client.put_object, Bucket=self.bucket, Key=key, Body=data,
              ContentMD5=_md5(data), ContentType="application/octet-stream")

    def _read_tail(self, blob_id: str, start: int, size: int) -> bytes:
        # By its recorded length: a later tail of the same start may have
        # extended it (see the module's docstring).
        answer = _call("could not read an upload's tail", self._client.get_object,
                       Bucket=self.bucket, Key=self._tail_key(blob_id, start),
                       Range=f"bytes=0-{size - 1}")
        body = answer["Body"]
        try:
            data = _call("could not read an upload's tail", body.read)
        finally:
            body.close()
        if len(data) != size:
            raise BlobStoreError(f"an upload's tail holds {len(data)} bytes, not {size}")
        return data

    def _abort(self, action: str, key: str, upload_id: str) -> None:
        # A completed or aborted upload answers NoSuchUpload: nothing to do.
        _call_unless_gone(action, self._client.abort_multipart_upload, Bucket=self.bucket,
                          Key=key, UploadId=upload_id)

    def _delete_tails(self, blob_id: str) -> None:
        """Every tail object of the blob: the recorded one and any that an
        append whose answer was lost left."""
        action = "could not delete an upload's tail"
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            answer = _call(action, self._client.list_objects_v2, Bucket=self.bucket,
                           Prefix=self._tails(blob_id), **token)
            keys += [item["Key"] for item in answer.get("Contents", [])]
            if not answer.get("IsTruncated"):
                break
            token = {"ContinuationToken": answer["NextContinuationToken"]}
        for key in keys:
            _call_unless_gone(action, self._client.delete_object, Bucket=self.bucket, Key=key)

    def _size(self, key: str) -> int | None:
        """The length of a stored object; None when there is none."""
        answer = _call_unless_gone("could not look at a blob", self._client.head_object,
                                   Bucket=self.bucket, Key=key)
        return None if answer is None else int(answer["ContentLength"])

    # -- uploads --------------------------------------------------------------

    def begin(self, blob_id: str, length: int) -> Deferred[dict[str, Any]]:
        key = self._key(blob_id)
        if length > MAX_PARTS * self.part_size:
            return fail(BlobStoreError(f"a blob of {length} bytes is more than"
                                       f" {MAX_PARTS} parts of {self.part_size}"))

        def begin() -> dict[str, Any]:
            answer = _call("could not begin an upload", self._client.create_multipart_upload,
                           Bucket=self.bucket, Key=key, ContentType="application/octet-stream")
            return {"uploadId": answer["UploadId"], "parts": []}
        return self._pool.run(begin)

    def append(self, blob_id: str, state: dict[str, Any], offset: int,
               flow: Flow) -> Deferred[_Writer]:
        key = self._key(blob_id)
        try:
            upload_id, parts, tail = _parse_state(state)
        except BlobStoreError:
            return fail()
        start = sum(p["size"] for p in parts)
        if start + tail != offset:
            return fail(BlobStoreError(f"the upload holds {start + tail} bytes, not its"
                                       f" recorded offset {offset}"))
        release = self._appends.release

        def opened(_: Any) -> Deferred[_Writer]:
            read = self._pool.run(self._read_tail, blob_id, start, tail) if tail else succeed(b"")
            return read.addCallback(
                lambda data: _Writer(self, blob_id, key, upload_id, parts, data, flow, release))

        def failed(failure: Any) -> Any:
            release()  # no writer took the place
            return failure
        return self._appends.acquire().addCallback(opened).addErrback(failed)

    def complete(self, blob_id: str, state: dict[str, Any], length: int) -> Deferred[None]:
        key = self._key(blob_id)
        try:
            upload_id, parts, tail = _parse_state(state)
        except BlobStoreError:
            return fail()
        start = sum(p["size"] for p in parts)
        if start + tail != length:
            return fail(BlobStoreError(f"the upload holds {start + tail} bytes, not {length}"))

        def complete() -> None:
            if length == 0:
                # A multipart upload has at least one part: an empty blob is
                # a plain empty object.
                self._abort("could not complete an upload", key, upload_id)
                self._put_object("could not complete an upload", key, b"")
            else:
                try:
                    whole = list(parts)
                    if tail:
                        data = self._read_tail(blob_id, start, tail)
                        n = len(parts) + 1
                        whole.append({"n": n, "etag": self._upload_part(key, upload_id, n, data)})
                    _call("could not complete an upload", self._client.complete_multipart_upload,
                          Bucket=self.bucket, Key=key, UploadId=upload_id,
                          MultipartUpload={"Parts": [{"PartNumber": p["n"], "ETag": p["etag"]}
                                                     for p in whole]})
                except BlobStoreError:
                    # Completed already, by a call whose answer was lost?
                    try:
                        done = self._size(key) == length
                    except BlobStoreError:
                        done = False
                    if not done:
                        raise
            self._delete_tails(blob_id)
        return self._pool.run(complete)

    # -- reading and deleting -----------------------------------------------

    def open(self, blob_id: str, start: int, end: int) -> Deferred[_Reader]:
        key = self._key(blob_id)
        if start < 0:
            raise ValueError(f"a range starts at 0 or later, not {start}")
        if end <= start:
            return succeed(_Reader(self._pool, None, 0))

        def open_range() -> _Reader:
            answer = _call("could not open a blob", self._client.get_object,
                           Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            body = answer["Body"]
            if answer.get("ContentLength") != end - start:
                body.close()
                raise BlobStoreError("a blob is shorter than the range asked for")
            return _Reader(self._pool, body, end - start)
        return self._pool.run(open_range)

    def delete(self, blob_id: str, state: dict[str, Any]) -> Deferred[None]:
        key = self._key(blob_id)
        upload_id = state.get("uploadId")

        def delete() -> None:
            if isinstance(upload_id, str):
                # Completed uploads answer NoSuchUpload: nothing to abort.
                self._abort("could not delete a blob", key, upload_id)
            self._delete_tails(blob_id)
            _call_unless_gone("could not delete a blob", self._client.delete_object,
                              Bucket=self.bucket, Key=key)
        return self._pool.run(delete)

    def stop(self) -> None:
        self._pool.stop()
        self._client.close()


class _Writer:
    def __init__(self, store: S3BlobStore, blob_id: str, key: str, upload_id: str,
                 parts: list[dict[str, Any]], tail: bytes, flow: Flow,
                 release: Callable[[], Any]) -> None:
        self._release = release  # the store's place for one append, given back by finish()
        self._store = store
        self._blob_id = blob_id
        self._key = key
        self._upload_id = upload_id
        self._parts = parts
        self._tail = len(tail)
        self._next_part = len(parts) + 1
        self._received = 0
        self._buffer = BufferedWriter(store.part_size, flow, self._put)
        self._finished = False
        # The tail becomes the start of the next part.
        self._buffer.write(tail)

    def _put(self, block: bytes) -> Deferred[None]:
        number, self._next_part = self._next_part, self._next_part + 1
        if number > MAX_PARTS:
            return fail(BlobStoreError(f"an upload has at most {MAX_PARTS} parts"))

        def done(etag: str) -> None:
            self._parts.append({"n": number, "etag": etag, "size": len(block)})
        return self._store._pool.run(self._store._upload_part, self._key, self._upload_id,
                                     number, block).addCallback(done)

    def write(self, data: bytes) -> None:
        self._received += len(data)
        self._buffer.write(data)

    def _state(self, tail: int) -> dict[str, Any]:
        return {"uploadId": self._upload_id, "parts": [dict(p) for p in self._parts],
                "tail": tail}

    async def _finish(self) -> Durable:
        await self._buffer.drain()
        start = sum(p["size"] for p in self._parts)
        rest = self._buffer.rest()
        if not self._received and not self._buffer.put_bytes:
            return Durable(start + len(rest), self._state(self._tail))
        if rest:
            await self._store._pool.run(
                self._store._put_object, "could not store an upload's tail",
                self._store._tail_key(self._blob_id, start), rest)
        return Durable(start + len(rest), self._state(len(rest)))

    def finish(self) -> Deferred[Durable]:
        assert not self._finished, "finish() is called once"
        self._finished = True
        return Deferred.fromCoroutine(self._finish()).addBoth(self._released)

    def _released(self, result: Any) -> Any:
        self._release()
        return result


class _Reader:
    def __init__(self, pool: CpuPool, body: Any, remaining: int) -> None:
        self._pool = pool
        self._body = body
        self._remaining = remaining
        self._reading: Deferred[bytes] | None = None
        self._closed = False

    def read(self, size: int) -> Deferred[bytes]:
        want = min(size, self._remaining)
        if want <= 0 or self._closed:
            return succeed(b"")
        assert self._reading is None, "one read at a time"

        def read() -> bytes:
            data = _call("could not read a blob", self._body.read, amt=want)
            if not data:
                raise BlobStoreError("a blob is shorter than its recorded length")
            return data

        def got(data: bytes) -> bytes:
            self._remaining -= len(data)
            return data

        def settled(result: Any) -> Any:
            self._reading = None
            if self._closed:
                self._body.close()
            return result
        self._reading = self._pool.run(read).addCallback(got).addBoth(settled)
        return self._reading

    def close(self) -> None:
        if self._closed or self._body is None:
            self._closed = True
            return
        self._closed = True
        # Closing a connection's socket does not block; a read on the pool
        # closes it when it ends instead, not under it.
        if self._reading is None:
            self._body.close()
