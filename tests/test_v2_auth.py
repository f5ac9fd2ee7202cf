"""
v2 signatures on the server, on both engines: login statements (register,
login, recover, delete) checked in the contract's order, key signatures
that bind kind, owner, id and validity, STALE_KEY, v1 only under
accept_v1_auth, expired prekeys, pin backups and the accepted-origin rule.
Every refusal is checked to change nothing.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.trial.unittest import TestCase

from cyphr.handlers.origins import AcceptedOrigins
from cyphr.signing import (
    DELETE,
    LOGIN,
    RECOVER,
    REGISTER,
    AuthStatement,
    device_hash,
    opaque,
    text,
)
from tests.helpers import (
    InProcessHTTP,
    PostgresMixin,
    Response,
    SQLiteMixin,
    fixed_clock,
    start_server,
)
from tests.users import DAY_MS, User, b64, new_kyber_key

STORE = "/api/messaging/store-public-key"
PREKEYS = "/api/keys/prekeys"
PIN = "/api/cyphr-id/pin-backup"
NEW_DEVICE = "cd" * 32
MINUTE_MS = 60 * 1000


class ServerMixin:
    options: dict[str, Any] = {}

    async def setUp(self) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, **self.options)
        self.http = InProcessHTTP.for_server(self.server)
        self.alice = User("alice")
        self.alice.use(self.http)

    def assertError(self, response: Response, status: int, code: str, msg: Any = None) -> dict[str, Any]:
        self.assertEqual((response.code, response.json().get("code")), (status, code),
                         msg or response.body)
        self.assertIs(response.json()["success"], False)
        return response.json()

    async def identity_state(self, cyphr_id: str = "alice") -> list[tuple[Any, ...]]:
        """What a refused request must leave as it was."""
        return await self.server.database.run_query(
            "SELECT d.device_id, d.fingerprint_hash, i.tokens_valid_after, d.tokens_valid_after,"
            " d.kyber_public_key, d.kyber_key_id, d.kyber_key_created_at, d.kyber_key_expires_at,"
            " d.kyber_key_signature_version, i.updated_at"
            " FROM cyphr_identities i JOIN devices d ON d.user_id = i.id WHERE i.cyphr_id = ?"
            " ORDER BY d.device_id", (cyphr_id,))

    async def prekey_rows(self, user_id: str) -> list[tuple[Any, ...]]:
        return await self.server.database.run_query(
            "SELECT key_id, signature_version, key_expires_at FROM one_time_prekeys WHERE user_id = ?"
            " ORDER BY key_id", (user_id,))

    async def token_works(self, user: User) -> bool:
        response = await self.http.get("/api/keys/count", headers=user.auth())
        return response.code == 200

    async def post(self, path: str, body: dict[str, Any], user: User | None = None) -> Response:
        return await self.http.post(path, body, headers=user.auth() if user else {})


# -- login statements ----------------------------------------------------------


class StatementTestsMixin(ServerMixin):
    async def setUp(self) -> None:
        await super().setUp()
        await self.alice.register(self.http)

    async def refused_login(self, body: dict[str, Any], status: int, code: str) -> dict[str, Any]:
        """The login is refused as told and changes nothing; alice's token still works."""
        before = await self.identity_state()
        error = self.assertError(await self.http.post("/api/cyphr-id/login", body), status, code)
        self.assertEqual(await self.identity_state(), before)
        self.assertTrue(await self.token_works(self.alice))
        return error

    def forged(self, body: dict[str, Any], **changes: Any) -> dict[str, Any]:
        """``body`` with its statement changed and signed again by the user's
        own key: only the server's comparison can refuse it."""
        statement = AuthStatement.decode(base64.b64decode(body["statement"]))
        fields = {**statement.__dict__, **changes}
        changed = AuthStatement(**fields)
        return {**body, "statement": b64(changed.encode()), "signature": b64(changed.sign(self.alice.signing_key))}

    async def test_statement_for_another_purpose(self) -> None:
        """A statement for purpose register, recover or delete presented to
        /login is 401 STATEMENT_MISMATCH naming the field and the expected
        purpose; nothing changes."""
        for purpose in (REGISTER, RECOVER, DELETE):
            body = self.forged(await self.alice.login_body(self.http), purpose=purpose)
            error = await self.refused_login(body, 401, "STATEMENT_MISMATCH")
            self.assertEqual(error["details"], {"field": "purpose", "expected": "login"})
            self.assertEqual(error["error"], f"The statement is for purpose {purpose}, not login")

    async def test_login_statement_relayed_to_recover(self) -> None:
        """A LOGIN statement relayed to /recover (the F6 attack: a login
        signature used to take the account to another device) is 401
        STATEMENT_MISMATCH on purpose; the device binding stays, no token is
        revoked and the prekeys stay."""
        await self.post(PREKEYS, {"prekeys": [self.alice.prekey(1)]}, self.alice)
        login = await self.alice.login_body(self.http)
        body = {"cyphrId": "alice", "newDeviceFingerprint": self.alice.fingerprint,
                "challengeId": login["challengeId"], "statement": login["statement"],
                "signature": login["signature"]}
        before = await self.identity_state()
        error = self.assertError(await self.http.post("/api/cyphr-id/recover", body), 401,
                                 "STATEMENT_MISMATCH")
        self.assertEqual(error["details"], {"field": "purpose", "expected": "recover"})
        self.assertEqual(error["error"], "The statement is for purpose login, not recover")
        self.assertEqual(await self.identity_state(), before)
        self.assertTrue(await self.token_works(self.alice))
        self.assertEqual(len(await self.prekey_rows(self.alice.user_id)), 1)
        self.assertEqual((await self.alice.login(self.http)).code, 200)

    async def test_statement_for_another_origin(self) -> None:
        """A statement for another server's origin, or for this one in
        another spelling, is 401 STATEMENT_MISMATCH on origin; any loopback
        origin is accepted while public_url is not set."""
        for origin in ("https://evil.example", "https://chat.example.com", "http://127.0.0.1/",
                       "HTTP://127.0.0.1", "http://127.0.0.1:80", "127.0.0.1", ""):
            body = self.forged(await self.alice.login_body(self.http), origin=origin)
            error = await self.refused_login(body, 401, "STATEMENT_MISMATCH")
            self.assertEqual(error["details"]["field"], "origin", origin)
            self.assertIn("loopback", error["details"]["expected"])
        for origin in ("http://localhost:3001", "https://127.0.0.1:8443", "http://[::1]:3001"):
            body = self.forged(await self.alice.login_body(self.http), origin=origin)
            self.assertEqual((await self.http.post("/api/cyphr-id/login", body)).code, 200, origin)

    async def test_statement_for_another_cyphr_id(self) -> None:
        """A statement naming another Cyphr ID than the body's is 401
        STATEMENT_MISMATCH on cyphrId, expecting the body's."""
        body = self.forged(await self.alice.login_body(self.http), cyphr_id="bob")
        error = await self.refused_login(body, 401, "STATEMENT_MISMATCH")
        self.assertEqual(error["details"], {"field": "cyphrId", "expected": "alice"})

    async def test_statement_for_another_device(self) -> None:
        """A statement for another device than the body's fingerprint is 401
        STATEMENT_MISMATCH on device, with no expected value."""
        body = self.forged(await self.alice.login_body(self.http), device=device_hash("ef" * 32))
        error = await self.refused_login(body, 401, "STATEMENT_MISMATCH")
        self.assertEqual(error["details"], {"field": "device"})

    async def test_statement_for_another_challenge_id(self) -> None:
        """A statement naming another challenge id than the body's is 401
        STATEMENT_MISMATCH on challengeId, expecting the body's."""
        body = await self.alice.login_body(self.http)
        other_id, _ = await self.alice.challenge(self.http)
        body = self.forged(body, challenge_id=other_id)
        error = await self.refused_login(body, 401, "STATEMENT_MISMATCH")
        self.assertEqual(error["details"], {"field": "challengeId", "expected": body["challengeId"]})

    async def test_statement_for_another_challenge(self) -> None:
        """A statement holding other bytes than the challenge it names is 401
        STATEMENT_MISMATCH on challenge, with no expected value."""
        body = self.forged(await self.alice.login_body(self.http), challenge=b"\x07" * 32)
        error = await self.refused_login(body, 401, "STATEMENT_MISMATCH")
        self.assertEqual(error["details"], {"field": "challenge"})

    async def test_challenge_used_expired_or_of_another_identity(self) -> None:
        """With a v2 statement, a used, expired or other identity's challenge
        is 401 INVALID_CHALLENGE and changes nothing."""
        body = await self.alice.login_body(self.http)
        self.assertEqual((await self.http.post("/api/cyphr-id/login", body)).code, 200)
        await self.refused_login(body, 401, "INVALID_CHALLENGE")
        body = await self.alice.login_body(self.http)
        self.clock.advance(5 * 60 + 1)
        await self.refused_login(body, 401, "INVALID_CHALLENGE")
        bob = User("bob")
        await bob.register(self.http)
        challenge = await self.alice.challenge(self.http, "bob")
        await self.refused_login(await self.alice.login_body(self.http, challenge=challenge),
                                 401, "INVALID_CHALLENGE")

    async def test_malformed_statement(self) -> None:
        """A statement that is not base64 is 400 INVALID_FIELD before the
        challenge is used; one that is no AuthStatement (a challenge or device
        hash of the wrong length, an unknown purpose, bytes after it) is 400
        INVALID_FIELD naming statement, after the challenge is used up."""
        body = await self.alice.login_body(self.http)
        error = await self.refused_login({**body, "statement": "not base64!"}, 400, "INVALID_FIELD")
        self.assertEqual(error["details"], {"field": "statement"})
        statement = AuthStatement.decode(base64.b64decode(body["statement"]))

        def encoded(device: bytes, challenge: bytes, purpose: str = LOGIN, tail: bytes = b"") -> str:
            return b64(text(purpose) + text(statement.origin) + text("alice") + opaque(device)
                       + text(statement.challenge_id) + opaque(challenge) + tail)

        good_device = device_hash(self.alice.fingerprint)
        for bad in (encoded(good_device, statement.challenge[:31]),
                    encoded(good_device[:31], statement.challenge),
                    encoded(good_device, statement.challenge + b"\x00"),
                    encoded(good_device, statement.challenge, purpose="logout"),
                    encoded(good_device, statement.challenge, tail=b"\x00"),
                    b64(b"")):
            body = await self.alice.login_body(self.http)
            error = await self.refused_login({**body, "statement": bad}, 400, "INVALID_FIELD")
            self.assertEqual(error["details"], {"field": "statement"})
            # The challenge was used up: the proper statement is refused now.
            await self.refused_login(body, 401, "INVALID_CHALLENGE")

    async def test_v1_login_refused(self) -> None:
        """Without accept_v1_auth, a v1 login (a signature over the raw
        challenge, no statement) is 401 UNSUPPORTED_SIGNATURE_VERSION, and so
        are v1 recovery and deletion; nothing changes."""
        self.alice.v1 = True
        error = await self.refused_login(await self.alice.login_body(self.http), 401,
                                         "UNSUPPORTED_SIGNATURE_VERSION")
        self.assertEqual(error["error"],
                         "v1 login signatures over the raw challenge are not accepted; update the client")
        before = await self.identity_state()
        response = await self.alice.recover(self.http, NEW_DEVICE)
        self.assertError(response, 401, "UNSUPPORTED_SIGNATURE_VERSION")
        response = await self.alice.delete_account(self.http)
        self.assertError(response, 401, "UNSUPPORTED_SIGNATURE_VERSION")
        self.assertEqual(await self.identity_state(), before)
        self.assertTrue(await self.token_works(self.alice))

    async def test_v1_registration_refused(self) -> None:
        """Without accept_v1_auth, registering with a v1 key signature is 400
        UNSUPPORTED_SIGNATURE_VERSION, and with a v2 key but a v1 login
        signature 401 UNSUPPORTED_SIGNATURE_VERSION; nothing is stored."""
        carol = User("carol", v1=True)
        response = await self.http.post("/api/cyphr-id/register", await carol.register_body(self.http))
        self.assertError(response, 400, "UNSUPPORTED_SIGNATURE_VERSION")
        body = await carol.register_body(self.http, **carol.main_key_fields(v1=False))
        self.assertError(await self.http.post("/api/cyphr-id/register", body), 401,
                         "UNSUPPORTED_SIGNATURE_VERSION")
        self.assertEqual(await self.identity_state("carol"), [])

    async def test_delete_needs_the_sessions_device(self) -> None:
        """Deletion with a statement for another device than the session's is
        401 DEVICE_MISMATCH; without deviceFingerprint it is 400; a LOGIN
        statement is STATEMENT_MISMATCH. The account stays."""
        other = "ef" * 32
        body = await self.alice.delete_body(self.http, deviceFingerprint=other)
        response = await self.http.request("DELETE", "/api/cyphr-id/account",
                                           data=json.dumps(body).encode(),
                                           headers={**self.alice.auth(), b"Content-Type": [b"application/json"]})
        self.assertError(response, 401, "DEVICE_MISMATCH")
        body = await self.alice.delete_body(self.http)
        del body["deviceFingerprint"]
        response = await self.http.request("DELETE", "/api/cyphr-id/account",
                                           data=json.dumps(body).encode(),
                                           headers={**self.alice.auth(), b"Content-Type": [b"application/json"]})
        self.assertError(response, 400, "MISSING_FIELD")
        login = await self.alice.login_body(self.http)
        response = await self.alice.delete_account(
            self.http, challenge=None, statement=login["statement"], signature=login["signature"])
        # The login statement names its own challenge, not the one delete_body fetched.
        self.assertError(response, 401, "STATEMENT_MISMATCH")
        self.assertTrue(await self.token_works(self.alice))
        self.assertEqual(len(await self.identity_state()), 1)


