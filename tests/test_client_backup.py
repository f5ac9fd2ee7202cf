"""
The history backup (issue #22, item 6; docs/encryption.rst, "The history
backup"): the server's routes (``/api/cyphr-id/history-backup``: auth, the
size limit, 404 before any, delete, gone with the account) in-process; and
the reference client over a real port, on both engines: an account
recovered from the phrase reads its past from the backup (and without one,
none of it), a device linked after the backup was turned on reads recent
history, turning it off deletes the server's copy, a blob altered on the
server or another account's is refused and nothing restored, a server with
a small limit keeps the newest messages, the schedule, the listener, the
command line; and what the server stores holds none of the plaintexts.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
import zlib
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr import signing
from cyphr.client import backup
from cyphr.client.client import Client
from cyphr.client.devices import LinkCode
from cyphr.client.http import ClientError
from cyphr.config import HISTORY_BACKUP_DEFAULT
from tests.clients import PASSPHRASE
from tests.helpers import (
    InProcessHTTP,
    PostgresMixin,
    Response,
    SQLiteMixin,
    cli_in_process,
    fixed_clock,
    start_server,
)
from tests.users import User, b64

PATH = "/api/cyphr-id/history-backup"
HOUR_MS = 3600 * 1000


def marker(label: str) -> str:
    """A text found nowhere else: what the zero-knowledge checks look for."""
    return f"{label}-{uuid.uuid4().hex}"


# -- the server's routes ---------------------------------------------------------------

class RoutesMixin:
    options: dict[str, Any] = {}

    async def setUp(self) -> None:
        self.clock = fixed_clock()
        self.server = await start_server(self, clock=self.clock, **self.options)
        self.http = InProcessHTTP.for_server(self.server)
        self.alice = User("alice")
        await self.alice.register(self.http)

    async def put(self, body: Any, user: User | None = None) -> Response:
        headers = {b"Content-Type": [b"application/json"], **(user.auth() if user else {})}
        return await self.http.request("PUT", PATH, data=json.dumps(body).encode(), headers=headers)

    async def stored(self) -> list[tuple[Any, ...]]:
        return [(bytes(b), t) for b, t in await self.server.database.run_query(
            "SELECT blob, updated_at FROM history_backups")]

    def assertError(self, response: Response, status: int, code: str, msg: Any = None
                    ) -> dict[str, Any]:
        self.assertEqual((response.code, response.json().get("code")), (status, code),
                         msg or response.body[:300])
        self.assertIs(response.json()["success"], False)
        return response.json()


class RoutesTestsMixin(RoutesMixin):
    async def test_round_trip(self) -> None:
        """GET is 404 HISTORY_BACKUP_NOT_FOUND until a PUT; PUT answers
        updatedAt and the size, GET gives the blob back as sent; a later PUT
        replaces it; nobody else sees it."""
        self.assertError(await self.http.get(PATH, headers=self.alice.auth()), 404,
                         "HISTORY_BACKUP_NOT_FOUND")
        response = await self.put({"blob": b64(b"sealed one")}, self.alice)
        self.assertEqual(response.json(), {"success": True, "size": 10,
                                           "updatedAt": "2026-09-21T14:13:20.000Z"})
        got = await self.http.get(PATH, headers=self.alice.auth())
        self.assertEqual(got.json(), {"success": True, "blob": b64(b"sealed one"),
                                      "updatedAt": "2026-09-21T14:13:20.000Z"})
        self.clock.advance(60)
        self.assertEqual((await self.put({"blob": b64(b"sealed two!")}, self.alice)).json()["size"],
                         11)
        got = (await self.http.get(PATH, headers=self.alice.auth())).json()
        self.assertEqual((got["blob"], got["updatedAt"]),
                         (b64(b"sealed two!"), "2026-09-21T14:14:20.000Z"))
        bob = User("bob")
        await bob.register(self.http)
        self.assertError(await self.http.get(PATH, headers=bob.auth()), 404,
                         "HISTORY_BACKUP_NOT_FOUND")
        self.assertEqual(len(await self.stored()), 1)

    async def test_delete(self) -> None:
        """DELETE removes the caller's backup (then GET is 404) and says
        whether there was one; another's stays."""
        bob = User("bob")
        await bob.register(self.http)
        for user in (self.alice, bob):
            self.assertEqual((await self.put({"blob": b64(b"x")}, user)).code, 200)
        response = await self.http.delete(PATH, headers=self.alice.auth())
        self.assertEqual(response.json(), {"success": True, "deleted": True})
        self.assertError(await self.http.get(PATH, headers=self.alice.auth()), 404,
                         "HISTORY_BACKUP_NOT_FOUND")
        again = await self.http.delete(PATH, {}, headers=self.alice.auth())
        self.assertEqual(again.json(), {"success": True, "deleted": False})
        self.assertEqual((await self.http.get(PATH, headers=bob.auth())).code, 200)
        self.assertError(await self.http.delete(PATH, {"blob": "x"}, headers=self.alice.auth()),
                         400, "UNKNOWN_FIELD")

    async def test_needs_a_token(self) -> None:
        """The three routes are 401 without a token, and store nothing."""
        self.assertError(await self.put({"blob": b64(b"x")}), 401, "UNAUTHORIZED")
        self.assertError(await self.http.get(PATH), 401, "UNAUTHORIZED")
        self.assertError(await self.http.delete(PATH), 401, "UNAUTHORIZED")
        self.assertEqual(await self.stored(), [])

    async def test_shape(self) -> None:
        """An empty or non-base64 blob, no blob, or another field, is 400 and
        leaves the stored blob as it was."""
        self.assertEqual((await self.put({"blob": b64(b"kept")}, self.alice)).code, 200)
        before = await self.stored()
        for body, code in (({"blob": ""}, "INVALID_FIELD"), ({"blob": "not base64!"}, "INVALID_FIELD"),
                           ({"blob": 5}, "INVALID_FIELD"), ({}, "MISSING_FIELD"),
                           ({"blob": b64(b"x"), "owner": "bob"}, "UNKNOWN_FIELD")):
            self.assertError(await self.put(body, self.alice), 400, code, body.keys())
        self.assertEqual(await self.stored(), before)

    async def test_default_limit_fits_the_body_limit(self) -> None:
        """With the defaults, a blob of max_history_backup (7 MiB: 9.33 MiB
        of base64) passes the 10 MiB body limit and is stored; one byte more
        is 413 PAYLOAD_TOO_LARGE naming the field and the limit, and the
        stored blob stays."""
        self.assertEqual(self.server.config.history_backup_limit, HISTORY_BACKUP_DEFAULT)
        big = os.urandom(HISTORY_BACKUP_DEFAULT)
        response = await self.put({"blob": b64(big)}, self.alice)
        self.assertEqual((response.code, response.json()["size"]), (200, len(big)))
        refused = self.assertError(await self.put({"blob": b64(big + b"x")}, self.alice), 413,
                                   "PAYLOAD_TOO_LARGE")
        self.assertEqual(refused["details"], {"field": "blob", "limit": HISTORY_BACKUP_DEFAULT})
        self.assertEqual([blob for blob, _ in await self.stored()], [big])

    async def test_deleted_with_the_account(self) -> None:
        """Deleting the account deletes its history backup."""
        self.assertEqual((await self.put({"blob": b64(b"x")}, self.alice)).code, 200)
        self.assertEqual(len(await self.stored()), 1)
        self.assertEqual((await self.alice.delete_account(self.http)).code, 200)
        self.assertEqual(await self.stored(), [])


