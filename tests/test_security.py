"""Two-factor login (TOTP), Argon2 password hashing and Stellar wallet links
through the REST API, on both engines, with real keys and real crypto."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError
from stellar_sdk import Keypair
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from tests.helpers import (
    InProcessHTTP,
    PostgresMixin,
    Response,
    SQLiteMixin,
    fixed_clock,
    start_server,
)
from cyphr.handlers.security import TotpHandler
from cyphr.signing import sep53_digest, wallet_link_text
from cyphr.store.totp import TotpStore
from tests.users import User, b64

STEP = 30  # seconds per TOTP step
GENERATE = "/api/auth/totp/generate"
VERIFY = "/api/auth/totp/verify"
DISABLE = "/api/auth/totp/disable"
HASH, LINK = "/api/auth/hash-password", "/api/wallet/link"




def code(secret: str, step: int) -> str:
    return pyotp.TOTP(secret, interval=STEP).generate_otp(step)


def wrong_code(secret: str, step: int) -> str:
    """Six digits that are no code of the steps around ``step``."""
    near = {code(secret, s) for s in range(step - 3, step + 4)}
    return next(c for c in (f"{n:06d}" for n in range(0, 10**6, 7919)) if c not in near)


class SecurityTestsMixin:
    async def start(self, **overrides: Any) -> None:
        # The server's time is a fixed clock: the TOTP step cannot turn
        # between a code made here and the server's check of it.
        overrides.setdefault("clock", fixed_clock())
        self.server = await start_server(self, **overrides)
        self.http = InProcessHTTP.for_server(self.server)
        if self.server.config.public_url:
            # Clients reach it at its public URL (behind a proxy, say).
            self.http.origin = self.server.config.public_url[0]
        self.alice, self.bob = User("alice"), User("bob")
        await self.alice.register(self.http)
        await self.bob.register(self.http)

    async def call(self, path: str, body: Any = None, user: User | None = None,
                   method: str = "POST") -> Response:
        headers = user.auth() if user else {}
        if method == "POST":
            return await self.http.post(path, body, headers=headers)
        return await self.http.request(method, path, headers=headers)

    def assertError(self, response: Response, status: int, error: str | None = None) -> None:
        self.assertEqual(response.code, status, response.body)
        self.assertIs(response.json()["success"], False)
        if error is not None:
            self.assertEqual(response.json()["code"], error)

    def assertLoggedIn(self, response: Response, totp_enabled: bool) -> None:
        self.assertEqual(response.code, 200, response.body)
        self.assertIs(response.json()["user"]["totpEnabled"], totp_enabled)

    def current_step(self) -> int:
        """The TOTP step of the server's (fixed) now."""
        return int(self.server.clock.seconds() // STEP)

    async def generate(self, user: User) -> str:
        response = await self.call(GENERATE, user=user)
        self.assertEqual(response.code, 200, response.body)
        return response.json()["secret"]

    async def enable(self, user: User) -> tuple[str, int]:
        """Two-factor on for ``user`` with the code of the step before now;
        answers the secret and that step (the last one used)."""
        secret = await self.generate(user)
        step = self.current_step() - 1
        response = await self.call(VERIFY, {"code": code(secret, step)}, user)
        self.assertEqual(response.json(), {"success": True, "enabled": True})
        return secret, step

    async def stored_secrets(self) -> list[bytes]:
        rows = await self.server.database.run_query("SELECT encrypted_secret FROM totp_secrets")
        return [bytes(row[0]) for row in rows]

    # -- TOTP -----------------------------------------------------------

    async def test_generate(self) -> None:
        """Generate answers a base32 secret, its otpauth URL (issuer Cyphr)
        and an SVG QR code; two-factor is not on until verified."""
        await self.start()
        body = (await self.call(GENERATE, user=self.alice)).json()
        secret = body["secret"]
        self.assertRegex(secret, r"^[A-Z2-7]{32}$")
        self.assertTrue(body["otpauthUrl"].startswith("otpauth://totp/"))
        self.assertIn("issuer=Cyphr", body["otpauthUrl"])
        parsed = pyotp.parse_uri(body["otpauthUrl"])
        self.assertEqual((parsed.secret, parsed.issuer, parsed.name), (secret, "Cyphr", "alice"))
        prefix = "data:image/svg+xml;base64,"
        self.assertTrue(body["qrCode"].startswith(prefix))
        self.assertIn(b"<svg", base64.b64decode(body["qrCode"][len(prefix):], validate=True))
        self.assertLoggedIn(await self.alice.login(self.http), totp_enabled=False)

    async def test_generate_again_replaces_pending_secret(self) -> None:
        """Before verification a new generate replaces the secret: codes of
        the old one stop working, codes of the new one enable two-factor."""
        await self.start()
        old, new = await self.generate(self.alice), await self.generate(self.alice)
        self.assertNotEqual(old, new)
        step = self.current_step()
        near_new = {code(new, s) for s in range(step - 2, step + 3)}
        stale = next(c for c in (code(old, s) for s in range(step - 1, step + 2)) if c not in near_new)
        self.assertError(await self.call(VERIFY, {"code": stale}, self.alice), 400, "INVALID_TOTP")
        response = await self.call(VERIFY, {"code": code(new, step)}, self.alice)
        self.assertEqual(response.code, 200, response.body)

    async def test_verify(self) -> None:
        """Verify refuses, without enabling anything, a wrong code and codes
        two or more steps from now; the right code enables two-factor."""
        await self.start()
        self.assertError(await self.call(VERIFY, {"code": "123456"}, self.alice), 400,
                         "TOTP_NOT_ENABLED")
        secret = await self.generate(self.alice)
        step = self.current_step()
        for bad in (wrong_code(secret, step), code(secret, step - 3), code(secret, step + 2)):
            self.assertError(await self.call(VERIFY, {"code": bad}, self.alice), 400, "INVALID_TOTP")
        self.assertLoggedIn(await self.alice.login(self.http), totp_enabled=False)
        response = await self.call(VERIFY, {"code": code(secret, self.current_step())}, self.alice)
        self.assertEqual(response.json(), {"success": True, "enabled": True})
        self.assertError(await self.alice.login(self.http), 401, "TOTP_REQUIRED")

    async def test_malformed_codes(self) -> None:
        """Codes that are not a string of six ASCII digits are 400, for
        verify and login alike, and change nothing."""
        await self.start()
        secret = await self.generate(self.alice)
        right = code(secret, self.current_step())
        for bad in ("12345", "1234567", "abcdef", " 12345", "\uff11" * 6, int(right), None, [right]):
            response = await self.call(VERIFY, {"code": bad}, self.alice)
            self.assertError(response, 400)
            self.assertIn(response.json()["code"], {"INVALID_FIELD", "MISSING_FIELD"})
        self.assertLoggedIn(await self.alice.login(self.http), totp_enabled=False)
        self.assertEqual((await self.call(VERIFY, {"code": right}, self.alice)).code, 200)
        for bad in ("12345", "abcdef", int(right)):
            self.assertError(await self.alice.login(self.http, totpCode=bad), 400, "INVALID_FIELD")

    async def test_login_with_totp(self) -> None:
        """With two-factor on, login needs a right code from the window of
        one step either side of now, and each code works once."""
        await self.start()
        secret, _ = await self.enable(self.alice)
        before = await self.stored_secrets()
        self.assertError(await self.call(GENERATE, user=self.alice), 409, "TOTP_ALREADY_ENABLED")
        self.assertEqual(await self.stored_secrets(), before)
        self.assertError(await self.alice.login(self.http), 401, "TOTP_REQUIRED")
        step = self.current_step()
        for bad in (wrong_code(secret, step), code(secret, step + 3), code(secret, step - 3)):
            self.assertError(await self.alice.login(self.http, totpCode=bad), 401, "INVALID_TOTP")
        now = code(secret, step)
        self.assertLoggedIn(await self.alice.login(self.http, totpCode=now), totp_enabled=True)
        self.assertError(await self.alice.login(self.http, totpCode=now), 401, "TOTP_CODE_USED")
        following = code(secret, self.current_step() + 1)
        self.assertLoggedIn(await self.alice.login(self.http, totpCode=following), totp_enabled=True)
        # Two-factor is alice's alone.
        self.assertLoggedIn(await self.bob.login(self.http), totp_enabled=False)

    async def test_earlier_step_refused(self) -> None:
        """Once a step's code was used, an unused code of an earlier step in
        the window is refused too, as used (TOTP_CODE_USED); a later step's
        code still works."""
        await self.start()
        secret = await self.generate(self.alice)
        step = self.current_step()
        self.assertEqual((await self.call(VERIFY, {"code": code(secret, step)}, self.alice)).code, 200)
        earlier = code(secret, step - 1)
        self.assertError(await self.alice.login(self.http, totpCode=earlier), 401, "TOTP_CODE_USED")
        later = code(secret, step + 1)
        self.assertLoggedIn(await self.alice.login(self.http, totpCode=later), totp_enabled=True)

    async def totp_row(self) -> list[tuple[Any, ...]]:
        """Every two-factor row as stored: what a refused code must not change."""
        return [tuple(row) for row in await self.server.database.run_query(
            "SELECT user_id, encrypted_secret, enabled, last_used_step, updated_at FROM totp_secrets"
            " ORDER BY user_id")]

    async def identity_rows(self) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self.server.database.run_query(
            "SELECT i.cyphr_id, d.device_id, d.fingerprint_hash, i.tokens_valid_after,"
            " d.tokens_valid_after FROM cyphr_identities i JOIN devices d ON d.user_id = i.id"
            " ORDER BY i.cyphr_id, d.device_id")]

    async def test_code_used_twice_at_login(self) -> None:
        """At login (v2 and v1 signatures) and at recovery, a right code used
        already is 401 TOTP_CODE_USED, saying to wait for the next one, while
        a wrong code stays INVALID_TOTP; neither refusal changes the stored
        two-factor state nor the identity's device, and a fresh code works."""
        await self.start(accept_v1_auth=True)
        carol = User("carol", v1=True)
        await carol.register(self.http)
        for user in (self.alice, carol):
            secret, _ = await self.enable(user)
            step = self.current_step()
            now = code(secret, step)
            self.assertLoggedIn(await user.login(self.http, totpCode=now), totp_enabled=True)
            before = (await self.totp_row(), await self.identity_rows())
            response = await user.login(self.http, totpCode=now)
            self.assertError(response, 401, "TOTP_CODE_USED")
            self.assertEqual(response.json()["error"], "This code was used already: wait for the next one")
            self.assertError(await user.login(self.http, totpCode=wrong_code(secret, step)), 401,
                             "INVALID_TOTP")
            new_device = hashlib.sha256(os.urandom(16)).hexdigest()
            self.assertError(await self.recover(user, new_device, totpCode=now), 401, "TOTP_CODE_USED")
            self.assertEqual((await self.totp_row(), await self.identity_rows()), before)
            later = code(secret, step + 1)
            self.assertLoggedIn(await user.login(self.http, totpCode=later), totp_enabled=True)

    async def test_code_used_twice_at_disable(self) -> None:
        """Disable with the code just used to log in is 400 TOTP_CODE_USED and
        leaves two-factor on, untouched; a wrong code is still INVALID_TOTP."""
        await self.start()
        secret, _ = await self.enable(self.alice)
        now = code(secret, self.current_step())
        self.assertLoggedIn(await self.alice.login(self.http, totpCode=now), totp_enabled=True)
        before = await self.totp_row()
        response = await self.call(DISABLE, {"code": now}, self.alice)
        self.assertError(response, 400, "TOTP_CODE_USED")
        self.assertEqual(response.json()["error"], "This code was used already: wait for the next one")
        self.assertError(await self.call(DISABLE, {"code": wrong_code(secret, self.current_step())},
                                         self.alice), 400, "INVALID_TOTP")
        self.assertEqual(await self.totp_row(), before)
        self.assertError(await self.alice.login(self.http), 401, "TOTP_REQUIRED")

    async def test_code_used_twice_at_verify(self) -> None:
        """Two verifies of one code at once (a double submission): one
        enables two-factor, the other is 400 TOTP_CODE_USED, however their
        reads and writes interleave (both are held until both have read the
        secret). A wrong code at verify stays INVALID_TOTP."""
        await self.start()
        secret = await self.generate(self.alice)
        arrived: list[None] = []
        both: Deferred[None] = Deferred()

        class HeldStore(TotpStore):
            """The real store; each use_step waits until two have arrived."""

            async def use_step(self, *args: Any, **kwargs: Any) -> bool:
                arrived.append(None)
                if len(arrived) == 2:
                    both.callback(None)
                await both
                return await super().use_step(*args, **kwargs)

        handler = TotpHandler(HeldStore(self.server.database), self.server.secrets.totp_key,
                              self.server.clock)
        step = self.current_step()
        self.assertError(await self.call(VERIFY, {"code": wrong_code(secret, step)}, self.alice), 400,
                         "INVALID_TOTP")
        user_id = (await self.server.database.run_query(
            "SELECT user_id FROM totp_secrets"))[0][0]
        now = code(secret, step)
        results = await DeferredList([Deferred.fromCoroutine(handler.verify(user_id, now)) for _ in range(2)],
                                     consumeErrors=True)
        outcomes = sorted((ok, getattr(getattr(value, "value", None), "code", None)) for ok, value in results)
        self.assertEqual(outcomes, [(False, "TOTP_CODE_USED"), (True, None)])
        [row] = await self.totp_row()
        self.assertEqual((bool(row[2]), row[3]), (True, step))
        self.assertError(await self.alice.login(self.http), 401, "TOTP_REQUIRED")

    async def recover(self, user: User, fingerprint: str, **extra: Any) -> Response:
        return await user.recover(self.http, fingerprint, **extra)

    async def test_recover_with_totp(self) -> None:
        """With two-factor on, recovery on a new device needs a right code;
        refused, it rebinds nothing and the old token keeps working."""
        await self.start()
        secret, _ = await self.enable(self.alice)
        new_device = hashlib.sha256(os.urandom(16)).hexdigest()
        profile = "/api/cyphr-id/user/bob"
        self.assertError(await self.recover(self.alice, new_device), 401, "TOTP_REQUIRED")
        step = self.current_step()
        response = await self.recover(self.alice, new_device, totpCode=wrong_code(secret, step))
        self.assertError(response, 401, "INVALID_TOTP")
        self.assertEqual((await self.call(profile, user=self.alice, method="GET")).code, 200)
        old_token = self.alice.token
        response = await self.recover(self.alice, new_device, totpCode=code(secret, step))
        self.assertLoggedIn(response, totp_enabled=True)
        self.assertError(await self.call(profile, user=self.alice, method="GET"), 401)
        self.assertEqual((await self.call(profile, method="GET", user=User(
            "alice", token=response.json()["token"]))).code, 200)
        self.assertError(await self.alice.login(self.http), 401, "DEVICE_MISMATCH")
        self.alice.fingerprint = new_device
        later = code(secret, self.current_step() + 1)
        self.assertLoggedIn(await self.alice.login(self.http, totpCode=later), totp_enabled=True)
        self.assertNotEqual(self.alice.token, old_token)

    async def test_disable(self) -> None:
        """Disable needs a right, unused code (a wrong one is INVALID_TOTP, a
        used one TOTP_CODE_USED); then the secret is gone and login needs no
        code. Without two-factor on it is TOTP_NOT_ENABLED."""
        await self.start()
        secret, used = await self.enable(self.alice)
        step = self.current_step()
        for bad, error in ((wrong_code(secret, step), "INVALID_TOTP"),
                           (code(secret, used), "TOTP_CODE_USED")):
            self.assertError(await self.call(DISABLE, {"code": bad}, self.alice), 400, error)
        self.assertError(await self.alice.login(self.http), 401, "TOTP_REQUIRED")
        self.assertEqual(len(await self.stored_secrets()), 1)
        response = await self.call(DISABLE, {"code": code(secret, step)}, self.alice)
        self.assertEqual(response.json(), {"success": True, "enabled": False})
        self.assertEqual(await self.stored_secrets(), [])
        self.assertLoggedIn(await self.alice.login(self.http), totp_enabled=False)
        self.assertError(await self.call(DISABLE, {"code": code(secret, step + 1)}, self.alice),
                         400, "TOTP_NOT_ENABLED")
        # A generated but unverified secret is not "enabled" either.
        pending = await self.generate(self.bob)
        response = await self.call(DISABLE, {"code": code(pending, self.current_step())}, self.bob)
        self.assertError(response, 400, "TOTP_NOT_ENABLED")
        self.assertLoggedIn(await self.bob.login(self.http), totp_enabled=False)

    async def test_secret_stored_encrypted(self) -> None:
        """The stored TOTP secret is ciphertext: neither the base32 text nor
        the raw key bytes appear in it."""
        await self.start()
        secret = await self.generate(self.alice)
        [stored] = await self.stored_secrets()
        for plain in (secret.encode("ascii"), secret.lower().encode("ascii"), base64.b32decode(secret)):
            self.assertNotIn(plain, stored)
        self.assertGreaterEqual(len(stored), len(secret) + 40)  # nonce and MAC of a SecretBox

    async def test_totp_needs_token(self) -> None:
        """The TOTP routes are 401 without a token."""
        await self.start()
        for path, body in ((GENERATE, None), (VERIFY, {"code": "123456"}), (DISABLE, {"code": "123456"})):
            self.assertError(await self.call(path, body), 401)
        self.assertEqual(await self.stored_secrets(), [])

    # -- password hashing -----------------------------------------------

    async def test_hash_password(self) -> None:
        """hash-password answers an Argon2id hash of the password, up to 1024
        characters long."""
        await self.start(hash_password_endpoint=True)
        for password in ("correct horse \u2603 battery\n", "p" * 1024):
            response = await self.call(HASH, {"password": password}, self.alice)
            self.assertEqual(response.code, 200, response.body)
            hashed = response.json()["hash"]
            self.assertTrue(hashed.startswith("$argon2id$"))
            self.assertTrue(PasswordHasher().verify(hashed, password))
            self.assertRaises(VerifyMismatchError, PasswordHasher().verify, hashed, password + "x")

    async def test_hash_password_bad_input(self) -> None:
        """An empty, missing, non-string or over-long password is 400, an
        unknown field is 400, and no token is 401."""
        await self.start(hash_password_endpoint=True)
        for body in ({"password": ""}, {}, {"password": None}, {"password": 12345678},
                     {"password": ["x"]}, {"password": "p" * 1025}, {"password": "x", "salt": "y"}):
            self.assertError(await self.call(HASH, body, self.alice), 400)
        self.assertError(await self.call(HASH, {"password": "secret"}), 401)

    async def test_hash_password_rate_limited(self) -> None:
        """hash-password is limited per user: past the limit it is 429
        RATE_LIMITED with Retry-After; refused input and other users do not
        count against it."""
        await self.start(rate_limit_password=(2, 60), hash_password_endpoint=True)
        self.assertError(await self.call(HASH, {"password": ""}, self.alice), 400)
        for _ in range(2):
            self.assertEqual((await self.call(HASH, {"password": "pw"}, self.alice)).code, 200)
        response = await self.call(HASH, {"password": "pw"}, self.alice)
        self.assertError(response, 429, "RATE_LIMITED")
        self.assertTrue(0 < int(response.header("Retry-After")) <= 60)
        self.assertEqual((await self.call(HASH, {"password": "pw"}, self.bob)).code, 200)

    async def test_hash_password_off_by_default(self) -> None:
        """Without hash_password_endpoint, POST /api/auth/hash-password is
        404 NOT_FOUND like a route that does not exist, with or without a
        token, and hashes nothing."""
        await self.start()
        for user in (self.alice, None):
            response = await self.call(HASH, {"password": "correct horse"}, user)
            self.assertError(response, 404, "NOT_FOUND")
            self.assertNotIn("hash", response.json())
            unknown = await self.call("/api/auth/hash-passwords", {"password": "x"}, user)
            self.assertEqual((unknown.code, set(unknown.json())), (404, set(response.json())))

    # -- wallet ---------------------------------------------------------

    def link_text(self, user: User, keypair: Keypair, challenge: tuple[str, bytes],
                  origin: str | None = None) -> str:
        return wallet_link_text(origin or self.http.origin, user.cyphr_id, keypair.public_key,
                                challenge[0], challenge[1])

    async def link(self, user: User, keypair: Keypair, *, signer: Keypair | None = None,
                   challenge: tuple[str, bytes] | None = None, origin: str | None = None,
                   **overrides: Any) -> Response:
        """Link as a v2 client does: a SEP-53 signature over the wallet link text."""
        challenge = challenge or await user.challenge(self.http)
        text = self.link_text(user, keypair, challenge, origin)
        body = {"stellarAddress": keypair.public_key, "challengeId": challenge[0],
                "origin": origin or self.http.origin,
                "signature": b64((signer or keypair).sign_message(text)), **overrides}
        return await self.call(LINK, body, user)

    async def wallet_of(self, cyphr_id: str, user: User | None = None) -> Response:
        return await self.call(f"/api/wallet/{cyphr_id}", user=user or self.bob, method="GET")

    async def test_link_and_lookup(self) -> None:
        """A Stellar account proven by its key's signature is linked and
        others can look it up; linking another one replaces it."""
        await self.start()
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")
        first, second = Keypair.random(), Keypair.random()
        response = await self.link(self.alice, first)
        self.assertEqual(response.json(), {"success": True, "stellarAddress": first.public_key})
        expected = {"success": True, "cyphrId": "alice", "stellarAddress": first.public_key}
        self.assertEqual((await self.wallet_of("alice")).json(), expected)
        self.assertEqual((await self.wallet_of("alice", self.alice)).json(), expected)
        self.assertEqual((await self.link(self.alice, second)).code, 200)
        self.assertEqual((await self.wallet_of("alice")).json()["stellarAddress"], second.public_key)

    async def refused_addresses(self, bad_addresses: tuple[Any, ...]) -> None:
        """Each address is 400 INVALID_STELLAR_ADDRESS, and links nothing nor
        uses up the challenge presented with it."""
        keypair = Keypair.random()
        challenge = await self.alice.challenge(self.http)
        for bad in bad_addresses:
            response = await self.link(self.alice, keypair, challenge=challenge, stellarAddress=bad)
            self.assertError(response, 400, "INVALID_STELLAR_ADDRESS")
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")
        self.assertEqual((await self.link(self.alice, keypair, challenge=challenge)).code, 200)

    async def test_malformed_address(self) -> None:
        """A bad checksum, a secret seed or another malformed string is 400
        INVALID_STELLAR_ADDRESS and uses up neither the link nor the challenge."""
        await self.start()
        keypair = Keypair.random()
        address = keypair.public_key
        checksum = address[:-1] + ("A" if address[-1] != "A" else "B")
        await self.refused_addresses(
            (checksum, keypair.secret, address.lower(), address[:-1], address + "A", ""))

    async def test_non_string_address(self) -> None:
        """A stellarAddress that is not a string is 400 INVALID_STELLAR_ADDRESS
        and changes nothing."""
        await self.start()
        await self.refused_addresses((12345, True, [Keypair.random().public_key], {}))

    async def test_wrong_key_signature(self) -> None:
        """A signature by another Stellar key, or by the identity key, is 401
        INVALID_SIGNATURE and links nothing."""
        await self.start()
        keypair = Keypair.random()
        response = await self.link(self.alice, keypair, signer=Keypair.random())
        self.assertError(response, 401, "INVALID_SIGNATURE")
        challenge = await self.alice.challenge(self.http)
        text = self.link_text(self.alice, keypair, challenge).encode()
        response = await self.link(self.alice, keypair, challenge=challenge,
                                   signature=self.alice.sign(sep53_digest(text)))
        self.assertError(response, 401, "INVALID_SIGNATURE")
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")

    async def test_raw_challenge_signature_refused(self) -> None:
        """A v1 link, the Stellar key's plain Ed25519 signature over the raw
        challenge, is 401 INVALID_SIGNATURE (it is no SEP-53 signature), also
        under accept_v1_auth; nothing is linked."""
        await self.start(accept_v1_auth=True)
        keypair = Keypair.random()
        for _ in range(2):
            challenge = await self.alice.challenge(self.http)
            response = await self.link(self.alice, keypair, challenge=challenge,
                                       signature=b64(keypair.sign(challenge[1])))
            self.assertError(response, 401, "INVALID_SIGNATURE")
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")

    async def test_transaction_hash_signature_refused(self) -> None:
        """A signature over a Stellar transaction's hash (what a wallet signs
        to pay) is 401 INVALID_SIGNATURE: a link cannot be made of a
        transaction signature; nothing is linked."""
        from stellar_sdk import Account, Asset, Network, TransactionBuilder

        await self.start()
        keypair = Keypair.random()
        challenge = await self.alice.challenge(self.http)
        transaction = (TransactionBuilder(Account(keypair.public_key, 1), Network.TESTNET_NETWORK_PASSPHRASE,
                                          base_fee=100)
                       .append_payment_op(Keypair.random().public_key, Asset.native(), "1")
                       .set_timeout(30).build())
        transaction.sign(keypair)
        signature = transaction.signatures[0].signature
        keypair.verify(transaction.hash(), signature)  # a real transaction signature
        response = await self.link(self.alice, keypair, challenge=challenge, signature=b64(signature))
        self.assertError(response, 401, "INVALID_SIGNATURE")
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")

    async def test_link_for_another_origin_refused(self) -> None:
        """A link signed for another server's origin (its text and the body
        say so) is 401 STATEMENT_MISMATCH naming the origin, and uses up the
        challenge; one whose body names this server but whose text was signed
        for another is 401 INVALID_SIGNATURE; an origin not in its normalised
        form is not accepted either. Nothing is linked."""
        await self.start()
        keypair = Keypair.random()
        challenge = await self.alice.challenge(self.http)
        response = await self.link(self.alice, keypair, challenge=challenge, origin="https://evil.example")
        self.assertError(response, 401, "STATEMENT_MISMATCH")
        self.assertEqual(response.json()["details"]["field"], "origin")
        response = await self.link(self.alice, keypair, challenge=challenge)
        self.assertError(response, 401, "INVALID_CHALLENGE")
        challenge = await self.alice.challenge(self.http)
        text = self.link_text(self.alice, keypair, challenge, "https://evil.example")
        response = await self.link(self.alice, keypair, challenge=challenge,
                                   signature=b64(keypair.sign_message(text)))
        self.assertError(response, 401, "INVALID_SIGNATURE")
        for origin in ("http://127.0.0.1/", "HTTP://127.0.0.1", "not a url", "http://127.0.0.1:80"):
            response = await self.link(self.alice, keypair, origin=origin)
            self.assertError(response, 401, "STATEMENT_MISMATCH")
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")

    async def test_link_with_public_url(self) -> None:
        """With public_url set, a link for that origin works and one for a
        loopback origin is refused (STATEMENT_MISMATCH, expecting the
        configured origin)."""
        await self.start(public_url=("https://Chat.Example.com:443/app",))
        keypair = Keypair.random()
        response = await self.link(self.alice, keypair, origin="http://127.0.0.1")
        self.assertError(response, 401, "STATEMENT_MISMATCH")
        self.assertEqual(response.json()["details"]["expected"], "https://chat.example.com")
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")
        response = await self.link(self.alice, keypair, origin="https://chat.example.com")
        self.assertEqual(response.code, 200, response.body)

    async def test_challenge_of_another_user(self) -> None:
        """A challenge issued for another Cyphr ID is 401 INVALID_CHALLENGE
        and links nothing."""
        await self.start()
        keypair = Keypair.random()
        challenge = await self.bob.challenge(self.http)
        response = await self.link(self.alice, keypair, challenge=challenge)
        self.assertError(response, 401, "INVALID_CHALLENGE")
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")

    async def test_challenge_single_use(self) -> None:
        """A challenge links once: presented again it is 401
        INVALID_CHALLENGE and the first link stays."""
        await self.start()
        first, second = Keypair.random(), Keypair.random()
        challenge = await self.alice.challenge(self.http)
        self.assertEqual((await self.link(self.alice, first, challenge=challenge)).code, 200)
        response = await self.link(self.alice, second, challenge=challenge)
        self.assertError(response, 401, "INVALID_CHALLENGE")
        self.assertEqual((await self.wallet_of("alice")).json()["stellarAddress"], first.public_key)

    async def test_unlink(self) -> None:
        """DELETE /api/wallet/link unlinks the caller's account only; then
        lookups are 404 WALLET_NOT_LINKED."""
        await self.start()
        alice_key, bob_key = Keypair.random(), Keypair.random()
        self.assertEqual((await self.link(self.alice, alice_key)).code, 200)
        self.assertEqual((await self.link(self.bob, bob_key)).code, 200)
        response = await self.call(LINK, user=self.alice, method="DELETE")
        self.assertEqual(response.json(), {"success": True, "unlinked": True})
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")
        response = await self.call(LINK, user=self.alice, method="DELETE")
        self.assertEqual(response.json(), {"success": True, "unlinked": False})
        bob = await self.wallet_of("bob", self.alice)
        self.assertEqual(bob.json()["stellarAddress"], bob_key.public_key)

    async def test_unknown_user_and_no_token(self) -> None:
        """A lookup of an unknown user is 404 USER_NOT_FOUND, of a malformed
        Cyphr ID 400; every wallet route is 401 without a token."""
        await self.start()
        self.assertError(await self.wallet_of("nobody"), 404, "USER_NOT_FOUND")
        self.assertError(await self.wallet_of("Not-An-Id"), 400, "INVALID_CYPHR_ID")
        keypair = Keypair.random()
        challenge = await self.alice.challenge(self.http)
        body = {"stellarAddress": keypair.public_key, "challengeId": challenge[0],
                "origin": self.http.origin,
                "signature": b64(keypair.sign_message(self.link_text(self.alice, keypair, challenge)))}
        self.assertError(await self.call(LINK, body), 401)
        self.assertError(await self.call(LINK, method="DELETE"), 401)
        self.assertError(await self.call("/api/wallet/alice", method="GET"), 401)
        self.assertError(await self.wallet_of("alice"), 404, "WALLET_NOT_LINKED")


