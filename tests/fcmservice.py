"""
Strict stand-ins for Google's OAuth 2 token endpoint and for FCM's HTTP v1
API, on Twisted, for tests: both listen on one port of 127.0.0.1 (plain
HTTP), answer as the real ones do, and check more, so that a test can
assert that the server's requests hold nothing Google could refuse.

- ``POST /token`` takes the JWT-bearer grant (RFC 7523) that google-auth
  makes for a service account: the form's ``grant_type`` and ``assertion``
  only, the assertion an RS256 JWT that verifies with the public key of the
  service account the stand-in made (``service_account()``, whose
  ``token_uri`` points here), ``iss`` its client_email, ``aud`` Google's
  token endpoint (what google-auth writes, whatever the token_uri, and what
  the real one checks), a ``scope`` with firebase.messaging, ``iat`` now
  and ``exp`` within the hour. It answers an access token that lasts
  ``expires_in`` seconds, and counts them in ``issued``.
- ``POST /v1/projects/<project>/messages:send`` takes a message for a
  device token the stand-in made (``device()``), from a project it serves,
  with ``Authorization: Bearer <a token it issued, not expired>``, a body
  ``{"message": {"token", "data", "android"}}``: data values all strings,
  no reserved data key, ``android.priority`` "high", a TTL, no
  ``notification`` block anywhere. A well-formed one is recorded in
  ``received`` and answered 200 ``{"name": ...}``, or as the test said for
  its device token (see answer(): UNREGISTERED, INVALID_ARGUMENT, ...; or
  no answer at all).

Anything malformed, on either endpoint, is answered 400 (401 for an access
token it did not issue or that has expired) and its fault recorded in
``errors``.

    service = FcmService(reactor)
    service.start()
    self.addCleanup(service.stop)
    sender = FcmSender(reactor, service.service_account(), base_url=service.base_url)
    token = service.device()
    ... push to token ...
    self.assertEqual(service.errors, [])
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.web import server

from tests.pushservice import StandInSite, _Tracking

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
PROJECT = "cyphr-test"
MAX_ASSERTION_LIFETIME = 3600
CLOCK_SKEW = 60  # seconds an assertion's iat may be ahead
MAX_TTL = 28 * 24 * 3600
MAX_DATA_SIZE = 4096
_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_TTL = re.compile(r"([0-9]+)(\.[0-9]{1,9})?s")
_RSA_KEYS: list[rsa.RSAPrivateKey] = []


# Google's service-account keys are 2048-bit; the stand-in's are 1024-bit:
# signing and verifying RS256 go the same way, and every sender made loads
# the key twice (cryptography's checks of a private key cost 30 ms at 2048
# bits, 5 ms at 1024).
RSA_KEY_SIZE = 1024


def rsa_key() -> rsa.RSAPrivateKey:
    """An RSA key, made once per process (they are slow to make)."""
    if not _RSA_KEYS:
        _RSA_KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE))
    return _RSA_KEYS[0]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Malformed(Exception):
    """What is wrong with a request, in a few words; answered ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _unb64url(text: str, what: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise Malformed(f"{what} is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise Malformed(f"{what} is not base64url") from None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Malformed(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise Malformed(f"{what} is not a JSON object")
    return value


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Answer:
    """An FCM error answer: HTTP status, the error's status, FCM's
    errorCode (None: no FcmError detail), its message."""

    status: int
    error_status: str
    error_code: str | None
    message: str
    retry_after: str | None = None
    names_token: bool = False

    def body(self) -> dict[str, Any]:
        details: list[dict[str, Any]] = []
        if self.error_code is not None:
            details.append({"@type": _FCM_ERROR, "errorCode": self.error_code})
        if self.names_token:
            details.append({"@type": _BAD_REQUEST, "fieldViolations": [
                {"field": "message.token", "description": "Invalid registration token"}]})
        error: dict[str, Any] = {"code": self.status, "message": self.message,
                                 "status": self.error_status}
        if details:
            error["details"] = details
        return {"error": error}


# What FCM answers, as its documentation and the wire show it.
UNREGISTERED = Answer(404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found.")
INVALID_TOKEN = Answer(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                       "The registration token is not a valid FCM registration token",
                       names_token=True)
INVALID_ARGUMENT = Answer(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                          "Invalid value at 'message.android.ttl'")
QUOTA_EXCEEDED = Answer(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED",
                        "Quota exceeded for quota metric 'Send messages'", retry_after="30")
INTERNAL = Answer(500, "INTERNAL", "INTERNAL", "Internal error encountered.")
UNAVAILABLE = Answer(503, "UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable.")
SENDER_ID_MISMATCH = Answer(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH",
                            "SenderId mismatch")
THIRD_PARTY_AUTH_ERROR = Answer(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR",
                                "Auth error from APNS or Web Push Service")
UNAUTHENTICATED = Answer(401, "UNAUTHENTICATED", None,
                         "Request had invalid authentication credentials. Expected OAuth 2 "
                         "access token, login cookie or other valid authentication credential.")


@dataclass(frozen=True)
class Received:
    """A well-formed message: the device token, the project of the path,
    the whole ``message`` object, and the access token it came with."""

    token: str
    project: str
    message: dict[str, Any]
    access_token: str


@dataclass
class _Behaviour:
    answer: Answer | None = None  # None: 200
    once: bool = False
    hang: bool = False


class _Account:
    def __init__(self, email: str, key_id: str, public_key: rsa.RSAPublicKey) -> None:
        self.email = email
        self.key_id = key_id
        self.public_key = public_key


class FcmService(StandInSite):
    """The stand-ins: a twisted.web resource answering ``POST /token`` and
    ``POST /v1/projects/<project>/messages:send``."""

    isLeaf = True

    def __init__(self, reactor: Any, *, projects: tuple[str, ...] = (PROJECT,),
                 audience: str = GOOGLE_TOKEN_URI) -> None:
        super().__init__()
        self._reactor = reactor
        self.projects = set(projects)
        self.audience = audience
        self.origin = ""
        self.expires_in = 3600
        self.issued = 0
        self.received: list[Received] = []
        self.errors: list[str] = []
        self._accounts: dict[str, _Account] = {}
        self._access: dict[str, float] = {}  # access token -> when it runs out
        self._revoked: set[str] = set()
        self._devices: set[str] = set()
        self._behaviours: dict[str, _Behaviour] = {}
        self._token_refusal: tuple[int, str] | None = None
        self._tokens_hang = False
        self._port: Any = None
        self._factory: _Tracking | None = None

    # -- the test's side --------------------------------------------------------

    @property
    def base_url(self) -> str:
        """FCM's base URL, for FcmSender."""
        return self.origin

    @property
    def token_uri(self) -> str:
        return f"{self.origin}/token"

    def service_account(self, *, project_id: str = PROJECT,
                        key: rsa.RSAPrivateKey | None = None, known: bool = True) -> dict[str, Any]:
        """
        A service account's JSON (as the Firebase console gives it, read
        into a dict) whose token_uri is the stand-in. Its key is taken as
        the account's unless ``known`` is False (then the stand-in has
        another public key for it: its grants do not verify).
        """
        if not self.origin:
            raise RuntimeError("start() the stand-in first")
        key = key or rsa_key()
        key_id = os.urandom(20).hex()
        email = f"cyphr-push-{os.urandom(3).hex()}@{project_id}.iam.gserviceaccount.com"
        public = key.public_key() if known else rsa.generate_private_key(
            public_exponent=65537, key_size=RSA_KEY_SIZE).public_key()
        self._accounts[email] = _Account(email, key_id, public)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
        return {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": str(int.from_bytes(os.urandom(8), "big")),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/x",
            "universe_domain": "googleapis.com",
        }

    def device(self) -> str:
        """A new device's registration token (FCM's look: long, with a colon)."""
        token = f"{b64url(os.urandom(16))}:APA91b{b64url(os.urandom(100))}"
        self._devices.add(token)
        return token

    def answer(self, token: str, answer: Answer, *, once: bool = False) -> None:
        """Answer the device's well-formed messages so from now on (or the
        next one only); UNAUTHENTICATED also revokes the access token it
        came with, as a token revoked or run out early on Google's side."""
        self._behaviours[token] = _Behaviour(answer, once)

    def hang(self, token: str) -> None:
        """Never answer the device's messages (they are still checked and
        recorded)."""
        self._behaviours[token] = _Behaviour(hang=True)

    def refuse_tokens(self, status: int = 400, error: str = "invalid_grant") -> None:
        """Answer every well-formed grant with this OAuth error."""
        self._token_refusal = (status, error)

    def hang_tokens(self) -> None:
        """Never answer a grant (it is still checked)."""
        self._tokens_hang = True

    def received_for(self, token: str) -> list[Received]:
        return [r for r in self.received if r.token == token]

    # -- the endpoints ----------------------------------------------------------

    def render(self, request: Any) -> Any:
        path = request.path.decode("ascii", "replace")
        request.setHeader(b"Content-Type", b"application/json; charset=UTF-8")
        if path == "/token":
            endpoint = self._token
        elif (match := re.fullmatch(r"/v1/projects/([^/]+)/messages:send", path)) is not None:
            return self._fcm(request, match.group(1))
        else:
            request.setResponseCode(404)
            return b"{}"
        if request.method != b"POST":
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"POST")
            return b"{}"
        return endpoint(request)

    @staticmethod
    def _one(request: Any, name: str) -> str | None:
        values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
        if values is None:
            return None
        if len(values) != 1:
            raise Malformed(f"more than one {name} header")
        try:
            return values[0].decode("ascii")
        except UnicodeDecodeError:
            raise Malformed(f"the {name} header is not ASCII") from None

    # -- the token endpoint -------------------------------------------------------

    def _token(self, request: Any) -> bytes:
        try:
            self._check_grant(request)
        except Malformed as e:
            self.errors.append(f"token: {e}")
            request.setResponseCode(e.status)
            return json.dumps({"error": "invalid_grant", "error_description": str(e)}).encode()
        if self._tokens_hang:
            request.notifyFinish().addErrback(lambda _: None)
            return server.NOT_DONE_YET
        if self._token_refusal is not None:
            status, error = self._token_refusal
            request.setResponseCode(status)
            return json.dumps({"error": error, "error_description": "refused by the test"}).encode()
        access = f"ya29.{b64url(os.urandom(48))}"
        self._access[access] = self._reactor.seconds() + self.expires_in
        self.issued += 1
        return json.dumps({"access_token": access, "expires_in": self.expires_in,
                           "token_type": "Bearer"}).encode()

    def _check_grant(self, request: Any) -> None:
        content_type = self._one(request, "Content-Type") or ""
        if content_type.split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise Malformed(f"the Content-Type is {content_type!r}, not a form")
        try:
            form = urllib.parse.parse_qs(request.content.read().decode("ascii"),
                                         keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise Malformed("the body is not a form") from None
        if set(form) != {"grant_type", "assertion"} or any(len(v) != 1 for v in form.values()):
            raise Malformed(f"the form's fields are {sorted(form)}, not grant_type and assertion")
        if form["grant_type"][0] != JWT_BEARER:
            raise Malformed(f"the grant_type is {form['grant_type'][0]!r}")

        parts = form["assertion"][0].split(".")
        if len(parts) != 3:
            raise Malformed("the assertion is not a JWS of three parts")
        header = _json_object(_unb64url(parts[0], "the JWT header"), "the JWT header")
        claims = _json_object(_unb64url(parts[1], "the JWT claims"), "the JWT claims")
        signature = _unb64url(parts[2], "the JWT signature")
        if header.get("alg") != "RS256":
            raise Malformed(f"the JWT's alg is {header.get('alg')!r}, not RS256")
        if "typ" in header and str(header["typ"]).upper() != "JWT":
            raise Malformed(f"the JWT's typ is {header['typ']!r}")
        iss = claims.get("iss")
        account = self._accounts.get(iss) if isinstance(iss, str) else None
        if account is None:
            raise Malformed("the JWT's iss is no service account of ours")
        if "kid" in header and header["kid"] != account.key_id:
            raise Malformed("the JWT's kid is not the account's private_key_id")
        try:
            account.public_key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"),
                                      padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise Malformed("the JWT's signature does not verify with the account's key") from None
        if claims.get("aud") != self.audience:
            raise Malformed(f"the JWT's aud {claims.get('aud')!r} is not {self.audience!r}")
        scope = claims.get("scope")
        if not isinstance(scope, str) or FCM_SCOPE not in scope.split(" "):
            raise Malformed(f"the JWT's scope {scope!r} has not firebase.messaging")
        iat, exp = claims.get("iat"), claims.get("exp")
        now = self._reactor.seconds()
        if not _int(iat) or not _int(exp):
            raise Malformed("the JWT's iat and exp are not numbers of seconds")
        if iat > now + CLOCK_SKEW:
            raise Malformed("the JWT's iat is in the future")
        if exp <= now:
            raise Malformed("the JWT has expired")
        if exp - iat > MAX_ASSERTION_LIFETIME:
            raise Malformed("the JWT lasts more than an hour")

    # -- FCM ------------------------------------------------------------------------

    def _fcm(self, request: Any, project: str) -> Any:
        try:
            if request.method != b"POST":
                raise Malformed("not a POST", 405)
            access = self._check_access(request)
            if project not in self.projects:
                raise Malformed(f"the project {project!r} is not one served here", 403)
            message = self._check_message(request)
        except Malformed as e:
            self.errors.append(f"fcm: {e}")
            request.setResponseCode(e.status)
            status = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}.get(
                e.status, "INVALID_ARGUMENT")
            return json.dumps({"error": {"code": e.status, "message": str(e),
                                         "status": status}}).encode()
        token = message["token"]
        if token not in self._devices:
            # What FCM answers a token it cannot read (not the test's error).
            return self._error(request, INVALID_TOKEN)
        self.received.append(Received(token, project, message, access))
        behaviour = self._behaviours.get(token, _Behaviour())
        if behaviour.once:
            del self._behaviours[token]
        if behaviour.hang:
            request.notifyFinish().addErrback(lambda _: None)
            return server.NOT_DONE_YET
        if behaviour.answer is not None:
            if behaviour.answer is UNAUTHENTICATED:
                self._revoked.add(access)
            return self._error(request, behaviour.answer)
        return json.dumps({"name": f"projects/{project}/messages/0:{b64url(os.urandom(12))}"}
                          ).encode()

    @staticmethod
    def _error(request: Any, answer: Answer) -> bytes:
        request.setResponseCode(answer.status)
        if answer.retry_after is not None:
            request.setHeader(b"Retry-After", answer.retry_after.encode("ascii"))
        if answer.status == 401:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="https://accounts.google.com/"')
        return json.dumps(answer.body()).encode("utf-8")

    def _check_access(self, request: Any) -> str:
        authorization = self._one(request, "Authorization")
        if authorization is None:
            raise Malformed("no Authorization header", 401)
        scheme, _, access = authorization.partition(" ")
        if scheme != "Bearer" or not access:
            raise Malformed(f"the Authorization scheme is {scheme!r}, not Bearer", 401)
        expires = self._access.get(access)
        if expires is None:
            raise Malformed("an access token that was not issued here", 401)
        if access in self._revoked:
            raise Malformed("an access token revoked by a 401 before", 401)
        if self._reactor.seconds() >= expires:
            raise Malformed("an access token that has expired", 401)
        return access

    def _check_message(self, request: Any) -> dict[str, Any]:
        content_type = self._one(request, "Content-Type") or ""
        if content_type.split(";")[0].strip() != "application/json":
            raise Malformed(f"the Content-Type is {content_type!r}, not JSON")
        body = _json_object(request.content.read(), "the body")
        if set(body) != {"message"}:
            raise Malformed(f"the body's fields are {sorted(body)}, not message")
        message = body["message"]
        if not isinstance(message, dict):
            raise Malformed("the message is not an object")
        if "notification" in message:
            raise Malformed("the message has a notification block")
        unexpected = set(message) - {"token", "data", "android"}
        if unexpected:
            raise Malformed(f"the message has {sorted(unexpected)}")
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise Malformed("the message has no token")
        data = message.get("data")
        if not isinstance(data, dict) or not data:
            raise Malformed("the message has no data")
        for key, value in data.items():
            if key in ("from", "message_type", "notification") or key.lower().startswith(
                    ("google", "gcm")):
                raise Malformed(f"the data key {key!r} is reserved")
            if not isinstance(value, str):
                raise Malformed(f"the data value of {key!r} is not a string")
        if sum(len(k.encode()) + len(v.encode()) for k, v in data.items()) > MAX_DATA_SIZE:
            raise Malformed("the data is over 4096 bytes")
        android = message.get("android")
        if not isinstance(android, dict):
            raise Malformed("the message has no android block")
        if "notification" in android:
            raise Malformed("the android block has a notification")
        unexpected = set(android) - {"priority", "ttl", "collapse_key"}
        if unexpected:
            raise Malformed(f"the android block has {sorted(unexpected)}")
        if android.get("priority") != "high":
            raise Malformed(f"the android priority is {android.get('priority')!r}, not high")
        ttl = android.get("ttl")
        match = _TTL.fullmatch(ttl) if isinstance(ttl, str) else None
        if match is None:
            raise Malformed(f"the android ttl {ttl!r} is not a duration like '3.5s'")
        if int(match.group(1)) > MAX_TTL:
            raise Malformed("the android ttl is over 4 weeks")
        collapse_key = android.get("collapse_key")
        if collapse_key is not None and (not isinstance(collapse_key, str) or not collapse_key):
            raise Malformed("the android collapse_key is not a string")
        return message
