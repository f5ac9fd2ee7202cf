"""/api/cyphr-id: registration, challenges, login, recovery, tokens,
profiles, search, logout, deletion and the per-address rate limit, on both
engines, with real Ed25519 and ML-KEM-1024 keys."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import jwt
from nacl.signing import SigningKey
from twisted.trial.unittest import TestCase

from cyphr.api.guard import ACCESS_ATTRIBUTE
from cyphr.signing import AuthStatement
from tests.helpers import (
    InProcessHTTP,
    PostgresMixin,
    SQLiteMixin,
    fixed_clock,
    start_server,
)
from tests.users import User, b64, new_kyber_key

DAY = 86400


class IdentityTestsMixin:
    overrides: dict[str, Any] = {}

    async def setUp(self) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, **self.overrides)
        self.http = InProcessHTTP.for_server(self.server)
        self.alice = User("alice")
        self.alice.use(self.http)

    async def count(self, table: str, where: str = "", params: tuple[Any, ...] = ()) -> int:
        rows = await self.server.database.run_query(f"SELECT COUNT(*) FROM {table} {where}", params)
        return rows[0][0]

    async def assertError(self, response: Any, status: int, code: str) -> dict[str, Any]:
        self.assertEqual((response.code, response.json().get("code")), (status, code), response.body)
        self.assertIs(response.json()["success"], False)
        return response.json()

    # -- the whole flow ---------------------------------------------------

    async def test_register_login_and_protected_route(self) -> None:
        """Register with real keys, log in by signing a challenge, and use the token."""
        check = await self.http.post("/api/cyphr-id/check", {"cyphrId": "alice"})
        self.assertEqual(check.json(), {"success": True, "available": True, "cyphrId": "alice"})

        response = await self.alice.register(self.http)
        body = response.json()
        self.assertEqual(set(body), {"success", "token", "userId", "cyphrId", "expiresAt",
                                     "deviceId"})
        self.assertEqual(body["deviceId"], 1)
        self.assertEqual(body["cyphrId"], "alice")
        uuid.UUID(body["userId"])
        self.assertEqual(body["expiresAt"], "2026-09-28T14:13:20.000Z")

        # PyJWT, independently, accepts the token under the server's secret.
        claims = jwt.decode(body["token"], self.server.secrets.jwt_key, algorithms=["HS256"],
                            options={"verify_exp": False, "verify_iat": False})
        self.assertEqual(jwt.get_unverified_header(body["token"]), {"alg": "HS256", "typ": "JWT"})
        self.assertEqual(claims["sub"], body["userId"])
        self.assertEqual((claims["cyphrId"], claims["authMethod"]), ("alice", "cyphr_id"))
        self.assertRegex(claims["dev"], r"^[0-9a-f]{64}$")
        self.assertNotEqual(claims["dev"], self.alice.fingerprint)
        self.assertEqual(claims["exp"] - claims["iat"], 7 * DAY)

        check = await self.http.post("/api/cyphr-id/check", {"cyphrId": "alice"})
        self.assertIs(check.json()["available"], False)

        login = await self.alice.login(self.http)
        self.assertEqual(login.code, 200, login.body)
        user = login.json()["user"]
        self.assertEqual((user["cyphrId"], user["userId"], user["totpEnabled"]),
                         ("alice", body["userId"], False))
        self.assertEqual(user["publicKey"], b64(self.alice.public_key))
        self.assertEqual(user["kyberPublicKey"], b64(self.alice.kyber_key))

        me = await self.http.get("/api/cyphr-id/user/alice", headers=self.alice.auth())
        self.assertEqual(me.code, 200)
        self.assertEqual(me.json()["user"]["displayName"], "Alice")

    async def test_fingerprint_stored_only_as_keyed_hash(self) -> None:
        """The device fingerprint never reaches the database; a keyed hash of it does."""
        await self.alice.register(self.http)
        rows = await self.server.database.run_query(
            "SELECT d.fingerprint_hash FROM devices d JOIN cyphr_identities i ON i.id = d.user_id"
            " WHERE i.cyphr_id = 'alice'")
        self.assertRegex(rows[0][0], r"^[0-9a-f]{64}$")
        self.assertNotEqual(rows[0][0], self.alice.fingerprint)
        import hashlib
        self.assertNotEqual(rows[0][0], hashlib.sha256(self.alice.fingerprint.encode()).hexdigest())

    # -- registration refusals -----------------------------------------------

    async def test_taken(self) -> None:
        """A Cyphr ID in use is 409 CYPHR_ID_TAKEN, and the first owner keeps it."""
        await self.alice.register(self.http)
        impostor = User("alice")
        response = await self.http.post("/api/cyphr-id/register", await impostor.register_body(self.http))
        await self.assertError(response, 409, "CYPHR_ID_TAKEN")
        rows = await self.server.database.run_query("SELECT public_key FROM cyphr_identities")
        self.assertEqual(rows, [(self.alice.public_key,)])

    async def test_register_with_bad_signature(self) -> None:
        """A registration signed by another key is 401 INVALID_SIGNATURE and stores nothing."""
        body = await self.alice.register_body(self.http)
        statement = AuthStatement.decode(base64.b64decode(body["statement"]))
        body["signature"] = b64(statement.sign(SigningKey.generate()))
        await self.assertError(await self.http.post("/api/cyphr-id/register", body), 401, "INVALID_SIGNATURE")
        self.assertEqual(await self.count("cyphr_identities"), 0)

    async def test_register_with_invalid_kyber_key(self) -> None:
        """A Kyber key that is not a valid ML-KEM-1024 key, or not signed by the
        identity key, is refused and nothing is stored."""
        bad_key = b"\xff" * 1568  # every coefficient above the modulus
        body = await self.alice.register_body(self.http, **self.alice.main_key_fields(bad_key, key_id=1))
        await self.assertError(await self.http.post("/api/cyphr-id/register", body), 400, "INVALID_KYBER_KEY")
        body = await self.alice.register_body(
            self.http, kyberKeySignature=self.alice.main_key_fields(new_kyber_key(), key_id=1)["kyberKeySignature"])
        await self.assertError(await self.http.post("/api/cyphr-id/register", body), 400,
                               "INVALID_KEY_SIGNATURE")
        self.assertEqual(await self.count("cyphr_identities"), 0)

    async def test_bad_input(self) -> None:
        """Malformed registrations are 400 with the right code, and store nothing."""
        cases: list[tuple[dict[str, Any], str]] = [
            ({"cyphrId": "Alice"}, "INVALID_CYPHR_ID"),
            ({"cyphrId": "al"}, "INVALID_CYPHR_ID"),
            ({"cyphrId": "a" * 31}, "INVALID_CYPHR_ID"),
            ({"cyphrId": "\u0430lice"}, "INVALID_CYPHR_ID"),  # Cyrillic a
            ({"cyphrId": "ａlice"}, "INVALID_CYPHR_ID"),  # fullwidth a
            ({"cyphrId": "alice\n"}, "INVALID_CYPHR_ID"),
            ({"cyphrId": 42}, "INVALID_CYPHR_ID"),
            ({"publicKey": "not base64!"}, "INVALID_FIELD"),
            ({"publicKey": b64(b"short")}, "INVALID_FIELD"),
            ({"publicKey": None}, "MISSING_FIELD"),
            ({"kyberPublicKey": b64(b"\x00" * 1567)}, "INVALID_FIELD"),
            ({"signature": b64(b"\x00" * 63)}, "INVALID_FIELD"),
            ({"deviceFingerprint": "A" * 64}, "INVALID_FIELD"),
            ({"deviceFingerprint": "a" * 63}, "INVALID_FIELD"),
            ({"deviceFingerprint": ["a" * 64]}, "INVALID_FIELD"),
            ({"displayName": "x" * 101}, "INVALID_FIELD"),
            ({"displayName": "bell\x07"}, "INVALID_FIELD"),
            ({"displayName": {"a": 1}}, "INVALID_FIELD"),
            ({"challengeId": "not-a-uuid"}, "INVALID_FIELD"),
            ({"isAdmin": True}, "UNKNOWN_FIELD"),
        ]
        for change, code in cases:
            body = await self.alice.register_body(self.http, **change)
            response = await self.http.post("/api/cyphr-id/register", body)
            self.assertEqual((response.code, response.json()["code"]), (400, code), (change, response.body))
        body = await self.alice.register_body(self.http)
        del body["kyberPublicKey"]
        await self.assertError(await self.http.post("/api/cyphr-id/register", body), 400, "MISSING_FIELD")
        self.assertEqual(await self.count("cyphr_identities"), 0)

    # -- challenges -----------------------------------------------------------

    async def test_challenge_shape(self) -> None:
        """A challenge is 32 random bytes, with an id and an expiry five minutes on."""
        response = await self.http.post("/api/cyphr-id/challenge", {"cyphrId": "alice"})
        body = response.json()
        self.assertEqual(len(base64.b64decode(body["challenge"])), 32)
        uuid.UUID(body["challengeId"])
        self.assertEqual(body["expiresAt"], "2026-09-21T14:18:20.000Z")
        other = (await self.http.post("/api/cyphr-id/challenge", {"cyphrId": "alice"})).json()
        self.assertNotEqual(other["challenge"], body["challenge"])

    async def test_challenge_used_twice(self) -> None:
        """A challenge works once: presenting it again is 401 INVALID_CHALLENGE."""
        await self.alice.register(self.http)
        body = await self.alice.login_body(self.http)
        self.assertEqual((await self.http.post("/api/cyphr-id/login", body)).code, 200)
        await self.assertError(await self.http.post("/api/cyphr-id/login", body), 401, "INVALID_CHALLENGE")

    async def test_challenge_expired(self) -> None:
        """A challenge older than five minutes is refused."""
        await self.alice.register(self.http)
        body = await self.alice.login_body(self.http)
        self.clock.advance(5 * 60 + 1)
        await self.assertError(await self.http.post("/api/cyphr-id/login", body), 401, "INVALID_CHALLENGE")

    async def test_challenge_for_another_id(self) -> None:
        """A challenge issued for one Cyphr ID cannot log in another."""
        await self.alice.register(self.http)
        challenge = await self.alice.challenge(self.http, "mallory")
        body = await self.alice.login_body(self.http, challenge=challenge)
        await self.assertError(await self.http.post("/api/cyphr-id/login", body), 401, "INVALID_CHALLENGE")
        body = await self.alice.login_body(self.http, challengeId=str(uuid.uuid4()))
        await self.assertError(await self.http.post("/api/cyphr-id/login", body), 401, "INVALID_CHALLENGE")

    # -- login refusals ---------------------------------------------------------

    async def test_tampered_signature(self) -> None:
        """A signature with one bit flipped, or by another key, is 401 INVALID_SIGNATURE."""
        await self.alice.register(self.http)
        body = await self.alice.login_body(self.http)
        signature = bytearray(base64.b64decode(body["signature"]))
        signature[10] ^= 1
        body["signature"] = b64(bytes(signature))
        await self.assertError(await self.http.post("/api/cyphr-id/login", body), 401, "INVALID_SIGNATURE")
        body = await self.alice.login_body(self.http)
        statement = base64.b64decode(body["statement"])
        body["signature"] = b64(AuthStatement.decode(statement).sign(SigningKey.generate()))
        await self.assertError(await self.http.post("/api/cyphr-id/login", body), 401, "INVALID_SIGNATURE")

    async def test_unknown_user(self) -> None:
        """Logging in as nobody is refused like a wrong signature."""
        await self.assertError(await User("nobody").login(self.http), 401, "INVALID_SIGNATURE")

    async def test_device_mismatch_then_recover(self) -> None:
        """Another device is DEVICE_MISMATCH until the owner recovers there; then
        the old device's tokens and fingerprint stop working."""
        await self.alice.register(self.http)
        old_token, old_fingerprint = self.alice.token, self.alice.fingerprint
        new_fingerprint = "ab" * 32
        await self.assertError(await self.alice.login(self.http, deviceFingerprint=new_fingerprint),
                               401, "DEVICE_MISMATCH")

        new_kyber = new_kyber_key()
        response = await self.alice.recover(self.http, new_fingerprint,
                                            **self.alice.main_key_fields(new_kyber))
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual(response.json()["user"]["kyberPublicKey"], b64(new_kyber))
        self.assertEqual(response.json()["user"]["kyberKeyId"], 2)
        new_token = response.json()["token"]

        await self.assertError(await self.http.get("/api/cyphr-id/user/alice", headers=self.alice.auth(old_token)),
                               401, "TOKEN_REVOKED")
        self.assertEqual((await self.http.get("/api/cyphr-id/user/alice",
                                              headers=self.alice.auth(new_token))).code, 200)
        await self.assertError(await self.alice.login(self.http, deviceFingerprint=old_fingerprint),
                               401, "DEVICE_MISMATCH")
        self.assertEqual((await self.alice.login(self.http, deviceFingerprint=new_fingerprint)).code, 200)

    async def test_recover_needs_the_identity_key(self) -> None:
        """Recovery signed by another key moves nothing."""
        await self.alice.register(self.http)
        body = await self.alice.recover_body(self.http, "cd" * 32)
        statement = AuthStatement.decode(base64.b64decode(body["statement"]))
        body["signature"] = b64(statement.sign(SigningKey.generate()))
        response = await self.http.post("/api/cyphr-id/recover", body)
        await self.assertError(response, 401, "INVALID_SIGNATURE")
        self.assertEqual((await self.alice.login(self.http)).code, 200)

    async def test_recover_kyber_fields_go_together(self) -> None:
        """A new Kyber key without its signature, or some of the v2 key fields
        without the others, is 400 MISSING_FIELD and moves nothing."""
        await self.alice.register(self.http)
        fields = self.alice.main_key_fields(new_kyber_key())
        for name in ("kyberKeySignature", "kyberPublicKey", "kyberKeyId", "kyberKeyCreatedAt"):
            partial = {k: v for k, v in fields.items() if k != name}
            response = await self.alice.recover(self.http, "cd" * 32, **partial)
            body = await self.assertError(response, 400, "MISSING_FIELD")
            self.assertEqual(body["details"]["field"], name, partial)
        self.assertEqual((await self.alice.login(self.http)).code, 200)

    # -- tokens -----------------------------------------------------------------

    async def protected(self, token: str | None = None, header: str | None = None) -> Any:
        headers = {b"Authorization": [header.encode()]} if header is not None else (
            self.alice.auth(token) if token else {})
        return await self.http.get("/api/cyphr-id/user/alice", headers=headers)

    async def test_missing_or_malformed_authorization(self) -> None:
        """No token, or not a Bearer token, is 401 UNAUTHORIZED."""
        await self.alice.register(self.http)
        await self.assertError(await self.protected(), 401, "UNAUTHORIZED")
        await self.assertError(await self.protected(header="Basic YWxpY2U6eA=="), 401, "UNAUTHORIZED")
        await self.assertError(await self.protected(header="Bearer"), 401, "UNAUTHORIZED")
        await self.assertError(await self.protected(header="Bearer garbage"), 401, "INVALID_TOKEN")

    async def test_forged_tokens(self) -> None:
        """Tokens signed with another secret, with alg none, with another
        algorithm or with altered claims are refused."""
        await self.alice.register(self.http)
        claims = jwt.decode(self.alice.token, options={"verify_signature": False})
        key = self.server.secrets.jwt_key
        await self.assertError(await self.protected(jwt.encode(claims, b"x" * 32, algorithm="HS256")),
                               401, "INVALID_TOKEN")
        await self.assertError(await self.protected(jwt.encode(claims, key, algorithm="HS512")),
                               401, "INVALID_TOKEN")
        header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=")
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
        await self.assertError(await self.protected((header + b"." + payload + b".").decode()),
                               401, "INVALID_TOKEN")
        await self.assertError(await self.protected(jwt.encode({**claims, "cyphrId": "bob"}, key)),
                               401, "INVALID_TOKEN")
        await self.assertError(await self.protected(jwt.encode({**claims, "sub": str(uuid.uuid4())}, key)),
                               401, "INVALID_TOKEN")
        await self.assertError(await self.protected(jwt.encode({**claims, "dev": "0" * 64}, key)),
                               401, "TOKEN_REVOKED")
        self.assertEqual((await self.protected(self.alice.token)).code, 200)

    async def test_expired_token(self) -> None:
        """A token past its lifetime is 401 TOKEN_EXPIRED."""
        await self.alice.register(self.http)
        self.clock.advance(7 * DAY - 1)
        self.assertEqual((await self.protected(self.alice.token)).code, 200)
        self.clock.advance(1)
        await self.assertError(await self.protected(self.alice.token), 401, "TOKEN_EXPIRED")

    async def test_logout_revokes_this_token(self) -> None:
        """Logout revokes the token it was called with, and only that one."""
        await self.alice.register(self.http)
        first = self.alice.token
        self.clock.advance(1)
        await self.alice.login(self.http)
        second = self.alice.token
        self.assertEqual((await self.http.post("/api/cyphr-id/logout", headers=self.alice.auth(first))).code, 200)
        await self.assertError(await self.protected(first), 401, "TOKEN_REVOKED")
        self.assertEqual((await self.protected(second)).code, 200)

    async def test_concurrent_authentication(self) -> None:
        """Many requests authenticated in the same moment (looked up together)
        each get their own verdict: a revoked token among them is refused, the
        others pass, whatever order they come in."""
        from twisted.internet.defer import Deferred, gatherResults

        users = [User(f"user_{n}") for n in range(6)]
        for user in users:
            await user.register(self.http)
        revoked = users[2].token
        await self.http.post("/api/cyphr-id/logout", headers=users[2].auth())
        await users[2].login(self.http)
        tokens = [u.token for u in users] + [revoked, users[0].token, revoked]
        responses = await gatherResults([
            Deferred.fromCoroutine(self.http.get("/api/keys/count", headers=self.alice.auth(token)))
            for token in tokens])
        self.assertEqual([r.code for r in responses], [200] * 6 + [401, 200, 401])
        self.assertEqual(responses[6].json()["code"], "TOKEN_REVOKED")

    # -- profiles and search -------------------------------------------------------

    async def test_search(self) -> None:
        """Search is an authenticated prefix search of public profiles, limited."""
        for name in ("alina", "alvin", "bob"):
            await User(name).register(self.http)
        await self.alice.register(self.http)
        response = await self.http.get("/api/cyphr-id/search?q=al&limit=2", headers=self.alice.auth())
        users = response.json()["users"]
        self.assertEqual([u["cyphrId"] for u in users], ["alice", "alina"])
        self.assertEqual(set(users[0]), {"cyphrId", "displayName", "avatarUrl", "publicKey",
                                         "kyberPublicKey", "kyberKeySignature", "kyberKeyId",
                                         "kyberKeyCreatedAt", "kyberKeyExpiresAt",
                                         "kyberKeySignatureVersion", "isOnline", "lastSeen"})
        self.assertEqual((users[0]["kyberKeyId"], users[0]["kyberKeySignatureVersion"]), (1, 2))
        self.assertEqual(users[0]["kyberKeyCreatedAt"], "2026-09-21T14:13:20.000Z")
        self.assertEqual(users[0]["kyberKeyExpiresAt"], "2027-03-20T14:13:20.000Z")
        response = await self.http.get("/api/cyphr-id/search?q=a_", headers=self.alice.auth())
        self.assertEqual(response.json()["users"], [])
        await self.assertError(await self.http.get("/api/cyphr-id/search?q=al"), 401, "UNAUTHORIZED")
        for query in ("q=", "q=AL", "q=%25", "q=al&limit=0", "q=al&limit=51", "q=al&limit=x", ""):
            response = await self.http.get(f"/api/cyphr-id/search?{query}", headers=self.alice.auth())
            await self.assertError(response, 400, "INVALID_QUERY")

    async def test_user_lookup(self) -> None:
        """A user's public profile; 404 for nobody, 400 for a malformed name."""
        await self.alice.register(self.http)
        await self.assertError(await self.http.get("/api/cyphr-id/user/nobody", headers=self.alice.auth()),
                               404, "USER_NOT_FOUND")
        await self.assertError(await self.http.get("/api/cyphr-id/user/NOPE", headers=self.alice.auth()),
                               400, "INVALID_CYPHR_ID")

    async def test_update_profile(self) -> None:
        """Profile fields are set and cleared; the settings stay private."""
        await self.alice.register(self.http)
        response = await self.http.post("/api/cyphr-id/update-profile", {
            "displayName": "Alice A.", "avatarUrl": "https://cdn.example/a.png",
            "encryptedSettings": "b64settings"},
            headers=self.alice.auth())
        user = response.json()["user"]
        self.assertEqual((user["displayName"], user["avatarUrl"], user["encryptedSettings"]),
                         ("Alice A.", "https://cdn.example/a.png", "b64settings"))
        self.assertNotIn("recoveryPhraseHint", user)
        bob = User("bob")
        await bob.register(self.http)
        seen = (await self.http.get("/api/cyphr-id/user/alice", headers=bob.auth())).json()["user"]
        self.assertNotIn("encryptedSettings", seen)
        response = await self.http.post("/api/cyphr-id/update-profile", {"avatarUrl": None},
                                        headers=self.alice.auth())
        self.assertIsNone(response.json()["user"]["avatarUrl"])
        self.assertEqual(response.json()["user"]["displayName"], "Alice A.")
        for body, code in (({"avatarUrl": "http://x.example/a.png"}, "INVALID_FIELD"),
                           ({"avatarUrl": "javascript:alert(1)"}, "INVALID_FIELD"),
                           ({"displayName": "x" * 101}, "INVALID_FIELD"),
                           ({"userId": "bob"}, "UNKNOWN_FIELD")):
            response = await self.http.post("/api/cyphr-id/update-profile", body, headers=self.alice.auth())
            await self.assertError(response, 400, code)
        rows = await self.server.database.run_query("SELECT display_name FROM cyphr_identities WHERE cyphr_id = 'alice'")
        self.assertEqual(rows, [("Alice A.",)])

    # -- deletion -------------------------------------------------------------------

    async def add_chat(self, chat_type: str, members: list[tuple[str, str, int]]) -> str:
        chat_id = str(uuid.uuid4())
        await self.server.database.run_operation(
            "INSERT INTO chats (id, chat_type, created_at, updated_at) VALUES (?, ?, 0, 0)", (chat_id, chat_type))
        for name, role, joined in members:
            await self.server.database.run_operation(
                "INSERT INTO chat_participants (chat_id, user_id, role, joined_at) VALUES (?, ?, ?, ?)",
                (chat_id, name, role, joined))
        return chat_id

    async def test_recovery_phrase_hint_is_gone(self) -> None:
        """recoveryPhraseHint is refused like any unknown field, changes
        nothing, and its column is gone from the database."""
        await self.alice.register(self.http)
        before = await self.server.database.run_query(
            "SELECT display_name, updated_at FROM cyphr_identities WHERE cyphr_id = 'alice'")
        for body in ({"recoveryPhraseHint": "the usual"},
                     {"displayName": "Alice A.", "recoveryPhraseHint": None}):
            response = await self.http.post("/api/cyphr-id/update-profile", body,
                                            headers=self.alice.auth())
            error = await self.assertError(response, 400, "UNKNOWN_FIELD")
            self.assertEqual(error["details"], {"fields": ["recoveryPhraseHint"]})
        after = await self.server.database.run_query(
            "SELECT display_name, updated_at FROM cyphr_identities WHERE cyphr_id = 'alice'")
        self.assertEqual(after, before)
        with self.assertRaises(Exception):
            await self.server.database.run_query("SELECT recovery_phrase_hint FROM cyphr_identities")
        login = await self.alice.login(self.http)
        self.assertNotIn("recoveryPhraseHint", login.json()["user"])

    async def test_delete_account(self) -> None:
        """Deletion, proven by a challenge signature, removes the identity, its keys,
        prekeys, two-factor, wallet link, memberships, receipts and challenges; its
        tokens stop at once; its sent messages stay; its name is never given again;
        a group it alone administered passes to its oldest member."""
        await self.alice.register(self.http)
        bob, carol = User("bob"), User("carol")
        await bob.register(self.http)
        await carol.register(self.http)
        user_id = self.alice.user_id
        db = self.server.database
        await db.run_operation(
            "INSERT INTO one_time_prekeys (user_id, device_id, key_id, kyber_public_key, signature,"
            " created_at) VALUES (?, 1, 1, ?, ?, 0)", (user_id, b"k", b"s"))
        await db.run_operation("INSERT INTO totp_secrets (user_id, encrypted_secret, created_at, updated_at)"
                               " VALUES (?, ?, 0, 0)", (user_id, b"x"))
        await db.run_operation("INSERT INTO wallet_links (user_id, stellar_address, linked_at) VALUES (?, ?, 0)",
                               (user_id, "G" + "A" * 55))
        group = await self.add_chat("group", [("alice", "admin", 1), ("carol", "member", 3), ("bob", "member", 2)])
        direct = await self.add_chat("direct", [("alice", "member", 1), ("bob", "member", 1)])
        alone = await self.add_chat("group", [("alice", "admin", 1)])
        await db.run_operation(
            "INSERT INTO messages (chat_id, seq, id, sender_id, encrypted_content, created_at)"
            " VALUES (?, 1, ?, 'alice', '{}', 0)", (direct, str(uuid.uuid4())))
        await db.run_operation(
            "INSERT INTO message_receipts (chat_id, message_id, user_id, delivered_at) VALUES (?, ?, 'alice', 0)",
            (direct, str(uuid.uuid4())))
        await self.alice.challenge(self.http)  # an outstanding challenge

        body = await self.alice.delete_body(self.http)
        statement = AuthStatement.decode(base64.b64decode(body["statement"]))
        body["signature"] = b64(statement.sign(SigningKey.generate()))
        wrong = await self.http.request("DELETE", "/api/cyphr-id/account", data=json.dumps(body).encode(),
                                        headers={**self.alice.auth(), b"Content-Type": [b"application/json"]})
        await self.assertError(wrong, 401, "INVALID_SIGNATURE")
        self.assertEqual(await self.count("cyphr_identities", "WHERE cyphr_id = 'alice'"), 1)

        sent = await self.http.post("/api/messaging/send", {"recipientId": "alice", "encryptedPayload": {}},
                                    headers=bob.auth())
        self.assertEqual(sent.code, 201, sent.body)  # the server now knows their direct chat

        response = await self.alice.delete_account(self.http)
        self.assertEqual(response.code, 200, response.body)
        sent = await self.http.post("/api/messaging/send", {"recipientId": "alice", "encryptedPayload": {}},
                                    headers=bob.auth())
        await self.assertError(sent, 404, "USER_NOT_FOUND")

        for table, column in (("cyphr_identities", "id"), ("devices", "user_id"),
                              ("one_time_prekeys", "user_id"),
                              ("totp_secrets", "user_id"), ("wallet_links", "user_id"),
                              ("revoked_tokens", "user_id")):
            self.assertEqual(await self.count(table, f"WHERE {column} = ?", (user_id,)), 0, table)
        for table, column in (("chat_participants", "user_id"), ("message_receipts", "user_id"),
                              ("auth_challenges", "cyphr_id")):
            self.assertEqual(await self.count(table, f"WHERE {column} = 'alice'"), 0, table)
        self.assertEqual(await self.count("messages", "WHERE sender_id = 'alice'"), 1)
        roles = await db.run_query("SELECT user_id, role FROM chat_participants WHERE chat_id = ? ORDER BY user_id",
                                   (group,))
        self.assertEqual(roles, [("bob", "admin"), ("carol", "member")])
        self.assertEqual(await self.count("chats", "WHERE id = ?", (direct,)), 1)
        self.assertEqual(await self.count("chats", "WHERE id = ?", (alone,)), 0)

        await self.assertError(await self.protected(self.alice.token), 401, "INVALID_TOKEN")
        check = await self.http.post("/api/cyphr-id/check", {"cyphrId": "alice"})
        self.assertIs(check.json()["available"], False)
        again = User("alice")
        response = await self.http.post("/api/cyphr-id/register", await again.register_body(self.http))
        await self.assertError(response, 409, "CYPHR_ID_TAKEN")


