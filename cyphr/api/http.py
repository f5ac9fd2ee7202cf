"""
HTTP plumbing shared by every route: the Site and its Request, body limits,
JSON in and out, the contract's error answers, security headers, CORS and
the client address behind trusted proxies.

Every answer passes through CyphrRequest.process(), so the headers and the
limits hold for every resource, the realtime one included. Routes are
declared with Klein (one class per area of the API, see cyphr.api);
ApiRouter dispatches to them and turns every outcome into an answer.
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import unquote_to_bytes

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http import datetimeToString
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import Map, RequestRedirect

from cyphr._compat import handle_star, request_line, set_aborting_call
from cyphr.config import Config
from cyphr.connections import ConnectionLimits, address_key, connection_cap, open_file_limit
from cyphr.errors import (
    CORS_ORIGIN_DENIED,
    REQUEST_TIMEOUT,
    SERVER_BUSY,
    INVALID_BODY,
    ApiError,
    BadRequest,
    Forbidden,
    InternalError,
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
)
from cyphr.handlers.validation import MAX_JSON_DEPTH, json_too_deep, refuse_json_constant
from cyphr.metrics import HttpStats

_log = Logger()

JSON_TYPE = b"application/json; charset=utf-8"

# A JSON API loads nothing and is framed by nobody.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Content-Security-Policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cross-Origin-Resource-Policy", b"same-site"),
    (b"Cache-Control", b"no-store"),
)
HSTS = b"max-age=31536000; includeSubDomains"
CORS_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD"
CORS_HEADERS = (b"Content-Type, Authorization, Range, If-Range, Tus-Resumable, Upload-Length,"
                b" Upload-Offset")
# What a browser's script may read of an answer besides the basic headers:
# the upload protocol's (cyphr.api.attachments) and a range's.
CORS_EXPOSED = (b"Location, Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, Upload-Offset,"
                b" Upload-Length, Upload-Expires, Content-Range, Accept-Ranges, ETag, Retry-After")
CORS_MAX_AGE = b"600"
# A request's deadline grows by one second for each this many bytes of it
# received: a large body on a slow link gets the time it needs, a client
# that trickles gets none (Apache's mod_reqtimeout MinRate, in effect).
MIN_REQUEST_RATE = 16 * 1024


# -- JSON in and out ----------------------------------------------------------


def json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def answer(request: Any, body: Any, status: int = 200) -> bytes:
    """Set the status and content type; the bytes to return from a route."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_TYPE)
    return json_bytes(body)


def error_answer(request: Any, error: ApiError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return answer(request, error.to_json(), error.status)


def _is_json_type(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def parse_json(raw: bytes) -> Any:
    """Decode a JSON document, or raise InvalidJson saying where it breaks.
    Arrays and objects nested deeper than MAX_JSON_DEPTH are InvalidJson too."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidJson("The request body is not valid UTF-8",
                          details={"position": e.start}) from None
    try:
        value = json.loads(text, parse_constant=refuse_json_constant)
    except json.JSONDecodeError as e:
        raise InvalidJson(
            f"The request body is not valid JSON: {e.msg}",
            details={"line": e.lineno, "column": e.colno, "position": e.pos},
        ) from None
    except RecursionError:  # deeper than the decoder goes: far past the cap
        raise _too_deep() from None
    except ValueError as e:  # NaN, Infinity, integers of too many digits
        raise InvalidJson(f"The request body is not valid JSON: {e}") from None
    # On the decoded value: its cost follows the number of arrays and
    # objects, not of bytes (a typical body: well under a microsecond).
    if json_too_deep(value):
        raise _too_deep()
    return value


def _too_deep() -> InvalidJson:
    return InvalidJson(f"The request body is nested deeper than {MAX_JSON_DEPTH} levels",
                       details={"maxDepth": MAX_JSON_DEPTH})


def read_json(request: Any, *, required: bool = True) -> dict[str, Any]:
    """
    The request's body as a JSON object. A body that is not declared as JSON
    is 415; malformed JSON is 400 INVALID_JSON with its position; anything
    but an object is 400 INVALID_BODY. An empty body is ``{}`` when the
    route's fields are all optional (``required=False``).
    """
    request.content.seek(0)
    raw = request.content.read()
    if not raw.strip():
        if required:
            raise InvalidJson("A JSON object is required as the request body")
        return {}
    if not _is_json_type(request.getHeader(b"content-type")):
        raise UnsupportedMediaType()
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object", code=INVALID_BODY)
    return body


class Streamed:
    """A route's answer whose body a producer writes, rather than bytes:
    ``send(request)`` is called once the route has set the status and
    headers, and writes the body and finishes the request (a download,
    cyphr.api.attachments)."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self.send = send


# -- routing ------------------------------------------------------------------


def _request_path(request: Any) -> str | None:
    try:
        return "/" + "/".join(segment.decode("utf-8") for segment in request.postpath)
    except UnicodeDecodeError:
        return None


_RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^:<>]+)>")


