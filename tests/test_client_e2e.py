"""
The reference client against a real server over a real port: people
chatting end to end, groups, the offline catch-up, recovery on a new device,
the command line, and the zero-knowledge scan of everything the server
keeps.

The client library is blocking (requests and the threaded python-socketio
client); the tests run it in threads while the server runs on the reactor.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from cyphr.client import ApiError, Client, ClientError, IdentityChanged, Message
from cyphr.client.crypto import Identity, b64, new_phrase
from cyphr.logs import event_as_json
from tests.helpers import CLIENT, PostgresMixin, SQLiteMixin, start_server
from tests.realtime import sessions_closed, sleep

ROOT = Path(__file__).resolve().parent.parent


def marker(label: str) -> str:
    """A message text that cannot occur by chance."""
    return f"zk-marker-{label}-{uuid.uuid4().hex}"


class Secrets:
    """Everything that must never reach the server, gathered as the
    scenarios run."""

    def __init__(self) -> None:
        self.texts: list[str] = []  # plaintexts, passphrases, phrases, fingerprints
        self.raw: list[bytes] = []  # key and seed bytes
        self.public: list[bytes] = []  # what the server must hold (a control)

    def client(self, client: Client, passphrase: str, phrase: str) -> None:
        identity = client.identity
        self.texts += [passphrase, phrase, client.profile.vault["fingerprint"]]
        self.raw += [identity.seed, bytes(identity.signing_key),
                     identity.kem_key.private_bytes_raw(),
                     identity._x25519.private_bytes_raw()]
        self.public += [identity.public_key]

    def vault(self, client: Client) -> None:
        """The secrets the client holds now: prekeys and content keys."""
        with client.profile.lock:
            vault = client.profile.vault
            self.raw += [base64.b64decode(v) for v in vault.get("prekeys", {}).values()]
            self.raw += [base64.b64decode(v) for v in vault.get("contentKeys", {}).values()]
            self.raw += [base64.b64decode(v) for v in vault.get("groupKeys", {}).values()]
            session_keys = vault.get("sessionKeys", {})
            for slot in ("signed", "lastResort", "oneTime", "kemOneTime"):
                self.raw += [base64.b64decode(v) for v in session_keys.get(slot, {}).values()]
            if vault.get("token"):
                self.texts.append(vault["token"])
        self.raw += [client.identity.kem_key.private_bytes_raw()]
        # The sessions' secrets, from the local store.
        for record in client.store.items("sessions").values():
            for state in (record["state"], (record.get("previous") or {}).get("state")):
                if state is not None:
                    self.raw += [bytes.fromhex(state[name]) for name in
                                 ("rootKey", "dhPrivate", "sendChain", "receiveChain", "kemSeed")
                                 if state.get(name)]

    def needles(self) -> list[tuple[str, bytes]]:
        found = []
        for text in self.texts:
            found.append((f"text {text[:12]}...", text.encode("utf-8")))
        for raw in self.raw:
            label = f"bytes {raw[:6].hex()}..."
            found += [(label, raw), (label + " (hex)", raw.hex().encode()),
                      (label + " (base64)", b64(raw).encode())]
        return found


_BASE64 = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")


def decoded(blob: bytes) -> bytes:
    """The blob followed by every base64 run in it, decoded."""
    parts = [blob]
    for match in _BASE64.finditer(blob):
        token = match.group(0)
        try:
            parts.append(base64.b64decode(token[: len(token) - len(token) % 4], validate=True))
        except (binascii.Error, ValueError):
            pass
    return b"\n".join(parts)


class NeedleScan:
    """Which of many needles occur in a haystack, in one pass over it rather
    than one per needle (a scenario has thousands of needles and megabytes
    of haystack: ``needle in haystack`` for each cost seconds).

    The haystack's ``WINDOW``-byte slices are read every ``stride`` bytes,
    where ``stride`` is one more than the shortest long needle's length
    minus ``WINDOW``; each needle's slices of that length starting at
    offsets ``0 .. stride - 1`` are indexed. An occurrence of a needle of
    length ``L >= WINDOW + stride - 1`` at ``p`` covers ``[p, p + L)``; the
    first sampled position ``q`` at or after ``p`` is below ``p + stride``,
    so the slice read there is the needle's slice at offset ``q - p``, which
    is indexed. A needle whose slice is seen is then confirmed by ``in`` on
    the whole haystack; needles shorter than ``2 * WINDOW`` are always
    searched for with ``in``."""

    WINDOW = 16

    def __init__(self, needles: list[tuple[str, bytes]]) -> None:
        window = self.WINDOW
        needles = list(dict.fromkeys(needles))  # the same key is gathered more than once
        self.short = [(label, n) for label, n in needles if len(n) < 2 * window]
        self.long = [(label, n) for label, n in needles if len(n) >= 2 * window]
        shortest = min((len(n) for _, n in self.long), default=2 * window)
        self.stride = shortest - window + 1
        # slice -> the index of a needle it starts, and, for the few slices
        # that start more than one (passphrases share their first bytes),
        # all of them. (Ints, not a list per slice: a quarter of the time.)
        self.owner: dict[bytes, int] = {}
        self.shared: dict[bytes, set[int]] = {}
        for i, (_, needle) in enumerate(self.long):
            for start in range(self.stride):
                piece = needle[start:start + window]
                j = self.owner.setdefault(piece, i)
                if j != i:
                    self.shared.setdefault(piece, {j}).add(i)
        # A set: intersecting with it walks the smaller side (with the dict,
        # every call would walk all the slices).
        self.pieces = frozenset(self.owner)

    def found(self, haystack: bytes) -> list[str]:
        """The labels of the needles in ``haystack``."""
        window, stride = self.WINDOW, self.stride
        seen = {haystack[q:q + window] for q in range(0, len(haystack) - window + 1, stride)}
        candidates: set[int] = set()
        for piece in seen.intersection(self.pieces):
            candidates |= self.shared.get(piece, {self.owner[piece]})
        return [label for label, needle in
                [*self.short, *(self.long[i] for i in sorted(candidates))]
                if needle in haystack]


def as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8", "surrogatepass")


async def serve_with_logs(testcase: Any) -> None:
    """A served server whose every log line (text and JSON) is kept in
    ``testcase.log_lines``, for the zero-knowledge scan; its URL as
    ``testcase.url``."""
    testcase.log_lines = []

    def capture(event: dict[str, Any]) -> None:
        testcase.log_lines.append(formatEvent(event) or "")
        testcase.log_lines.append(event_as_json(event))

    globalLogPublisher.addObserver(capture)
    testcase.addCleanup(globalLogPublisher.removeObserver, capture)
    testcase.server = await start_server(testcase, serve=True, access_log=True)
    [port] = [await d for d in testcase.server.listening()]
    testcase.url = f"http://127.0.0.1:{port.getHost().port}"


async def in_thread(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await deferToThread(f, *args, **kwargs)


class ClientScenarios:
    """The scenarios, each run by a test of its own and all of them before
    the zero-knowledge scan."""

    async def setUp(self) -> None:
        await serve_with_logs(self)
        self.secrets = Secrets()
        self.clients: list[Client] = []
        self.listeners: list[Any] = []
        self.addCleanup(self._close)

    async def _close(self) -> None:
        for listener in self.listeners:
            await in_thread(listener.stop)
        for client in self.clients:
            client.close()
        await sessions_closed(self.server)
        # The clients' keep-alive connections end on the server's side too.
        deadline = time.monotonic() + 10
        while any(isinstance(r, tcp.Server) for r in reactor.getReaders()):
            if time.monotonic() > deadline:
                break
            await sleep(0.02)

    def new_client(self, name: str) -> Client:
        """(In a thread.) A new profile, registered as ``name``."""
        passphrase = f"passphrase of {name} {uuid.uuid4().hex}"
        client, phrase = Client.init(self.mktemp(), passphrase, self.url)
        self.clients.append(client)
        self.secrets.client(client, passphrase, phrase)
        client.register(name, display_name=name.title(), prekeys=20)
        client.phrase = phrase  # type: ignore[attr-defined]
        client.passphrase = passphrase  # type: ignore[attr-defined]
        self.secrets.vault(client)
        return client

    def listen(self, client: Client) -> tuple[Any, queue.Queue[Message]]:
        """(In a thread.) A realtime listener; its messages, in order, and
        its other events in ``listener.events``."""
        arrived: queue.Queue[Message] = queue.Queue()
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        listener = client.listener(arrived.put, on_event=lambda *e: events.put(e)).start()
        listener.events = events
        self.listeners.append(listener)
        if not listener.synced.wait(10):
            raise AssertionError("no sync_complete")
        return listener, arrived

    @staticmethod
    def take(arrived: queue.Queue[Message], count: int, sent_by_others_of: Client | None = None
             ) -> list[Message]:
        """The next ``count`` messages people wrote (no system messages),
        leaving out the reader's own when ``sent_by_others_of`` names it."""
        got: list[Message] = []
        deadline = time.monotonic() + 10
        while len(got) < count:
            message = arrived.get(timeout=max(0.01, deadline - time.monotonic()))
            if message.message_type == "system":
                continue
            if sent_by_others_of is not None and message.sender == sent_by_others_of.cyphr_id:
                continue
            got.append(message)
        return got

    # -- scenarios (each runs in a thread) --------------------------------

    def chat_both_ways(self) -> None:
        alice, bob = self.new_client(f"alice{self.tag}"), self.new_client(f"bob{self.tag}")
        bob_listener, bob_inbox = self.listen(bob)
        alice_listener, alice_inbox = self.listen(alice)
        hello, reply = marker("hello"), marker("reply")
        sent = alice.send(bob.cyphr_id, hello)  # over REST
        [got] = self.take(bob_inbox, 1)
        self.assertEqual((got.text, got.sender, got.verified, got.chat_id),
                         (hello, alice.cyphr_id, True, sent["chatId"]))
        # Bob's client acknowledged delivery; now he reads it, and answers
        # over his socket.
        bob_listener.mark_read(got.chat_id, got.seq)
        receipts = self.events_named(alice_listener, "message_delivered", "message_read")
        self.assertEqual(receipts["message_delivered"]["messageId"], sent["messageId"])
        self.assertEqual(receipts["message_read"]["upToSeq"], got.seq)
        ack = bob_listener.send(alice.cyphr_id, reply)
        self.assertEqual(ack["chatId"], sent["chatId"])
        # (Alice's socket hears her own REST send too: it did not send it.)
        [back] = self.take(alice_inbox, 1, sent_by_others_of=alice)
        self.assertEqual((back.text, back.sender, back.verified, back.chat_id),
                         (reply, bob.cyphr_id, True, sent["chatId"]))
        # Both read the whole conversation, their own messages included.
        for client in (alice, bob):
            history = client.history(sent["chatId"])
            self.assertEqual([(m.sender, m.text, m.verified) for m in history],
                             [(alice.cyphr_id, hello, True), (bob.cyphr_id, reply, True)])
        self.secrets.texts += [hello, reply]
        self.secrets.vault(alice)
        self.secrets.vault(bob)

    @staticmethod
    def events_named(listener: Any, *names: str) -> dict[str, Any]:
        """The first event of each name, waiting up to 10 s for them."""
        found: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while set(names) - set(found):
            name, data = listener.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if name in names and name not in found:
                found[name] = data
        return found

    def group_with_removal(self) -> None:
        admin, b, c = (self.new_client(f"{n}{self.tag}") for n in ("gadmin", "gbob", "gcarol"))
        for member in (b, c):  # a group admin may add only its contacts
            member.send(admin.cyphr_id, marker("hello-admin"))
        chat_id = admin.create_group(f"Project {self.tag}", [b.cyphr_id, c.cyphr_id])
        first = marker("group-first")
        admin.send(chat_id, first)
        for member in (b, c):
            texts = [m.text for m in member.history(chat_id) if m.message_type != "system"]
            self.assertEqual(texts, [first])
            names = {chat["chatId"]: chat["name"] for chat in member.chats()}
            self.assertEqual(names[chat_id], f"Project {self.tag}")
        admin.remove_member(chat_id, c.cyphr_id)
        after = marker("group-after-removal")
        admin.send(chat_id, after)
        [latest] = [m for m in b.history(chat_id) if m.text == after]
        self.assertTrue(latest.verified)
        # The removed member cannot read the chat any more; and given the
        # new message's payload, it is not a recipient and cannot open it.
        raw = admin._call("GET", f"/api/messaging/chat/{chat_id}")["messages"][-1]
        opened = c.open_message(raw)
        self.assertIsNone(opened.text)
        self.assertIn("not a recipient", opened.error)
        with self.assertRaises(Exception):
            c.history(chat_id)
        self.secrets.texts += [first, after, f"Project {self.tag}"]
        for client in (admin, b, c):
            self.secrets.vault(client)

    def offline_catch_up(self) -> None:
        alice, bob = self.new_client(f"oalice{self.tag}"), self.new_client(f"obob{self.tag}")
        texts = [marker(f"offline-{i}") for i in range(12)]
        for text in texts:
            alice.send(bob.cyphr_id, text)
        listener, inbox = self.listen(bob)
        got = self.take(inbox, len(texts))
        self.assertEqual([m.text for m in got], texts)
        self.assertEqual([m.seq for m in got], sorted(m.seq for m in got))
        self.assertTrue(all(m.verified for m in got))
        self.assertTrue(inbox.empty())
        # The same messages by REST sync, in order, for clients without a socket.
        synced, cursor, more = bob.sync()
        self.assertEqual([m.text for m in synced if m.sender == alice.cyphr_id], texts)
        self.assertFalse(more)
        self.assertEqual(bob.sync(since=cursor)[0], [])
        # Acknowledged as delivered: a second device session gets nothing again.
        # The listener sends a message's receipt after handing it over; one
        # thread handles what arrives, in order, so once the answer to a
        # later call is handled every receipt has gone, and stop() waits
        # for the server to acknowledge them (a barrier, not a sleep).
        listener.sio.call("no_such_event", {}, timeout=10)
        listener.stop()
        _, again = self.listen(bob)
        self.assertTrue(again.empty())
        self.secrets.texts += texts
        self.secrets.vault(bob)

    def recovery(self) -> None:
        alice, bob = self.new_client(f"ralice{self.tag}"), self.new_client(f"rbob{self.tag}")
        before = marker("before-recovery")
        chat_id = alice.send(bob.cyphr_id, before)["chatId"]
        # Alice compared bob's number: that pin goes to the encrypted backup.
        alice.accept_identity(bob.cyphr_id, bob.contact(alice.cyphr_id).safety_number)
        alice.rotate_kyber()
        to_rotated = marker("to-rotated-key")
        bob.send(alice.cyphr_id, to_rotated)
        # A new device, from the phrase alone.
        passphrase = f"new device {uuid.uuid4().hex}"
        moved = Client.recover(self.mktemp(), passphrase, self.url, alice.phrase,  # type: ignore
                               alice.cyphr_id, prekeys=10)
        self.clients.append(moved)
        self.secrets.texts.append(passphrase)
        self.secrets.texts.append(moved.profile.vault["fingerprint"])
        self.assertEqual(moved.identity.public_key, alice.identity.public_key)
        self.assertEqual(moved.identity.generation, 1)
        # The pins came back from the backup: bob is still verified.
        self.assertEqual((moved.restored_pins, moved.pin_backup_error), (1, None))
        self.assertTrue(moved.contact(bob.cyphr_id).verified)
        # The sender's phrase alone opens nothing sent over sessions before
        # (forward secrecy): neither what alice sent nor what she was sent,
        # though the server still holds both.
        earlier = moved.history(chat_id)
        self.assertEqual([m.text for m in earlier], [None, None])
        # Alice's own: no envelope for the new device. Bob's to her: its
        # body went with the envelope of her old device, removed by the
        # recovery.
        self.assertIn("not a recipient", earlier[0].error)
        self.assertIn("the server no longer holds it", earlier[1].error)
        # The old device is signed out and cannot sign in again.
        with self.assertRaises(Exception) as raised:
            alice.whoami()
        self.assertIn("DEVICE_MISMATCH", str(raised.exception))
        # Bob's pin still holds (same identity key) and new messages open.
        after = marker("after-recovery")
        bob.send(alice.cyphr_id, after)
        latest = moved.history(chat_id)[-1]
        self.assertEqual((latest.text, latest.verified, latest.contact_verified),
                         (after, True, True))
        self.secrets.texts += [before, to_rotated, after]
        self.secrets.vault(moved)
        self.secrets.vault(bob)

    def changed_identity(self) -> None:
        """A server that swaps a user's keys for its own is caught by the pin,
        and the swap cannot be accepted without the number compared."""
        alice, bob = self.new_client(f"calice{self.tag}"), self.new_client(f"cbob{self.tag}")
        alice.send(bob.cyphr_id, marker("pinned"))
        mallory = Identity.from_phrase(new_phrase())
        columns = ("kyber_public_key", "kyber_key_signature", "kyber_key_id",
                   "kyber_key_created_at", "kyber_key_expires_at", "kyber_key_signature_version")
        # The identity key is the identity's; the others are its device 1's.
        device = ("devices WHERE device_id = 1 AND user_id ="
                  " (SELECT id FROM cyphr_identities WHERE cyphr_id = ?)")

        def database(sql: str, params: tuple[Any, ...]) -> Any:
            return blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(
                self.server.database.run_query(sql, params)))

        def set_keys(values: tuple[Any, ...]) -> None:
            async def update() -> None:
                await self.server.database.run_operation(
                    "UPDATE cyphr_identities SET public_key = ? WHERE cyphr_id = ?",
                    (values[0], bob.cyphr_id))
                await self.server.database.run_operation(
                    "UPDATE " + device.replace(" WHERE", " SET " + ", ".join(
                        f"{c} = ?" for c in columns) + " WHERE", 1), (*values[1:], bob.cyphr_id))
            blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(update()))

        [(identity_key,)] = database("SELECT public_key FROM cyphr_identities WHERE cyphr_id = ?",
                                     (bob.cyphr_id,))
        [keys] = database("SELECT " + ", ".join(columns) + " FROM " + device, (bob.cyphr_id,))
        genuine = (identity_key, *keys)
        # Mallory's keys, properly signed by mallory as bob's.
        now = int(time.time() * 1000)
        form = mallory.main_key_form(bob.cyphr_id, now)
        set_keys((mallory.public_key, mallory.kyber_public_key,
                  base64.b64decode(form["kyberKeySignature"]), 0, now,
                  now + 180 * 86400 * 1000, 2))
        with self.assertRaises(IdentityChanged) as raised:
            alice.send(bob.cyphr_id, marker("must-not-go"))
        # The number alice is shown is not the one bob sees: comparing them
        # uncovers the swap. Both numbers are named.
        shown = raised.exception.safety_number
        self.assertRegex(shown, r"^(\d{5} ){11}\d{5}$")
        real = bob.contact(alice.cyphr_id).safety_number
        self.assertEqual(raised.exception.pinned_safety_number, real)
        self.assertNotEqual(shown, real)
        self.assertIn(real, str(raised.exception))
        # Bob's real number, typed while the server still shows mallory's
        # key, pins nothing (the v1 client pinned mallory's key here).
        with self.assertRaises(ClientError):
            alice.accept_identity(bob.cyphr_id, real)
        self.assertFalse(alice.profile.vault["pins"][bob.cyphr_id]["verified"])
        set_keys(genuine)
        self.assertEqual(alice.contact(bob.cyphr_id).safety_number, real)
        # Accepting after a real comparison marks the contact verified.
        self.assertTrue(alice.accept_identity(bob.cyphr_id, real).verified)
        text = marker("after-check")
        chat = alice.send(bob.cyphr_id, text)["chatId"]
        [latest] = [m for m in bob.history(chat) if m.text == text]
        self.assertEqual((latest.verified, latest.contact_verified), (True, False))
        self.secrets.texts.append(text)
        self.secrets.raw += [mallory.seed, bytes(mallory.signing_key)]

    def v1_profile_upgrades(self) -> None:
        """A profile whose published key is still v1-signed is refused by
        readers by name; its first v2 login re-signs the key under v2 and
        publishes v2 prekeys, and then messages flow."""
        from cyphr.crypto import KYBER_KEY_CONTEXT

        alice, bob = self.new_client(f"valice{self.tag}"), self.new_client(f"vbob{self.tag}")
        v1_signature = alice.identity.signing_key.sign(
            KYBER_KEY_CONTEXT + alice.identity.kyber_public_key).signature
        blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(
            self.server.database.run_operation(
                "UPDATE devices SET kyber_key_signature = ?, kyber_key_id = NULL,"
                " kyber_key_created_at = NULL, kyber_key_expires_at = NULL,"
                " kyber_key_signature_version = 1 WHERE device_id = 1 AND user_id ="
                " (SELECT id FROM cyphr_identities WHERE cyphr_id = ?)",
                (v1_signature, alice.cyphr_id))))
        with alice.profile.lock:
            del alice.profile.vault["mainKey"]  # a v1 profile has no such record
        with self.assertRaises(ClientError) as raised:
            bob.send(alice.cyphr_id, marker("not-yet"))
        self.assertIn(f"{alice.cyphr_id} has not upgraded to v2 key signatures",
                      str(raised.exception))
        alice.login()
        self.assertEqual(alice.profile.vault["mainKey"]["keyId"], 0)
        self.assertGreaterEqual(alice.prekeys_remaining(), 20)
        text = marker("after-upgrade")
        chat = bob.send(alice.cyphr_id, text)["chatId"]
        [got] = [m for m in alice.history(chat) if m.text == text]
        self.assertTrue(got.verified)
        self.secrets.texts.append(text)
        self.secrets.vault(alice)

    def totp_and_wallet(self) -> None:
        import pyotp
        from stellar_sdk import Keypair

        alice = self.new_client(f"talice{self.tag}")
        secret = alice.totp_generate()["secret"]
        alice.totp_verify(pyotp.TOTP(secret).now())
        alice.logout()
        with self.assertRaises(Exception) as raised:
            alice.login()
        self.assertIn("TOTP_REQUIRED", str(raised.exception))
        # (The code that enabled it may not be used twice: take the next one.)
        alice.login(pyotp.TOTP(secret).at(time.time() + 30))
        keypair = Keypair.random()
        self.assertEqual(alice.wallet_link(keypair.secret), keypair.public_key)
        self.assertEqual(alice.wallet_show(), keypair.public_key)
        self.secrets.texts.append(keypair.secret)
        self.secrets.raw.append(keypair.raw_secret_key())
        # Signed in the user's own wallet: the client shows a SEP-53 text and
        # takes the signature back.
        wallet = Keypair.random()
        bob = self.new_client(f"tbob{self.tag}")
        challenge_id, text = bob.wallet_link_text(wallet.public_key)
        self.assertTrue(text.startswith("cyphr-v2 wallet-link\n"))
        self.assertIn(f"origin: {self.url}\n", text)
        signature = b64(wallet.sign_message(text))
        self.assertEqual(bob.wallet_link_signed(wallet.public_key, challenge_id, signature),
                         wallet.public_key)
        self.assertEqual(alice.wallet_show(bob.cyphr_id), wallet.public_key)
        # A signature over anything else (here the raw challenge text's
        # bytes as a plain Ed25519 signature) is refused, by the client when
        # it made the text, and by the server.
        other = Keypair.random()
        challenge_id, text = bob.wallet_link_text(other.public_key)
        with self.assertRaises(ClientError):
            bob.wallet_link_signed(other.public_key, challenge_id,
                                   b64(other.sign(text.encode("utf-8"))))
        challenge_id, text = bob.wallet_link_text(other.public_key)
        fresh = Client.open(bob.profile.directory, bob.passphrase)  # type: ignore[attr-defined]
        self.clients.append(fresh)
        with self.assertRaises(ApiError) as raised:
            fresh.wallet_link_signed(other.public_key, challenge_id,
                                     b64(other.sign(text.encode("utf-8"))))
        self.assertEqual(raised.exception.code, "INVALID_SIGNATURE")
        self.secrets.texts += [wallet.secret, other.secret]
        self.secrets.raw += [wallet.raw_secret_key(), other.raw_secret_key()]

    def linked_devices(self) -> None:
        alice, bob = self.new_client(f"alice{self.tag}"), self.new_client(f"bob{self.tag}")
        passphrase = f"passphrase of a laptop {uuid.uuid4().hex}"
        codes: queue.Queue[Any] = queue.Queue()
        linked: list[Any] = []

        def link() -> None:
            try:
                linked.append(Client.link(self.mktemp(), passphrase, self.url, on_code=codes.put,
                                          poll=0.05, timeout=30, prekeys=5))
            except BaseException as e:  # noqa: BLE001 - failed below
                linked.append(e)

        linking = threading.Thread(target=link, daemon=True)
        linking.start()
        alice.approve(codes.get(timeout=30).code)
        linking.join(30)
        [laptop] = linked
        self.assertIsInstance(laptop, Client)
        self.clients.append(laptop)
        self.secrets.texts += [passphrase, laptop.profile.vault["fingerprint"]]
        names = {1: marker("phone"), laptop.device_id: marker("laptop")}
        for device_id, name in names.items():
            alice.rename_device(device_id, name)
        self.assertEqual({d.device_id: d.name for d in laptop.devices()}, names)
        _, inbox = self.listen(alice)
        mine, reply = marker("from the laptop"), marker("reply")
        laptop.send(bob.cyphr_id, mine)
        bob.send(alice.cyphr_id, reply)
        # The phone shows what the laptop sent, and bob's answer.
        got = self.take(inbox, 2)
        self.assertEqual([(m.text, m.sender, m.verified) for m in got],
                         [(mine, alice.cyphr_id, True), (reply, bob.cyphr_id, True)])
        # Both of alice's devices publish session keys; bob claims them.
        for device in (alice, laptop):
            device.publish_session_keys()
        good, refused = bob.session_bundles(alice.cyphr_id)
        self.assertEqual(([b.device_id for b in good], refused), ([1, laptop.device_id], []))
        self.secrets.texts += [mine, reply, *names.values()]
        for client in (alice, laptop, bob):
            self.secrets.vault(client)

    # -- tests --------------------------------------------------------------
    # Each scenario is followed by the zero-knowledge scan of everything the
    # server then keeps (so each scenario runs once, and a leak is named by
    # the scenario that made it).

    tag = ""

    async def test_chat_both_ways(self) -> None:
        """Two people chat over REST and their sockets: each message arrives
        once, opened and verified, delivery and read receipts reach the
        sender, both histories hold the conversation; the server keeps none
        of their secrets."""
        await in_thread(self.chat_both_ways)
        await self.assert_zero_knowledge()

    async def test_group_with_removal(self) -> None:
        """A group's members read its messages and name; a removed member
        can neither read the chat nor open a message sent after the removal;
        the server keeps none of their secrets."""
        await in_thread(self.group_with_removal)
        await self.assert_zero_knowledge()

    async def test_offline_catch_up(self) -> None:
        """Messages sent while the reader was offline arrive on connecting,
        in order and verified, as they do by REST sync; once acknowledged
        they are not pushed again; the server keeps none of the secrets."""
        await in_thread(self.offline_catch_up)
        await self.assert_zero_knowledge()

    async def test_recovery(self) -> None:
        """A new device recovered from the phrase alone has the same
        identity and its pins back from the encrypted backup, but opens
        nothing sent over sessions before (the phrase is no key to past
        messages); the old device is signed out; new messages open; the
        server keeps none of the secrets."""
        await in_thread(self.recovery)
        await self.assert_zero_knowledge()

    async def test_changed_identity(self) -> None:
        """A server that swaps a user's keys for its own is caught by the
        pin, and the swap cannot be accepted without the number compared;
        the server keeps none of the secrets."""
        await in_thread(self.changed_identity)
        await self.assert_zero_knowledge()

    async def test_v1_profile_upgrades(self) -> None:
        """A v1-signed published key is refused by readers until its first
        v2 login re-signs it and publishes v2 prekeys; then messages flow;
        the server keeps none of the secrets."""
        await in_thread(self.v1_profile_upgrades)
        await self.assert_zero_knowledge()

    async def test_totp_and_wallet(self) -> None:
        """Two-factor login, a wallet linked from its secret or by a SEP-53
        signature in the user's own wallet (any other signature refused);
        the server keeps none of the secrets, the wallet's included."""
        await in_thread(self.totp_and_wallet)
        await self.assert_zero_knowledge()

    async def test_linked_devices(self) -> None:
        """A device linked by the approval of another: both read what the
        other sends and bob's answers, and each other's sealed names; the
        server keeps none of their secrets (the sealed seed, the names, the
        new device's passphrase and keys)."""
        await in_thread(self.linked_devices)
        await self.assert_zero_knowledge()

    async def assert_zero_knowledge(self) -> None:
        """Nothing the server keeps (every column of every table, its log
        output, every file in its data directory) holds a plaintext, a
        private key or seed, a phrase, a passphrase or a raw device
        fingerprint of what the scenario did; and no file of the clients'
        profiles (the vault, the local store) holds any of it in clear."""
        for client in self.clients:  # the keys of the sessions made meanwhile
            await in_thread(self.secrets.vault, client)
        await self._close()  # every log line written
        sources = await self.server_holdings()
        needles = self.secrets.needles()
        self.assertGreater(len(needles), 20)
        scan = NeedleScan(needles)
        # A control of the scan itself: every needle planted anywhere in a
        # haystack (at any alignment to the scan's stride) is found.
        for offset, (label, needle) in enumerate(needles):
            filler = os.urandom(offset % (2 * scan.stride + 1))
            self.assertIn(label, scan.found(filler + needle + filler))
        for source, blob in sources.items():
            for label in scan.found(decoded(blob)):
                self.fail(f"{label} found in {source}")
        # A control: the scan does see what the server is meant to hold.
        everything = decoded(b"\n".join(sources.values()))
        for public in self.secrets.public:
            self.assertIn(public, everything)
        # The clients' own files hold all of it, but sealed: the vault and
        # the local store (its database, write-ahead log and shared memory).
        stored = 0
        for client in self.clients:
            for path in client.profile.directory.rglob("*"):
                if not path.is_file():
                    continue
                stored += path.name.startswith("local.sqlite")
                for label in scan.found(decoded(path.read_bytes())):
                    self.fail(f"{label} found in the client's {path.name}")
        self.assertGreater(stored, 0)

    async def server_holdings(self) -> dict[str, bytes]:
        database = self.server.database
        if database.engine == "sqlite":
            tables = [r[0] for r in await database.run_query(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
        else:
            tables = [r[0] for r in await database.run_query(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()")]
        self.assertIn("messages", tables)
        sources: dict[str, bytes] = {}
        for table in tables:
            rows = await database.run_query(f'SELECT * FROM "{table}"')
            sources[f"table {table}"] = b"\n".join(b"\t".join(as_bytes(v) for v in row)
                                                   for row in rows)
        self.assertTrue(sources["table cyphr_identities"])
        sources["log output"] = "\n".join(self.log_lines).encode("utf-8")
        for path in Path(self.server.data_dir).rglob("*"):
            if path.is_file():
                sources[f"file {path}"] = path.read_bytes()
        return sources


class SQLiteClientTests(SQLiteMixin, ClientScenarios, TestCase):
    pass


class PostgresClientTests(PostgresMixin, ClientScenarios, TestCase):
    pass


class CommandLineTests(SQLiteMixin, TestCase):
    """cyphr-client as a person or a script runs it. One test runs every
    step as a separate process; the others run ``cli.main`` in-process (in
    a thread, as the client blocks) with the same arguments, environment
    and standard streams, so they cost no interpreter start each."""

    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    def cli(self, profile: str, *args: str, timeout: float = 60,
            env: dict[str, str] | None = None,
            passphrase: str | None = None) -> subprocess.CompletedProcess[str]:
        profile = os.path.abspath(profile)  # the command runs elsewhere
        # Secrets come from a file, never the environment.
        passphrase_file = Path(f"{profile}.passphrase")
        passphrase_file.write_text(passphrase or f"passphrase for {profile}")
        environment = dict(os.environ, CYPHR_SERVER=self.url, CYPHR_PROFILE=profile,
                           PYTHONPATH=str(ROOT))
        environment.update(env or {})
        return subprocess.run([*CLIENT, "--passphrase-file",
                               str(passphrase_file), *args], env=environment,
                              capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                              stdin=subprocess.DEVNULL)

    async def run_cli(self, profile: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        result = await in_thread(self.cli, profile, *args, **kwargs)
        return result

    def main_in_process(self, profile: str, *args: str,
                        passphrase: str | None = None) -> subprocess.CompletedProcess[str]:
        """(In a thread.) What ``cli`` does, through ``cli.main`` in this
        process: the same passphrase file, server and profile settings,
        standard input that is no terminal, captured output."""
        from cyphr.client import cli

        profile = os.path.abspath(profile)
        passphrase_file = Path(f"{profile}.passphrase")
        passphrase_file.write_text(passphrase or f"passphrase for {profile}")
        argv = ["--passphrase-file", str(passphrase_file), *args]
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin, sys.stdout, sys.stderr, os.environ.copy()
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(""), out, err
        os.environ.update(CYPHR_SERVER=self.url, CYPHR_PROFILE=profile)
        try:
            status = cli.main(argv)
        finally:
            sys.stdin, sys.stdout, sys.stderr = saved[:3]
            os.environ.clear()
            os.environ.update(saved[3])
        return subprocess.CompletedProcess(["cyphr-client", *argv], status, out.getvalue(),
                                           err.getvalue())

    async def run_main(self, profile: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return await in_thread(self.main_in_process, profile, *args, **kwargs)

    def ok(self, result: subprocess.CompletedProcess[str]) -> str:
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    async def test_init_register_send_listen(self) -> None:
        """As separate processes: init shows the recovery phrase, register
        reports progress, a message sent by one person is heard by the
        other's listen, verified; a listen with nothing to hear exits 1 at
        its timeout, saying so. (Bob's init, in JSON on request, his
        register and alice's history run in-process.)"""
        alice, bob = self.mktemp(), self.mktemp()
        shown = self.ok(await self.run_cli(alice, "init"))
        self.assertIn("recovery phrase", shown)
        phrase = self.ok(await self.run_main(bob, "--json", "init", "--show-phrase"))
        self.assertEqual(len(json.loads(phrase)["recoveryPhrase"].split()), 24)
        registered = await self.run_cli(alice, "register", "alice", "--prekeys", "5")
        self.assertIn("Registered alice", self.ok(registered))
        self.assertIn("5/5", registered.stderr)  # progress
        self.ok(await self.run_main(bob, "register", "bob", "--prekeys", "5"))
        text = marker("cli")
        self.ok(await self.run_cli(alice, "send", "bob", *text.split("-")))
        listened = self.ok(await self.run_cli(bob, "listen", "--count", "1", "--timeout", "20"))
        self.assertIn(f"alice ✓ (unverified contact): {' '.join(text.split('-'))}", listened)
        as_json = self.ok(await self.run_main(alice, "--json", "history", "bob"))
        [message] = json.loads(as_json)["messages"]
        self.assertEqual((message["sender"], message["verified"]), ("alice", True))
        # Nothing more to hear: the listener exits at its timeout, saying so.
        quiet = await self.run_cli(bob, "listen", "--count", "1", "--timeout", "0.2")
        self.assertEqual(quiet.returncode, 1)
        self.assertIn("timed out after 0 of 1", quiet.stderr)

    async def test_errors_are_one_line(self) -> None:
        """Each failure (no profile, an unknown user, a wrong passphrase, a
        taken Cyphr ID, no server) exits 1 with one line on standard error
        giving the contract's message and code or what to do."""
        alice = self.mktemp()
        # No profile yet.
        missing = await self.run_main(alice, "whoami")
        self.assertEqual(missing.returncode, 1)
        self.assertIn("cyphr-client init", missing.stderr)
        self.ok(await self.run_main(alice, "init"))
        self.ok(await self.run_main(alice, "register", "carol", "--prekeys", "0"))
        # The contract's message and code.
        unknown = await self.run_main(alice, "send", "nobody", "hi")
        self.assertEqual((unknown.returncode, unknown.stderr.strip()),
                         (1, "cyphr-client: No such user (USER_NOT_FOUND)"))
        wrong = await self.run_main(alice, "whoami", passphrase="wrong")
        self.assertEqual(wrong.returncode, 1)
        self.assertIn("wrong passphrase", wrong.stderr)
        self.assertEqual(len(wrong.stderr.strip().splitlines()), 1)
        other = self.mktemp()
        self.ok(await self.run_main(other, "init"))
        taken = await self.run_main(other, "register", "carol", "--prekeys", "0")
        self.assertEqual((taken.returncode, taken.stderr.strip()),
                         (1, "cyphr-client: This Cyphr ID is taken (CYPHR_ID_TAKEN)"))
        no_server = await self.run_main(alice, "--server", "http://127.0.0.1:9", "whoami")
        self.assertIn("cannot reach", no_server.stderr)
        self.assertEqual(len(no_server.stderr.strip().splitlines()), 1)

    async def test_every_command(self) -> None:
        """Groups, keys, safety numbers, two-factor, the wallet, recovery on
        a new device and deletion, each as a script would run them."""
        import pyotp
        from stellar_sdk import Keypair

        alice, bob, carol = self.mktemp(), self.mktemp(), self.mktemp()
        phrases = {}
        for profile, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
            phrases[name] = json.loads(self.ok(await self.run_main(
                profile, "--json", "init", "--show-phrase")))["recoveryPhrase"]
            self.ok(await self.run_main(profile, "register", name, "--prekeys", "3"))

        async def j(profile: str, *args: str) -> Any:
            return json.loads(self.ok(await self.run_main(profile, "--json", *args)))

        me = await j(alice, "whoami")
        self.assertEqual((me["cyphrId"], me["server"]), ("alice", self.url))
        for member in (bob, carol):  # a group admin may add only its contacts
            self.ok(await self.run_main(member, "send", "alice", "hello"))
        chat = (await j(alice, "group", "create", "Book club", "bob"))["chatId"]
        await j(alice, "group", "add", chat, "carol")
        await j(alice, "group", "role", chat, "bob", "admin")
        members = {m["cyphrId"]: m["role"] for m in (await j(alice, "group", "members", chat))["members"]}
        self.assertEqual(members, {"alice": "admin", "bob": "admin", "carol": "member"})
        await j(alice, "send", chat, "welcome")
        [named] = [c for c in (await j(carol, "chats"))["chats"] if c["chatId"] == chat]
        self.assertEqual(named["name"], "Book club")
        shown = self.ok(await self.run_main(carol, "history", chat))
        self.assertIn("alice ✓ (unverified contact): welcome", shown)
        self.assertNotIn("groupKey", shown)
        await j(bob, "group", "remove", chat, "carol")
        self.assertNotIn("carol", [m["cyphrId"] for m in
                                   (await j(bob, "group", "members", chat))["members"]])

        self.assertEqual((await j(alice, "keys", "rotate"))["generation"], 1)
        topped = await j(alice, "keys", "prekeys", "--count", "10")
        self.assertEqual(topped["remaining"], 10)
        numbers = await j(alice, "verify", "bob"), await j(bob, "verify", "alice")
        self.assertEqual(numbers[0]["safetyNumber"], numbers[1]["safetyNumber"])
        self.assertTrue((await j(alice, "verify", "bob", "--accept",
                                 numbers[1]["safetyNumber"]))["verified"])

        secret = (await j(bob, "totp", "enable"))["secret"]
        await j(bob, "totp", "confirm", pyotp.TOTP(secret).now())
        refused = await self.run_main(bob, "login")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("TOTP_REQUIRED", refused.stderr)
        self.assertIn("--totp", refused.stderr)
        await j(bob, "login", "--totp", pyotp.TOTP(secret).at(time.time() + 30))

        keypair = Keypair.random()
        secret_file = Path(self.mktemp()).resolve()
        secret_file.write_text(keypair.secret)
        self.assertEqual((await j(carol, "wallet", "link", "--secret-file", str(secret_file)))[
            "stellarAddress"], keypair.public_key)
        self.assertEqual((await j(alice, "wallet", "show", "carol"))["stellarAddress"],
                         keypair.public_key)

        # A new device from the phrase; alice's old profile is signed out.
        phrase_file = Path(self.mktemp()).resolve()
        phrase_file.write_text(phrases["alice"])
        moved = self.mktemp()
        await j(moved, "recover", "alice", "--phrase-file", str(phrase_file))
        # Sent over sessions before the recovery: not for the new device.
        shown = self.ok(await self.run_main(moved, "history", chat))
        self.assertNotIn("welcome", shown)
        self.assertIn("not a recipient", shown)
        stale = await self.run_main(alice, "whoami")
        self.assertIn("DEVICE_MISMATCH", stale.stderr)

        await j(carol, "delete-account", "--yes")
        gone = await self.run_main(moved, "send", "carol", "hi")
        self.assertIn("USER_NOT_FOUND", gone.stderr)
        unconfirmed = await self.run_main(bob, "delete-account")
        self.assertIn("--yes", unconfirmed.stderr)
