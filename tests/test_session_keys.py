"""
The session key directory (issue #22, second step): a device publishes its
identity's X25519 key and its prekeys, each signature checked; anyone
signed in claims a bundle per device, one-time prekeys handed out once and
then the last-resort ones; the limits per claimer and per target device;
every bad upload refused in the contract's format, changing nothing. The
bundles the server hands out pass the client's checks and start a session
with the device that published them. On both engines.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cyphr.client import sessions
from cyphr.client.sessions import Bundle, Me, Party, Prekey, PrekeySecrets
from cyphr.clock import iso, parse_iso
from cyphr.handlers.ratelimit import RateLimit
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, fixed_clock, start_server
from tests.test_realtime_events import MemoryRealtimeBase
from tests.users import User

DAY = 86_400_000


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class Keys:
    """A device's session keys, made and signed as the reference client
    makes them, with their private halves."""

    def __init__(self, user: User, device_id: int = 1) -> None:
        self.user, self.device_id = user, device_id
        self.dh_private = os.urandom(32)
        self.dh_public = self.x25519(self.dh_private)
        self.secrets: dict[tuple[int, int], bytes] = {}

    @staticmethod
    def x25519(private: bytes) -> bytes:
        return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()

    def identity_dh(self, owner: str | None = None, public: bytes | None = None) -> dict[str, str]:
        public = public or self.dh_public
        return {"publicKey": b64(public), "signature": b64(sessions.sign_identity_dh(
            self.user.signing_key, owner or self.user.cyphr_id, public))}

    def prekey(self, kind: int, key_id: int, *, device_id: int | None = None,
               created: int | None = None, lifetime: int = 30 * DAY,
               signer: Any = None) -> dict[str, Any]:
        if kind in (sessions.DH_SIGNED, sessions.DH_ONE_TIME):
            private = os.urandom(32)
            public = self.x25519(private)
        else:
            private = os.urandom(64)
            public = MLKEM1024PrivateKey.from_seed_bytes(private).public_key().public_bytes_raw()
        self.secrets[(kind, key_id)] = private
        created = created if created is not None else self.user.now_ms() - 1000
        prekey = Prekey(kind, self.user.cyphr_id, device_id or self.device_id, key_id, created,
                        created + lifetime, public).signed(signer or self.user.signing_key)
        return {"keyId": key_id, "publicKey": b64(public), "signature": b64(prekey.signature),
                "createdAt": iso(created), "expiresAt": iso(created + lifetime)}

    def full(self, one_time: int = 3, kem_one_time: int = 3, first_id: int = 10) -> dict[str, Any]:
        return {
            "identityDh": self.identity_dh(),
            "signedPrekey": self.prekey(sessions.DH_SIGNED, 1),
            "lastResortPrekey": self.prekey(sessions.KEM_LAST_RESORT, 2),
            "oneTimePrekeys": [self.prekey(sessions.DH_ONE_TIME, first_id + n)
                               for n in range(one_time)],
            "kemOneTimePrekeys": [self.prekey(sessions.KEM_ONE_TIME, first_id + n)
                                  for n in range(kem_one_time)],
        }


def bundle_of(answer: dict[str, Any], entry: dict[str, Any]) -> Bundle:
    """A bundle as the client reads the server's answer."""
    def prekey(value: dict[str, Any] | None) -> Prekey | None:
        if value is None:
            return None
        return Prekey(value["kind"], answer["cyphrId"], entry["deviceId"], value["keyId"],
                      parse_iso(value["createdAt"]), parse_iso(value["expiresAt"]),
                      base64.b64decode(value["publicKey"]), base64.b64decode(value["signature"]))

    signed, kem = prekey(entry["signedPrekey"]), prekey(entry["kemPrekey"])
    assert signed is not None and kem is not None
    return Bundle(answer["cyphrId"], entry["deviceId"],
                  base64.b64decode(answer["identityDh"]["publicKey"]),
                  base64.b64decode(answer["identityDh"]["signature"]), signed, kem,
                  prekey(entry["oneTimePrekey"]))


