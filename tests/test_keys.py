"""The key directory: Kyber key rotation, public keys, one-time prekeys and
their claims, through the REST API on both engines."""

from __future__ import annotations

import base64
from collections import Counter
from typing import Any, Callable
from urllib.parse import quote

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from cyphr.handlers.validation import parse_timestamp
from cyphr.signing import KeyBinding
from tests.helpers import (
    InProcessHTTP,
    PostgresMixin,
    Response,
    SQLiteMixin,
    start_server,
)
from tests.users import User, b64, new_kyber_key

STORE = "/api/messaging/store-public-key"
REGISTER = "/api/auth/register-public-key"
PREKEYS = "/api/keys/prekeys"
COUNT = "/api/keys/count"
# Right length, but every coefficient above the modulus: not an ML-KEM key.
INVALID_KYBER_KEY = b"\xff" * 1568


def server_options(**options: Any) -> Callable[[Any], Any]:
    """Start the test's server with these configuration overrides."""
    def decorate(test: Any) -> Any:
        test.server_options = options
        return test
    return decorate


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def verifies(owner: str, identity_key: bytes, answer: dict[str, Any], *, one_time: bool,
             key_id: str = "keyId", key: str = "kyberPublicKey", signature: str = "signature",
             created: str = "createdAt", expires: str = "expiresAt") -> bool:
    """Whether a directory answer's key verifies as a v2 key of ``owner``, as a reader checks it."""
    binding = KeyBinding(one_time=one_time, owner=owner, key_id=answer[key_id],
                         created_at=parse_timestamp(answer[created], created),
                         expires_at=parse_timestamp(answer[expires], expires),
                         public_key=unb64(answer[key]))
    return binding.verify(identity_key, unb64(answer[signature]))


def prekey(user: User, key_id: Any, key: bytes | None = None, signature: str | None = None) -> dict[str, Any]:
    body = user.prekey(key_id if isinstance(key_id, int) and not isinstance(key_id, bool) else 1, key)
    body["keyId"] = key_id
    if signature is not None:
        body["signature"] = signature
    return body


def main_key(user: User, key: bytes | None = None, **changes: Any) -> dict[str, Any]:
    return user.main_key_fields(key, **changes)


