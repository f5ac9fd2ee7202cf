"""
A strict stand-in for APNs, for tests: an HTTP/2 server over TLS on
127.0.0.1 (a port of the system's choice), built on the h2 library and
plain sockets, in threads of its own (so that it answers whatever the
reactor does, and a client blocking a thread is served all the same). Its
certificate is from a trustme CA, whose certificate ``ca_path`` holds.

It takes pushes the way APNs does, but checks more, so that a test can
assert that the server's requests hold nothing APNs could refuse: the
connection is HTTP/2 (ALPN h2, nothing else); a request is ``POST
/3/device/<hex token>``; its ``authorization: bearer <jwt>`` is an ES256
JWT that verifies with ``key`` (checked with PyJWT, apart from
cyphr.push.apns), whose ``kid`` and ``iss`` are ``key_id`` and
``team_id``, whose ``iat`` is within the last hour, and that replaces the
connection's last one no sooner than 20 minutes after it (unless that one
was called expired); ``apns-topic``
is there, ``apns-push-type`` is ``alert``, the other apns- headers are
well-formed; the body is a JSON object of at most 4096 bytes whose ``aps``
has an ``alert`` and ``mutable-content: 1``.

A well-formed push is recorded in ``received`` and answered 200 with an
``apns-id``, or as the test said for its token: a status with Apple's
``{"reason": ...}`` (once or from now on), or no answer at all; or 403
ExpiredProviderToken when it carries a provider token called expired
(expire_provider_token(), or such an answer the test set). Anything
malformed is answered as APNs answers it (400, 403, 404, 405, 413 or 429,
with Apple's reason) and its fault recorded in ``errors``.

    service = ApnsService(clock=clock)
    service.start()
    self.addCleanup(service.stop)
    ... ApnsSender(reactor, service.key_pem, service.key_id, service.team_id,
                   endpoint=service.endpoint, verify=service.ca_path) ...
    self.assertEqual(service.errors, [])
    self.assertEqual(service.received[0].token, token)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

MAX_BODY = 4096
TOKEN_LIFETIME = 3600          # an older iat is ExpiredProviderToken
MIN_TOKEN_UPDATE = 20 * 60     # a sooner change is TooManyProviderTokenUpdates
CLOCK_SKEW = 60                # an iat this far ahead is taken still
# What the stand-in reads of a body before it judges it (413 past MAX_BODY).
_READ_CAP = 64 * 1024
_PATH = re.compile(r"/3/device/(.*)")
_DEVICE_TOKEN = re.compile(r"(?:[0-9a-f]{2}){32,100}")
_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PUSH_TYPES = {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm",
               "liveactivity", "pushtotalk"}


class Malformed(Exception):
    """What is wrong with a push: answered ``status`` with Apple's ``reason``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Received:
    """A well-formed push: its device token, its headers (pseudo-headers
    too: ``:authority``...), its body, and which connection it came on
    (connections are numbered from 1 as they come)."""

    token: str
    headers: dict[str, str]
    body: bytes
    connection: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Answer:
    status: int = 200
    reason: str | None = None
    retry_after: str | None = None
    once: bool = False
    hang: bool = False


@dataclass
class _Stream:
    headers: list[tuple[str, str]]
    body: bytearray


class _Connection:
    """One client connection's HTTP/2 state, on its own thread."""

    def __init__(self, number: int, sock: ssl.SSLSocket) -> None:
        self.number = number
        self.sock = sock
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, _Stream] = {}
        # The provider token last taken on this connection, and its iat.
        self.token: str | None = None
        self.token_iat = 0