class SQLiteIdentityTests(SQLiteMixin, IdentityTestsMixin, TestCase):
    pass


class PostgresIdentityTests(PostgresMixin, IdentityTestsMixin, TestCase):
    pass


class AddressLimitTests(SQLiteMixin, TestCase):
    """The per-address limit of /api/cyphr-id/* and /api/auth/*."""

    async def test_limit_and_refill(self) -> None:
        """Past the limit an address gets 429 RATE_LIMITED with Retry-After; the
        budget refills with time; another address has its own budget."""
        clock = fixed_clock()
        server = await start_server(self, clock=clock, rate_limit_auth=(3, 900), trusted_proxy=("127.0.0.1",))
        http = InProcessHTTP.for_server(server)

        async def check(ip: str | None = None) -> Any:
            headers = {b"X-Forwarded-For": [ip.encode()]} if ip else {}
            return await http.post("/api/cyphr-id/check", {"cyphrId": "alice"}, headers=headers)

        for _ in range(3):
            self.assertEqual((await check()).code, 200)
        refused = await check()
        self.assertEqual((refused.code, refused.json()["code"]), (429, "RATE_LIMITED"))
        self.assertEqual(refused.header("Retry-After"), "300")
        self.assertEqual((await check("198.51.100.7")).code, 200)
        clock.advance(300)
        self.assertEqual((await check()).code, 200)
        self.assertEqual((await check()).code, 429)

    async def test_forwarded_for_not_trusted(self) -> None:
        """Without a trusted proxy, X-Forwarded-For does not buy a new budget."""
        server = await start_server(self, clock=fixed_clock(), rate_limit_auth=(1, 900))
        http = InProcessHTTP.for_server(server)
        self.assertEqual((await http.post("/api/cyphr-id/check", {"cyphrId": "alice"})).code, 200)
        response = await http.post("/api/cyphr-id/check", {"cyphrId": "alice"},
                                   headers={b"X-Forwarded-For": [b"198.51.100.9"]})
        self.assertEqual(response.code, 429)

    async def test_search_limit(self) -> None:
        """Searches are limited per user."""
        server = await start_server(self, clock=fixed_clock(), rate_limit_search=(2, 60))
        http = InProcessHTTP.for_server(server)
        alice = User("alice")
        await alice.register(http)
        codes = [(await http.get("/api/cyphr-id/search?q=a", headers=alice.auth())).code for _ in range(3)]
        self.assertEqual(codes, [200, 200, 429])


