"""
Files in chats with the reference client (cyphr.client.attachments): two
people exchange files through the library and the command line against a
server on a real port; what a reader gets is the sender's file byte for
byte, or nothing; uploads and downloads resume after a dropped connection;
a file message survives a restart, reads over sessions and as version 3;
and nothing the server keeps holds a file's content, name or key.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any

import requests
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr.client import attachments, cli
from cyphr.client.attachcrypto import (
    AttachmentError,
    Pointer,
    encrypted_size,
    new_key,
)
from cyphr.client.client import Client, Message
from cyphr.client.crypto import b64
from cyphr.client.render import human_size, line
from tests.clients import PASSPHRASE, ServedClients
from tests.helpers import PostgresMixin, SQLiteMixin, cli_in_process
from tests.test_client_e2e import ClientScenarios, Secrets, decoded, serve_with_logs

MiB = 1024 * 1024
CHAT = "00000000-0000-4000-8000-000000000001"


def write_file(path: Path, size: int, head: bytes = b"") -> bytes:
    """A file of ``size`` bytes: ``head``, then random bytes."""
    data = head + os.urandom(size - len(head))
    path.write_bytes(data)
    return data


def listing(directory: Path) -> list[str]:
    """Every name in ``directory``, hidden ones included."""
    return sorted(p.name for p in directory.iterdir())


def forged(pointer: Pointer, **changes: Any) -> Pointer:
    """``pointer`` with ``changes``, past the checks a Pointer makes of
    itself (a sender's client that does not make them)."""
    made = object.__new__(Pointer)
    for field in dataclasses.fields(Pointer):
        object.__setattr__(made, field.name, changes.get(field.name, getattr(pointer, field.name)))
    return made


def file_message(pointer: Pointer, text: str = "", message_type: str = "file") -> Message:
    return Message("m1", CHAT, 1, "alice", "2026-01-01T00:00:00Z", message_type, text, True,
                   contact_verified=True, attachment=pointer)


def some_pointer(**changes: Any) -> Pointer:
    fields: dict[str, Any] = {"id": "0" * 32, "key": b64(new_key()), "digest": b64(bytes(32)),
                              "size": 1258291, "mimeType": "application/pdf",
                              "fileName": "report.pdf"}
    fields.update(changes)
    return Pointer.from_json(fields)


# -- the message and its rendering, without a server ------------------------------------

class FileMessageTests(SynchronousTestCase):
    def test_plaintext_round_trip(self) -> None:
        """A file message's plaintext is its pointer and caption in JSON, and reads back as them."""
        pointer = some_pointer(width=640, height=480)
        content = json.loads(attachments.file_message(pointer, "the figures"))
        self.assertEqual(content, {"attachment": pointer.to_json(), "text": "the figures"})
        self.assertEqual(attachments.parse_file_message(json.dumps(content)),
                         (pointer, "the figures"))
        bare = attachments.file_message(pointer)
        self.assertEqual(json.loads(bare), {"attachment": pointer.to_json()})
        self.assertEqual(attachments.parse_file_message(bare.decode()), (pointer, ""))

    def test_malformed_refused(self) -> None:
        """A plaintext that is not a well-formed file message is an AttachmentError saying why."""
        good = some_pointer().to_json()
        for text, why in (("hello", "not a file message"), ("[1]", "no attachment"),
                          (json.dumps({"text": "x"}), "no attachment"),
                          (json.dumps({"attachment": dict(good, fileName="../../evil")}),
                           "path separator"),
                          (json.dumps({"attachment": dict(good, key="AAAA")}), "key"),
                          (json.dumps({"attachment": good, "text": 7}), "caption")):
            with self.assertRaises(AttachmentError) as raised:
                attachments.parse_file_message(text)
            self.assertIn(why, str(raised.exception))

    def test_json_and_repr_hide_the_key(self) -> None:
        """Neither a file message's JSON nor its repr shows the pointer's key or digest."""
        pointer = some_pointer(width=640, height=480, thumbnail=b64(b"tiny"))
        shown = file_message(pointer, "caption").as_json()
        self.assertEqual(shown["attachment"], {"id": "0" * 32, "size": 1258291,
                                               "mimeType": "application/pdf",
                                               "fileName": "report.pdf", "width": 640,
                                               "height": 480, "hasThumbnail": True})
        self.assertEqual(shown["text"], "caption")
        for secret in (pointer.key, pointer.digest):
            for form in (b64(secret), secret.hex(), repr(secret)):
                self.assertNotIn(form, json.dumps(shown))
                self.assertNotIn(form, repr(file_message(pointer)))
        self.assertNotIn("attachment", dataclasses.replace(file_message(pointer),
                                                           attachment=None).as_json())

    def test_line(self) -> None:
        """A file message shows as [type] name (size) "caption", name and caption neutralised."""
        shown = line(file_message(some_pointer(), "the figures"), "bob")
        self.assertTrue(shown.endswith('alice ✓: [file] report.pdf (1.2 MiB) "the figures"'),
                        shown)
        self.assertTrue(line(file_message(some_pointer(), ""), "bob").endswith(
            "alice ✓: [file] report.pdf (1.2 MiB)"))
        # A deprecated format control passes the pointer's checks, not the terminal's.
        tricky = some_pointer(fileName="a\u206ab.pdf", mimeType="image/png", size=5)
        shown = line(file_message(tricky, "\x1b[2Kgone", "image"), "bob")
        self.assertIn('[image] a<U+206A>b.pdf (5 bytes) "␛[2Kgone"', shown)
        self.assertNotIn("\x1b", shown)

    def test_human_size(self) -> None:
        """Sizes read as bytes, KiB, MiB or GiB, with one decimal."""
        self.assertEqual([human_size(n) for n in (0, 1, 1023, 1024, 1258291, 20 * MiB,
                                                  3 * 1024 * MiB)],
                         ["0 bytes", "1 byte", "1023 bytes", "1.0 KiB", "1.2 MiB", "20.0 MiB",
                          "3.0 GiB"])

    def test_types_from_names(self) -> None:
        """The MIME type comes from the file's name, the message type from the MIME type."""
        for name, mime, kind in (("a.png", "image/png", "image"), ("a.mp3", "audio/mpeg", "audio"),
                                 ("a.mp4", "video/mp4", "video"),
                                 ("a.pdf", "application/pdf", "file"),
                                 ("a.tar.gz", "application/gzip", "file"),
                                 ("README", "application/octet-stream", "file")):
            self.assertEqual(attachments.guess_mime_type(name), mime)
            self.assertEqual(attachments.message_type_for(mime), kind)

    def test_progress_bar(self) -> None:
        """A transfer's progress is a bar on a terminal, a start and an end line elsewhere."""
        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        for stream, expected in ((Terminal(), None), (io.StringIO(), [
                "Uploading a.pdf: started, 2.0 MiB", "Uploading a.pdf: done, 2.0 MiB"])):
            self.patch(sys, "stderr", stream)
            report = cli.Output(False).transfer("Uploading a.pdf")
            for done in (0, 1, 2, MiB, MiB, 2 * MiB, 2 * MiB):
                report(done, 2 * MiB)
            shown = stream.getvalue()
            if expected is not None:
                self.assertEqual(shown.splitlines(), expected)
                continue
            self.assertEqual(shown.count("\r"), 3)  # 0%, 50%, 100%
            self.assertTrue(shown.endswith(f"[{'#' * cli.TRANSFER_BAR}] 100% of 2.0 MiB\x1b[K\n"),
                            repr(shown))
            self.assertEqual(shown.count("\n"), 1)

    def test_numbered_names(self) -> None:
        """A taken name gets " (n)" before its extension and stays within 255 bytes."""
        self.assertEqual(attachments._numbered("report.pdf", 2), "report (2).pdf")
        self.assertEqual(attachments._numbered("README", 1), "README (1)")
        long = attachments._numbered("x" * 251 + ".pdf", 12)
        self.assertTrue(long.endswith("x (12).pdf"))
        self.assertEqual(len(long.encode()), 255)


# -- against a server ---------------------------------------------------------------------

class ServedFiles(ServedClients):
    """Mixed into a TestCase with SQLiteMixin or PostgresMixin: a server
    with its access log on, and its log lines kept (the zero-knowledge
    scan reads them)."""

    timeout = 240

    async def setUp(self) -> None:
        await serve_with_logs(self)
        self.clients: list[Client] = []
        # A retry waits less here.
        self.patch(attachments, "RETRY_DELAYS", (0.02, 0.1, 0.3, 0.5, 1.0))

    def blob_files(self) -> dict[str, int]:
        root = Path(self.server.data_dir) / "attachments"
        return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()}

    async def sent_file(self, sender: Client, to: str, size: int, name: str = "report.pdf",
                        caption: str | None = None) -> tuple[bytes, dict[str, Any]]:
        folder = Path(self.mktemp())
        folder.mkdir()
        data = write_file(folder / name, size)
        sent = await self.thread(sender.send_file, to, folder / name, caption)
        return data, sent

    async def read(self, reader: Client, sent: dict[str, Any]) -> Message:
        """The message ``sent`` as ``reader``'s history shows it."""
        [message] = [m for m in await self.thread(reader.history, sent["chatId"])
                     if m.id == sent["messageId"]]
        return message


