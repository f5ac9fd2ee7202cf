"""
Attachments: blobs that clients encrypted (docs/encryption.rst,
"Attachments"), uploaded resumably (TUS 1.0, cyphr.api.attachments) into a
blob store (cyphr.blobs), downloaded by any signed-in user who knows the
id, named by the messages that carry their pointers, and removed when they
expire, when the last message naming them is deleted, when their uploader
deletes them or their account.

The server learns a blob's length, its uploader and when; never what it
holds. Ids are 128 random bits: an id is a capability to download, never
listed anywhere. Every answer about an id that is not served (unknown,
unfinished, expired, deleted) is the same 404.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cyphr.blobs import BLOB_ID, BlobStore, BlobStoreError, BlobWriter, Durable, Flow
from cyphr.clock import now_ms
from cyphr.errors import (
    ATTACHMENT_NOT_FOUND,
    ATTACHMENT_QUOTA,
    ATTACHMENT_TOO_LARGE,
    INVALID_ATTACHMENT,
    STORE_UNAVAILABLE,
    TOO_MANY_UPLOADS,
    UPLOAD_CONFLICT,
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.ratelimit import RateLimit
from cyphr.store.attachments import Attachment, AttachmentStore, QuotaRefused

_log = Logger()
MiB = 1024 * 1024
# An append holds its upload for this long, renewed while it runs: a node
# that dies mid-append frees the upload for a retry within a minute.
HOLD_SECONDS = 60
MAX_ATTACHMENTS_PER_MESSAGE = 32


def not_found() -> NotFound:
    return NotFound("No such attachment", code=ATTACHMENT_NOT_FOUND)


def store_unavailable(e: Exception) -> ApiError:
    _log.warn("The blob store failed: {error}", error=str(e))
    return ApiError("The attachment store is unavailable, try again shortly (an upload "
                    "resumes from its offset)", code=STORE_UNAVAILABLE, status=503,
                    headers={"Retry-After": "5"})


@dataclass(frozen=True)
class AttachmentLimits:
    max_size: int
    quota: int
    max_pending: int
    upload_expiry: int  # seconds
    retention_days: int  # 0: kept

    def to_json(self) -> dict[str, Any]:
        return {"maxSize": self.max_size, "quota": self.quota, "maxPendingUploads": self.max_pending,
                "uploadExpirySeconds": self.upload_expiry, "retentionDays": self.retention_days,
                "maxAttachmentsPerMessage": MAX_ATTACHMENTS_PER_MESSAGE}


@dataclass
class AttachmentStats:
    uploads_begun: int = 0
    uploads_completed: int = 0
    uploads_in_progress: int = 0  # appends running in this process
    upload_bytes: int = 0
    download_bytes: int = 0
    removed: int = 0
    stored_count: int = 0  # finished and kept, as of the last clean-up
    stored_bytes: int = 0


class Append:
    """One PATCH's append: the held upload and its writer. ``finish()``
    records what became durable and lets the upload go."""

    def __init__(self, handler: AttachmentsHandler, attachment: Attachment,
                 writer: BlobWriter) -> None:
        self._handler = handler
        self.attachment = attachment
        self.writer = writer
        self.allowed = attachment.length - attachment.received  # bytes this append may add
        self.received = 0
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = handler.clock
        self._renewal.start(HOLD_SECONDS / 3, now=False)
        self._finished: Deferred[Attachment] | None = None

    def _renew(self) -> Deferred[None]:
        until = now_ms(self._handler.clock) + HOLD_SECONDS * 1000
        d = Deferred.fromCoroutine(self._handler.store.extend(self.attachment.id, until))
        return d.addErrback(lambda f: _log.failure("Renewing an upload's hold failed", f))

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self.writer.write(data)

    def finish(self) -> Deferred[Attachment]:
        """Once: make the bytes durable, record the offset (and the
        completion, when the length is reached). Fails with ApiError."""
        if self._finished is None:
            if self._renewal.running:
                self._renewal.stop()
            self._finished = Deferred.fromCoroutine(self._handler.end_append(self))
        return self._finished


class AttachmentsHandler:
    def __init__(self, store: AttachmentStore, blobs: BlobStore, clock: Any, limits: AttachmentLimits,
                 count_limit: RateLimit, bytes_limit: RateLimit) -> None:
        self.store = store
        self.blobs = blobs
        self.clock = clock
        self.limits = limits
        self._count_limit = count_limit
        self._bytes_limit = bytes_limit
        self.stats = AttachmentStats()

    # -- uploads ---------------------------------------------------------

    async def create(self, user: AuthUser, length: int) -> Attachment:
        """A new upload of ``length`` bytes (TUS creation), within the
        user's limits: its size, the rate of uploads and of bytes, the
        unfinished uploads, the quota."""
        if length > self.limits.max_size:
            raise PayloadTooLarge(f"An attachment is at most {self.limits.max_size} bytes",
                                  code=ATTACHMENT_TOO_LARGE, details={"limit": self.limits.max_size})
        self._count_limit.hit(user.user_id)
        self._bytes_limit.hit(user.user_id, max(1, math.ceil(length / MiB)))
        attachment_id = os.urandom(16).hex()
        now = now_ms(self.clock)
        expires_at = now + self.limits.upload_expiry * 1000
        try:
            state = await self.blobs.begin(attachment_id, length)
        except BlobStoreError as e:
            raise store_unavailable(e) from None
        try:
            await self.store.create(attachment_id, user.user_id, length, state, now, expires_at,
                                    max_pending=self.limits.max_pending, quota=self.limits.quota)
        except BaseException as e:
            await self._discard(attachment_id, state)
            if isinstance(e, QuotaRefused):
                if e.reason == "pending":
                    raise Conflict(f"At most {self.limits.max_pending} uploads may be unfinished at"
                                   " once: finish or delete one first", code=TOO_MANY_UPLOADS,
                                   details={"limit": self.limits.max_pending}) from None
                raise PayloadTooLarge(
                    "This upload would take the account's attachments past its quota",
                    code=ATTACHMENT_QUOTA,
                    details={"quota": self.limits.quota, "used": e.usage.stored}) from None
            raise
        self.stats.uploads_begun += 1
        return Attachment(attachment_id, user.user_id, length, 0, state, now, None, expires_at,
                          None, None)

    async def _discard(self, attachment_id: str, state: dict[str, Any]) -> None:
        try:
            await self.blobs.delete(attachment_id, state)
        except BlobStoreError as e:
            _log.warn("Could not remove a refused upload's blob: {error}", error=str(e))

    async def status(self, user: AuthUser, attachment_id: str) -> Attachment:
        """An upload of the user's (TUS HEAD): its offset and length;
        finished or not, while it is served. One whose bytes are all in but
        whose completion failed (the store failed then) is completed now,
        or the answer is 503: an offset equal to the length tells a client
        it is done."""
        attachment = await self._find(attachment_id)
        if attachment.owner_id != user.user_id:
            raise not_found()
        if not attachment.complete and attachment.received == attachment.length:
            attachment = await self._complete(attachment, held=False)
        return attachment

    async def _find(self, attachment_id: str) -> Attachment:
        if not BLOB_ID.fullmatch(attachment_id):
            raise not_found()
        attachment = await self.store.get(attachment_id)
        if attachment is None or not attachment.live(now_ms(self.clock)):
            raise not_found()
        return attachment

    async def begin_append(self, user: AuthUser, attachment_id: str, offset: int,
                           flow: Flow) -> Append:
        """Hold the user's upload for one append at ``offset`` (its durable
        offset): 409 at another offset or while another append holds it."""
        if not BLOB_ID.fullmatch(attachment_id):
            raise not_found()
        now = now_ms(self.clock)
        attachment = await self.store.hold(attachment_id, user.user_id, offset, now,
                                           now + HOLD_SECONDS * 1000)
        if attachment is None:
            found = await self.store.get(attachment_id)
            if found is None or found.owner_id != user.user_id or not found.live(now):
                raise not_found()
            if found.complete:
                raise Conflict("The upload is finished", code=UPLOAD_CONFLICT,
                               details={"offset": found.received})
            if found.received != offset:
                raise Conflict(f"The upload's offset is {found.received}, not {offset}",
                               code=UPLOAD_CONFLICT, details={"offset": found.received})
            raise Conflict("Another request is appending to this upload", code=UPLOAD_CONFLICT,
                           details={"offset": found.received})
        try:
            writer = await self.blobs.append(attachment_id, attachment.state, offset, flow)
        except BaseException as e:
            await self.store.release(attachment_id)
            if isinstance(e, BlobStoreError):
                raise store_unavailable(e) from None
            raise
        self.stats.uploads_in_progress += 1
        return Append(self, attachment, writer)

    async def end_append(self, append: Append) -> Attachment:
        self.stats.uploads_in_progress -= 1
        attachment = append.attachment
        try:
            durable: Durable = await append.writer.finish()
        except BaseException as e:
            await self.store.release(attachment.id)
            if isinstance(e, BlobStoreError):
                raise store_unavailable(e) from None
            raise
        self.stats.upload_bytes += durable.offset - attachment.received
        attachment = replace(attachment, received=durable.offset, state=durable.state)
        if durable.offset < attachment.length:
            await self.store.appended(attachment.id, durable.offset, durable.state)
            return attachment
        return await self._complete(attachment, held=True)

    async def _complete(self, attachment: Attachment, *, held: bool) -> Attachment:
        """Make the blob whole (the store's ``complete`` may be repeated)
        and record it finished; ``held``: by the append that holds it (the
        hold goes either way). A store failure is 503, the bytes kept."""
        try:
            await self.blobs.complete(attachment.id, attachment.state, attachment.length)
        except BlobStoreError as e:
            if held:
                await self.store.appended(attachment.id, attachment.received, attachment.state)
            raise store_unavailable(e) from None
        now = now_ms(self.clock)
        days = self.limits.retention_days
        expires_at = now + days * 86_400_000 if days else None
        await self.store.appended(attachment.id, attachment.received, attachment.state, now,
                                  expires_at)
        self.stats.uploads_completed += 1
        return replace(attachment, completed_at=now, expires_at=expires_at)

    async def terminate(self, user: AuthUser, attachment_id: str) -> None:
        """The uploader deletes an attachment, finished or not (TUS
        termination): no longer served; the clean-up removes its blob."""
        if not BLOB_ID.fullmatch(attachment_id):
            raise not_found()
        if not await self.store.terminate(attachment_id, user.user_id, now_ms(self.clock)):
            raise not_found()

    # -- downloads -------------------------------------------------------

    async def download(self, attachment_id: str) -> Attachment:
        """A finished attachment, for any signed-in user who names its id."""
        attachment = await self._find(attachment_id)
        if not attachment.complete:
            raise not_found()
        return attachment

    # -- messages --------------------------------------------------------

    async def check_named(self, user: AuthUser, attachment_ids: list[str], *,
                          field: str = "attachments") -> None:
        """Refuse a message (or an avatar) naming an attachment that is not
        the user's, unfinished, or no longer served (400, with the ids)."""
        refused = await self.store.unusable(user.user_id, attachment_ids, now_ms(self.clock))
        if refused:
            raise BadRequest(f"{field} may name only finished attachments its sender uploaded",
                             code=INVALID_ATTACHMENT, details={"field": field, "attachments": refused})

    async def avatar_changed(self, user: AuthUser, old: str | None, new: str | None) -> None:
        """The user's avatarUrl changed from ``old`` to ``new``: an
        attachment that is the avatar is kept while it is; one that no
        longer is expires as any other."""
        def attachment(value: str | None) -> str | None:
            return value if value is not None and BLOB_ID.fullmatch(value) else None
        old, new = attachment(old), attachment(new)
        if old is not None or new is not None:
            await self.store.avatar_changed(user.user_id, old, new,
                                            self.limits.retention_days * 86_400_000)

    # -- the clean-up ----------------------------------------------------

    async def clean(self, now: int, batch: int) -> int:
        """Mark what is due as gone, then remove the blobs of what is gone
        (and their rows). A blob the store fails to remove stays marked and
        is tried again next time. Answers how many went."""
        await self.store.mark_gone(now, batch)
        removed = 0
        for attachment in await self.store.gone(batch):
            try:
                await self.blobs.delete(attachment.id, attachment.state)
            except BlobStoreError as e:
                _log.warn("Could not remove an attachment's blob (tried again later): {error}",
                          error=str(e))
                continue
            if await self.store.forget(attachment.id):
                removed += 1
        self.stats.removed += removed
        self.stats.stored_count, self.stats.stored_bytes = await self.store.stored()
        return removed
