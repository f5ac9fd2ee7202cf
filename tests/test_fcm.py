"""
cyphr.push.fcm: the FCM HTTP v1 sender, with its OAuth 2 access tokens
from google-auth, against the strict stand-ins of tests/fcmservice.py
(Google's token endpoint and FCM) on 127.0.0.1, one per test; and the
stand-ins themselves.
"""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.parse
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers

from cyphr.handlers.push import TOPIC, TTL
from cyphr.push.fcm import MAX_TTL, FcmSender, data_map, fcm_result
from cyphr.push.webpush import PushResult
from cyphr.store.push import Registration
from tests.fcmservice import (
    FCM_SCOPE,
    GOOGLE_TOKEN_URI,
    INTERNAL,
    INVALID_ARGUMENT,
    INVALID_TOKEN,
    JWT_BEARER,
    PROJECT,
    QUOTA_EXCEEDED,
    SENDER_ID_MISMATCH,
    THIRD_PARTY_AUTH_ERROR,
    UNAUTHENTICATED,
    UNAVAILABLE,
    UNREGISTERED,
    FcmService,
    b64url,
    rsa_key,
)

OTHER_PROJECT = "other-app"


def registration(token: str | None, *, counter: int = 4, app_id: str | None = None) -> Registration:
    return Registration(user_id="user-7f3a", device_id=3, kind="fcm", token=token, endpoint=None,
                        p256dh=None, auth=None, app_id=app_id, sandbox=False, counter=counter)


def drain_payload(reg: Registration) -> bytes:
    """The payload cyphr.handlers.push's drain sends: the next counter."""
    return json.dumps({"n": reg.counter + 1}, separators=(",", ":")).encode()


def closed_port() -> Any:
    """A port on 127.0.0.1 that nothing listens on (once the Deferred fires)."""
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    number = port.getHost().port
    return port.stopListening().addCallback(lambda _: number)


class _Collect(Protocol):
    """An answer's whole body (readBody warns on Agent's transports)."""

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self._parts))


