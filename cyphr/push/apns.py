"""
Apple Push Notification service (APNs) wake-ups, over HTTP/2 with token
authentication.

A registration names a device token (hex, as the app got it from
``registerForRemoteNotifications``), the app's bundle id (the APNs topic;
the sender's default topic when it names none) and whether the app runs
against the sandbox (a development build). A wake-up is an alert that the
app's notification service extension replaces once it has synced (hence
``mutable-content``); its text is a localization key with fallback text,
and the only data in it is the drain's payload, the per-device counter:
no sender, no chat, no content.

Every request carries a provider token: an ES256 JWT naming the key id
(``kid``) and the team (``iss``), signed with the operator's ``.p8`` key.
Apple refuses a token older than an hour (403 ExpiredProviderToken) and
one replaced more often than every 20 minutes (429
TooManyProviderTokenUpdates), so one token is used for TOKEN_REFRESH (40
minutes), then signed anew; on ExpiredProviderToken (our clock is off, or
Apple's) it is signed anew at once and the push tried once more.

Twisted has no HTTP/2 client, and APNs speaks nothing else: requests go
through synchronous httpx clients on a small thread pool of their own
(THREADS), so that the reactor never waits on the network. Each thread has
its own client, which keeps one HTTP/2 connection per host (production,
sandbox) for all the pushes that thread sends, one at a time: httpx's
synchronous HTTP/2 connection is not safe to share between threads (it
reads and writes one TLS connection from two threads at once, which
OpenSSL does not allow: pushes fail at random with "Server disconnected").
So up to THREADS pushes go at once, over up to THREADS connections per
host, as Apple allows. A push's result comes back as a Deferred that never
fails; it comes by ``timeout`` seconds whatever the network does (the
request itself may go on for a while on its thread, until the client's own
time-outs end it).
"""

from __future__ import annotations

import json
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from cyphr.cpu import CpuPool
from cyphr.push.webpush import MAX_TTL, PushResult, retry_after_seconds, b64url_encode
from cyphr.store.push import Registration

_log = Logger()

PRODUCTION = "https://api.push.apple.com"
SANDBOX = "https://api.sandbox.push.apple.com"

# A provider token is used this long, then signed anew: Apple refuses one
# older than 60 minutes and a new one more often than every 20.
TOKEN_REFRESH = 40 * 60

# What APNs takes in a (non-VoIP) notification's body.
MAX_PAYLOAD = 4096
# apns-collapse-id: at most 64 bytes.
MAX_COLLAPSE_ID = 64
# Pushes at once (and connections per host): a push takes one round trip
# to Apple, so a few threads send tens to hundreds a second.
THREADS = 4

# The alert a wake-up shows until the app's notification service
# extension has synced and replaced it (or when it cannot).
WAKE_UP_APS: Mapping[str, Any] = {
    "alert": {"loc-key": "NEW_MESSAGE", "body": "New message"},
    "mutable-content": 1,
    "sound": "default",
}

# Device tokens are 32 bytes today; Apple says they may grow. Hex only: the
# token goes into the request's path.
_DEVICE_TOKEN = re.compile(r"(?:[0-9A-Fa-f]{2}){8,256}")
# A bundle id, with the suffixes of some push types (.voip, .complication,
# .push-type.liveactivity).
_APNS_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
# Apple's key and team ids are 10 characters; anything else is a mistake
# in the configuration (a file name, say).
_APPLE_ID = re.compile(r"[A-Za-z0-9]{1,64}")
# Apple's reasons are single CamelCase words; anything else is not logged.
_REASON = re.compile(r"[A-Za-z]{1,64}")

_EXPIRED_PROVIDER_TOKEN = "ExpiredProviderToken"


