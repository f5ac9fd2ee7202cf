"""
Devices (issue #13, first step): an identity's devices with their own keys,
prekeys and tokens; recovery that adds a device or replaces the others; the
device list anyone signed in may read and check; renaming and removing
one's devices. On both engines, with real Ed25519 and ML-KEM-1024 keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from twisted.trial.unittest import TestCase

from cyphr.clock import iso
from cyphr.signing import DeviceKeyBinding, KeyBinding
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, fixed_clock, start_server
from tests.test_realtime_cluster import ClusterMixin
from tests.test_realtime_events import MemoryRealtimeBase
from tests.users import MAIN_KEY_LIFETIME_MS, User, b64, new_kyber_key


def new_fingerprint() -> str:
    return hashlib.sha256(os.urandom(16)).hexdigest()


def device_key_fields(user: User, device_id: int, key: bytes, *, key_id: int,
                      signed_device_id: int | None = None, signer: Any = None,
                      owner: str | None = None) -> dict[str, Any]:
    """A key upload signed as device ``signed_device_id`` (default
    ``device_id``) of ``owner`` (default the user): version 3."""
    created = user.now_ms()
    expires = created + MAIN_KEY_LIFETIME_MS
    binding = DeviceKeyBinding(owner=owner or user.cyphr_id,
                               device_id=signed_device_id or device_id, key_id=key_id,
                               created_at=created, expires_at=expires, public_key=key)
    return {
        "kyberPublicKey": b64(key),
        "kyberKeySignature": b64(binding.sign(signer or user.signing_key)),
        "kyberKeyId": key_id,
        "kyberKeyCreatedAt": iso(created),
        "kyberKeyExpiresAt": iso(expires),
    }


def verifies(cyphr_id: str, identity_key: bytes, device: dict[str, Any]) -> bool:
    """What a client checks of a listed device: its key, signed by the
    pinned identity key for this device id (version 3) or as the
    identity's main key (version 2)."""
    times = [device["kyberKeyCreatedAt"], device["kyberKeyExpiresAt"]]
    created, expires = (int(_ms(t)) for t in times)
    key = base64.b64decode(device["kyberPublicKey"])
    signature = base64.b64decode(device["kyberKeySignature"])
    if device["kyberKeySignatureVersion"] == 3:
        return DeviceKeyBinding(cyphr_id, device["deviceId"], device["kyberKeyId"], created,
                                expires, key).verify(identity_key, signature)
    return KeyBinding(False, cyphr_id, device["kyberKeyId"], created, expires, key).verify(
        identity_key, signature)


def _ms(timestamp: str) -> int:
    from cyphr.handlers.validation import parse_timestamp
    return parse_timestamp(timestamp, "t")