MAX_ONE_TIME = 20


class SessionKeysMixin:
    async def setUp(self) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, max_prekeys=MAX_ONE_TIME)
        self.http = InProcessHTTP.for_server(self.server)
        self.alice, self.bob = User("alice"), User("bob")
        await self.alice.register(self.http)
        await self.bob.register(self.http)
        self.keys = Keys(self.alice)

    async def assertError(self, response: Any, status: int, code: str,
                          field: str | None = None) -> dict[str, Any]:
        self.assertEqual((response.code, response.json().get("code")), (status, code), response.body)
        self.assertIs(response.json()["success"], False)
        if field is not None:
            self.assertEqual(response.json()["details"]["field"], field, response.body)
        return response.json()

    async def publish(self, body: dict[str, Any], user: User | None = None) -> Any:
        return await self.http.put("/api/sessions/keys", body, headers=(user or self.alice).auth())

    async def stock(self, user: User | None = None) -> dict[str, Any]:
        response = await self.http.get("/api/sessions/keys", headers=(user or self.alice).auth())
        self.assertEqual(response.code, 200, response.body)
        return response.json()

    async def claim(self, target: str = "alice", device: int | None = None,
                    user: User | None = None) -> Any:
        path = f"/api/sessions/bundles/{target}" + (f"/{device}" if device is not None else "")
        return await self.http.post(path, headers=(user or self.bob).auth())

    async def rows(self) -> list[tuple[Any, ...]]:
        rows = await self.server.database.run_query(
            "SELECT device_id, kind, key_id FROM session_prekeys ORDER BY 1, 2, 3")
        identity = await self.server.database.run_query(
            "SELECT public_key FROM session_identity_keys")
        return [tuple(r) for r in rows] + [("identity", bytes(r[0])) for r in identity]

    # -- publishing and claiming -----------------------------------------------------

    async def test_publish_claim_and_start_a_session(self) -> None:
        """A device publishes its keys; bob claims its bundle three times:
        each takes a different one-time prekey of each kind; the fourth
        carries the last-resort ML-KEM key and no one-time X25519 prekey.
        Each bundle passes the client's checks against alice's identity
        key, and starts a session that alice's device opens."""
        response = await self.publish(self.keys.full())
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual({k: response.json()[k] for k in (
            "deviceId", "identityDh", "oneTimePrekeys", "kemOneTimePrekeys")},
            {"deviceId": 1, "identityDh": True, "oneTimePrekeys": 3, "kemOneTimePrekeys": 3})
        self.assertEqual(response.json()["signedPrekey"]["keyId"], 1)
        taken: list[tuple[int, int | None]] = []
        now = self.alice.now_ms()
        for n in range(4):
            claimed = await self.claim()
            self.assertEqual(claimed.code, 200, claimed.body)
            answer = claimed.json()
            self.assertEqual((answer["cyphrId"], answer["identityKey"]),
                             ("alice", b64(self.alice.public_key)))
            [entry] = answer["bundles"]
            bundle = bundle_of(answer, entry)
            sessions.check_bundle(bundle, self.alice.public_key, now)
            one_time = bundle.one_time_prekey
            taken.append((bundle.kem_prekey.key_id,
                          None if one_time is None else one_time.key_id))
            # A session from this bundle opens on alice's device.
            me_bob = Me(Party("bob", 1, self.bob.public_key, Keys.x25519(b"\x07" * 32)),
                        b"\x07" * 32, sessions.sign_identity_dh(
                            self.bob.signing_key, "bob", Keys.x25519(b"\x07" * 32)))
            session, handshake = sessions.initiate(me_bob, bundle, self.alice.public_key, now)
            first = session.encrypt(f"hello {n}".encode(), now)
            secrets = self.keys.secrets
            mine = sessions.respond(
                Me(Party("alice", 1, self.alice.public_key, self.keys.dh_public),
                   self.keys.dh_private, b""),
                handshake, self.bob.public_key, PrekeySecrets(
                    secrets[(sessions.DH_SIGNED, handshake.signed_prekey_id)],
                    secrets[(handshake.kem_kind, handshake.kem_prekey_id)],
                    None if handshake.one_time_prekey_id is None
                    else secrets[(sessions.DH_ONE_TIME, handshake.one_time_prekey_id)]), now)
            self.assertEqual(mine.decrypt(first, now), f"hello {n}".encode())
        self.assertEqual(taken, [(10, 10), (11, 11), (12, 12), (2, None)])
        stock = await self.stock()
        self.assertEqual((stock["oneTimePrekeys"], stock["kemOneTimePrekeys"]), (0, 0))

    async def test_each_device_has_its_bundle(self) -> None:
        """A second device of alice publishes its own prekeys (the identity's
        X25519 key is the same): a claim answers a bundle of each; a device
        that published nothing has none; one device can be asked alone."""
        response = await self.alice.recover(self.http, User("x").fingerprint,
                                            keepOtherDevices=True)
        self.assertEqual(response.code, 200, response.body)
        second = response.json()["token"]
        self.assertEqual((await self.publish(self.keys.full())).code, 200)
        claimed = await self.claim()
        self.assertEqual([b["deviceId"] for b in claimed.json()["bundles"]], [1])
        other = Keys(self.alice, device_id=2)
        other.dh_private, other.dh_public = self.keys.dh_private, self.keys.dh_public
        response = await self.http.put("/api/sessions/keys", other.full(first_id=50),
                                       headers=self.alice.auth(second))
        self.assertEqual(response.code, 200, response.body)
        claimed = await self.claim()
        self.assertEqual([b["deviceId"] for b in claimed.json()["bundles"]], [1, 2])
        self.assertEqual(claimed.json()["bundles"][1]["oneTimePrekey"]["keyId"], 50)
        only = await self.claim(device=2)
        self.assertEqual([b["deviceId"] for b in only.json()["bundles"]], [2])
        await self.assertError(await self.claim(device=3), 404, "DEVICE_NOT_FOUND")

    async def test_nothing_published(self) -> None:
        claimed = await self.claim()
        self.assertEqual(claimed.code, 200, claimed.body)
        self.assertEqual((claimed.json()["identityDh"], claimed.json()["bundles"]), (None, []))
        await self.assertError(await self.claim("nobody"), 404, "USER_NOT_FOUND")
        stock = await self.stock()
        self.assertEqual((stock["identityDh"], stock["signedPrekey"], stock["oneTimePrekeys"]),
                         (False, None, 0))

    async def test_a_new_signed_prekey_replaces_the_old(self) -> None:
        self.assertEqual((await self.publish(self.keys.full())).code, 200)
        response = await self.publish({"signedPrekey": self.keys.prekey(sessions.DH_SIGNED, 7),
                                       "oneTimePrekeys": [
                                           self.keys.prekey(sessions.DH_ONE_TIME, 99)]})
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual((response.json()["signedPrekey"]["keyId"],
                          response.json()["oneTimePrekeys"]), (7, 4))
        [entry] = (await self.claim()).json()["bundles"]
        self.assertEqual(entry["signedPrekey"]["keyId"], 7)

    # -- limits ---------------------------------------------------------------------

    async def test_claims_are_limited_per_claimer(self) -> None:
        """Past the limit per claimer and target device, a claim is 429;
        another claimer is not limited by it."""
        self.patch(self.server.limits, "bundle_claim",
                   RateLimit(self.clock, 2, 3600, name="bundle_claim"))
        self.assertEqual((await self.publish(self.keys.full())).code, 200)
        for _ in range(2):
            self.assertEqual((await self.claim()).code, 200)
        await self.assertError(await self.claim(), 429, "RATE_LIMITED")
        carol = User("carol")
        await carol.register(self.http)
        self.assertEqual((await self.claim(user=carol)).code, 200)

    async def test_a_drained_device_hands_out_its_last_resort_keys(self) -> None:
        """Past the one-time prekeys a device may hand out (all claimers
        together), bundles carry its last-resort keys and its stock of
        one-time prekeys is kept."""
        self.patch(self.server.limits, "bundle_drain",
                   RateLimit(self.clock, 1, 3600, name="bundle_drain"))
        self.assertEqual((await self.publish(self.keys.full())).code, 200)
        first = (await self.claim()).json()["bundles"][0]
        self.assertEqual(first["kemPrekey"]["kind"], sessions.KEM_ONE_TIME)
        carol = User("carol")
        await carol.register(self.http)
        second = (await self.claim(user=carol)).json()["bundles"][0]
        self.assertEqual((second["kemPrekey"]["kind"], second["oneTimePrekey"]),
                         (sessions.KEM_LAST_RESORT, None))
        stock = await self.stock()
        self.assertEqual((stock["oneTimePrekeys"], stock["kemOneTimePrekeys"]), (2, 2))

    async def test_one_time_prekeys_are_capped(self) -> None:
        """Each kind of one-time prekey is capped per device (--max-prekeys):
        an upload past it is 409 PREKEY_LIMIT and stores nothing; the other
        kind is counted apart."""
        self.assertEqual((await self.publish(self.keys.full(one_time=3, kem_one_time=0))).code,
                         200)
        fill = [self.keys.prekey(sessions.DH_ONE_TIME, 100 + n) for n in range(MAX_ONE_TIME - 3)]
        self.assertEqual((await self.publish({"oneTimePrekeys": fill})).code, 200)
        before = await self.rows()
        refused = await self.publish({
            "kemOneTimePrekeys": [self.keys.prekey(sessions.KEM_ONE_TIME, 7)],
            "oneTimePrekeys": [self.keys.prekey(sessions.DH_ONE_TIME, 999)]})
        error = await self.assertError(refused, 409, "PREKEY_LIMIT")
        self.assertEqual(error["details"], {"limit": MAX_ONE_TIME, "stored": MAX_ONE_TIME,
                                            "field": "oneTimePrekeys"})
        self.assertEqual(await self.rows(), before)
        kem = await self.publish({"kemOneTimePrekeys": [self.keys.prekey(sessions.KEM_ONE_TIME, 7)]})
        self.assertEqual((kem.code, kem.json()["kemOneTimePrekeys"]), (200, 1))

    # -- bad input ------------------------------------------------------------------

    async def test_bad_uploads_change_nothing(self) -> None:
        """Each bad upload is refused with its code and the field at fault,
        and nothing of it is stored (the good parts beside it included)."""
        self.assertEqual((await self.publish(self.keys.full())).code, 200)
        before = await self.rows()
        mallory = User("mallory")
        k = self.keys
        good = k.prekey(sessions.DH_ONE_TIME, 500)
        cases = [
            ({"oneTimePrekeys": [good, k.prekey(sessions.DH_ONE_TIME, 501,
                                                signer=mallory.signing_key)]},
             400, "INVALID_KEY_SIGNATURE", "oneTimePrekeys[1]"),
            ({"oneTimePrekeys": [good, k.prekey(sessions.DH_ONE_TIME, 502, device_id=2)]},
             400, "INVALID_KEY_SIGNATURE", "oneTimePrekeys[1]"),
            ({"signedPrekey": k.prekey(sessions.DH_ONE_TIME, 503)},  # signed as another kind
             400, "INVALID_KEY_SIGNATURE", "signedPrekey"),
            ({"kemOneTimePrekeys": [k.prekey(sessions.KEM_ONE_TIME, 504,
                                             created=self.alice.now_ms() - 40 * DAY)]},
             400, "KEY_EXPIRED", "kemOneTimePrekeys[0].expiresAt"),
            ({"oneTimePrekeys": [good, good]}, 400, "DUPLICATE_KEY_ID", "oneTimePrekeys[1]"),
            ({"oneTimePrekeys": [k.prekey(sessions.DH_ONE_TIME, 10)]},
             409, "DUPLICATE_KEY_ID", None),
            ({"oneTimePrekeys": [dict(good, publicKey=b64(b"\0" * 32))]},
             400, "INVALID_FIELD", "oneTimePrekeys[0].publicKey"),
            ({"kemOneTimePrekeys": [good]}, 400, "INVALID_FIELD",
             "kemOneTimePrekeys[0].publicKey"),
            ({"lastResortPrekey": dict(k.prekey(sessions.KEM_LAST_RESORT, 505),
                                       publicKey=b64(b"\xff" * 1568))},
             400, "INVALID_KYBER_KEY", "lastResortPrekey.publicKey"),
            ({"oneTimePrekeys": [{k2: v for k2, v in good.items() if k2 != "signature"}]},
             400, "MISSING_FIELD", "oneTimePrekeys[0].signature"),
            ({"oneTimePrekeys": [dict(good, keyId=-1)]}, 400, "INVALID_FIELD",
             "oneTimePrekeys[0].keyId"),
            ({"identityDh": k.identity_dh(owner="mallory")}, 400, "INVALID_KEY_SIGNATURE",
             "identityDh"),
            ({"identityDh": k.identity_dh(public=Keys.x25519(os.urandom(32)))},
             409, "IDENTITY_DH_MISMATCH", "identityDh"),
            ({"oneTimePrekeys": [good] * 101}, 400, "INVALID_FIELD", "oneTimePrekeys"),
            ({"signedPrekey": "x"}, 400, "INVALID_FIELD", "signedPrekey"),
        ]
        for body, status, code, field in cases:
            await self.assertError(await self.publish(body), status, code, field)
            self.assertEqual(await self.rows(), before, (code, field))
        unknown = await self.publish({"prekeys": []})
        await self.assertError(unknown, 400, "UNKNOWN_FIELD")

    async def test_concurrent_claims_get_different_keys(self) -> None:
        """Ten claims at once, by ten claimers: each one-time prekey goes to
        one of them only."""
        self.assertEqual((await self.publish(self.keys.full(one_time=10, kem_one_time=10))).code,
                         200)
        claimers = [User(f"claimer{n}") for n in range(10)]
        for claimer in claimers:
            await claimer.register(self.http)
        answers = await defer.gatherResults([defer.ensureDeferred(self.claim(user=c))
                                             for c in claimers])
        kem_ids = [a.json()["bundles"][0]["kemPrekey"]["keyId"] for a in answers]
        dh_ids = [a.json()["bundles"][0]["oneTimePrekey"]["keyId"] for a in answers]
        self.assertEqual((sorted(kem_ids), sorted(dh_ids)), (list(range(10, 20)),) * 2)