class SmallLimitRoutesTestsMixin(RoutesMixin):
    options = {"max_history_backup": 4096}

    async def test_size_limit(self) -> None:
        """A server's max_history_backup: a blob of that size is stored, one
        byte more is 413 PAYLOAD_TOO_LARGE (details: the field and the limit)
        in the contract's format, and the stored blob stays."""
        self.assertEqual((await self.put({"blob": b64(b"a" * 4096)}, self.alice)).code, 200)
        refused = self.assertError(await self.put({"blob": b64(b"b" * 4097)}, self.alice), 413,
                                   "PAYLOAD_TOO_LARGE")
        self.assertEqual(refused["details"], {"field": "blob", "limit": 4096})
        self.assertIn("4096", refused["error"])
        self.assertEqual([blob for blob, _ in await self.stored()], [b"a" * 4096])


class SQLiteRoutesTests(SQLiteMixin, RoutesTestsMixin, TestCase):
    pass


class PostgresRoutesTests(PostgresMixin, RoutesTestsMixin, TestCase):
    pass


class SQLiteSmallLimitRoutesTests(SQLiteMixin, SmallLimitRoutesTestsMixin, TestCase):
    pass


class PostgresSmallLimitRoutesTests(PostgresMixin, SmallLimitRoutesTestsMixin, TestCase):
    pass


