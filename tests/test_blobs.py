"""
The blob stores against one contract: the local store on a temporary
directory, and the S3 store against moto's standalone server on 127.0.0.1
(real HTTP and SigV4, one server for the class). Then BufferedWriter alone,
with puts that the test completes by hand.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import TestCase

from cyphr.blobs import BlobStoreError, BufferedWriter, Durable
from cyphr.blobs.local import LocalBlobStore
from cyphr.blobs.s3 import MAX_PARTS, MIN_PART_SIZE, S3BlobStore

BAD_IDS = [
    "../../etc/passwd",
    "0" * 31,
    "0" * 33,
    "A" * 32,  # upper case: another name on a case-sensitive disk or S3
    "g" * 32,
    "0" * 32 + "\n",
    "0" * 16 + "/" + "0" * 15,
    "",
]


class RecordingFlow:
    """A Flow that records what the writer asked of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")


def new_id() -> str:
    return os.urandom(16).hex()


async def upload(store: Any, blob_id: str, state: dict[str, Any], offset: int, data: bytes,
                 chunk: int, flow: RecordingFlow | None = None) -> Durable:
    """One append of ``data`` in writes of ``chunk`` bytes, as a request's body comes."""
    writer = await store.append(blob_id, state, offset, flow or RecordingFlow())
    for i in range(0, len(data), chunk):
        writer.write(data[i:i + chunk])
    return await writer.finish()


async def read_all(store: Any, blob_id: str, start: int, end: int, size: int) -> bytes:
    """Bytes ``start`` to ``end`` of a blob, in reads of at most ``size``."""
    reader = await store.open(blob_id, start, end)
    got = bytearray()
    try:
        while True:
            data = await reader.read(size)
            assert len(data) <= size, (len(data), size)
            if not data:
                return bytes(got)
            got += data
    finally:
        reader.close()


