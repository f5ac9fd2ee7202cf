"""
Web Push (RFC 8030) and UnifiedPush wake-ups: a message with nothing in it
that matters, sent through a device's push service so that its app wakes
and syncs.

A subscription is what the device's browser or UnifiedPush distributor
gave it: an endpoint URL, which is a capability (whoever knows it can push
to the device, so it is never logged and never in a result), and usually
the keys of RFC 8291 message encryption: ``p256dh``, the user agent's P-256
public key, and ``auth``, a 16-byte secret. With keys, the payload goes
encrypted (``Content-Encoding: aes128gcm``: one RFC 8188 record); without
(a UnifiedPush distributor that takes none), the body is empty and the
push itself is the wake-up.

Every request carries a VAPID token (RFC 8292): an ES256 JWT naming the
push service's origin, signed with the operator's key. Clients give that
key's public half to their push service when they subscribe (the
``applicationServerKey``), and the push service then takes pushes for the
subscription from this server only. A token lasts 12 hours and is renewed
after 6, so that one in use always has hours left on a push service whose
clock differs from ours.

The endpoint is the client's to choose, so the server would post to any URL
a client gives. check_endpoint() refuses what is not a public https URL
(unless the operator's ``push_allow_endpoint`` prefixes allow it: the
tests' stand-in on 127.0.0.1, a distributor on the local network);
resolves_to_public() checks where a host name points, and blocks (run it on
a thread pool, at registration). At the time of a push, the sender's own
agent connects to public addresses only, so a name that has come to point
inside the network since (DNS rebinding) gets nothing.

The work done on the reactor for one push: one P-256 key pair, one ECDH,
three HKDFs and an AES-GCM of a few bytes (0.1 ms, less than the TLS
handshake of the request that carries it), and one ES256 signature per push
service every 6 hours. No thread pool is worth its hand-off for that.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import stringToDatetime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

_log = Logger()

# -- RFC 8291 / RFC 8188 --------------------------------------------------------

# The record size written in the header. RFC 8291 sends one record, and a
# push service need take no more than 4096 bytes of body: the header (86
# bytes), the tag (16) and the padding delimiter (1) leave 3993 for the
# plaintext (RFC 8291, section 4). The Appendix A example uses 4096 too.
RECORD_SIZE = 4096
HEADER_SIZE = 16 + 4 + 1 + 65
MAX_PAYLOAD = RECORD_SIZE - HEADER_SIZE - 16 - 1
AUTH_SECRET_SIZE = 16
P256_POINT_SIZE = 65  # uncompressed: 0x04 || x || y
_KEY_INFO = b"WebPush: info\x00"
_CEK_INFO = b"Content-Encoding: aes128gcm\x00"
_NONCE_INFO = b"Content-Encoding: nonce\x00"
# Ends the last (here: the only) record, before any zero padding.
_LAST_RECORD = b"\x02"

# -- RFC 8292 ------------------------------------------------------------------

# A push service refuses a token whose exp is more than 24 hours ahead.
JWT_LIFETIME = 12 * 3600
# A cached token is used this long, so one sent has 6 hours or more left.
JWT_RENEW_AFTER = 6 * 3600
# Audiences are push services: a handful of big ones, plus one per
# self-hosted UnifiedPush distributor. Past this, the oldest are dropped.
MAX_CACHED_TOKENS = 1024

# -- RFC 8030 ------------------------------------------------------------------

URGENCIES = frozenset({"very-low", "low", "normal", "high"})
# At most 32 characters of the URL-safe base64 alphabet (RFC 8030, 5.4).
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_TTL = 2**31 - 1

# -- the requests ----------------------------------------------------------------

MAX_ENDPOINT_LENGTH = 2048
# A push service answers in a few bytes; a body past this is not read (the
# connection is closed), so that an endpoint cannot fill our memory.
MAX_ANSWER_SIZE = 64 * 1024
# A Retry-After past this is taken as this: the drainer may schedule it.
MAX_RETRY_AFTER = 24 * 3600
# Pushes go to few hosts (FCM, Mozilla, Apple, Windows...), in bursts.
PERSISTENT_PER_HOST = 8
IDLE_CONNECTION_TIMEOUT = 120

_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_URL_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_HOST_NAME = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+"
                        r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def b64url_encode(data: bytes) -> str:
    """URL-safe base64 without padding, as Web Push writes keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """URL-safe base64, padded or not; ValueError on anything else (the
    standard decoder drops characters it does not know)."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise ValueError("not URL-safe base64")
    text = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise ValueError("not URL-safe base64") from None


def _uncompressed(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


def _p256_point(data: bytes) -> ec.EllipticCurvePublicKey:
    """An uncompressed P-256 public key; ValueError when it is not one."""
    if len(data) != P256_POINT_SIZE or data[0] != 4:
        raise ValueError("not an uncompressed P-256 key")
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)


def encrypt(plaintext: bytes, ua_public: bytes, auth_secret: bytes, *,
            salt: bytes | None = None,
            as_private: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    """
    A push message's body (RFC 8291): the RFC 8188 header, ``salt(16) ||
    rs(4) || idlen(1) || keyid`` with our ephemeral public key as keyid,
    then one record, ``plaintext || 0x02`` encrypted with AES-128-GCM.

    ``salt`` and ``as_private`` are fresh for every message; they are
    arguments for the RFC's test vector only. ValueError when the keys are
    not a subscription's or the plaintext is over MAX_PAYLOAD.
    """
    if len(plaintext) > MAX_PAYLOAD:
        raise ValueError(f"a push payload holds at most {MAX_PAYLOAD} bytes")
    if len(auth_secret) != AUTH_SECRET_SIZE:
        raise ValueError(f"an auth secret is {AUTH_SECRET_SIZE} bytes")
    ua_key = _p256_point(ua_public)
    salt = os.urandom(16) if salt is None else salt
    if len(salt) != 16:
        raise ValueError("a salt is 16 bytes")
    if as_private is None:
        as_private = ec.generate_private_key(ec.SECP256R1())
    as_public = _uncompressed(as_private.public_key())
    ecdh_secret = as_private.exchange(ec.ECDH(), ua_key)
    # IKM = HKDF(salt=auth_secret, ikm=ecdh_secret, info=key_info, 32).
    key_info = _KEY_INFO + ua_public + as_public
    ikm = HKDF(hashes.SHA256(), 32, salt=auth_secret, info=key_info).derive(ecdh_secret)
    # Then the RFC 8188 keys, from PRK = HKDF-Extract(salt, IKM).
    cek = HKDF(hashes.SHA256(), 16, salt=salt, info=_CEK_INFO).derive(ikm)
    nonce = HKDF(hashes.SHA256(), 12, salt=salt, info=_NONCE_INFO).derive(ikm)
    # The first record's nonce is NONCE XOR 0: NONCE itself.
    record = AESGCM(cek).encrypt(nonce, plaintext + _LAST_RECORD, None)
    header = salt + struct.pack("!IB", RECORD_SIZE, len(as_public)) + as_public
    return header + record


# -- VAPID ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    issued: float
    header: str


class VapidKey:
    """
    The operator's VAPID key (RFC 8292): a P-256 private key. Its public
    half (``public_key_b64url()``) is what clients subscribe with; the
    server signs a token with it for every push service it pushes to, and
    keeps each for JWT_RENEW_AFTER.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
                private_key.curve, ec.SECP256R1):
            raise ValueError("a VAPID key is a P-256 private key")
        self._key = private_key
        self._public = b64url_encode(_uncompressed(private_key.public_key()))
        self._tokens: OrderedDict[tuple[str, str], _Token] = OrderedDict()

    @classmethod
    def generate(cls) -> VapidKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_scalar(cls, scalar: bytes) -> VapidKey:
        """From the 32-byte private scalar, big-endian (what the web-push
        tools print, base64url-decoded)."""
        if len(scalar) != 32:
            raise ValueError("a P-256 private key is 32 bytes")
        # ValueError for 0 or a scalar past the group's order.
        return cls(ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes | str) -> VapidKey:
        """From an unencrypted PEM private key (PKCS#8 or SEC 1)."""
        if isinstance(pem, str):
            pem = pem.encode("ascii")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (TypeError, ValueError):
            raise ValueError("not an unencrypted PEM private key") from None
        return cls(key)  # type: ignore[arg-type]  # checked there

    @classmethod
    def load(cls, text: str) -> VapidKey:
        """From a setting: PEM, or the base64url private scalar."""
        text = text.strip()
        if text.startswith("-----BEGIN"):
            return cls.from_pem(text)
        return cls.from_scalar(b64url_decode(text))

    def private_pem(self) -> bytes:
        """The key as unencrypted PKCS#8 PEM, to be kept by the operator."""
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def public_key_b64url(self) -> str:
        """The uncompressed public key, base64url: the applicationServerKey
        that clients subscribe with, and the ``k`` of every request."""
        return self._public

    def authorization(self, audience: str, contact: str, now: float) -> str:
        """
        The Authorization header for a push to ``audience`` (the push
        service's origin) at time ``now``: ``vapid t=<jwt>, k=<key>``. A
        token is reused until JWT_RENEW_AFTER has passed (or the clock went
        back), then signed anew.
        """
        key = (audience, contact)
        token = self._tokens.get(key)
        if token is not None and token.issued <= now < token.issued + JWT_RENEW_AFTER:
            self._tokens.move_to_end(key)
            return token.header
        jwt = self._sign({"aud": audience, "exp": int(now) + JWT_LIFETIME, "sub": contact})
        self._tokens[key] = _Token(now, f"vapid t={jwt}, k={self._public}")
        self._tokens.move_to_end(key)
        while len(self._tokens) > MAX_CACHED_TOKENS:
            self._tokens.popitem(last=False)
        return self._tokens[key].header

    def _sign(self, claims: dict[str, Any]) -> str:
        """An ES256 JWT (RFC 7515, RFC 7518 3.4: the signature is r || s)."""
        def part(value: dict[str, Any]) -> str:
            return b64url_encode(json.dumps(value, separators=(",", ":")).encode("utf-8"))
        signing_input = part({"typ": "JWT", "alg": "ES256"}) + "." + part(claims)
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + b64url_encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL (the port only when it is not the
    scheme's default): a push service's VAPID audience. ValueError when
    the URL has no such thing."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname  # lower case already
    port = parts.port  # ValueError when it is not a port
    if scheme not in _DEFAULT_PORTS or not host:
        raise ValueError("not an http or https URL")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, _DEFAULT_PORTS[scheme]) else "")


