"""
cyphr.push.apns: the APNs sender against the strict stand-in
(tests/apnsservice.py), over HTTP/2 and TLS on 127.0.0.1, one per test;
and the stand-in's own strictness.
"""

from __future__ import annotations

import json
import os
import ssl
from typing import Any

import httpx
import jwt
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cyphr.push.apns import (
    MAX_PAYLOAD,
    THREADS,
    TOKEN_REFRESH,
    WAKE_UP_APS,
    ApnsSender,
    wake_up_body,
)
from cyphr.push.webpush import PushResult
from cyphr.store.push import Registration
from tests.apnsservice import ApnsService

TOPIC = "cyphr-wake"
APP = "org.cyphr.app"


def device_token() -> str:
    return os.urandom(32).hex()


def registration(token: str | None = None, *, app_id: str | None = APP, sandbox: bool = False,
                 counter: int = 6) -> Registration:
    return Registration("user-1", 1, "apns", token or device_token(), None, None, None, app_id,
                        sandbox, counter)


def payload(counter: int) -> bytes:
    """What the drain passes (cyphr.handlers.push)."""
    return json.dumps({"n": counter}, separators=(",", ":")).encode()


def provider_token(authorization: str, service: ApnsService) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of ``bearer <jwt>``, verified with PyJWT."""
    scheme, _, token = authorization.partition(" ")
    assert scheme == "bearer", authorization
    claims = jwt.decode(token, service.key.public_key(), algorithms=["ES256"],
                        options={"verify_iat": False})
    return jwt.get_unverified_header(token), claims


class SenderTests(TestCase):
    """The sender against the stand-in, over a real port."""

    def setUp(self) -> None:
        # The provider token's and apns-expiration's time; the stand-in
        # judges iat by it too.
        self.clock = Clock()
        self.clock.advance(reactor.seconds())
        self.ca = trustme.CA()
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.service = self.stand_in()
        self.sender = self.make_sender()

    def stand_in(self) -> ApnsService:
        service = ApnsService(clock=self.clock, ca=self.ca, key=self.key)
        service.start()
        self.addCleanup(service.stop)
        return service

    def make_sender(self, **kwargs: Any) -> ApnsSender:
        kwargs.setdefault("endpoint", self.service.endpoint)
        kwargs.setdefault("sandbox_endpoint", self.service.endpoint)
        kwargs.setdefault("verify", self.service.ca_path)
        sender = ApnsSender(reactor, self.service.key_pem, self.service.key_id,
                            self.service.team_id, clock=self.clock, **kwargs)
        self.addCleanup(sender.close)
        return sender

    def push(self, reg: Registration, sender: ApnsSender | None = None,
             ttl: int = 3600) -> Deferred[PushResult]:
        return (sender or self.sender).send(reg, payload(reg.counter + 1), ttl=ttl, topic=TOPIC)

    async def test_round_trip(self) -> None:
        """A wake-up goes as an HTTP/2 POST to the device's path, with a valid provider token, every header right and only the counter in its body."""
        reg = registration(counter=6)
        result = await self.push(reg, ttl=600)
        self.assertEqual(result, PushResult("sent", 200, "HTTP 200"))
        self.assertEqual(self.service.errors, [])
        [received] = self.service.received
        self.assertEqual(received.token, reg.token)
        headers = received.headers
        self.assertEqual(headers[":path"], f"/3/device/{reg.token}")
        self.assertEqual(headers[":authority"], self.service.endpoint.removeprefix("https://"))
        self.assertEqual(headers["apns-topic"], APP)
        self.assertEqual(headers["apns-push-type"], "alert")
        self.assertEqual(headers["apns-priority"], "10")
        self.assertEqual(headers["apns-expiration"], str(int(self.clock.seconds()) + 600))
        self.assertEqual(headers["apns-collapse-id"], TOPIC)
        header, claims = provider_token(headers["authorization"], self.service)
        self.assertEqual(header, {"alg": "ES256", "kid": self.service.key_id})
        self.assertEqual(claims, {"iss": self.service.team_id, "iat": int(self.clock.seconds())})
        self.assertEqual(received.json(), {
            "aps": {"alert": {"loc-key": "NEW_MESSAGE", "body": "New message"},
                    "mutable-content": 1, "sound": "default"},
            "n": 7})
        self.assertNotIn(reg.user_id.encode(), received.body)

    async def test_ttl_zero(self) -> None:
        """A TTL of 0 is apns-expiration 0: delivered now or never, not kept."""
        await self.push(registration(), ttl=0)
        self.assertEqual(self.service.received[0].headers["apns-expiration"], "0")
        self.assertEqual(self.service.errors, [])

    async def test_outcomes(self) -> None:
        """Each APNs answer maps to its outcome, with Apple's reason (never the token) and Retry-After."""
        cases: list[tuple[int, str | None, str | None, PushResult]] = [
            (410, "Unregistered", None, PushResult("gone", 410, "Unregistered")),
            (400, "BadDeviceToken", None, PushResult("gone", 400, "BadDeviceToken")),
            (400, "DeviceTokenNotForTopic", None, PushResult("gone", 400, "DeviceTokenNotForTopic")),
            (429, "TooManyRequests", "30", PushResult("retry", 429, "TooManyRequests", 30.0)),
            (429, "TooManyProviderTokenUpdates", None,
             PushResult("retry", 429, "TooManyProviderTokenUpdates")),
            (500, "InternalServerError", None, PushResult("retry", 500, "InternalServerError")),
            (503, "ServiceUnavailable", None, PushResult("retry", 503, "ServiceUnavailable")),
            (500, None, None, PushResult("retry", 500, "HTTP 500")),
            (400, "TopicDisallowed", None, PushResult("refused", 400, "TopicDisallowed")),
            (403, "InvalidProviderToken", None, PushResult("refused", 403, "InvalidProviderToken")),
            (404, "BadPath", None, PushResult("refused", 404, "BadPath")),
            (413, "PayloadTooLarge", None, PushResult("refused", 413, "PayloadTooLarge")),
        ]
        for status, reason, retry_after, expected in cases:
            reg = registration()
            self.service.answer(reg.token, status, reason, retry_after=retry_after)
            result = await self.push(reg)
            self.assertEqual(result, expected)
            self.assertNotIn(reg.token, result.reason)
        self.assertEqual(self.service.errors, [])
        self.assertEqual(len(self.service.received), len(cases))

    async def test_token_cached_and_refreshed(self) -> None:
        """One provider token serves every push for 40 minutes, then one signed anew with a later iat."""
        first_at = int(self.clock.seconds())
        await self.push(registration())
        self.clock.advance(TOKEN_REFRESH - 1)
        await self.push(registration())
        self.clock.advance(1)
        await self.push(registration())
        await self.push(registration())
        authorizations = [r.headers["authorization"] for r in self.service.received]
        self.assertEqual(authorizations[0], authorizations[1])
        self.assertNotEqual(authorizations[1], authorizations[2])
        self.assertEqual(authorizations[2], authorizations[3])
        self.assertEqual(provider_token(authorizations[0], self.service)[1]["iat"], first_at)
        self.assertEqual(provider_token(authorizations[2], self.service)[1]["iat"],
                         first_at + TOKEN_REFRESH)
        # Nor too often for Apple (TooManyProviderTokenUpdates), nor too late.
        self.assertEqual(self.service.errors, [])

    async def test_expired_provider_token(self) -> None:
        """On 403 ExpiredProviderToken the token is signed anew and the push sent again, once."""
        reg = registration()
        self.service.expire_provider_token()
        self.assertEqual(await self.push(reg), PushResult("sent", 200, "HTTP 200"))
        first, second = self.service.received_for(reg.token)
        self.assertNotEqual(first.headers["authorization"], second.headers["authorization"])
        self.assertEqual(first.body, second.body)
        # The next push carries the new token at once.
        following = registration()
        self.assertEqual((await self.push(following)).outcome, "sent")
        [third] = self.service.received_for(following.token)
        self.assertEqual(third.headers["authorization"], second.headers["authorization"])
        self.assertEqual(self.service.errors, [])

    async def test_expired_again(self) -> None:
        """A token called expired again right after its refresh is refused: no third request."""
        reg = registration()
        self.service.answer(reg.token, 403, "ExpiredProviderToken")
        self.assertEqual(await self.push(reg), PushResult("refused", 403, "ExpiredProviderToken"))
        self.assertEqual(len(self.service.received_for(reg.token)), 2)
        self.assertEqual(self.service.errors, [])

    async def test_expired_together(self) -> None:
        """Pushes told together that the token expired sign one new token between them."""
        regs = [registration() for _ in range(4)]
        self.service.expire_provider_token()
        results = await gatherResults([self.push(reg) for reg in regs])
        self.assertEqual({r.outcome for r in results}, {"sent"})
        old, new = self.service.received[0].headers["authorization"], None
        for reg in regs:
            first, second = self.service.received_for(reg.token)
            self.assertEqual(first.headers["authorization"], old)
            new = new or second.headers["authorization"]
            self.assertEqual(second.headers["authorization"], new)
        self.assertNotEqual(old, new)
        self.assertEqual(self.service.errors, [])

    async def test_connections_reused(self) -> None:
        """Pushes at once all go, over at most one HTTP/2 connection per thread, kept for the next pushes."""
        for _ in range(5):
            regs = [registration() for _ in range(24)]
            results = await gatherResults([self.push(reg) for reg in regs])
            self.assertEqual({r.outcome for r in results}, {"sent"})
        self.assertEqual(len(self.service.received), 5 * 24)
        self.assertLessEqual(self.service.connections, THREADS)
        self.assertEqual(self.service.errors, [])

    async def test_hang(self) -> None:
        """APNs that never answers is given up after the timeout and retried; the next push goes."""
        sender = self.make_sender(timeout=0.5)
        reg = registration()
        self.service.hang(reg.token)
        start = reactor.seconds()
        result = await self.push(reg, sender)
        self.assertEqual((result.outcome, result.status), ("retry", None))
        self.assertGreaterEqual(reactor.seconds() - start, 0.5)
        self.assertEqual(len(self.service.received), 1)
        # The request on its thread ends too (httpx's read time-out).
        await sender.idle()
        self.assertEqual((await self.push(registration(), sender)).outcome, "sent")
        self.assertEqual(self.service.errors, [])

    async def test_sandbox(self) -> None:
        """A sandbox registration goes to the sandbox endpoint, any other to production."""
        sandbox = self.stand_in()
        sender = self.make_sender(sandbox_endpoint=sandbox.endpoint)
        development, production = registration(sandbox=True), registration()
        self.assertEqual((await self.push(development, sender)).outcome, "sent")
        self.assertEqual((await self.push(production, sender)).outcome, "sent")
        self.assertEqual([r.token for r in sandbox.received], [development.token])
        self.assertEqual([r.token for r in self.service.received], [production.token])
        self.assertEqual(self.service.errors + sandbox.errors, [])

    def test_apple_endpoints(self) -> None:
        """Unless told otherwise, pushes go to Apple's production and sandbox hosts."""
        sender = ApnsSender(reactor, self.service.key_pem, self.service.key_id,
                            self.service.team_id, topic=APP)
        self.addCleanup(sender.close)
        self.assertEqual(sender._endpoints, {False: "https://api.push.apple.com",
                                             True: "https://api.sandbox.push.apple.com"})

    async def test_default_topic(self) -> None:
        """A registration without an app id goes to the sender's default topic; one with, to its own."""
        sender = self.make_sender(topic="org.cyphr.default")
        await self.push(registration(app_id=None), sender)
        await self.push(registration(app_id="org.cyphr.other"), sender)
        self.assertEqual([r.headers["apns-topic"] for r in self.service.received],
                         ["org.cyphr.default", "org.cyphr.other"])
        self.assertEqual(self.service.errors, [])

    async def test_no_topic(self) -> None:
        """With no app id and no default topic, the push is refused without a request."""
        result = await self.push(registration(app_id=None))
        self.assertEqual((result.outcome, result.status), ("refused", None))
        bad = await self.push(registration(app_id="org.cyphr.app\r\nx-evil: 1"))
        self.assertEqual((bad.outcome, bad.status), ("refused", None))
        self.assertEqual(self.service.received, [])

    async def test_device_token_checked(self) -> None:
        """A device token that is not hex is gone without a request; an upper-case one goes lower-cased."""
        for token in ["zz" * 32, "../../3/device/" + "ab" * 32, "ab" * 4, "a" * 63]:
            result = await self.push(registration(token))
            self.assertEqual(result, PushResult("gone", None, "BadDeviceToken"))
        self.assertEqual(self.service.received, [])
        token = "AB" * 32
        self.assertEqual((await self.push(registration(token))).outcome, "sent")
        self.assertEqual(self.service.received[0].token, token.lower())
        self.assertEqual(self.service.errors, [])

    async def test_no_connection(self) -> None:
        """A closed port is retried, the reason naming neither address nor token."""
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        sender = self.make_sender(endpoint=f"https://127.0.0.1:{number}")
        reg = registration()
        result = await self.push(reg, sender)
        self.assertEqual((result.outcome, result.status), ("retry", None))
        self.assertEqual(result.reason, "the request failed (ConnectError)")

    async def test_tls_verified(self) -> None:
        """A certificate the sender's roots do not vouch for fails the push (retried), and nothing is sent."""
        sender = self.make_sender(verify=True)
        result = await self.push(registration(), sender)
        self.assertEqual((result.outcome, result.status), ("retry", None))
        self.assertEqual(self.service.received, [])

    async def test_closed(self) -> None:
        """A closed sender sends nothing more: its pushes are retried later."""
        await self.push(registration())
        await self.sender.close()
        result = await self.push(registration())
        self.assertEqual(result, PushResult("retry", None, "the APNs sender is closed"))
        self.assertEqual(len(self.service.received), 1)

    def test_arguments_checked(self) -> None:
        """A TTL, collapse id or payload that is never valid is a ValueError at once."""
        reg = registration()
        for kwargs in [{"ttl": -1, "topic": TOPIC}, {"ttl": True, "topic": TOPIC},
                       {"ttl": 1.5, "topic": TOPIC}, {"ttl": 60, "topic": ""},
                       {"ttl": 60, "topic": "x" * 65}, {"ttl": 60, "topic": "a\nb"}]:
            self.assertRaises(ValueError, self.sender.send, reg, payload(1), **kwargs)
        for bad in [b"", b"not json", b"[1]", b'{"aps": {}}', b"\xff",
                    json.dumps({"n": "x" * MAX_PAYLOAD}).encode()]:
            self.assertRaises(ValueError, self.sender.send, reg, bad, ttl=60, topic=TOPIC)
        self.assertEqual(self.service.received, [])

    def test_body(self) -> None:
        """The body is the wake-up's aps and the payload's fields, and nothing else."""
        self.assertEqual(json.loads(wake_up_body(b'{"n":3}')), {"aps": dict(WAKE_UP_APS), "n": 3})

    def test_configuration_checked(self) -> None:
        """A key that is not P-256 PEM, a bad key or team id, a bad default topic or verify=False is refused."""
        p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        service = self.service
        for args, kwargs in [
            ((p384, service.key_id, service.team_id), {}),
            ((b"-----BEGIN PRIVATE KEY-----\n", service.key_id, service.team_id), {}),
            ((service.key_pem, "", service.team_id), {}),
            ((service.key_pem, service.key_id, "AuthKey_X.p8"), {}),
            ((service.key_pem, service.key_id, service.team_id), {"topic": "a b"}),
            ((service.key_pem, service.key_id, service.team_id), {"verify": False}),
        ]:
            self.assertRaises(ValueError, ApnsSender, reactor, *args, **kwargs)
        # The key as text, as read from the .p8 file, is taken too.
        sender = ApnsSender(reactor, service.key_pem.decode(), service.key_id, service.team_id)
        self.addCleanup(sender.close)


