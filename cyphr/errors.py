"""
The contract's errors.

Raise an ApiError (or a subclass) anywhere below the HTTP layer; one place
(cyphr.api.http) turns it into the contract's JSON:
``{"success": false, "error": ..., "code": ..., "details": {...}}``.
Anything else that escapes a route is logged with its traceback and answered
with a bare 500.
"""

from __future__ import annotations

from typing import Any, Mapping

# Error codes of the contract (the OpenAPI and AsyncAPI documents in
# cyphr/api/), in one place so that clients and tests can rely on
# the spelling.
BAD_REQUEST = "BAD_REQUEST"
INVALID_JSON = "INVALID_JSON"
INVALID_BODY = "INVALID_BODY"
UNAUTHORIZED = "UNAUTHORIZED"
FORBIDDEN = "FORBIDDEN"
NOT_FOUND = "NOT_FOUND"
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
CONFLICT = "CONFLICT"
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
RATE_LIMITED = "RATE_LIMITED"
CORS_ORIGIN_DENIED = "CORS_ORIGIN_DENIED"
INTERNAL_ERROR = "INTERNAL_ERROR"
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
SERVER_BUSY = "SERVER_BUSY"            # 503: every connection the process may hold is taken
REQUEST_TIMEOUT = "REQUEST_TIMEOUT"    # 408: the request did not arrive whole in time

MISSING_FIELD = "MISSING_FIELD"
INVALID_FIELD = "INVALID_FIELD"
UNKNOWN_FIELD = "UNKNOWN_FIELD"
INVALID_QUERY = "INVALID_QUERY"

INVALID_TOKEN = "INVALID_TOKEN"
TOKEN_EXPIRED = "TOKEN_EXPIRED"
TOKEN_REVOKED = "TOKEN_REVOKED"

INVALID_CYPHR_ID = "INVALID_CYPHR_ID"
USER_NOT_FOUND = "USER_NOT_FOUND"
CYPHR_ID_TAKEN = "CYPHR_ID_TAKEN"
INVALID_CHALLENGE = "INVALID_CHALLENGE"
INVALID_SIGNATURE = "INVALID_SIGNATURE"
DEVICE_MISMATCH = "DEVICE_MISMATCH"
TOTP_REQUIRED = "TOTP_REQUIRED"
INVALID_TOTP = "INVALID_TOTP"
TOTP_CODE_USED = "TOTP_CODE_USED"    # a right code whose step (or a later one) was used already
INVALID_KYBER_KEY = "INVALID_KYBER_KEY"
INVALID_KEY_SIGNATURE = "INVALID_KEY_SIGNATURE"
PREKEY_LIMIT = "PREKEY_LIMIT"
DUPLICATE_KEY_ID = "DUPLICATE_KEY_ID"
TOTP_ALREADY_ENABLED = "TOTP_ALREADY_ENABLED"
TOTP_NOT_ENABLED = "TOTP_NOT_ENABLED"
INVALID_STELLAR_ADDRESS = "INVALID_STELLAR_ADDRESS"
# v2 signatures (docs/encryption.rst).
STATEMENT_MISMATCH = "STATEMENT_MISMATCH"
UNSUPPORTED_SIGNATURE_VERSION = "UNSUPPORTED_SIGNATURE_VERSION"
KEY_EXPIRED = "KEY_EXPIRED"
STALE_KEY = "STALE_KEY"
PIN_BACKUP_NOT_FOUND = "PIN_BACKUP_NOT_FOUND"
HISTORY_BACKUP_NOT_FOUND = "HISTORY_BACKUP_NOT_FOUND"  # 404: the identity keeps no history backup
# Devices (docs/encryption.rst, "Devices").
DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"  # 404: the caller's identity has no such device
DEVICE_LIMIT = "DEVICE_LIMIT"          # 409: the identity has as many devices as it may
LAST_DEVICE = "LAST_DEVICE"            # 409: an identity keeps at least one device
DEVICES_CHANGED = "DEVICES_CHANGED"    # 409: a message sealed for other devices than the chat's
# Linking a device (docs/encryption.rst, "Linking a device").
PROVISION_NOT_FOUND = "PROVISION_NOT_FOUND"  # 404: unknown, expired or used provisioning, or a wrong secret
INVALID_LINK_TOKEN = "INVALID_LINK_TOKEN"    # 401: no unexpired, unused link of that account has this token
DEVICE_EXISTS = "DEVICE_EXISTS"              # 409: the fingerprint is already a device of the identity
IDENTITY_DH_MISMATCH = "IDENTITY_DH_MISMATCH"  # 409: the identity has another X25519 key for sessions
# Group rosters (docs/encryption.rst, "Group rosters").
ROSTER_CONFLICT = "ROSTER_CONFLICT"  # 409: the change is not for the roster's next epoch
ROSTER_REFUSED = "ROSTER_REFUSED"    # 409: the change does not apply to the roster (details.reason)
ROSTER_IN_USE = "ROSTER_IN_USE"      # 409: the group's members change by signed roster changes only