def first_file(heard: queue.Queue[Message]) -> Message:
    """(In a thread.) The first file message a listener hears."""
    while True:
        message = heard.get(timeout=10)
        if message.message_type in attachments.FILE_TYPES:
            return message


class Exchange(ServedFiles):
    async def test_two_users_exchange_a_file(self) -> None:
        """A file reaches its reader whole, live and after a restart; the server sees none of it."""
        # Heard live, then in both histories, sync and a restarted client's
        # history; downloaded; then the zero-knowledge scan of the server's
        # tables, logs and files (the blob among them), and of the profiles.
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.thread(alice.send, "bob", "hello")  # the session, then the file
        marker = f"zk-file-{os.urandom(8).hex()}"
        source = Path(self.mktemp())
        source.mkdir()
        path = source / f"{marker}.bin"
        data = write_file(path, 3 * MiB + 12345, head=marker.encode() * 100)
        caption = f"zk-caption-{os.urandom(8).hex()}"
        heard: queue.Queue[Message] = queue.Queue()
        listener = await self.thread(lambda: bob.listener(heard.put, top_up=False).start())
        progress: list[tuple[int, int]] = []
        sent = await self.thread(alice.send_file, "bob", path, caption,
                                 progress=lambda *p: progress.append(p))
        live = await self.thread(first_file, heard)
        await self.thread(listener.stop)
        pointer = live.attachment
        self.assertIsNotNone(pointer)
        self.assertEqual((live.id, live.message_type, live.text, live.verified, live.error),
                         (sent["messageId"], "file", caption, True, None))
        self.assertEqual((pointer.file_name, pointer.size, pointer.mime_type),
                         (path.name, len(data), "application/octet-stream"))
        self.assertEqual(sent["attachment"], attachments.public_json(pointer))
        self.assertEqual(progress[-1], (encrypted_size(len(data)),) * 2)
        for reader in (alice, bob):  # the sender's own copy, and the reader's
            shown = await self.read(reader, sent)
            self.assertEqual((shown.attachment, shown.text), (pointer, caption))
        synced, _, _ = await self.thread(bob.sync)
        self.assertIn(pointer, [m.attachment for m in synced])
        bob.close()
        self.clients.remove(bob)
        again = await self.thread(Client.open, bob.profile.directory, PASSPHRASE)
        self.clients.append(again)
        restarted = await self.read(again, sent)
        self.assertEqual((restarted.attachment, restarted.text), (pointer, caption))

        inbox = Path(self.mktemp())
        inbox.mkdir()
        written = await self.thread(again.download, restarted, inbox)
        self.assertEqual((written, written.read_bytes()), (inbox / path.name, data))
        self.assertEqual(listing(inbox), [path.name])
        self.assertEqual(self.blob_files(), {pointer.id: encrypted_size(len(data))})

        # Zero knowledge.
        for client in (alice, again):
            client.close()
        self.clients.clear()
        secrets = Secrets()
        secrets.texts += [marker, caption]
        secrets.raw += [pointer.key] + [data[i:i + 48] for i in (5000, MiB, len(data) - 48)]
        needles = secrets.needles()
        holdings = await ClientScenarios.server_holdings(self)
        self.assertTrue(any(pointer.id in name for name in holdings))
        for where, blob in holdings.items():
            haystack = decoded(blob)
            for label, needle in needles:
                if needle in haystack:
                    self.fail(f"{label} found in {where}")
        for profile in (alice.profile.directory, bob.profile.directory):
            names = listing(profile)
            self.assertFalse([n for n in names if n.startswith((".upload-", ".forward-"))], names)
            for file in profile.rglob("*"):
                if file.is_file():
                    haystack = decoded(file.read_bytes())
                    for label, needle in needles:
                        if needle in haystack:
                            self.fail(f"{label} found in the client's {file.name}")


