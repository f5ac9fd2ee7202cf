"""
cyphr.push.webpush: RFC 8291 encryption against the RFC's own example, VAPID
tokens, the endpoint checks, and the sender against the strict stand-in
push service (tests/pushservice.py) on 127.0.0.1, one per test.
"""

from __future__ import annotations

import io
import json
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from twisted.internet import reactor
from twisted.internet.error import DNSLookupError
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

from cyphr.push.webpush import (
    JWT_LIFETIME,
    JWT_RENEW_AFTER,
    MAX_ENDPOINT_LENGTH,
    MAX_PAYLOAD,
    RECORD_SIZE,
    PushResult,
    Subscription,
    VapidKey,
    WebPushSender,
    b64url_decode,
    b64url_encode,
    check_endpoint,
    check_keys,
    encrypt,
    is_public_address,
    matches_prefix,
    origin,
    public_only_agent,
    resolves_to_public,
)
from tests.pushservice import Malformed, PushService, decrypt

# RFC 8291, Appendix A (and section 5), with the line breaks taken out.
RFC_PLAINTEXT = "V2hlbiBJIGdyb3cgdXAsIEkgd2FudCB0byBiZSBhIHdhdGVybWVsb24"
RFC_AS_PUBLIC = ("BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIg"
                 "Dll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8")
RFC_AS_PRIVATE = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"
RFC_UA_PUBLIC = ("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcx"
                 "aOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4")
RFC_UA_PRIVATE = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"
RFC_SALT = "DGv6ra1nlYgDCS1FRnbzlw"
RFC_AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
RFC_HEADER = ("DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml"
              "mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8")
RFC_CIPHERTEXT = ("8pfeW0KbunFT06SuDKoJH9Ql87S1QUrdirN6GcG7sFz1y1sqLgVi1VhjVkHsUoEs"
                  "bI_0LpXMuGvnzQ")
RFC_BODY = ("DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml"
            "mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT"
            "pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN")

CONTACT = "mailto:ops@example.org"


def p256_private(scalar_b64url: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(b64url_decode(scalar_b64url), "big"),
                                 ec.SECP256R1())


def jwt_parts(authorization: str) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    """Header, claims, signing input and signature of ``vapid t=..., k=...``;
    checks the signature with k."""
    scheme, _, params = authorization.partition(" ")
    assert scheme == "vapid", authorization
    fields = dict(p.strip().split("=", 1) for p in params.split(","))
    head, claims, signature = fields["t"].split(".")
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                       b64url_decode(fields["k"]))
    raw = b64url_decode(signature)
    key.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                    int.from_bytes(raw[32:], "big")),
               f"{head}.{claims}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return (json.loads(b64url_decode(head)), json.loads(b64url_decode(claims)),
            fields["t"], fields["k"])


