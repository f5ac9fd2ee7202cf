"""
Attachments over real ports: TUS uploads (the stock ``tuspy`` client, and
raw requests where a client would not misbehave on its own), downloads with
ranges, limits, expiry and removal, on both engines and the local blob
store (the S3 store's own contract: tests.test_blobs).
"""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.blobs import BlobStoreError
from tests.helpers import PostgresMixin, RealHTTP, SQLiteMixin, start_server
from tests.realtime import SioClient
from tests.test_blobs import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, moto
from tests.test_metrics import scrape, value
from tests.users import User

TUS = {b"Tus-Resumable": [b"1.0.0"]}


def tus(user: User, **headers: str) -> dict[bytes, list[bytes]]:
    return {**user.auth(), **TUS, **{k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()}}


def patch_headers(user: User, offset: int) -> dict[bytes, list[bytes]]:
    return {**tus(user, Upload_Offset=str(offset)),
            b"Content-Type": [b"application/offset+octet-stream"]}


def patch_head(user: User, attachment_id: str, length: int) -> bytes:
    """The head of a PATCH at offset 0 of ``length`` bytes, for raw_request."""
    return (b"PATCH /api/attachments/" + attachment_id.encode() + b" HTTP/1.1\r\n"
            b"Host: x\r\nAuthorization: Bearer " + user.token.encode() + b"\r\n"
            b"Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
            b"Content-Type: application/offset+octet-stream\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n")


