"""
Firebase Cloud Messaging (the HTTP v1 API) wake-ups for Android devices: a
data-only message with nothing in it that matters, so that the app wakes
and syncs.

A registration names the device's FCM registration token (a capability:
whoever holds it and a key of the project can push to the device, so it is
never logged and never in a result) and, optionally, the Firebase project
it belongs to (``app_id``; else the service account's ``project_id``).

Every request carries an OAuth 2 access token for the firebase.messaging
scope, which google-auth gets from Google's token endpoint with the
operator's service account (a JWT-bearer grant signed with its RSA key).
google-auth blocks on its HTTP request, so a refresh runs on a small thread
pool of the sender's own, never on the reactor, and one refresh at a time
serves every push waiting for it. A token (Google's last an hour) is used
until TOKEN_MARGIN before it runs out; a 401 from FCM drops it, and the
push is made once more with a fresh one.

The message: ``{"message": {"token", "data": {"n": "<counter>"}, "android":
{"priority": "high", "ttl": "<ttl>s", "collapse_key": <topic>}}}``. No
``notification`` block: the system shows nothing, the app gets the data
(high priority, so a dozing device wakes for it) and fetches its messages
itself. The data map is the drain's payload, a flat JSON object, with every
value turned into a string, as FCM's data must be.

What FCM answers (its errors are ``{"error": {"code", "message", "status",
"details": [{"@type": ".../google.firebase.fcm.v1.FcmError", "errorCode"}]}}``)
is a PushResult of cyphr.push.webpush; see fcm_result().
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.oauth2 import service_account
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from cyphr.cpu import CpuPool
from cyphr.push.webpush import (
    NETWORK_ERRORS,
    IDLE_CONNECTION_TIMEOUT,
    MAX_ANSWER_SIZE,
    PERSISTENT_PER_HOST,
    PushResult,
    BytesBody,
    failure_reason,
    retry_after_seconds,
    result_for,
)

_log = Logger()

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_BASE_URL = "https://fcm.googleapis.com"
# An access token is refreshed this long before it runs out (or, for one
# that lives less than twice this, half-way through its life), so that one
# sent has minutes left on a service whose clock differs from ours.
TOKEN_MARGIN = 300.0
# What Google's tokens last, for an answer that does not say (none does).
DEFAULT_TOKEN_LIFETIME = 3600.0
# The token endpoint's request, on the thread pool (google-auth's own
# default is 120 s; it tries up to three times on 5xx).
TOKEN_REQUEST_TIMEOUT = 10.0
# FCM keeps a message at most 4 weeks, and refuses a longer TTL.
MAX_TTL = 28 * 24 * 3600
# What FCM takes in a message's data (keys and values).
MAX_DATA_SIZE = 4096

_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
# FCM's error codes that say "later" whatever the HTTP status.
_RETRY_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_OAUTH_ERROR = re.compile(r"[a-z][a-z0-9_]{0,63}")
# A Google Cloud project ID (6 to 30 characters, maybe behind a legacy
# "domain:"), or a project number: nothing that could change the URL's path.
_PROJECT = re.compile(r"(?:[a-z0-9.-]{1,63}:)?[a-z][a-z0-9-]{4,28}[a-z0-9]|[0-9]{1,20}")
_COLLAPSE_KEY = re.compile(r"[\x21-\x7e]{1,64}")
# FCM refuses these as data keys.
_RESERVED_KEYS = frozenset({"from", "message_type", "notification"})
_RESERVED_PREFIXES = ("google", "gcm")


def data_map(payload: bytes) -> dict[str, str]:
    """
    The drain's payload (a flat JSON object: ``{"n": 5}``) as FCM's data:
    the same keys, each value a string (a string as it is, anything else in
    JSON: ``"5"``). ValueError when it is not such an object, a key is one
    FCM reserves, or the whole is over MAX_DATA_SIZE.
    """
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("an FCM payload is a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError("an FCM payload is a JSON object")
    data: dict[str, str] = {}
    for key, item in value.items():
        if not key or key in _RESERVED_KEYS or key.lower().startswith(_RESERVED_PREFIXES):
            raise ValueError(f"FCM reserves the data key {key!r}")
        if isinstance(item, (dict, list)):
            raise ValueError("an FCM payload is a flat JSON object")
        data[key] = item if isinstance(item, str) else json.dumps(item)
    if sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in data.items()) > MAX_DATA_SIZE:
        raise ValueError(f"FCM data holds at most {MAX_DATA_SIZE} bytes")
    return data


def _error(body: bytes) -> tuple[str | None, bool]:
    """FCM's errorCode (else the error's status) in an error answer, or
    None; and whether the error is about the registration token (a
    BadRequest detail names ``message.token``, or the message says so, as
    FCM's "The registration token is not a valid FCM registration token")."""
    try:
        error = json.loads(body.decode("utf-8"))["error"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        return None, False
    if not isinstance(error, dict):
        return None, False
    code = error.get("status")
    names_token = "registration token" in str(error.get("message", "")).lower()
    details = error.get("details")
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == _FCM_ERROR and detail.get("errorCode"):
            code = detail["errorCode"]
        elif detail.get("@type") == _BAD_REQUEST:
            violations = detail.get("fieldViolations")
            for violation in violations if isinstance(violations, list) else []:
                if isinstance(violation, dict) and violation.get("field") == "message.token":
                    names_token = True
    # A code goes into logs and metrics: FCM's words only.
    if not isinstance(code, str) or not _ERROR_CODE.fullmatch(code):
        code = None
    return code, names_token


def fcm_result(status: int, body: bytes = b"", retry_after: float | None = None) -> PushResult:
    """
    The result of an FCM answer:

    - 2xx: ``sent``;
    - errorCode ``UNREGISTERED`` (FCM answers it 404), or 400
      ``INVALID_ARGUMENT`` about the registration token: ``gone``;
    - 408, 429, 5xx, or errorCode ``QUOTA_EXCEEDED``, ``UNAVAILABLE``,
      ``INTERNAL``: ``retry`` (after Retry-After, if any);
    - 401 (our access token refused, though the sender refreshed it once
      already), unless errorCode ``THIRD_PARTY_AUTH_ERROR``: ``retry``;
    - any other answer (a 404 that is not UNREGISTERED: a wrong project,
      say): ``refused``.

    The reason is the errorCode (else the status) or ``HTTP <status>``.
    """
    base = result_for(status, retry_after)
    if base.outcome == "sent":
        return base
    code, names_token = _error(body)
    reason = code or base.reason
    if code == "UNREGISTERED":
        return PushResult("gone", status, reason)
    if status == 400 and code == "INVALID_ARGUMENT" and names_token:
        return PushResult("gone", status, reason)
    if base.outcome == "retry" or code in _RETRY_CODES:
        return PushResult("retry", status, reason, retry_after)
    if status == 401 and code != "THIRD_PARTY_AUTH_ERROR":
        return PushResult("retry", status, reason)
    return PushResult("refused", status, reason)


def _stale_token(status: int, body: bytes) -> bool:
    """A 401 for our access token (not for the APNs or Web Push
    credentials of the Firebase project: THIRD_PARTY_AUTH_ERROR)."""
    return status == 401 and _error(body)[0] != "THIRD_PARTY_AUTH_ERROR"


# -- access tokens -----------------------------------------------------------


class TokenUnavailable(Exception):
    """No access token: the token endpoint refused (``retryable`` False:
    the key is revoked, the clock is off...) or could not be reached."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def _refresh(credentials: service_account.Credentials, request: Any) -> tuple[str, float]:
    """On the thread pool: a new access token and how many seconds it has
    left. google-auth's errors become TokenUnavailable, with the OAuth
    error code only (the rest may quote what the endpoint said)."""
    try:
        credentials.refresh(request)
    except google.auth.exceptions.RefreshError as e:
        response = e.args[1] if len(e.args) > 1 else None
        error = response.get("error") if isinstance(response, dict) else None
        word = error if isinstance(error, str) and _OAUTH_ERROR.fullmatch(error) else "refused"
        raise TokenUnavailable(f"no access token ({word})",
                               bool(getattr(e, "retryable", False))) from None
    except google.auth.exceptions.TransportError as e:
        raise TokenUnavailable(f"no access token ({type(e).__name__})", True) from None
    expiry = credentials.expiry
    if expiry is None:
        return credentials.token, DEFAULT_TOKEN_LIFETIME
    now = datetime.datetime.now(datetime.timezone.utc)
    if expiry.tzinfo is None:  # google-auth's: naive UTC
        now = now.replace(tzinfo=None)
    return credentials.token, (expiry - now).total_seconds()


class _AccessTokens:
    """The access token in use, and the one refresh under way (if any)
    that every push without a token waits for."""

    def __init__(self, reactor: Any, credentials: service_account.Credentials, pool: CpuPool,
                 request: Any) -> None:
        self._reactor = reactor
        self._credentials = credentials
        self._pool = pool
        self._request = request
        self._token: str | None = None
        self._renew_at = 0.0
        self._waiting: list[Deferred[str]] = []
        self.refreshing: Deferred[None] | None = None

    def get(self) -> Deferred[str]:
        """The token, or a fresh one (TokenUnavailable when there is none).
        Cancelling the Deferred stops the wait, not the refresh."""
        if self._token is not None and self._reactor.seconds() < self._renew_at:
            return succeed(self._token)
        waiter: Deferred[str] = Deferred(self._waiting.remove)
        self._waiting.append(waiter)
        if self.refreshing is None:
            # Set before the callback is added: a pool that runs inline
            # (tests) fires it at once, and _refreshed() clears it.
            self.refreshing = self._pool.run(_refresh, self._credentials, self._request)
            self.refreshing.addBoth(self._refreshed)
        return waiter

    def stale(self, token: str) -> None:
        """FCM refused ``token``: the next get() refreshes (unless another
        push has done it already)."""
        if self._token == token:
            self._token = None

    def _refreshed(self, result: tuple[str, float] | Failure) -> None:
        self.refreshing = None
        if isinstance(result, Failure):
            if not result.check(TokenUnavailable):
                _log.failure("Refreshing the FCM access token failed unexpectedly", result)
                result = Failure(TokenUnavailable(f"no access token ({result.type.__name__})", True))
            else:
                _log.warn("Could not get an FCM access token: {reason}", reason=result.value.reason)
        else:
            token, lifetime = result
            self._token = token
            self._renew_at = self._reactor.seconds() + lifetime - min(TOKEN_MARGIN, lifetime / 2)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result[0])


# -- sending -------------------------------------------------------------------


class _Read(Protocol):
    """Reads an answer's body, up to MAX_ANSWER_SIZE (past it, the
    connection is closed and the body counts as empty); closes the
    connection when cancelled (the push timed out)."""

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred(lambda _: self._abort())
        self._parts: list[bytes] | None = []
        self._size = 0

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._parts is None:
            return
        self._size += len(data)
        if self._size > MAX_ANSWER_SIZE:
            self._parts = None
            self._abort()
        else:
            self._parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The body ended, or was cut: the status is what counts most.
        if not self.done.called:
            self.done.callback(b"".join(self._parts or []))


class FcmSender:
    """
    Sends wake-ups through FCM's HTTP v1 API, as the service account
    ``service_account_info`` (its JSON file, read: ``project_id``,
    ``client_email``, ``private_key``, ``token_uri``...). ValueError when it
    is not a usable one.

    ``base_url`` is FCM's (tests: a stand-in); an ``agent`` given is used
    as it is (tests). ``timeout`` bounds a whole push: the access token if
    one must be got, connecting, sending, the answer; and each request to
    the token endpoint.
    """

    def __init__(self, reactor: Any, service_account_info: Mapping[str, Any], *,
                 base_url: str = FCM_BASE_URL, agent: Any = None, timeout: float = 10) -> None:
        info = dict(service_account_info)
        if info.get("type", "service_account") != "service_account":
            raise ValueError("the FCM credentials are not a service account's")
        project = info.get("project_id")
        if not isinstance(project, str) or not _PROJECT.fullmatch(project):
            raise ValueError("the service account has no valid project_id")
        for name in ("client_email", "private_key", "token_uri"):
            if not isinstance(info.get(name), str) or not info[name]:
                raise ValueError(f"the service account has no {name}")
        try:
            # google-auth takes any key here, and would fail at the first
            # refresh with one that is not RSA.
            key = serialization.load_pem_private_key(info["private_key"].encode("ascii"), None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("not RSA")
            credentials = service_account.Credentials.from_service_account_info(
                info, scopes=[FCM_SCOPE])
        except (ValueError, KeyError, TypeError, IndexError, UnicodeError):
            # Not the library's words: they might quote the key.
            raise ValueError("the service account's private_key is not a PEM RSA key") from None
        self._reactor = reactor
        self._project = project
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._cpu = CpuPool(reactor, threads=2, name="cyphr-fcm")
        self._session = requests.Session()
        request = functools.partial(google.auth.transport.requests.Request(self._session),
                                    timeout=min(timeout, TOKEN_REQUEST_TIMEOUT))
        self._tokens = _AccessTokens(reactor, credentials, self._cpu, request)
        self._pool: HTTPConnectionPool | None = None
        if agent is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = PERSISTENT_PER_HOST
            self._pool.cachedConnectionTimeout = IDLE_CONNECTION_TIMEOUT
            self._pool.retryAutomatically = False  # a POST is never retried anyway
            agent = Agent(reactor, connectTimeout=timeout, pool=self._pool)
        self._agent = agent

    def send(self, registration: Any, payload: bytes, *, ttl: int,
             topic: str) -> Deferred[PushResult]:
        """
        Push ``payload`` (a flat JSON object, see data_map) to a
        registration of cyphr.store.push (or anything with its ``token``
        and ``app_id``), as data only, with high priority, this TTL
        (seconds FCM keeps it for an offline device) and ``topic`` as its
        collapse key (a later one replaces it while it waits).

        Raises ValueError at once for arguments that are never valid (a
        caller's mistake); the Deferred never fails: whatever becomes of
        the push is a PushResult.
        """
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL:
            raise ValueError(f"a TTL is a whole number of seconds from 0 to {MAX_TTL}")
        if not isinstance(topic, str) or not _COLLAPSE_KEY.fullmatch(topic):
            raise ValueError("a collapse key is 1 to 64 printable ASCII characters")
        data = data_map(payload)

        token = registration.token
        if not isinstance(token, str) or not token:
            return succeed(PushResult("refused", None, "the registration has no token"))
        project = registration.app_id or self._project
        if not isinstance(project, str) or not _PROJECT.fullmatch(project):
            return succeed(PushResult("refused", None, "the app id is not a Firebase project ID"))
        body = json.dumps({"message": {
            "token": token,
            "data": data,
            "android": {"priority": "high", "ttl": f"{ttl}s", "collapse_key": topic},
        }}, separators=(",", ":")).encode("utf-8")
        url = f"{self._base_url}/v1/projects/{project}/messages:send".encode("ascii")

        d = Deferred.fromCoroutine(self._push(url, body))
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out)
        return d.addErrback(self._failed)

    async def _push(self, url: bytes, body: bytes) -> PushResult:
        for attempt in (1, 2):
            try:
                access = await self._tokens.get()
            except TokenUnavailable as e:
                return PushResult("retry" if e.retryable else "refused", None, e.reason)
            status, answer, retry_after = await self._post(url, access, body)
            if attempt == 1 and _stale_token(status, answer):
                self._tokens.stale(access)
                continue
            break
        return fcm_result(status, answer, retry_after)

    async def _post(self, url: bytes, access: str, body: bytes) -> tuple[int, bytes, float | None]:
        headers = Headers({
            b"Authorization": [b"Bearer " + access.encode("ascii")],
            b"Content-Type": [b"application/json; charset=UTF-8"],
        })
        response: IResponse = await self._agent.request(b"POST", url, headers, BytesBody(body))
        retry_after = retry_after_seconds(
            (response.headers.getRawHeaders(b"Retry-After") or [None])[0],
            self._reactor.seconds())
        # Read to its end (the error, or the message's name), so that the
        # connection can take the next push.
        reader = _Read()
        response.deliverBody(reader)
        return response.code, await reader.done, retry_after

    @staticmethod
    def _timed_out(result: Any, timeout: float) -> PushResult:
        return PushResult("retry", None, "FCM did not answer in time")

    @staticmethod
    def _failed(failure: Failure) -> PushResult:
        if not failure.check(*NETWORK_ERRORS):
            _log.failure("An FCM push failed unexpectedly", failure)
        return PushResult("retry", None, failure_reason(failure))

    def close(self) -> Deferred[None]:
        """Close the idle connections of the sender's own pool (not of an
        agent given), wait for a token refresh under way, then stop the
        thread pool; fires once all is done."""
        async def close() -> None:
            if self._pool is not None:
                await self._pool.closeCachedConnections()
            refreshing = self._tokens.refreshing
            if refreshing is not None:
                # Wait on the reactor: stopping the pool joins its threads.
                waited: Deferred[None] = Deferred()
                refreshing.addBoth(lambda _: waited.callback(None))
                await waited
            self._cpu.stop()
            self._session.close()
        return Deferred.fromCoroutine(close())