class EncryptionTests(TestCase):
    def test_rfc8291_appendix_a(self) -> None:
        """The RFC's example keys, salt and plaintext give its header and ciphertext, byte for byte."""
        body = encrypt(b64url_decode(RFC_PLAINTEXT), b64url_decode(RFC_UA_PUBLIC),
                       b64url_decode(RFC_AUTH), salt=b64url_decode(RFC_SALT),
                       as_private=p256_private(RFC_AS_PRIVATE))
        self.assertEqual(b64url_decode(RFC_PLAINTEXT), b"When I grow up, I want to be a watermelon")
        self.assertEqual(body[:86], b64url_decode(RFC_HEADER))
        self.assertEqual(body[86:], b64url_decode(RFC_CIPHERTEXT))
        self.assertEqual(body, b64url_decode(RFC_BODY))

    def test_stand_in_decrypts_appendix_a(self) -> None:
        """The stand-in's decryption (written apart) opens the RFC's example with the user agent's key."""
        plaintext = decrypt(b64url_decode(RFC_BODY), p256_private(RFC_UA_PRIVATE),
                            b64url_decode(RFC_AUTH))
        self.assertEqual(plaintext, b64url_decode(RFC_PLAINTEXT))

    def test_fresh_salt_and_key(self) -> None:
        """Each message has its own salt and sender key, and each decrypts."""
        ua = ec.generate_private_key(ec.SECP256R1())
        ua_public = ua.public_key().public_bytes(*_uncompressed_format())
        auth = b"a" * 16
        first, second = encrypt(b"wake", ua_public, auth), encrypt(b"wake", ua_public, auth)
        self.assertNotEqual(first[:16], second[:16])
        self.assertNotEqual(first[21:86], second[21:86])
        self.assertEqual(decrypt(first, ua, auth), b"wake")
        self.assertEqual(decrypt(second, ua, auth), b"wake")

    def test_payload_limit(self) -> None:
        """A payload of MAX_PAYLOAD bytes fills the 4096-byte record exactly; one byte more is refused."""
        ua = ec.generate_private_key(ec.SECP256R1())
        ua_public = ua.public_key().public_bytes(*_uncompressed_format())
        body = encrypt(b"x" * MAX_PAYLOAD, ua_public, b"a" * 16)
        self.assertEqual(len(body), RECORD_SIZE)
        self.assertEqual(decrypt(body, ua, b"a" * 16), b"x" * MAX_PAYLOAD)
        self.assertRaises(ValueError, encrypt, b"x" * (MAX_PAYLOAD + 1), ua_public, b"a" * 16)

    def test_bad_keys_refused(self) -> None:
        """Keys that are not a subscription's are refused, with a reason."""
        good_key, good_auth = RFC_UA_PUBLIC, RFC_AUTH
        compressed = b64url_encode(b"\x02" + b64url_decode(RFC_UA_PUBLIC)[1:33])
        off_curve = b64url_encode(b"\x04" + b"\x01" * 64)
        self.assertIsNone(check_keys(good_key, good_auth))
        self.assertIsNone(check_keys(b64url_decode(good_key), b64url_decode(good_auth)))
        self.assertIsNotNone(check_keys(b64url_decode(good_key)[:64], b64url_decode(good_auth)))
        self.assertIsNone(check_keys(None, None))
        for p256dh, auth in [(good_key, None), (None, good_auth), (compressed, good_auth),
                             (off_curve, good_auth), ("not base64!", good_auth),
                             (good_key, b64url_encode(b"a" * 15)), (good_key, "a+b/")]:
            self.assertIsNotNone(check_keys(p256dh, auth), (p256dh, auth))
        self.assertRaises(ValueError, encrypt, b"", b64url_decode(compressed), b"a" * 16)
        self.assertRaises(ValueError, encrypt, b"", b64url_decode(good_key), b"a" * 15)


def _uncompressed_format() -> tuple[Any, Any]:
    return serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint


