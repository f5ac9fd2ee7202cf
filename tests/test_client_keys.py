"""
The client library's side of v2 signatures, against an in-memory stand-in
for the server that answers as the contract says and lies where a test
tells it to: login statements (and the challenges the client refuses to
sign), the key bindings it makes (register, renewal, the v1 upgrade), and
every check a reader makes on the keys the server hands out.
"""

from __future__ import annotations

import base64
import itertools
import os
from typing import Any, Callable

import requests
from twisted.trial.unittest import SynchronousTestCase

from cyphr import signing
from cyphr.client import client as client_module
from cyphr.client.client import Client
from cyphr.client.crypto import (
    DAY_MS,
    Identity,
    KeyRefused,
    Prekey,
    b64,
    check_published_key,
    iso_ms,
    new_phrase,
)
from cyphr.client.http import ApiError, ClientError

STRONG = "correct horse battery staple 4711"
URL = "http://127.0.0.1:4000"
ORIGIN = "http://127.0.0.1:4000"
T0 = 1_800_000_000.0  # s since the epoch: 2027-01-15T08:00:00Z


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, days: float) -> None:
        self.now += days * 86400

    def ms(self) -> int:
        return int(self.now * 1000)


class Account:
    """An account as the fake server holds it."""

    def __init__(self, cyphr_id: str, public_key: bytes) -> None:
        self.cyphr_id = cyphr_id
        self.public_key = public_key
        self.main: dict[str, Any] = {}
        self.main_version = 2
        self.prekeys: list[dict[str, Any]] = []
        self.prekey_version = 2
        self.fingerprint: str | None = None


Lie = Callable[[str, str, Any, dict[str, Any]], "dict[str, Any] | None"]