class StandInTests(TestCase):
    """The stand-in refuses what APNs refuses (else its "no errors" proves
    nothing). Its own threads serve it: these tests call it blocking."""

    def setUp(self) -> None:
        self.service = ApnsService()
        self.service.start()
        self.addCleanup(self.service.stop)
        self.context = ssl.create_default_context(cafile=self.service.ca_path)
        self.token = device_token()

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("http2", True)
        client = httpx.Client(http1=not kwargs["http2"], verify=self.context, trust_env=False,
                              timeout=5, **kwargs)
        self.addCleanup(client.close)
        return client

    def jwt(self, *, key: Any = None, kid: str | None = None, iss: str | None = None,
            iat: float | None = None) -> str:
        now = self.service._now() if iat is None else iat
        token = jwt.encode({"iss": iss or self.service.team_id, "iat": int(now)},
                           key or self.service.key, algorithm="ES256",
                           headers={"kid": kid or self.service.key_id})
        return f"bearer {token}"

    def good(self) -> dict[str, str]:
        return {"authorization": self.jwt(), "apns-topic": APP, "apns-push-type": "alert",
                "apns-priority": "10", "apns-expiration": "0", "apns-collapse-id": TOPIC}

    def post(self, headers: dict[str, str], body: bytes | None = None, *,
             path: str | None = None, method: str = "POST",
             client: httpx.Client | None = None) -> httpx.Response:
        body = wake_up_body(b'{"n":1}') if body is None else body
        return (client or self.client()).request(
            method, self.service.endpoint + (path or f"/3/device/{self.token}"),
            headers=headers, content=body)

    def test_well_formed(self) -> None:
        """A well-formed push is answered 200 with an apns-id, over HTTP/2, and recorded."""
        response = self.post(self.good())
        self.assertEqual((response.status_code, response.http_version), (200, "HTTP/2"))
        self.assertEqual(len(response.headers["apns-id"]), 36)
        self.assertEqual(self.service.errors, [])
        self.assertEqual([r.token for r in self.service.received], [self.token])

    def test_malformed(self) -> None:
        """Each malformed push is answered as APNs answers it, and recorded as an error."""
        good = self.good()
        without = lambda name: {k: v for k, v in good.items() if k != name}  # noqa: E731
        aps = dict(WAKE_UP_APS)
        cases: list[tuple[str, dict[str, Any], int, str]] = [
            ("no authorization", {"headers": without("authorization")}, 403,
             "MissingProviderToken"),
            ("not bearer", {"headers": {**good, "authorization": "basic x"}}, 403,
             "InvalidProviderToken"),
            ("another key", {"headers": {**good, "authorization": self.jwt(
                key=ec.generate_private_key(ec.SECP256R1()))}}, 403, "InvalidProviderToken"),
            ("another kid", {"headers": {**good, "authorization": self.jwt(kid="OTHERKEY00")}},
             403, "InvalidProviderToken"),
            ("another team", {"headers": {**good, "authorization": self.jwt(iss="OTHERTEAM0")}},
             403, "InvalidProviderToken"),
            ("over an hour old", {"headers": {**good, "authorization": self.jwt(
                iat=self.service._now() - 3601)}}, 403, "ExpiredProviderToken"),
            ("from the future", {"headers": {**good, "authorization": self.jwt(
                iat=self.service._now() + 600)}}, 403, "InvalidProviderToken"),
            ("no topic", {"headers": without("apns-topic")}, 400, "MissingTopic"),
            ("no push type", {"headers": without("apns-push-type")}, 400, "InvalidPushType"),
            ("background", {"headers": {**good, "apns-push-type": "background"}}, 400,
             "InvalidPushType"),
            ("bad priority", {"headers": {**good, "apns-priority": "7"}}, 400, "BadPriority"),
            ("bad expiration", {"headers": {**good, "apns-expiration": "soon"}}, 400,
             "BadExpirationDate"),
            ("long collapse id", {"headers": {**good, "apns-collapse-id": "x" * 65}}, 400,
             "BadCollapseId"),
            ("bad apns-id", {"headers": {**good, "apns-id": "1"}}, 400, "BadMessageId"),
            ("empty body", {"headers": good, "body": b""}, 400, "PayloadEmpty"),
            ("not JSON", {"headers": good, "body": b"{"}, 400, "BadRequest"),
            ("no alert", {"headers": good, "body": json.dumps(
                {"aps": {"mutable-content": 1}}).encode()}, 400, "BadRequest"),
            ("not mutable", {"headers": good, "body": json.dumps(
                {"aps": {**aps, "mutable-content": 0}}).encode()}, 400, "BadRequest"),
            ("too large", {"headers": good, "body": json.dumps(
                {"aps": aps, "x": "x" * 4096}).encode()}, 413, "PayloadTooLarge"),
            ("GET", {"headers": good, "method": "GET", "body": b""}, 405, "MethodNotAllowed"),
            ("bad path", {"headers": good, "path": f"/3/devices/{self.token}"}, 404, "BadPath"),
            ("upper-case token", {"headers": good, "path": f"/3/device/{self.token.upper()}"},
             400, "BadDeviceToken"),
            ("not hex", {"headers": good, "path": "/3/device/" + "zz" * 32}, 400,
             "BadDeviceToken"),
        ]
        for name, kwargs, status, reason in cases:
            before = len(self.service.errors)
            response = self.post(**kwargs)
            self.assertEqual((response.status_code, response.json()["reason"]), (status, reason),
                             name)
            self.assertEqual(len(self.service.errors), before + 1, name)
        self.assertEqual(self.service.received, [])

    def test_provider_token_updates(self) -> None:
        """On one connection a token may not change within 20 minutes, unless the last was called expired (and then refused each time)."""
        client = self.client()
        first, second = self.jwt(), self.jwt(iat=self.service._now() - 60)
        self.assertEqual(self.post({**self.good(), "authorization": first}, client=client)
                         .status_code, 200)
        changed = self.post({**self.good(), "authorization": second}, client=client)
        self.assertEqual((changed.status_code, changed.json()["reason"]),
                         (429, "TooManyProviderTokenUpdates"))
        self.assertEqual(len(self.service.errors), 1)
        self.service.expire_provider_token()
        for _ in range(2):
            expired = self.post({**self.good(), "authorization": first}, client=client)
            self.assertEqual((expired.status_code, expired.json()["reason"]),
                             (403, "ExpiredProviderToken"))
        self.assertEqual(self.post({**self.good(), "authorization": second}, client=client)
                         .status_code, 200)
        self.assertEqual(len(self.service.errors), 1)

    def test_http2_only(self) -> None:
        """A client that speaks no HTTP/2 gets no answer, and is recorded as an error."""
        with self.assertRaises(httpx.TransportError):
            self.post(self.good(), client=self.client(http2=False))
        self.assertEqual(len(self.service.errors), 1)
        self.assertIn("not h2", self.service.errors[0])
        self.assertEqual(self.service.received, [])