class DevicesMixin:
    overrides: dict[str, Any] = {}

    async def setUp(self) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, **self.overrides)
        self.http = InProcessHTTP.for_server(self.server)
        self.alice, self.bob = User("alice"), User("bob")
        await self.alice.register(self.http)
        await self.bob.register(self.http)

    async def assertError(self, response: Any, status: int, code: str) -> dict[str, Any]:
        self.assertEqual((response.code, response.json().get("code")), (status, code), response.body)
        self.assertIs(response.json()["success"], False)
        return response.json()

    async def device_rows(self, cyphr_id: str = "alice") -> list[tuple[Any, ...]]:
        """Every device row of the identity, as stored."""
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                for row in await self.server.database.run_query(
                    "SELECT d.* FROM devices d JOIN cyphr_identities i ON i.id = d.user_id"
                    " WHERE i.cyphr_id = ? ORDER BY d.device_id", (cyphr_id,))]

    async def add_device(self, user: User, *, keep: bool = True, fingerprint: str | None = None,
                         key: dict[str, Any] | None = None) -> tuple[str, int, str]:
        """Recover ``user`` on another device, keeping the others:
        (fingerprint, device id, token)."""
        fingerprint = fingerprint or new_fingerprint()
        fields = key if key is not None else user.main_key_fields(new_kyber_key())
        response = await user.recover(self.http, fingerprint, keepOtherDevices=keep, **fields)
        self.assertEqual(response.code, 200, response.body)
        return fingerprint, response.json()["deviceId"], response.json()["token"]

    async def works(self, token: str) -> bool:
        response = await self.http.get("/api/keys/count", headers=self.alice.auth(token))
        if response.code != 200:
            self.assertEqual(response.json()["code"], "TOKEN_REVOKED")
        return response.code == 200

    async def listed(self, cyphr_id: str = "alice", viewer: User | None = None) -> dict[str, Any]:
        response = await self.http.get(f"/api/devices/{cyphr_id}",
                                       headers=(viewer or self.bob).auth())
        self.assertEqual(response.code, 200, response.body)
        return response.json()

    async def mine(self, token: str | None = None) -> list[dict[str, Any]]:
        response = await self.http.get("/api/devices/me", headers=self.alice.auth(token))
        self.assertEqual(response.code, 200, response.body)
        return response.json()["devices"]

    # -- the model ------------------------------------------------------------

    async def test_registration_makes_device_one(self) -> None:
        """A registered identity has one device, id 1, holding the key it
        registered; anyone signed in lists it with its signed key, which
        verifies with the identity key; the owner sees it as its current
        device, with no name yet."""
        listed = await self.listed()
        self.assertEqual(listed["cyphrId"], "alice")
        self.assertEqual(base64.b64decode(listed["publicKey"]), self.alice.public_key)
        [device] = listed["devices"]
        self.assertEqual(set(device), {"deviceId", "kyberPublicKey", "kyberKeySignature", "kyberKeyId",
                                       "kyberKeyCreatedAt", "kyberKeyExpiresAt",
                                       "kyberKeySignatureVersion", "createdAt"})
        self.assertEqual((device["deviceId"], device["kyberKeySignatureVersion"]), (1, 2))
        self.assertEqual(base64.b64decode(device["kyberPublicKey"]), self.alice.kyber_key)
        self.assertTrue(verifies("alice", self.alice.public_key, device))
        [own] = await self.mine()
        self.assertEqual({k: own[k] for k in device}, device)
        self.assertEqual((own["current"], own["encryptedName"]), (True, None))
        self.assertIsNotNone(own["lastSeen"])

    async def test_device_bound_key_at_registration(self) -> None:
        """A client may register device 1 with a key signed as device 1
        (version 3): the list says so and the signature binds the id; one
        signed as device 2 is refused and nothing is stored."""
        carol = User("carol")
        carol.use(self.http)
        key = new_kyber_key()
        wrong = await carol.register_body(self.http, **device_key_fields(carol, 1, key, key_id=1,
                                                                         signed_device_id=2))
        response = await self.http.post("/api/cyphr-id/register", wrong)
        await self.assertError(response, 400, "INVALID_KEY_SIGNATURE")
        self.assertEqual(await self.device_rows("carol"), [])
        body = await carol.register_body(self.http, **device_key_fields(carol, 1, key, key_id=1))
        response = await self.http.post("/api/cyphr-id/register", body)
        self.assertEqual(response.code, 201, response.body)
        [device] = (await self.listed("carol"))["devices"]
        self.assertEqual(device["kyberKeySignatureVersion"], 3)
        self.assertTrue(verifies("carol", carol.public_key, device))
        moved = {**device, "deviceId": 2}
        self.assertFalse(verifies("carol", carol.public_key, moved))

    # -- recovery adds a device -------------------------------------------------

    async def test_recovery_keeping_the_others_adds_a_device(self) -> None:
        """Recovery with keepOtherDevices adds device 2 with the key it gave:
        both devices' tokens work, both log in, both are listed; a third
        fingerprint cannot log in (DEVICE_MISMATCH)."""
        first_token = self.alice.token
        fingerprint, device_id, token = await self.add_device(self.alice)
        self.assertEqual(device_id, 2)
        self.assertTrue(await self.works(first_token))
        self.assertTrue(await self.works(token))
        self.assertEqual([d["deviceId"] for d in (await self.listed())["devices"]], [1, 2])
        mine = await self.mine(token)
        self.assertEqual([d["current"] for d in mine], [False, True])
        login = await self.alice.login(self.http)
        self.assertEqual((login.code, login.json()["deviceId"]), (200, 1))
        login = await self.alice.login(self.http, deviceFingerprint=fingerprint)
        self.assertEqual((login.code, login.json()["deviceId"]), (200, 2))
        stranger = await self.alice.login(self.http, deviceFingerprint=new_fingerprint())
        await self.assertError(stranger, 401, "DEVICE_MISMATCH")

    async def test_recovery_by_default_replaces_every_device(self) -> None:
        """Recovery without keepOtherDevices (a lost phone) leaves the new
        device alone: the old device's token stops at once, it can no
        longer log in, and the new device gets the next id (ids are never
        reused)."""
        old_token = self.alice.token
        old_fingerprint = self.alice.fingerprint
        _, device_id, token = await self.add_device(self.alice, keep=False)
        self.assertEqual(device_id, 2)
        self.assertFalse(await self.works(old_token))
        self.assertTrue(await self.works(token))
        self.assertEqual([d["deviceId"] for d in (await self.listed())["devices"]], [2])
        refused = await self.alice.login(self.http, deviceFingerprint=old_fingerprint)
        await self.assertError(refused, 401, "DEVICE_MISMATCH")
        _, third, _ = await self.add_device(self.alice, keep=False)
        self.assertEqual(third, 3)

    async def test_recovery_on_a_known_device_rekeys_it(self) -> None:
        """Recovery from a fingerprint that is already one of the identity's
        devices keeps its id, takes the new key, drops its prekeys and stops
        its earlier tokens, and leaves the other devices and their tokens
        alone."""
        fingerprint, device_id, second_token = await self.add_device(self.alice)
        first_token = self.alice.token
        prekeys = await self.http.post("/api/keys/prekeys", {"prekeys": [self.alice.prekey(1)]},
                                       headers=self.alice.auth(second_token))
        self.assertEqual(prekeys.code, 200, prekeys.body)
        self.clock.advance(2)
        new_key = new_kyber_key()
        again, same_id, token = await self.add_device(
            self.alice, fingerprint=fingerprint,
            key=self.alice.main_key_fields(new_key, key_id=self.alice.kyber_key_id + 1))
        self.assertEqual(same_id, device_id)
        self.assertFalse(await self.works(second_token))
        self.assertTrue(await self.works(token))
        self.assertTrue(await self.works(first_token))
        device = (await self.listed())["devices"][1]
        self.assertEqual(base64.b64decode(device["kyberPublicKey"]), new_key)
        count = await self.http.get("/api/keys/count", headers=self.alice.auth(token))
        self.assertEqual(count.json()["remaining"], 0)

    async def test_device_cap(self) -> None:
        """Past the cap (max_devices), recovery that keeps the others is
        refused with 409 DEVICE_LIMIT and nothing changes; recovery that
        replaces them still works."""
        for _ in range(5):
            await self.add_device(self.alice)
        before = await self.device_rows()
        self.assertEqual(len(before), 6)
        refused = await self.alice.recover(self.http, new_fingerprint(), keepOtherDevices=True,
                                           **self.alice.main_key_fields(new_kyber_key()))
        error = await self.assertError(refused, 409, "DEVICE_LIMIT")
        self.assertEqual(error["details"], {"limit": 6})
        self.assertEqual(await self.device_rows(), before)
        _, device_id, _ = await self.add_device(self.alice, keep=False)
        self.assertEqual(len(await self.device_rows()), 1)
        self.assertEqual(device_id, 7)

    async def test_recovery_without_a_key_needs_one_when_the_key_is_device_bound(self) -> None:
        """Recovery that gives no key takes the identity's key (the phrase
        makes it again) when that key is bound to no device; when it is
        bound to device 1 (version 3) no other device may take it: 400
        MISSING_FIELD, and nothing changes."""
        response = await self.alice.recover(self.http, new_fingerprint(), keepOtherDevices=True)
        self.assertEqual(response.code, 200, response.body)
        devices = (await self.listed())["devices"]
        self.assertEqual(devices[1]["kyberPublicKey"], devices[0]["kyberPublicKey"])
        rotated = await self.http.post(
            "/api/messaging/store-public-key",
            device_key_fields(self.alice, 1, new_kyber_key(), key_id=self.alice.kyber_key_id + 1),
            headers=self.alice.auth())
        self.assertEqual(rotated.code, 200, rotated.body)
        before = await self.device_rows()
        refused = await self.alice.recover(self.http, new_fingerprint(), keepOtherDevices=True)
        error = await self.assertError(refused, 400, "MISSING_FIELD")
        self.assertEqual(error["details"], {"field": "kyberPublicKey"})
        self.assertEqual(await self.device_rows(), before)

    async def test_recovery_key_cannot_be_device_bound(self) -> None:
        """A key given at recovery is checked before its device has an id:
        one signed for a device id (version 3) is refused, and nothing
        changes."""
        before = await self.device_rows()
        refused = await self.alice.recover(
            self.http, new_fingerprint(), keepOtherDevices=True,
            **device_key_fields(self.alice, 2, new_kyber_key(), key_id=2))
        await self.assertError(refused, 400, "INVALID_KEY_SIGNATURE")
        self.assertEqual(await self.device_rows(), before)

    # -- device keys --------------------------------------------------------

    async def test_a_device_rotates_its_own_key(self) -> None:
        """store-public-key replaces the key of the caller's device only: a
        version 3 key signed for that device is taken and listed as such;
        one signed for another device id, by another identity, or older
        (a version 2 key after a version 3 one) is refused and changes
        nothing."""
        _, device_id, token = await self.add_device(self.alice)
        key = new_kyber_key()
        before = await self.device_rows()
        for fields, status, code in (
            (device_key_fields(self.alice, device_id, key, key_id=5, signed_device_id=1), 400,
             "INVALID_KEY_SIGNATURE"),
            (device_key_fields(self.alice, device_id, key, key_id=5, signer=self.bob.signing_key),
             400, "INVALID_KEY_SIGNATURE"),
            (device_key_fields(self.alice, device_id, key, key_id=5, owner="bob"), 400,
             "INVALID_KEY_SIGNATURE"),
        ):
            response = await self.http.post("/api/messaging/store-public-key", fields,
                                            headers=self.alice.auth(token))
            await self.assertError(response, status, code)
        self.assertEqual(await self.device_rows(), before)
        response = await self.http.post("/api/messaging/store-public-key",
                                        device_key_fields(self.alice, device_id, key, key_id=5),
                                        headers=self.alice.auth(token))
        self.assertEqual(response.code, 200, response.body)
        first, second = (await self.listed())["devices"]
        self.assertEqual(first["kyberPublicKey"], b64(self.alice.kyber_key))
        self.assertEqual((second["kyberPublicKey"], second["kyberKeySignatureVersion"]),
                         (b64(key), 3))
        self.assertTrue(verifies("alice", self.alice.public_key, second))
        older = await self.http.post(
            "/api/messaging/store-public-key",
            self.alice.main_key_fields(new_kyber_key(), key_id=6), headers=self.alice.auth(token))
        await self.assertError(older, 409, "STALE_KEY")

    async def test_prekeys_are_per_device(self) -> None:
        """Each device uploads, counts and hands out its own prekeys (the
        same key ids on two devices are two keys); a claim names the device
        (claim/:cyphrId alone takes the lowest one's), and says which; an
        unknown device is 404 DEVICE_NOT_FOUND."""
        _, device_id, token = await self.add_device(self.alice)
        for auth, n in ((self.alice.auth(), 2), (self.alice.auth(token), 3)):
            response = await self.http.post(
                "/api/keys/prekeys", {"prekeys": [self.alice.prekey(i) for i in range(1, n + 1)]},
                headers=auth)
            self.assertEqual((response.code, response.json()["total"]), (200, n), response.body)
        counts = [(await self.http.get("/api/keys/count", headers=auth)).json()["remaining"]
                  for auth in (self.alice.auth(), self.alice.auth(token))]
        self.assertEqual(counts, [2, 3])
        claimed = await self.http.post(f"/api/keys/claim/alice/{device_id}", {},
                                       headers=self.bob.auth())
        self.assertEqual(claimed.code, 200, claimed.body)
        self.assertEqual((claimed.json()["deviceId"], claimed.json()["oneTime"]), (2, True))
        claimed = await self.http.post("/api/keys/claim/alice", {}, headers=self.bob.auth())
        self.assertEqual(claimed.json()["deviceId"], 1)
        counts = [(await self.http.get("/api/keys/count", headers=auth)).json()["remaining"]
                  for auth in (self.alice.auth(), self.alice.auth(token))]
        self.assertEqual(counts, [1, 2])
        for path in ("/api/keys/claim/alice/9", "/api/keys/claim/alice/0",
                     "/api/keys/claim/alice/x"):
            response = await self.http.post(path, {}, headers=self.bob.auth())
            await self.assertError(response, 404, "DEVICE_NOT_FOUND")

    # -- the owner's devices ----------------------------------------------------

    async def test_rename_a_device(self) -> None:
        """A device's name is sealed by the client and stored as it comes:
        any of the owner's devices may set or clear it, the owner sees it,
        nobody else does; a name over 512 bytes is refused and changes
        nothing; another account's device (or one not there) is 404."""
        _, device_id, token = await self.add_device(self.alice)
        sealed = os.urandom(200)
        response = await self.http.put(f"/api/devices/me/{device_id}", {"encryptedName": b64(sealed)},
                                       headers=self.alice.auth())
        self.assertEqual(response.code, 200, response.body)
        self.assertEqual(response.json()["device"]["encryptedName"], b64(sealed))
        self.assertEqual([d["encryptedName"] for d in await self.mine(token)], [None, b64(sealed)])
        self.assertNotIn("encryptedName", json.dumps((await self.listed())["devices"]))
        too_long = await self.http.put(f"/api/devices/me/{device_id}",
                                       {"encryptedName": b64(os.urandom(513))},
                                       headers=self.alice.auth())
        await self.assertError(too_long, 400, "INVALID_FIELD")
        self.assertEqual([d["encryptedName"] for d in await self.mine()], [None, b64(sealed)])
        for auth in (self.bob.auth(), self.alice.auth()):
            missing = await self.http.put("/api/devices/me/7", {"encryptedName": None}, headers=auth)
            await self.assertError(missing, 404, "DEVICE_NOT_FOUND")
        cleared = await self.http.put(f"/api/devices/me/{device_id}", {"encryptedName": None},
                                      headers=self.alice.auth(token))
        self.assertEqual(cleared.json()["device"]["encryptedName"], None)

    async def test_remove_a_device(self) -> None:
        """Removing a device stops its token at the next request, drops its
        prekeys and its login; the others keep working; removing it again,
        or naming a device of another account, is 404 DEVICE_NOT_FOUND and
        changes nothing; the identity's last device cannot be removed (409
        LAST_DEVICE)."""
        fingerprint, device_id, token = await self.add_device(self.alice)
        await self.http.post("/api/keys/prekeys", {"prekeys": [self.alice.prekey(1)]},
                             headers=self.alice.auth(token))
        stranger = await self.http.delete(f"/api/devices/me/{device_id}", headers=self.bob.auth())
        await self.assertError(stranger, 404, "DEVICE_NOT_FOUND")
        self.assertEqual(len(await self.device_rows()), 2)
        response = await self.http.delete(f"/api/devices/me/{device_id}", headers=self.alice.auth())
        self.assertEqual(response.code, 200, response.body)
        self.assertFalse(await self.works(token))
        self.assertTrue(await self.works(self.alice.token))
        self.assertEqual([d["deviceId"] for d in (await self.listed())["devices"]], [1])
        rows = await self.server.database.run_query(
            "SELECT COUNT(*) FROM one_time_prekeys WHERE device_id = ?", (device_id,))
        self.assertEqual(rows[0][0], 0)
        refused = await self.alice.login(self.http, deviceFingerprint=fingerprint)
        await self.assertError(refused, 401, "DEVICE_MISMATCH")
        again = await self.http.delete(f"/api/devices/me/{device_id}", headers=self.alice.auth())
        await self.assertError(again, 404, "DEVICE_NOT_FOUND")
        before = await self.device_rows()
        last = await self.http.delete("/api/devices/me/1", headers=self.alice.auth())
        await self.assertError(last, 409, "LAST_DEVICE")
        self.assertEqual(await self.device_rows(), before)

    # -- sending to devices -----------------------------------------------------

    async def send(self, sender: User, devices: list[tuple[str, int]] | None, *,
                   token: str | None = None, **target: str) -> Any:
        body: dict[str, Any] = {**target, "encryptedPayload": {"ct": "AA"}}
        if devices is not None:
            body["devices"] = [{"cyphrId": c, "deviceId": d} for c, d in devices]
        return await self.http.post("/api/messaging/send", body, headers=sender.auth(token))

    async def messages(self) -> int:
        rows = await self.server.database.run_query("SELECT COUNT(*) FROM messages")
        return rows[0][0]

    async def test_a_message_names_the_devices_it_was_sealed_for(self) -> None:
        """A send that names every device of the chat's members (the
        sending device may be left out or named) is stored; one that omits
        a device, names one that is not there or was removed is refused with
        409 DEVICES_CHANGED saying which, and nothing is stored or created
        (not even the direct chat of a first message); a repeated device is
        400; a send that names no devices is taken as before."""
        _, second, token = await self.add_device(self.alice)
        refused = await self.send(self.bob, [("alice", 1)], recipientId="alice")
        error = await self.assertError(refused, 409, "DEVICES_CHANGED")
        self.assertEqual(error["details"], {"missing": [{"cyphrId": "alice", "deviceId": 2}],
                                            "stale": []})
        self.assertEqual(await self.messages(), 0)
        chats = await self.server.database.run_query("SELECT COUNT(*) FROM chats")
        self.assertEqual(chats[0][0], 0)
        sent = await self.send(self.bob, [("alice", 1), ("alice", 2)], recipientId="alice")
        self.assertEqual(sent.code, 201, sent.body)
        chat_id = sent.json()["chatId"]
        for devices in ([("alice", 2), ("bob", 1)], [("alice", 1), ("alice", 2), ("bob", 1)]):
            sent = await self.send(self.alice, devices, chatId=chat_id)
            self.assertEqual(sent.code, 201, sent.body)
        stale = await self.send(self.alice, [("alice", 2), ("bob", 1), ("bob", 2), ("carol", 1)],
                                chatId=chat_id)
        error = await self.assertError(stale, 409, "DEVICES_CHANGED")
        self.assertEqual(error["details"], {"missing": [], "stale": [
            {"cyphrId": "bob", "deviceId": 2}, {"cyphrId": "carol", "deviceId": 1}]})
        removed = await self.http.delete(f"/api/devices/me/{second}", headers=self.alice.auth())
        self.assertEqual(removed.code, 200, removed.body)
        error = await self.assertError(
            await self.send(self.bob, [("alice", 1), ("alice", 2)], chatId=chat_id),
            409, "DEVICES_CHANGED")
        self.assertEqual(error["details"]["stale"], [{"cyphrId": "alice", "deviceId": 2}])
        self.assertEqual(await self.messages(), 3)
        repeated = await self.send(self.bob, [("alice", 1), ("alice", 1)], chatId=chat_id)
        error = await self.assertError(repeated, 400, "INVALID_FIELD")
        self.assertEqual(error["details"], {"field": "devices[1]"})
        for bad in ([{"cyphrId": "alice"}], [{"cyphrId": "alice", "deviceId": 0}], ["alice"], "x"):
            response = await self.http.post("/api/messaging/send", {
                "chatId": chat_id, "encryptedPayload": {}, "devices": bad}, headers=self.bob.auth())
            self.assertEqual(response.code, 400, (bad, response.body))
        self.assertEqual((await self.send(self.bob, None, chatId=chat_id)).code, 201)
        self.assertEqual(await self.messages(), 4)

    async def test_devices_of_a_chat_one_is_not_in(self) -> None:
        """Naming devices for a chat the sender is not in is 404
        CHAT_NOT_FOUND, as every other refusal of that kind: the answer
        tells nothing of the chat's devices."""
        sent = await self.send(self.bob, [("alice", 1)], recipientId="alice")
        chat_id = sent.json()["chatId"]
        carol = User("carol")
        await carol.register(self.http)
        for devices in ([("alice", 1), ("bob", 1)], []):
            refused = await self.send(carol, devices, chatId=chat_id)
            await self.assertError(refused, 404, "CHAT_NOT_FOUND")

    async def test_list_of_an_unknown_user(self) -> None:
        """The list of a Cyphr ID nobody has is 404 USER_NOT_FOUND; a
        malformed one is 400 INVALID_CYPHR_ID; without a token, 401."""
        await self.assertError(await self.http.get("/api/devices/nobody", headers=self.bob.auth()),
                               404, "USER_NOT_FOUND")
        await self.assertError(await self.http.get("/api/devices/A!", headers=self.bob.auth()),
                               400, "INVALID_CYPHR_ID")
        self.assertEqual((await self.http.get("/api/devices/alice")).code, 401)