class KeysTestsMixin:
    async def setUp(self) -> None:
        options = getattr(getattr(self, self._testMethodName), "server_options", {})
        self.server = await start_server(self, **options)
        self.http = InProcessHTTP.for_server(self.server)
        self.alice = await self.user("alice")
        self.bob = await self.user("bob")

    async def user(self, cyphr_id: str) -> User:
        user = User(cyphr_id)
        user.use(self.http)
        await user.register(self.http)
        return user

    def assert_error(self, response: Response, status: int, code: str, msg: Any = None) -> None:
        self.assertEqual((response.code, response.json()["code"]), (status, code), msg or response.body)
        self.assertIs(response.json()["success"], False)

    async def public_key(self, target: User, caller: User | None = None) -> dict[str, Any]:
        response = await self.http.get(f"/api/messaging/public-key/{target.cyphr_id}",
                                       headers=(caller or self.alice).auth())
        self.assertEqual(response.code, 200, response.body)
        return response.json()

    async def count(self, user: User) -> int:
        response = await self.http.get(COUNT, headers=user.auth())
        self.assertEqual(response.code, 200, response.body)
        return response.json()["remaining"]

    async def upload(self, user: User, prekeys: list[dict[str, Any]]) -> Response:
        return await self.http.post(PREKEYS, {"prekeys": prekeys}, headers=user.auth())

    async def claim(self, caller: User, target: str) -> Response:
        return await self.http.post(f"/api/keys/claim/{target}", headers=caller.auth())

    # -- the caller's Kyber key ---------------------------------------------

    async def test_rotate(self) -> None:
        """store-public-key and its alias register-public-key replace the caller's Kyber key and signature."""
        for key_id, path in enumerate((STORE, REGISTER), start=2):
            key = new_kyber_key()
            fields = main_key(self.alice, key, key_id=key_id)
            response = await self.http.post(path, fields, headers=self.alice.auth())
            self.assertEqual((response.code, response.json()), (200, {"success": True}), path)
            shown = await self.public_key(self.alice, caller=self.bob)
            self.assertEqual(unb64(shown["kyberPublicKey"]), key, path)
            self.assertEqual({name: shown[name] for name in fields}, fields, path)
            self.assertEqual(shown["kyberKeySignatureVersion"], 2)
        # Rotating one key leaves everyone else's alone.
        self.assertEqual(unb64((await self.public_key(self.bob))["kyberPublicKey"]), self.bob.kyber_key)

    async def test_rotate_naming_the_caller(self) -> None:
        """userId may name the caller (by Cyphr ID or user id) and publicKey may repeat the identity key."""
        for key_id, extra in enumerate(({"userId": "alice"}, {"userId": self.alice.user_id},
                                        {"publicKey": b64(self.alice.public_key)}), start=2):
            key = new_kyber_key()
            body = {**main_key(self.alice, key, key_id=key_id), **extra}
            response = await self.http.post(STORE, body, headers=self.alice.auth())
            self.assertEqual(response.code, 200, (extra, response.body))
            self.assertEqual(unb64((await self.public_key(self.alice))["kyberPublicKey"]), key, extra)

    async def test_rotate_refused(self) -> None:
        """A refused rotation (someone else's userId or publicKey, an invalid or unsigned key,
        a malformed body, no token) answers its error and leaves the key as it was."""
        before = await self.public_key(self.alice)
        key = new_kyber_key()
        good = main_key(self.alice, key)
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({**good, "userId": "bob"}, 403, "FORBIDDEN"),
            ({**good, "userId": self.bob.user_id}, 403, "FORBIDDEN"),
            ({**good, "publicKey": b64(self.bob.public_key)}, 403, "FORBIDDEN"),
            (main_key(self.alice, INVALID_KYBER_KEY), 400, "INVALID_KYBER_KEY"),
            ({**good, "kyberKeySignature": main_key(self.alice, new_kyber_key())["kyberKeySignature"]},
             400, "INVALID_KEY_SIGNATURE"),
            ({**good, "kyberKeySignature": main_key(self.bob, key)["kyberKeySignature"]},
             400, "INVALID_KEY_SIGNATURE"),
            ({**good, "kyberPublicKey": b64(key[:-1])}, 400, "INVALID_FIELD"),
            ({**good, "kyberPublicKey": "not base64!"}, 400, "INVALID_FIELD"),
            ({**good, "kyberPublicKey": 12}, 400, "INVALID_FIELD"),
            ({**good, "kyberKeySignature": b64(bytes(63))}, 400, "INVALID_FIELD"),
            ({**good, "publicKey": b64(self.alice.public_key[:31])}, 400, "INVALID_FIELD"),
            ({**good, "userId": 7}, 400, "INVALID_FIELD"),
            ({"kyberPublicKey": good["kyberPublicKey"]}, 400, "MISSING_FIELD"),
            ({"kyberKeySignature": good["kyberKeySignature"]}, 400, "MISSING_FIELD"),
            ({**good, "kyberKeyId": None}, 400, "MISSING_FIELD"),
            ({**good, "kyberKeyExpiresAt": None}, 400, "MISSING_FIELD"),
            ({**good, "kyberKeyId": -1}, 400, "INVALID_FIELD"),
            ({**good, "kyberKeyId": 2**53}, 400, "INVALID_FIELD"),
            ({**good, "kyberKeyCreatedAt": "2026-09-21T14:13:20Z"}, 400, "INVALID_FIELD"),
            ({**good, "kyberKeyExpiresAt": 1790000000000}, 400, "INVALID_FIELD"),
            ({**good, "kyberPublicKey": None}, 400, "MISSING_FIELD"),
            ({**good, "deviceFingerprint": self.alice.fingerprint}, 400, "UNKNOWN_FIELD"),
        ]
        for path in (STORE, REGISTER):
            for body, status, code in cases:
                response = await self.http.post(path, body, headers=self.alice.auth())
                self.assert_error(response, status, code, (path, sorted(body), response.body))
            response = await self.http.post(path, good)
            self.assert_error(response, 401, "UNAUTHORIZED")
        self.assertEqual(await self.public_key(self.alice), before)

    # -- others' public keys ------------------------------------------------

    async def test_public_key(self) -> None:
        """public-key/:cyphrId answers the identity key and a Kyber key whose signature verifies."""
        body = await self.public_key(self.bob)
        self.assertEqual(set(body),
                         {"success", "cyphrId", "publicKey", "kyberPublicKey", "kyberKeySignature",
                          "kyberKeyId", "kyberKeyCreatedAt", "kyberKeyExpiresAt",
                          "kyberKeySignatureVersion", "deviceId"})
        self.assertEqual((body["cyphrId"], body["deviceId"]), ("bob", 1))
        self.assertEqual(unb64(body["publicKey"]), self.bob.public_key)
        self.assertEqual(unb64(body["kyberPublicKey"]), self.bob.kyber_key)
        self.assertEqual((body["kyberKeyId"], body["kyberKeySignatureVersion"]), (1, 2))
        self.assertTrue(verifies("bob", unb64(body["publicKey"]), body, one_time=False,
                                 key_id="kyberKeyId", signature="kyberKeySignature",
                                 created="kyberKeyCreatedAt", expires="kyberKeyExpiresAt"))

    async def test_public_key_refused(self) -> None:
        """An unknown user is 404 USER_NOT_FOUND, a malformed Cyphr ID 400 INVALID_CYPHR_ID, no token 401."""
        response = await self.http.get("/api/messaging/public-key/nobody", headers=self.alice.auth())
        self.assert_error(response, 404, "USER_NOT_FOUND")
        for cyphr_id in ("A!", "Alice", "\u0430lice", "al", "a" * 31):
            response = await self.http.get("/api/messaging/public-key/" + quote(cyphr_id),
                                           headers=self.alice.auth())
            self.assert_error(response, 400, "INVALID_CYPHR_ID", cyphr_id)
        self.assert_error(await self.http.get("/api/messaging/public-key/bob"), 401, "UNAUTHORIZED")

    # -- one-time prekeys ---------------------------------------------------

    async def test_upload(self) -> None:
        """Uploads answer how many were stored and the total; count answers the caller's own prekeys."""
        self.assertEqual(await self.count(self.alice), 0)
        response = await self.upload(self.alice, [prekey(self.alice, i) for i in (1, 2, 3)])
        self.assertEqual((response.code, response.json()), (200, {"success": True, "stored": 3, "total": 3}))
        response = await self.upload(self.alice, [prekey(self.alice, i) for i in range(4, 101)])
        self.assertEqual((response.code, response.json()["stored"], response.json()["total"]), (200, 97, 100))
        self.assertEqual(await self.count(self.alice), 100)
        # keyIds belong to their owner: bob may use the same ones.
        response = await self.upload(self.bob, [prekey(self.bob, 1), prekey(self.bob, 2**31 - 1)])
        self.assertEqual((response.code, response.json()["total"]), (200, 2))
        self.assertEqual((await self.count(self.alice), await self.count(self.bob)), (100, 2))

    async def test_recovery_drops_the_old_devices_prekeys(self) -> None:
        """Their secrets stayed on the old device: after a recovery none is
        handed out any more; the new device publishes its own."""
        await self.upload(self.alice, [prekey(self.alice, i) for i in (1, 2, 3)])
        await self.upload(self.bob, [prekey(self.bob, 1)])
        response = await self.alice.recover(self.http, "cd" * 32)
        self.assertEqual(response.code, 200, response.body)
        token = response.json()["token"]
        self.assertEqual((await self.count(self.bob)), 1)  # nobody else's
        claimed = (await self.claim(self.bob, "alice")).json()
        self.assertEqual((claimed["oneTime"], claimed["keyId"]), (False, 1))
        response = await self.http.post(PREKEYS, {"prekeys": [prekey(self.alice, 1)]},
                                        headers=self.alice.auth(token))
        self.assertEqual((response.code, response.json()["total"]), (200, 1))

    async def test_upload_over_100(self) -> None:
        """More than 100 prekeys in one call is 400 and stores none; exactly 100 is accepted."""
        key = new_kyber_key()
        batch = [prekey(self.alice, i, key) for i in range(101)]
        self.assert_error(await self.upload(self.alice, batch), 400, "INVALID_FIELD")
        self.assertEqual(await self.count(self.alice), 0)
        self.assertEqual((await self.upload(self.alice, batch[:100])).code, 200)
        self.assertEqual(await self.count(self.alice), 100)

    @server_options(max_prekeys=5)
    async def test_cap(self) -> None:
        """An upload that would pass the per-user cap is 409 PREKEY_LIMIT and stores none of its prekeys."""
        self.assertEqual((await self.upload(self.alice, [prekey(self.alice, i) for i in range(3)])).code, 200)
        response = await self.upload(self.alice, [prekey(self.alice, i) for i in range(3, 6)])
        self.assert_error(response, 409, "PREKEY_LIMIT")
        self.assertEqual(response.json()["details"], {"limit": 5, "stored": 3})
        self.assertEqual(await self.count(self.alice), 3)
        response = await self.upload(self.alice, [prekey(self.alice, i) for i in range(3, 5)])
        self.assertEqual((response.code, response.json()["total"]), (200, 5))
        self.assert_error(await self.upload(self.alice, [prekey(self.alice, 9)]), 409, "PREKEY_LIMIT")
        self.assertEqual(await self.count(self.alice), 5)
        # Claiming makes room again.
        self.assertIs((await self.claim(self.bob, "alice")).json()["oneTime"], True)
        self.assertEqual((await self.upload(self.alice, [prekey(self.alice, 9)])).code, 200)

    async def test_duplicate_key_ids(self) -> None:
        """A keyId already stored is 409 DUPLICATE_KEY_ID, one repeated in a call 400: none is stored."""
        response = await self.upload(self.alice, [prekey(self.alice, 1), prekey(self.alice, 2)])
        self.assertEqual(response.code, 200)
        response = await self.upload(self.alice, [prekey(self.alice, 3), prekey(self.alice, 2)])
        self.assert_error(response, 409, "DUPLICATE_KEY_ID")
        response = await self.upload(self.alice, [prekey(self.alice, 4), prekey(self.alice, 4)])
        self.assert_error(response, 400, "DUPLICATE_KEY_ID")
        self.assertEqual(await self.count(self.alice), 2)
        # keyIds 3 and 4 were not stored, and the refused upload left nothing broken behind.
        response = await self.upload(self.alice, [prekey(self.alice, 3), prekey(self.alice, 4)])
        self.assertEqual((response.code, response.json()["total"]), (200, 4))

    async def test_one_bad_prekey_refuses_all(self) -> None:
        """One invalid or unsigned prekey among good ones refuses the call, naming it; none is stored."""
        good = [prekey(self.alice, i) for i in range(3)]
        other = new_kyber_key()
        cases = [
            (prekey(self.alice, 9, signature=self.alice.prekey(9, other)["signature"]), "INVALID_KEY_SIGNATURE"),
            (prekey(self.alice, 9, signature=self.bob.prekey(9)["signature"]), "INVALID_KEY_SIGNATURE"),
            (prekey(self.alice, 9, INVALID_KYBER_KEY), "INVALID_KYBER_KEY"),
        ]
        for bad, code in cases:
            response = await self.upload(self.alice, good[:2] + [bad] + good[2:])
            self.assert_error(response, 400, code)
            self.assertEqual(response.json()["details"], {"field": "prekeys[2]"})
        self.assertEqual(await self.count(self.alice), 0)

    async def test_malformed_prekeys(self) -> None:
        """Bad keyIds (negative, too large, not an integer, a bool) and malformed prekeys are 400; none is
        stored."""
        def with_(**changes: Any) -> list[dict[str, Any]]:
            return [prekey(self.alice, 1), {**prekey(self.alice, 2), **changes}]

        key = new_kyber_key()
        cases: list[tuple[Any, str]] = [
            (with_(keyId=-1), "INVALID_FIELD"),
            (with_(keyId=2**31), "INVALID_FIELD"),
            (with_(keyId="2"), "INVALID_FIELD"),
            (with_(keyId=2.5), "INVALID_FIELD"),
            (with_(keyId=True), "INVALID_FIELD"),
            (with_(keyId=None), "MISSING_FIELD"),
            (with_(kyberPublicKey=b64(key[:100])), "INVALID_FIELD"),
            (with_(kyberPublicKey="%%%%"), "INVALID_FIELD"),
            (with_(signature=b64(bytes(65))), "INVALID_FIELD"),
            (with_(extra=1), "UNKNOWN_FIELD"),
            (with_(createdAt=None), "MISSING_FIELD"),
            (with_(expiresAt=None), "MISSING_FIELD"),
            (with_(expiresAt="2026-13-01T00:00:00.000Z"), "INVALID_FIELD"),
            (with_(createdAt="yesterday"), "INVALID_FIELD"),
            ([prekey(self.alice, 1), "prekey"], "INVALID_FIELD"),
            ([], "INVALID_FIELD"),
            ({"keyId": 1}, "INVALID_FIELD"),
        ]
        for prekeys, code in cases:
            self.assert_error(await self.upload(self.alice, prekeys), 400, code, prekeys)
        self.assert_error(await self.http.post(PREKEYS, {}, headers=self.alice.auth()), 400, "MISSING_FIELD")
        self.assert_error(await self.http.post(PREKEYS, {"prekeys": [prekey(self.alice, 1)]}),
                          401, "UNAUTHORIZED")
        self.assert_error(await self.http.get(COUNT), 401, "UNAUTHORIZED")
        self.assertEqual(await self.count(self.alice), 0)

    # -- claims -------------------------------------------------------------

    async def test_claim(self) -> None:
        """A claim hands out each one-time prekey once, then falls back to the main key with oneTime false."""
        uploaded = {i: prekey(self.bob, i) for i in (7, 11, 12)}
        self.assertEqual((await self.upload(self.bob, list(uploaded.values()))).code, 200)
        handed_out = []
        for remaining in (2, 1, 0):
            response = await self.claim(self.alice, "bob")
            self.assertEqual(response.code, 200, response.body)
            body = response.json()
            self.assertIs(body["oneTime"], True)
            self.assertEqual(set(body), {"success", "keyId", "kyberPublicKey", "signature", "oneTime",
                                         "createdAt", "expiresAt", "signatureVersion", "deviceId"})
            self.assertEqual(body["deviceId"], 1)
            sent = uploaded[body["keyId"]]
            self.assertEqual({name: body[name] for name in sent}, sent)
            self.assertEqual(body["signatureVersion"], 2)
            self.assertTrue(verifies("bob", self.bob.public_key, body, one_time=True))
            handed_out.append(body["keyId"])
            self.assertEqual(await self.count(self.bob), remaining)
        self.assertEqual(sorted(handed_out), [7, 11, 12])
        for _ in range(2):
            body = (await self.claim(self.alice, "bob")).json()
            self.assertEqual((body["oneTime"], body["keyId"], body["signatureVersion"]), (False, 1, 2))
            self.assertEqual(unb64(body["kyberPublicKey"]), self.bob.kyber_key)
            self.assertEqual(body["signature"], self.bob.kyber_signature())
            self.assertTrue(verifies("bob", self.bob.public_key, body, one_time=False))
        self.assertEqual(await self.count(self.bob), 0)

    async def test_claim_refused(self) -> None:
        """Claiming from an unknown user is 404, a malformed Cyphr ID 400, no token 401; none is handed out."""
        self.assertEqual((await self.upload(self.bob, [prekey(self.bob, 1)])).code, 200)
        self.assert_error(await self.claim(self.alice, "nobody"), 404, "USER_NOT_FOUND")
        self.assert_error(await self.claim(self.alice, "B!"), 400, "INVALID_CYPHR_ID")
        self.assert_error(await self.claim(self.alice, quote("b\u043eb")), 400, "INVALID_CYPHR_ID")
        self.assert_error(await self.http.post("/api/keys/claim/bob"), 401, "UNAUTHORIZED")
        response = await self.http.post("/api/keys/claim/bob", {"keyId": 1}, headers=self.alice.auth())
        self.assert_error(response, 400, "UNKNOWN_FIELD")
        self.assertEqual(await self.count(self.bob), 1)

    @server_options(rate_limit_claim=(3, 3600))
    async def test_unknown_targets_are_not_counted(self) -> None:
        """A claim of an unknown user is 404 before the rate limit counts it: a flood of random names
        adds no key to the limit's table, and is never answered 429."""
        table = self.server.limits.claim._arrivals
        before = len(table)
        for n in range(20):
            self.assert_error(await self.claim(self.alice, f"nobody_{n}"), 404, "USER_NOT_FOUND")
        for _ in range(5):
            self.assert_error(await self.claim(self.alice, "nobody_0"), 404, "USER_NOT_FOUND")
        self.assertEqual(len(table), before)
        self.assertEqual(self.server.limits.claim.refused, 0)

    @server_options(rate_limit_claim=(3, 3600))
    async def test_claim_rate_limit(self) -> None:
        """Claims are limited per caller and target: the 4th claim by alice of bob is 429 with Retry-After
        and hands out nothing, while carol may still claim bob's and alice carol's."""
        carol = await self.user("carol")
        self.assertEqual((await self.upload(self.bob, [prekey(self.bob, i) for i in range(5)])).code, 200)
        for _ in range(3):
            self.assertIs((await self.claim(self.alice, "bob")).json()["oneTime"], True)
        response = await self.claim(self.alice, "bob")
        self.assert_error(response, 429, "RATE_LIMITED")
        retry_after = int(response.header("Retry-After"))
        self.assertGreaterEqual(retry_after, 1)
        self.assertEqual(response.json()["details"], {"retryAfter": retry_after})
        self.assertEqual(await self.count(self.bob), 2)
        self.assertIs((await self.claim(carol, "bob")).json()["oneTime"], True)
        self.assertEqual((await self.claim(self.alice, "carol")).code, 200)
        self.assertEqual((await self.claim(self.bob, "alice")).code, 200)
        self.assertEqual(await self.count(self.bob), 1)

    @server_options(rate_limit_claim=(1000, 3600))
    async def test_concurrent_claims(self) -> None:
        """60 claims at once of 50 prekeys hand out every prekey exactly once, then the main key 10 times."""
        key = new_kyber_key()
        prekeys = [prekey(self.bob, i, key) for i in range(50)]
        self.assertEqual((await self.upload(self.bob, prekeys)).code, 200)
        claimers = [self.alice] + [await self.user(f"claimer_{n}") for n in range(5)]
        responses = await gatherResults([
            Deferred.fromCoroutine(self.claim(claimer, "bob")) for _ in range(10) for claimer in claimers
        ])
        self.assertEqual([r.code for r in responses], [200] * 60)
        bodies = [r.json() for r in responses]
        handed_out = Counter(b["keyId"] for b in bodies if b["oneTime"])
        self.assertEqual(handed_out, Counter(range(50)))
        fallbacks = [b for b in bodies if not b["oneTime"]]
        self.assertEqual(len(fallbacks), 10)
        self.assertEqual({(b["keyId"], b["kyberPublicKey"]) for b in fallbacks},
                         {(1, b64(self.bob.kyber_key))})
        self.assertEqual(await self.count(self.bob), 0)


class SQLiteKeysTests(SQLiteMixin, KeysTestsMixin, TestCase):
    pass


class PostgresKeysTests(PostgresMixin, KeysTestsMixin, TestCase):
    pass