class FakeServer:
    """The REST API, in memory, answering as the contract says. Every
    request is recorded in ``requests`` as (method, path, body); ``lie``
    may replace an answer; ``challenge`` makes the challenge bytes;
    ``expire`` makes every authenticated call answer 401 TOKEN_EXPIRED."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.accounts: dict[str, Account] = {}
        self.requests: list[tuple[str, str, Any]] = []
        self.lie: Lie = lambda method, path, body, answer: None
        self.challenge: Callable[[], bytes] = lambda: os.urandom(32)
        self.expire = False
        self.tokens: dict[str, str] = {}
        self.challenges: dict[str, tuple[str, bytes]] = {}
        self.pin_backups: dict[str, str] = {}
        self._ids = itertools.count(1)

    def http(self, server: str, verify: Any = True) -> FakeHttp:
        return FakeHttp(self, server)

    def paths(self, path: str) -> list[Any]:
        return [body for _, p, body in self.requests if p == path]

    # -- a user registered behind the client's back (another device) ---

    def add_user(self, cyphr_id: str, identity: Identity | None = None, prekeys: int = 3,
                 now: int | None = None) -> Identity:
        identity = identity or Identity.from_phrase(new_phrase())
        now = self.clock.ms() if now is None else now
        account = Account(cyphr_id, identity.public_key)
        account.main = identity.main_key_form(cyphr_id, now)
        account.prekeys = [Prekey.generate(i).upload_form(identity, cyphr_id, now)
                           for i in range(1, prekeys + 1)]
        self.accounts[cyphr_id] = account
        return identity

    # -- the API ------------------------------------------------------------

    def call(self, http: FakeHttp, method: str, path: str, body: Any, auth: bool) -> dict[str, Any]:
        self.requests.append((method, path, body))
        caller = None
        if auth:
            if http.token is None:
                raise ClientError("not logged in (run `cyphr-client login`)")
            if self.expire or http.token not in self.tokens:
                raise ApiError(401, "TOKEN_EXPIRED", "The session has expired")
            caller = self.accounts[self.tokens[http.token]]
        answer = self.answer(method, path, body, caller)
        lied = self.lie(method, path, body, answer)
        return answer if lied is None else lied

    def _session(self, cyphr_id: str) -> dict[str, Any]:
        token = f"token-{next(self._ids)}"
        self.tokens[token] = cyphr_id
        return {"token": token, "expiresAt": iso_ms(self.clock.ms() + DAY_MS)}

    def _check_statement(self, purpose: str, body: dict[str, Any], cyphr_id: str,
                         public_key: bytes, fingerprint: str) -> None:
        statement = signing.AuthStatement.decode(base64.b64decode(body["statement"]))
        expected_id, challenge = self.challenges.pop(body["challengeId"])
        assert (statement.purpose, statement.origin, statement.cyphr_id, statement.device,
                statement.challenge_id, statement.challenge) == (
            purpose, ORIGIN, cyphr_id, signing.device_hash(fingerprint), body["challengeId"],
            challenge), statement
        assert expected_id == cyphr_id
        assert signing.verify_with_label(public_key, signing.AUTH, statement.encode(),
                                         base64.b64decode(body["signature"]))

    def _directory(self, account: Account) -> dict[str, Any]:
        main = account.main
        v2 = account.main_version == 2
        return {"cyphrId": account.cyphr_id, "publicKey": b64(account.public_key),
                "kyberPublicKey": main["kyberPublicKey"],
                "kyberKeySignature": main["kyberKeySignature"],
                "kyberKeyId": main.get("kyberKeyId") if v2 else None,
                "kyberKeyCreatedAt": main.get("kyberKeyCreatedAt") if v2 else None,
                "kyberKeyExpiresAt": main.get("kyberKeyExpiresAt") if v2 else None,
                "kyberKeySignatureVersion": account.main_version}

    def answer(self, method: str, path: str, body: Any, caller: Account | None) -> dict[str, Any]:
        parts = path.strip("/").split("/")
        if path == "/api/cyphr-id/challenge":
            challenge_id = f"challenge-{next(self._ids)}"
            challenge = self.challenge()
            self.challenges[challenge_id] = (body["cyphrId"], challenge)
            return {"challengeId": challenge_id, "challenge": b64(challenge)}
        if path == "/api/cyphr-id/register":
            account = Account(body["cyphrId"], base64.b64decode(body["publicKey"]))
            self._check_statement("register", body, body["cyphrId"], account.public_key,
                                  body["deviceFingerprint"])
            account.main = {k: body[k] for k in ("kyberPublicKey", "kyberKeySignature",
                                                 "kyberKeyId", "kyberKeyCreatedAt",
                                                 "kyberKeyExpiresAt")}
            account.fingerprint = body["deviceFingerprint"]
            self.accounts[account.cyphr_id] = account
            return {"cyphrId": account.cyphr_id, "userId": f"user-{account.cyphr_id}",
                    **self._session(account.cyphr_id)}
        if path == "/api/cyphr-id/login":
            account = self.accounts[body["cyphrId"]]
            self._check_statement("login", body, account.cyphr_id, account.public_key,
                                  body["deviceFingerprint"])
            return self._session(account.cyphr_id)
        if path == "/api/cyphr-id/recover":
            account = self.accounts[body["cyphrId"]]
            self._check_statement("recover", body, account.cyphr_id, account.public_key,
                                  body["newDeviceFingerprint"])
            account.fingerprint = body["newDeviceFingerprint"]
            account.prekeys = []
            return {**self._session(account.cyphr_id), "user": self._directory(account)}
        if path == "/api/cyphr-id/account" and method == "DELETE":
            assert caller is not None
            self._check_statement("delete", body, caller.cyphr_id, caller.public_key,
                                  body["deviceFingerprint"])
            del self.accounts[caller.cyphr_id]
            return {"success": True}
        if parts[:3] == ["api", "cyphr-id", "user"]:
            return {"user": self._directory(self.accounts[parts[3]])}
        if path == "/api/cyphr-id/pin-backup":
            assert caller is not None
            if method == "PUT":
                self.pin_backups[caller.cyphr_id] = body["blob"]
                return {"updatedAt": iso_ms(self.clock.ms())}
            if caller.cyphr_id not in self.pin_backups:
                raise ApiError(404, "PIN_BACKUP_NOT_FOUND", "No pin backup")
            return {"blob": self.pin_backups[caller.cyphr_id], "updatedAt": iso_ms(0)}
        if path == "/api/cyphr-id/history-backup":
            # A server that never kept one (tests/test_client_backup.py
            # runs the history backup against a real one).
            raise ApiError(404, "HISTORY_BACKUP_NOT_FOUND", "No history backup")
        if path == "/api/messaging/store-public-key":
            assert caller is not None
            caller.main = dict(body)
            caller.main_version = 2
            if caller.prekey_version == 1:
                caller.prekeys = []
                caller.prekey_version = 2
            return {"success": True}
        if path == "/api/keys/prekeys":
            assert caller is not None
            caller.prekeys += body["prekeys"]
            return {"total": len(caller.prekeys)}
        if path == "/api/keys/count":
            assert caller is not None
            return {"remaining": len(caller.prekeys)}
        if parts[:3] == ["api", "messaging", "public-key"]:
            if parts[3] not in self.accounts:
                raise ApiError(404, "USER_NOT_FOUND", "No such user")
            return self._directory(self.accounts[parts[3]])
        if path == "/api/messaging/chats":
            return {"chats": []}
        if parts[:2] == ["api", "devices"] and len(parts) == 3 and method == "GET":
            # One device per account here: device 1, whose key is the main key.
            if parts[2] not in self.accounts:
                raise ApiError(404, "USER_NOT_FOUND", "No such user")
            account = self.accounts[parts[2]]
            main = self._directory(account)
            return {"cyphrId": account.cyphr_id, "publicKey": main["publicKey"], "devices": [{
                "deviceId": 1, **{k: main[k] for k in (
                    "kyberPublicKey", "kyberKeySignature", "kyberKeyId", "kyberKeyCreatedAt",
                    "kyberKeyExpiresAt", "kyberKeySignatureVersion")},
                "createdAt": iso_ms(0)}]}
        if parts[:3] == ["api", "keys", "claim"]:
            account = self.accounts[parts[3]]
            if account.prekeys:
                prekey = account.prekeys.pop(0)
                return {"keyId": prekey["keyId"], "kyberPublicKey": prekey["kyberPublicKey"],
                        "signature": prekey["signature"], "oneTime": True,
                        "createdAt": prekey.get("createdAt"), "expiresAt": prekey.get("expiresAt"),
                        "signatureVersion": account.prekey_version}
            main = self._directory(account)
            return {"keyId": main["kyberKeyId"], "kyberPublicKey": main["kyberPublicKey"],
                    "signature": main["kyberKeySignature"], "oneTime": False,
                    "createdAt": main["kyberKeyCreatedAt"], "expiresAt": main["kyberKeyExpiresAt"],
                    "signatureVersion": account.main_version}
        if parts[:2] == ["api", "sessions"]:
            # A server from before sessions: messages go as version 3.
            raise ApiError(404, "NOT_FOUND", "No such endpoint")
        raise AssertionError(f"the fake server has no {method} {path}")


class FakeHttp:
    """What Client uses of cyphr.client.http.Http."""

    def __init__(self, server: FakeServer, url: str) -> None:
        self.fake = server
        self.server = url.rstrip("/")
        self.token: str | None = None
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.fake.call(self, method, path, body, auth)


class FakeServerMixin:
    """A fake server for the test, and clients that reach it."""

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.clock = Clock()
        self.server = FakeServer(self.clock)
        self.patch(client_module, "Http", self.server.http)  # type: ignore[attr-defined]

    def new_client(self, name: str, prekeys: int = 3) -> Client:
        client, _ = Client.init(self.mktemp(), STRONG, URL, clock=self.clock)  # type: ignore
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        client.register(name, prekeys=prekeys)
        return client


class StatementTests(FakeServerMixin, SynchronousTestCase):
    def test_register_signs_for_the_chosen_id(self) -> None:
        """Registering sends a register statement for this origin, Cyphr ID
        and device, and a main key bound to the chosen Cyphr ID as key 0 for
        180 days; prekeys are bound as one-time prekeys for 90 days."""
        alice = self.new_client("alice")
        [body] = self.server.paths("/api/cyphr-id/register")
        statement = signing.AuthStatement.decode(base64.b64decode(body["statement"]))
        self.assertEqual((statement.purpose, statement.origin, statement.cyphr_id, statement.device),
                         ("register", ORIGIN, "alice",
                          signing.device_hash(alice.profile.vault["fingerprint"])))
        now = self.clock.ms()
        self.assertEqual((body["kyberKeyId"], body["kyberKeyCreatedAt"], body["kyberKeyExpiresAt"]),
                         (0, iso_ms(now), iso_ms(now + 180 * DAY_MS)))
        binding = signing.KeyBinding(False, "alice", 0, now, now + 180 * DAY_MS,
                                     alice.identity.kyber_public_key)
        self.assertTrue(binding.verify(alice.identity.public_key,
                                       base64.b64decode(body["kyberKeySignature"])))
        [upload] = self.server.paths("/api/keys/prekeys")
        for entry in upload["prekeys"]:
            binding = signing.KeyBinding(True, "alice", entry["keyId"], now, now + 90 * DAY_MS,
                                         base64.b64decode(entry["kyberPublicKey"]))
            self.assertTrue(binding.verify(alice.identity.public_key,
                                           base64.b64decode(entry["signature"])))

    def test_login_and_delete_statements(self) -> None:
        """Login and delete each send a statement of their own purpose (the
        fake server checks origin, Cyphr ID, device and challenge); delete
        also sends the device fingerprint."""
        alice = self.new_client("alice")
        alice.login()
        alice.delete_account()
        [delete] = self.server.paths("/api/cyphr-id/account")
        self.assertEqual(delete["deviceFingerprint"], alice.profile.vault["fingerprint"])
        self.assertEqual(signing.AuthStatement.decode(
            base64.b64decode(delete["statement"])).purpose, "delete")

    def test_a_challenge_that_is_not_32_bytes_is_not_signed(self) -> None:
        """A challenge of any length but 32 bytes is refused before anything
        is signed: the login request is never made."""
        alice = self.new_client("alice")
        for size in (0, 16, 31, 33, 64, 1568):
            self.server.challenge = lambda size=size: os.urandom(size)
            with self.assertRaises(ClientError) as raised:
                alice.login()
            self.assertIn("not 32", str(raised.exception))
        self.assertEqual(self.server.paths("/api/cyphr-id/login"), [])
        # And a challenge id that cannot sit in a statement.
        self.server.challenge = lambda: os.urandom(32)
        self.server.lie = lambda m, p, b, a: dict(a, challengeId="x" * 65) \
            if p == "/api/cyphr-id/challenge" else None
        self.assertRaises(ClientError, alice.login)
        self.assertEqual(self.server.paths("/api/cyphr-id/login"), [])


class MainKeyTests(FakeServerMixin, SynchronousTestCase):
    def test_renewed_when_fewer_than_150_days_are_left(self) -> None:
        """At login the main key is signed again (same key, same id, new
        times) once fewer than 150 days of its 180 are left, not before."""
        alice = self.new_client("alice")
        self.clock.advance(29)
        alice.login()
        self.assertEqual(self.server.paths("/api/messaging/store-public-key"), [])
        self.clock.advance(2)
        alice.login()
        [renewed] = self.server.paths("/api/messaging/store-public-key")
        self.assertEqual((renewed["kyberKeyId"], renewed["kyberPublicKey"]),
                         (0, b64(alice.identity.kyber_public_key)))
        self.assertEqual(renewed["kyberKeyCreatedAt"], iso_ms(self.clock.ms()))
        # Topping up prekeys renews too.
        self.clock.advance(31)
        alice.top_up_prekeys()
        self.assertEqual(len(self.server.paths("/api/messaging/store-public-key")), 2)

    def test_a_v1_key_is_re_signed_at_the_first_v2_login(self) -> None:
        """A profile whose published key carries a v1 signature re-signs it
        under v2 at its first login, and publishes fresh v2 prekeys (the
        server dropped the v1 ones)."""
        alice = self.new_client("alice")
        account = self.server.accounts["alice"]
        account.main_version = account.prekey_version = 1
        account.main = {"kyberPublicKey": b64(alice.identity.kyber_public_key),
                        "kyberKeySignature": b64(bytes(64))}
        with alice.profile.lock:
            del alice.profile.vault["mainKey"]  # as a v1 profile has none
        alice.login()
        [stored] = self.server.paths("/api/messaging/store-public-key")
        self.assertEqual((stored["kyberKeyId"], stored["kyberPublicKey"]),
                         (0, b64(alice.identity.kyber_public_key)))
        self.assertEqual(account.main_version, 2)
        self.assertEqual(account.prekey_version, 2)
        self.assertEqual(len(account.prekeys), 100)
        self.assertEqual(alice.profile.vault["mainKey"]["keyId"], 0)
        # Once done, later logins leave it alone.
        alice.login()
        self.assertEqual(len(self.server.paths("/api/messaging/store-public-key")), 1)

    def test_a_rotated_v1_key_is_found_by_generation(self) -> None:
        """A v1 key of a later generation is recognised (v1 named none) and
        re-signed under v2 with that generation as its id."""
        alice = self.new_client("alice")
        account = self.server.accounts["alice"]
        account.main_version = 1
        account.main = {"kyberPublicKey": b64(Identity(alice.identity.seed, 2).kyber_public_key),
                        "kyberKeySignature": b64(bytes(64))}
        with alice.profile.lock:
            del alice.profile.vault["mainKey"]
        alice.login()
        [stored] = self.server.paths("/api/messaging/store-public-key")
        self.assertEqual(stored["kyberKeyId"], 2)
        self.assertEqual(alice.identity.generation, 2)

    def test_rotation_uses_the_generation_as_key_id(self) -> None:
        """Rotating publishes the next generation's key under its number."""
        alice = self.new_client("alice")
        self.assertEqual(alice.rotate_kyber(), 1)
        [stored] = self.server.paths("/api/messaging/store-public-key")
        self.assertEqual(stored["kyberKeyId"], 1)
        self.assertEqual(stored["kyberPublicKey"], b64(Identity(alice.identity.seed, 1).kyber_public_key))


