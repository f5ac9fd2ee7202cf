"""
Trust that holds, in the client library, against the in-memory server of
tests.test_client_keys: safety numbers accepted only as compared
(compare-and-swap), a changed identity key as a hard block, the encrypted
pin backup and its restoration at recovery, and no silent re-signing
(automatic logins are few, logged, and never a recovery or a deletion).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cyphr.client import crypto
from cyphr.client.client import AUTO_LOGIN_LIMIT, Client, IdentityChanged
from cyphr.client.crypto import Identity, b64, new_phrase
from cyphr.client.http import ApiError, ClientError
from cyphr.client.realtime import Listener
from tests.test_client_keys import STRONG, URL, FakeServerMixin


class SafetyNumberTests(FakeServerMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.alice = self.new_client("alice")
        self.bob = self.server.add_user("bob")
        self.number = self.alice.contact("bob").safety_number

    def pins(self) -> dict[str, Any]:
        return dict(self.alice.profile.vault["pins"])

    def test_accepting_the_compared_number(self) -> None:
        """The number compared (spaces or none) pins the key as verified."""
        contact = self.alice.accept_identity("bob", self.number.replace(" ", ""))
        self.assertTrue(contact.verified)
        self.assertEqual(self.pins()["bob"]["identityKey"], b64(self.bob.public_key))
        self.assertTrue(self.pins()["bob"]["verified"])

    def test_a_wrong_number_changes_nothing(self) -> None:
        """Another number (one digit off) is refused and the pin stays as it
        was: not verified."""
        before = self.pins()
        wrong = ("1" if self.number[0] != "1" else "2") + self.number[1:]
        with self.assertRaises(ClientError) as raised:
            self.alice.accept_identity("bob", wrong)
        self.assertIn("does not match", str(raised.exception))
        self.assertEqual(self.pins(), before)
        self.assertFalse(self.pins()["bob"]["verified"])
        self.assertRaises(ClientError, self.alice.accept_identity, "bob", "12345")

    def test_a_key_swapped_before_accepting(self) -> None:
        """The server swaps bob's key after alice compared the number: the
        number she types is that of the old key, so the new key is not
        pinned (the v1 client pinned whatever it was shown then)."""
        mallory = Identity.from_phrase(new_phrase())
        self.server.add_user("bob", mallory)
        before = self.pins()
        with self.assertRaises(ClientError) as raised:
            self.alice.accept_identity("bob", self.number)
        self.assertIn("does not match", str(raised.exception))
        self.assertEqual(self.pins(), before)
        # The swap is a hard block, naming both numbers.
        with self.assertRaises(IdentityChanged) as changed:
            self.alice.contact("bob")
        new_number = self.alice.safety_number_with("bob", mallory.public_key)
        self.assertEqual((changed.exception.pinned_safety_number, changed.exception.safety_number),
                         (self.number, new_number))
        text = str(changed.exception)
        self.assertIn(self.number, text)
        self.assertIn(new_number, text)
        self.assertIn("--accept NUMBER", text)
        self.assertNotRegex(text, r"--accept`")
        self.assertRaises(IdentityChanged, self.alice.sealed, "bob", b"hi")
        # Accepting the new key takes its own number, compared.
        self.assertTrue(self.alice.accept_identity("bob", new_number).verified)
        self.assertEqual(self.pins()["bob"]["identityKey"], b64(mallory.public_key))

    def test_contact_verified_in_messages(self) -> None:
        """A message's contact_verified is the sender's pin's verified flag
        (True for one's own)."""
        bob = self.new_client("bob2")
        self.alice.contact("bob2")
        sealed = bob.sealed("alice", b"hello")  # a first direct message: no chat id yet
        message = {"id": "m1", "chatId": "c1", "seq": 1, "senderId": "bob2",
                   "timestamp": "2027-01-15T08:00:00.000Z", "messageType": "text",
                   "clientMessageId": sealed["clientMessageId"],
                   "encryptedPayload": sealed["encryptedPayload"]}
        self.alice._chat_cache["c1"] = {"chatId": "c1", "chatType": "direct",
                                        "participants": ["alice", "bob2"]}
        opened = self.alice.open_message(message)
        self.assertEqual((opened.text, opened.verified, opened.contact_verified),
                         ("hello", True, False))
        self.alice.accept_identity("bob2", self.alice.contact("bob2").safety_number)
        opened = self.alice.open_message(message)
        self.assertEqual((opened.verified, opened.contact_verified), (True, True))
        self.assertTrue(opened.as_json()["contactVerified"])


class PinBackupTests(FakeServerMixin, SynchronousTestCase):
    def test_uploaded_after_each_pin_change(self) -> None:
        """A first pin, a newer main key and a verification each upload the
        sealed pins; the blob opens with the identity's seed only."""
        alice = self.new_client("alice")
        bob = self.server.add_user("bob")
        alice.contact("bob")
        self.assertEqual(len(self.server.paths("/api/cyphr-id/pin-backup")), 1)
        alice.contact("bob")  # nothing changed: no upload
        self.assertEqual(len(self.server.paths("/api/cyphr-id/pin-backup")), 1)
        self.server.accounts["bob"].main = Identity(bob.seed, 1).main_key_form(
            "bob", self.clock.ms())
        alice.contact("bob")
        alice.accept_identity("bob", alice.contact("bob").safety_number)
        self.assertEqual(len(self.server.paths("/api/cyphr-id/pin-backup")), 3)
        blob = base64.b64decode(self.server.pin_backups["alice"])
        backup = crypto.open_pin_backup(alice.identity.seed, "alice", blob)
        self.assertEqual(backup["pins"]["bob"], {"identityKey": b64(bob.public_key),
                                                 "verified": True, "highestKeyId": 1,
                                                 "mainKey": alice.profile.vault["pins"]["bob"]["mainKey"]})
        self.assertEqual(backup["counter"], 3)
        self.assertRaises(crypto.CryptoError, crypto.open_pin_backup,
                          Identity.from_phrase(new_phrase()).seed, "alice", blob)

    def test_a_failed_upload_is_logged_not_raised(self) -> None:
        """When the pin backup cannot be uploaded, the client logs a warning
        and keeps the pin; the call that pinned the contact succeeds."""
        alice = self.new_client("alice")
        self.server.add_user("bob")

        def refuse(method: str, path: str, body: Any, answer: Any) -> Any:
            if path == "/api/cyphr-id/pin-backup":
                raise ApiError(503, "UNAVAILABLE", "later")
            return None
        self.server.lie = refuse
        with self.assertLogs("cyphr.client.client", logging.WARNING) as logged:
            alice.contact("bob")
        self.assertIn("Could not back up", logged.output[0])
        self.assertIn("bob", alice.profile.vault["pins"])

    def test_restored_at_recovery(self) -> None:
        """Recovering on a new device brings back the pins (verified and
        key ids included) before anything else is pinned: a key swapped in
        at recovery time is caught."""
        phrase = new_phrase()
        alice, _ = Client.init(self.mktemp(), STRONG, URL, phrase, clock=self.clock)
        self.addCleanup(alice.close)
        alice.register("alice", prekeys=2)
        bob = self.server.add_user("bob")
        carol = self.server.add_user("carol")
        alice.accept_identity("bob", alice.contact("bob").safety_number)
        self.server.accounts["carol"].main = Identity(carol.seed, 3).main_key_form(
            "carol", self.clock.ms())
        alice.contact("carol")
        # The server swaps bob's key just as alice recovers.
        self.server.add_user("bob", Identity.from_phrase(new_phrase()))
        moved = Client.recover(self.mktemp(), STRONG, URL, phrase, "alice", prekeys=2,
                               clock=self.clock)
        self.addCleanup(moved.close)
        self.assertEqual((moved.restored_pins, moved.pin_backup_error), (2, None))
        pins = moved.profile.vault["pins"]
        self.assertEqual((pins["bob"]["identityKey"], pins["bob"]["verified"]),
                         (b64(bob.public_key), True))
        self.assertEqual(pins["carol"]["highestKeyId"], 3)
        self.assertRaises(IdentityChanged, moved.contact, "bob")
        # The restore came before the first pin, right after the session.
        paths = [p for _, p, _ in self.server.requests]
        recovered = paths.index("/api/cyphr-id/recover")
        self.assertEqual(paths[recovered + 1], "/api/cyphr-id/pin-backup")

    def test_recovery_without_or_with_a_bad_backup(self) -> None:
        """No backup: nothing restored. A blob that does not open: nothing
        restored, the reason kept and logged; recovery still completes."""
        phrase = new_phrase()
        alice, _ = Client.init(self.mktemp(), STRONG, URL, phrase, clock=self.clock)
        self.addCleanup(alice.close)
        alice.register("alice", prekeys=0)
        moved = Client.recover(self.mktemp(), STRONG, URL, phrase, "alice", prekeys=0,
                               clock=self.clock)
        self.addCleanup(moved.close)
        self.assertEqual((moved.restored_pins, moved.pin_backup_error), (0, None))
        self.server.pin_backups["alice"] = b64(b"\x00" * 80)
        with self.assertLogs("cyphr.client.client", logging.WARNING):
            again = Client.recover(self.mktemp(), STRONG, URL, phrase, "alice", prekeys=0,
                                   clock=self.clock)
        self.addCleanup(again.close)
        self.assertIn("does not open", again.pin_backup_error)
        self.assertEqual(again.profile.vault["pins"], {})


class AutomaticLoginTests(FakeServerMixin, SynchronousTestCase):
    def test_at_most_three_an_hour(self) -> None:
        """A server answering 401 again and again gets three automatic
        logins an hour, each logged (with the origin, never the token); then
        the client refuses and tells the user to log in."""
        alice = self.new_client("alice")
        self.server.expire = True
        with self.assertLogs("cyphr.client.client", logging.WARNING) as logged:
            for _ in range(AUTO_LOGIN_LIMIT):
                self.assertRaises(ApiError, alice.whoami)
        self.assertEqual(len(self.server.paths("/api/cyphr-id/login")), AUTO_LOGIN_LIMIT)
        for line in logged.output:
            self.assertIn("http://127.0.0.1:4000", line)
            self.assertNotIn("token-", line)
        with self.assertRaises(ClientError) as raised:
            alice.whoami()
        self.assertIn("cyphr-client login", str(raised.exception))
        self.assertEqual(len(self.server.paths("/api/cyphr-id/login")), AUTO_LOGIN_LIMIT)
        # The limit holds for the profile (a new process), and for realtime.
        again = Client.open(alice.profile.directory, STRONG, clock=self.clock)
        self.addCleanup(again.close)
        again.http.token = None
        self.assertRaises(ClientError, again.whoami)
        listener = Listener(again, lambda message: None)
        self.assertRaises(ClientError, listener.start)
        self.assertEqual(len(self.server.paths("/api/cyphr-id/login")), AUTO_LOGIN_LIMIT)
        # A login the user asks for works; an hour later, automatic ones too.
        self.server.expire = False
        alice.login()
        self.clock.advance(1 / 24 + 1 / 86400)
        self.server.expire = True
        self.assertRaises(ApiError, alice.whoami)
        self.assertEqual(len(self.server.paths("/api/cyphr-id/login")), AUTO_LOGIN_LIMIT + 2)

    def test_deletion_is_never_repeated(self) -> None:
        """A 401 on the deletion itself is not answered by signing in and
        deleting again; nothing ever recovers on its own."""
        alice = self.new_client("alice")
        original = self.server.answer

        def answer(method: str, path: str, body: Any, caller: Any) -> Any:
            if method == "DELETE":
                raise ApiError(401, "TOKEN_EXPIRED", "The session has expired")
            return original(method, path, body, caller)
        self.server.answer = answer  # type: ignore[method-assign]
        self.assertRaises(ApiError, alice.delete_account)
        self.assertEqual(len(self.server.paths("/api/cyphr-id/account")), 1)
        self.assertEqual(self.server.paths("/api/cyphr-id/login"), [])
        self.assertEqual(self.server.paths("/api/cyphr-id/recover"), [])