def check_contact(contact: str) -> str | None:
    """Why a VAPID ``sub`` is refused, or None: a ``mailto:`` or
    ``https:`` URI where the push service's operator can reach ours."""
    if not isinstance(contact, str) or not _URL_CHARACTERS.fullmatch(contact):
        return "it is not a URI"
    if contact.startswith("mailto:") and len(contact) > len("mailto:"):
        return None
    if contact.startswith("https://") and len(contact) > len("https://"):
        return None
    return "it is not a mailto: or https: URI"


# -- subscriptions and endpoints ------------------------------------------------


@dataclass(frozen=True)
class Subscription:
    """
    A device's push subscription: what WebPushSender.send() takes (or
    anything with these three attributes, a stored registration say).
    ``p256dh`` and ``auth`` are both there or neither, each either raw
    bytes or base64url text (as a browser's PushSubscription.toJSON() has
    them). Nothing of it is in its repr: the endpoint is a capability.
    """

    endpoint: str = field(repr=False)
    p256dh: str | bytes | None = field(default=None, repr=False)
    auth: str | bytes | None = field(default=None, repr=False)


def _key_bytes(value: str | bytes) -> bytes:
    """A key as raw bytes, given raw or in base64url; ValueError else."""
    if isinstance(value, bytes):
        return value
    return b64url_decode(value)