def claim_lie(change: Callable[[dict[str, Any]], dict[str, Any]]) -> Lie:
    def lie(method: str, path: str, body: Any, answer: dict[str, Any]) -> dict[str, Any] | None:
        return change(dict(answer)) if path.startswith("/api/keys/claim/") else None
    return lie


def directory_lie(change: Callable[[dict[str, Any]], dict[str, Any]]) -> Lie:
    def lie(method: str, path: str, body: Any, answer: dict[str, Any]) -> dict[str, Any] | None:
        return change(dict(answer)) if path.startswith("/api/messaging/public-key/") else None
    return lie


class ReaderTests(FakeServerMixin, SynchronousTestCase):
    """What the sender checks of each key before sealing to it."""

    def setUp(self) -> None:
        super().setUp()
        self.alice = self.new_client("alice")
        self.bob = self.server.add_user("bob")
        self.carol = self.server.add_user("carol")

    def refused(self, needle: str) -> str:
        with self.assertRaises(ClientError) as raised:
            self.alice.sealed("bob", b"hi")
        self.assertIn(needle, str(raised.exception))
        return str(raised.exception)

    def test_an_honest_claim(self) -> None:
        """The honest answers are accepted: the payload names the claimed
        prekey (one-time) and alice's own main key (id = generation)."""
        payload = self.alice.sealed("bob", b"hi")["encryptedPayload"]
        self.assertEqual([(k["recipientId"], k["keyId"], k["oneTime"]) for k in payload["keys"]],
                         [("alice", 0, False), ("bob", 1, True)])

    def test_main_key_when_no_prekey_is_left(self) -> None:
        """With no prekey left, the claim's main key (checked as a main key)
        is used under its key id."""
        self.server.accounts["bob"].prekeys = []
        payload = self.alice.sealed("bob", b"hi")["encryptedPayload"]
        self.assertEqual((payload["keys"][1]["keyId"], payload["keys"][1]["oneTime"]), (0, False))

    def test_v1_keys_are_refused(self) -> None:
        """A contact whose keys are v1-signed is refused by name."""
        self.server.accounts["bob"].prekey_version = 1
        self.refused("bob has not upgraded to v2 key signatures")
        self.server.accounts["bob"].main_version = 1
        with self.assertRaises(ClientError) as raised:
            self.alice.contact("bob")
        self.assertIn("bob has not upgraded to v2 key signatures", str(raised.exception))

    def test_a_prekey_presented_as_the_main_key(self) -> None:
        """A one-time prekey offered as the main key (oneTime false) does not
        verify under the main key's label."""
        self.server.lie = claim_lie(lambda a: dict(a, oneTime=False))
        self.refused("not signed by bob's identity key")

    def test_a_main_key_presented_as_a_prekey(self) -> None:
        """The main key offered as a one-time prekey is refused likewise."""
        self.server.accounts["bob"].prekeys = []
        self.server.lie = claim_lie(lambda a: dict(a, oneTime=True))
        self.refused("not signed by bob's identity key")

    def test_another_owners_key(self) -> None:
        """Carol's prekey (validly signed by carol) handed out as bob's."""
        carols = self.server.accounts["carol"].prekeys[0]
        self.server.lie = claim_lie(lambda a: dict(a, kyberPublicKey=carols["kyberPublicKey"],
                                                   signature=carols["signature"]))
        self.refused("not signed by bob's identity key")

    def test_a_relabelled_key_id(self) -> None:
        """A claimed prekey whose key id the server changed is refused: its
        binding is not signed by the owner's identity key for that id."""
        self.server.lie = claim_lie(lambda a: dict(a, keyId=a["keyId"] + 1000))
        self.refused("not signed by bob's identity key")

    def test_changed_times(self) -> None:
        """A later expiry than was signed."""
        self.server.lie = claim_lie(lambda a: dict(a, expiresAt=iso_ms(self.clock.ms() + 900 * DAY_MS)))
        self.refused("not signed by bob's identity key")

    def test_an_expired_prekey(self) -> None:
        """A prekey signed long ago, past its 90 days, is refused though its
        signature is good."""
        identity = self.server.add_user("bob", now=self.clock.ms() - 100 * DAY_MS)
        account = self.server.accounts["bob"]
        account.main = identity.main_key_form("bob", self.clock.ms())
        self.refused("expired")

    def test_an_expired_main_key(self) -> None:
        """A contact whose main key has expired is refused, saying so."""
        self.server.add_user("bob", now=self.clock.ms() - 181 * DAY_MS)
        with self.assertRaises(ClientError) as raised:
            self.alice.contact("bob")
        self.assertIn("expired", str(raised.exception))

    def test_a_key_from_the_future(self) -> None:
        """A key made more than five minutes ahead of this clock is refused;
        a little clock skew is not."""
        self.server.add_user("bob", now=self.clock.ms() + 4 * 60 * 1000)
        self.alice.sealed("bob", b"hi")
        self.server.add_user("dave", now=self.clock.ms() + 6 * 60 * 1000)
        with self.assertRaises(ClientError) as raised:
            self.alice.contact("dave")
        self.assertIn("future", str(raised.exception))

    def test_a_prekey_handed_out_twice(self) -> None:
        """The same one-time prekey handed out a second time is refused."""
        first: list[dict[str, Any]] = []

        def again(answer: dict[str, Any]) -> dict[str, Any]:
            if not first:
                first.append(answer)
            return first[0]
        self.server.lie = claim_lie(again)
        self.alice.sealed("bob", b"first")
        self.refused("a second time")

    def test_main_key_rollback(self) -> None:
        """Once key 2 of bob's was seen, key 1 (validly signed, older) is
        refused, as is another key under id 2; a renewal of key 2 is fine."""
        account = self.server.accounts["bob"]
        older = Identity(self.bob.seed, 1).main_key_form("bob", self.clock.ms())
        newer = Identity(self.bob.seed, 2).main_key_form("bob", self.clock.ms())
        account.main = newer
        self.assertEqual(self.alice.contact("bob").kyber_key_id, 2)
        account.main = older
        with self.assertRaises(ClientError) as raised:
            self.alice.contact("bob")
        self.assertIn("rollback", str(raised.exception))
        # Another key signed as id 2 (say, from another seed of bob's... or
        # one the server had signed once): refused.
        impostor = Identity(os.urandom(64), 2)
        other = dict(impostor.main_key_form("bob", self.clock.ms()))
        other["kyberKeySignature"] = b64(signing.KeyBinding(
            False, "bob", 2, self.clock.ms(), self.clock.ms() + 180 * DAY_MS,
            impostor.kyber_public_key).sign(Identity(self.bob.seed).signing_key))
        account.main = other
        self.assertRaises(ClientError, self.alice.contact, "bob")
        self.clock.advance(40)
        account.main = Identity(self.bob.seed, 2).main_key_form("bob", self.clock.ms())
        self.assertEqual(self.alice.contact("bob").kyber_key_id, 2)
        # The rollback also holds for the claim's main key.
        account.prekeys = []
        self.server.lie = claim_lie(lambda a: dict(
            a, keyId=older["kyberKeyId"], kyberPublicKey=older["kyberPublicKey"],
            signature=older["kyberKeySignature"], createdAt=older["kyberKeyCreatedAt"],
            expiresAt=older["kyberKeyExpiresAt"]))
        self.refused("rollback")