CHAT_NOT_FOUND = "CHAT_NOT_FOUND"
MESSAGE_NOT_FOUND = "MESSAGE_NOT_FOUND"
NOT_SENDER = "NOT_SENDER"
NOT_ADMIN = "NOT_ADMIN"
NOT_A_GROUP = "NOT_A_GROUP"
NOT_A_MEMBER = "NOT_A_MEMBER"
ALREADY_MEMBER = "ALREADY_MEMBER"
LAST_ADMIN = "LAST_ADMIN"
MESSAGE_DELETED = "MESSAGE_DELETED"
NOT_EDITABLE = "NOT_EDITABLE"  # 409: sent over sessions, or its body gone: send a new message
WALLET_NOT_LINKED = "WALLET_NOT_LINKED"
# Attachments (TUS uploads under /api/attachments/)
ATTACHMENT_NOT_FOUND = "ATTACHMENT_NOT_FOUND"  # 404: unknown, unfinished, expired or deleted: one answer for each
ATTACHMENT_TOO_LARGE = "ATTACHMENT_TOO_LARGE"  # 413: Upload-Length over max_attachment, or a PATCH past it
ATTACHMENT_QUOTA = "ATTACHMENT_QUOTA"          # 413: the user's attachments would exceed attachment_quota
TOO_MANY_UPLOADS = "TOO_MANY_UPLOADS"          # 409: max_pending_uploads unfinished uploads already
UPLOAD_CONFLICT = "UPLOAD_CONFLICT"            # 409: Upload-Offset is not the upload's, or another PATCH holds it
UNSUPPORTED_TUS_VERSION = "UNSUPPORTED_TUS_VERSION"  # 412: Tus-Resumable is not 1.0.0
RANGE_NOT_SATISFIABLE = "RANGE_NOT_SATISFIABLE"  # 416: a Range outside the blob
INVALID_ATTACHMENT = "INVALID_ATTACHMENT"      # 400: a message names an attachment that is not the sender's, finished and live
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"        # 503: the blob store failed; the upload resumes from its offset


class ApiError(Exception):
    """
    A failure the client is told about: an HTTP status, a stable code and a
    human readable message. ``details`` must never hold anything secret.
    """

    status = 400
    code = BAD_REQUEST
    message = "Bad request"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if message is not None:
            self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = dict(details) if details else None
        self.headers = dict(headers) if headers else {}
        super().__init__(self.message)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "success": False,
            "error": self.message,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class BadRequest(ApiError):
    status = 400
    code = BAD_REQUEST
    message = "Bad request"


class InvalidJson(BadRequest):
    code = INVALID_JSON
    message = "The request body is not valid JSON"


class Unauthorized(ApiError):
    status = 401
    code = UNAUTHORIZED
    message = "Authentication required"


class Forbidden(ApiError):
    status = 403
    code = FORBIDDEN
    message = "Not allowed"


class NotFound(ApiError):
    status = 404
    code = NOT_FOUND
    message = "Not found"


class MethodNotAllowed(ApiError):
    status = 405
    code = METHOD_NOT_ALLOWED
    message = "Method not allowed"


class Conflict(ApiError):
    status = 409
    code = CONFLICT
    message = "Conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = PAYLOAD_TOO_LARGE
    message = "The request body is too large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = UNSUPPORTED_MEDIA_TYPE
    message = "The request body must be JSON (Content-Type: application/json)"


class RateLimited(ApiError):
    status = 429
    code = RATE_LIMITED
    message = "Too many requests"

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(
            message,
            details={"retryAfter": retry_after},
            headers={"Retry-After": str(retry_after)},
        )


class InternalError(ApiError):
    """The bare answer for an unexpected exception: no details, ever."""

    status = 500
    code = INTERNAL_ERROR
    message = "Internal server error"


class DatabaseUnavailable(ApiError):
    """The database does not answer; the request changed nothing it knows of."""

    status = 503
    code = DATABASE_UNAVAILABLE
    message = "The database is unavailable, try again shortly"
