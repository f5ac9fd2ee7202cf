"""
A strict stand-in for an RFC 8030 push service, on Twisted, for tests: it
listens on 127.0.0.1 (a port of the system's choice) and takes pushes the
way a real one does, but checks more, so that a test can assert that the
server's requests hold nothing a push service could refuse.

Each subscription it makes has its own P-256 key pair and auth secret, as a
browser's does, so that a push is decrypted (RFC 8291, implemented here
apart from cyphr.push.webpush, so that the one checks the other) and its
plaintext recorded. Every push must carry a valid VAPID token (RFC 8292:
ES256, signed with the ``k`` key, ``aud`` this service's origin, ``exp``
ahead but not more than 24 hours, a ``sub``), a TTL, and a valid Urgency
and Topic if any. A well-formed push is recorded in ``received`` and
answered 201, or as the test said for its subscription (404, 410, 429 with
Retry-After, 500, or no answer at all); anything malformed is answered 400
and its fault recorded in ``errors``.

    service = PushService(reactor)
    service.start()
    self.addCleanup(service.stop)
    sub = service.subscribe()
    ... push to sub.endpoint (sub.subscription() is cyphr's) ...
    self.assertEqual(service.errors, [])
    self.assertEqual(service.received[0].plaintext, b"...")
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.web import resource, server

from cyphr.push.webpush import Subscription

# What a push service must take (RFC 8030, 7.2); more is answered 413.
MAX_BODY = 4096
MAX_EXP_AHEAD = 24 * 3600
URGENCIES = {"very-low", "low", "normal", "high"}
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class Malformed(Exception):
    """What is wrong with a push, in a few words; answered ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str, what: str) -> bytes:
    """Unpadded base64url, strictly (as JWTs and VAPID keys are written)."""
    if not _B64URL.fullmatch(text):
        raise Malformed(f"{what} is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise Malformed(f"{what} is not base64url") from None


def _point(data: bytes, what: str) -> ec.EllipticCurvePublicKey:
    if len(data) != 65 or data[0] != 4:
        raise Malformed(f"{what} is not an uncompressed P-256 key")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError:
        raise Malformed(f"{what} is not a point of P-256") from None


def _raw(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


def decrypt(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth_secret: bytes) -> bytes:
    """
    The user agent's side of RFC 8291: the plaintext of an aes128gcm body,
    which must be exactly one record (the last: delimiter 0x02, then only
    zero padding) whose keyid is the sender's P-256 key. Malformed when it
    is not so, or does not decrypt.
    """
    if len(body) < 21:
        raise Malformed("the body is shorter than an aes128gcm header")
    salt = body[:16]
    rs, idlen = struct.unpack("!IB", body[16:21])
    if idlen != 65:
        raise Malformed(f"the keyid is {idlen} bytes, not a 65-byte P-256 key")
    if rs < 18:
        raise Malformed(f"the record size {rs} is under 18")
    keyid = body[21:21 + idlen]
    as_public = _point(keyid, "the keyid")
    ciphertext = body[21 + idlen:]
    if len(ciphertext) < 17:
        raise Malformed("the record is shorter than its tag and delimiter")
    if len(ciphertext) > rs:
        raise Malformed("the body holds more than one record")
    ua_public = _raw(ua_private.public_key())
    ecdh_secret = ua_private.exchange(ec.ECDH(), as_public)
    prk_key = _extract(auth_secret, ecdh_secret)
    ikm = _expand(prk_key, b"WebPush: info\x00" + ua_public + keyid, 32)
    prk = _extract(salt, ikm)
    cek = _expand(prk, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = _expand(prk, b"Content-Encoding: nonce\x00", 12)
    try:
        record = AESGCM(cek).decrypt(nonce, ciphertext, None)
    except InvalidTag:
        raise Malformed("the record does not decrypt") from None
    unpadded = record.rstrip(b"\x00")
    if not unpadded or unpadded[-1] != 2:
        raise Malformed("the record does not end with the last record's delimiter 0x02")
    return unpadded[:-1]


def _extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869): HMAC-SHA256(salt, ikm)."""
    h = hmac.HMAC(salt, hashes.SHA256())
    h.update(ikm)
    return h.finalize()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869) for up to 32 bytes: one block."""
    h = hmac.HMAC(prk, hashes.SHA256())
    h.update(info + b"\x01")
    return h.finalize()[:length]


@dataclass(frozen=True)
class StandInSubscription:
    """A subscription the stand-in made, as a device would hold it."""

    id: str
    endpoint: str
    p256dh: str | None
    auth: str | None
    private_key: ec.EllipticCurvePrivateKey | None = field(repr=False)
    application_server_key: str | None = None

    def subscription(self) -> Subscription:
        """The same, as cyphr.push.webpush takes it."""
        return Subscription(self.endpoint, self.p256dh, self.auth)

    def to_json(self) -> dict[str, Any]:
        """As a browser's PushSubscription.toJSON() gives it."""
        keys = {"p256dh": self.p256dh, "auth": self.auth} if self.p256dh else {}
        return {"endpoint": self.endpoint, "expirationTime": None, "keys": keys}


@dataclass(frozen=True)
class Received:
    """A well-formed push: header names in lower case, the plaintext
    decrypted (b"" for an empty body)."""

    subscription: str
    headers: dict[str, str]
    plaintext: bytes


@dataclass
class _Answer:
    status: int = 201
    retry_after: str | None = None
    hang: bool = False


class _Tracking(WrappingFactory):
    """Knows its open connections, to close them all at stop()."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def close_all(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


class StandInSite(resource.Resource):
    """A stand-in served on 127.0.0.1: ``start()`` listens on a port of the
    system's choice (``origin`` then names it), ``stop()`` stops and closes
    every connection, hanging ones too. Subclasses set ``_reactor``,
    ``_port = None`` and ``_factory = None`` in their constructor."""

    isLeaf = True
    origin = ""
    _reactor: Any
    _port: Any = None
    _factory: Any = None

    def start(self) -> None:
        """Listen on 127.0.0.1, on a port of the system's choice."""
        site = server.Site(self)
        site.displayTracebacks = False
        self._factory = _Tracking(site)
        self._port = self._reactor.listenTCP(0, self._factory, interface="127.0.0.1")
        self.origin = f"http://127.0.0.1:{self._port.getHost().port}"

    def stop(self) -> Deferred[None]:
        """Stop listening and close every connection (hanging ones too);
        fires once they are closed."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()
            self._port = None
        if self._factory is not None:
            await self._factory.close_all()
        # An aborted client connection learns of it on the next turn.
        await deferLater(self._reactor, 0, lambda: None)


class PushService(StandInSite):
    """The stand-in: a twisted.web resource answering ``POST /push/<id>``."""

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self._reactor = reactor
        self.origin = ""
        self.received: list[Received] = []
        self.errors: list[str] = []
        self.subscriptions: dict[str, StandInSubscription] = {}
        self._answers: dict[str, _Answer] = {}
        self._hanging: list[Any] = []  # requests left unanswered
        self._port: Any = None
        self._factory: _Tracking | None = None

    # -- the test's side --------------------------------------------------------

    def subscribe(self, *, keys: bool = True,
                  application_server_key: str | None = None) -> StandInSubscription:
        """
        A new subscription: with its own key pair and auth secret, or
        without (``keys=False``: a UnifiedPush distributor that takes no
        encrypted body). With ``application_server_key``, only pushes whose
        VAPID ``k`` is that key are taken (as a browser's push service).
        """
        if not self.origin:
            raise RuntimeError("start() the stand-in first")
        sub_id = b64url(os.urandom(16))
        private = ec.generate_private_key(ec.SECP256R1()) if keys else None
        sub = StandInSubscription(
            id=sub_id,
            endpoint=f"{self.origin}/push/{sub_id}",
            p256dh=b64url(_raw(private.public_key())) if private else None,
            auth=b64url(os.urandom(16)) if keys else None,
            private_key=private,
            application_server_key=application_server_key,
        )
        self.subscriptions[sub_id] = sub
        return sub

    def answer(self, subscription_id: str, status: int, *,
               retry_after: str | None = None) -> None:
        """Answer the subscription's well-formed pushes with this status
        (and Retry-After) from now on."""
        self._answers[subscription_id] = _Answer(status, retry_after)

    def hang(self, subscription_id: str) -> None:
        """Never answer the subscription's pushes (they are still checked
        and recorded)."""
        self._answers[subscription_id] = _Answer(hang=True)

    def received_for(self, subscription_id: str) -> list[Received]:
        return [r for r in self.received if r.subscription == subscription_id]

    # -- the push service's side -------------------------------------------------

    def render(self, request: Any) -> Any:
        path = request.path.decode("ascii", "replace")
        match = re.fullmatch(r"/push/([A-Za-z0-9_-]+)", path)
        if match is None or match.group(1) not in self.subscriptions:
            request.setResponseCode(404)
            return b""
        if request.method != b"POST":
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"POST")
            return b""
        sub = self.subscriptions[match.group(1)]
        try:
            received = self._check(sub, request)
        except Malformed as e:
            self.errors.append(f"{sub.id}: {e}")
            request.setResponseCode(e.status)
            return str(e).encode("utf-8")
        self.received.append(received)
        answer = self._answers.get(sub.id, _Answer())
        if answer.hang:
            self._hanging.append(request)
            # The client gives up and closes: nothing to do.
            request.notifyFinish().addErrback(lambda _: None)
            return server.NOT_DONE_YET
        request.setResponseCode(answer.status)
        if answer.retry_after is not None:
            request.setHeader(b"Retry-After", answer.retry_after.encode("ascii"))
        if 200 <= answer.status < 300:
            request.setHeader(b"Location", f"/message/{b64url(os.urandom(8))}".encode("ascii"))
        return b""

    def _one(self, request: Any, name: str) -> str | None:
        values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
        if values is None:
            return None
        if len(values) != 1:
            raise Malformed(f"more than one {name} header")
        try:
            return values[0].decode("ascii")
        except UnicodeDecodeError:
            raise Malformed(f"the {name} header is not ASCII") from None

    def _check(self, sub: StandInSubscription, request: Any) -> Received:
        self._check_vapid(sub, self._one(request, "Authorization"))
        ttl = self._one(request, "TTL")
        if ttl is None:
            raise Malformed("no TTL header")
        if not ttl.isdigit() or not ttl.isascii():
            raise Malformed(f"the TTL {ttl!r} is not a number of seconds")
        urgency = self._one(request, "Urgency")
        if urgency is not None and urgency not in URGENCIES:
            raise Malformed(f"the Urgency {urgency!r} is not one of RFC 8030's")
        topic = self._one(request, "Topic")
        if topic is not None and not _TOPIC.fullmatch(topic):
            raise Malformed(f"the Topic {topic!r} is not 1 to 32 base64url characters")
        body = request.content.read()
        if len(body) > MAX_BODY:
            raise Malformed(f"the body is larger than {MAX_BODY} bytes", 413)
        encoding = self._one(request, "Content-Encoding")
        if body:
            if encoding != "aes128gcm":
                raise Malformed(f"a body with Content-Encoding {encoding!r}, not aes128gcm")
            if sub.private_key is None or sub.auth is None:
                raise Malformed("a body for a subscription without keys")
            plaintext = decrypt(body, sub.private_key, unb64url(sub.auth, "auth"))
        else:
            plaintext = b""
        headers = {name.decode("ascii").lower(): values[-1].decode("ascii", "replace")
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        return Received(sub.id, headers, plaintext)

    def _check_vapid(self, sub: StandInSubscription, authorization: str | None) -> None:
        if authorization is None:
            raise Malformed("no Authorization header")
        scheme, _, rest = authorization.partition(" ")
        if scheme.lower() != "vapid":
            raise Malformed(f"the Authorization scheme is {scheme!r}, not vapid")
        params: dict[str, str] = {}
        for part in rest.split(","):
            name, equals, value = part.strip().partition("=")
            name = name.strip().lower()
            if not equals or name not in ("t", "k") or name in params:
                raise Malformed("the vapid parameters are not t and k, once each")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            params[name] = value
        if set(params) != {"t", "k"}:
            raise Malformed("the vapid parameters are not t and k")
        if sub.application_server_key is not None and params["k"] != sub.application_server_key:
            raise Malformed("k is not the key the subscription was made with")
        key = _point(unb64url(params["k"], "k"), "k")

        parts = params["t"].split(".")
        if len(parts) != 3:
            raise Malformed("the token is not a JWS of three parts")
        header = self._json(unb64url(parts[0], "the JWT header"), "the JWT header")
        claims = self._json(unb64url(parts[1], "the JWT claims"), "the JWT claims")
        signature = unb64url(parts[2], "the JWT signature")
        if header.get("alg") != "ES256":
            raise Malformed(f"the JWT's alg is {header.get('alg')!r}, not ES256")
        if "typ" in header and str(header["typ"]).upper() != "JWT":
            raise Malformed(f"the JWT's typ is {header['typ']!r}")
        if len(signature) != 64:
            raise Malformed("the ES256 signature is not 64 bytes (r || s)")
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                   int.from_bytes(signature[32:], "big"))
        try:
            key.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise Malformed("the JWT's signature does not verify with k") from None

        if claims.get("aud") != self.origin:
            raise Malformed(f"the JWT's aud {claims.get('aud')!r} is not {self.origin!r}")
        exp = claims.get("exp")
        now = self._reactor.seconds()
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise Malformed("the JWT's exp is not a number of seconds")
        if exp <= now:
            raise Malformed("the JWT has expired")
        if exp > now + MAX_EXP_AHEAD:
            raise Malformed("the JWT's exp is more than 24 hours ahead")
        sub_claim = claims.get("sub")
        if not isinstance(sub_claim, str) or not sub_claim.startswith(("mailto:", "https:")):
            raise Malformed("the JWT's sub is not a mailto: or https: contact")

    @staticmethod
    def _json(data: bytes, what: str) -> dict[str, Any]:
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Malformed(f"{what} is not JSON") from None
        if not isinstance(value, dict):
            raise Malformed(f"{what} is not a JSON object")
        return value