class CheckPublishedKeyTests(SynchronousTestCase):
    """crypto.check_published_key, each refusal on its own."""

    def setUp(self) -> None:
        self.identity = Identity.from_phrase(new_phrase())
        self.now = 1_800_000_000_000
        self.prekey = Prekey.generate(7)
        entry = self.prekey.upload_form(self.identity, "bob", self.now)
        self.fields = dict(one_time=True, key_id=7, public_key=entry["kyberPublicKey"],
                           signature=entry["signature"], created_at=entry["createdAt"],
                           expires_at=entry["expiresAt"], signature_version=2)

    def check(self, **changes: Any) -> Any:
        return check_published_key(self.identity.public_key, changes.pop("owner", "bob"),
                                   now=changes.pop("now", self.now), **{**self.fields, **changes})

    def test_accepted(self) -> None:
        """An honest claim is accepted as the owner's one-time prekey with its
        id and public key."""
        key = self.check()
        self.assertEqual((key.owner, key.one_time, key.key_id, key.public_key),
                         ("bob", True, 7, self.prekey.public_key))

    def test_each_refusal(self) -> None:
        """Each thing a reader checks, broken alone, is refused."""
        other = Identity.from_phrase(new_phrase())
        for name, changes, needle in (
                ("v1", dict(signature_version=1), "bob has not upgraded to v2 key signatures"),
                ("no version", dict(signature_version=None), "no v2 key signature"),
                ("kind", dict(one_time=False), "not signed"),
                ("kind missing", dict(one_time=None), "one-time"),
                ("owner", dict(owner="carol"), "not signed"),
                ("key id", dict(key_id=8), "not signed"),
                ("key id type", dict(key_id="7"), "key id"),
                ("key id range", dict(key_id=2**53), "key id"),
                ("created", dict(created_at=iso_ms(self.now + 1)), "not signed"),
                ("expires", dict(expires_at=iso_ms(self.now + 91 * DAY_MS)), "not signed"),
                ("time format", dict(created_at="2027-01-15T08:00:00Z"), "createdAt"),
                ("key bytes", dict(public_key=b64(Prekey.generate(7).public_key)), "not signed"),
                ("key size", dict(public_key=b64(bytes(100))), "1568"),
                ("signature", dict(signature=b64(bytes(64))), "not signed"),
                ("expired", dict(now=self.now + 90 * DAY_MS), "expired"),
                ("future", dict(now=self.now - 5 * 60 * 1000 - 1), "future")):
            with self.assertRaises(KeyRefused, msg=name) as raised:
                self.check(**changes)
            self.assertIn(needle, str(raised.exception), name)
        with self.assertRaises(KeyRefused):
            check_published_key(other.public_key, "bob", now=self.now, **self.fields)
        # Five minutes of skew are fine.
        self.check(now=self.now - 5 * 60 * 1000)

    def test_an_invalid_ml_kem_key(self) -> None:
        """A well-signed key that is no ML-KEM-1024 key (coefficients over
        the modulus) is refused."""
        bad = b"\xff" * 1568
        signature = signing.KeyBinding(True, "bob", 7, self.now, self.now + DAY_MS, bad).sign(
            self.identity.signing_key)
        with self.assertRaises(KeyRefused) as raised:
            self.check(public_key=b64(bad), signature=b64(signature),
                       expires_at=iso_ms(self.now + DAY_MS))
        self.assertIn("not a valid ML-KEM-1024 key", str(raised.exception))
