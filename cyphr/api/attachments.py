"""
/api/attachments/: encrypted attachments, uploaded with TUS 1.0.0 (core,
creation, expiration and termination: https://tus.io/protocols/resumable-upload)
and downloaded with ranges.

- ``OPTIONS /api/attachments/``: what the server supports (TUS discovery).
- ``POST /api/attachments/`` with ``Upload-Length``: a new upload; answers
  201 with its ``Location``.
- ``PATCH /api/attachments/:id`` with ``Upload-Offset`` and the bytes
  (``Content-Type: application/offset+octet-stream``): appends; answers 204
  with the new ``Upload-Offset``. The body goes to the blob store as it
  arrives (UploadReceiver): nothing holds a whole body in memory, and a
  connection lost midway keeps what arrived.
- ``HEAD /api/attachments/:id``: the uploader learns the offset to resume
  from; anyone signed in learns a finished attachment's length.
- ``GET /api/attachments/:id``: the blob, streamed, with ``Range``.
- ``DELETE /api/attachments/:id``: the uploader deletes it.
- ``GET /api/attachments/config``: the limits.

Every answer about an attachment that is not served is the same 404.
"""

from __future__ import annotations

import re
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import datetimeToString

from cyphr.api.guard import authenticated, public
from cyphr.api.http import Streamed, answer, raw_error_answer
from cyphr.blobs import BLOB_ID, BlobReader, BlobStoreError
from cyphr.clock import iso
from cyphr.errors import (
    RANGE_NOT_SATISFIABLE,
    UNSUPPORTED_TUS_VERSION,
    ApiError,
    BadRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from cyphr.handlers.attachments import (
    Append,
    AttachmentsHandler,
    not_found,
    store_unavailable,
)
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.ratelimit import RateLimits
from cyphr.store.attachments import Attachment

_log = Logger()
TUS_VERSION = b"1.0.0"
TUS_EXTENSIONS = b"creation,expiration,termination"
OFFSET_TYPE = b"application/offset+octet-stream"
PREFIX = b"/api/attachments/"
# A download is read from the store in pieces of this size; with the
# transport's buffer, at most about two are held per download.
READ_BYTES = 256 * 1024
_DIGITS = re.compile(rb"[0-9]{1,19}")
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")


def _tus_headers(request: Any) -> None:
    request.setHeader(b"Tus-Resumable", TUS_VERSION)


def _check_tus(request: Any) -> None:
    version = request.getHeader(b"tus-resumable")
    if version != TUS_VERSION:
        raise ApiError("Tus-Resumable: 1.0.0 is required", code=UNSUPPORTED_TUS_VERSION, status=412,
                       headers={"Tus-Version": TUS_VERSION.decode()})


def _header_int(value: bytes | None, name: str) -> int:
    if value is None:
        raise BadRequest(f"The {name} header is required", details={"header": name})
    if not _DIGITS.fullmatch(value.strip()):
        raise BadRequest(f"{name} must be a whole number of bytes", details={"header": name})
    return int(value)


def _expires(attachment: Attachment) -> bytes | None:
    if attachment.expires_at is None:
        return None
    return datetimeToString(attachment.expires_at // 1000)


def _location(attachment_id: str) -> bytes:
    return PREFIX + attachment_id.encode("ascii")


class AttachmentsAPI:
    app = Klein()

    def __init__(self, attachments: AttachmentsHandler, authenticator: Authenticator,
                 limits: RateLimits) -> None:
        self._attachments = attachments
        self.authenticator = authenticator
        self.limits = limits

    @app.route("/api/attachments/", methods=["OPTIONS"])
    @public()
    def discover(self, request: Any) -> bytes:
        _tus_headers(request)
        request.setHeader(b"Tus-Version", TUS_VERSION)
        request.setHeader(b"Tus-Extension", TUS_EXTENSIONS)
        request.setHeader(b"Tus-Max-Size", str(self._attachments.limits.max_size).encode())
        request.setResponseCode(http.NO_CONTENT)
        return b""

    @app.route("/api/attachments/config", methods=["GET"])
    @authenticated()
    def config(self, request: Any, user: AuthUser) -> bytes:
        return answer(request, {"success": True, **self._attachments.limits.to_json(),
                                "tusVersion": TUS_VERSION.decode()})

    @app.route("/api/attachments/", methods=["POST"])
    @authenticated()
    async def create(self, request: Any, user: AuthUser) -> bytes:
        _tus_headers(request)  # on every answer, errors included (TUS)
        _check_tus(request)
        if request.getHeader(b"upload-defer-length") is not None:
            raise BadRequest("Upload-Defer-Length is not supported: send Upload-Length",
                             details={"header": "Upload-Defer-Length"})
        # Upload-Metadata (names, types) is never read nor kept: what a file
        # is travels only inside the end-to-end encrypted message.
        length = _header_int(request.getHeader(b"upload-length"), "Upload-Length")
        attachment = await self._attachments.create(user, length)
        _tus_headers(request)
        request.setHeader(b"Location", _location(attachment.id))
        request.setHeader(b"Upload-Expires", _expires(attachment) or b"")
        return answer(request, {"success": True, "id": attachment.id, "length": length,
                                "expiresAt": iso(attachment.expires_at)}, status=http.CREATED)

    @app.route("/api/attachments/<attachment_id>", methods=["PATCH"])
    @authenticated()  # and by UploadReceiver, before the body is taken
    async def append(self, request: Any, user: AuthUser, attachment_id: str) -> bytes:
        _tus_headers(request)
        upload: UploadBody | None = getattr(request, "upload", None)
        if upload is None:
            raise not_found()
        attachment = await upload.result()
        _tus_headers(request)
        request.setHeader(b"Upload-Offset", str(attachment.received).encode())
        if not attachment.complete:
            request.setHeader(b"Upload-Expires", _expires(attachment) or b"")
        request.setResponseCode(http.NO_CONTENT)
        return b""

    @app.route("/api/attachments/<attachment_id>", methods=["DELETE"])
    @authenticated()
    async def delete(self, request: Any, user: AuthUser, attachment_id: str) -> bytes:
        _tus_headers(request)
        await self._attachments.terminate(user, attachment_id)
        _tus_headers(request)
        request.setResponseCode(http.NO_CONTENT)
        return b""

    @app.route("/api/attachments/<attachment_id>", methods=["GET", "HEAD"])
    @authenticated()
    async def download(self, request: Any, user: AuthUser, attachment_id: str) -> Any:
        if request.method == b"HEAD":
            return await self._head(request, user, attachment_id)
        attachment = await self._attachments.download(attachment_id)
        etag = _etag(attachment)
        if _matches(request.getHeader(b"if-none-match"), etag):
            self._blob_headers(request, etag)
            request.setResponseCode(http.NOT_MODIFIED)
            return b""
        # What may fail (416, 503) fails before the blob's headers are set:
        # an error answer is never sent as a blob's.
        start, end, partial = 0, attachment.length, False
        asked = request.getHeader(b"range")
        if_range = request.getHeader(b"if-range")
        if asked is not None and (if_range is None or if_range.strip() == etag):
            span = _parse_range(asked.decode("latin-1"), attachment.length)
            if span is not None:
                (start, end), partial = span, True
        reader = None
        if end > start:
            try:
                reader = await self._attachments.blobs.open(attachment.id, start, end)
            except BlobStoreError as e:
                raise store_unavailable(e) from None
        self._blob_headers(request, etag)
        if partial:
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (start, end - 1, attachment.length))
        request.setHeader(b"Content-Length", str(end - start).encode())
        if reader is None:
            return b""
        return Streamed(lambda request: _BlobProducer(request, reader, self._attachments).start())

    async def _head(self, request: Any, user: AuthUser, attachment_id: str) -> bytes:
        """The uploader: the upload's offset and length (TUS); anyone: a
        finished attachment's length."""
        try:
            attachment = await self._attachments.status(user, attachment_id)
        except ApiError as e:
            if e.status != 404:
                raise
            attachment = await self._attachments.download(attachment_id)  # not the uploader
        else:
            # TUS: the uploader's HEAD is never cached (the default no-store).
            request.setHeader(b"Content-Type", b"application/octet-stream")
            _tus_headers(request)
            request.setHeader(b"Upload-Offset", str(attachment.received).encode())
            request.setHeader(b"Upload-Length", str(attachment.length).encode())
            if attachment.complete:
                request.setHeader(b"Content-Length", str(attachment.length).encode())
            else:
                request.setHeader(b"Upload-Expires", _expires(attachment) or b"")
            return b""
        self._blob_headers(request, _etag(attachment))
        request.setHeader(b"Content-Length", str(attachment.length).encode())
        return b""

    @staticmethod
    def _blob_headers(request: Any, etag: bytes) -> None:
        # The server does not know what a blob is, and never guesses.
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Accept-Ranges", b"bytes")
        request.setHeader(b"ETag", etag)
        # Ids are never reused and blobs never change, but the answer needs
        # the bearer token: private caches only.
        request.setHeader(b"Cache-Control", b"private, max-age=31536000, immutable")


def _etag(attachment: Attachment) -> bytes:
    # Ids are never reused and blobs never change: the id is the tag.
    return b'"' + attachment.id.encode("ascii") + b'"'


def _matches(if_none_match: bytes | None, etag: bytes) -> bool:
    """If-None-Match's weak comparison (RFC 9110, 13.1.2): ``*``, or the tag
    with or without ``W/``."""
    if not if_none_match:
        return False
    tags = {tag.strip() for tag in if_none_match.split(b",")}
    return b"*" in tags or etag in tags or b"W/" + etag in tags


def _parse_range(header: str, length: int) -> tuple[int, int] | None:
    """The one byte range asked for, as (start, end exclusive); None to
    answer the whole blob (a header that is malformed, or asks for several
    ranges, is ignored, as RFC 9110 allows). A range wholly outside the
    blob is 416."""
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        suffix = int(last)
        if suffix == 0 or length == 0:  # no byte of it exists
            raise _unsatisfiable(length)
        return max(0, length - suffix), length
    start = int(first)
    end = min(length, int(last) + 1) if last else length
    if last and int(last) < start:
        return None  # malformed: ignored
    if start >= length:
        raise _unsatisfiable(length)
    return start, end


def _unsatisfiable(length: int) -> ApiError:
    return ApiError("The range is outside the attachment", code=RANGE_NOT_SATISFIABLE, status=416,
                    headers={"Content-Range": f"bytes */{length}"}, details={"length": length})


class _BlobProducer:
    """Streams a range of a blob into the response: a push producer that
    reads the next piece only once the last one is written and the
    transport is not paused. A failure midway drops the connection (the
    status is sent already): the client sees a cut-short body, never a
    wrong one."""

    def __init__(self, request: Any, reader: BlobReader, attachments: AttachmentsHandler) -> None:
        self._request = request
        self._reader = reader
        self._stats = attachments.stats
        self._paused = False
        self._reading = False
        self._done = False

    def start(self) -> None:
        self._request.notifyFinish().addErrback(lambda _: self._stop())
        self._request.registerProducer(self, True)
        self._next()

    def _next(self) -> None:
        if self._paused or self._reading or self._done:
            return
        self._reading = True
        self._reader.read(READ_BYTES).addCallbacks(self._got, self._failed)

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self._done:
            return
        if not data:
            self._stop()
            self._request.unregisterProducer()
            self._request.finish()
            return
        self._stats.download_bytes += len(data)
        self._request.write(data)
        self._next()

    def _failed(self, failure: Any) -> None:
        self._reading = False
        if self._done:
            return
        _log.warn("Reading an attachment failed midway: {error}", error=failure.getErrorMessage())
        self._stop()
        self._request.unregisterProducer()
        self._request.channel.loseConnection()

    def _stop(self) -> None:
        if not self._done:
            self._done = True
            self._reader.close()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._next()

    def stopProducing(self) -> None:
        self._stop()


# -- uploads: PATCH bodies streamed into the blob store --------------------------


class UploadReceiver:
    """
    Takes the body of ``PATCH /api/attachments/:id`` as it arrives, instead
    of the site buffering it (cyphr.api.http.CyphrRequest asks ``receive``
    once the headers are in). Before any byte is taken the request is
    checked (TUS version, content type, offset), its bearer token
    authenticated and the upload held for this append; meanwhile the
    connection is paused. A refusal then is answered at once and the
    connection closed, unless the whole body is in already (then the route
    answers it as any other error).
    """

    def __init__(self, attachments: AttachmentsHandler, authenticator: Authenticator) -> None:
        self._attachments = attachments
        self._authenticator = authenticator

    def receive(self, request: Any, method: bytes, uri: bytes, length: int | None) -> UploadBody | None:
        """An UploadBody for ``PATCH /api/attachments/<id>`` (an id of the
        blob stores' form); None for anything else, which is routed as
        usual (to 404, 405 or another route)."""
        if method != b"PATCH" or not uri.startswith(PREFIX):
            return None
        attachment_id = uri[len(PREFIX):].split(b"?", 1)[0].decode("latin-1")
        if not BLOB_ID.fullmatch(attachment_id):
            return None
        body = UploadBody(request, length)
        body.start(self._prepare(request, body, attachment_id))
        return body

    async def _prepare(self, request: Any, body: UploadBody, attachment_id: str) -> Append:
        _check_tus(request)
        content_type = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if content_type != OFFSET_TYPE:
            raise UnsupportedMediaType("An upload's body must be application/offset+octet-stream")
        offset = _header_int(request.getHeader(b"upload-offset"), "Upload-Offset")
        user = await self._authenticator.authenticate(request.getHeader(b"authorization"))
        append = await self._attachments.begin_append(user, attachment_id, offset, body)
        if body.declared is not None and body.declared > append.allowed:
            await append.finish()
            raise _past_length(append)
        return append


def _past_length(append: Append) -> PayloadTooLarge:
    return PayloadTooLarge(f"The upload has {append.allowed} bytes to go; the request carries more",
                           details={"remaining": append.allowed})


class UploadBody:
    """One PATCH's body on its way to the store. ``result()`` (the route)
    answers the upload once the body is written, or the refusal."""

    EARLY_LIMIT = 4 * 1024 * 1024  # bytes taken before the append is ready (the reads in flight)

    def __init__(self, request: Any, declared: int | None) -> None:
        self._request = request
        self.declared = declared
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._append: Append | None = None
        self._error: ApiError | None = None
        self._answered = False  # refused straight on the transport
        self._body_done = False
        self._lost = False
        self._full = False  # the writer asked for a pause
        self._preparing = True
        self._outcome: Deferred[Attachment] = Deferred()
        self._settled = False

    # -- flow: the connection is paused while preparing or while the
    #    writer is full --

    def _transport(self) -> Any:
        return self._request.channel.transport

    def _update_flow(self) -> None:
        transport = self._transport()
        if transport is None or self._lost:
            return
        if self._preparing or self._full:
            transport.pauseProducing()
        else:
            transport.resumeProducing()

    def pauseProducing(self) -> None:
        self._full = True
        self._update_flow()

    def resumeProducing(self) -> None:
        self._full = False
        self._update_flow()

    # -- the stages --

    def start(self, preparing: Any) -> None:
        self._update_flow()
        Deferred.fromCoroutine(preparing).addCallbacks(self._ready, self._refused)

    def _ready(self, append: Append) -> None:
        self._preparing = False
        self._append = append
        early, self._early = self._early, []
        for chunk in early:
            self._take(chunk)
        if self._error is None:
            self._update_flow()
            if self._body_done or self._lost:
                self._end()

    def _refused(self, failure: Any) -> None:
        self._preparing = False
        self._early = []
        if not failure.check(ApiError):
            _log.failure("Preparing an upload failed", failure)
        self._fail(failure.value if failure.check(ApiError) else None)

    def data(self, chunk: bytes) -> None:
        if self._error is not None or self._answered:
            return
        if self._append is None:
            self._early.append(chunk)
            self._early_bytes += len(chunk)
            if self._early_bytes > self.EARLY_LIMIT:
                self._fail(BadRequest("The upload's body came before it could be taken"))
            return
        self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        append = self._append
        assert append is not None
        if append.received + len(chunk) > append.allowed:
            self._fail(_past_length(append))
            return
        append.write(chunk)

    def body_done(self) -> None:
        """The whole body arrived (the route runs next)."""
        self._body_done = True
        if self._append is not None and self._error is None:
            self._end()

    def lost(self) -> None:
        """The connection went before the body ended: keep what arrived."""
        if self._body_done:
            return
        self._lost = True
        if self._append is not None:
            self._end()

    def _end(self) -> None:
        append = self._append
        assert append is not None
        append.finish().addCallbacks(self._settle, self._refused)

    def _settle(self, attachment: Attachment) -> None:
        if not self._settled:
            self._settled = True
            self._outcome.callback(attachment)

    def _fail(self, error: ApiError | None) -> None:
        """Refuse the append: what was written stays (the writer finishes),
        and the client hears why: from the route if the body is all in,
        else at once, the connection closing."""
        if self._error is not None:
            return
        self._error = error or ApiError("The upload failed", status=500, code="INTERNAL_ERROR")
        if self._append is not None:
            self._append.finish().addErrback(lambda f: None)
        if not self._settled:
            self._settled = True
            self._outcome.errback(Failure(self._error))
        if self._body_done:
            return  # the route answers it
        self._outcome.addErrback(lambda _: None)  # nobody else will ask
        if not self._lost:
            self._answer_now()

    @property
    def answered(self) -> bool:
        """Refused and answered straight on the transport: the request is
        not routed."""
        return self._answered

    def _answer_now(self) -> None:
        assert self._error is not None
        self._answered = True
        transport = self._transport()
        if transport is None:
            return
        transport.write(raw_error_answer(self._error, secure=self._request.isSecure(),
                                         extra=[(b"Tus-Resumable", TUS_VERSION)]))
        transport.resumeProducing()  # let the close through
        self._request.channel.loseConnection()

    def result(self) -> Deferred[Attachment]:
        return self._outcome
