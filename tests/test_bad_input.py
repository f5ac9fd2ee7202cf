"""Bad input on every route: a 4xx in the contract's format, never a 5xx."""

from __future__ import annotations

import json
import uuid
from typing import Any

from twisted.trial.unittest import TestCase

from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, start_server
from tests.users import User, b64, new_kyber_key

BAD_VALUES: list[Any] = [
    None, 0, -1, 2**64, 1.5, True, "", " ", "x" * 100_000, "\u0000", "\ud83d\ude00" * 10,
    "аlice", [], [1], {}, {"a": {"b": []}}, "====", "AAAA" * 1000,
    "a\ud800", {"c": "\udfff"},  # lone surrogates: JSON escapes that are not text
]
BAD_PATH_SEGMENTS = ["%00", "A", "a" * 300, "%F0%9F%98%80", "..", "%2e%2e", "al%20ice", "alice%0a"]


class BadInputTestsMixin:
    async def setUp(self) -> None:
        self.server = await start_server(self, rate_limit_auth=(1_000_000, 1))
        self.http = InProcessHTTP.for_server(self.server)
        self.alice = User("alice")
        await self.alice.register(self.http)
        self.bob = User("bob")
        await self.bob.register(self.http)

    def templates(self, challenge_id: str, chat_id: str, message_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        key = new_kyber_key()
        signature = b64(b"\x01" * 64)
        statement = b64(b"\x00\x00\x00\x05login")
        times = {"kyberKeyId": 1, "kyberKeyCreatedAt": "2026-09-21T14:13:20.000Z",
                 "kyberKeyExpiresAt": "2027-03-20T14:13:20.000Z"}
        return [
            ("POST", "/api/cyphr-id/check", {"cyphrId": "carol"}),
            ("POST", "/api/cyphr-id/challenge", {"cyphrId": "carol"}),
            ("POST", "/api/cyphr-id/register", {
                "cyphrId": "carol", "publicKey": b64(b"\x02" * 32), "kyberPublicKey": b64(key),
                "kyberKeySignature": signature, "deviceFingerprint": "a" * 64,
                "displayName": "Carol", "challengeId": challenge_id, "statement": statement,
                "signature": signature, **times}),
            ("POST", "/api/cyphr-id/login", {
                "cyphrId": "alice", "deviceFingerprint": "a" * 64, "challengeId": challenge_id,
                "statement": statement, "signature": signature, "totpCode": "123456"}),
            ("POST", "/api/cyphr-id/recover", {
                "cyphrId": "alice", "newDeviceFingerprint": "b" * 64, "challengeId": challenge_id,
                "statement": statement, "signature": signature, "kyberPublicKey": b64(key),
                "kyberKeySignature": signature, **times, "totpCode": "123456"}),
            ("POST", "/api/cyphr-id/update-profile", {
                "displayName": "A", "avatarUrl": "https://x.example/a.png", "encryptedSettings": "s"}),
            ("DELETE", "/api/cyphr-id/account", {
                "challengeId": challenge_id, "statement": statement, "signature": signature,
                "deviceFingerprint": self.alice.fingerprint}),
            ("PUT", "/api/cyphr-id/pin-backup", {"blob": b64(b"sealed")}),
            ("PUT", "/api/cyphr-id/history-backup", {"blob": b64(b"sealed")}),
            ("DELETE", "/api/cyphr-id/history-backup", {}),
            ("POST", "/api/messaging/store-public-key", {
                "kyberPublicKey": b64(key), "kyberKeySignature": signature, "userId": "alice",
                "publicKey": b64(self.alice.public_key), **times}),
            ("POST", "/api/auth/register-public-key", {
                "kyberPublicKey": b64(key), "kyberKeySignature": signature, **times}),
            ("POST", "/api/keys/prekeys", {
                "prekeys": [{"keyId": 1, "kyberPublicKey": b64(key), "signature": signature,
                             "createdAt": times["kyberKeyCreatedAt"],
                             "expiresAt": times["kyberKeyExpiresAt"]}]}),
            ("POST", "/api/keys/claim/bob", {}),
            ("POST", "/api/auth/hash-password", {"password": "pw"}),
            ("POST", "/api/auth/totp/generate", {}),
            ("POST", "/api/auth/totp/verify", {"code": "123456"}),
            ("POST", "/api/auth/totp/disable", {"code": "123456"}),
            ("POST", "/api/wallet/link", {
                "stellarAddress": "GAAZI4TCR3TY5OJHCTJC2A4QSY6CJWJH5IAJTGKIN2ER7LBNVKOCCWN7",
                "challengeId": challenge_id, "origin": "http://127.0.0.1", "signature": signature}),
            ("DELETE", "/api/wallet/link", {}),
            ("POST", "/api/messaging/send", {
                "chatId": chat_id, "encryptedPayload": {"c": "x"}, "messageType": "text",
                "clientMessageId": "m1"}),
            ("POST", "/api/messaging/send", {"recipientId": "bob", "encryptedPayload": {"c": "x"}}),
            ("POST", "/api/messaging/create-group", {
                "encryptedName": "n", "members": ["bob"], "encryptedSettings": "s"}),
            ("PUT", f"/api/messaging/message/{message_id}", {"encryptedPayload": {"c": "y"}}),
            ("PUT", f"/api/chats/{chat_id}/members/bob/role", {"role": "member"}),
            # Last: an empty body is a valid logout.
            ("POST", "/api/cyphr-id/logout", {}),
        ]

    async def send(self, method: str, path: str, body: bytes, auth: bool = True) -> Any:
        headers = {b"Content-Type": [b"application/json"]}
        if auth:
            headers.update(self.alice.auth())
        return await self.http.request(method, path, data=body, headers=headers)

    def assertClientError(self, response: Any, what: Any) -> None:
        self.assertTrue(200 <= response.code < 500, (what, response.code, response.body[:300]))
        if response.code >= 400:
            body = response.json()
            self.assertIs(body["success"], False, what)
            self.assertRegex(body["code"], r"^[A-Z_]+$", what)

    async def test_every_field_of_every_route(self) -> None:
        """Each field of each route, replaced by values of every wrong kind, and
        whole bodies that are not objects, get a 4xx, never a 5xx."""
        challenge_id, _ = await self.alice.challenge(self.http)
        # bob writes first: a group admin may add only its contacts.
        await self.http.post("/api/messaging/send", {"recipientId": "alice", "encryptedPayload": {}},
                             headers=self.bob.auth())
        group = await self.http.post("/api/messaging/create-group", {"members": ["bob"]},
                                     headers=self.alice.auth())
        chat_id = group.json()["chatId"]
        sent = await self.http.post("/api/messaging/send", {"chatId": chat_id, "encryptedPayload": {}},
                                    headers=self.alice.auth())
        message_id = sent.json()["messageId"]
        for method, path, template in self.templates(challenge_id, chat_id, message_id):
            for raw in (b"[]", b'"text"', b"null", b"{", b"{}", b'{"unknown": 1}'):
                self.assertClientError(await self.send(method, path, raw), (path, raw))
            for field in template:
                for value in BAD_VALUES:
                    body = json.dumps({**template, field: value}).encode()
                    self.assertClientError(await self.send(method, path, body), (path, field, value))
            if path != "/api/cyphr-id/logout":
                # The sweep reached the route's own checks, not a dead token.
                still = await self.http.get("/api/keys/count", headers=self.alice.auth())
                self.assertEqual(still.code, 200, path)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_path_parameters(self) -> None:
        """Malformed Cyphr IDs in paths are 4xx on every route that takes one."""
        for segment in BAD_PATH_SEGMENTS:
            for method, path in (("GET", "/api/cyphr-id/user/"), ("GET", "/api/messaging/public-key/"),
                                 ("POST", "/api/keys/claim/"), ("GET", "/api/wallet/"),
                                 ("GET", "/api/messaging/chat/"), ("PUT", "/api/messaging/message/"),
                                 ("DELETE", "/api/messaging/message/"), ("GET", "/api/chats/"),
                                 ("POST", f"/api/chats/{uuid.uuid4()}/members/")):
                response = await self.send(method, path + segment, b"")
                self.assertClientError(response, (path, segment))
        for query in ("q=%00", "q=" + "a" * 1000, "q=al&limit=-1", "q=al&limit=99999999999999999999",
                      "q=%FF", "limit=5", "q=al&q=bo"):
            response = await self.send("GET", "/api/cyphr-id/search?" + query, b"")
            self.assertClientError(response, query)
        for query in ("since=-1", "since=%00", "since=" + "9" * 30, "limit=0", "limit=x", "since=1.5"):
            response = await self.send("GET", "/api/messaging/sync?" + query, b"")
            self.assertClientError(response, query)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_deep_nesting_is_capped(self) -> None:
        """A body nested deeper than 64 levels, anywhere (an encryptedPayload ~960 deep included, which
        the decoder reads but storing would overflow the stack on), is 400 INVALID_JSON and stores
        nothing; 64 levels are accepted."""
        def nested(depth: int) -> str:  # a value of ``depth`` levels, objects and arrays mixed
            return '{"a":[' * (depth // 2) + ("[]" if depth % 2 else "0") + "]}" * (depth // 2)
        before = await self.http.get("/api/messaging/sync", headers=self.bob.auth())
        for depth in (65, 100, 960):
            body = ('{"recipientId":"bob","encryptedPayload":' + nested(depth - 1) + "}").encode()
            response = await self.send("POST", "/api/messaging/send", body)
            self.assertEqual((response.code, response.json()["code"]), (400, "INVALID_JSON"), depth)
            self.assertIn("64", response.json()["error"])
        for raw in (("[" * 65 + "]" * 65).encode(), b'{"a":' + b"[" * 960 + b"]" * 960 + b"}"):
            response = await self.send("POST", "/api/cyphr-id/check", raw)
            self.assertEqual((response.code, response.json()["code"]), (400, "INVALID_JSON"))
        # Brackets inside strings are no nesting.
        response = await self.send("POST", "/api/messaging/send", json.dumps(
            {"recipientId": "bob", "encryptedPayload": {"c": "[{" * 500}}).encode())
        self.assertEqual(response.code, 201, response.body)
        response = await self.send("POST", "/api/messaging/send", (
            '{"recipientId":"bob","encryptedPayload":' + nested(63) + "}").encode())
        self.assertEqual(response.code, 201, response.body)
        after = await self.http.get("/api/messaging/sync", headers=self.bob.auth())
        self.assertEqual(len(after.json()["messages"]), len(before.json()["messages"]) + 2)
        self.assertEqual(self.flushLoggedErrors(), [])


class SQLiteBadInputTests(SQLiteMixin, BadInputTestsMixin, TestCase):
    pass


class PostgresBadInputTests(PostgresMixin, BadInputTestsMixin, TestCase):
    pass