def route_template(rule: str) -> str:
    """A werkzeug rule as a route template in the API's own names:
    ``/chat/<chat_id>`` (or ``<uuid:chat_id>``) as ``/chat/:chatId``."""
    def name(match: re.Match[str]) -> str:
        first, *rest = match.group(1).split("_")
        return ":" + first + "".join(part.title() for part in rest)
    return _RULE_ARGUMENT.sub(name, rule)


# Compiling a map's rules costs milliseconds each (werkzeug writes and
# compiles a builder function per rule); the routes are declared on the API
# classes, so one map serves every router over the same classes.
_MAPS: dict[tuple[Any, ...], Map] = {}


def _route_map(apps: tuple[Any, ...]) -> Map:
    """One map of the routes of ``apps`` (Klein apps, bound or not); each
    rule's endpoint is (the app's index, its endpoint there, its template)."""
    # A bound Klein shares its class's url_map: the maps identify the routes.
    key = tuple(app.url_map for app in apps)
    found = _MAPS.get(key)
    if found is None:
        rules = []
        for index, app in enumerate(apps):
            for rule in app.url_map.iter_rules():
                copy = rule.empty()
                copy.endpoint = (index, rule.endpoint, route_template(rule.rule))
                rules.append(copy)
        found = _MAPS[key] = Map(rules)
    return found


class ApiRouter(resource.Resource):
    """
    Routes each request to the API (a Klein app bound to its instance)
    whose routes match it, and is the one place where the outcome becomes
    an answer: the route's bytes, an ApiError in the contract's format, or
    a bare 500 for anything unexpected (logged with its traceback). When no
    route matches: 404, or 405 with ``Allow`` if some route matches the path
    with another method.

    Klein declares the routes; dispatch is done here, matching each request
    once. A route still running when its client goes away runs to its end
    (its database work is never cut off half way); its answer is dropped.
    ``request.route`` is set to the matching route template, for logs and
    metrics (never a raw path).
    """

    isLeaf = True

    def __init__(self, apis: Sequence[Any]) -> None:
        super().__init__()
        self.apis = list(apis)
        # One map of every API's routes, so that a request is matched once;
        # each rule's endpoint names its app and its route there.
        self._apps = [api.app for api in self.apis]
        self._adapter = _route_map(tuple(self._apps)).bind("cyphr", "/")

    def render(self, request: Any) -> Any:
        path = _request_path(request)
        if path is None:
            return error_answer(request, NotFound())
        method = request.method.decode("ascii", "replace")
        try:
            rule, arguments = self._adapter.match(path, method, return_rule=True)
        except WerkzeugMethodNotAllowed as e:
            request.setHeader(b"Allow", ", ".join(sorted(e.valid_methods or ())).encode("ascii"))
            return error_answer(request, MethodNotAllowed())
        except (WerkzeugNotFound, RequestRedirect):
            return error_answer(request, NotFound(f"No route for {method} {path}"))
        index, endpoint, request.route = rule.endpoint
        app = self._apps[index]
        self._respond(request, maybeDeferred(app.execute_endpoint, endpoint, request, **arguments))
        return server.NOT_DONE_YET

    def _respond(self, request: Any, outcome: Deferred[Any]) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def check(body: Any) -> bytes | Streamed:
            if not isinstance(body, (bytes, Streamed)):
                raise TypeError(f"route {request.route} answered {type(body).__name__}, not bytes")
            return body

        def failed(failure: Failure) -> bytes:
            if failure.check(ApiError):
                return error_answer(request, failure.value)
            _log.failure("Unexpected error answering {method} {route}", failure,
                         method=request.method.decode("ascii", "replace"), route=request.route)
            return error_answer(request, InternalError())

        def send(body: bytes | Streamed) -> None:
            if gone:
                return
            if isinstance(body, Streamed):
                body.send(request)
                return
            request.write(body)
            request.finish()

        outcome.addCallback(check).addErrback(failed).addCallback(send)
        outcome.addErrback(lambda failure: _log.failure("Could not send an answer", failure))