class SQLiteSessionKeysTests(SQLiteMixin, SessionKeysMixin, TestCase):
    pass


class PostgresSessionKeysTests(PostgresMixin, SessionKeysMixin, TestCase):
    pass


class LowStockTests(SQLiteMixin, MemoryRealtimeBase, TestCase):
    async def test_a_device_hears_its_stock_runs_low(self) -> None:
        """A claim that leaves a device with fewer than 10 one-time prekeys
        of a kind tells the owner's sockets (session_prekeys_low, naming the
        device and what is left); the claimer's socket hears nothing, nor
        does the owner while its stock is not low."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        owner, claimer = await self.connect(alice), await self.connect(bob)
        keys = Keys(alice)
        response = await self.http.put("/api/sessions/keys", keys.full(11, 12),
                                       headers=alice.auth())
        self.assertEqual(response.code, 200, response.body)
        for _ in range(2):
            claimed = await self.http.post("/api/sessions/bundles/alice", headers=bob.auth())
            self.assertEqual(claimed.code, 200, claimed.body)
        [told] = await owner.wait_for("session_prekeys_low")
        self.assertEqual(told, {"deviceId": 1, "oneTimePrekeys": 9, "kemOneTimePrekeys": 10})
        await claimer.barrier()
        self.assertEqual(claimer.events("session_prekeys_low"), [])