def raw_request(port: int, head: bytes, body: bytes = b"", *, close_after: bool = True,
                timeout: float = 10) -> bytes:
    """Send ``head`` and ``body`` on a plain socket and read the answer
    (until the server closes, or ``timeout``). For what a well-behaved
    client library never does: a body cut short, a connection dropped."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        if close_after:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return received


class AttachmentsHelpers:
    """A served server, users, and the TUS calls."""

    timeout = 120

    async def serve(self, **overrides: Any) -> None:
        self.server = await start_server(self, serve=True, **overrides)
        self.port = (await self.server.listening()[0]).getHost().port
        self.http = RealHTTP.for_port(self, self.port)
        self.base = f"http://127.0.0.1:{self.port}"

    async def user(self, name: str) -> User:
        user = User(f"{name}_{os.urandom(3).hex()}")
        await user.register(self.http)
        return user

    async def create(self, user: User, length: int) -> str:
        response = await self.http.post("/api/attachments/", headers=tus(user, Upload_Length=str(length)))
        self.assertEqual(response.code, 201, response.body)
        location = response.header("Location")
        self.assertEqual(location, "/api/attachments/" + response.json()["id"])
        self.assertTrue(response.header("Upload-Expires"))
        return response.json()["id"]

    async def patch(self, user: User, attachment_id: str, offset: int, data: bytes,
                    headers: dict[bytes, list[bytes]] | None = None) -> Any:
        return await self.http.request(
            "PATCH", f"/api/attachments/{attachment_id}", data=data,
            headers={**patch_headers(user, offset), **(headers or {})})

    async def upload(self, user: User, data: bytes) -> str:
        attachment_id = await self.create(user, len(data))
        response = await self.patch(user, attachment_id, 0, data)
        self.assertEqual(response.code, 204, response.body)
        self.assertEqual(response.header("Upload-Offset"), str(len(data)))
        return attachment_id

    async def offset(self, user: User, attachment_id: str) -> int:
        response = await self.http.request("HEAD", f"/api/attachments/{attachment_id}",
                                           headers=tus(user))
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual(response.header("Cache-Control"), "no-store")
        return int(response.header("Upload-Offset"))

    def blob_files(self) -> list[Path]:
        root = Path(self.server.data_dir) / "attachments"
        return sorted(p for p in root.rglob("*") if p.is_file())

    def tuspy(self, user: User, data: bytes, *, chunk_size: int, url: str | None = None) -> str:
        """Upload with the stock tuspy client (on a thread: it blocks)."""
        from tusclient import client

        tus_client = client.TusClient(self.base + "/api/attachments/",
                                      headers={"Authorization": f"Bearer {user.token}"})
        uploader = tus_client.uploader(file_stream=io.BytesIO(data), chunk_size=chunk_size,
                                       url=url, retries=0)
        uploader.upload()
        return uploader.url


    async def _settled_offset(self, user: User, attachment_id: str, expected: int) -> int:
        """The offset once the server has noticed the dropped connection."""
        for _ in range(200):
            offset = await self.offset(user, attachment_id)
            if offset == expected:
                return offset
            await deferLater(reactor, 0.02, lambda: None)
        return offset


class AttachmentsMixin(AttachmentsHelpers):
    """Attachments on the local blob store (the default)."""

    # -- uploads and downloads --------------------------------------------------

    async def test_upload_with_tuspy_then_download(self) -> None:
        """The stock tuspy client uploads in several PATCHes; any signed-in
        user downloads the same bytes, as application/octet-stream with
        its length and an ETag; the blob is a file of the local store."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        data = os.urandom(300_000)
        url = await deferToThread(self.tuspy, alice, data, chunk_size=100_000)
        attachment_id = url.rsplit("/", 1)[1]
        response = await self.http.get(f"/api/attachments/{attachment_id}", headers=bob.auth())
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, data)
        self.assertEqual(response.header("Content-Type"), "application/octet-stream")
        self.assertEqual(response.header("ETag"), f'"{attachment_id}"')
        self.assertEqual([p.name for p in self.blob_files()], [attachment_id])
        samples = await scrape(self.http)
        self.assertEqual(value(samples, "cyphr_attachment_upload_bytes_total", store="local"), len(data))
        self.assertEqual(value(samples, "cyphr_attachment_download_bytes_total", store="local"),
                         len(data))
        self.assertEqual(value(samples, "cyphr_attachment_uploads_completed_total", store="local"), 1)
        self.assertEqual(value(samples, "cyphr_attachment_appends_in_progress", store="local"), 0)
        # Without a token: 401, as every API route.
        response = await self.http.get(f"/api/attachments/{attachment_id}")
        self.assertEqual(response.code, 401)

    async def test_resume_after_a_dropped_connection(self) -> None:
        """A PATCH whose connection drops midway keeps what arrived: HEAD
        says so, and tuspy resumes from there to the end."""
        await self.serve()
        alice = await self.user("alice")
        data = os.urandom(400_000)
        attachment_id = await self.create(alice, len(data))
        head = patch_head(alice, attachment_id, len(data))
        await deferToThread(raw_request, self.port, head, data[:150_000], timeout=2)
        offset = await self._settled_offset(alice, attachment_id, 150_000)
        self.assertEqual(offset, 150_000)
        url = f"{self.base}/api/attachments/{attachment_id}"
        await deferToThread(self.tuspy, alice, data, chunk_size=1_000_000, url=url)
        response = await self.http.get(f"/api/attachments/{attachment_id}", headers=alice.auth())
        self.assertEqual(response.body, data)

    async def test_ranges(self) -> None:
        """Range: one span is 206 with Content-Range; a suffix; an open end;
        past the end is 416 with bytes */length; several ranges or a
        malformed one are ignored (200, the whole); If-Range with another
        tag is the whole; If-None-Match with its tag is 304."""
        await self.serve()
        alice = await self.user("alice")
        data = os.urandom(10_000)
        attachment_id = await self.upload(alice, data)
        url = f"/api/attachments/{attachment_id}"

        async def get(**headers: str) -> Any:
            return await self.http.get(url, headers={**alice.auth(), **{
                k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()}})

        response = await get(Range="bytes=100-199")
        self.assertEqual((response.code, response.body), (206, data[100:200]))
        self.assertEqual(response.header("Content-Range"), "bytes 100-199/10000")
        response = await get(Range="bytes=-300")
        self.assertEqual((response.code, response.body), (206, data[-300:]))
        response = await get(Range="bytes=9990-")
        self.assertEqual((response.code, response.body), (206, data[9990:]))
        response = await get(Range="bytes=9000-20000")
        self.assertEqual((response.code, response.body), (206, data[9000:]))
        response = await get(Range="bytes=10000-10005")
        self.assertEqual(response.code, 416)
        self.assertEqual(response.header("Content-Range"), "bytes */10000")
        self.assertEqual(response.json()["code"], "RANGE_NOT_SATISFIABLE")
        for ignored in ("bytes=0-1,5-6", "lines=1-2", "bytes=5-1", "bytes=x-"):
            response = await get(Range=ignored)
            self.assertEqual((response.code, response.body), (200, data), ignored)
        response = await get(Range="bytes=0-9", If_Range='"another"')
        self.assertEqual((response.code, response.body), (200, data))
        response = await get(Range="bytes=0-9", If_Range=f'"{attachment_id}"')
        self.assertEqual((response.code, response.body), (206, data[:10]))
        response = await get(If_None_Match=f'"{attachment_id}"')
        self.assertEqual((response.code, response.body), (304, b""))

    async def test_zero_length_and_discovery(self) -> None:
        """OPTIONS tells the version, the extensions and the largest size;
        an empty attachment is finished at creation's first PATCH and
        downloads as nothing; the config route tells the limits."""
        await self.serve()
        alice = await self.user("alice")
        response = await self.http.request("OPTIONS", "/api/attachments/")
        self.assertEqual(response.code, 204)
        self.assertEqual(response.header("Tus-Version"), "1.0.0")
        self.assertEqual(response.header("Tus-Extension"), "creation,expiration,termination")
        self.assertEqual(response.header("Tus-Max-Size"), str(100 * 1024 * 1024))
        attachment_id = await self.upload(alice, b"")
        response = await self.http.get(f"/api/attachments/{attachment_id}", headers=alice.auth())
        self.assertEqual((response.code, response.body), (200, b""))
        response = await self.http.get("/api/attachments/config", headers=alice.auth())
        self.assertEqual(response.json()["maxSize"], 100 * 1024 * 1024)
        self.assertEqual(response.json()["maxPendingUploads"], 5)

    # -- bad input -------------------------------------------------------------

    async def test_bad_uploads(self) -> None:
        """Each is a clear error that changes nothing: a PATCH at the wrong
        offset (409 with the offset), without Tus-Resumable (412), of the
        wrong type (415), past the declared length (413), to another user's
        upload or an unknown id (404); a length over the cap (413) or
        missing (400); a download of an unfinished upload, by anyone (404)."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        attachment_id = await self.create(alice, 1000)
        response = await self.patch(alice, attachment_id, 0, b"x" * 100)
        self.assertEqual(response.code, 204)

        response = await self.patch(alice, attachment_id, 0, b"y" * 100)
        self.assertEqual((response.code, response.json()["code"]), (409, "UPLOAD_CONFLICT"))
        self.assertEqual(response.json()["details"]["offset"], 100)
        response = await self.patch(alice, attachment_id, 100, b"y", {b"Tus-Resumable": [b"0.2.2"]})
        self.assertEqual((response.code, response.json()["code"]), (412, "UNSUPPORTED_TUS_VERSION"))
        self.assertEqual(response.header("Tus-Version"), "1.0.0")
        response = await self.patch(alice, attachment_id, 100, b"y",
                                    {b"Content-Type": [b"application/octet-stream"]})
        self.assertEqual(response.code, 415)
        response = await self.patch(alice, attachment_id, 100, b"z" * 901)
        self.assertEqual((response.code, response.json()["code"]), (413, "PAYLOAD_TOO_LARGE"))
        response = await self.patch(bob, attachment_id, 100, b"z")
        self.assertEqual((response.code, response.json()["code"]), (404, "ATTACHMENT_NOT_FOUND"))
        response = await self.patch(alice, "0" * 32, 0, b"z")
        self.assertEqual(response.code, 404)
        response = await self.patch(alice, "not-an-id", 0, b"z")
        self.assertEqual(response.code, 404)
        self.assertEqual(await self.offset(alice, attachment_id), 100)

        response = await self.http.post("/api/attachments/", headers=tus(
            alice, Upload_Length=str(100 * 1024 * 1024 + 1)))
        self.assertEqual((response.code, response.json()["code"]), (413, "ATTACHMENT_TOO_LARGE"))
        response = await self.http.post("/api/attachments/", headers=tus(alice))
        self.assertEqual(response.code, 400)
        response = await self.http.post("/api/attachments/", headers=alice.auth())
        self.assertEqual(response.code, 412)
        for user in (alice, bob):
            response = await self.http.get(f"/api/attachments/{attachment_id}", headers=user.auth())
            self.assertEqual((response.code, response.json()["code"]), (404, "ATTACHMENT_NOT_FOUND"))
        response = await self.http.request("HEAD", f"/api/attachments/{attachment_id}",
                                           headers=tus(bob))
        self.assertEqual(response.code, 404)

    async def test_refusals_found_by_fuzzing(self) -> None:
        """A PATCH refused before its (empty) body is answered once and
        logs nothing; a PATCH to no upload path is routed (405, 404); a
        suffix range of an empty attachment is 416; If-None-Match * and a
        weak tag are 304; a download whose blob the store lost is a whole
        503 without the blob's headers; answers about uploads carry
        Tus-Resumable."""
        await self.serve()
        alice = await self.user("alice")
        attachment_id = await self.create(alice, 10)
        for headers in ({b"Tus-Resumable": [b"0.9"]}, {b"Content-Type": [b"text/plain"]},
                        {b"Upload-Offset": [b"x"]}):
            response = await self.patch(alice, attachment_id, 0, b"", headers)
            self.assertIn(response.code, (400, 412, 415), headers)
            self.assertEqual(response.header("Tus-Resumable"), "1.0.0")
        self.assertEqual(self.flushLoggedErrors(), [])
        response = await self.patch(alice, "", 0, b"x")
        self.assertEqual(response.code, 405)
        response = await self.patch(alice, attachment_id + "/more", 0, b"x")
        self.assertEqual(response.code, 404)
        empty = await self.upload(alice, b"")
        response = await self.http.get(f"/api/attachments/{empty}", headers={
            **alice.auth(), b"Range": [b"bytes=-1024"]})
        self.assertEqual((response.code, response.header("Content-Range")), (416, "bytes */0"))
        self.assertIsNone(response.header("ETag"))
        blob = await self.upload(alice, b"abc")
        for tag in (b"*", b'W/"' + blob.encode() + b'"'):
            response = await self.http.get(f"/api/attachments/{blob}", headers={
                **alice.auth(), b"If-None-Match": [tag]})
            self.assertEqual(response.code, 304, tag)
        for path in self.blob_files():
            if path.name == blob:
                path.unlink()
        response = await self.http.get(f"/api/attachments/{blob}", headers=alice.auth())
        self.assertEqual((response.code, response.json()["code"]), (503, "STORE_UNAVAILABLE"))
        self.assertIsNone(response.header("ETag"))
        self.assertEqual(response.header("Cache-Control"), "no-store")
        response = await self.http.request("HEAD", f"/api/attachments/{attachment_id}",
                                           headers=tus(alice))
        self.assertEqual(response.header("Content-Type"), "application/octet-stream")
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_a_failed_completion_is_finished_by_head(self) -> None:
        """When the store fails as an upload reaches its length, the PATCH
        is 503 and the upload is not served; the uploader's next HEAD
        completes it (an offset equal to the length tells a client it is
        done, so it must be)."""
        await self.serve()
        alice = await self.user("alice")
        attachment_id = await self.create(alice, 4)
        blobs = self.server.attachments.blobs
        complete = blobs.complete

        def failing(blob_id: str, state: dict[str, Any], length: int) -> Any:
            from twisted.internet.defer import fail
            return fail(BlobStoreError("the disk is full"))
        blobs.complete = failing
        response = await self.patch(alice, attachment_id, 0, b"abcd")
        self.assertEqual((response.code, response.json()["code"]), (503, "STORE_UNAVAILABLE"))
        response = await self.http.get(f"/api/attachments/{attachment_id}", headers=alice.auth())
        self.assertEqual(response.code, 404)
        response = await self.http.request("HEAD", f"/api/attachments/{attachment_id}",
                                           headers=tus(alice))
        self.assertEqual(response.code, 503)
        blobs.complete = complete
        self.assertEqual(await self.offset(alice, attachment_id), 4)
        response = await self.http.get(f"/api/attachments/{attachment_id}", headers=alice.auth())
        self.assertEqual((response.code, response.body), (200, b"abcd"))

    async def test_racing_patches(self) -> None:
        """Two PATCHes at one offset at once: one appends, the other is 409;
        the upload holds the winner's bytes only."""
        await self.serve()
        alice = await self.user("alice")
        attachment_id = await self.create(alice, 200_000)
        first, second = os.urandom(100_000), os.urandom(100_000)
        answers = [await d for d in [
            self._deferred_patch(alice, attachment_id, first),
            self._deferred_patch(alice, attachment_id, second)]]
        codes = sorted(answer.code for answer in answers)
        self.assertEqual(codes, [204, 409])
        winner = first if answers[0].code == 204 else second
        response = await self.patch(alice, attachment_id, 100_000, winner)
        self.assertEqual(response.code, 204)
        response = await self.http.get(f"/api/attachments/{attachment_id}", headers=alice.auth())
        self.assertEqual(response.body, winner + winner)

    def _deferred_patch(self, user: User, attachment_id: str, data: bytes) -> Any:
        from twisted.internet.defer import Deferred
        return Deferred.fromCoroutine(self.patch(user, attachment_id, 0, data))

    async def test_a_stalled_upload_is_timed_out(self) -> None:
        """A PATCH that stops sending is closed after the idle timeout, and
        keeps what arrived."""
        await self.serve(request_timeout=1)
        # The idle timeout, for this test: a quarter of a second (it is the
        # one that closes: the request's deadline is a second).
        self.server.site.timeOut = 0.25
        alice = await self.user("alice")
        attachment_id = await self.create(alice, 1000)
        head = patch_head(alice, attachment_id, 1000)
        started = time.monotonic()
        answer = await deferToThread(raw_request, self.port, head, b"a" * 10, close_after=False,
                                     timeout=15)
        # Closed by the server, not ended by this client's own timeout.
        self.assertLess(time.monotonic() - started, 5)
        self.assertTrue(answer == b"" or b" 408 " in answer.split(b"\r\n", 1)[0], answer[:200])
        self.assertEqual(await self._settled_offset(alice, attachment_id, 10), 10)

    async def test_a_store_failure_is_503_and_the_server_lives(self) -> None:
        """When the blob store fails (here: the upload's file is gone under
        it) a PATCH is 503 STORE_UNAVAILABLE with Retry-After, the offset
        is unchanged, and the server goes on serving."""
        await self.serve()
        alice = await self.user("alice")
        attachment_id = await self.create(alice, 1000)
        (Path(self.server.data_dir) / "attachments" / "partial" / attachment_id).unlink()
        response = await self.patch(alice, attachment_id, 0, b"a" * 10)
        self.assertEqual((response.code, response.json()["code"]), (503, "STORE_UNAVAILABLE"))
        self.assertEqual(response.header("Retry-After"), "5")
        self.assertEqual(await self.offset(alice, attachment_id), 0)
        other = await self.upload(alice, b"still serving")
        response = await self.http.get(f"/api/attachments/{other}", headers=alice.auth())
        self.assertEqual(response.body, b"still serving")

    # -- limits ---------------------------------------------------------------

    async def test_limits(self) -> None:
        """At most max_pending_uploads unfinished (409 TOO_MANY_UPLOADS);
        at most the quota in all (413 ATTACHMENT_QUOTA); the upload rate
        (429 with Retry-After). A deleted upload frees its place."""
        await self.serve(max_pending_uploads=2, attachment_quota=4096, max_attachment=2048,
                         rate_limit_attachments=(6, 3600))
        alice = await self.user("alice")
        first = await self.create(alice, 1000)
        await self.create(alice, 1000)
        response = await self.http.post("/api/attachments/", headers=tus(alice, Upload_Length="10"))
        self.assertEqual((response.code, response.json()["code"]), (409, "TOO_MANY_UPLOADS"))
        response = await self.http.delete(f"/api/attachments/{first}", headers=tus(alice))
        self.assertEqual(response.code, 204)
        response = await self.http.delete(f"/api/attachments/{first}", headers=tus(alice))
        self.assertEqual(response.code, 404)
        await self.upload(alice, b"a" * 2000)
        response = await self.http.post("/api/attachments/", headers=tus(alice, Upload_Length="2000"))
        self.assertEqual((response.code, response.json()["code"]), (413, "ATTACHMENT_QUOTA"))
        self.assertEqual(response.json()["details"], {"quota": 4096, "used": 3000})
        await self.create(alice, 10)
        response = await self.http.post("/api/attachments/", headers=tus(alice, Upload_Length="10"))
        self.assertEqual(response.code, 429)
        self.assertTrue(int(response.header("Retry-After")) > 0)

    # -- messages, expiry and removal --------------------------------------------

    async def send(self, sender: User, recipient: User, attachments: list[str]) -> Any:
        return await self.http.post("/api/messaging/send", {
            "recipientId": recipient.cyphr_id, "encryptedPayload": {"sealed": "x"},
            "attachments": attachments}, headers=sender.auth())

    async def test_messages_name_only_the_senders_finished_attachments(self) -> None:
        """A send naming an attachment of another user, an unknown one or an
        unfinished one is 400 INVALID_ATTACHMENT with the ids, and stores
        nothing; a malformed list is 400; the sender's finished one is fine."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        mine = await self.upload(alice, b"mine")
        bobs = await self.upload(bob, b"bob's")
        unfinished = await self.create(alice, 10)
        unknown = os.urandom(16).hex()
        for named in ([bobs], [unknown], [unfinished], [mine, bobs]):
            response = await self.send(alice, bob, named)
            self.assertEqual((response.code, response.json()["code"]), (400, "INVALID_ATTACHMENT"))
            self.assertEqual(response.json()["details"]["attachments"], [a for a in named if a != mine])
        for malformed in (["xyz"], [mine, mine], "abc", [1]):
            response = await self.send(alice, bob, malformed)
            self.assertEqual(response.code, 400, malformed)
        response = await self.http.get("/api/messaging/chats", headers=alice.auth())
        self.assertEqual(response.json().get("chats", []), [])
        response = await self.send(alice, bob, [mine])
        self.assertEqual(response.code, 201, response.body)

    async def test_the_last_message_naming_it_takes_it_along(self) -> None:
        """An attachment named by two messages stays while one of them does;
        once the sender deleted both, the clean-up removes it: 404, and
        its file is gone. One no message ever named stays until it expires."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        named = await self.upload(alice, b"photo")
        kept = await self.upload(alice, b"never sent")
        messages = [(await self.send(alice, bob, [named])).json()["messageId"] for _ in range(2)]
        for n, message_id in enumerate(messages):
            response = await self.http.delete(f"/api/messaging/message/{message_id}",
                                               headers=alice.auth())
            self.assertEqual(response.code, 200, response.body)
            await self.server.maintenance.run()
            response = await self.http.get(f"/api/attachments/{named}", headers=bob.auth())
            self.assertEqual(response.code, 200 if n == 0 else 404)
        self.assertEqual([p.name for p in self.blob_files()], [kept])

    async def test_expiry_and_account_deletion(self) -> None:
        """With the clock: an unfinished upload goes after upload_expiry, a
        finished one after the retention; a deleted account's attachments
        are no longer served at once and removed by the clean-up."""
        clock = Clock()
        clock.advance(reactor.seconds())
        self.server = await start_server(self, serve=True, clock=clock, upload_expiry=3600,
                                         attachment_retention_days=2)
        self.port = (await self.server.listening()[0]).getHost().port
        self.http = RealHTTP.for_port(self, self.port, clock=clock)
        alice, bob = await self.user("alice"), await self.user("bob")
        unfinished = await self.create(alice, 10)
        finished = await self.upload(alice, b"kept two days")
        clock.advance(3601)
        await self.server.maintenance.run()
        self.assertEqual([p.name for p in self.blob_files()], [finished])
        response = await self.http.request("HEAD", f"/api/attachments/{unfinished}", headers=tus(alice))
        self.assertEqual(response.code, 404)
        clock.advance(2 * 86400)
        response = await self.http.get(f"/api/attachments/{finished}", headers=bob.auth())
        self.assertEqual(response.code, 404)  # expired: not served even before the clean-up
        await self.server.maintenance.run()
        self.assertEqual(self.blob_files(), [])
        samples = await scrape(self.http)
        self.assertEqual(value(samples, "cyphr_attachments_removed_total", store="local"), 2)
        self.assertEqual(value(samples, "cyphr_attachments_stored", store="local"), 0)

        third = await self.upload(bob, b"bob's")
        response = await bob.delete_account(self.http)
        self.assertEqual(response.code, 200, response.body)
        response = await self.http.get(f"/api/attachments/{third}", headers=alice.auth())
        self.assertEqual(response.code, 404)
        await self.server.maintenance.run()
        self.assertEqual(self.blob_files(), [])

    async def test_a_socket_send_names_attachments_too(self) -> None:
        """send_message over Socket.IO takes attachments as the REST send does:
        another's is refused with INVALID_ATTACHMENT in the ack and nothing
        is stored; the sender's own is named, and deleting the message
        takes the attachment along."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        mine = await self.upload(alice, b"photo")
        bobs = await self.upload(bob, b"bob's")
        client = SioClient(self.base, transports=["websocket"])
        self.addCleanup(client.disconnect)
        await client.connect({"token": alice.token})
        await client.wait_for("sync_complete")
        refused = await client.call("send_message", {
            "recipientId": bob.cyphr_id, "encryptedPayload": {"sealed": "x"}, "attachments": [bobs]})
        self.assertEqual((refused["success"], refused["code"]), (False, "INVALID_ATTACHMENT"))
        ack = await client.call("send_message", {
            "recipientId": bob.cyphr_id, "encryptedPayload": {"sealed": "x"}, "attachments": [mine]})
        self.assertTrue(ack["success"], ack)
        rows = await self.server.database.run_query("SELECT attachment_id FROM message_attachments")
        self.assertEqual(rows, [(mine,)])
        response = await self.http.delete(f"/api/messaging/message/{ack['messageId']}",
                                          headers=alice.auth())
        self.assertEqual(response.code, 200)
        await self.server.maintenance.run()
        response = await self.http.get(f"/api/attachments/{mine}", headers=bob.auth())
        self.assertEqual(response.code, 404)

    async def test_expired_uploads_count_no_more(self) -> None:
        """An unfinished upload past its expiry no longer counts against the
        unfinished uploads or the quota, even before the clean-up ran."""
        clock = Clock()
        clock.advance(reactor.seconds())
        self.server = await start_server(self, serve=True, clock=clock, upload_expiry=60,
                                         max_pending_uploads=1)
        self.port = (await self.server.listening()[0]).getHost().port
        self.http = RealHTTP.for_port(self, self.port, clock=clock)
        alice = await self.user("alice")
        await self.create(alice, 10)
        response = await self.http.post("/api/attachments/", headers=tus(alice, Upload_Length="10"))
        self.assertEqual(response.code, 409)
        clock.advance(61)
        await self.create(alice, 10)

    async def test_an_avatar_is_kept_while_it_is_one(self) -> None:
        """avatarUrl may name a finished attachment of the user's (another's
        or an unfinished one is 400 INVALID_ATTACHMENT); it outlives the
        retention while it is the avatar, and expires as any other once
        the avatar changes."""
        clock = Clock()
        clock.advance(reactor.seconds())
        self.server = await start_server(self, serve=True, clock=clock, attachment_retention_days=1)
        self.port = (await self.server.listening()[0]).getHost().port
        self.http = RealHTTP.for_port(self, self.port, clock=clock)
        alice, bob = await self.user("alice"), await self.user("bob")
        avatar = await self.upload(alice, b"sealed picture")
        bobs = await self.upload(bob, b"bob's")
        unfinished = await self.create(alice, 10)
        for refused in (bobs, unfinished):
            response = await self.http.post("/api/cyphr-id/update-profile", {"avatarUrl": refused},
                                            headers=alice.auth())
            self.assertEqual((response.code, response.json()["code"]), (400, "INVALID_ATTACHMENT"))
        response = await self.http.post("/api/cyphr-id/update-profile", {"avatarUrl": avatar},
                                        headers=alice.auth())
        self.assertEqual(response.code, 200, response.body)
        response = await self.http.get(f"/api/cyphr-id/user/{alice.cyphr_id}", headers=bob.auth())
        self.assertEqual(response.json()["user"]["avatarUrl"], avatar)
        clock.advance(3 * 86400)
        await self.server.maintenance.run()
        response = await self.http.get(f"/api/attachments/{avatar}", headers=bob.auth())
        self.assertEqual((response.code, response.body), (200, b"sealed picture"))
        response = await self.http.post("/api/cyphr-id/update-profile",
                                        {"avatarUrl": "https://example.org/a.png"}, headers=alice.auth())
        self.assertEqual(response.code, 200, response.body)
        await self.server.maintenance.run()
        response = await self.http.get(f"/api/attachments/{avatar}", headers=bob.auth())
        self.assertEqual(response.code, 404)
        self.assertNotIn(avatar, [p.name for p in self.blob_files()])

    async def test_a_blob_the_store_cannot_remove_is_tried_again(self) -> None:
        """A blob whose removal fails stays marked and goes on a later run."""
        await self.serve()
        alice = await self.user("alice")
        attachment_id = await self.upload(alice, b"x")
        await self.http.delete(f"/api/attachments/{attachment_id}", headers=tus(alice))
        blobs = self.server.attachments.blobs
        delete = blobs.delete

        def failing(blob_id: str, state: dict[str, Any]) -> Any:
            from twisted.internet.defer import fail
            return fail(BlobStoreError("the store is away"))
        blobs.delete = failing
        await self.server.maintenance.run()
        self.assertEqual(len(self.blob_files()), 1)
        blobs.delete = delete
        await self.server.maintenance.run()
        self.assertEqual(self.blob_files(), [])


class SQLiteAttachmentsTests(SQLiteMixin, AttachmentsMixin, TestCase):
    pass


class PostgresAttachmentsTests(PostgresMixin, AttachmentsMixin, TestCase):
    pass


class S3AttachmentsMixin(AttachmentsHelpers):
    """Attachments in an S3 bucket (moto's S3 server on 127.0.0.1, real
    SigV4 over HTTP), through the whole server: the store's own contract is
    tests.test_blobs."""

    async def serve(self, **overrides: Any) -> None:
        self.endpoint, self.admin, _ = moto()
        self.prefix = f"{os.urandom(8).hex()}/attachments/"
        await super().serve(attachment_store="s3", s3_endpoint=self.endpoint, s3_bucket=BUCKET,
                            s3_region=REGION, s3_prefix=self.prefix, s3_access_key_id=ACCESS_KEY,
                            s3_secret_access_key=SECRET_KEY, **overrides)

    def objects(self) -> list[str]:
        listed = self.admin.list_objects_v2(Bucket=BUCKET, Prefix=self.prefix)
        return sorted(o["Key"][len(self.prefix):] for o in listed.get("Contents", []))

    async def test_upload_resume_download_and_removal(self) -> None:
        """tuspy uploads in parts of S3's size; a PATCH dropped midway keeps
        what arrived (as a tail object) and resumes; ranges read across a
        part boundary; deleting the last message naming it removes the
        object and every tail."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        data = os.urandom(12 * 1024 * 1024)
        attachment_id = await self.create(alice, len(data))
        head = patch_head(alice, attachment_id, len(data))
        await deferToThread(raw_request, self.port, head, data[:3_000_000], timeout=3)
        self.assertEqual(await self._settled_offset(alice, attachment_id, 3_000_000), 3_000_000)
        self.assertEqual([name.split(".")[0] for name in self.objects()], [f"tails/{attachment_id}"])
        url = f"{self.base}/api/attachments/{attachment_id}"
        await deferToThread(self.tuspy, alice, data, chunk_size=5_000_000, url=url)
        self.assertEqual(self.objects(), [attachment_id])
        response = await self.http.get(f"/api/attachments/{attachment_id}", headers={
            **bob.auth(), b"Range": [b"bytes=8388000-8389000"]})
        self.assertEqual((response.code, response.body), (206, data[8388000:8389001]))
        response = await self.http.get(f"/api/attachments/{attachment_id}", headers=bob.auth())
        self.assertEqual(response.body, data)

        sent = await self.http.post("/api/messaging/send", {
            "recipientId": bob.cyphr_id, "encryptedPayload": {"sealed": "x"},
            "attachments": [attachment_id]}, headers=alice.auth())
        self.assertEqual(sent.code, 201, sent.body)
        response = await self.http.delete(f"/api/messaging/message/{sent.json()['messageId']}",
                                          headers=alice.auth())
        self.assertEqual(response.code, 200)
        await self.server.maintenance.run()
        self.assertEqual(self.objects(), [])
        response = await self.http.get(f"/api/attachments/{attachment_id}", headers=bob.auth())
        self.assertEqual(response.code, 404)

    async def test_unfinished_upload_removed(self) -> None:
        """An upload deleted by its uploader before it finished leaves
        nothing in the bucket once the clean-up ran (its multipart upload
        aborted, its tail gone)."""
        await self.serve()
        alice = await self.user("alice")
        attachment_id = await self.create(alice, 10_000_000)
        response = await self.patch(alice, attachment_id, 0, os.urandom(100_000))
        self.assertEqual(response.code, 204)
        self.assertEqual(len(self.objects()), 1)  # the tail
        response = await self.http.delete(f"/api/attachments/{attachment_id}", headers=tus(alice))
        self.assertEqual(response.code, 204)
        await self.server.maintenance.run()
        self.assertEqual(self.objects(), [])
        uploads = self.admin.list_multipart_uploads(Bucket=BUCKET, Prefix=self.prefix)
        self.assertEqual(uploads.get("Uploads", []), [])


class PostgresS3AttachmentsTests(PostgresMixin, S3AttachmentsMixin, TestCase):
    pass


class SQLiteS3AttachmentsTests(SQLiteMixin, S3AttachmentsMixin, TestCase):
    pass
