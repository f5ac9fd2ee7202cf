"""
The reference client's devices and linking (issue #13, item 7): a second
profile of one identity linked to the first through a real server (the
library, and cyphr-client in this process), names sealed and read across
devices, removal, a server that substitutes a device key or alters a
sealed seed, a refused fingerprint; and the test vectors of the sealed
seed and of device names (tests/vectors/devices-v2.json).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import unittest
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from kyber_py.ml_kem import ML_KEM_1024
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.client import devicecrypto
from cyphr.client import devices as client_devices
from cyphr.client.client import Client
from cyphr.client.devicecrypto import LinkSeed, LinkSeedError
from cyphr.client.devices import LinkCode, parse_link_code
from cyphr.client.http import ApiError, ClientError
from cyphr.client.profile import Profile
from tests.clients import PASSPHRASE, ServedClients
from tests.helpers import SQLiteMixin, cli_in_process, start_server

VECTORS = json.loads((Path(__file__).parent / "vectors" / "devices-v2.json").read_text("utf-8"))
FAST_POLL = 0.05


class Linking:
    """A new device linking in a thread: ``code`` once it is shown; with
    ``hold``, its first poll waits until ``go`` is set (so a test can act
    between the approval and the receive, however the threads run)."""

    def __init__(self, directory: str, url: str, *, hold: bool = False, **kwargs: Any) -> None:
        self.directory = directory
        self.shown = threading.Event()
        self.go = threading.Event()
        self.codes: list[LinkCode] = []
        if not hold:
            self.go.set()

        def sleep(seconds: float) -> None:
            if not self.go.wait(30):
                raise ClientError("the test never let the link go on")
            threading.Event().wait(seconds)

        kwargs.setdefault("prekeys", 2)
        self.done = deferToThread(Client.link, directory, PASSPHRASE, url, on_code=self._shown,
                                  poll=FAST_POLL, sleep=sleep, timeout=30, **kwargs)

    def _shown(self, code: LinkCode) -> None:
        self.codes.append(code)
        self.shown.set()
        # The first poll follows at once: with hold, not before go.
        if not self.go.wait(30):
            raise ClientError("the test never let the link go on")

    async def code(self) -> LinkCode:
        shown = await deferToThread(self.shown.wait, 30)
        assert shown, "no link code was shown"
        return self.codes[0]


class ClientDevicesTests(SQLiteMixin, ServedClients, TestCase):
    async def setUp(self) -> None:
        await super().setUp()
        self.passphrase_file = Path(self.mktemp())
        self.passphrase_file.write_text(PASSPHRASE)

    def cli(self, profile: str, *args: str, stdin: str = "") -> Any:
        return deferToThread(cli_in_process, ["--server", self.url, "--profile", profile,
                                              "--passphrase-file", str(self.passphrase_file),
                                              *args], stdin=stdin)

    async def linked(self, first: Client, **kwargs: Any) -> tuple[Client, str]:
        """A second device of ``first``'s identity, linked and approved
        through the library."""
        linking = Linking(os.path.abspath(self.mktemp()), self.url, **kwargs)
        code = await linking.code()
        await self.thread(first.approve, code.code)
        second = await linking.done
        self.clients.append(second)
        return second, linking.directory

    async def provisioning(self, provisioning_id: str) -> tuple[Any, ...]:
        [row] = await self.server.database.run_query(
            "SELECT user_id, sealed, received_at FROM device_provisionings WHERE id = ?",
            (provisioning_id,))
        return tuple(row)

    # -- linking --------------------------------------------------------------

    async def test_link_approve_and_list(self) -> None:
        """A profile linked with `cyphr-client devices approve CODE` (the
        fingerprint confirmed) becomes device 2 of the same identity: both
        list the two devices with verified keys and the new one's name, and
        a message the new device sends is read, verified, by the first
        device and by the contact; the new device's own key rotates."""
        alice = await self.registered("alice")
        alice_dir = str(alice.profile.directory)
        bob = await self.registered("bob")
        linking = Linking(os.path.abspath(self.mktemp()), self.url, name="laptop")
        code = await linking.code()
        self.assertEqual(code.code, f"cyphr-link:{code.provisioning_id}:{code.fingerprint}")
        approved = await self.cli(alice_dir, "devices", "approve", code.code, stdin="y\n")
        self.assertEqual(approved.returncode, 0, approved.stderr)
        spaced = " ".join(code.fingerprint[i:i + 4] for i in range(0, 16, 4))
        self.assertIn(f"Does the new device show {spaced}? [y/N]", approved.stderr)
        self.assertIn("device 2 of alice", approved.stdout)
        laptop = await linking.done
        self.clients.append(laptop)
        self.assertEqual((laptop.cyphr_id, laptop.profile.settings["deviceId"]), ("alice", 2))
        self.assertEqual(laptop.identity.public_key, alice.identity.public_key)

        for client, current in ((alice, 1), (laptop, 2)):
            devices = await self.thread(client.devices)
            self.assertEqual([(d.device_id, d.verified, d.current) for d in devices],
                             [(1, True, current == 1), (2, True, current == 2)])
            self.assertEqual([d.name for d in devices], [None, "laptop"])
            self.assertEqual([d.key_version for d in devices], [2, 3])
        self.assertEqual([d.device_id for d in await self.thread(bob.devices_of, "alice")], [1, 2])

        sent = await self.thread(laptop.send, "bob", "from the laptop")
        for reader in (alice, bob):
            [message] = await self.thread(reader.history, sent["chatId"])
            self.assertEqual((message.text, message.verified, message.sender),
                             ("from the laptop", True, "alice"))
        await self.thread(laptop.login)  # renews its own device key, never the main key
        self.assertEqual(await self.thread(laptop.rotate_kyber), 1)
        [_, mine] = await self.thread(bob.devices_of, "alice")
        self.assertEqual((mine.key_id, mine.verified), (1, True))

    async def test_link_with_the_command(self) -> None:
        """`cyphr-client link` shows the code (its provisioning and the
        fingerprint of the key the server holds for it), a QR code and the
        fingerprint, waits for the approval and says which identity and
        device it joined; the new profile then works as any (whoami)."""
        alice = await self.registered("alice")
        new_dir = os.path.abspath(self.mktemp())
        # The command asks whether it was approved every POLL_SECONDS (2 s):
        # the test would wait most of that after approving.
        self.patch(client_devices, "POLL_SECONDS", FAST_POLL)
        linking = self.cli(new_dir, "link", "--name", "phone", "--prekeys", "2")
        rows: list[Any] = []
        while not rows:
            await deferLater(reactor, 0.05, lambda: None)
            rows = await self.server.database.run_query(
                "SELECT id, ephemeral_key FROM device_provisionings")
        [(provisioning_id, key)] = rows
        fingerprint = devicecrypto.link_fingerprint(bytes(key))
        code = f"cyphr-link:{provisioning_id}:{fingerprint}"
        await self.thread(alice.approve, code)
        result = await linking
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"cyphr-client devices approve {code}", result.stdout)
        self.assertIn("▀", result.stdout)  # the QR code, drawn with half blocks
        self.assertIn(" ".join(fingerprint[i:i + 4] for i in range(0, 16, 4)), result.stdout)
        self.assertIn("this is device 2 of alice", result.stdout)
        whoami = await self.cli(new_dir, "--json", "whoami")
        self.assertEqual(json.loads(whoami.stdout)["cyphrId"], "alice", whoami.stderr)
        names = [d.name for d in await self.thread(alice.devices)]
        self.assertEqual(names, [None, "phone"])

    # -- renaming and removing ------------------------------------------------------

    async def test_rename_then_remove(self) -> None:
        """A device renamed from the other shows the new name there, and a
        name cleared is gone; once removed, its list is one device, and the removed profile's next
        call fails saying the device is no longer the account's."""
        alice = await self.registered("alice")
        alice_dir = str(alice.profile.directory)
        laptop, laptop_dir = await self.linked(alice)
        renamed = await self.cli(alice_dir, "devices", "rename", "2", "Work laptop")
        self.assertEqual(renamed.returncode, 0, renamed.stderr)
        listed = await self.cli(laptop_dir, "--json", "devices", "list")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        shown = json.loads(listed.stdout)["devices"]
        self.assertEqual([(d["deviceId"], d["name"], d["current"]) for d in shown],
                         [(1, None, False), (2, "Work laptop", True)])
        await self.thread(laptop.rename_device, 2, None)
        self.assertEqual([d.name for d in await self.thread(alice.devices)], [None, None])

        removed = await self.cli(alice_dir, "devices", "remove", "2")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertEqual([d.device_id for d in await self.thread(alice.devices)], [1])
        with self.assertRaises(ApiError) as caught:
            await self.thread(laptop.devices)
        self.assertEqual(caught.exception.code, "DEVICE_MISMATCH")
        refused = await self.cli(laptop_dir, "devices", "list")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("no longer) one of the account's devices", refused.stderr)

    # -- what a malicious server might do ----------------------------------------------

    async def test_server_keeps_no_device_secret(self) -> None:
        """After a device is linked (held between approval and receipt, so
        the sealed seed sits on the server a while), named, and used to
        send, nothing the server keeps (every column of every table, every
        file of its data directory) holds the seed, a device's private key
        seed, a device name in the clear, or a raw device fingerprint."""
        alice = await self.registered("alice")
        await self.registered("bob")
        linking = Linking(os.path.abspath(self.mktemp()), self.url, hold=True)
        code = await linking.code()
        await self.thread(alice.approve, code.code)
        sealed_rows = await self.server.database.run_query(
            "SELECT sealed FROM device_provisionings WHERE sealed IS NOT NULL")
        self.assertEqual(len(sealed_rows), 1)  # the scan below would see it, were it kept
        linking.go.set()
        laptop = await linking.done
        self.clients.append(laptop)
        name = "Alice's work laptop 7f3e"
        await self.thread(laptop.rename_device, 2, name)
        await self.thread(laptop.send, "bob", "a line from the laptop")
        needles = {
            "seed": base64.b64decode(alice.profile.vault["seed"]),
            "device key seed": base64.b64decode(laptop.profile.vault["deviceKey"]["seed"]),
            "device name": name.encode("utf-8"),
            "fingerprint 1": alice.profile.vault["fingerprint"].encode("ascii"),
            "fingerprint 2": laptop.profile.vault["fingerprint"].encode("ascii"),
        }
        database = self.server.database
        tables = [row[0] for row in await database.run_query(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        self.assertIn("device_provisionings", tables)
        held = []
        for table in tables:
            for row in await database.run_query(f'SELECT * FROM "{table}"'):
                held += [bytes(v) if isinstance(v, (bytes, memoryview)) else str(v).encode()
                         for v in row if v is not None]
        for path in Path(self.server.data_dir).rglob("*"):
            if path.is_file() and not path.name.startswith("cyphr.sqlite3"):
                held.append(path.read_bytes())
        everything = b"\n".join(held)
        for label, needle in needles.items():
            for form in (needle, base64.b64encode(needle)):
                self.assertNotIn(form, everything, label)
        # A control: what the server is meant to hold is there.
        self.assertIn(alice.identity.public_key, everything)

    async def test_substituted_device_key_is_caught(self) -> None:
        """A server that puts a key of its own in place of device 2's (the
        signature no longer covers it) has that device reported refused,
        never verified, to a contact and to the identity's own devices; the
        other device stays verified."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        bob_dir = str(bob.profile.directory)
        await self.linked(alice)
        self.assertTrue(all(d.verified for d in await self.thread(bob.devices_of, "alice")))
        ghost = MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()
        await self.server.database.run_operation(
            "UPDATE devices SET kyber_public_key = ? WHERE device_id = 2 AND user_id ="
            " (SELECT id FROM cyphr_identities WHERE cyphr_id = 'alice')", (ghost,))
        for devices in (await self.thread(bob.devices_of, "alice"), await self.thread(alice.devices)):
            self.assertEqual([(d.device_id, d.verified) for d in devices], [(1, True), (2, False)])
            self.assertIn("not signed by alice's identity key as the key of device 2",
                          devices[1].problem)
            self.assertIsNone(devices[1].kyber_public_key)
        listed = await self.cli(bob_dir, "devices", "list", "alice")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertIn("device 2: ", listed.stdout)
        self.assertIn("REFUSED", listed.stdout)
        self.assertIn("never sealed to: 2", listed.stderr)

    async def test_tampered_sealed_seed_does_not_open(self) -> None:
        """A sealed seed altered on the server (one byte flipped before the
        new device receives it) does not open: linking fails with a clear
        error and leaves no profile behind."""
        alice = await self.registered("alice")
        linking = Linking(os.path.abspath(self.mktemp()), self.url, hold=True)
        code = await linking.code()
        await self.thread(alice.approve, code.code)
        _, sealed, _ = await self.provisioning(code.provisioning_id)
        tampered = bytearray(sealed)
        tampered[-5] ^= 0x01
        await self.server.database.run_operation(
            "UPDATE device_provisionings SET sealed = ? WHERE id = ?",
            (bytes(tampered), code.provisioning_id))
        linking.go.set()
        with self.assertRaises(LinkSeedError) as caught:
            await linking.done
        self.assertIn("the sealed seed does not open", str(caught.exception))
        self.assertFalse(Profile.exists(linking.directory))

    async def test_wrong_fingerprint_aborts_the_approval(self) -> None:
        """`devices approve` answered "n" to the fingerprint question, or
        given a code whose fingerprint is not that of the key the server
        holds, sends nothing: the provisioning stays unapproved, and a
        later confirmed approval still links the device."""
        alice = await self.registered("alice")
        alice_dir = str(alice.profile.directory)
        linking = Linking(os.path.abspath(self.mktemp()), self.url, hold=True)
        code = await linking.code()
        declined = await self.cli(alice_dir, "devices", "approve", code.code, stdin="n\n")
        self.assertEqual(declined.returncode, 1)
        self.assertIn("not approved", declined.stderr)
        other = f"cyphr-link:{code.provisioning_id}:{'0' * 16}"
        mismatched = await self.cli(alice_dir, "devices", "approve", other, "--yes")
        self.assertEqual(mismatched.returncode, 1)
        self.assertIn("another key for this link than the new device's", mismatched.stderr)
        self.assertEqual(await self.provisioning(code.provisioning_id), (None, None, None))
        approved = await self.cli(alice_dir, "devices", "approve", code.code, "--yes")
        self.assertEqual(approved.returncode, 0, approved.stderr)
        linking.go.set()
        second = await linking.done
        self.clients.append(second)
        self.assertEqual(second.cyphr_id, "alice")


class _Stop(Exception):
    pass


class RateLimitedLinkTests(SQLiteMixin, TestCase):
    async def test_polls_wait_as_a_429_asks(self) -> None:
        """When its polls reach the per-address limit, a new device waits
        the Retry-After seconds of the 429, not its usual poll interval;
        nothing is made on disk while it waits."""
        server = await start_server(self, serve=True, rate_limit_link_poll=(2, 600))
        [port] = [await d for d in server.listening()]
        waits: list[float] = []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 3:
                raise _Stop()

        directory = os.path.abspath(self.mktemp())
        with self.assertRaises(_Stop):
            await deferToThread(Client.link, directory, PASSPHRASE,
                                f"http://127.0.0.1:{port.getHost().port}", on_code=lambda c: None,
                                poll=FAST_POLL, sleep=sleep, timeout=3600)
        # Two polls are allowed; the third is 429.
        self.assertEqual(waits[:2], [FAST_POLL, FAST_POLL])
        self.assertGreater(waits[2], 2)
        self.assertLessEqual(waits[2], 600)
        self.assertFalse(Profile.exists(directory))


class LinkCodeTests(unittest.TestCase):
    def test_codes(self) -> None:
        """A link code gives its provisioning id and fingerprint (none when
        left out); anything else is refused."""
        pid = "1c9f0a52-7d1e-4b8a-9f3c-2e5d6a7b8c9d"
        self.assertEqual(parse_link_code(f" cyphr-link:{pid}:00112233aabbccdd\n"),
                         (pid, "00112233aabbccdd"))
        self.assertEqual(parse_link_code(f"cyphr-link:{pid}"), (pid, None))
        for bad in (pid, f"cyphr-link:{pid}:0011", "cyphr-link:x:00112233aabbccdd", ""):
            with self.assertRaises(ClientError):
                parse_link_code(bad)


def _bytes(vector: dict[str, Any], name: str) -> bytes:
    return bytes.fromhex(vector[name])


class DeviceVectorTests(unittest.TestCase):
    """tests/vectors/devices-v2.json, rebuilt byte for byte."""

    def test_sealed_seed(self) -> None:
        """The sealed seed is rebuilt exactly from the vector's inputs (the
        encapsulation from its fixed message), and opens with the fixed
        ephemeral keys to the vector's content; for another Cyphr ID or
        provisioning it does not open."""
        vector = VECTORS["linkSeed"]
        inputs = vector["inputs"]
        x25519 = X25519PrivateKey.from_private_bytes(bytes.fromhex(inputs["ephemeralX25519Private"]))
        mlkem = MLKEM1024PrivateKey.from_seed_bytes(bytes.fromhex(inputs["ephemeralMlKemSeed"]))
        ephemeral_key = x25519.public_key().public_bytes_raw() + mlkem.public_key().public_bytes_raw()
        self.assertEqual(ephemeral_key, _bytes(vector, "ephemeralKey"))
        self.assertEqual(devicecrypto.link_fingerprint(ephemeral_key), vector["linkFingerprint"])
        kem_secret, kyber_ciphertext = ML_KEM_1024._encaps_internal(
            ephemeral_key[32:], bytes.fromhex(inputs["encapsulationM"]))
        self.assertEqual((kem_secret, kyber_ciphertext),
                         (_bytes(vector, "kemSecret"), _bytes(vector, "kyberCiphertext")))
        content = LinkSeed(bytes.fromhex(inputs["identitySeed"]), inputs["generation"],
                           {c: bytes.fromhex(k) for c, k in inputs["groupKeys"].items()})
        self.assertEqual(content.encode(), _bytes(vector, "plaintext"))
        approver = X25519PrivateKey.from_private_bytes(bytes.fromhex(inputs["approverX25519Private"]))
        header = devicecrypto.link_seed_header(inputs["provisioningId"], inputs["cyphrId"],
                                               ephemeral_key, _bytes(vector, "approverKey"),
                                               kyber_ciphertext)
        self.assertEqual(header, _bytes(vector, "header"))
        self.assertEqual(devicecrypto.link_seed_key(kem_secret, _bytes(vector, "dhSecret"), header),
                         _bytes(vector, "key"))
        sealed = devicecrypto.seal_link_seed_with(
            content, ephemeral_key, inputs["provisioningId"], inputs["cyphrId"],
            approver=approver, kem_secret=kem_secret, kyber_ciphertext=kyber_ciphertext,
            nonce=bytes.fromhex(inputs["nonce"]))
        self.assertEqual(sealed, _bytes(vector, "sealed"))
        opened = devicecrypto.open_link_seed(sealed, x25519, mlkem, inputs["provisioningId"],
                                             inputs["cyphrId"])
        self.assertEqual(opened, content)
        for provisioning_id, cyphr_id in ((inputs["provisioningId"], "mallory"),
                                          ("00000000-0000-4000-8000-000000000000",
                                           inputs["cyphrId"])):
            with self.assertRaises(LinkSeedError):
                devicecrypto.open_link_seed(sealed, x25519, mlkem, provisioning_id, cyphr_id)

    def test_device_name(self) -> None:
        """The sealed device name is rebuilt exactly, opens to the name, and
        does not open as another device's."""
        vector = VECTORS["deviceName"]
        inputs = vector["inputs"]
        seed = bytes.fromhex(inputs["identitySeed"])
        self.assertEqual(devicecrypto.device_name_key(seed), _bytes(vector, "key"))
        self.assertEqual(devicecrypto.device_name_aad(inputs["cyphrId"], inputs["deviceId"]),
                         _bytes(vector, "aad"))
        sealed = devicecrypto.seal_device_name_with(seed, inputs["cyphrId"], inputs["deviceId"],
                                                    inputs["name"], bytes.fromhex(inputs["nonce"]))
        self.assertEqual(sealed, _bytes(vector, "sealed"))
        self.assertEqual(len(sealed), 296)
        self.assertEqual(devicecrypto.open_device_name(seed, inputs["cyphrId"], inputs["deviceId"],
                                                       sealed), inputs["name"])
        with self.assertRaises(devicecrypto.CryptoError):
            devicecrypto.open_device_name(seed, inputs["cyphrId"], inputs["deviceId"] + 1, sealed)

    def test_the_file_is_current(self) -> None:
        """tools/make_vectors.py would write exactly the shipped file."""
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
        try:
            import make_vectors
        finally:
            sys.path.pop(0)
        self.assertEqual(make_vectors.build_devices(), VECTORS)