class SQLiteSecurityTests(SQLiteMixin, SecurityTestsMixin, TestCase):
    pass


class PostgresSecurityTests(PostgresMixin, SecurityTestsMixin, TestCase):
    pass


class CpuPoolTests(TestCase):
    async def test_runs_off_the_reactor_and_stops(self) -> None:
        """Work runs on a pool thread, not the reactor's; stop() ends the threads,
        and a later run starts the pool anew."""
        import threading

        from cyphr.cpu import CpuPool

        pool = CpuPool(reactor, threads=2)
        self.addCleanup(pool.stop)
        ident = await pool.run(threading.get_ident)
        self.assertNotEqual(ident, threading.get_ident())
        pool.stop()
        self.assertFalse(any(t.name.startswith("PoolThread-cyphr-cpu") and t.is_alive()
                             for t in threading.enumerate() if t.ident == ident))
        self.assertEqual(await pool.run(lambda: 42), 42)

    def test_reactor_shutdown_ends_the_threads(self) -> None:
        """A pool still running when its reactor shuts down is ended by the
        reactor's shutdown trigger, with no error (the trigger once tried to
        remove itself while it ran, raised, and left the threads)."""
        import threading

        from twisted.internet.selectreactor import SelectReactor

        from cyphr.cpu import CpuPool

        other = SelectReactor()  # not run: only its system events are fired
        self.addCleanup(other.disconnectAll)
        pool = CpuPool(other, threads=1, name="cyphr-cpu-shutdown")
        ran = threading.Event()
        pool.run(ran.set)
        self.assertTrue(ran.wait(5))
        threads = pool._pool  # ended here if the trigger fails to: no thread left behind
        self.addCleanup(lambda: threads.stop() if threads is not None and threads.started else None)
        other.fireSystemEvent("shutdown")
        self.assertEqual([t for t in threading.enumerate() if t.name.startswith("PoolThread-cyphr-cpu-shutdown")
                          and t.is_alive()], [])
        self.assertEqual(self.flushLoggedErrors(), [])
        pool.stop()  # stopped already: nothing to do
