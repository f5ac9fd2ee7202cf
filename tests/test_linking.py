"""
Linking a device (issue #13, item 2): a new device asks for a provisioning,
a signed-in device of the account approves it by leaving the identity seed
sealed to the new device's ephemeral key, the new device receives it with
its secret and registers its device key with a single-use link token. On
both engines, with real Ed25519 and ML-KEM-1024 keys; every refusal changes
nothing.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from twisted.trial.unittest import TestCase

from cyphr.handlers import linking
from cyphr.handlers.linking import ephemeral_fingerprint
from cyphr.handlers.ratelimit import RateLimit
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, fixed_clock, start_server
from tests.test_devices import device_key_fields, new_fingerprint, verifies
from tests.test_realtime_events import MemoryRealtimeBase
from tests.users import User, b64, new_kyber_key

TEN_MINUTES = 10 * 60


def new_ephemeral_key() -> bytes:
    """A new device's ephemeral public key: X25519 (opaque to the server,
    any 32 bytes) then a real ML-KEM-1024 key."""
    return os.urandom(32) + new_kyber_key()


def unpadded(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class LinkingMixin:
    async def setUp(self) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock)
        self.http = InProcessHTTP.for_server(self.server)
        self.alice, self.bob = User("alice"), User("bob")
        await self.alice.register(self.http)
        await self.bob.register(self.http)

    async def assertError(self, response: Any, status: int, code: str) -> dict[str, Any]:
        self.assertEqual((response.code, response.json().get("code")), (status, code), response.body)
        self.assertIs(response.json()["success"], False)
        return response.json()

    # -- the calls ------------------------------------------------------------

    async def provision(self, key: bytes | None = None) -> dict[str, Any]:
        response = await self.http.post("/api/devices/provision",
                                         {"ephemeralKey": b64(key or new_ephemeral_key())})
        self.assertEqual(response.code, 201, response.body)
        return response.json()

    async def approve(self, provisioning_id: str, sealed: bytes | None = None,
                      user: User | None = None) -> Any:
        return await self.http.post(f"/api/devices/provision/{provisioning_id}/approve",
                                    {"sealed": b64(sealed or os.urandom(700))},
                                    headers=(user or self.alice).auth())

    async def receive(self, provisioning_id: str, secret: str) -> Any:
        return await self.http.post(f"/api/devices/provision/{provisioning_id}/receive",
                                    {"secret": secret})

    async def link(self, cyphr_id: str, link_token: str, fingerprint: str,
                   key: dict[str, Any]) -> Any:
        return await self.http.post("/api/devices/link", {
            "cyphrId": cyphr_id, "linkToken": link_token, "deviceFingerprint": fingerprint, **key})

    async def received(self, user: User | None = None) -> dict[str, Any]:
        """Provision, approve (by ``user``) and receive: the receive answer,
        with the provisioningId."""
        provisioning = await self.provision()
        approved = await self.approve(provisioning["provisioningId"], user=user)
        self.assertEqual(approved.code, 200, approved.body)
        response = await self.receive(provisioning["provisioningId"], provisioning["secret"])
        self.assertEqual(response.code, 200, response.body)
        return {**response.json(), "provisioningId": provisioning["provisioningId"]}

    def device_key(self, device_id: int, **kwargs: Any) -> dict[str, Any]:
        return device_key_fields(self.alice, device_id, new_kyber_key(), key_id=1, **kwargs)

    # -- what is stored -----------------------------------------------------------

    async def rows(self) -> list[dict[str, Any]]:
        """Every provisioning row, as stored."""
        names = ("id", "ephemeral_key", "secret_hash", "created_at", "expires_at", "user_id",
                 "device_id", "sealed", "link_token_hash", "received_at", "linked_at")
        rows = await self.server.database.run_query(
            "SELECT " + ", ".join(names) + " FROM device_provisionings ORDER BY created_at, id")
        return [{n: bytes(v) if isinstance(v, memoryview) else v for n, v in zip(names, row)}
                for row in rows]

    async def state(self, cyphr_id: str = "alice") -> tuple[Any, ...]:
        """The identity's devices, its next device id and every provisioning:
        what a refusal must leave as it was."""
        devices = await self.server.database.run_query(
            "SELECT d.device_id, d.fingerprint_hash, d.kyber_public_key FROM devices d"
            " JOIN cyphr_identities i ON i.id = d.user_id WHERE i.cyphr_id = ?"
            " ORDER BY d.device_id", (cyphr_id,))
        next_id = await self.server.database.run_query(
            "SELECT next_device_id FROM cyphr_identities WHERE cyphr_id = ?", (cyphr_id,))
        return ([tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                 for row in devices], next_id, await self.rows())

    async def works(self, token: str) -> bool:
        response = await self.http.get("/api/keys/count", headers=self.alice.auth(token))
        return response.code == 200

    async def add_device(self) -> None:
        """Give alice one more device by recovery, keeping the others."""
        response = await self.alice.recover(self.http, new_fingerprint(), keepOtherDevices=True,
                                            **self.alice.main_key_fields(new_kyber_key()))
        self.assertEqual(response.code, 200, response.body)

    # -- the whole flow -------------------------------------------------------------

    async def test_whole_flow(self) -> None:
        """A new device provisions, alice's device fetches its ephemeral key
        and approves, the new device receives the sealed seed (202 pending
        before) and links with a key signed for the reserved device id: it
        is signed in as device 2, its token works, it is listed with a
        version 3 key that verifies, and it logs in with its fingerprint."""
        ephemeral = new_ephemeral_key()
        provisioning = await self.provision(ephemeral)
        self.assertEqual(set(provisioning), {"success", "provisioningId", "secret", "expiresAt"})
        pid, secret = provisioning["provisioningId"], provisioning["secret"]
        self.assertEqual(len(base64.urlsafe_b64decode(secret + "=")), 32)

        opened = await self.http.get(f"/api/devices/provision/{pid}", headers=self.alice.auth())
        self.assertEqual(opened.code, 200, opened.body)
        self.assertEqual(base64.b64decode(opened.json()["ephemeralKey"]), ephemeral)
        self.assertEqual(opened.json()["expiresAt"], provisioning["expiresAt"])
        # What both screens show for the user to compare.
        self.assertEqual(ephemeral_fingerprint(ephemeral),
                         hashlib.sha256(ephemeral).hexdigest()[:16])
        self.assertEqual((await self.http.get(f"/api/devices/provision/{pid}")).code, 401)

        pending = await self.receive(pid, secret)
        self.assertEqual((pending.code, pending.json()), (202, {"success": True, "pending": True}))

        sealed = os.urandom(1200)
        approved = await self.approve(pid, sealed)
        self.assertEqual((approved.code, approved.json()), (200, {"success": True, "deviceId": 2}))
        # Once approved, nobody else may fetch or approve it.
        again = await self.http.get(f"/api/devices/provision/{pid}", headers=self.bob.auth())
        await self.assertError(again, 404, "PROVISION_NOT_FOUND")
        await self.assertError(await self.approve(pid, user=self.bob), 404, "PROVISION_NOT_FOUND")

        received = await self.receive(pid, secret)
        self.assertEqual(received.code, 200, received.body)
        body = received.json()
        self.assertEqual((body["cyphrId"], body["deviceId"], base64.b64decode(body["sealed"])),
                         ("alice", 2, sealed))
        await self.assertError(await self.receive(pid, secret), 404, "PROVISION_NOT_FOUND")

        fingerprint = new_fingerprint()
        key = self.device_key(2)
        linked = await self.link("alice", body["linkToken"], fingerprint, key)
        self.assertEqual(linked.code, 201, linked.body)
        session = linked.json()
        self.assertEqual(set(session), {"success", "token", "expiresAt", "deviceId", "user"})
        self.assertEqual((session["deviceId"], session["user"]["cyphrId"]), (2, "alice"))
        self.assertTrue(await self.works(session["token"]))
        mine = await self.http.get("/api/devices/me", headers=self.alice.auth(session["token"]))
        self.assertEqual([d["current"] for d in mine.json()["devices"]], [False, True])

        listed = await self.http.get("/api/devices/alice", headers=self.bob.auth())
        device = listed.json()["devices"][1]
        self.assertEqual((device["deviceId"], device["kyberKeySignatureVersion"]), (2, 3))
        self.assertEqual(device["kyberPublicKey"], key["kyberPublicKey"])
        self.assertTrue(verifies("alice", self.alice.public_key, device))
        login = await self.alice.login(self.http, deviceFingerprint=fingerprint)
        self.assertEqual((login.code, login.json()["deviceId"]), (200, 2), login.body)
        self.assertTrue(await self.works(self.alice.token))

    async def test_server_keeps_no_secret(self) -> None:
        """The zero-knowledge check: the sealed blob is stored only until it
        is received (NULL after), and the secret and link token only as
        their SHA-256, never as they are."""
        provisioning = await self.provision()
        pid, secret = provisioning["provisioningId"], provisioning["secret"]
        sealed = os.urandom(900)
        await self.approve(pid, sealed)
        [row] = await self.rows()
        self.assertEqual(row["sealed"], sealed)
        raw_secret = base64.urlsafe_b64decode(secret + "=")
        self.assertEqual(row["secret_hash"], hashlib.sha256(raw_secret).digest())
        received = (await self.receive(pid, secret)).json()
        [row] = await self.rows()
        self.assertIsNone(row["sealed"])
        token = base64.urlsafe_b64decode(received["linkToken"] + "=")
        self.assertEqual(row["link_token_hash"], hashlib.sha256(token).digest())
        stored = repr(row).encode()
        for value in (raw_secret, token, secret.encode(), received["linkToken"].encode()):
            self.assertNotIn(value, stored)
            self.assertNotIn(value, row["secret_hash"] + row["link_token_hash"])
        linked = await self.link("alice", received["linkToken"], new_fingerprint(),
                                 self.device_key(received["deviceId"]))
        self.assertEqual(linked.code, 201, linked.body)
        [row] = await self.rows()
        self.assertIsNone(row["sealed"])
        self.assertIsNotNone(row["linked_at"])

    # -- refusals -------------------------------------------------------------------

    async def test_expired_provisioning(self) -> None:
        """Ten minutes after it was made, a provisioning can no longer be
        fetched, approved or received (404 PROVISION_NOT_FOUND), and the
        refused approval reserves no device id."""
        provisioning = await self.provision()
        pid = provisioning["provisioningId"]
        self.clock.advance(TEN_MINUTES)
        before = await self.state()
        fetched = await self.http.get(f"/api/devices/provision/{pid}", headers=self.alice.auth())
        await self.assertError(fetched, 404, "PROVISION_NOT_FOUND")
        await self.assertError(await self.approve(pid), 404, "PROVISION_NOT_FOUND")
        await self.assertError(await self.receive(pid, provisioning["secret"]), 404,
                               "PROVISION_NOT_FOUND")
        self.assertEqual(await self.state(), before)

    async def test_approved_but_not_received_in_time(self) -> None:
        """An approved provisioning not received within its ten minutes is
        gone: 404, and the sealed seed is never handed out."""
        provisioning = await self.provision()
        await self.approve(provisioning["provisioningId"])
        self.clock.advance(TEN_MINUTES)
        refused = await self.receive(provisioning["provisioningId"], provisioning["secret"])
        await self.assertError(refused, 404, "PROVISION_NOT_FOUND")

    async def test_expired_link_token(self) -> None:
        """A link token not used within ten minutes of its receipt is 401
        INVALID_LINK_TOKEN, and nothing changes."""
        received = await self.received()
        self.clock.advance(TEN_MINUTES)
        before = await self.state()
        refused = await self.link("alice", received["linkToken"], new_fingerprint(),
                                  self.device_key(2))
        await self.assertError(refused, 401, "INVALID_LINK_TOKEN")
        self.assertEqual(await self.state(), before)

    async def test_used_link_token(self) -> None:
        """A link token links one device: used again (another fingerprint,
        a key for the same id) it is 401 INVALID_LINK_TOKEN and nothing
        changes."""
        received = await self.received()
        first = await self.link("alice", received["linkToken"], new_fingerprint(),
                                self.device_key(2))
        self.assertEqual(first.code, 201, first.body)
        before = await self.state()
        again = await self.link("alice", received["linkToken"], new_fingerprint(),
                                self.device_key(2))
        await self.assertError(again, 401, "INVALID_LINK_TOKEN")
        self.assertEqual(await self.state(), before)

    async def test_recovery_replacing_the_devices_cancels_a_link(self) -> None:
        """A link that a device approved cannot finish once recovery has
        replaced every device (a lost phone approved it, perhaps stolen):
        the link token is refused and nothing is added."""
        received = await self.received()
        response = await self.alice.recover(self.http, new_fingerprint(),
                                            **self.alice.main_key_fields(new_kyber_key()))
        self.assertEqual(response.code, 200, response.body)
        before = await self.state()
        refused = await self.link("alice", received["linkToken"], new_fingerprint(),
                                  self.device_key(received["deviceId"]))
        self.assertEqual((refused.code, refused.json()["code"]), (401, "INVALID_LINK_TOKEN"))
        self.assertEqual(await self.state(), before)

    async def test_another_accounts_token(self) -> None:
        """A link token of alice's named with bob's Cyphr ID (and a key bob
        signed for that device id), an unknown Cyphr ID or a token nobody
        has is 401 INVALID_LINK_TOKEN alike, changes nothing and leaves
        alice's token usable."""
        received = await self.received()
        before = (await self.state("alice"), await self.state("bob"))
        bob_key = device_key_fields(self.bob, 2, new_kyber_key(), key_id=1)
        for cyphr_id, token, key in (("bob", received["linkToken"], bob_key),
                                     ("nobody", received["linkToken"], self.device_key(2)),
                                     ("alice", unpadded(os.urandom(32)), self.device_key(2))):
            refused = await self.link(cyphr_id, token, new_fingerprint(), key)
            await self.assertError(refused, 401, "INVALID_LINK_TOKEN")
        self.assertEqual((await self.state("alice"), await self.state("bob")), before)
        linked = await self.link("alice", received["linkToken"], new_fingerprint(),
                                 self.device_key(2))
        self.assertEqual(linked.code, 201, linked.body)

    async def test_wrong_secret(self) -> None:
        """Receiving with another secret is 404 PROVISION_NOT_FOUND, before
        approval (not 202: it tells nothing) and after, and changes nothing;
        a malformed secret is 400; the right secret then works."""
        provisioning = await self.provision()
        pid = provisioning["provisioningId"]
        wrong = unpadded(os.urandom(32))
        await self.assertError(await self.receive(pid, wrong), 404, "PROVISION_NOT_FOUND")
        await self.approve(pid)
        before = await self.state()
        await self.assertError(await self.receive(pid, wrong), 404, "PROVISION_NOT_FOUND")
        for malformed in (provisioning["secret"] + "=", "x" * 42, 7):
            await self.assertError(await self.receive(pid, malformed), 400, "INVALID_FIELD")
        unknown = "00000000-0000-4000-8000-000000000000"
        for other in (unknown, "not-an-id"):
            await self.assertError(await self.receive(other, provisioning["secret"]), 404,
                                   "PROVISION_NOT_FOUND")
        self.assertEqual(await self.state(), before)
        self.assertEqual((await self.receive(pid, provisioning["secret"])).code, 200)

    async def test_sealed_blob_too_large(self) -> None:
        """A sealed blob over 8192 bytes (or an empty one) is 400
        INVALID_FIELD and the provisioning stays open, with no device id
        reserved; 8192 bytes are taken."""
        provisioning = await self.provision()
        pid = provisioning["provisioningId"]
        before = await self.state()
        for sealed in (os.urandom(8193), b""):
            response = await self.http.post(f"/api/devices/provision/{pid}/approve",
                                            {"sealed": b64(sealed)}, headers=self.alice.auth())
            error = await self.assertError(response, 400, "INVALID_FIELD")
            self.assertEqual(error["details"], {"field": "sealed"})
        self.assertEqual(await self.state(), before)
        approved = await self.approve(pid, os.urandom(8192))
        self.assertEqual(approved.code, 200, approved.body)

    async def test_bad_ephemeral_keys(self) -> None:
        """An ephemeral key of another length than 1600 bytes is 400
        INVALID_FIELD; one whose last 1568 bytes are no ML-KEM-1024 key is
        400 INVALID_KYBER_KEY; neither is stored."""
        good = new_ephemeral_key()
        for key, code in ((good[:-1], "INVALID_FIELD"), (good + b"\0", "INVALID_FIELD"),
                          (good[32:], "INVALID_FIELD"),
                          (good[:32] + b"\xff" * 1568, "INVALID_KYBER_KEY")):
            response = await self.http.post("/api/devices/provision", {"ephemeralKey": b64(key)})
            error = await self.assertError(response, 400, code)
            self.assertEqual(error["details"], {"field": "ephemeralKey"})
        self.assertEqual(await self.rows(), [])

    async def test_approval_past_the_device_cap(self) -> None:
        """An identity with as many devices as it may cannot approve: 409
        DEVICE_LIMIT {limit}, no device id is reserved and the provisioning
        stays open."""
        for _ in range(5):
            await self.add_device()
        provisioning = await self.provision()
        pid = provisioning["provisioningId"]
        before = await self.state()
        error = await self.assertError(await self.approve(pid), 409, "DEVICE_LIMIT")
        self.assertEqual(error["details"], {"limit": 6})
        self.assertEqual(await self.state(), before)
        opened = await self.http.get(f"/api/devices/provision/{pid}", headers=self.alice.auth())
        self.assertEqual(opened.code, 200, opened.body)

    async def test_device_cap_checked_again_at_link(self) -> None:
        """A device added between approval and link that fills the cap makes
        the link 409 DEVICE_LIMIT, changing nothing and leaving the token
        usable once a device is removed."""
        for _ in range(4):
            await self.add_device()
        received = await self.received()
        await self.add_device()
        before = await self.state()
        key = self.device_key(received["deviceId"])
        fingerprint = new_fingerprint()
        refused = await self.link("alice", received["linkToken"], fingerprint, key)
        await self.assertError(refused, 409, "DEVICE_LIMIT")
        self.assertEqual(await self.state(), before)
        removed = await self.http.delete("/api/devices/me/2", headers=self.alice.auth())
        self.assertEqual(removed.code, 200, removed.body)
        linked = await self.link("alice", received["linkToken"], fingerprint, key)
        self.assertEqual((linked.code, linked.json().get("deviceId")), (201, 6), linked.body)
        # Device 7 was the one recovery added: the reserved id was nobody else's.
        ids = [d["deviceId"] for d in (await self.http.get(
            "/api/devices/alice", headers=self.bob.auth())).json()["devices"]]
        self.assertEqual(ids, [1, 3, 4, 5, 6, 7])

    async def test_key_for_another_device_or_version(self) -> None:
        """The key must be signed by the identity key for the reserved device
        id as a device key: one signed for another device id, a version 2
        key, or one signed by another identity is 400
        INVALID_KEY_SIGNATURE, and nothing changes (the token is not used
        up: the right key then links)."""
        received = await self.received()
        before = await self.state()
        fingerprint = new_fingerprint()
        for key in (self.device_key(3), self.alice.main_key_fields(new_kyber_key()),
                    self.device_key(2, signer=self.bob.signing_key)):
            refused = await self.link("alice", received["linkToken"], fingerprint, key)
            await self.assertError(refused, 400, "INVALID_KEY_SIGNATURE")
        self.assertEqual(await self.state(), before)
        linked = await self.link("alice", received["linkToken"], fingerprint, self.device_key(2))
        self.assertEqual(linked.code, 201, linked.body)

    async def test_fingerprint_already_the_identitys(self) -> None:
        """Linking a fingerprint that is already one of the identity's
        devices is 409 DEVICE_EXISTS, and nothing changes."""
        received = await self.received()
        before = await self.state()
        refused = await self.link("alice", received["linkToken"], self.alice.fingerprint,
                                  self.device_key(2))
        await self.assertError(refused, 409, "DEVICE_EXISTS")
        self.assertEqual(await self.state(), before)

    # -- bounds ---------------------------------------------------------------------

    async def test_provisioning_flood_from_one_address(self) -> None:
        """One client address gets 10 provisionings in ten minutes; the
        11th is 429 RATE_LIMITED with Retry-After, and is not stored."""
        for _ in range(10):
            await self.provision()
        response = await self.http.post("/api/devices/provision",
                                        {"ephemeralKey": b64(new_ephemeral_key())})
        await self.assertError(response, 429, "RATE_LIMITED")
        self.assertTrue(response.header("Retry-After"))
        self.assertEqual(len(await self.rows()), 10)

    async def test_polls_have_their_own_limit(self) -> None:
        """A new device's polls for its approval count against their own
        limit per address (rate_limit_link_poll), not the sign-ins': with
        sign-ins at 4 per address, 20 polls are answered (202), the next
        past a poll limit of 20 is 429 RATE_LIMITED with Retry-After, and
        a sign-in from that address still works."""
        limits = self.server.limits
        self.patch(limits, "auth_ip", RateLimit(self.clock, 4, 900, name="auth"))
        self.patch(limits, "link_poll", RateLimit(self.clock, 20, 600, name="link_poll"))
        provisioning = await self.provision()
        for _ in range(20):
            polled = await self.receive(provisioning["provisioningId"], provisioning["secret"])
            self.assertEqual((polled.code, polled.json()), (202, {"success": True, "pending": True}))
        refused = await self.receive(provisioning["provisioningId"], provisioning["secret"])
        await self.assertError(refused, 429, "RATE_LIMITED")
        self.assertTrue(refused.header("Retry-After"))
        response = await self.alice.login(self.http)
        self.assertEqual(response.code, 200, response.body)

    async def test_approvals_limited_per_user(self) -> None:
        """A user's approvals are limited (10 an hour, refused ones
        included): the 11th is 429; another user is not limited by it."""
        for _ in range(10):
            missing = await self.approve("00000000-0000-4000-8000-000000000000")
            await self.assertError(missing, 404, "PROVISION_NOT_FOUND")
        provisioning = await self.provision()
        await self.assertError(await self.approve(provisioning["provisioningId"]), 429,
                               "RATE_LIMITED")
        approved = await self.approve(provisioning["provisioningId"], user=self.bob)
        self.assertEqual(approved.code, 200, approved.body)

    async def test_open_provisionings_are_capped(self) -> None:
        """Past the cap on provisionings held (expired ones count until
        purged), a new one is 503 SERVER_BUSY and not stored; once the
        expired ones are purged, provisioning works again."""
        self.patch(linking, "MAX_OPEN_PROVISIONINGS", 3)
        for _ in range(3):
            await self.provision()
        response = await self.http.post("/api/devices/provision",
                                        {"ephemeralKey": b64(new_ephemeral_key())})
        await self.assertError(response, 503, "SERVER_BUSY")
        self.assertEqual(len(await self.rows()), 3)
        self.clock.advance(TEN_MINUTES)
        busy = await self.http.post("/api/devices/provision",
                                    {"ephemeralKey": b64(new_ephemeral_key())})
        await self.assertError(busy, 503, "SERVER_BUSY")
        await self.server.maintenance.run()
        await self.provision()

    async def test_maintenance_purges_expired_rows(self) -> None:
        """Maintenance deletes the provisionings past their expiry (open,
        approved with the sealed seed, received) and keeps the others."""
        await self.provision()
        await self.approve((await self.provision())["provisioningId"])
        self.clock.advance(2 * 60)
        received = await self.received()
        self.clock.advance(3 * 60)
        kept = await self.provision()
        await self.server.maintenance.run()
        self.assertEqual(len(await self.rows()), 4)
        self.clock.advance(5 * 60)
        await self.server.maintenance.run()
        # The first two were made ten minutes ago; the received one's token
        # lives ten minutes from its receipt, two minutes later.
        self.assertEqual(sorted(r["id"] for r in await self.rows()),
                         sorted([kept["provisioningId"], received["provisioningId"]]))
        self.clock.advance(5 * 60)
        await self.server.maintenance.run()
        self.assertEqual(await self.rows(), [])
        refused = await self.link("alice", received["linkToken"], new_fingerprint(),
                                  self.device_key(received["deviceId"]))
        await self.assertError(refused, 401, "INVALID_LINK_TOKEN")