class SQLiteStatementTests(SQLiteMixin, StatementTestsMixin, TestCase):
    pass


class PostgresStatementTests(PostgresMixin, StatementTestsMixin, TestCase):
    pass


class V1AcceptedTestsMixin(ServerMixin):
    options = {"accept_v1_auth": True}

    async def test_v1_client_works(self) -> None:
        """With accept_v1_auth a v1 client registers (v1 key), logs in,
        uploads v1 prekeys and deletes its account; the directory shows its
        key as version 1 with no id nor times, and a claim says so."""
        old = User("olduser", v1=True)
        await old.register(self.http)
        self.assertEqual((await old.login(self.http)).code, 200)
        self.assertEqual((await self.post(PREKEYS, {"prekeys": [old.prekey(1)]}, old)).code, 200)
        await self.alice.register(self.http)
        shown = (await self.http.get("/api/messaging/public-key/olduser", headers=self.alice.auth())).json()
        self.assertEqual((shown["kyberKeyId"], shown["kyberKeyCreatedAt"], shown["kyberKeyExpiresAt"],
                          shown["kyberKeySignatureVersion"]), (None, None, None, 1))
        claimed = (await self.post("/api/keys/claim/olduser", {}, self.alice)).json()
        self.assertEqual((claimed["keyId"], claimed["oneTime"], claimed["signatureVersion"],
                          claimed["createdAt"], claimed["expiresAt"]), (1, True, 1, None, None))
        claimed = (await self.post("/api/keys/claim/olduser", {}, self.alice)).json()
        self.assertEqual((claimed["keyId"], claimed["oneTime"], claimed["signatureVersion"]), (None, False, 1))
        self.assertEqual((await old.delete_account(self.http)).code, 200)
        self.assertEqual(await self.identity_state("olduser"), [])

    async def test_v2_main_key_drops_v1_prekeys(self) -> None:
        """Storing a v2 main key deletes the caller's v1 prekeys in the same
        transaction and keeps its v2 ones; a refused (stale) upload deletes
        nothing."""
        old = User("olduser", v1=True)
        await old.register(self.http)
        body = {"prekeys": [old.prekey(1), old.prekey(2), old.prekey(3, v1=False)]}
        self.assertEqual((await self.post(PREKEYS, body, old)).code, 200)
        old.v1 = False
        first = old.main_key_fields(new_kyber_key(), key_id=5)
        self.assertEqual((await self.post(STORE, first, old)).code, 200)
        self.assertEqual([r[:2] for r in await self.prekey_rows(old.user_id)], [(3, 2)])
        # A v1 key cannot replace the v2 one now (409), and v1 prekeys uploaded
        # meanwhile survive that refusal.
        self.assertEqual((await self.post(PREKEYS, {"prekeys": [old.prekey(4, v1=True)]}, old)).code, 200)
        stale = old.main_key_fields(new_kyber_key(), v1=True)
        self.assertError(await self.post(STORE, stale, old), 409, "STALE_KEY")
        self.assertError(await self.post(STORE, old.main_key_fields(new_kyber_key(), key_id=4), old),
                         409, "STALE_KEY")
        self.assertEqual([r[:2] for r in await self.prekey_rows(old.user_id)], [(3, 2), (4, 1)])