class VapidTests(TestCase):
    def test_token(self) -> None:
        """The token is an ES256 JWT that verifies with k, naming the audience, the contact and an exp 12 hours on."""
        key = VapidKey.generate()
        header, claims, _, k = jwt_parts(
            key.authorization("https://fcm.googleapis.com", CONTACT, 1_700_000_000.5))
        self.assertEqual(header, {"typ": "JWT", "alg": "ES256"})
        self.assertEqual(claims, {"aud": "https://fcm.googleapis.com",
                                  "exp": 1_700_000_000 + JWT_LIFETIME, "sub": CONTACT})
        self.assertLessEqual(JWT_LIFETIME, 24 * 3600)
        self.assertEqual(k, key.public_key_b64url())

    def test_token_cached_and_renewed(self) -> None:
        """A token is reused for its audience until JWT_RENEW_AFTER, then signed anew with a later exp."""
        key = VapidKey.generate()
        aud = "https://push.example.net"
        first = key.authorization(aud, CONTACT, 1000.0)
        self.assertEqual(key.authorization(aud, CONTACT, 1000.0 + JWT_RENEW_AFTER - 1), first)
        other = key.authorization("https://other.example.net", CONTACT, 1001.0)
        self.assertNotEqual(other, first)
        renewed = key.authorization(aud, CONTACT, 1000.0 + JWT_RENEW_AFTER)
        self.assertNotEqual(renewed, first)
        self.assertEqual(jwt_parts(renewed)[1]["exp"], 1000 + JWT_RENEW_AFTER + JWT_LIFETIME)
        self.assertEqual(key.authorization(aud, CONTACT, 1000.0 + JWT_RENEW_AFTER + 60), renewed)
        # The clock went back: a cached token's exp could be over 24 h away.
        self.assertNotEqual(key.authorization(aud, CONTACT, 500.0), renewed)

    def test_key_forms(self) -> None:
        """A key loads from its scalar (the RFC's example key gives its public key), PEM, or a setting of either."""
        rfc = VapidKey.from_scalar(b64url_decode(RFC_AS_PRIVATE))
        self.assertEqual(rfc.public_key_b64url(), RFC_AS_PUBLIC)
        self.assertEqual(VapidKey.from_pem(rfc.private_pem()).public_key_b64url(), RFC_AS_PUBLIC)
        self.assertEqual(VapidKey.load(RFC_AS_PRIVATE).public_key_b64url(), RFC_AS_PUBLIC)
        self.assertEqual(VapidKey.load(rfc.private_pem().decode()).public_key_b64url(),
                         RFC_AS_PUBLIC)
        self.assertEqual(len(b64url_decode(VapidKey.generate().public_key_b64url())), 65)
        for bad in [b"\x00" * 32, b"\x01" * 31, b"\xff" * 32]:
            self.assertRaises(ValueError, VapidKey.from_scalar, bad)
        self.assertRaises(ValueError, VapidKey.from_pem, b"-----BEGIN PRIVATE KEY-----\n")
        self.assertRaises(ValueError, VapidKey, ec.generate_private_key(ec.SECP384R1()))

    def test_origin(self) -> None:
        """The audience is scheme://host[:port], the port only when it is not the default."""
        self.assertEqual(origin("https://FCM.googleapis.com/fcm/send/x?y#z"),
                         "https://fcm.googleapis.com")
        self.assertEqual(origin("https://push.example.net:443/a"), "https://push.example.net")
        self.assertEqual(origin("https://push.example.net:8443/a"),
                         "https://push.example.net:8443")
        self.assertEqual(origin("http://127.0.0.1:8088/push/1"), "http://127.0.0.1:8088")
        self.assertEqual(origin("http://[::1]:8088/push/1"), "http://[::1]:8088")

    def test_contact_checked(self) -> None:
        """The sender takes a mailto: or https: contact only."""
        key = VapidKey.generate()
        for contact in ["ops@example.org", "http://example.org", "mailto:", "mailto:a b"]:
            self.assertRaises(ValueError, WebPushSender, reactor, key, contact,
                              allow_endpoint=lambda url: False)
        WebPushSender(reactor, key, "https://example.org/contact", agent=object(),
                      allow_endpoint=lambda url: False)