def check_keys(p256dh: str | bytes | None, auth: str | bytes | None) -> str | None:
    """Why a subscription's keys are refused, or None: both or neither,
    ``p256dh`` an uncompressed P-256 point and ``auth`` 16 bytes (each raw
    or in base64url)."""
    if p256dh is None and auth is None:
        return None
    if p256dh is None or auth is None:
        return "p256dh and auth come together"
    try:
        _p256_point(_key_bytes(p256dh))
    except (TypeError, ValueError):
        return "p256dh is not an uncompressed P-256 key"
    try:
        if len(_key_bytes(auth)) != AUTH_SECRET_SIZE:
            raise ValueError
    except (TypeError, ValueError):
        return f"auth is not {AUTH_SECRET_SIZE} bytes"
    return None


def matches_prefix(url: str, prefixes: Sequence[str]) -> bool:
    """
    Whether the URL starts with one of the prefixes, at a boundary: the
    prefix ends in "/" or the URL goes on with "/", "?" or "#" (or ends).
    So ``http://127.0.0.1:8088`` allows ``http://127.0.0.1:8088/push/1``
    but neither ``http://127.0.0.1:80889/`` nor
    ``http://127.0.0.1:8088@example.com/``.
    """
    for prefix in prefixes:
        if prefix and url.startswith(prefix):
            rest = url[len(prefix):]
            if prefix.endswith("/") or not rest or rest[0] in "/?#":
                return True
    return False