class SQLiteLinkingTests(SQLiteMixin, LinkingMixin, TestCase):
    pass


class PostgresLinkingTests(PostgresMixin, LinkingMixin, TestCase):
    pass


class LinkSocketTests(SQLiteMixin, MemoryRealtimeBase, TestCase):
    """Realtime: a linked device is told to the account's other devices."""

    async def test_link_is_announced(self) -> None:
        """When a device is linked, the account's other device and a
        contact get ``devices_changed`` {change: "added"} for it; the linked
        device's catch-up holds what was sent after it was linked, not
        before."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        await self.direct_chat(bob, alice)
        own, contact = await self.connect(alice), await self.connect(bob)
        provisioning = (await self.http.post("/api/devices/provision",
                                             {"ephemeralKey": b64(new_ephemeral_key())})).json()
        pid = provisioning["provisioningId"]
        approved = await self.http.post(f"/api/devices/provision/{pid}/approve",
                                        {"sealed": b64(os.urandom(500))}, headers=alice.auth())
        self.assertEqual(approved.code, 200, approved.body)
        received = await self.http.post(f"/api/devices/provision/{pid}/receive",
                                        {"secret": provisioning["secret"]})
        body = received.json()
        linked = await self.http.post("/api/devices/link", {
            "cyphrId": "alice", "linkToken": body["linkToken"],
            "deviceFingerprint": new_fingerprint(),
            **device_key_fields(alice, body["deviceId"], new_kyber_key(), key_id=1)})
        self.assertEqual(linked.code, 201, linked.body)
        expected = [{"userId": "alice", "deviceId": body["deviceId"], "change": "added"}]
        for client in (own, contact):
            self.assertEqual(await client.wait_for("devices_changed"), expected)
        # Linked mid-conversation: its catch-up starts from the link (the
        # "hello" before it is in the history), and holds what came after.
        sent = await contact.call("send_message", {"recipientId": "alice",
                                                   "encryptedPayload": {"ct": "after"}})
        self.assertTrue(sent["success"], sent)
        device = self.new_client()
        await device.connect({"token": linked.json()["token"]})
        await device.wait_for("sync_complete")
        self.assertEqual([e["message"]["encryptedPayload"] for e in device.events("new_message")],
                         [{"ct": "after"}])