class RouteAccessTests(SQLiteMixin, TestCase):
    async def test_every_route_declares_its_access(self) -> None:
        """Every route is marked public, authenticated or operator; the public ones and the
        operator ones are exactly these."""
        server = await start_server(self)
        public, operator = set(), set()
        for api in server.root._router.apis:
            for rule in api.app.url_map.iter_rules():
                handler = api.app.endpoints[rule.endpoint]
                access = getattr(handler, ACCESS_ATTRIBUTE, None)
                self.assertIn(access, ("public", "authenticated", "operator"), rule.rule)
                if access == "public":
                    public.add(rule.rule)
                if access == "operator":
                    operator.add(rule.rule)
        self.assertEqual(public, {
            "/health", "/api/health", "/api/cyphr-id/check", "/api/cyphr-id/challenge",
            "/api/cyphr-id/register", "/api/cyphr-id/login", "/api/cyphr-id/recover",
            "/api/devices/provision", "/api/devices/provision/<provisioning_id>/receive",
            "/api/devices/link", "/api/openapi.json", "/api/asyncapi.json",
            "/api/attachments/",  # OPTIONS: TUS discovery
            "/api/push/gateway"})  # servers, with a gateway secret
        self.assertEqual(operator, {"/api/admin/zero-storage-status"})