def result_for(status: int, reason: str | None, retry_after: float | None = None) -> PushResult:
    """The result of an APNs answer (see cyphr.push.webpush.PushResult):
    2xx sent; 410, and 400 BadDeviceToken or DeviceTokenNotForTopic, gone
    (a sandbox token sent to production is a BadDeviceToken too); 429 and
    5xx retried; anything else (our request or our token was bad)
    refused. The reason is Apple's, else the status."""
    text = reason if reason is not None and _REASON.fullmatch(reason) else f"HTTP {status}"
    if 200 <= status < 300:
        return PushResult("sent", status, text)
    if status == 410 or (status == 400 and reason in ("BadDeviceToken", "DeviceTokenNotForTopic")):
        return PushResult("gone", status, text)
    if status == 429 or 500 <= status < 600:
        return PushResult("retry", status, text, retry_after)
    return PushResult("refused", status, text)


# -- the provider token -----------------------------------------------------------


@dataclass(frozen=True)
class _Signed:
    issued: float
    authorization: str


class ProviderToken:
    """
    The operator's APNs signing key (the ``.p8`` file: a P-256 key in
    PKCS#8 PEM), its key id and the team id, and the provider token signed
    with them, kept for TOKEN_REFRESH. Used on the reactor thread only.
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
                key.curve, ec.SECP256R1):
            raise ValueError("an APNs signing key is a P-256 private key")
        for name, value in (("key id", key_id), ("team id", team_id)):
            if not isinstance(value, str) or not _APPLE_ID.fullmatch(value):
                raise ValueError(f"the APNs {name} is not an Apple id (letters and digits)")
        self._key = key
        self._header = _b64json({"alg": "ES256", "kid": key_id})
        self._team_id = team_id
        self._signed: _Signed | None = None

    @classmethod
    def from_pem(cls, pem: bytes | str, key_id: str, team_id: str) -> ProviderToken:
        """From the ``.p8`` file's text (unencrypted PEM, PKCS#8 or SEC 1)."""
        if isinstance(pem, str):
            pem = pem.encode("ascii")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (TypeError, ValueError):
            raise ValueError("the APNs key is not an unencrypted PEM private key") from None
        return cls(key, key_id, team_id)  # type: ignore[arg-type]  # checked there

    def authorization(self, now: float) -> str:
        """``bearer <jwt>``: the token in use, or one signed anew with
        ``iat`` now when it is TOKEN_REFRESH old (or the clock went back)."""
        signed = self._signed
        if signed is None or not signed.issued <= now < signed.issued + TOKEN_REFRESH:
            signed = self._signed = _Signed(now, "bearer " + self._sign(int(now)))
        return signed.authorization

    def expired(self, authorization: str) -> None:
        """APNs called this token expired: the next one is signed anew
        (unless another push that was told so already had it replaced)."""
        if self._signed is not None and self._signed.authorization == authorization:
            self._signed = None

    def _sign(self, iat: int) -> str:
        """An ES256 JWT (RFC 7515, RFC 7518 3.4: the signature is r || s)."""
        signing_input = self._header + "." + _b64json({"iss": self._team_id, "iat": iat})
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + b64url_encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _b64json(value: dict[str, Any]) -> str:
    return b64url_encode(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def wake_up_body(payload: bytes) -> bytes:
    """The notification's JSON: WAKE_UP_APS as ``aps``, and the fields of
    ``payload`` (a JSON object, ``{"n": <counter>}`` from the drain) beside
    it. ValueError when the payload is not such an object, or the body
    would be over MAX_PAYLOAD bytes."""
    try:
        fields = json.loads(payload)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise ValueError("an APNs payload is a JSON object") from None
    if not isinstance(fields, dict) or "aps" in fields:
        raise ValueError("an APNs payload is a JSON object without aps")
    body = json.dumps({"aps": WAKE_UP_APS, **fields}, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_PAYLOAD:
        raise ValueError(f"an APNs notification holds at most {MAX_PAYLOAD} bytes")
    return body


# -- sending ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str | None
    retry_after: str | None


# What the network does to a request (httpx wraps h2's and the socket's
# errors); anything else is a bug of ours, logged. CancelledError: the
# push was given up at the deadline.
_NETWORK_ERRORS = (httpx.TransportError, OSError, CancelledError)


class ApnsSender:
    """
    Sends wake-ups to APNs (cyphr.handlers.push.Sender).

    ``key_pem`` is the ``.p8`` file's text, ``key_id`` its id and
    ``team_id`` the team's. ``topic`` is the bundle id for registrations
    that name none (None: such a registration is refused). ``endpoint``
    and ``sandbox_endpoint`` are the base URLs of production and sandbox
    APNs; ``verify`` a CA bundle's path to check their certificates with,
    instead of the usual roots (tests). ``timeout`` bounds a whole push,
    ``connect_timeout`` the connection. ``clock`` (the reactor unless
    given) dates the provider token and apns-expiration.
    """

    def __init__(self, reactor: Any, key_pem: bytes | str, key_id: str, team_id: str, *,
                 topic: str | None = None, endpoint: str = PRODUCTION,
                 sandbox_endpoint: str = SANDBOX, verify: str | bool = True,
                 timeout: float = 10.0, connect_timeout: float = 5.0,
                 clock: Any = None) -> None:
        if topic is not None and not _APNS_TOPIC.fullmatch(topic):
            raise ValueError("the default APNs topic is not a bundle id")
        if verify is False:
            raise ValueError("APNs certificates are always verified")
        self._reactor = reactor
        self._clock = reactor if clock is None else clock
        self._token = ProviderToken.from_pem(key_pem, key_id, team_id)
        self._topic = topic
        self._endpoints = {False: endpoint.rstrip("/"), True: sandbox_endpoint.rstrip("/")}
        self._timeout = timeout
        # One context for every thread's client (the CA bundle read once).
        context = (ssl.create_default_context(cafile=verify) if isinstance(verify, str)
                   else httpx.create_ssl_context(trust_env=False))
        self._client_options: dict[str, Any] = dict(
            http1=False, http2=True, verify=context,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            # No proxy or CA bundle from the environment: as the rest of
            # the server, APNs is reached directly, checked as configured.
            trust_env=False, follow_redirects=False)
        self._local = threading.local()  # each pool thread's client
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()
        self._pool = CpuPool(reactor, threads=THREADS, name="cyphr-apns")
        self._working: set[Deferred[Any]] = set()  # requests on the threads
        self._idle: list[Deferred[None]] = []
        self._closed = False

    def send(self, registration: Registration, payload: bytes, *, ttl: int,
             topic: str) -> Deferred[PushResult]:
        """
        Push a wake-up to a registration of cyphr.store.push (``token``,
        ``app_id``, ``sandbox``), with ``payload``'s fields (see
        wake_up_body), kept by APNs for ``ttl`` seconds for a device that
        is off (0: delivered now or never), and ``topic`` as its collapse
        id (a later one replaces it while it waits).

        Raises ValueError at once for arguments that are never valid (a
        caller's mistake); the Deferred never fails: whatever becomes of
        the push is a PushResult.
        """
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL:
            raise ValueError(f"a TTL is a whole number of seconds from 0 to {MAX_TTL}")
        if (not isinstance(topic, str) or not topic.isascii() or not topic.isprintable()
                or not 0 < len(topic) <= MAX_COLLAPSE_ID):
            raise ValueError(f"a collapse id is 1 to {MAX_COLLAPSE_ID} printable ASCII characters")
        body = wake_up_body(payload)

        apns_topic = registration.app_id or self._topic
        if apns_topic is None:
            return succeed(PushResult("refused", None, "no APNs topic: no app id and no default"))
        if not _APNS_TOPIC.fullmatch(apns_topic):
            return succeed(PushResult("refused", None, "the app id is not a bundle id"))
        token = registration.token
        if not isinstance(token, str) or not _DEVICE_TOKEN.fullmatch(token):
            # What APNs would answer (without our sending it a path).
            return succeed(PushResult("gone", None, "BadDeviceToken"))
        if self._closed:
            return succeed(PushResult("retry", None, "the APNs sender is closed"))

        now = self._clock.seconds()
        url = f"{self._endpoints[bool(registration.sandbox)]}/3/device/{token.lower()}"
        headers = {
            "apns-topic": apns_topic,
            "apns-push-type": "alert",
            "apns-priority": "10",
            # 0: APNs tries once and keeps nothing; a date: until then.
            "apns-expiration": str(int(now) + ttl if ttl else 0),
            "apns-collapse-id": topic,
            "content-type": "application/json",
        }
        d = Deferred.fromCoroutine(self._push(url, headers, body))
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out)
        return d.addErrback(self._failed)

    async def _push(self, url: str, headers: dict[str, str], body: bytes) -> PushResult:
        authorization = self._token.authorization(self._clock.seconds())
        answer = await self._request(url, {**headers, "authorization": authorization}, body)
        if answer.status == 403 and answer.reason == _EXPIRED_PROVIDER_TOKEN:
            self._token.expired(authorization)
            authorization = self._token.authorization(self._clock.seconds())
            answer = await self._request(url, {**headers, "authorization": authorization}, body)
        return result_for(answer.status, answer.reason,
                          retry_after_seconds(None if answer.retry_after is None
                                       else answer.retry_after.encode("latin-1", "replace"),
                                       self._clock.seconds()))

    def _request(self, url: str, headers: dict[str, str], body: bytes) -> Deferred[_Answer]:
        """The request, on the pool. What the push awaits is apart from the
        work itself, so that a push given up at the deadline lets its
        thread's request run on (and end) unseen."""
        work = self._pool.run(self._post, url, headers, body)
        self._working.add(work)
        answer: Deferred[_Answer] = Deferred()

        def done(result: Any) -> None:
            self._working.discard(work)
            # Ignored when the push was given up already. First: the push
            # may go on with another request (a refreshed token) that
            # close() must wait for too.
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)
            if not self._working:
                idle, self._idle = self._idle, []
                for waiting in idle:
                    waiting.callback(None)
        work.addBoth(done)
        return answer

    def _client(self) -> httpx.Client:
        """On a thread of the pool: the thread's own client."""
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(**self._client_options)
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _close_clients(self) -> None:
        """On a thread of the pool, once no request runs: close every
        thread's client (and so its connections)."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def _post(self, url: str, headers: dict[str, str], body: bytes) -> _Answer:
        """On a thread of the pool: the request, and Apple's answer."""
        response = self._client().post(url, headers=headers, content=body)
        reason = None
        if response.content:
            try:
                reason = json.loads(response.content).get("reason")
            except (ValueError, AttributeError, UnicodeDecodeError):
                pass
        return _Answer(response.status_code, reason if isinstance(reason, str) else None,
                       response.headers.get("retry-after"))

    @staticmethod
    def _timed_out(result: Any, timeout: float) -> PushResult:
        return PushResult("retry", None, "APNs did not answer in time")

    @staticmethod
    def _failed(failure: Failure) -> PushResult:
        if not failure.check(*_NETWORK_ERRORS):
            _log.failure("An APNs push failed unexpectedly", failure)
        # Class names only: an error's text may hold an address.
        return PushResult("retry", None, f"the request failed ({failure.type.__name__})")

    def idle(self) -> Deferred[None]:
        """Fires once no request is running on the threads (one given up
        at the deadline runs on until the client's time-outs end it)."""
        if not self._working:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def close(self) -> Deferred[None]:
        """Take no more pushes, wait for the requests running (bounded by
        the client's time-outs), then close the connections and end the
        threads."""
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.idle()
        with self._clients_lock:
            used = bool(self._clients)
        try:
            if used:
                await self._pool.run(self._close_clients)
        finally:
            self._pool.stop()