class ApnsService:
    """The stand-in. ``clock`` (an object with ``seconds()``; the wall
    clock unless given) is what ``iat`` is judged by: the sender's, when a
    test moves it. ``ca`` is the trustme CA to issue the certificate from
    and ``key`` the signing key whose tokens are taken (one of each for
    several stand-ins, production and sandbox, so that one sender is
    taken by all): new ones unless given."""

    def __init__(self, *, key_id: str = "KEYID12345", team_id: str = "TEAMID6789",
                 clock: Any = None, ca: trustme.CA | None = None,
                 key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self.key_id = key_id
        self.team_id = team_id
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self.key_pem = self.key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        self.ca = ca or trustme.CA()
        self.endpoint = ""
        self.ca_path = ""
        self.received: list[Received] = []
        self.errors: list[str] = []
        self.connections = 0
        self._now = time.time if clock is None else clock.seconds
        self._answers: dict[str, _Answer] = {}
        self._expired: set[str] = set()  # provider tokens called expired
        self._expire_next = False
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._directory = ""

    # -- the test's side --------------------------------------------------------

    def start(self) -> None:
        """Listen on 127.0.0.1, on a port of the system's choice."""
        self._directory = tempfile.mkdtemp(prefix="apns-stand-in-")
        self.ca_path = os.path.join(self._directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_COMPRESSION  # as HTTP/2 requires
        context.set_alpn_protocols(["h2"])
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._context = context
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        # accept() wakes up this often to see whether stop() was called.
        listener.settimeout(0.05)
        self._listener = listener
        self.endpoint = f"https://127.0.0.1:{listener.getsockname()[1]}"
        self._spawn(self._accept, "apns-stand-in-accept")

    def stop(self) -> None:
        """Stop listening and close every connection (hanging ones too);
        returns once the stand-in's threads have ended."""
        self._stopping = True
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            try:
                # The socket's own shutdown, not SSLSocket's (which drops
                # the TLS state under the reading thread's feet): recv()
                # returns, and the connection's thread ends.
                socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = ""

    def answer(self, token: str, status: int, reason: str | None = None, *,
               retry_after: str | None = None, once: bool = False) -> None:
        """Answer the token's well-formed pushes with this status and
        Apple's reason (and Retry-After): the next one only (``once``), or
        from now on."""
        with self._lock:
            self._answers[token] = _Answer(status, reason, retry_after, once)

    def expire_provider_token(self) -> None:
        """Call the provider token of the next well-formed push expired:
        it is answered 403 ExpiredProviderToken, and so is every push that
        carries that token from then on (those sent with it before the
        sender knew, too: as APNs does)."""
        with self._lock:
            self._expire_next = True

    def hang(self, token: str) -> None:
        """Never answer the token's pushes (they are still checked and
        recorded)."""
        with self._lock:
            self._answers[token] = _Answer(hang=True)

    def received_for(self, token: str) -> list[Received]:
        return [r for r in self.received if r.token == token]

    # -- APNs' side ---------------------------------------------------------------

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            while not self._stopping:
                try:
                    raw, _ = self._listener.accept()
                except TimeoutError:
                    continue
                # The handshake's bound; then recv() waits for as long as
                # it takes (stop() shuts the socket).
                raw.settimeout(5)
                with self._lock:
                    self.connections += 1
                    number = self.connections
                self._spawn(self._serve, f"apns-stand-in-{number}", raw, number)
        finally:
            self._listener.close()

    def _serve(self, raw: socket.socket, number: int) -> None:
        try:
            sock = self._context.wrap_socket(raw, server_side=True)
            sock.settimeout(None)
        except (ssl.SSLError, OSError) as e:
            self._error(f"connection {number}: the TLS handshake failed ({type(e).__name__})")
            raw.close()
            return
        connection = _Connection(number, sock)
        with self._lock:
            self._open.add(connection)
        try:
            if sock.selected_alpn_protocol() != "h2":
                self._error(f"connection {number}: ALPN chose {sock.selected_alpn_protocol()!r},"
                            " not h2")
                return
            connection.h2.initiate_connection()
            sock.sendall(connection.h2.data_to_send())
            while not self._stopping:
                data = sock.recv(65536)
                if not data:
                    return
                try:
                    events = connection.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    self._error(f"connection {number}: not HTTP/2 ({type(e).__name__})")
                    sock.sendall(connection.h2.data_to_send())
                    return
                for event in events:
                    self._event(connection, event)
                sock.sendall(connection.h2.data_to_send())
        except (OSError, ValueError):
            pass  # the client went, or stop() shut the socket
        finally:
            with self._lock:
                self._open.discard(connection)
            sock.close()

    def _event(self, connection: _Connection, event: Any) -> None:
        if isinstance(event, h2.events.RequestReceived):
            connection.streams[event.stream_id] = _Stream(list(event.headers), bytearray())
        elif isinstance(event, h2.events.DataReceived):
            stream = connection.streams.get(event.stream_id)
            if stream is not None and len(stream.body) < _READ_CAP:
                stream.body += event.data
            connection.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self._request(connection, event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            connection.streams.pop(event.stream_id, None)

    def _request(self, connection: _Connection, stream_id: int) -> None:
        stream = connection.streams.pop(stream_id, None)
        if stream is None:
            return
        try:
            received, authorization = self._check(connection, stream)
        except Malformed as e:
            self._error(f"connection {connection.number}, stream {stream_id}: {e}")
            self._respond(connection, stream_id, e.status, e.reason)
            return
        with self._lock:
            self.received.append(received)
            if self._expire_next:
                self._expire_next = False
                self._expired.add(authorization)
            if authorization in self._expired:
                answer = _Answer(403, "ExpiredProviderToken")
            else:
                answer = self._answers.get(received.token, _Answer())
                if answer.once:
                    del self._answers[received.token]
                if answer.status == 403 and answer.reason == "ExpiredProviderToken":
                    self._expired.add(authorization)
        if answer.hang:
            return  # the client gives up, and resets the stream or closes
        self._respond(connection, stream_id, answer.status, answer.reason, answer.retry_after)

    @staticmethod
    def _respond(connection: _Connection, stream_id: int, status: int, reason: str | None,
                 retry_after: str | None = None) -> None:
        headers = [(":status", str(status)), ("apns-id", str(uuid.uuid4()).upper())]
        if retry_after is not None:
            headers.append(("retry-after", retry_after))
        if reason is None:
            connection.h2.send_headers(stream_id, headers, end_stream=True)
            return
        body: dict[str, Any] = {"reason": reason}
        if status == 410:
            body["timestamp"] = 1_700_000_000_000
        data = json.dumps(body).encode("utf-8")
        headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
        connection.h2.send_headers(stream_id, headers)
        connection.h2.send_data(stream_id, data, end_stream=True)

    # -- the checks -------------------------------------------------------------

    def _check(self, connection: _Connection, stream: _Stream) -> tuple[Received, str]:
        headers: dict[str, str] = {}
        for name, value in stream.headers:
            if name in headers:
                raise Malformed(400, "BadRequest", f"more than one {name} header")
            headers[name] = value
        if headers.get(":method") != "POST":
            raise Malformed(405, "MethodNotAllowed", f"the method is {headers.get(':method')!r}")
        if headers.get(":scheme") != "https":
            raise Malformed(400, "BadRequest", f"the scheme is {headers.get(':scheme')!r}")
        match = _PATH.fullmatch(headers.get(":path", ""))
        if match is None:
            raise Malformed(404, "BadPath", f"the path is {headers.get(':path')!r}")
        token = match.group(1)
        if not _DEVICE_TOKEN.fullmatch(token):
            raise Malformed(400, "BadDeviceToken", "the device token is not lower-case hex")
        authorization = self._check_provider_token(connection, headers.get("authorization"))
        self._check_headers(headers)
        body = bytes(stream.body)
        length = headers.get("content-length")
        if length is not None and length != str(len(body)):
            raise Malformed(400, "BadRequest", "the content-length is not the body's")
        self._check_body(body)
        return Received(token, headers, body, connection.number), authorization

    def _check_provider_token(self, connection: _Connection, authorization: str | None) -> str:
        if authorization is None:
            raise Malformed(403, "MissingProviderToken", "no authorization header")
        scheme, _, token = authorization.partition(" ")
        if scheme != "bearer" or not token:
            raise Malformed(403, "InvalidProviderToken",
                            f"the authorization scheme is {scheme!r}, not bearer")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, self.key.public_key(), algorithms=["ES256"],
                                options={"require": ["iss", "iat"], "verify_iat": False})
        except jwt.PyJWTError as e:
            raise Malformed(403, "InvalidProviderToken",
                            f"the provider token does not verify ({type(e).__name__})") from None
        if header.get("kid") != self.key_id or set(header) - {"alg", "kid", "typ"}:
            raise Malformed(403, "InvalidProviderToken", f"the JWT header is {header!r}")
        if set(claims) != {"iss", "iat"} or claims["iss"] != self.team_id:
            raise Malformed(403, "InvalidProviderToken", f"the JWT claims are {claims!r}")
        iat = claims["iat"]
        if not isinstance(iat, int) or isinstance(iat, bool):
            raise Malformed(403, "InvalidProviderToken", f"the iat {iat!r} is not whole seconds")
        now = self._now()
        if iat > now + CLOCK_SKEW:
            raise Malformed(403, "InvalidProviderToken", "the iat is in the future")
        if iat < now - TOKEN_LIFETIME:
            raise Malformed(403, "ExpiredProviderToken", "the provider token is over an hour old")
        with self._lock:
            previous_expired = connection.token in self._expired
        if connection.token is not None and authorization != connection.token:
            if not previous_expired and iat - connection.token_iat < MIN_TOKEN_UPDATE:
                raise Malformed(429, "TooManyProviderTokenUpdates",
                                "the provider token changed within 20 minutes")
        connection.token, connection.token_iat = authorization, iat
        return authorization

    @staticmethod
    def _check_headers(headers: dict[str, str]) -> None:
        topic = headers.get("apns-topic")
        if topic is None:
            raise Malformed(400, "MissingTopic", "no apns-topic")
        if not _TOPIC.fullmatch(topic):
            raise Malformed(400, "BadTopic", f"the apns-topic {topic!r} is not a bundle id")
        push_type = headers.get("apns-push-type")
        if push_type not in _PUSH_TYPES:
            raise Malformed(400, "InvalidPushType", f"the apns-push-type is {push_type!r}")
        if push_type != "alert":
            raise Malformed(400, "InvalidPushType", f"a wake-up is an alert, not {push_type!r}")
        priority = headers.get("apns-priority")
        if priority is not None and priority not in ("1", "5", "10"):
            raise Malformed(400, "BadPriority", f"the apns-priority is {priority!r}")
        expiration = headers.get("apns-expiration")
        if expiration is not None and not (expiration.isascii() and expiration.isdigit()):
            raise Malformed(400, "BadExpirationDate", f"the apns-expiration is {expiration!r}")
        collapse_id = headers.get("apns-collapse-id")
        if collapse_id is not None and not 0 < len(collapse_id.encode("utf-8")) <= 64:
            raise Malformed(400, "BadCollapseId", "the apns-collapse-id is not 1 to 64 bytes")
        message_id = headers.get("apns-id")
        if message_id is not None and not _UUID.fullmatch(message_id):
            raise Malformed(400, "BadMessageId", f"the apns-id {message_id!r} is not a UUID")

    @staticmethod
    def _check_body(body: bytes) -> None:
        if not body:
            raise Malformed(400, "PayloadEmpty", "the body is empty")
        if len(body) > MAX_BODY:
            raise Malformed(413, "PayloadTooLarge", f"the body is over {MAX_BODY} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise Malformed(400, "BadRequest", "the body is not JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            raise Malformed(400, "BadRequest", "the body is not an object with an aps object")
        aps = payload["aps"]
        if "alert" not in aps:
            raise Malformed(400, "BadRequest", "the aps has no alert")
        if aps.get("mutable-content") != 1:
            raise Malformed(400, "BadRequest", "the aps's mutable-content is not 1")