class SQLiteV1AcceptedTests(SQLiteMixin, V1AcceptedTestsMixin, TestCase):
    pass


class PostgresV1AcceptedTests(PostgresMixin, V1AcceptedTestsMixin, TestCase):
    pass


# -- key signatures ------------------------------------------------------------


class KeySignatureTestsMixin(ServerMixin):
    async def setUp(self) -> None:
        await super().setUp()
        await self.alice.register(self.http)

    async def refused_main_key(self, fields: dict[str, Any], status: int, code: str) -> dict[str, Any]:
        """store-public-key refuses the key as told and the stored key stays."""
        before = await self.identity_state()
        error = self.assertError(await self.post(STORE, fields, self.alice), status, code)
        self.assertEqual(await self.identity_state(), before)
        return error

    async def refused_prekey(self, prekey: dict[str, Any], status: int, code: str) -> dict[str, Any]:
        """A prekey upload holding one good prekey and ``prekey`` is refused
        as told and stores neither."""
        body = {"prekeys": [self.alice.prekey(100), prekey]}
        error = self.assertError(await self.post(PREKEYS, body, self.alice), status, code)
        self.assertEqual(await self.prekey_rows(self.alice.user_id), [])
        return error

    async def test_key_signed_under_the_other_label(self) -> None:
        """A one-time prekey's signature presented for a main key, and a main
        key's signature presented for a prekey (same key, owner, id and
        times), are 400 INVALID_KEY_SIGNATURE."""
        key, now = new_kyber_key(), self.http.now_ms()
        as_prekey = self.alice.main_key_fields(key, key_id=2, created_at=now, one_time=True)
        await self.refused_main_key(as_prekey, 400, "INVALID_KEY_SIGNATURE")
        as_main = self.alice.prekey(7, key, created_at=now, one_time=False)
        error = await self.refused_prekey(as_main, 400, "INVALID_KEY_SIGNATURE")
        self.assertEqual(error["details"], {"field": "prekeys[1]"})

    async def test_key_for_another_owner(self) -> None:
        """A key signed by alice's key for another owner is 400
        INVALID_KEY_SIGNATURE, as main key and as prekey."""
        await self.refused_main_key(self.alice.main_key_fields(new_kyber_key(), owner="bob"),
                                    400, "INVALID_KEY_SIGNATURE")
        await self.refused_prekey(self.alice.prekey(7, owner="bob"), 400, "INVALID_KEY_SIGNATURE")

    async def test_key_for_another_id(self) -> None:
        """A key signed for one id and presented with another is 400
        INVALID_KEY_SIGNATURE, as main key and as prekey."""
        fields = self.alice.main_key_fields(new_kyber_key(), key_id=5)
        await self.refused_main_key({**fields, "kyberKeyId": 6}, 400, "INVALID_KEY_SIGNATURE")
        await self.refused_prekey(self.alice.prekey(7, signed_key_id=8), 400, "INVALID_KEY_SIGNATURE")

    async def test_key_times_signed_otherwise(self) -> None:
        """A key presented with other times than it was signed with is 400
        INVALID_KEY_SIGNATURE."""
        fields = self.alice.main_key_fields(new_kyber_key(), key_id=5)
        later = self.alice.main_key_fields(new_kyber_key(), key_id=5,
                                           expires_at=self.http.now_ms() + 10 * DAY_MS)
        await self.refused_main_key({**fields, "kyberKeyExpiresAt": later["kyberKeyExpiresAt"]},
                                    400, "INVALID_KEY_SIGNATURE")

    async def test_expired_keys(self) -> None:
        """A key whose expiresAt is not in the future is 400 KEY_EXPIRED, as
        main key and as prekey."""
        now = self.http.now_ms()
        for expires in (now, now - 1):
            fields = self.alice.main_key_fields(new_kyber_key(), created_at=now - DAY_MS, expires_at=expires)
            error = await self.refused_main_key(fields, 400, "KEY_EXPIRED")
            self.assertEqual(error["details"], {"field": "kyberKeyExpiresAt"})
            error = await self.refused_prekey(
                self.alice.prekey(7, created_at=now - DAY_MS, expires_at=expires), 400, "KEY_EXPIRED")
            self.assertEqual(error["details"], {"field": "prekeys[1].expiresAt"})

    async def test_created_in_the_future(self) -> None:
        """createdAt more than 5 minutes ahead of the server is 400
        INVALID_FIELD naming it; up to 5 minutes ahead is accepted."""
        now = self.http.now_ms()
        error = await self.refused_main_key(
            self.alice.main_key_fields(new_kyber_key(), created_at=now + 5 * MINUTE_MS + 1),
            400, "INVALID_FIELD")
        self.assertEqual(error["details"], {"field": "kyberKeyCreatedAt"})
        error = await self.refused_prekey(self.alice.prekey(7, created_at=now + 6 * MINUTE_MS),
                                          400, "INVALID_FIELD")
        self.assertEqual(error["details"], {"field": "prekeys[1].createdAt"})
        fields = self.alice.main_key_fields(new_kyber_key(), created_at=now + 5 * MINUTE_MS)
        self.assertEqual((await self.post(STORE, fields, self.alice)).code, 200)

    async def test_validity_too_long_or_backwards(self) -> None:
        """A validity longer than 400 days, or an expiresAt not after
        createdAt, is 400 INVALID_FIELD on expiresAt; exactly 400 days is
        accepted."""
        now = self.http.now_ms()
        for expires in (now + 400 * DAY_MS + 1, now, now - 1):
            error = await self.refused_main_key(
                self.alice.main_key_fields(new_kyber_key(), created_at=now, expires_at=expires),
                400, "INVALID_FIELD")
            self.assertEqual(error["details"], {"field": "kyberKeyExpiresAt"})
        await self.refused_prekey(self.alice.prekey(7, created_at=now, expires_at=now + 401 * DAY_MS),
                                  400, "INVALID_FIELD")
        fields = self.alice.main_key_fields(new_kyber_key(), created_at=now, expires_at=now + 400 * DAY_MS)
        self.assertEqual((await self.post(STORE, fields, self.alice)).code, 200)

    async def test_v1_key_uploads_refused(self) -> None:
        """Without accept_v1_auth a main key or prekey without id and times
        (v1) is 400 UNSUPPORTED_SIGNATURE_VERSION."""
        await self.refused_main_key(self.alice.main_key_fields(new_kyber_key(), v1=True),
                                    400, "UNSUPPORTED_SIGNATURE_VERSION")
        await self.refused_prekey(self.alice.prekey(7, v1=True), 400, "UNSUPPORTED_SIGNATURE_VERSION")

    async def test_stale_key(self) -> None:
        """A main key with a lower kyberKeyId than the stored one, or the same
        id with other bytes, is 409 STALE_KEY and changes nothing; the same
        key and id with new times is a renewal; a higher id replaces it."""
        error = await self.refused_main_key(self.alice.main_key_fields(new_kyber_key(), key_id=0),
                                            409, "STALE_KEY")
        self.assertEqual(error["details"], {"field": "kyberKeyId", "currentKeyId": 1})
        await self.refused_main_key(self.alice.main_key_fields(new_kyber_key(), key_id=1), 409, "STALE_KEY")
        self.clock.advance(3600)
        renewal = self.alice.main_key_fields(self.alice.kyber_key, key_id=1,
                                             created_at=self.http.now_ms())
        self.assertEqual((await self.post(STORE, renewal, self.alice)).code, 200)
        shown = (await self.http.get("/api/messaging/public-key/alice", headers=self.alice.auth())).json()
        self.assertEqual(shown["kyberKeyCreatedAt"], renewal["kyberKeyCreatedAt"])
        newer = self.alice.main_key_fields(new_kyber_key(), key_id=2)
        self.assertEqual((await self.post(STORE, newer, self.alice)).code, 200)
        self.alice.adopt(newer)
        await self.refused_main_key(self.alice.main_key_fields(new_kyber_key(), key_id=1), 409, "STALE_KEY")

    async def test_expired_prekeys_never_claimed(self) -> None:
        """A prekey whose expiresAt has passed is never handed out nor
        counted; the claim falls back to the main key; an upload deletes the
        expired ones, so they take no room under the cap."""
        now = self.http.now_ms()
        short = [self.alice.prekey(i, created_at=now, expires_at=now + 3600 * 1000) for i in (1, 2)]
        long = [self.alice.prekey(3)]
        self.assertEqual((await self.post(PREKEYS, {"prekeys": short + long}, self.alice)).code, 200)
        bob = User("bob")
        await bob.register(self.http)
        self.clock.advance(3600)
        count = await self.http.get("/api/keys/count", headers=self.alice.auth())
        self.assertEqual(count.json()["remaining"], 1)
        claimed = [(await self.post("/api/keys/claim/alice", {}, bob)).json() for _ in range(3)]
        self.assertEqual([(c["keyId"], c["oneTime"]) for c in claimed], [(3, True), (1, False), (1, False)])
        self.assertEqual(len(await self.prekey_rows(self.alice.user_id)), 2)  # kept, never handed out
        self.assertEqual((await self.post(PREKEYS, {"prekeys": [self.alice.prekey(1)]}, self.alice)).code, 200)
        self.assertEqual([r[0] for r in await self.prekey_rows(self.alice.user_id)], [1])

    async def test_prekey_checks_run_in_the_cpu_pool(self) -> None:
        """The checks of an upload of up to 100 prekeys run in the CPU pool,
        not on the reactor."""
        calls: list[Any] = []
        real = self.server.cpu.run

        def run(f: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(f)
            return real(f, *args, **kwargs)

        self.patch(self.server.cpu, "run", run)
        body = {"prekeys": [self.alice.prekey(i) for i in range(100)]}
        self.assertEqual((await self.post(PREKEYS, body, self.alice)).code, 200)
        self.assertEqual(len(calls), 1)


class SQLiteKeySignatureTests(SQLiteMixin, KeySignatureTestsMixin, TestCase):
    pass


class PostgresKeySignatureTests(PostgresMixin, KeySignatureTestsMixin, TestCase):
    pass


# -- pin backups --------------------------------------------------------------------


class PinBackupTestsMixin(ServerMixin):
    async def setUp(self) -> None:
        await super().setUp()
        await self.alice.register(self.http)

    async def put(self, body: Any, user: User | None = None) -> Response:
        import json

        headers = {b"Content-Type": [b"application/json"], **(user.auth() if user else {})}
        return await self.http.request("PUT", PIN, data=json.dumps(body).encode(), headers=headers)

    async def stored(self) -> list[tuple[Any, ...]]:
        return [(bytes(b), t) for b, t in await self.server.database.run_query(
            "SELECT blob, updated_at FROM pin_backups")]

    async def test_round_trip(self) -> None:
        """GET is 404 PIN_BACKUP_NOT_FOUND until a PUT; PUT answers updatedAt
        and GET gives the blob back as sent; a later PUT replaces it; nobody
        else sees it."""
        self.assertError(await self.http.get(PIN, headers=self.alice.auth()), 404, "PIN_BACKUP_NOT_FOUND")
        response = await self.put({"blob": b64(b"sealed one")}, self.alice)
        self.assertEqual(response.json(), {"success": True, "updatedAt": "2026-09-21T14:13:20.000Z"})
        got = await self.http.get(PIN, headers=self.alice.auth())
        self.assertEqual(got.json(), {"success": True, "blob": b64(b"sealed one"),
                                      "updatedAt": "2026-09-21T14:13:20.000Z"})
        self.clock.advance(60)
        self.assertEqual((await self.put({"blob": b64(b"sealed two")}, self.alice)).code, 200)
        got = (await self.http.get(PIN, headers=self.alice.auth())).json()
        self.assertEqual((got["blob"], got["updatedAt"]), (b64(b"sealed two"), "2026-09-21T14:14:20.000Z"))
        bob = User("bob")
        await bob.register(self.http)
        self.assertError(await self.http.get(PIN, headers=bob.auth()), 404, "PIN_BACKUP_NOT_FOUND")

    async def test_size_and_shape(self) -> None:
        """A blob of 256 KiB is stored; one byte more, an empty or non-base64
        blob, or another field, is 400 and leaves the stored blob as it was."""
        big = bytes(range(256)) * 1024
        self.assertEqual((await self.put({"blob": b64(big)}, self.alice)).code, 200)
        before = await self.stored()
        for body, code in (({"blob": b64(big + b"x")}, "INVALID_FIELD"), ({"blob": ""}, "INVALID_FIELD"),
                           ({"blob": "not base64!"}, "INVALID_FIELD"), ({}, "MISSING_FIELD"),
                           ({"blob": b64(b"x"), "owner": "bob"}, "UNKNOWN_FIELD")):
            self.assertError(await self.put(body, self.alice), 400, code, body.keys())
        self.assertEqual(await self.stored(), before)

    async def test_needs_a_token(self) -> None:
        """Both routes are 401 without a token, and store nothing."""
        self.assertError(await self.put({"blob": b64(b"x")}), 401, "UNAUTHORIZED")
        self.assertError(await self.http.get(PIN), 401, "UNAUTHORIZED")
        self.assertEqual(await self.stored(), [])

    async def test_deleted_with_the_account(self) -> None:
        """Deleting the account deletes its pin backup."""
        self.assertEqual((await self.put({"blob": b64(b"x")}, self.alice)).code, 200)
        self.assertEqual(len(await self.stored()), 1)
        self.assertEqual((await self.alice.delete_account(self.http)).code, 200)
        self.assertEqual(await self.stored(), [])


class SQLitePinBackupTests(SQLiteMixin, PinBackupTestsMixin, TestCase):
    pass


class PostgresPinBackupTests(PostgresMixin, PinBackupTestsMixin, TestCase):
    pass


# -- the accepted-origin rule ----------------------------------------------------------


class AcceptedOriginsTests(TestCase):
    def test_loopback_when_unset(self) -> None:
        """Without public_url any loopback origin, in its normalised
        spelling, is accepted, and nothing else."""
        origins = AcceptedOrigins()
        for origin in ("http://localhost", "http://localhost:3001", "https://127.0.0.1:8443",
                       "http://127.0.0.2", "http://[::1]:3001", "http://app.localhost"):
            self.assertTrue(origins.accepts(origin), origin)
        for origin in ("https://chat.example.com", "http://127.0.0.1/", "HTTP://localhost",
                       "http://localhost:80", "http://10.0.0.1", "localhost", "", "http://127.0.0.1\n"):
            self.assertFalse(origins.accepts(origin), origin)

    def test_exactly_the_public_urls(self) -> None:
        """With public_url, exactly its origins are accepted (loopback no more)."""
        origins = AcceptedOrigins(("https://Chat.Example.com/", "https://old.example.com:8443"))
        self.assertEqual(origins.configured, ("https://chat.example.com", "https://old.example.com:8443"))
        self.assertTrue(origins.accepts("https://chat.example.com"))
        self.assertTrue(origins.accepts("https://old.example.com:8443"))
        for origin in ("http://chat.example.com", "https://old.example.com", "http://localhost:3001"):
            self.assertFalse(origins.accepts(origin), origin)

    def test_answers_hold_past_the_cache(self) -> None:
        """Answers stay right, asked again and again for more origins than
        are remembered, and what is remembered stays bounded."""
        origins = AcceptedOrigins()
        for round in range(3):
            for n in range(200):
                self.assertTrue(origins.accepts(f"http://localhost:{n + 1000}"))
                self.assertFalse(origins.accepts(f"https://h{n}.example.com"))
        self.assertLessEqual(len(origins._answers), 64)


class PublicUrlServerTests(SQLiteMixin, TestCase):
    async def test_statements_for_the_public_url(self) -> None:
        """A server with public_url accepts statements for it and refuses
        those for a loopback origin, expecting its public URL."""
        server = await start_server(self, public_url=("https://chat.example.com",))
        http = InProcessHTTP.for_server(server)
        local = User("alice")
        response = await http.post("/api/cyphr-id/register", await local.register_body(http))
        self.assertEqual((response.code, response.json()["details"]),
                         (401, {"field": "origin", "expected": "https://chat.example.com"}))
        http.origin = "https://chat.example.com"
        await User("alice").register(http)