class SenderTests(TestCase):
    """The sender against the stand-ins, over a real port."""

    def setUp(self) -> None:
        self.service = FcmService(reactor, projects=(PROJECT, OTHER_PROJECT))
        self.service.start()
        self.addCleanup(self.service.stop)
        self.sender = self.make_sender()

    def make_sender(self, timeout: float = 10, account: dict[str, Any] | None = None,
                    base_url: str | None = None) -> FcmSender:
        sender = FcmSender(reactor, account or self.service.service_account(),
                           base_url=base_url or self.service.base_url, timeout=timeout)
        self.addCleanup(sender.close)
        return sender

    def push(self, reg: Registration, sender: FcmSender | None = None) -> Deferred[PushResult]:
        return (sender or self.sender).send(reg, drain_payload(reg), ttl=TTL, topic=TOPIC)

    async def test_round_trip(self) -> None:
        """A wake-up is sent data-only with the counter as a string, high priority, the TTL and collapse key, and nothing else."""
        token = self.service.device()
        reg = registration(token, counter=41)
        self.assertEqual(await self.push(reg), PushResult("sent", 200, "HTTP 200"))
        self.assertEqual(self.service.errors, [])
        [received] = self.service.received
        self.assertEqual(received.project, PROJECT)
        self.assertEqual(received.message, {
            "token": token,
            "data": {"n": "42"},
            "android": {"priority": "high", "ttl": f"{TTL}s", "collapse_key": TOPIC},
        })
        self.assertNotIn(reg.user_id, json.dumps(received.message))
        self.assertEqual(self.service.issued, 1)

    async def test_app_id_is_the_project(self) -> None:
        """A registration's app_id is the project its message is sent to."""
        token = self.service.device()
        self.assertEqual((await self.push(registration(token, app_id=OTHER_PROJECT))).outcome,
                         "sent")
        self.assertEqual([r.project for r in self.service.received], [OTHER_PROJECT])
        self.assertEqual(self.service.errors, [])

    async def test_token_cached(self) -> None:
        """Pushes at once and one after another share one access token: one grant in all."""
        tokens = [self.service.device() for _ in range(5)]
        results = await gatherResults([self.push(registration(t)) for t in tokens])
        results.append(await self.push(registration(tokens[0])))
        self.assertEqual({r.outcome for r in results}, {"sent"})
        self.assertEqual(self.service.issued, 1)
        self.assertEqual(len({r.access_token for r in self.service.received}), 1)
        self.assertEqual(self.service.errors, [])

    async def test_token_refreshed_before_expiry(self) -> None:
        """A token that lasts a second is used for the first pushes, then (past half its life) a new one is got (the stand-in refuses an expired one)."""
        # Renewed TOKEN_MARGIN before it expires, or at half its life when
        # that comes first: here after half a second.
        self.service.expires_in = 1
        token = self.service.device()
        for _ in range(2):
            self.assertEqual((await self.push(registration(token))).outcome, "sent")
        self.assertEqual(self.service.issued, 1)
        await deferLater(reactor, 0.6, lambda: None)
        self.assertEqual((await self.push(registration(token))).outcome, "sent")
        self.assertEqual(self.service.issued, 2)
        first, second, third = (r.access_token for r in self.service.received)
        self.assertEqual(first, second)
        self.assertNotEqual(second, third)
        self.assertEqual(self.service.errors, [])

    async def test_stale_token_refreshed(self) -> None:
        """A 401 drops the access token: a new one is got and the push made again, and sent."""
        token = self.service.device()
        self.service.answer(token, UNAUTHENTICATED, once=True)
        self.assertEqual(await self.push(registration(token)), PushResult("sent", 200, "HTTP 200"))
        self.assertEqual(self.service.issued, 2)
        first, second = self.service.received
        self.assertNotEqual(first.access_token, second.access_token)
        self.assertEqual(self.service.errors, [])
        # The new token serves the next push.
        self.assertEqual((await self.push(registration(token))).outcome, "sent")
        self.assertEqual(self.service.issued, 2)

    async def test_unauthenticated_twice(self) -> None:
        """A second 401, with a fresh token, is retried later: one refresh per push, no more."""
        token = self.service.device()
        self.service.answer(token, UNAUTHENTICATED)
        self.assertEqual(await self.push(registration(token)),
                         PushResult("retry", 401, "UNAUTHENTICATED"))
        self.assertEqual((self.service.issued, len(self.service.received)), (2, 2))
        self.assertEqual(self.service.errors, [])

    async def test_outcomes(self) -> None:
        """Each FCM error is mapped: UNREGISTERED and an invalid token gone, quota and 5xx retried, the rest refused; never naming the token."""
        cases = [
            (UNREGISTERED, PushResult("gone", 404, "UNREGISTERED")),
            (INVALID_TOKEN, PushResult("gone", 400, "INVALID_ARGUMENT")),
            (INVALID_ARGUMENT, PushResult("refused", 400, "INVALID_ARGUMENT")),
            (QUOTA_EXCEEDED, PushResult("retry", 429, "QUOTA_EXCEEDED", 30.0)),
            (INTERNAL, PushResult("retry", 500, "INTERNAL")),
            (UNAVAILABLE, PushResult("retry", 503, "UNAVAILABLE")),
            (SENDER_ID_MISMATCH, PushResult("refused", 403, "SENDER_ID_MISMATCH")),
            (THIRD_PARTY_AUTH_ERROR, PushResult("refused", 401, "THIRD_PARTY_AUTH_ERROR")),
        ]
        for answer, expected in cases:
            token = self.service.device()
            self.service.answer(token, answer)
            result = await self.push(registration(token))
            self.assertEqual(result, expected, answer)
            self.assertNotIn(token, repr(result))
            self.assertEqual(len(self.service.received_for(token)), 1, answer)
        # THIRD_PARTY_AUTH_ERROR is the project's APNs or Web Push key: no refresh.
        self.assertEqual(self.service.issued, 1)
        self.assertEqual(self.service.errors, [])

    def test_fcm_result(self) -> None:
        """Answers without FcmError details are read by their status; a 404 that is not UNREGISTERED is refused."""
        def error(status: int, code: str, **more: Any) -> bytes:
            return json.dumps({"error": {"code": status, "message": "x", "status": code,
                                         **more}}).encode()
        bad_request = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": "message.token"}]}]
        cases = [
            (200, b'{"name": "projects/p/messages/1"}', PushResult("sent", 200, "HTTP 200")),
            (404, error(404, "UNREGISTERED"), PushResult("gone", 404, "UNREGISTERED")),
            (404, error(404, "NOT_FOUND"), PushResult("refused", 404, "NOT_FOUND")),
            (404, b"<html>", PushResult("refused", 404, "HTTP 404")),
            (400, error(400, "INVALID_ARGUMENT", details=bad_request),
             PushResult("gone", 400, "INVALID_ARGUMENT")),
            (400, error(400, "INVALID_ARGUMENT"), PushResult("refused", 400, "INVALID_ARGUMENT")),
            (400, error(400, "fMx:APA91b-token"), PushResult("refused", 400, "HTTP 400")),
            (502, b"Bad Gateway", PushResult("retry", 502, "HTTP 502")),
            (400, error(400, "UNAVAILABLE"), PushResult("retry", 400, "UNAVAILABLE")),
            (408, b"", PushResult("retry", 408, "HTTP 408")),
            (302, b"", PushResult("refused", 302, "HTTP 302")),
        ]
        for status, body, expected in cases:
            self.assertEqual(fcm_result(status, body), expected, body)
        self.assertEqual(fcm_result(503, b"", 7.0), PushResult("retry", 503, "HTTP 503", 7.0))

    async def test_hang(self) -> None:
        """FCM not answering is given up after the timeout, and retried."""
        sender = self.make_sender(timeout=0.5)
        token = self.service.device()
        self.assertEqual((await self.push(registration(self.service.device()), sender)).outcome,
                         "sent")  # the access token is got first
        self.service.hang(token)
        start = reactor.seconds()
        result = await self.push(registration(token), sender)
        self.assertEqual(result, PushResult("retry", None, "FCM did not answer in time"))
        self.assertGreaterEqual(reactor.seconds() - start, 0.5)
        self.assertEqual(len(self.service.received_for(token)), 1)
        self.assertEqual(self.service.errors, [])

    async def test_no_connection(self) -> None:
        """FCM out of reach is retried, the reason naming no address."""
        number = await closed_port()
        sender = self.make_sender(base_url=f"http://127.0.0.1:{number}")
        result = await self.push(registration(self.service.device()), sender)
        self.assertEqual((result.outcome, result.status), ("retry", None))
        self.assertIn("could not connect", result.reason)
        self.assertNotIn("127.0.0.1", result.reason)

    async def test_token_refused(self) -> None:
        """A grant the token endpoint refuses (invalid_grant: a revoked key) refuses the push, without a request to FCM."""
        self.service.refuse_tokens(400, "invalid_grant")
        result = await self.push(registration(self.service.device()))
        self.assertEqual(result, PushResult("refused", None, "no access token (invalid_grant)"))
        self.assertEqual(self.service.received, [])
        self.assertEqual(self.service.errors, [])

    async def test_unknown_key(self) -> None:
        """A service account whose key the token endpoint does not know gets no token (the stand-in's signature check)."""
        sender = self.make_sender(account=self.service.service_account(known=False))
        result = await self.push(registration(self.service.device()), sender)
        self.assertEqual(result, PushResult("refused", None, "no access token (invalid_grant)"))
        self.assertEqual(len(self.service.errors), 1)
        self.assertIn("does not verify", self.service.errors[0])

    async def test_token_endpoint_unreachable(self) -> None:
        """A token endpoint out of reach is retried later, the reason naming no address."""
        number = await closed_port()
        account = {**self.service.service_account(), "token_uri": f"http://127.0.0.1:{number}/token"}
        sender = self.make_sender(account=account)
        result = await self.push(registration(self.service.device()), sender)
        self.assertEqual(result, PushResult("retry", None, "no access token (TransportError)"))
        self.assertEqual(self.service.received, [])

    async def test_token_endpoint_hangs(self) -> None:
        """A token endpoint that never answers is given up with the push's timeout, and close() waits for its thread."""
        self.service.hang_tokens()
        sender = self.make_sender(timeout=0.5)
        start = reactor.seconds()
        result = await self.push(registration(self.service.device()), sender)
        self.assertEqual(result, PushResult("retry", None, "FCM did not answer in time"))
        self.assertGreaterEqual(reactor.seconds() - start, 0.5)
        await sender.close()
        self.assertEqual([t.name for t in threading.enumerate() if "cyphr-fcm" in t.name], [])
        self.assertEqual((self.service.received, self.service.errors), ([], []))

    async def test_not_sendable(self) -> None:
        """A registration without a token, or whose app_id could change the URL, is refused without a request."""
        for reg, reason in [
                (registration(None), "the registration has no token"),
                (registration(self.service.device(), app_id="p/../../x"),
                 "the app id is not a Firebase project ID")]:
            self.assertEqual(await self.push(reg), PushResult("refused", None, reason))
        self.assertEqual((self.service.issued, self.service.received), (0, []))

    def test_arguments_checked(self) -> None:
        """A TTL, collapse key or payload that is never valid is a ValueError at once."""
        reg = registration("t")
        for kwargs in [{"ttl": -1, "topic": "t"}, {"ttl": 1.5, "topic": "t"},
                       {"ttl": True, "topic": "t"}, {"ttl": MAX_TTL + 1, "topic": "t"},
                       {"ttl": 60, "topic": ""}, {"ttl": 60, "topic": "a" * 65},
                       {"ttl": 60, "topic": "a b"}]:
            self.assertRaises(ValueError, self.sender.send, reg, b'{"n":1}', **kwargs)
        for payload in [b"", b"[1]", b"not json", b'{"n": {"deep": 1}}', b'{"from": "x"}',
                        b'{"google.x": "y"}', b'{"gcm": "y"}', b'{"": "y"}',
                        json.dumps({"n": "x" * 5000}).encode()]:
            self.assertRaises(ValueError, self.sender.send, reg, payload, ttl=60, topic="t")

    def test_data_map(self) -> None:
        """Payload values become strings: numbers and booleans in JSON, strings as they are."""
        self.assertEqual(data_map(b'{"n": 5, "s": "x", "b": true, "z": null}'),
                         {"n": "5", "s": "x", "b": "true", "z": "null"})

    def test_bad_service_account(self) -> None:
        """Credentials that are not a usable service account are a ValueError that quotes no key."""
        good = self.service.service_account()
        for bad in [{**good, "type": "authorized_user"},
                    {k: v for k, v in good.items() if k != "project_id"},
                    {**good, "project_id": "a/b"},
                    {k: v for k, v in good.items() if k != "client_email"},
                    {k: v for k, v in good.items() if k != "token_uri"},
                    {**good, "private_key": good["private_key"][:200]},
                    {**good, "private_key": ec.generate_private_key(ec.SECP256R1()).private_bytes(
                        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption()).decode()}]:
            with self.assertRaises(ValueError) as caught:
                FcmSender(reactor, bad, base_url=self.service.base_url)
            self.assertNotIn("PRIVATE KEY", str(caught.exception))

    async def test_close_stops_threads(self) -> None:
        """close() ends the sender's token threads."""
        sender = self.make_sender()
        self.assertEqual((await self.push(registration(self.service.device()), sender)).outcome,
                         "sent")
        self.assertTrue(any("cyphr-fcm" in t.name for t in threading.enumerate()))
        await sender.close()
        await self.sender.close()
        self.assertEqual([t.name for t in threading.enumerate() if "cyphr-fcm" in t.name], [])