# -- the blob, byte for byte ----------------------------------------------------------------

class BlobTests(SynchronousTestCase):
    seed = bytes(range(64))

    def test_layout(self) -> None:
        """blob = 0x01 || nonce (24) || XChaCha20-Poly1305(key, nonce, padded,
        aad), key = HKDF-SHA256(seed, info "cyphr-client history-backup v1"),
        aad = opaque(label) || opaque(cyphrId) || uint8(1), padded = uint32
        length || zlib(JSON) || zeros to 64 KiB: what another client must
        rebuild."""
        records = [{"id": "m2", "chatId": "c", "seq": 2, "text": "two"},
                   {"id": "m1", "chatId": "c", "seq": 1, "text": "one"}]
        blob, count = backup.seal(self.seed, "alice", records, 7, 1234, 1 << 20)
        self.assertEqual((blob[0], count, len(blob)), (1, 2, 1 + 24 + 65536 + 16))
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"cyphr-client history-backup v1").derive(self.seed)
        aad = signing.text("cyphr-client history-backup v1") + signing.text("alice") + b"\x01"
        padded = crypto_aead_xchacha20poly1305_ietf_decrypt(blob[25:], aad, blob[1:25], key)
        length = int.from_bytes(padded[:4], "big")
        self.assertEqual(padded[4 + length:], bytes(len(padded) - 4 - length))
        self.assertEqual(json.loads(zlib.decompress(padded[4:4 + length])),
                         {"format": 1, "counter": 7, "time": 1234, "messages": records})
        self.assertEqual(backup.open_blob(self.seed, "alice", blob)["messages"], records)

    def test_refused(self) -> None:
        """A blob altered anywhere, opened for another Cyphr ID or with
        another seed, or cut short, is BackupRefused."""
        blob, _ = backup.seal(self.seed, "alice", [], 1, 1, 1 << 20)
        for seed, cyphr_id, data in (
                (self.seed, "alice", blob[:30] + bytes([blob[30] ^ 1]) + blob[31:]),
                (self.seed, "alice", blob[:-1] + bytes([blob[-1] ^ 1])),
                (self.seed, "alice", b"\x02" + blob[1:]),
                (self.seed, "alice", blob[:40]),
                (self.seed, "bob", blob),
                (bytes(64), "alice", blob)):
            with self.assertRaises(backup.BackupRefused):
                backup.open_blob(seed, cyphr_id, data)

    def test_newest_kept(self) -> None:
        """Under a limit that does not hold them all, the first records (the
        newest) are kept, as many as fit."""
        records = [{"id": f"m{n}", "chatId": "c", "seq": n, "text": os.urandom(60).hex()}
                   for n in range(100, 0, -1)]
        blob, count = backup.seal(self.seed, "alice", records, 1, 1, 4096)
        self.assertLessEqual(len(blob), 4096)
        self.assertTrue(10 < count < 100, count)
        opened = backup.open_blob(self.seed, "alice", blob)["messages"]
        self.assertEqual(opened, records[:count])
        # One more would not fit.
        self.assertEqual(backup.seal(self.seed, "alice", records[:count + 1], 1, 1, 4096)[1], count)

    def test_records_checked(self) -> None:
        """A restored record keeps the fields a record has, each of its type;
        one without an id, chat id or integer seq is left out."""
        self.assertEqual(backup.checked_record(
            {"id": "m", "chatId": "c", "seq": 3, "text": "t", "sentAt": 5, "verified": True,
             "other": "x"}),
            {"id": "m", "chatId": "c", "seq": 3, "text": "t", "sentAt": 5, "verified": True})
        for bad in ({"chatId": "c", "seq": 1}, {"id": "m", "chatId": "c", "seq": "1"},
                    {"id": "m", "chatId": "c", "seq": True}, {"id": "m", "chatId": "c", "seq": 1,
                                                              "sentAt": "now"}, [1], None):
            self.assertIsNone(backup.checked_record(bad), bad)


