"""
The reference client's session keys (issue #22): it publishes its device's
keys (secrets saved first), rotates and tops them up when due, claims a
contact's bundles and checks them against the pinned identity key, and the
sessions started from them open on the contact's device from its vault;
a key the server substitutes is refused; `cyphr-client keys sessions`. A
real server over a real port, on both engines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.client import sessionkeys, sessions
from cyphr.client.http import ClientError
from tests.clients import PASSPHRASE, ServedClients
from tests.helpers import PostgresMixin, SQLiteMixin, cli_in_process

class ClientSessionKeysMixin(ServedClients):
    async def test_publish_claim_and_open(self) -> None:
        """Alice publishes; the stock is full and every private key is in
        her vault. Bob claims her bundle (checked against her pinned key),
        starts a session and sends; alice's client finds the handshake's
        keys in her vault, opens the message, and erases the one-time
        prekeys it used: the same handshake again finds none."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        stock = await self.thread(alice.publish_session_keys)
        self.assertEqual((stock["identityDh"], stock["oneTimePrekeys"],
                          stock["kemOneTimePrekeys"]), (True, 100, 100))
        vault = alice.profile.vault["sessionKeys"]
        self.assertEqual([len(vault[slot]) for slot in
                          ("signed", "lastResort", "oneTime", "kemOneTime")], [1, 1, 100, 100])
        # Nothing is due now: nothing more is uploaded.
        again = await self.thread(alice.publish_session_keys)
        self.assertEqual(again["signedPrekey"], stock["signedPrekey"])
        [bundle], refused = await self.thread(bob.session_bundles, "alice")
        self.assertEqual((refused, bundle.device_id), ([], 1))
        now = bob._now()
        session, handshake = sessions.initiate(bob.session_me(), bundle,
                                               alice.identity.public_key, now)
        first = session.encrypt(b"hello over a session", now)
        secrets = await self.thread(alice.session_secrets, handshake)
        theirs = sessions.respond(alice.session_me(), handshake, bob.identity.public_key,
                                  secrets, now)
        self.assertEqual(theirs.decrypt(first, now), b"hello over a session")
        await self.thread(alice.erase_one_time_session_prekeys, handshake)
        replayed = await self.thread(alice.session_secrets, handshake)
        with self.assertRaises(sessions.SessionError):
            sessions.respond(alice.session_me(), handshake, bob.identity.public_key, replayed,
                             now)
        stock = await self.thread(alice._call, "GET", "/api/sessions/keys")
        self.assertEqual((stock["oneTimePrekeys"], stock["kemOneTimePrekeys"]), (99, 99))

    async def test_rotation_and_top_up(self) -> None:
        """A signed prekey older than 7 days is replaced (the one before it
        kept for handshakes on their way, none older); one-time prekeys
        below 20 are topped back up to 100, or at once when asked."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        first = await self.thread(alice.publish_session_keys)

        async def age_signed_prekey() -> None:
            # As if it had been made 8 days ago (the stock says when).
            await self.server.database.run_operation(
                "UPDATE session_prekeys SET key_created_at = key_created_at - ? WHERE kind = 1",
                (8 * sessionkeys.DAY_MS,))

        await age_signed_prekey()
        second = await self.thread(alice.publish_session_keys)
        self.assertNotEqual(second["signedPrekey"]["keyId"], first["signedPrekey"]["keyId"])
        self.assertEqual(second["lastResortPrekey"], first["lastResortPrekey"])
        await age_signed_prekey()
        third = await self.thread(alice.publish_session_keys)
        kept = sorted(int(k) for k in alice.profile.vault["sessionKeys"]["signed"])
        self.assertEqual(kept, [second["signedPrekey"]["keyId"], third["signedPrekey"]["keyId"]])
        for _ in range(3):
            await self.thread(bob.session_bundles, "alice")
        forced = await self.thread(alice.publish_session_keys, force_one_time=True)
        self.assertEqual((forced["oneTimePrekeys"], forced["kemOneTimePrekeys"]), (100, 100))

    async def test_a_listening_device_tops_up_when_told(self) -> None:
        """Alice's device listens; bob's claims leave it with fewer than 10
        one-time prekeys: the server tells her sockets, and her listener
        publishes more, back to the target, by itself."""
        self.patch(sessionkeys, "ONE_TIME_TARGET", 12)
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        await self.thread(alice.publish_session_keys)
        heard: list[Any] = []
        listener = await self.thread(lambda: alice.listener(
            lambda m: None, on_event=lambda name, data: heard.append((name, data))).start())
        self.addCleanup(deferToThread, listener.stop)
        for _ in range(3):
            await self.thread(bob.session_bundles, "alice")

        def stock() -> dict[str, Any]:
            return alice._call("GET", "/api/sessions/keys")

        for _ in range(200):  # ten seconds at most
            if (await self.thread(stock))["oneTimePrekeys"] == 12:
                break
            await self.thread(time.sleep, 0.05)
        self.assertEqual((await self.thread(stock))["kemOneTimePrekeys"], 12)
        self.assertIn(("session_prekeys_low",
                       {"deviceId": 1, "oneTimePrekeys": 9, "kemOneTimePrekeys": 9}), heard)

    async def test_a_substituted_key_is_refused(self) -> None:
        """The server puts a signed prekey of its own in alice's place: bob's
        client refuses that device's bundle and says why; it never starts a
        session with it."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        await self.thread(alice.publish_session_keys)
        ghost = X25519PrivateKey.generate().public_key().public_bytes_raw()
        await self.server.database.run_operation(
            "UPDATE session_prekeys SET public_key = ? WHERE kind = 1", (ghost,))
        good, refused = await self.thread(bob.session_bundles, "alice")
        self.assertEqual(good, [])
        [(device_id, why)] = refused
        self.assertEqual(device_id, 1)
        self.assertIn("is not signed by alice's identity key", why)

    async def test_another_identity_key_is_refused(self) -> None:
        """A bundle answered under another identity key than the one bob
        pinned for alice is refused whole."""
        alice = await self.registered("alice")
        bob = await self.registered("bob")
        await self.thread(alice.publish_session_keys)
        await self.thread(bob.contact, "alice")  # pinned
        real = bob._call

        def swapped(method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
            answer = real(method, path, body, **kwargs)
            if path.startswith("/api/sessions/bundles/"):
                answer["identityKey"] = "A" * 43 + "="
            return answer

        self.patch(bob, "_call", swapped)
        with self.assertRaises(ClientError) as caught:
            await self.thread(bob.session_bundles, "alice")
        self.assertIn("another identity key", str(caught.exception))

    async def test_the_command(self) -> None:
        """`cyphr-client keys sessions` publishes and shows the stock."""
        directory = str((await self.registered("alice")).profile.directory)
        passphrase = Path(self.mktemp())
        passphrase.write_text(PASSPHRASE)
        result = await deferToThread(cli_in_process, [
            "--server", self.url, "--profile", directory, "--passphrase-file", str(passphrase),
            "--json", "keys", "sessions"])
        self.assertEqual(result.returncode, 0, result.stderr)
        shown = json.loads(result.stdout)
        self.assertEqual((shown["deviceId"], shown["oneTimePrekeys"], shown["identityDh"]),
                         (1, 100, True))


class SQLiteClientSessionKeysTests(SQLiteMixin, ClientSessionKeysMixin, TestCase):
    pass


class PostgresClientSessionKeysTests(PostgresMixin, ClientSessionKeysMixin, TestCase):
    pass