class EndpointTests(TestCase):
    def test_refused(self) -> None:
        """Anything but a public https URL with a host name is refused, with a reason."""
        for url in [
            "http://push.example.net/x",
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/x",
            "https://[fe80::1]/x",
            "https://8.8.8.8/x",  # a public address is no push service's name either
            "https://push.example.net/" + "a" * MAX_ENDPOINT_LENGTH,
            "ftp://push.example.net/x",
            "javascript:alert(1)",
            "file:///etc/passwd",
            "https:///x",
            "https://localhost/x",
            "https://api.localhost/x",
            "https://intranet/x",
            "https://user:pass@push.example.net/x",
            "https://push.example.net:99999/x",
            "https://push.example.net/a b",
            "https://push.exämple.net/x",
            "",
        ]:
            reason = check_endpoint(url, [])
            self.assertIsInstance(reason, str, url)
            if url:
                self.assertNotIn(url, reason)

    def test_accepted(self) -> None:
        """The endpoints of the big push services pass."""
        for url in ["https://fcm.googleapis.com/fcm/send/abc:def",
                    "https://updates.push.services.mozilla.com/wpush/v2/gAAAAA",
                    "https://web.push.apple.com/QGuQyavXutnMH",
                    "https://ntfy.example.org:8443/upABC?up=1"]:
            self.assertIsNone(check_endpoint(url, []), url)

    def test_allow_list(self) -> None:
        """The operator's prefixes let http://127.0.0.1:PORT through, at a boundary only."""
        allowed = ["http://127.0.0.1:8088"]
        self.assertIsNone(check_endpoint("http://127.0.0.1:8088/push/abc", allowed))
        self.assertIsNone(check_endpoint("http://127.0.0.1:8088", allowed))
        self.assertIsNotNone(check_endpoint("http://127.0.0.1:80889/push/abc", allowed))
        self.assertIsNotNone(check_endpoint("http://127.0.0.1:8088@evil.example/", allowed))
        self.assertIsNotNone(check_endpoint("http://127.0.0.1:8089/push/abc", allowed))
        self.assertIsNotNone(check_endpoint("ftp://127.0.0.1:8088/x", ["ftp://127.0.0.1:8088"]))
        self.assertIsNotNone(check_endpoint("http://127.0.0.1:8088/" + "a" * 2048, allowed))
        self.assertTrue(matches_prefix("https://ntfy.lan/up/x", ["https://ntfy.lan/up/"]))
        self.assertFalse(matches_prefix("https://ntfy.lan/upx", ["https://ntfy.lan/up"]))

    def test_public_addresses(self) -> None:
        """Only addresses on the public Internet are public, whatever IPv6 form hides them."""
        for address in ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"]:
            self.assertTrue(is_public_address(address), address)
        for address in ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                        "100.64.0.1", "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1",
                        "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
                        "::ffff:10.0.0.1", "::ffff:127.0.0.1", "2002:7f00:1::1",
                        "not an address"]:
            self.assertFalse(is_public_address(address), address)

    def test_resolves_to_public(self) -> None:
        """A name or address that resolves to a private, loopback or link-local address is not public."""
        for host in ["127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "localhost",
                     "bad host name\x00"]:
            self.assertFalse(resolves_to_public(host), host)
        self.assertTrue(resolves_to_public("8.8.8.8"))