class StandInTests(TestCase):
    """The stand-ins refuse what Google refuses (else their "no errors"
    proves nothing)."""

    def setUp(self) -> None:
        self.service = FcmService(reactor)
        self.service.start()
        self.addCleanup(self.service.stop)
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.account = self.service.service_account()

    async def post(self, path: str, headers: dict[bytes, bytes], body: bytes) -> tuple[int, Any]:
        response = await self.agent.request(
            b"POST", f"{self.service.origin}{path}".encode(),
            Headers({k: [v] for k, v in headers.items()}), FileBodyProducer(io.BytesIO(body)))
        collect = _Collect()
        response.deliverBody(collect)
        return response.code, json.loads(await collect.done)

    def assertion(self, key: rsa.RSAPrivateKey | None = None, header: dict[str, Any] | None = None,
                  **claims: Any) -> str:
        now = int(time.time())
        all_claims = {"iss": self.account["client_email"], "aud": GOOGLE_TOKEN_URI,
                      "scope": FCM_SCOPE, "iat": now, "exp": now + 3600, **claims}
        head = header or {"alg": "RS256", "typ": "JWT", "kid": self.account["private_key_id"]}
        signing_input = (b64url(json.dumps(head).encode()) + "." +
                         b64url(json.dumps(all_claims).encode()))
        signature = (key or rsa_key()).sign(signing_input.encode(), padding.PKCS1v15(),
                                            hashes.SHA256())
        return signing_input + "." + b64url(signature)

    async def grant(self, form: dict[str, str]) -> tuple[int, Any]:
        return await self.post("/token", {b"Content-Type": b"application/x-www-form-urlencoded"},
                               urllib.parse.urlencode(form).encode())

    async def access_token(self) -> str:
        status, answer = await self.grant({"grant_type": JWT_BEARER,
                                           "assertion": self.assertion()})
        self.assertEqual(status, 200, answer)
        return answer["access_token"]

    async def test_grant(self) -> None:
        """A well-formed grant gets a Bearer token that lasts expires_in."""
        self.service.expires_in = 120
        status, answer = await self.grant({"grant_type": JWT_BEARER,
                                           "assertion": self.assertion()})
        self.assertEqual(status, 200)
        self.assertEqual((answer["token_type"], answer["expires_in"]), ("Bearer", 120))
        self.assertEqual((self.service.issued, self.service.errors), (1, []))

    async def test_bad_grants(self) -> None:
        """Each malformed grant is answered 400 and recorded as an error."""
        now = int(time.time())
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cases = [
            ("grant type", {"grant_type": "client_credentials", "assertion": self.assertion()}),
            ("no assertion", {"grant_type": JWT_BEARER}),
            ("extra field", {"grant_type": JWT_BEARER, "assertion": self.assertion(),
                             "scope": FCM_SCOPE}),
            ("other key", {"grant_type": JWT_BEARER, "assertion": self.assertion(key=other)}),
            ("HS256", {"grant_type": JWT_BEARER, "assertion": self.assertion(
                header={"alg": "HS256", "typ": "JWT"})}),
            ("token_uri as aud", {"grant_type": JWT_BEARER,
                                  "assertion": self.assertion(aud=self.service.token_uri)}),
            ("other scope", {"grant_type": JWT_BEARER, "assertion": self.assertion(
                scope="https://www.googleapis.com/auth/cloud-platform")}),
            ("expired", {"grant_type": JWT_BEARER,
                         "assertion": self.assertion(iat=now - 7200, exp=now - 3600)}),
            ("too long", {"grant_type": JWT_BEARER, "assertion": self.assertion(exp=now + 7200)}),
            ("other iss", {"grant_type": JWT_BEARER,
                           "assertion": self.assertion(iss="x@y.iam.gserviceaccount.com")}),
            ("not a JWT", {"grant_type": JWT_BEARER, "assertion": "a.b"}),
        ]
        for name, form in cases:
            before = len(self.service.errors)
            status, _ = await self.grant(form)
            self.assertEqual(status, 400, name)
            self.assertEqual(len(self.service.errors), before + 1, name)
        self.assertEqual(self.service.issued, 0)

    def message(self, token: str, **changes: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"token": token, "data": {"n": "1"},
                                   "android": {"priority": "high", "ttl": "60s",
                                               "collapse_key": "k"}}
        message.update(changes)
        return {"message": message}

    async def send(self, body: Any, access: str | None, project: str = PROJECT,
                   content_type: bytes = b"application/json") -> tuple[int, Any]:
        headers = {b"Content-Type": content_type}
        if access is not None:
            headers[b"Authorization"] = b"Bearer " + access.encode()
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.post(f"/v1/projects/{project}/messages:send", headers, raw)

    async def test_well_formed(self) -> None:
        """A well-formed message is answered 200 with its name, and recorded."""
        access = await self.access_token()
        token = self.service.device()
        status, answer = await self.send(self.message(token), access)
        self.assertEqual(status, 200)
        self.assertTrue(answer["name"].startswith(f"projects/{PROJECT}/messages/"))
        self.assertEqual(self.service.errors, [])
        self.assertEqual([r.token for r in self.service.received], [token])

    async def test_malformed(self) -> None:
        """Each malformed message is answered 400 (401 for a bad token, 403 for another project) and recorded as an error."""
        access = await self.access_token()
        self.service.expires_in = 0
        expired = await self.access_token()
        token = self.service.device()
        android = self.message(token)["message"]["android"]
        cases: list[tuple[str, Any, str | None, str, int]] = [
            ("no Authorization", self.message(token), None, PROJECT, 401),
            ("unknown token", self.message(token), "ya29.nope", PROJECT, 401),
            ("expired token", self.message(token), expired, PROJECT, 401),
            ("other project", self.message(token), access, "someone-else", 403),
            ("not JSON", b"{", access, PROJECT, 400),
            ("notification", self.message(token, notification={"title": "hi"}), access,
             PROJECT, 400),
            ("android notification", self.message(
                token, android={**android, "notification": {"title": "hi"}}), access, PROJECT, 400),
            ("number in data", self.message(token, data={"n": 1}), access, PROJECT, 400),
            ("reserved key", self.message(token, data={"from": "x"}), access, PROJECT, 400),
            ("normal priority", self.message(token, android={**android, "priority": "normal"}),
             access, PROJECT, 400),
            ("ttl as a number", self.message(token, android={**android, "ttl": 60}), access,
             PROJECT, 400),
            ("no token", self.message(""), access, PROJECT, 400),
            ("apns block", self.message(token, apns={}), access, PROJECT, 400),
            ("validate_only", {**self.message(token), "validate_only": True}, access, PROJECT, 400),
        ]
        for name, body, bearer, project, expected in cases:
            before = len(self.service.errors)
            status, answer = await self.send(body, bearer, project)
            self.assertEqual(status, expected, name)
            self.assertIn("error", answer, name)
            self.assertEqual(len(self.service.errors), before + 1, name)
        status, _ = await self.send(self.message(token), access, content_type=b"text/plain")
        self.assertEqual(status, 400)
        self.assertEqual(self.service.received, [])

    async def test_unknown_device(self) -> None:
        """A token the stand-in never made is answered as FCM answers a bad one: 400 INVALID_ARGUMENT."""
        access = await self.access_token()
        status, answer = await self.send(self.message("not-a-token"), access)
        self.assertEqual((status, answer["error"]["status"]), (400, "INVALID_ARGUMENT"))
        self.assertEqual(self.service.errors, [])
