"""Session tokens: HS256 JWTs, checked strictly."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cyphr.errors import Unauthorized
from cyphr.handlers.tokens import TokenService

KEY = b"k" * 64


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_790_000_000)
        self.tokens = TokenService(KEY, 3600, self.clock)
        self.issued = self.tokens.issue("user-id", "alice", "d" * 64)

    def refused(self, token: str) -> str:
        with self.assertRaises(Unauthorized) as caught:
            self.tokens.verify(token)
        return caught.exception.code

    def test_round_trip(self) -> None:
        """An issued token verifies, and an independent JWT library accepts it too."""
        claims = self.tokens.verify(self.issued.token)
        self.assertEqual((claims.user_id, claims.cyphr_id, claims.jti), ("user-id", "alice", self.issued.jti))
        decoded = jwt.decode(self.issued.token, KEY, algorithms=["HS256"], options={"verify_exp": False})
        self.assertEqual(decoded["exp"] - decoded["iat"], 3600)

    def test_tampering(self) -> None:
        """Any change to the header, the claims or the signature is refused."""
        header, payload, signature = self.issued.token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        forged = b64url(json.dumps({**claims, "cyphrId": "mallory"}).encode())
        self.assertEqual(self.refused(f"{header}.{forged}.{signature}"), "INVALID_TOKEN")
        flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
        self.assertEqual(self.refused(f"{header}.{payload}.{flipped}"), "INVALID_TOKEN")
        spaced = b64url(b'{"alg": "HS256", "typ": "JWT"}')  # same meaning, other bytes
        self.assertEqual(self.refused(f"{spaced}.{payload}.{signature}"), "INVALID_TOKEN")

    def test_other_algorithms(self) -> None:
        """Tokens of other algorithms, or none, are refused even with the right key."""
        claims = jwt.decode(self.issued.token, options={"verify_signature": False})
        for algorithm in ("HS384", "HS512"):
            self.assertEqual(self.refused(jwt.encode(claims, KEY, algorithm=algorithm)), "INVALID_TOKEN")
        none = b64url(b'{"alg":"none","typ":"JWT"}') + "." + self.issued.token.split(".")[1] + "."
        self.assertEqual(self.refused(none), "INVALID_TOKEN")

    def test_malformed(self) -> None:
        """Garbage of every shape is INVALID_TOKEN, never an exception of another kind."""
        header, payload, signature = self.issued.token.split(".")
        for token in ("", "a.b", "a.b.c.d", "é.é.é", f"{header}.{payload}.{signature}!",
                      f"{header}.{payload}", f"{header}.!!!.{signature}"):
            self.assertEqual(self.refused(token), "INVALID_TOKEN", token)
        for claims in ([1], {"sub": "x"}, {"sub": "u", "cyphrId": "a", "dev": "d", "jti": "j", "iat": True,
                                            "exp": 2_000_000_000, "authMethod": "cyphr_id"}):
            body = b64url(json.dumps(claims).encode())
            signing_input = f"{header}.{body}".encode()
            sig = b64url(hmac.new(KEY, signing_input, hashlib.sha256).digest())
            self.assertEqual(self.refused(f"{header}.{body}.{sig}"), "INVALID_TOKEN", claims)

    def test_expiry_from_the_clock(self) -> None:
        """A token is valid until its exp on the injected clock, then TOKEN_EXPIRED."""
        self.clock.advance(3599)
        self.tokens.verify(self.issued.token)
        self.clock.advance(1)
        self.assertEqual(self.refused(self.issued.token), "TOKEN_EXPIRED")

    def test_only_the_issued_spelling(self) -> None:
        """Only unpadded base64url, as issued, is accepted: the same bytes written in standard base64,
        with '=' padding, or with stray low bits in the last character are 401 INVALID_TOKEN."""
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        respelled = 0
        for n in range(200):  # until both URL-safe characters have shown up
            token = self.tokens.issue(f"user-{n}", "alice", "d" * 64).token
            self.tokens.verify(token)
            header, payload, signature = token.split(".")
            standard = token.replace("-", "+").replace("_", "/")
            if standard != token:
                respelled += 1
                with self.assertRaises(Unauthorized) as caught:
                    self.tokens.verify(standard)
                self.assertEqual((caught.exception.status, caught.exception.code), (401, "INVALID_TOKEN"))
            if respelled >= 5:
                break
        self.assertGreaterEqual(respelled, 5)
        header, payload, signature = self.issued.token.split(".")
        variants = [f"{header}.{payload}.{signature}" + "=" * (-len(signature) % 4)]
        if len(payload) % 4:
            variants.append(f"{header}.{payload}{'=' * (-len(payload) % 4)}.{signature}")
        variants.append(f"{header}.{payload}.{signature}====")
        # 32 bytes in 43 characters: the last one carries 2 unused bits.
        stray = alphabet[alphabet.index(signature[-1]) ^ 1]
        self.assertEqual(base64.urlsafe_b64decode(signature[:-1] + stray + "="),
                         base64.urlsafe_b64decode(signature + "="))
        variants.append(f"{header}.{payload}.{signature[:-1]}{stray}")
        for token in variants:
            self.assertEqual(self.refused(token), "INVALID_TOKEN", token)