class BlobStoreContract:
    """What every blob store does. A subclass says which store (``make_store``),
    its block (S3: its part size), what it holds (``stored``), and how it
    fails (``failing_store``, ``mend``)."""

    block: int

    def make_store(self) -> Any:
        raise NotImplementedError

    async def stored(self) -> list[str]:
        """Everything the store holds: files, objects, pending uploads."""
        raise NotImplementedError

    def failing_store(self) -> Any:
        """A store on the same storage whose writes fail from now on."""
        raise NotImplementedError

    def mend(self) -> None:
        """The storage works again."""

    def setUp(self) -> None:
        self.store = self.make_store()
        self.addCleanup(self.store.stop)

    @property
    def chunk(self) -> int:
        # Writes that never line up with a block.
        return self.block // 3 + 7

    async def whole_blob(self, data: bytes) -> str:
        """A completed blob of ``data``, uploaded in one append."""
        blob_id = new_id()
        state = await self.store.begin(blob_id, len(data))
        durable = await upload(self.store, blob_id, state, 0, data, self.chunk)
        self.assertEqual(durable.offset, len(data))
        await self.store.complete(blob_id, durable.state, len(data))
        return blob_id

    def assertBytes(self, got: bytes, want: bytes, msg: Any = None) -> None:
        """got == want, with a failure that says where they part (not megabytes of repr)."""
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                      min(len(got), len(want)))
            self.fail(f"{len(got)} bytes, not {len(want)}, differing from byte {at}"
                      + (f" ({msg})" if msg is not None else ""))

    async def refused(self, call: Callable[..., Any], *args: Any) -> None:
        """The call refuses with ValueError (at once, or as its Deferred's failure)."""
        try:
            d = call(*args)
        except ValueError:
            return
        await self.assertFailure(d, ValueError)

    # -- the tests ----------------------------------------------------------

    async def test_round_trip(self) -> None:
        """A blob of several blocks, uploaded in one append, completed, reads back whole,
        and nothing but the blob stays stored."""
        data = os.urandom(2 * self.block + self.block // 5)
        blob_id = await self.whole_blob(data)
        self.assertBytes(await read_all(self.store, blob_id, 0, len(data), self.block // 2),
                         data)
        self.assertEqual(len(await self.stored()), 1)

    async def test_resume(self) -> None:
        """Appends that each end inside a block resume at the durable offset, and the
        blob is their bytes in order."""
        sizes = [self.block * 3 // 5, self.block * 4 // 5, self.block * 4 // 5]
        pieces = [os.urandom(n) for n in sizes]
        data = b"".join(pieces)
        blob_id = new_id()
        durable = Durable(0, await self.store.begin(blob_id, len(data)))
        for piece in pieces:
            before = durable.offset
            durable = await upload(self.store, blob_id, durable.state, durable.offset, piece,
                                   self.chunk)
            self.assertEqual(durable.offset, before + len(piece))
        await self.store.complete(blob_id, durable.state, len(data))
        self.assertBytes(await read_all(self.store, blob_id, 0, len(data), 1 << 20), data)

    async def test_empty_append(self) -> None:
        """An append that got no bytes (its connection dropped at once) keeps the
        offset and a state that the next append takes."""
        first, second = os.urandom(self.block // 2), os.urandom(self.block)
        blob_id = new_id()
        state = await self.store.begin(blob_id, len(first) + len(second))
        durable = await upload(self.store, blob_id, state, 0, first, self.chunk)
        empty = await upload(self.store, blob_id, durable.state, durable.offset, b"",
                             self.chunk)
        self.assertEqual(empty.offset, len(first))
        durable = await upload(self.store, blob_id, empty.state, empty.offset, second,
                               self.chunk)
        await self.store.complete(blob_id, durable.state, len(first) + len(second))
        self.assertBytes(await read_all(self.store, blob_id, 0, durable.offset, 1 << 20),
                         first + second)

    async def test_lost_append_answer(self) -> None:
        """Appends that were stored but whose answers never reached the attachments
        table (one within a block, one past its end) do not spoil the upload: the
        next append, at the offset the table kept, makes the blob."""
        first = os.urandom(self.block * 3 // 5)
        rest = os.urandom(self.block)
        blob_id = new_id()
        state = await self.store.begin(blob_id, len(first) + len(rest))
        kept = await upload(self.store, blob_id, state, 0, first, self.chunk)
        for lost in (os.urandom(self.block // 10), os.urandom(self.block)):
            await upload(self.store, blob_id, kept.state, kept.offset, lost, self.chunk)
        durable = await upload(self.store, blob_id, kept.state, kept.offset, rest, self.chunk)
        await self.store.complete(blob_id, durable.state, durable.offset)
        self.assertBytes(await read_all(self.store, blob_id, 0, durable.offset, 1 << 20),
                         first + rest)
        self.assertEqual(len(await self.stored()), 1)

    async def test_ranges(self) -> None:
        """A range at the start, across a block's end, at the end, or empty reads
        exactly its bytes."""
        data = os.urandom(self.block + self.block // 2)
        blob_id = await self.whole_blob(data)
        n = len(data)
        for start, end in [(0, 10), (self.block - 5, self.block + 5), (n - 10, n), (0, n),
                           (7, 7), (n, n)]:
            self.assertBytes(await read_all(self.store, blob_id, start, end, 4096),
                             data[start:end], (start, end))

    async def test_close_early(self) -> None:
        """A reader closed before the end of its range lets it go, and the blob
        reads whole again after."""
        data = os.urandom(self.block + 1000)
        blob_id = await self.whole_blob(data)
        reader = await self.store.open(blob_id, 0, len(data))
        got = await reader.read(100)
        self.assertTrue(got)
        self.assertBytes(got, data[:len(got)])
        reader.close()
        self.assertBytes(await read_all(self.store, blob_id, 0, len(data), 1 << 20), data)

    async def test_zero_length(self) -> None:
        """A blob of no bytes is uploaded, completed, read and deleted."""
        blob_id = new_id()
        state = await self.store.begin(blob_id, 0)
        durable = await upload(self.store, blob_id, state, 0, b"", self.chunk)
        self.assertEqual(durable.offset, 0)
        await self.store.complete(blob_id, durable.state, 0)
        self.assertEqual(len(await self.stored()), 1)
        self.assertBytes(await read_all(self.store, blob_id, 0, 0, 10), b"")
        await self.store.delete(blob_id, durable.state)
        self.assertEqual(await self.stored(), [])

    async def test_delete_completed(self) -> None:
        """A completed blob is deleted, twice without error, and opening it then fails."""
        data = os.urandom(self.block + 100)
        blob_id = new_id()
        state = await self.store.begin(blob_id, len(data))
        durable = await upload(self.store, blob_id, state, 0, data, self.chunk)
        await self.store.complete(blob_id, durable.state, len(data))
        await self.store.delete(blob_id, durable.state)  # the upload's, long over
        await self.store.delete(blob_id, {})
        self.assertEqual(await self.stored(), [])
        await self.assertFailure(self.store.open(blob_id, 0, len(data)), BlobStoreError)

    async def test_delete_uncompleted(self) -> None:
        """An upload never completed is deleted with all it held, twice without error."""
        blob_id = new_id()
        state = await self.store.begin(blob_id, 3 * self.block)
        durable = await upload(self.store, blob_id, state, 0,
                               os.urandom(self.block + self.block // 2), self.chunk)
        self.assertNotEqual(await self.stored(), [])
        await self.store.delete(blob_id, durable.state)
        await self.store.delete(blob_id, durable.state)
        self.assertEqual(await self.stored(), [])
        await self.assertFailure(self.store.open(blob_id, 0, 10), BlobStoreError)

    async def test_open_unknown(self) -> None:
        """Opening a blob never stored fails with BlobStoreError."""
        await self.assertFailure(self.store.open(new_id(), 0, 10), BlobStoreError)

    async def test_wrong_offset(self) -> None:
        """An append past the durable offset fails with BlobStoreError, and one at it
        still works."""
        first, second = os.urandom(self.block // 2), os.urandom(self.block // 2)
        blob_id = new_id()
        state = await self.store.begin(blob_id, len(first) + len(second))
        durable = await upload(self.store, blob_id, state, 0, first, self.chunk)
        await self.assertFailure(
            self.store.append(blob_id, durable.state, durable.offset + 1, RecordingFlow()),
            BlobStoreError)
        durable = await upload(self.store, blob_id, durable.state, durable.offset, second,
                               self.chunk)
        await self.store.complete(blob_id, durable.state, durable.offset)
        self.assertBytes(await read_all(self.store, blob_id, 0, durable.offset, 1 << 20),
                         first + second)

    async def test_flow_paused_and_resumed(self) -> None:
        """Writes faster than the store pause the flow once a second block has
        gathered behind the one being put, and resume it once the blocks are put."""
        data = os.urandom(2 * self.block + 10)
        blob_id = new_id()
        state = await self.store.begin(blob_id, len(data))
        flow = RecordingFlow()
        writer = await self.store.append(blob_id, state, 0, flow)
        writer.write(data[:self.block])
        self.assertEqual(flow.calls, [])  # one block, being put
        writer.write(data[self.block:])
        self.assertEqual(flow.calls, ["pause"])
        durable = await writer.finish()
        self.assertEqual(flow.calls, ["pause", "resume"])
        self.assertEqual(durable.offset, len(data))

    async def test_failure_mid_upload(self) -> None:
        """A store that fails during an append fails its finish() with BlobStoreError,
        and the upload resumes from the offset made durable before."""
        first, second = os.urandom(self.block), os.urandom(self.block + self.block // 2)
        blob_id = new_id()
        state = await self.store.begin(blob_id, len(first) + len(second))
        durable = await upload(self.store, blob_id, state, 0, first, self.chunk)
        broken = self.failing_store()
        writer = await broken.append(blob_id, durable.state, durable.offset, RecordingFlow())
        for i in range(0, len(second), self.chunk):
            writer.write(second[i:i + self.chunk])
        error = await self.assertFailure(writer.finish(), BlobStoreError)
        self.assertTrue(str(error))
        self.mend()
        durable = await upload(self.store, blob_id, durable.state, durable.offset, second,
                               self.chunk)
        await self.store.complete(blob_id, durable.state, durable.offset)
        self.assertBytes(await read_all(self.store, blob_id, 0, durable.offset, 1 << 20),
                         first + second)

    async def test_bad_ids(self) -> None:
        """An id that is not 32 lowercase hex digits is refused with ValueError by
        every call, and nothing is stored."""
        for bad in BAD_IDS:
            await self.refused(self.store.begin, bad, 10)
            await self.refused(self.store.append, bad, {"uploadId": "u", "parts": []}, 0,
                               RecordingFlow())
            await self.refused(self.store.complete, bad, {"uploadId": "u", "parts": []}, 0)
            await self.refused(self.store.open, bad, 0, 10)
            await self.refused(self.store.delete, bad, {"uploadId": "u", "parts": []})
        self.assertEqual(await self.stored(), [])


class LocalBlobStoreTests(BlobStoreContract, TestCase):
    block = 64 * 1024

    def make_store(self) -> LocalBlobStore:
        self.root = Path(self.mktemp())
        return LocalBlobStore(self.root, reactor, block=self.block)

    async def stored(self) -> list[str]:
        # Files only: the store's own directories are not a blob's.
        if not self.root.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def failing_store(self) -> LocalBlobStore:
        # The disk fills after one more block: the next append writes a
        # block past the durable offset, which the one after must cut off.
        real, writes = os.pwrite, []

        def pwrite(fd: int, data: Any, position: int) -> int:
            writes.append(position)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data, position)
        self._full = self.patch(os, "pwrite", pwrite)
        return self.store

    def mend(self) -> None:
        self._full.restore()


# -- S3, on moto ---------------------------------------------------------------

BUCKET = "cyphr-test"
REGION = "us-east-1"
# Not secrets (moto takes any); distinct, so a test can look for them in messages.
ACCESS_KEY = "AKIDTESTACCESSKEY0001"
SECRET_KEY = "test-secret-key-do-not-print-0001"


_moto: dict[str, Any] = {}


def moto() -> tuple[str, Any, Any]:
    """The endpoint of moto's standalone server, started once per test process
    (trial runs no setUpClass) and stopped when the process ends; a client
    for the tests' own look at its bucket; and the botocore session that
    the stores share (each would load the S3 model anew: 0.1 s a store)."""
    if not _moto:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        atexit.register(server.stop)
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # Blocking calls on the reactor thread: test code only, and few.
        session = botocore.session.Session()
        admin = session.create_client(
            "s3", region_name=REGION, endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
        admin.create_bucket(Bucket=BUCKET)
        _moto.update(endpoint=endpoint, admin=admin, session=session)
    return _moto["endpoint"], _moto["admin"], _moto["session"]


class S3BlobStoreTests(BlobStoreContract, TestCase):
    block = MIN_PART_SIZE

    def setUp(self) -> None:
        # Each test in a prefix of its own: what it stored is all under it.
        self.prefix = f"{uuid.uuid4().hex}/attachments/"
        self.endpoint, self.admin, self.session = moto()
        super().setUp()

    def make_store(self, endpoint: str | None = None, **options: Any) -> S3BlobStore:
        options = {"part_size": self.block, "threads": 4, "session": self.session, **options}
        return S3BlobStore(reactor, endpoint=endpoint or self.endpoint, bucket=BUCKET,
                           region=REGION, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                           prefix=self.prefix, **options)

    async def test_appends_at_once_are_capped(self) -> None:
        """Past max_appends, an append waits for a running one to finish
        (each holds parts in memory), then goes on as usual."""
        store = self.make_store(max_appends=1)
        self.addCleanup(store.stop)
        first_id, second_id = new_id(), new_id()
        first_state = await store.begin(first_id, 10)
        second_state = await store.begin(second_id, 10)
        first = await store.append(first_id, first_state, 0, RecordingFlow())
        waiting = store.append(second_id, second_state, 0, RecordingFlow())
        self.assertNoResult(waiting)
        first.write(b"a" * 10)
        await first.finish()
        second = await waiting
        second.write(b"b" * 10)
        self.assertEqual((await second.finish()).offset, 10)

    async def stored(self) -> list[str]:
        objects = self.admin.list_objects_v2(Bucket=BUCKET, Prefix=self.prefix)
        uploads = self.admin.list_multipart_uploads(Bucket=BUCKET, Prefix=self.prefix)
        return sorted([o["Key"] for o in objects.get("Contents", [])]
                      + [f"upload {u['Key']}" for u in uploads.get("Uploads", [])])

    def unreachable_store(self) -> S3BlobStore:
        """A store whose endpoint is a port where nothing listens (bound, so
        that nothing else takes it while the test runs)."""
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        self.addCleanup(hole.close)
        store = self.make_store(f"http://127.0.0.1:{hole.getsockname()[1]}", max_attempts=1,
                                connect_timeout=1, read_timeout=1)
        self.addCleanup(store.stop)
        return store

    def failing_store(self) -> S3BlobStore:
        # Another node, whose object store is out of reach.
        return self.unreachable_store()

    def count_requests(self, store: S3BlobStore) -> list[str]:
        sent: list[str] = []
        store._client.meta.events.register(
            "before-send.s3", lambda request, **_: sent.append(request.method))
        return sent

    # -- S3 only --------------------------------------------------------------

    async def test_state(self) -> None:
        """The state holds the upload's id, each whole part (number, ETag, size) and
        the tail's length; the tail waits as an object until the upload completes."""
        data = os.urandom(self.block + 1000)
        blob_id = new_id()
        state = await self.store.begin(blob_id, len(data))
        self.assertEqual(state, {"uploadId": state["uploadId"], "parts": []})
        durable = await upload(self.store, blob_id, state, 0, data, self.chunk)
        self.assertEqual(durable.state["uploadId"], state["uploadId"])
        [part] = durable.state["parts"]
        self.assertEqual((part["n"], part["size"]), (1, self.block))
        self.assertTrue(part["etag"])
        self.assertEqual(durable.state["tail"], 1000)
        self.assertEqual(await self.stored(), [f"{self.prefix}tails/{blob_id}.{self.block}",
                                               f"upload {self.prefix}{blob_id}"])
        await self.store.complete(blob_id, durable.state, len(data))
        self.assertEqual(await self.stored(), [f"{self.prefix}{blob_id}"])

    async def test_complete_again(self) -> None:
        """Completing again (the first answer was lost) succeeds and keeps the blob."""
        data = os.urandom(self.block + 1000)
        blob_id = new_id()
        state = await self.store.begin(blob_id, len(data))
        durable = await upload(self.store, blob_id, state, 0, data, self.chunk)
        await self.store.complete(blob_id, durable.state, len(data))
        await self.store.complete(blob_id, durable.state, len(data))
        self.assertBytes(await read_all(self.store, blob_id, 0, len(data), 1 << 20), data)

    async def test_complete_wrong_length(self) -> None:
        """Completing at a length the parts do not add up to fails with BlobStoreError."""
        blob_id = new_id()
        state = await self.store.begin(blob_id, 100)
        durable = await upload(self.store, blob_id, state, 0, os.urandom(50), self.chunk)
        await self.assertFailure(self.store.complete(blob_id, durable.state, 100),
                                 BlobStoreError)

    async def test_no_request_without_need(self) -> None:
        """A bad id, an empty range and an append with no tail send no request."""
        sent = self.count_requests(self.store)
        for bad in BAD_IDS:
            await self.refused(self.store.begin, bad, 10)
            await self.refused(self.store.open, bad, 0, 10)
        reader = await self.store.open(new_id(), 5, 5)
        self.assertEqual(await reader.read(10), b"")
        reader.close()
        writer = await self.store.append(new_id(), {"uploadId": "u", "parts": []}, 0,
                                         RecordingFlow())
        self.assertEqual(sent, [])
        self.assertEqual((await writer.finish()).offset, 0)
        self.assertEqual(sent, [])

    async def test_close_while_reading(self) -> None:
        """A reader closed while a read is on the pool answers that read, then
        nothing more."""
        data = os.urandom(3 << 20)
        blob_id = await self.whole_blob(data)
        reader = await self.store.open(blob_id, 0, len(data))
        reading = reader.read(1 << 20)
        reader.close()
        got = await reading
        self.assertBytes(got, data[:len(got)])
        self.assertEqual(await reader.read(10), b"")

    async def test_unreachable(self) -> None:
        """An object store out of reach fails each call with a short BlobStoreError
        that names no key, credential or URL."""
        store = self.unreachable_store()
        blob_id = new_id()
        state = {"uploadId": "u", "parts": [{"n": 1, "etag": "e", "size": self.block}],
                 "tail": 10}
        errors = [await self.assertFailure(d, BlobStoreError) for d in [
            store.begin(blob_id, 10),
            store.append(blob_id, state, self.block + 10, RecordingFlow()),
            store.complete(blob_id, state, self.block + 10),
            store.open(blob_id, 0, 10),
            store.delete(blob_id, state),
        ]]
        for error in errors:
            message = str(error)
            self.assertIn("could not be reached", message)
            for secret in (ACCESS_KEY, SECRET_KEY, "http", "127.0.0.1", blob_id, BUCKET):
                self.assertNotIn(secret, message)

    async def test_part_size_floor(self) -> None:
        """Parts under S3's 5 MiB are refused at construction; blobs of more than
        10,000 parts at begin, before any request."""
        with self.assertRaises(ValueError):
            self.make_store(part_size=MIN_PART_SIZE - 1)
        sent = self.count_requests(self.store)
        await self.assertFailure(self.store.begin(new_id(), MAX_PARTS * self.block + 1),
                                 BlobStoreError)
        self.assertEqual(sent, [])

    async def test_foreign_state(self) -> None:
        """A state that is not an S3 upload's (another store's) fails with BlobStoreError."""
        await self.assertFailure(self.store.append(new_id(), {}, 0, RecordingFlow()),
                                 BlobStoreError)
        await self.assertFailure(self.store.complete(new_id(), {"parts": "x"}, 0),
                                 BlobStoreError)


# -- BufferedWriter ------------------------------------------------------------

class BufferedWriterTests(TestCase):
    """Blocks of 4 bytes; each put waits until the test fires it."""

    def setUp(self) -> None:
        self.flow = RecordingFlow()
        self.puts: list[tuple[bytes, Deferred[None]]] = []
        self.writer = BufferedWriter(4, self.flow, self.put)

    def put(self, block: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.puts.append((block, d))
        return d

    def blocks(self) -> list[bytes]:
        return [block for block, _ in self.puts]

    def test_blocks_in_order(self) -> None:
        """Bytes gathered across writes go out in whole blocks, in order, one put at a
        time; what fills no block is left for rest()."""
        for piece in (b"ab", b"cdefg", b"h", b"ijk"):
            self.writer.write(piece)
        self.assertEqual(self.blocks(), [b"abcd"])
        self.puts[0][1].callback(None)
        self.assertEqual(self.blocks(), [b"abcd", b"efgh"])
        self.puts[1][1].callback(None)
        self.assertEqual(self.blocks(), [b"abcd", b"efgh"])
        drained = self.writer.drain()
        self.assertIsNone(self.successResultOf(drained))
        self.assertEqual(self.writer.rest(), b"ijk")
        self.assertEqual(self.writer.put_bytes, 8)

    def test_drain_waits_for_puts(self) -> None:
        """drain() fires once every whole block gathered is put, not before."""
        self.writer.write(b"abcdefghi")
        drained = self.writer.drain()
        self.assertNoResult(drained)
        self.puts[0][1].callback(None)
        self.assertNoResult(drained)
        self.puts[1][1].callback(None)
        self.successResultOf(drained)
        self.assertEqual(self.writer.rest(), b"i")

    def test_drain_of_nothing(self) -> None:
        """With nothing written, drain() fires at once and rest() is empty."""
        self.successResultOf(self.writer.drain())
        self.assertEqual(self.writer.rest(), b"")
        self.assertEqual(self.puts, [])

    def test_pause_and_resume(self) -> None:
        """The flow pauses (once) when a second block has gathered behind the one being
        put, stays paused while whole blocks wait, and resumes (once) when they are put."""
        self.writer.write(b"abcd")
        self.writer.write(b"efg")
        self.assertEqual(self.flow.calls, [])
        self.writer.write(b"h")
        self.assertEqual(self.flow.calls, ["pause"])
        self.writer.write(b"ijklm")  # a paused transport still hands over what it had
        self.assertEqual(self.flow.calls, ["pause"])
        self.puts[0][1].callback(None)  # "efgh" goes, "ijkl" waits behind it
        self.assertEqual(self.flow.calls, ["pause"])
        self.puts[1][1].callback(None)
        self.puts[2][1].callback(None)
        self.assertEqual(self.blocks(), [b"abcd", b"efgh", b"ijkl"])
        self.successResultOf(self.writer.drain())
        self.assertEqual(self.flow.calls, ["pause", "resume"])
        self.assertEqual(self.writer.rest(), b"m")

    def test_resume_with_one_block_in_flight(self) -> None:
        """Once the first block is put and the second is being put with nothing
        gathered behind it, the flow resumes: the next block gathers while the
        second is put."""
        self.writer.write(b"abcdefgh")
        self.assertEqual(self.flow.calls, ["pause"])
        self.puts[0][1].callback(None)
        self.assertEqual(self.blocks(), [b"abcd", b"efgh"])
        self.assertEqual(self.flow.calls, ["pause", "resume"])

    def test_many_puts_that_finish_at_once(self) -> None:
        """Puts that finish at once (an inline pool) take a large write block
        by block without recursing, and the writer goes on."""
        from twisted.internet.defer import succeed
        taken: list[bytes] = []

        def put(block: bytes) -> Any:
            taken.append(block)
            return succeed(None)
        writer = BufferedWriter(4, self.flow, put)
        writer.write(b"x" * 40_001)
        self.assertEqual(len(taken), 10_000)
        self.successResultOf(writer.drain())
        self.assertEqual(writer.rest(), b"x")

    def test_failure(self) -> None:
        """A put that fails resumes a paused flow, drops every later write, and fails
        drain() with its error."""
        self.writer.write(b"abcdefgh")
        self.assertEqual(self.flow.calls, ["pause"])
        self.puts[0][1].errback(BlobStoreError("the disk is full"))
        self.assertEqual(self.flow.calls, ["pause", "resume"])
        self.writer.write(b"ijklmnop")
        self.assertEqual(self.blocks(), [b"abcd"])
        error = self.failureResultOf(self.writer.drain(), BlobStoreError)
        self.assertEqual(str(error.value), "the disk is full")
        self.assertEqual(self.writer.rest(), b"")
        self.assertEqual(self.writer.put_bytes, 0)

    def test_failure_while_draining(self) -> None:
        """A put that fails while drain() waits fails it."""
        self.writer.write(b"abcdef")
        drained = self.writer.drain()
        self.puts[0][1].errback(BlobStoreError("gone"))
        self.failureResultOf(drained, BlobStoreError)

    def test_puts_that_finish_at_once(self) -> None:
        """Puts whose Deferreds have fired already (an inline pool) take every block
        in the write itself, and never pause the flow."""
        blocks: list[bytes] = []

        def put(block: bytes) -> Deferred[None]:
            blocks.append(block)
            return succeed(None)
        writer = BufferedWriter(4, self.flow, put)
        writer.write(b"x" * 400 + b"yz")
        self.assertEqual(len(blocks), 100)
        self.successResultOf(writer.drain())
        self.assertEqual(writer.rest(), b"yz")
        self.assertEqual(self.flow.calls, [])

    def test_put_that_fails_at_once(self) -> None:
        """A put whose Deferred has failed already fails drain() all the same."""
        writer = BufferedWriter(4, self.flow, lambda block: fail(BlobStoreError("no")))
        writer.write(b"abcdefgh")
        self.failureResultOf(writer.drain(), BlobStoreError)