def check_endpoint(url: str, allowed_prefixes: Sequence[str] = ()) -> str | None:
    """
    Why an endpoint URL is refused, or None: what can be told without
    resolving. It is refused unless it is ``https``, at most
    MAX_ENDPOINT_LENGTH characters of printable ASCII, without user
    information, and its host a fully qualified domain name: no IP address
    (a push service has a name, and an address literal is how to reach
    what should not be reached) and no ``localhost``. Unless it starts with
    one of ``allowed_prefixes`` (see matches_prefix; the operator's
    ``push_allow_endpoint``), when an http or https URL with a host is
    enough. Where the name points is resolves_to_public()'s to check.
    """
    return _refusal(url, lambda: matches_prefix(url, allowed_prefixes))


def _refusal(url: str, allowed: Callable[[], bool]) -> str | None:
    """check_endpoint(), with whether the operator allows the URL as it is
    asked once the URL is known to be an http or https one."""
    if not isinstance(url, str) or not url:
        return "it is not a URL"
    if len(url) > MAX_ENDPOINT_LENGTH:
        return f"it is longer than {MAX_ENDPOINT_LENGTH} characters"
    if not _URL_CHARACTERS.fullmatch(url):
        return "it holds characters other than printable ASCII"
    try:
        parts = urlsplit(url)
        _ = parts.port  # ValueError for a port that is not one
    except ValueError:
        return "it is not a valid URL"
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return "it is not an http or https URL"
    if allowed():
        return None
    if scheme != "https":
        return "it is not https"
    if "@" in parts.netloc:
        return "it holds user information"
    host = parts.hostname.rstrip(".")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return "its host is an IP address, not a name"
    if host == "localhost" or host.endswith(".localhost"):
        return "its host is localhost"
    if not _HOST_NAME.fullmatch(host) or "." not in host:
        return "its host is not a fully qualified domain name"
    return None


def is_public_address(address: str) -> bool:
    """Whether an IP address is on the public Internet: not private,
    loopback, link-local, multicast, reserved, shared (100.64/10) or
    unspecified, nor an IPv6 form of one of those (IPv4-mapped, 6to4,
    Teredo)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    embedded: list[ipaddress.IPv4Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
    for each in [ip, *embedded]:
        if (not each.is_global or each.is_private or each.is_loopback or each.is_link_local
                or each.is_multicast or each.is_reserved or each.is_unspecified):
            return False
    return True


def resolves_to_public(host: str) -> bool:
    """
    Whether the host name resolves, and only to public addresses (see
    is_public_address). Blocks on DNS: run it on a thread pool, never on
    the reactor. A name that does not resolve is False.
    """
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(is_public_address(a) for a in addresses)


# -- an agent that reaches public addresses only -------------------------------


@implementer(IResolutionReceiver)
class _PublicOnlyReceiver:
    def __init__(self, receiver: IResolutionReceiver) -> None:
        self._receiver = receiver

    def resolutionBegan(self, resolution: Any) -> None:
        self._receiver.resolutionBegan(resolution)

    def addressResolved(self, address: Any) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)) and is_public_address(address.host):
            self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _PublicOnlyResolver:
    """The reactor's resolver, with every address that is not public left
    out of its answers: connecting to such a name finds no address."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def resolveHostName(self, resolutionReceiver: IResolutionReceiver, hostName: str,
                        portNumber: int = 0, addressTypes: Any = None,
                        transportSemantics: str = "TCP") -> Any:
        return self._reactor.nameResolver.resolveHostName(
            _PublicOnlyReceiver(resolutionReceiver), hostName, portNumber, addressTypes,
            transportSemantics)