class Root(resource.Resource):
    """The site's root: ``/socket.io/`` goes to the realtime resource when
    there is one, ``/metrics`` to the metrics resource when it is served
    here; every other path, ``/`` included, to the API router."""

    def __init__(self, router: resource.Resource, realtime: resource.Resource | None = None,
                 metrics: resource.Resource | None = None) -> None:
        super().__init__()
        self._router = router
        self._realtime = realtime
        self._metrics = metrics

    def getChildWithDefault(self, name: bytes, request: Any) -> resource.Resource:
        if name == b"socket.io" and self._realtime is not None:
            request.route = "/socket.io/"
            return self._realtime
        if name == b"metrics" and self._metrics is not None and not request.postpath:
            return self._metrics
        # Give the segment back: routes are matched on the whole path.
        request.postpath.insert(0, request.prepath.pop())
        return self._router

    def render(self, request: Any) -> Any:
        return self._router.render(request)


# -- the site -----------------------------------------------------------------


@dataclass(frozen=True)
class HttpPolicy:
    """What every request is held to, from the configuration."""

    max_body: int
    cors_origins: frozenset[bytes]
    trusted_networks: tuple[Any, ...]
    trust_unix: bool
    access_log: bool
    # Connections open at once in all (from the open-file limit, see
    # cyphr.connections.connection_cap), and per client address (0: no cap).
    max_connections: int
    max_connections_per_address: int
    # Seconds a client has to send a whole request, from its first byte.
    request_timeout: float

    @classmethod
    def from_config(cls, config: Config) -> HttpPolicy:
        return cls(
            max_body=config.max_body,
            cors_origins=frozenset(o.rstrip("/").encode("ascii") for o in config.cors_origin),
            trusted_networks=config.trusted_networks,
            trust_unix=config.trust_unix_peers,
            access_log=config.access_log,
            max_connections=connection_cap(config.max_connections, open_file_limit()),
            max_connections_per_address=config.max_connections_per_address,
            request_timeout=config.request_timeout,
        )

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted_networks)

    def trusts_peer(self, peer: Any) -> bool:
        """Whether the connection's peer is a trusted proxy."""
        if isinstance(peer, UNIXAddress):
            return self.trust_unix
        return self._trusted(getattr(peer, "host", "") or "")

    def client_ip(self, request: Any) -> str:
        """
        The client's address. Proxy headers are believed only when the peer
        is a trusted proxy; then X-Forwarded-For is read from the right,
        skipping trusted proxies, and X-Real-IP is the fallback.
        """
        peer = request.getClientAddress()
        if isinstance(peer, UNIXAddress):
            peer_ip, trusted = "unix", self.trust_unix
        else:
            peer_ip = getattr(peer, "host", "") or ""
            trusted = self._trusted(peer_ip)
        if not trusted:
            return peer_ip
        forwarded = b",".join(request.requestHeaders.getRawHeaders(b"x-forwarded-for", []))
        hops = [h.strip().decode("latin-1") for h in forwarded.split(b",") if h.strip()]
        for hop in reversed(hops):
            if not _valid_ip(hop):
                break  # a forged or garbled entry: trust nothing to its left
            if not self._trusted(hop):
                return hop
        real_ip = (request.getHeader(b"x-real-ip") or b"").strip().decode("latin-1")
        if _valid_ip(real_ip):
            return real_ip
        return peer_ip

    def allows_origin(self, origin: bytes) -> bool:
        return origin in self.cors_origins


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class CyphrRequest(server.Request):
    """A request held to the site's policy: body limit, headers, CORS."""

    client_ip = ""
    route = ""
    _body_refused = False
    _body_received = 0
    # The body of an upload (PATCH /api/attachments/:id), taken as it comes
    # by cyphr.api.attachments.UploadReceiver instead of being buffered.
    upload: Any = None

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # When the request line came: durations count from here.
        site = getattr(channel, "site", None)
        self.arrived = site.reactor.seconds() if site is not None else 0.0

    @property
    def policy(self) -> HttpPolicy:
        return self.channel.site.policy

    # -- the body limit: checked as it arrives, never buffered past it --

    def gotLength(self, length: int | None) -> None:
        uploads = self.channel.site.uploads
        if uploads is not None:
            method, uri = request_line(self.channel)
            self.upload = uploads.receive(self, method, uri, length)
            if self.upload is not None:
                self.content = io.BytesIO()  # stays empty
                return
        if length is not None and length > self.policy.max_body:
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.upload is not None:
            self.upload.data(data)
            return
        if self._body_refused:
            return
        self._body_received += len(data)
        if self._body_received > self.policy.max_body:
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def _refuse_body(self) -> None:
        """Answer 413 now and close the connection: the rest of the body is
        never read. Like Twisted's own answer to a malformed request, this is
        written straight to the transport, since the request line and headers
        are all there is of this request."""
        self._body_refused = True
        self.content = io.BytesIO()
        # Twisted would answer "100 Continue" after this: the client must not
        # be invited to send what will not be read.
        self.requestHeaders.removeHeader(b"expect")
        self.channel.transport.write(raw_error_answer(PayloadTooLarge(
            f"The request body is larger than {self.policy.max_body} bytes",
            details={"limit": self.policy.max_body},
        ), secure=self.isSecure(), extra=self._cors_headers()))
        method, uri = request_line(self.channel)
        if uri.startswith(b"/socket.io") and self.channel.site.on_body_refused is not None:
            self.channel.site.on_body_refused(uri)
        stats = self.channel.site.metrics
        if stats is not None:  # answered before any route was matched
            stats.observe(method.decode("ascii", "replace"), "", 413,
                          self.channel.site.reactor.seconds() - self.arrived)
        if self.policy.access_log:
            _log.info("{client} - 413 request body too large", client=self.policy.client_ip(self))
        self.channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._body_refused:
            return  # already answered
        if self.upload is not None:
            if self.upload.answered:
                return  # refused before its body ended, and answered
            self.upload.body_done()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        if self.upload is not None:
            self.upload.lost()
        super().connectionLost(reason)

    # -- every answer ---------------------------------------------------

    def _cors_headers(self) -> list[tuple[bytes, bytes]]:
        origin = self.getHeader(b"origin")
        if origin is None or not self.policy.allows_origin(origin):
            return []
        return [
            (b"Access-Control-Allow-Origin", origin),
            (b"Access-Control-Allow-Credentials", b"true"),
            (b"Access-Control-Expose-Headers", CORS_EXPOSED),
            (b"Vary", b"Origin"),
        ]

    def process(self) -> None:
        # Twisted's Request.process, with the site's policy applied first and
        # no version in the Server header (listed in cyphr._compat.COPIED).
        self.site = self.channel.site
        self.client_ip = self.policy.client_ip(self)
        self.setHeader(b"Server", b"Cyphr")
        self.setHeader(b"Date", datetimeToString())
        for name, value in SECURITY_HEADERS:
            self.setHeader(name, value)
        if self.isSecure():
            self.setHeader(b"Strict-Transport-Security", HSTS)
        for name, value in self._cors_headers():
            self.setHeader(name, value)
        if not self.channel.claim_client(self):
            self.write(error_answer(self, RateLimited(1, "Too many connections from this address")))
            self.finish()
            return
        if self.method == b"OPTIONS" and self.getHeader(b"access-control-request-method"):
            self._preflight()
            return
        self.prepath = []
        self.postpath = [unquote_to_bytes(s) for s in self.path[1:].split(b"/")]
        if self.path == b"*":
            handle_star(self)
            return
        try:
            self.render(self.site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def _preflight(self) -> None:
        origin = self.getHeader(b"origin")
        if origin is not None and self.policy.allows_origin(origin):
            self.setResponseCode(http.NO_CONTENT)
            self.setHeader(b"Access-Control-Allow-Methods", CORS_METHODS)
            self.setHeader(b"Access-Control-Allow-Headers", CORS_HEADERS)
            self.setHeader(b"Access-Control-Max-Age", CORS_MAX_AGE)
            self.finish()
            return
        self.write(error_answer(self, Forbidden(
            "This origin may not call the API", code=CORS_ORIGIN_DENIED)))
        self.finish()

    def processingFailed(self, reason: Failure) -> Failure:
        _log.failure("Unexpected error answering {method} {route}", reason,
                     method=self.method.decode("ascii", "replace"), route=self.route or "?")
        if not self.startedWriting:
            body = error_answer(self, InternalError())
            self.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
            self.write(body)
        if not self.finished:
            self.finish()
        return reason


class _Channel(http.HTTPChannel):
    """
    Twisted's HTTP channel, held to the site's connection limits:

    - At most ``max_connections`` open in all: past it a connection is
      answered 503 and closed as soon as it is accepted (it was accepted all
      the same, so that the client hears why rather than being reset).
    - At most ``max_connections_per_address`` for one client address. A
      peer that is not a trusted proxy is its own client: it is counted from
      accept, and refused with 429 at once. A trusted proxy's connection
      carries many clients, so it is not counted as one: each request it
      forwards counts for its client (X-Forwarded-For, by the trusted-proxy
      rules) while it is in flight, and is refused with 429 past the cap. A
      unix-socket peer that is not trusted is counted in all only.
    - A deadline for each request, head and body: ``request_timeout`` from
      its first byte, plus a second for each MIN_REQUEST_RATE bytes of it
      received. The idle timeout alone restarts with every byte, so a client
      trickling one byte at a time would hold the connection for ever. Once
      the request has arrived the deadline is over: the time taken to answer
      (a long-polling GET) is not the client's.

    A WebSocket that takes the connection over keeps its counts until it
    closes (see ``hand_over_connection``). Time outs do not log the client's
    address (addresses are for access logs only): ``timeoutConnection`` and
    ``forceAbortClient`` are Twisted's, less that line (cyphr._compat.COPIED).
    """

    _admitted = False
    _claimed: str | None = None    # the address this connection counts for
    _per_request = False           # a trusted proxy: clients counted per request
    _refusing = False              # answered and closing: input is ignored
    _answering = False             # a whole request arrived and is being answered
    _deadline: Any = None
    _started = 0.0
    _received = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)
        limits: ConnectionLimits = self.site.connections
        if not limits.admit():
            self._refuse(ApiError("The server has too many connections, try again shortly",
                                  code=SERVER_BUSY, status=503, headers={"Retry-After": "1"}))
            return
        self._admitted = True
        peer = self.transport.getPeer()
        if self.site.policy.trusts_peer(peer):
            self._per_request = True
        elif isinstance(peer, (IPv4Address, IPv6Address)):
            key = address_key(peer.host)
            if not limits.claim(key):
                self._refuse(RateLimited(1, "Too many connections from this address"))
                return
            self._claimed = key

    def release_connection(self) -> None:
        """Give this connection's places back (once; the WebSocket that took
        the connection over calls this when it closes)."""
        limits: ConnectionLimits = self.site.connections
        if self._claimed is not None:
            limits.unclaim(self._claimed)
            self._claimed = None
        if self._admitted:
            self._admitted = False
            limits.release()

    def hand_over_connection(self) -> Callable[[], None]:
        """The connection's places move to whoever takes the connection
        over (a WebSocket): the answer gives them back, once. The channel
        keeps nothing of them, and the answer holds nothing of the channel,
        so that neither the channel nor the request that opened the
        WebSocket live on with it (about 4 KiB a connection, measured with
        tracemalloc over 2,400 idle sockets)."""
        self.site.channels.discard(self)
        limits: ConnectionLimits = self.site.connections
        claimed, self._claimed = self._claimed, None
        admitted, self._admitted = self._admitted, False

        def release() -> None:
            nonlocal claimed, admitted
            if claimed is not None:
                limits.unclaim(claimed)
                claimed = None
            if admitted:
                admitted = False
                limits.release()
        return release

    def claim_client(self, request: CyphrRequest) -> bool:
        """On a trusted proxy's connection, count the request for its client
        until it is answered; False when that client holds too many."""
        if not self._per_request:
            return True
        key = address_key(request.client_ip)
        if not self.site.connections.claim(key):
            return False
        self._claimed = key
        request.notifyFinish().addBoth(self._request_answered, key)
        return True

    def _request_answered(self, _: Any, key: str) -> None:
        if self._claimed == key:
            self.site.connections.unclaim(key)
            self._claimed = None

    # -- the request deadline --

    def dataReceived(self, data: bytes) -> None:
        if self._refusing:
            return
        if self._deadline is None and not self._answering:
            self._started = self.site.reactor.seconds()
            self._received = 0
            self._deadline = self.callLater(self.site.policy.request_timeout, self._overdue)
        self._received += len(data)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stop_deadline()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # A request the client pipelined behind this one is replayed through
        # dataReceived from here: its deadline starts then.
        self._answering = False
        super().requestDone(request)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _overdue(self) -> None:
        self._deadline = None
        now = self.site.reactor.seconds()
        allowed = self._started + self.site.policy.request_timeout + self._received / MIN_REQUEST_RATE
        if now < allowed:
            self._deadline = self.callLater(allowed - now, self._overdue)
            return
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return  # answered already (a refused body), and closing
        self.site.connections.refused["request_timeout"] += 1
        self._refuse(ApiError("The request took too long to arrive", code=REQUEST_TIMEOUT, status=408))

    def _refuse(self, error: ApiError) -> None:
        """Answer ``error`` before (or instead of) any request, straight on
        the transport, and close: input that follows is not read."""
        self._refusing = True
        self._stop_deadline()
        self.transport.write(raw_error_answer(error, secure=self.isSecure()))
        self.loseConnection()
        # A client that does not read (or never finishes a TLS handshake)
        # must not keep the descriptor: as after an idle timeout.
        if self.abortTimeout is not None:
            set_aborting_call(self, self.callLater(self.abortTimeout, self.forceAbortClient))

    def connectionLost(self, reason: Any) -> None:
        self._stop_deadline()
        self.site.channels.discard(self)
        try:
            super().connectionLost(reason)
        finally:
            self.release_connection()

    # -- a stopping server --

    def close_when_idle(self) -> None:
        """Close now if no request is arriving or being answered; else once
        the request being answered has been (``Connection: close`` on its
        answer, if not begun yet). A request still arriving is left to
        ``CyphrSite.close_connections``."""
        if not self.requests and self._deadline is None:
            self.loseConnection()
            return
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.setHeader(b"Connection", b"close")

    def timeoutConnection(self) -> None:
        if self.abortTimeout is not None:
            set_aborting_call(self, self.callLater(self.abortTimeout, self.forceAbortClient))
        self.loseConnection()

    def forceAbortClient(self) -> None:
        set_aborting_call(self, None)
        self.transport.abortConnection()