class SQLiteExchangeTests(SQLiteMixin, Exchange, TestCase):
    pass


class PostgresExchangeTests(PostgresMixin, Exchange, TestCase):
    pass


class AttachmentTests(SQLiteMixin, ServedFiles, TestCase):
    """The rest, on one engine."""

    async def test_version_3(self) -> None:
        """A file message sealed as version 3 reads with its pointer and downloads the same."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.server.database.run_operation(
            "DELETE FROM session_prekeys WHERE user_id ="
            " (SELECT id FROM cyphr_identities WHERE cyphr_id = 'bob')")
        data, sent = await self.sent_file(alice, "bob", 200_000, "photo.png", "v3")
        self.assertIsNotNone(alice.no_session)
        first = await self.read(bob, sent)
        bob.close()
        self.clients.remove(bob)
        bob = await self.thread(Client.open, bob.profile.directory, PASSPHRASE)
        self.clients.append(bob)
        for message in (first, await self.read(bob, sent)):  # opened, then kept
            self.assertEqual((message.message_type, message.text, message.verified),
                             ("image", "v3", True))
            self.assertEqual(message.attachment.mime_type, "image/png")
        self.assertEqual(first.attachment, message.attachment)
        target = Path(self.mktemp())
        written = await self.thread(bob.download, message, target)
        self.assertEqual((written, target.read_bytes()), (target, data))

    async def test_tampered_pointer_refused(self) -> None:
        """A pointer whose digest, key or size is not the blob's is refused and writes nothing."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        _, sent = await self.sent_file(alice, "bob", 300_000)
        pointer = (await self.read(bob, sent)).attachment
        inbox = Path(self.mktemp())
        inbox.mkdir()
        (inbox / "other.txt").write_text("kept")
        for changed, why in ((dataclasses.replace(pointer, digest=bytes(32)), "digest"),
                             (dataclasses.replace(pointer, key=new_key()), "does not open"),
                             (dataclasses.replace(pointer, size=pointer.size * 2), "blob is")):
            with self.assertRaises(AttachmentError) as raised:
                await self.thread(bob.download, changed, inbox)
            self.assertIn(why, str(raised.exception))
            self.assertEqual(listing(inbox), ["other.txt"])
        with self.assertRaises(AttachmentError):
            await self.thread(bob.download, dataclasses.replace(pointer, digest=bytes(32)),
                              inbox / "named.pdf")
        self.assertEqual(listing(inbox), ["other.txt"])

    async def test_directory_never_overwritten_nor_left(self) -> None:
        """A download into a directory never replaces a file there, nor writes outside it."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        data, sent = await self.sent_file(alice, "bob", 70_000)
        message = await self.read(bob, sent)
        inbox = Path(self.mktemp())
        inbox.mkdir()
        (inbox / "report.pdf").write_text("mine")
        first = await self.thread(bob.download, message, inbox)
        second = await self.thread(bob.download, message, inbox)
        self.assertEqual((first.name, second.name), ("report (1).pdf", "report (2).pdf"))
        self.assertEqual((inbox / "report.pdf").read_text(), "mine")
        self.assertEqual(first.read_bytes(), data)

        evil = forged(message.attachment, file_name="../../evil")
        plaintext = json.dumps({"attachment": {**message.attachment.to_json(),
                                               "fileName": "../../evil"}}).encode()
        bad = await self.thread(alice._send, "bob", plaintext, "file")
        shown = await self.read(bob, bad)
        self.assertIsNone(shown.text)
        self.assertIsNone(shown.attachment)
        self.assertIn("the file message's attachment is refused: fileName holds a path separator",
                      shown.error)
        self.assertIn("✗ (the file message's attachment is refused", line(shown, "bob"))
        escaped = await self.thread(bob.download, evil, inbox)
        self.assertEqual(escaped, inbox / "_.._evil")
        self.assertEqual(listing(inbox), ["_.._evil", "report (1).pdf", "report (2).pdf",
                                          "report.pdf"])
        self.assertFalse((inbox.parent.parent / "evil").exists())

    async def test_upload_resumes(self) -> None:
        """An upload cut off midway resumes from the server's offset, not from the start."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        patches: list[int] = []
        real_request, real_read = attachments._request, attachments._Piece.read
        dropped = []

        def request(client: Client, method: str, path: str, **kwargs: Any) -> Any:
            if method == "PATCH":
                patches.append(int(kwargs["headers"]["Upload-Offset"]))
            return real_request(client, method, path, **kwargs)

        def read(piece: Any, size: int | None = -1) -> bytes:
            if not dropped and piece._length - piece._left >= MiB:
                dropped.append(piece._length - piece._left)
                raise ConnectionResetError("the connection dropped (a test)")
            return real_read(piece, size)

        self.patch(attachments, "_request", request)
        self.patch(attachments._Piece, "read", read)
        data, sent = await self.sent_file(alice, "bob", 6 * MiB)
        self.assertEqual((len(dropped), patches[0]), (1, 0))
        # Every byte sent before the drop was kept: the next piece starts there.
        self.assertIn(dropped[0], patches)
        target = Path(self.mktemp())
        await self.thread(bob.download, await self.read(bob, sent), target)
        self.assertEqual(target.read_bytes(), data)

    async def test_download_resumes(self) -> None:
        """A download cut off midway asks for the rest (Range) and gets the same file."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        data, sent = await self.sent_file(alice, "bob", MiB)
        ranges: list[str | None] = []
        real_request, real_body = attachments._request, attachments._body

        def request(client: Client, method: str, path: str, **kwargs: Any) -> Any:
            if method == "GET":
                ranges.append(kwargs["headers"].get("Range"))
            return real_request(client, method, path, **kwargs)

        def body(response: Any) -> Any:
            for n, chunk in enumerate(real_body(response)):
                if len(ranges) == 1 and n == 1:
                    raise requests.ConnectionError("the connection dropped (a test)")
                yield chunk

        self.patch(attachments, "_request", request)
        self.patch(attachments, "_body", body)
        target = Path(self.mktemp())
        await self.thread(bob.download, await self.read(bob, sent), target)
        self.assertEqual(target.read_bytes(), data)
        self.assertEqual(len(ranges), 2, ranges)
        self.assertIsNone(ranges[0])
        self.assertRegex(ranges[1], r"^bytes=[1-9][0-9]*-$")

    async def test_forward(self) -> None:
        """Forwarding reuses one's own upload, and uploads another's again under a new key."""
        alice, bob, carol = [await self.registered(n) for n in ("alice", "bob", "carol")]
        data, sent = await self.sent_file(alice, "bob", 150_000, caption="pass it on")
        original = (await self.read(alice, sent)).attachment
        again = await self.thread(alice.forward, "carol", await self.read(alice, sent))
        by_bob = await self.thread(bob.forward, "carol", await self.read(bob, sent))
        reused, uploaded = (await self.read(carol, again)), (await self.read(carol, by_bob))
        self.assertEqual(reused.attachment, original)
        self.assertNotEqual(uploaded.attachment.id, original.id)
        self.assertNotEqual(uploaded.attachment.key, original.key)
        self.assertEqual((uploaded.attachment.file_name, uploaded.text),
                         (original.file_name, "pass it on"))
        for message in (reused, uploaded):
            target = Path(self.mktemp())
            await self.thread(carol.download, message, target)
            self.assertEqual(target.read_bytes(), data)
        self.assertFalse([n for n in listing(bob.profile.directory) if n.startswith(".forward-")])

    async def test_command_line(self) -> None:
        """Two people exchange a 20 MiB file with cyphr-client send --file and download."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        connections = self.server.site.connections.open

        def arguments(client: Client, *args: str) -> list[str]:
            passphrase = Path(f"{client.profile.directory}.passphrase")
            passphrase.write_text(PASSPHRASE)
            return ["--server", self.url, "--profile", str(client.profile.directory),
                    "--passphrase-file", str(passphrase), *args]

        async def cli(client: Client, *args: str) -> Any:
            result = await self.thread(cli_in_process, arguments(client, *args))
            self.assertEqual(result.returncode, 0, result.stderr)
            return result

        folder = Path(self.mktemp())
        folder.mkdir()
        data = write_file(folder / "big.bin", 20 * MiB)
        started = time.monotonic()
        sent = await cli(alice, "--json", "send", "bob", "--file", str(folder / "big.bin"),
                         "twenty", "MiB")
        took = time.monotonic() - started
        answer = json.loads(sent.stdout)
        self.assertEqual(answer["attachment"]["size"], 20 * MiB)
        self.assertIn("Uploading big.bin: started", sent.stderr)
        self.assertIn("Uploading big.bin: done", sent.stderr)
        listened = await cli(bob, "listen", "--count", "1", "--timeout", "20")
        self.assertIn('alice ✓ (unverified contact): [file] big.bin (20.0 MiB) "twenty MiB"',
                      listened.stdout)
        shown = await cli(bob, "history", "alice")
        self.assertIn('[file] big.bin (20.0 MiB) "twenty MiB"', shown.stdout)
        listed = await cli(bob, "--json", "history", "alice")
        [message] = json.loads(listed.stdout)["messages"]
        self.assertEqual(message["attachment"], answer["attachment"])
        pointer = (await self.read(bob, answer)).attachment
        for output in (sent.stdout, listed.stdout):
            self.assertNotIn(b64(pointer.key), output)
            self.assertNotIn(b64(pointer.digest), output)
        inbox = Path(self.mktemp())
        inbox.mkdir()
        started = time.monotonic()
        fetched = await cli(bob, "download", answer["messageId"], "--out", str(inbox))
        took += time.monotonic() - started
        self.assertEqual(hashlib.sha256((inbox / "big.bin").read_bytes()).digest(),
                         hashlib.sha256(data).digest())
        self.assertIn(f"Wrote big.bin (20.0 MiB) to {inbox / 'big.bin'}: its digest and every "
                      f"chunk checked.", fetched.stdout)
        self.assertIn("Downloading big.bin: done", fetched.stderr)
        # The sender's own device reads its file too, into a file named.
        own = await cli(alice, "--json", "download", answer["messageId"], "--out",
                        str(inbox / "copy.bin"))
        self.assertEqual(json.loads(own.stdout)["path"], str(inbox / "copy.bin"))
        self.assertEqual((inbox / "copy.bin").read_bytes(), data)
        self.assertIn('alice ✓: [file] big.bin (20.0 MiB) "twenty MiB"',
                      (await cli(alice, "history", "bob")).stdout)
        self.assertLess(took, 60, "20 MiB up and down through the command line")
        # The commands leave no connection open once they have ended: what a
        # command left in a reference cycle (a response and its pooled
        # connection) closes when it is collected, which is made to happen
        # now rather than after the test (the server would still hold it).
        gc.collect()
        for _ in range(500):
            if self.server.site.connections.open <= connections:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertLessEqual(self.server.site.connections.open, connections)

    async def test_command_line_refusals(self) -> None:
        """send --file and download refuse what they cannot do in one line saying why."""
        alice, bob = await self.registered("alice"), await self.registered("bob")
        await self.thread(alice.send, "bob", "just text")
        [text] = await self.thread(bob.history, (await self.thread(bob.chats))[0]["chatId"])
        passphrase = Path(f"{bob.profile.directory}.passphrase")
        passphrase.write_text(PASSPHRASE)
        base = ["--server", self.url, "--profile", str(bob.profile.directory),
                "--passphrase-file", str(passphrase)]
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "a.txt").write_text("a")
        for argv, said in ((["send", "alice", "--file", str(folder / "nothing")], "is not a file"),
                           (["send", "alice", "--file", str(folder / "a.txt"), "--type", "call"],
                            "--type does not go with --file"),
                           (["download", text.id], "carries no file"),
                           (["download", "00000000-0000-4000-8000-00000000dead"],
                            "no message")):
            result = await self.thread(cli_in_process, base + argv)
            self.assertEqual(result.returncode, 1, result.stdout)
            self.assertIn(said, result.stderr)
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)