class SenderTests(TestCase):
    """The sender against the stand-in, over a real port."""

    def setUp(self) -> None:
        self.service = PushService(reactor)
        self.service.start()
        self.addCleanup(self.service.stop)
        self.vapid = VapidKey.generate()
        self.sender = self.make_sender()

    def make_sender(self, timeout: float = 10, allow: bool = True) -> WebPushSender:
        prefixes = [self.service.origin] if allow else []
        sender = WebPushSender(reactor, self.vapid, CONTACT, timeout=timeout,
                               allow_endpoint=lambda url: matches_prefix(url, prefixes))
        self.addCleanup(sender.close)
        return sender

    async def push(self, sub: Any, payload: bytes = b'{"wake":1}', **kwargs: Any) -> PushResult:
        kwargs.setdefault("ttl", 3600)
        kwargs.setdefault("topic", "dev1")
        return await self.sender.send(sub.subscription(), payload, **kwargs)

    async def test_round_trip(self) -> None:
        """A push is sent, taken by the stand-in with every header right, and decrypts to the payload."""
        sub = self.service.subscribe(application_server_key=self.vapid.public_key_b64url())
        result = await self.push(sub, ttl=600, topic="d-Ab_9", urgency="normal")
        self.assertEqual(result, PushResult("sent", 201, "HTTP 201"))
        self.assertEqual(self.service.errors, [])
        [received] = self.service.received
        self.assertEqual((received.subscription, received.plaintext), (sub.id, b'{"wake":1}'))
        headers = received.headers
        self.assertEqual((headers["ttl"], headers["topic"], headers["urgency"]),
                         ("600", "d-Ab_9", "normal"))
        self.assertEqual(headers["content-encoding"], "aes128gcm")
        _, claims, _, k = jwt_parts(headers["authorization"])
        self.assertEqual(claims["aud"], self.service.origin)
        self.assertEqual(k, self.vapid.public_key_b64url())

    async def test_raw_keys(self) -> None:
        """Keys given as raw bytes (as the store keeps them) work as base64url ones do."""
        sub = self.service.subscribe()
        raw = Subscription(sub.endpoint, b64url_decode(sub.p256dh or ""),
                           b64url_decode(sub.auth or ""))
        result = await self.sender.send(raw, b"raw", ttl=60, topic="t")
        self.assertEqual(result.outcome, "sent")
        self.assertEqual([r.plaintext for r in self.service.received], [b"raw"])
        self.assertEqual(self.service.errors, [])

    async def test_no_endpoint(self) -> None:
        """A registration without an endpoint is refused without a request."""
        result = await self.sender.send(Subscription(None), b"", ttl=60, topic="t")  # type: ignore[arg-type]
        self.assertEqual((result.outcome, result.status), ("refused", None))

    async def test_token_reused(self) -> None:
        """Two pushes to one push service carry the same VAPID token."""
        sub = self.service.subscribe()
        for _ in range(2):
            self.assertEqual((await self.push(sub)).outcome, "sent")
        first, second = self.service.received
        self.assertEqual(first.headers["authorization"], second.headers["authorization"])
        self.assertEqual(self.service.errors, [])

    async def test_without_keys(self) -> None:
        """A subscription without keys gets an empty body and no Content-Encoding."""
        sub = self.service.subscribe(keys=False)
        self.assertEqual((await self.push(sub, b"dropped")).outcome, "sent")
        self.assertEqual(self.service.errors, [])
        [received] = self.service.received
        self.assertEqual(received.plaintext, b"")
        self.assertNotIn("content-encoding", received.headers)
        self.assertEqual(received.headers.get("content-length", "0"), "0")

    async def test_other_application_server_key(self) -> None:
        """A subscription made with another server's key refuses our pushes (the stand-in checks k)."""
        sub = self.service.subscribe(
            application_server_key=VapidKey.generate().public_key_b64url())
        result = await self.push(sub)
        self.assertEqual((result.outcome, result.status), ("refused", 400))
        self.assertEqual(len(self.service.errors), 1)

    async def test_gone(self) -> None:
        """404 and 410 mean the subscription is gone."""
        for status in (404, 410):
            sub = self.service.subscribe()
            self.service.answer(sub.id, status)
            self.assertEqual(await self.push(sub), PushResult("gone", status, f"HTTP {status}"))
        self.assertEqual(self.service.errors, [])

    async def test_rate_limited(self) -> None:
        """429 with Retry-After is retried after that many seconds."""
        sub = self.service.subscribe()
        self.service.answer(sub.id, 429, retry_after="120")
        self.assertEqual(await self.push(sub), PushResult("retry", 429, "HTTP 429", 120.0))

    async def test_retry_after_date(self) -> None:
        """A Retry-After given as an HTTP date is turned into seconds from now."""
        sub = self.service.subscribe()
        self.service.answer(sub.id, 503, retry_after=datetimeToString(
            int(reactor.seconds()) + 300).decode("ascii"))
        result = await self.push(sub)
        self.assertEqual((result.outcome, result.status), ("retry", 503))
        assert result.retry_after is not None
        self.assertTrue(295 <= result.retry_after <= 300, result.retry_after)

    async def test_server_error(self) -> None:
        """500 is retried, without a delay when the push service gave none."""
        sub = self.service.subscribe()
        self.service.answer(sub.id, 500)
        self.assertEqual(await self.push(sub), PushResult("retry", 500, "HTTP 500", None))

    async def test_bad_request(self) -> None:
        """400 (and any other 4xx) is refused: not retried."""
        for status in (400, 403, 413):
            sub = self.service.subscribe()
            self.service.answer(sub.id, status)
            self.assertEqual(await self.push(sub), PushResult("refused", status, f"HTTP {status}"))

    async def test_hang(self) -> None:
        """A push service that never answers is given up after the timeout, and retried."""
        self.sender = self.make_sender(timeout=0.5)
        sub = self.service.subscribe()
        self.service.hang(sub.id)
        start = reactor.seconds()
        result = await self.push(sub)
        self.assertEqual(result, PushResult("retry", None, "the push service did not answer in time"))
        self.assertGreaterEqual(reactor.seconds() - start, 0.5)
        self.assertEqual(len(self.service.received), 1)
        self.assertEqual(self.service.errors, [])

    async def test_no_connection(self) -> None:
        """A closed port is retried, the reason naming no address."""
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        sender = WebPushSender(reactor, self.vapid, CONTACT,
                               allow_endpoint=lambda _: True)
        self.addCleanup(sender.close)
        result = await sender.send(Subscription(f"http://127.0.0.1:{number}/push/x"), b"",
                                   ttl=0, topic="t")
        self.assertEqual((result.outcome, result.status), ("retry", None))
        self.assertIn("could not connect", result.reason)
        self.assertNotIn("127.0.0.1", result.reason)

    async def test_endpoint_not_allowed(self) -> None:
        """An endpoint the operator does not allow is refused without a request."""
        self.sender = self.make_sender(allow=False)
        sub = self.service.subscribe()
        result = await self.push(sub)
        self.assertEqual((result.outcome, result.status), ("refused", None))
        self.assertNotIn(sub.endpoint, result.reason)
        self.assertEqual(self.service.received, [])

    async def test_bad_keys(self) -> None:
        """A subscription whose keys are not valid is refused without a request."""
        sub = self.service.subscribe()
        bad = Subscription(sub.endpoint, b64url_encode(b"\x04" + b"\x01" * 64), sub.auth)
        result = await self.sender.send(bad, b"x", ttl=60, topic="t")
        self.assertEqual(result, PushResult("refused", None, "the subscription's keys are not valid"))
        self.assertEqual(self.service.received, [])

    def test_arguments_checked(self) -> None:
        """A TTL, Topic, Urgency or payload that is never valid is a ValueError at once."""
        sub = Subscription("https://push.example.net/x")
        for kwargs in [{"ttl": -1, "topic": "t"}, {"ttl": 1.5, "topic": "t"},
                       {"ttl": True, "topic": "t"}, {"ttl": 60, "topic": "a" * 33},
                       {"ttl": 60, "topic": "a=b"}, {"ttl": 60, "topic": ""},
                       {"ttl": 60, "topic": "t", "urgency": "urgent"}]:
            self.assertRaises(ValueError, self.sender.send, sub, b"", **kwargs)
        self.assertRaises(ValueError, self.sender.send, sub, b"x" * (MAX_PAYLOAD + 1),
                          ttl=60, topic="t")

    def test_subscription_repr_has_no_secret(self) -> None:
        """A subscription's repr shows neither its endpoint nor its keys."""
        sub = Subscription("https://push.example.net/secret-token", RFC_UA_PUBLIC, RFC_AUTH)
        for secret in ("secret-token", RFC_UA_PUBLIC, RFC_AUTH):
            self.assertNotIn(secret, repr(sub))

    async def test_public_only_agent(self) -> None:
        """The sender's agent for endpoints not allowed as they are connects to no loopback address."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = public_only_agent(reactor, connect_timeout=5, pool=pool)
        with self.assertRaises(DNSLookupError):
            await agent.request(b"POST", f"{self.service.origin}/push/x".encode())
        self.assertEqual(self.service.received, [])


class StandInTests(TestCase):
    """The stand-in refuses what a strict push service refuses (else its
    "no errors" proves nothing)."""

    def setUp(self) -> None:
        self.service = PushService(reactor)
        self.service.start()
        self.addCleanup(self.service.stop)
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.vapid = VapidKey.generate()

    async def post(self, url: str, headers: dict[bytes, bytes], body: bytes = b"") -> int:
        response = await self.agent.request(
            b"POST", url.encode(), Headers({k: [v] for k, v in headers.items()}),
            FileBodyProducer(io.BytesIO(body)) if body else None)
        await readBody(response)
        return response.code

    def good(self, now: float | None = None, audience: str | None = None) -> dict[bytes, bytes]:
        auth = self.vapid.authorization(audience or self.service.origin, CONTACT,
                                        reactor.seconds() if now is None else now)
        return {b"TTL": b"60", b"Authorization": auth.encode()}

    async def test_well_formed(self) -> None:
        """A well-formed push is answered 201 with a Location, and recorded."""
        sub = self.service.subscribe()
        self.assertEqual(await self.post(sub.endpoint, self.good()), 201)
        self.assertEqual(self.service.errors, [])
        self.assertEqual(len(self.service.received), 1)

    async def test_malformed(self) -> None:
        """Each malformed push is answered 400 and recorded as an error."""
        sub = self.service.subscribe()
        ua_public = b64url_decode(sub.p256dh or "")
        auth = b64url_decode(sub.auth or "")
        good = self.good()
        no_ttl = {k: v for k, v in good.items() if k != b"TTL"}
        other_key = VapidKey.generate()
        other = other_key.authorization(self.service.origin, CONTACT, reactor.seconds())
        cases: list[tuple[str, dict[bytes, bytes], bytes]] = [
            ("no TTL", no_ttl, b""),
            ("bad TTL", {**good, b"TTL": b"-1"}, b""),
            ("no Authorization", {b"TTL": b"60"}, b""),
            ("bad Urgency", {**good, b"Urgency": b"urgent"}, b""),
            ("long Topic", {**good, b"Topic": b"a" * 33}, b""),
            ("bad Topic", {**good, b"Topic": b"a=b"}, b""),
            ("wrong aud", self.good(audience="https://push.example.net"), b""),
            ("expired", self.good(now=reactor.seconds() - JWT_LIFETIME - 10), b""),
            ("too far", self.good(now=reactor.seconds() + 13 * 3600), b""),
            ("signed by another key", {**good, b"Authorization": other.encode().replace(
                VapidKey.public_key_b64url(other_key).encode(),
                self.vapid.public_key_b64url().encode())}, b""),
            ("bad k", {**good, b"Authorization": good[b"Authorization"] + b"x"}, b""),
            ("no encoding", good, encrypt(b"x", ua_public, auth)),
            ("aesgcm", {**good, b"Content-Encoding": b"aesgcm"}, encrypt(b"x", ua_public, auth)),
            ("other key", {**good, b"Content-Encoding": b"aes128gcm"},
             encrypt(b"x", ua_public, b"b" * 16)),
        ]
        for name, headers, body in cases:
            before = len(self.service.errors)
            self.assertEqual(await self.post(sub.endpoint, headers, body), 400, name)
            self.assertEqual(len(self.service.errors), before + 1, name)
        self.assertEqual(self.service.received, [])

    async def test_unknown_subscription(self) -> None:
        """A push to a subscription the stand-in never made is answered 404."""
        self.assertEqual(await self.post(f"{self.service.origin}/push/nobody", self.good()), 404)

    def test_decrypt_refuses(self) -> None:
        """Decryption refuses a body cut short, of two records, or under another secret."""
        ua = ec.generate_private_key(ec.SECP256R1())
        ua_public = ua.public_key().public_bytes(*_uncompressed_format())
        body = encrypt(b"hello", ua_public, b"a" * 16)
        for bad, auth in [(body[:20], b"a" * 16), (body[:-1], b"a" * 16), (body, b"b" * 16),
                          (body[:16] + b"\x00\x00\x00\x12" + body[20:], b"a" * 16)]:
            self.assertRaises(Malformed, decrypt, bad, ua, auth)