@implementer(IReactorPluggableNameResolver)
class _ResolvingReactor:
    """The reactor, but for its name resolver: what HostnameEndpoint takes."""

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError("a fixed resolver")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class _PublicEndpoints:
    """Agent's endpoints (TCP for http, TLS for https, as Agent's own),
    through the public-only resolver."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = _ResolvingReactor(reactor, _PublicOnlyResolver(reactor))
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> Any:
        endpoint = HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port,
                                    timeout=self._timeout)
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported("not http or https")


def public_only_agent(reactor: Any, *, connect_timeout: float,
                      pool: HTTPConnectionPool | None = None) -> Agent:
    """An Agent (TLS checked as a browser checks it) that connects only to
    public addresses: a name that resolves to nothing else fails with
    DNSLookupError before any connection is made."""
    return Agent.usingEndpointFactory(reactor, _PublicEndpoints(reactor, connect_timeout),
                                      pool=pool)


# -- sending ---------------------------------------------------------------------


Outcome = Literal["sent", "gone", "retry", "refused"]


@dataclass(frozen=True)
class PushResult:
    """
    What became of a push:

    - ``sent``: the push service took it (2xx);
    - ``gone``: 404 or 410, the subscription is dead: drop it;
    - ``retry``: 408, 429, 5xx, no answer in time or no connection: try
      again later, after ``retry_after`` seconds if the push service said
      (Retry-After, at most MAX_RETRY_AFTER);
    - ``refused``: any other answer (our request was bad, or a redirect,
      which is not followed), or the request was not made (the endpoint is
      not allowed, the keys are not valid): log it, do not retry.

    ``reason`` is a few words for logs and metrics: never the endpoint or
    a key.
    """

    outcome: Outcome
    status: int | None = None
    reason: str = ""
    retry_after: float | None = None


@implementer(IBodyProducer)
class BytesBody:
    """A body held in memory, written at once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(Protocol):
    """Reads an answer's body to its end and drops it, so that the
    connection can be used again; closes the connection past
    MAX_ANSWER_SIZE, and when cancelled (the push timed out)."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(lambda _: self._abort())
        self._size = 0

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_ANSWER_SIZE:
            self._abort()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # The body ended, or was cut: either way, the status is what counts.
        if not self.done.called:
            self.done.callback(None)


# What the network does to a request; anything else is a bug of ours, logged.
# CancelledError: the caller cancelled the push (the server is stopping).
NETWORK_ERRORS = (ConnectError, ConnectingCancelledError, DNSLookupError, ResponseFailed,
                   ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent, OSError,
                   CancelledError)


def failure_reason(failure: Failure) -> str:
    """A few words on a request that got no answer: class names only (an
    error's text may hold an address)."""
    error = failure.value
    if isinstance(error, (ConnectError, ConnectingCancelledError, DNSLookupError)):
        return f"could not connect ({type(error).__name__})"
    reasons = getattr(error, "reasons", None) or []
    inner = f": {reasons[0].type.__name__}" if reasons and isinstance(reasons[0], Failure) else ""
    return f"the request failed ({type(error).__name__}{inner})"


def retry_after_seconds(value: bytes | None, now: float) -> float | None:
    """Retry-After in seconds from now: delay-seconds or an HTTP-date."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(int(text))
    else:
        try:
            seconds = stringToDatetime(text) - now
        except (ValueError, IndexError, KeyError):
            return None
    return min(max(seconds, 0.0), float(MAX_RETRY_AFTER))


def result_for(status: int, retry_after: float | None = None) -> PushResult:
    """The result of an answer with this status (see PushResult)."""
    reason = f"HTTP {status}"
    if 200 <= status < 300:
        return PushResult("sent", status, reason)
    if status in (404, 410):
        return PushResult("gone", status, reason)
    if status in (408, 429) or 500 <= status < 600:
        return PushResult("retry", status, reason, retry_after)
    return PushResult("refused", status, reason)


class WebPushSender:
    """
    Sends wake-ups to Web Push and UnifiedPush endpoints, with VAPID.

    ``allow_endpoint(url)`` says whether the operator allows an endpoint
    as it is (the ``push_allow_endpoint`` prefixes: pass
    ``lambda url: matches_prefix(url, prefixes)``). Such an endpoint is
    reached with a plain Agent, wherever it is; any other must pass
    check_endpoint() and is reached with public_only_agent(). An ``agent``
    given is used for both, as it is (tests).

    ``timeout`` bounds a whole push: connecting, sending, the answer.
    """

    def __init__(self, reactor: Any, vapid: VapidKey, contact: str, *, agent: Any = None,
                 timeout: float = 10, allow_endpoint: Callable[[str], bool]) -> None:
        refusal = check_contact(contact)
        if refusal is not None:
            raise ValueError(f"the VAPID contact is refused: {refusal}")
        self._reactor = reactor
        self._vapid = vapid
        self._contact = contact
        self._timeout = timeout
        self._allow_endpoint = allow_endpoint
        self._pools: list[HTTPConnectionPool] = []
        if agent is not None:
            self._allowed_agent = self._public_agent = agent
        else:
            self._allowed_agent = Agent(reactor, connectTimeout=timeout, pool=self._pool())
            self._public_agent = public_only_agent(reactor, connect_timeout=timeout,
                                                   pool=self._pool())

    def _pool(self) -> HTTPConnectionPool:
        pool = HTTPConnectionPool(self._reactor, persistent=True)
        pool.maxPersistentPerHost = PERSISTENT_PER_HOST
        pool.cachedConnectionTimeout = IDLE_CONNECTION_TIMEOUT
        pool.retryAutomatically = False  # a POST is never retried anyway
        self._pools.append(pool)
        return pool

    def send(self, subscription: Subscription | Any, payload: bytes, *, ttl: int, topic: str,
             urgency: str = "high") -> Deferred[PushResult]:
        """
        Push ``payload`` to a Subscription (or any object with its
        attributes: a registration of cyphr.store.push), encrypted; dropped
        for a subscription without keys. With these TTL (seconds the push service keeps it for an
        offline device), Topic (a later push with the same topic replaces
        this one while it waits: a short per-device tag) and Urgency.

        Raises ValueError at once for arguments that are never valid (a
        caller's mistake); the Deferred never fails: whatever becomes of
        the push is a PushResult.
        """
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL:
            raise ValueError(f"a TTL is a whole number of seconds from 0 to {MAX_TTL}")
        if not isinstance(topic, str) or not _TOPIC.fullmatch(topic):
            raise ValueError("a Topic is 1 to 32 characters of URL-safe base64")
        if urgency not in URGENCIES:
            raise ValueError(f"an Urgency is one of {sorted(URGENCIES)}")
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"a push payload holds at most {MAX_PAYLOAD} bytes")

        url = subscription.endpoint
        allowed = isinstance(url, str) and bool(self._allow_endpoint(url))
        refusal = _refusal(url, lambda: allowed)
        if refusal is not None:
            return succeed(PushResult("refused", None, f"the endpoint is refused: {refusal}"))
        p256dh, auth = subscription.p256dh, subscription.auth
        body = b""
        if p256dh is not None or auth is not None:
            if check_keys(p256dh, auth) is not None:
                return succeed(PushResult("refused", None, "the subscription's keys are not valid"))
            body = encrypt(payload, _key_bytes(p256dh), _key_bytes(auth))  # type: ignore[arg-type]

        headers = Headers({
            b"TTL": [str(ttl).encode("ascii")],
            b"Urgency": [urgency.encode("ascii")],
            b"Topic": [topic.encode("ascii")],
            b"Authorization": [self._vapid.authorization(
                origin(url), self._contact, self._reactor.seconds()).encode("ascii")],
        })
        if body:
            headers.setRawHeaders(b"Content-Encoding", [b"aes128gcm"])
            headers.setRawHeaders(b"Content-Type", [b"application/octet-stream"])
        agent = self._allowed_agent if allowed else self._public_agent

        d = Deferred.fromCoroutine(self._post(agent, url, headers, body))
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out)
        return d.addErrback(self._failed)

    async def _post(self, agent: Any, url: str, headers: Headers, body: bytes) -> PushResult:
        response: IResponse = await agent.request(
            b"POST", url.encode("ascii"), headers, BytesBody(body) if body else None)
        retry_after = retry_after_seconds(
            (response.headers.getRawHeaders(b"Retry-After") or [None])[0],
            self._reactor.seconds())
        # Read to its end (a few bytes at most, as a rule), so that the
        # connection can take the next push.
        drain = _Discard()
        response.deliverBody(drain)
        await drain.done
        return result_for(response.code, retry_after)

    @staticmethod
    def _timed_out(result: Any, timeout: float) -> PushResult:
        return PushResult("retry", None, "the push service did not answer in time")

    @staticmethod
    def _failed(failure: Failure) -> PushResult:
        if not failure.check(*NETWORK_ERRORS):
            _log.failure("A push failed unexpectedly", failure)
        return PushResult("retry", None, failure_reason(failure))

    def close(self) -> Deferred[None]:
        """Close the idle connections of the sender's own pools (not of an
        agent given); fires once they are closed."""
        return gatherResults([p.closeCachedConnections() for p in self._pools]).addCallback(
            lambda _: None)