def raw_error_answer(error: ApiError, *, secure: bool,
                     extra: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 answer carrying ``error`` in the contract's format,
    with the headers every answer has and ``Connection: close``: for what
    is answered straight on the transport, before (or instead of) a request
    (a refused body, a request that took too long, a connection over a cap)."""
    body = json_bytes(error.to_json())
    headers = [
        (b"Server", b"Cyphr"),
        (b"Date", datetimeToString()),
        (b"Content-Type", JSON_TYPE),
        (b"Content-Length", str(len(body)).encode("ascii")),
        (b"Connection", b"close"),
        *((name.encode("ascii"), value.encode("ascii")) for name, value in error.headers.items()),
        *SECURITY_HEADERS,
        *([(b"Strict-Transport-Security", HSTS)] if secure else []),
        *extra,
    ]
    head = b"HTTP/1.1 %d %s\r\n" % (error.status, http.RESPONSES.get(error.status, b"")) + b"".join(
        name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


def connection_release(request: Any) -> Callable[[], None]:
    """What gives back the places of a request's connection: for the
    WebSocket that takes the connection over, to call when it closes (the
    HTTP channel no longer hears of the connection then)."""
    channel: _Channel = request.channel
    return channel.hand_over_connection()


class CyphrSite(server.Site):
    """The one Site of a server process."""

    protocol = _Channel
    requestFactory = CyphrRequest
    displayTracebacks = False

    def __init__(self, root: resource.Resource, policy: HttpPolicy, reactor: Any,
                 timeout: float = 75, *, metrics: HttpStats | None = None,
                 on_body_refused: Callable[[bytes], None] | None = None,
                 connections: ConnectionLimits | None = None, uploads: Any = None) -> None:
        # The idle timeout must outlast a long-polling GET (pingInterval +
        # pingTimeout) and stay short enough to shed idle sockets.
        # No parsing of form bodies into request.args: the API takes JSON only.
        super().__init__(root, timeout=timeout, reactor=reactor, parsePOSTFormSubmission=False)
        self.policy = policy
        self.noisy = False
        # Where answered requests are counted (cyphr.metrics.HttpStats), if anywhere.
        self.metrics = metrics
        # Told of the path of a request whose body was refused as too large
        # (the realtime layer ends the session it was meant for), if anyone.
        self.on_body_refused = on_body_refused
        # The connections open on this site, within the policy's caps (a
        # site of its own unless given: the metrics endpoint keeps serving
        # scrapes while the API's connections are at their cap).
        self.connections = connections or ConnectionLimits(
            policy.max_connections, policy.max_connections_per_address)
        # What takes upload bodies as they arrive
        # (cyphr.api.attachments.UploadReceiver), if anything.
        self.uploads = uploads
        # The HTTP connections open on this site, but for those a WebSocket
        # has taken over (the realtime layer closes those): a server that
        # stops closes them (close_connections), rather than leave them to
        # the idle timeout or to the process's exit.
        self.channels: set[_Channel] = set()

    def close_connections(self, *, when_idle: bool = False, abort: bool = False) -> int:
        """Close the open HTTP connections: with ``when_idle`` (a stop
        begins) each as soon as it has no request in hand; else now, what
        they hold still written first, or with ``abort`` not (the stop ran
        out of time). Answers how many were open."""
        channels = list(self.channels)
        for channel in channels:
            if when_idle:
                channel.close_when_idle()
            elif abort:
                channel.transport.abortConnection()
            else:
                channel.loseConnection()
        return len(channels)

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only, offered by ALPN on TLS endpoints, whatever Twisted
        could speak: its HTTP/2 (offered once the ``priority`` package is
        installed) would take the connection from ``_Channel``, out of the
        site's connection caps and request deadlines, and the places it took
        would never be given back."""
        return [b"http/1.1"]

    def log(self, request: Any) -> None:
        # Called once for each request that is answered.
        if self.metrics is not None:
            self.metrics.observe(request.method.decode("ascii", "replace"), request.route,
                                 request.code, self.reactor.seconds() - request.arrived)
        # Access logs hold client addresses: only when the operator asks.
        if not self.policy.access_log:
            return
        _log.info(
            '{client} "{method} {path}" {code} {length}',
            client=request.client_ip,
            method=request.method.decode("ascii", "replace"),
            path=request.uri.decode("ascii", "replace").split("?", 1)[0],
            code=request.code,
            length=request.sentLength,
        )