# -- the reference client over a real port ----------------------------------------------------

class ClientsMixin:
    options: dict[str, Any] = {}

    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True, **self.options)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.clients: list[Client] = []
        self.phrases: dict[str, str] = {}

    def tearDown(self) -> None:
        for client in self.clients:
            client.close()

    async def thread(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        return await deferToThread(function, *args, **kwargs)

    async def registered(self, cyphr_id: str) -> Client:
        client, phrase = await self.thread(Client.init, os.path.abspath(self.mktemp()),
                                           PASSPHRASE, self.url)
        self.clients.append(client)
        self.phrases[cyphr_id] = phrase
        await self.thread(client.register, cyphr_id, None, 2)
        return client

    async def recovered(self, cyphr_id: str) -> Client:
        """``cyphr_id`` on a new profile, from its phrase."""
        client = await self.thread(Client.recover, os.path.abspath(self.mktemp()), PASSPHRASE,
                                   self.url, self.phrases[cyphr_id], cyphr_id, prekeys=2)
        self.clients.append(client)
        return client

    async def linked(self, first: Client) -> Client:
        """A new device of ``first``'s identity, linked and approved."""
        codes: list[LinkCode] = []
        shown = threading.Event()

        def on_code(code: LinkCode) -> None:
            codes.append(code)
            shown.set()

        linking = deferToThread(Client.link, os.path.abspath(self.mktemp()), PASSPHRASE,
                                self.url, on_code=on_code, poll=0.05, timeout=30, prekeys=2)
        if not await self.thread(shown.wait, 30):
            await linking  # its error
        await self.thread(first.approve, codes[0].code)
        second = await linking
        self.clients.append(second)
        return second

    async def conversation(self, alice: Client, bob: Client, count: int = 2) -> tuple[str, list[str]]:
        """``count`` messages, alice and bob in turn, each read by the
        other (so both keep all of them); the chat and the texts."""
        texts = [marker(f"message-{n}") for n in range(count)]
        chat_id = None
        for n, text in enumerate(texts):
            sender, reader = (alice, bob) if n % 2 == 0 else (bob, alice)
            chat_id = (await self.thread(sender.send, reader.cyphr_id, text))["chatId"]
            await self.thread(reader.history, chat_id)
        assert chat_id is not None
        return chat_id, texts

    async def blob_of(self, cyphr_id: str) -> bytes | None:
        rows = await self.server.database.run_query(
            "SELECT b.blob FROM history_backups b JOIN cyphr_identities i ON i.id = b.user_id"
            " WHERE i.cyphr_id = ?", (cyphr_id,))
        return bytes(rows[0][0]) if rows else None

    async def age(self, client: Client, hours: float) -> None:
        """Make the last backup ``hours`` old, as the schedule sees it."""
        def change() -> None:
            with client.profile.lock:
                record = client.profile.vault["historyBackup"]
                record["lastAt"] = record["lastTriedAt"] = client._now() - int(hours * HOUR_MS)
                client.profile.save()
        await self.thread(change)


class ClientTestsMixin(ClientsMixin):
    async def test_recovered_reads_its_past(self) -> None:
        """With the backup on and rewritten on schedule after a
        conversation, an account recovered from the phrase on a new profile
        restores it and reads its past, each message marked restored,
        though the server no longer holds their bodies for it; the new
        device keeps the backup on; and the server's blob holds none of the
        plaintexts, raw or in base64."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        first = await self.thread(alice.history_backup_on)
        self.assertEqual((first.messages, first.kept), (0, 0))
        chat_id, texts = await self.conversation(alice, bob, 4)
        # The schedule: history() rewrites it once a day has passed.
        await self.age(alice, 25)
        await self.thread(alice.history, chat_id)
        status = await self.thread(alice.history_backup_status)
        self.assertEqual((status["on"], status["lastMessages"], status["lastError"]),
                         (True, 4, None))
        blob = await self.blob_of("alice")
        self.assertEqual(len(blob), status["lastSize"])
        for text in texts:
            for haystack in (blob, base64.b64encode(blob)):
                self.assertNotIn(text.encode(), haystack)
            self.assertNotIn(base64.b64encode(text.encode())[:24], base64.b64encode(blob))

        moved = await self.recovered("alice")
        self.assertEqual((moved.restored_messages, moved.history_backup_error), (4, None))
        shown = await self.thread(moved.history, chat_id)
        self.assertEqual([(m.text, m.sender, m.restored, m.verified) for m in shown],
                         [(text, ("alice", "bob")[n % 2], True, True)
                          for n, text in enumerate(texts)])
        self.assertTrue(shown[0].as_json()["restored"])
        self.assertTrue((await self.thread(moved.history_backup_status))["on"])
        # And new messages open as before, not marked restored.
        after = marker("after")
        await self.thread(bob.send, "alice", after)
        latest = (await self.thread(moved.history, chat_id))[-1]
        self.assertEqual((latest.text, latest.restored), (after, False))

    async def test_recovered_reads_its_groups(self) -> None:
        """A group's name key came in a system message: restored from the
        backup, it is taken again (the roster still commits to it), so the
        recovered account reads the group's name and messages."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.thread(bob.send, "alice", "hello")  # an admin adds only its contacts
        chat_id = await self.thread(alice.create_group, "Project X", ["bob"])
        text = marker("group")
        await self.thread(alice.send, chat_id, text)
        await self.thread(alice.history_backup_on)
        moved = await self.recovered("alice")
        self.assertIsNone(moved.history_backup_error)
        names = {c["chatId"]: c["name"] for c in await self.thread(moved.chats)}
        self.assertEqual(names[chat_id], "Project X")
        shown = [m for m in await self.thread(moved.history, chat_id) if m.message_type != "system"]
        self.assertEqual([(m.text, m.restored) for m in shown], [(text, True)])

    async def test_recovered_without_a_backup_reads_none(self) -> None:
        """Without a backup, the recovered account restores nothing and reads
        none of its past: each message says this device is not a recipient,
        or that the server no longer holds it."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        chat_id, texts = await self.conversation(alice, bob, 2)
        moved = await self.recovered("alice")
        self.assertEqual((moved.restored_messages, moved.history_backup_error), (0, None))
        shown = await self.thread(moved.history, chat_id)
        self.assertEqual([m.text for m in shown], [None, None])
        for message in shown:
            self.assertTrue("not a recipient" in message.error
                            or "no longer holds it" in message.error, message.error)
        self.assertFalse((await self.thread(moved.history_backup_status))["on"])

    async def test_linked_device_reads_recent_history(self) -> None:
        """With the backup on, approving a new device first writes a fresh
        backup (the messages since the last one included), and the new
        device restores it: it reads the conversation from before it was
        linked. It does not write backups itself unless turned on."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.thread(alice.history_backup_on)
        chat_id, texts = await self.conversation(alice, bob, 3)
        laptop = await self.linked(alice)
        self.assertEqual((laptop.restored_messages, laptop.history_backup_error), (3, None))
        shown = await self.thread(laptop.history, chat_id)
        self.assertEqual([(m.text, m.restored) for m in shown], [(t, True) for t in texts])
        self.assertEqual((await self.thread(alice.history_backup_status))["lastMessages"], 3)
        self.assertFalse((await self.thread(laptop.history_backup_status))["on"])

    async def test_off_deletes_the_servers_copy(self) -> None:
        """Turning the backup off deletes the server's copy; then nothing
        rewrites it, not even when a day has passed, `now` is refused, and
        a recovered account restores nothing."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.thread(alice.history_backup_on)
        chat_id, _ = await self.conversation(alice, bob, 2)
        self.assertIsNotNone(await self.blob_of("alice"))
        self.assertTrue(await self.thread(alice.history_backup_off))
        self.assertIsNone(await self.blob_of("alice"))
        await self.age(alice, 48)
        await self.thread(alice.history, chat_id)
        self.assertIsNone(await self.blob_of("alice"))
        with self.assertRaises(ClientError) as raised:
            await self.thread(alice.backup_history)
        self.assertIn("off", str(raised.exception))
        self.assertFalse(await self.thread(alice.history_backup_off))
        moved = await self.recovered("alice")
        self.assertEqual(moved.restored_messages, 0)

    async def test_tampered_blob_refused(self) -> None:
        """A blob altered on the server does not open: the recovered device
        says why (history_backup_error) and restores nothing."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        chat_id, _ = await self.conversation(alice, bob, 2)
        await self.thread(alice.history_backup_on)
        blob = await self.blob_of("alice")
        altered = blob[:100] + bytes([blob[100] ^ 0x40]) + blob[101:]
        await self.server.database.run_operation(
            "UPDATE history_backups SET blob = ?", (altered,))
        with self.assertLogs("cyphr.client.backup", "WARNING") as logged:
            moved = await self.recovered("alice")
        self.assertIn("could not be restored", logged.output[0])
        self.assertEqual(moved.restored_messages, 0)
        self.assertIn("does not open with this identity's key", moved.history_backup_error)
        self.assertEqual(await self.thread(moved.store.all_messages), [])
        shown = await self.thread(moved.history, chat_id)
        self.assertEqual([m.text for m in shown], [None, None])

    async def test_another_accounts_blob_does_not_open(self) -> None:
        """Carol's blob, copied over alice's in the database, does not open
        for alice: nothing of it is restored."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        carol = await self.registered("carol")
        await self.conversation(carol, bob, 2)
        for client in (alice, carol):
            await self.thread(client.history_backup_on)
        await self.server.database.run_operation(
            "UPDATE history_backups SET blob = ? WHERE user_id = (SELECT id FROM"
            " cyphr_identities WHERE cyphr_id = 'alice')", (await self.blob_of("carol"),))
        with self.assertLogs("cyphr.client.backup", "WARNING"):
            moved = await self.recovered("alice")
        self.assertEqual(moved.restored_messages, 0)
        self.assertIn("another account's", moved.history_backup_error)
        self.assertEqual(await self.thread(moved.store.all_messages), [])

    async def test_schedule(self) -> None:
        """When on, what opens messages rewrites the backup once it is a day
        old, not before; a failed rewrite is logged and kept as lastError,
        never raised, and not tried again within the hour."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.thread(alice.history_backup_on)
        chat_id, _ = await self.conversation(alice, bob, 2)
        await self.age(alice, 23)
        before = await self.blob_of("alice")
        await self.thread(alice.history, chat_id)
        self.assertEqual(await self.blob_of("alice"), before)
        await self.age(alice, 25)
        await self.thread(alice.sync)
        self.assertNotEqual(await self.blob_of("alice"), before)
        self.assertEqual((await self.thread(alice.history_backup_status))["lastMessages"], 2)

        # A server limit too small for any backup: the rewrite fails.
        written = await self.blob_of("alice")
        await self.age(alice, 25)

        def tiny() -> None:
            with alice.profile.lock:
                alice.profile.vault["historyBackup"].update(limit=10, limitAt=alice._now())
                alice.profile.save()
        await self.thread(tiny)
        with self.assertLogs("cyphr.client.backup", "WARNING") as logged:
            shown = await self.thread(alice.history, chat_id)
        self.assertIn("Could not write the history backup (on schedule)", logged.output[0])
        self.assertEqual(len(shown), 2)
        status = await self.thread(alice.history_backup_status)
        self.assertIn("not even an empty one fits", status["lastError"])
        self.assertEqual(await self.blob_of("alice"), written)
        self.assertFalse(await self.thread(alice.backup_history_if_due))

    async def test_listener_rewrites_when_due(self) -> None:
        """A listener rewrites a due backup after its catch-up, in a thread
        of its own, the messages it caught up with included."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.thread(alice.history_backup_on)
        before = await self.blob_of("alice")
        await self.thread(bob.send, "alice", marker("while away"))
        await self.age(alice, 25)
        arrived: list[Any] = []
        listener = await self.thread(lambda: alice.listener(arrived.append).start())
        try:
            self.assertTrue(await self.thread(listener.synced.wait, 10))
        finally:
            await self.thread(listener.stop)
        self.assertEqual(len(arrived), 1)
        self.assertNotEqual(await self.blob_of("alice"), before)
        self.assertEqual((await self.thread(alice.history_backup_status))["lastMessages"], 1)


class SmallLimitClientTestsMixin(ClientsMixin):
    options = {"max_history_backup": 2048}

    async def test_newest_kept_under_the_servers_limit(self) -> None:
        """A server whose limit is smaller than the client's default refuses
        the first upload (413); the client seals it again for the limit the
        server names, keeping the newest messages, and a recovered account
        reads those."""
        alice = await self.registered("alice")
        await self.registered("bob")
        texts = []
        chat_id = None
        for n in range(24):
            texts.append(f"{n:02d} " + os.urandom(48).hex())
            chat_id = (await self.thread(alice.send, "bob", texts[-1]))["chatId"]
        written = await self.thread(alice.history_backup_on)
        self.assertEqual(written.kept, 24)
        self.assertTrue(0 < written.messages < 24, written.messages)
        self.assertLessEqual(written.size, 2048)
        self.assertEqual((await self.thread(alice.history_backup_status))["lastSize"], written.size)
        moved = await self.recovered("alice")
        self.assertEqual(moved.restored_messages, written.messages)
        shown = await self.thread(moved.history, chat_id)
        readable = [m.text for m in shown if m.text is not None]
        self.assertEqual(readable, texts[-written.messages:])


class SQLiteClientTests(SQLiteMixin, ClientTestsMixin, TestCase):
    pass


class PostgresClientTests(PostgresMixin, ClientTestsMixin, TestCase):
    pass


class SQLiteSmallLimitClientTests(SQLiteMixin, SmallLimitClientTestsMixin, TestCase):
    pass


class PostgresSmallLimitClientTests(PostgresMixin, SmallLimitClientTestsMixin, TestCase):
    pass


class CommandLineTests(SQLiteMixin, ClientsMixin, TestCase):
    async def setUp(self) -> None:
        await super().setUp()
        self.passphrase_file = Path(self.mktemp())
        self.passphrase_file.write_text(PASSPHRASE)

    def cli(self, profile: str, *args: str) -> Any:
        return deferToThread(cli_in_process, ["--server", self.url, "--profile", profile,
                                              "--passphrase-file", str(self.passphrase_file),
                                              *args])

    async def test_backup_command(self) -> None:
        """`backup status|now|on|off`: off at first (`now` refused), `on`
        writes it at once and shows its size, `status` shows it on with the
        size and time of the last one, `off` deletes the server's copy; and
        `recover` says how many messages it restored."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.conversation(alice, bob, 2)
        profile = str(alice.profile.directory)
        alice.close()
        self.clients.remove(alice)

        shown = await self.cli(profile, "backup", "status")
        self.assertEqual((shown.returncode, shown.stdout.strip()),
                         (0, "The history backup is off."), shown.stderr)
        refused = await self.cli(profile, "backup", "now")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("backup on", refused.stderr)
        on = await self.cli(profile, "--json", "backup", "on")
        self.assertEqual(on.returncode, 0, on.stderr)
        written = json.loads(on.stdout)
        self.assertEqual((written["on"], written["messages"]), (True, 2))
        self.assertEqual(written["size"], len(await self.blob_of("alice")))
        text = await self.cli(profile, "backup", "now")
        self.assertIn("2 message(s)", text.stdout)
        self.assertIn("KiB", text.stdout)
        status = await self.cli(profile, "backup", "status")
        self.assertIn("The history backup is on.", status.stdout)
        self.assertIn("Last written", status.stdout)

        phrase_file = Path(self.mktemp())
        phrase_file.write_text(self.phrases["alice"])
        moved = os.path.abspath(self.mktemp())
        recovered = await self.cli(moved, "recover", "alice", "--phrase-file", str(phrase_file))
        self.assertEqual(recovered.returncode, 0, recovered.stderr)
        self.assertIn("2 message(s) restored from the history backup", recovered.stdout)
        history = await self.cli(moved, "history", "bob")
        self.assertIn("(from the history backup)", history.stdout)

        off = await self.cli(moved, "--json", "backup", "off")
        self.assertEqual(json.loads(off.stdout), {"on": False, "deleted": True})
        self.assertIsNone(await self.blob_of("alice"))