class SQLiteDevicesTests(SQLiteMixin, DevicesMixin, TestCase):
    pass


class PostgresDevicesTests(PostgresMixin, DevicesMixin, TestCase):
    pass


class DeviceSocketTests(SQLiteMixin, MemoryRealtimeBase, TestCase):
    """Realtime: removing a device ends its sockets, and only its own;
    device changes are told to the account and its contacts."""

    async def test_device_changes_are_announced(self) -> None:
        """A device added, given a new key, or removed is told
        (``devices_changed``) to the account's own sockets and to everyone
        who shares a chat with it, and to nobody else."""
        await self.serve()
        alice, bob, carol = await self.user("alice"), await self.user("bob"), await self.user("carol")
        await self.direct_chat(bob, alice)
        own, contact, stranger = (await self.connect(alice), await self.connect(bob),
                                  await self.connect(carol))
        response = await alice.recover(self.http, new_fingerprint(), keepOtherDevices=True)
        assert response.code == 200, response.body
        second = response.json()["token"]
        key = device_key_fields(alice, 2, new_kyber_key(), key_id=alice.kyber_key_id + 1)
        rotated = await self.http.post("/api/messaging/store-public-key", key,
                                       headers=alice.auth(second))
        self.assertEqual(rotated.code, 200, rotated.body)
        removed = await self.http.delete("/api/devices/me/2", headers=alice.auth())
        self.assertEqual(removed.code, 200, removed.body)
        expected = [{"userId": "alice", "deviceId": 2, "change": change}
                    for change in ("added", "key", "removed")]
        for client in (own, contact):
            self.assertEqual(await client.wait_for("devices_changed", 3), expected)
        await stranger.barrier()
        self.assertEqual(stranger.events("devices_changed"), [])

    async def test_removing_a_device_closes_its_sockets(self) -> None:
        """The removed device's socket is disconnected; the socket of the
        account's other device stays."""
        await self.serve()
        alice = await self.user("alice")
        response = await alice.recover(self.http, new_fingerprint(), keepOtherDevices=True)
        assert response.code == 200, response.body
        second = response.json()["token"]
        first_socket = await self.connect(alice)
        second_socket = self.new_client()
        await second_socket.connect({"token": second})
        await second_socket.wait_for("sync_complete")
        removed = await self.http.delete("/api/devices/me/2", headers=alice.auth())
        self.assertEqual(removed.code, 200, removed.body)
        await second_socket.wait_disconnected(timeout=3)
        await first_socket.barrier()
        self.assertEqual(first_socket.disconnects, [])

    async def device_socket(self, token: str) -> Any:
        client = self.new_client()
        await client.connect({"token": token})
        await client.wait_for("sync_complete")
        return client

    async def caught_up(self, client: Any) -> list[str]:
        """The payload texts of what the socket's catch-up pushed, each
        acknowledged as delivered."""
        texts = []
        for event in client.events("new_message"):
            message = event["message"]
            ack = await client.call("message_delivered", {"messageId": message["id"],
                                                          "chatId": message["chatId"]})
            self.assertTrue(ack["success"], ack)
            texts.append(message["encryptedPayload"].get("ct", "hello"))
        return texts

    async def test_each_device_catches_up_on_its_own(self) -> None:
        """Messages sent while a user's devices were away reach each device
        once: the first device to come back gets them, the second still
        gets them later, neither gets them twice; the sender hears of the
        delivery once; a device added after they were sent does not get
        them, but gets what is sent after."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        chat_id = await self.direct_chat(bob, alice)  # "hello", sent before any device was added
        response = await alice.recover(self.http, new_fingerprint(), keepOtherDevices=True)
        second = response.json()["token"]
        sender = await self.connect(bob)
        for text in ("one", "two"):
            ack = await sender.call("send_message", {"chatId": chat_id, "encryptedPayload": {"ct": text}})
            self.assertTrue(ack["success"], ack)
        first_device = await self.device_socket(alice.token)
        self.assertEqual(await self.caught_up(first_device), ["hello", "one", "two"])
        await first_device.disconnect()
        second_device = await self.device_socket(second)
        self.assertEqual(await self.caught_up(second_device), ["one", "two"])
        await second_device.disconnect()
        again = await self.device_socket(alice.token)
        self.assertEqual(again.events("new_message"), [])
        await sender.barrier()
        self.assertEqual(len(sender.events("message_delivered")), 3)  # hello, one, two: once each
        response = await alice.recover(self.http, new_fingerprint(), keepOtherDevices=True)
        third = response.json()["token"]
        ack = await sender.call("send_message", {"chatId": chat_id, "encryptedPayload": {"ct": "three"}})
        self.assertTrue(ack["success"], ack)
        late = await self.device_socket(third)
        self.assertEqual(await self.caught_up(late), ["three"])

    async def test_reading_on_one_device_is_told_to_the_others(self) -> None:
        """Read state is the user's: a read on one device is told to the
        user's other devices (``message_read`` with the user's own
        ``userId``), as to the sender, so that they clear their unread
        counts; the chat list's unread count is the same on both."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        chat_id = await self.direct_chat(bob, alice)
        response = await alice.recover(self.http, new_fingerprint(), keepOtherDevices=True)
        second = response.json()["token"]
        reader = await self.device_socket(alice.token)
        other = await self.device_socket(second)
        sender = await self.connect(bob)
        ack = await reader.call("message_read", {"chatId": chat_id, "upToSeq": 1})
        self.assertTrue(ack["success"], ack)
        [told] = await other.wait_for("message_read")
        self.assertEqual((told["chatId"], told["userId"], told["upToSeq"]), (chat_id, "alice", 1))
        [heard] = await sender.wait_for("message_read")
        self.assertEqual(heard, told)
        for token in (alice.token, second):
            chats = await self.http.get("/api/messaging/chats", headers=alice.auth(token))
            self.assertEqual([c["unreadCount"] for c in chats.json()["chats"]], [0])

    async def test_send_message_names_devices(self) -> None:
        """send_message takes the same device list as the REST send: the
        right one is stored, a wrong one is acknowledged with
        DEVICES_CHANGED and its details, and nothing reaches the recipient."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        chat_id = await self.direct_chat(bob, alice)
        receiver = await self.connect(alice)
        sender = await self.connect(bob)
        ack = await sender.call("send_message", {
            "chatId": chat_id, "encryptedPayload": {"ct": "X"},
            "devices": [{"cyphrId": "alice", "deviceId": 1}, {"cyphrId": "alice", "deviceId": 3}]})
        self.assertEqual((ack["success"], ack["code"]), (False, "DEVICES_CHANGED"), ack)
        self.assertEqual(ack["details"], {"missing": [], "stale": [{"cyphrId": "alice", "deviceId": 3}]})
        ack = await sender.call("send_message", {
            "chatId": chat_id, "encryptedPayload": {"ct": "Y"},
            "devices": [{"cyphrId": "alice", "deviceId": 1}]})
        self.assertTrue(ack["success"], ack)
        [message] = [m["message"] for m in await receiver.wait_for("new_message", 2)
                     if m["message"]["encryptedPayload"] != {"hello": True}]
        self.assertEqual(message["encryptedPayload"], {"ct": "Y"})


class OwnDevicesMixin:
    """What a user's devices send reaches its other devices, and the
    delivered marks move over each device's own messages: on both
    engines (the marks are SQL)."""

    async def send(self, user: User, token: str, chat_id: str, text: str) -> dict[str, Any]:
        response = await self.http.post("/api/messaging/send", {
            "chatId": chat_id, "encryptedPayload": {"ct": text}}, headers=user.auth(token))
        self.assertEqual(response.code, 201, response.body)
        return response.json()

    async def marks(self, chat_id: str) -> tuple[list[tuple[int, int]], int, int]:
        """Alice's devices' (device id, delivered mark) in the chat, how
        many receipts past a mark they hold, and her member mark."""
        rows = await self.server.database.run_query(
            "SELECT d.device_id, d.delivered_up_to_seq FROM device_deliveries d"
            " JOIN cyphr_identities i ON i.id = d.user_id"
            " WHERE i.cyphr_id = 'alice' AND d.chat_id = ? ORDER BY d.device_id", (chat_id,))
        [(receipts,)] = await self.server.database.run_query(
            "SELECT COUNT(*) FROM device_receipts WHERE chat_id = ?", (chat_id,))
        [(member,)] = await self.server.database.run_query(
            "SELECT delivered_up_to_seq FROM chat_participants WHERE chat_id = ? AND user_id = ?",
            (chat_id, "alice"))
        return [tuple(row) for row in rows], receipts, member

    async def test_own_messages_reach_the_other_devices(self) -> None:
        """Alice's two devices and bob take turns: each of alice's devices
        catches up on bob's messages and on those her other device sent,
        never on its own; each message names the device that sent it.
        Acknowledged (the later ones first), each device's mark reaches its
        last message over its own (device 2 sent the newest), no receipt is
        left over, the member's mark is at bob's last message, and a
        reconnection brings nothing again."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        chat_id = await self.direct_chat(bob, alice)  # seq 1, "hello" from bob
        response = await alice.recover(self.http, new_fingerprint(), keepOtherDevices=True)
        assert response.code == 200, response.body
        tokens = {1: alice.token, 2: response.json()["token"]}
        for round_ in range(2):
            await self.send(alice, tokens[1], chat_id, f"alice 1 ({round_})")
            await self.send(bob, bob.token, chat_id, f"bob ({round_})")
            await self.send(alice, tokens[2], chat_id, f"alice 2 ({round_})")
        expected = {1: ["hello", "bob (0)", "alice 2 (0)", "bob (1)", "alice 2 (1)"],
                    2: ["alice 1 (0)", "bob (0)", "alice 1 (1)", "bob (1)"]}
        for device_id, token in tokens.items():
            client = self.new_client()
            await client.connect({"token": token})
            await client.wait_for("sync_complete")
            messages = [e["message"] for e in client.events("new_message")]
            texts = [m["encryptedPayload"].get("ct", "hello") for m in messages]
            # Device 2 was added after bob's "hello": it gets what followed.
            self.assertEqual(texts, expected[device_id])
            for message, text in zip(messages, texts):
                self.assertEqual(message["senderDeviceId"], 2 if "alice 2" in text else 1)
            for message in reversed(messages):
                ack = await client.call("message_delivered", {"messageId": message["id"],
                                                              "chatId": chat_id})
                self.assertTrue(ack["success"], ack)
            await client.disconnect()
        self.assertEqual(await self.marks(chat_id), ([(1, 7), (2, 6)], 0, 6))
        for token in tokens.values():
            again = self.new_client()
            await again.connect({"token": token})
            await again.wait_for("sync_complete")
            self.assertEqual(again.events("new_message"), [])

    async def test_a_mark_waits_for_what_is_owed(self) -> None:
        """A device that acknowledges a later message of bob's before an
        earlier one keeps its mark before the earlier one (a receipt holds
        the later); acknowledging the earlier one moves the mark over both
        (and alice's own message between) and drops the receipt. The
        member's mark moves over a gap at the next acknowledgement only."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        chat_id = await self.direct_chat(bob, alice)
        client = await self.connect(alice)
        await client.call("message_delivered", {"messageId": client.events("new_message")[0]
                                                ["message"]["id"], "chatId": chat_id})
        first = await self.send(bob, bob.token, chat_id, "one")
        await self.send(alice, alice.token, chat_id, "mine")
        second = await self.send(bob, bob.token, chat_id, "two")
        for message, expected in ((second, ([(1, 1)], 1, 1)), (first, ([(1, 4)], 0, 2))):
            ack = await client.call("message_delivered", {"messageId": message["messageId"],
                                                          "chatId": chat_id})
            self.assertTrue(ack["success"], ack)
            self.assertEqual(await self.marks(chat_id), expected)


class SQLiteOwnDevicesTests(SQLiteMixin, OwnDevicesMixin, MemoryRealtimeBase, TestCase):
    pass


class PostgresOwnDevicesTests(PostgresMixin, OwnDevicesMixin, MemoryRealtimeBase, TestCase):
    pass


class DevicesAcrossNodesTests(PostgresMixin, ClusterMixin, TestCase):
    """Devices of one user on two nodes of one database."""

    async def test_each_device_gets_each_message_once(self) -> None:
        """With alice's two devices on two nodes, a message bob sends on
        one node reaches each of her devices once, live; both acknowledge
        it, and bob hears of its delivery once."""
        a_node, b_node = await self.cluster(self.migrated_database_setting())
        alice, bob = await self.user(a_node, "alice"), await self.user(a_node, "bob")
        response = await alice.recover(a_node.http, new_fingerprint(), keepOtherDevices=True)
        assert response.code == 200, response.body
        second = response.json()["token"]
        first_device = await self.connect(a_node, alice)
        other = User("alice")
        other.token = second
        second_device = await self.connect(b_node, other)
        sender = await self.connect(a_node, bob)
        ack = await sender.call("send_message", {"recipientId": "alice", "encryptedPayload": {"ct": "X"}})
        self.assertTrue(ack["success"], ack)
        for device in (first_device, second_device):
            [event] = await device.wait_for("new_message")
            self.assertEqual(event["message"]["id"], ack["messageId"])
            answer = await device.call("message_delivered", {"messageId": ack["messageId"],
                                                            "chatId": ack["chatId"]})
            self.assertTrue(answer["success"], answer)
        await sender.wait_for("message_delivered")
        for client in (first_device, second_device, sender):
            await client.barrier()
        self.assertEqual(len(first_device.events("new_message")), 1)
        self.assertEqual(len(second_device.events("new_message")), 1)
        self.assertEqual(len(sender.events("message_delivered")), 1)
