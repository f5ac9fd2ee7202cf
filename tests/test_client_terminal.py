"""
Terminal safety of ``cyphr-client``: text written by someone else (a
message, a display name, a group name, a server's error detail) is shown
with every control character, escape sequence and bidirectional control
made visible, never acting on the terminal; ``--json`` keeps the exact
text.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr.client import cli, render
from cyphr.client.client import Message
from cyphr.client.http import ApiError
from cyphr.client.terminal import json_line, safe
from tests.helpers import SQLiteMixin, cli_in_process, run_cli_main, start_server

# One of each kind a sender could use against the reader's terminal.
C0 = "".join(chr(c) for c in range(0x20))
C1 = "".join(chr(c) for c in range(0x80, 0xA0))
DEL = "\x7f"
CSI = "\x1b[2K\r"             # erase the line, back to its start
OSC = "\x1b]0;pwned\x07"      # set the window title
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
LAYOUT = "\u2028\u2029"
EVERY = CSI + OSC + C0 + C1 + DEL + BIDI + LAYOUT
FORGED = f"{CSI}[12:00:00] carol ✓: wire me 100 XLM please"

# What may never reach the terminal raw (a line break only where the output
# itself puts one).
_RAW = set(C0 + C1 + DEL + BIDI + LAYOUT) - {"\n"}


class RawCharacters:
    def assertNothingRaw(self, text: str) -> None:
        found = sorted({f"U+{ord(c):04X}" for c in text if c in _RAW})
        self.assertEqual(found, [], f"raw control characters reached the terminal: {text!r}")


class SafeTests(RawCharacters, SynchronousTestCase):
    def test_every_class_is_visible(self) -> None:
        """Each C0 control, DEL, each C1 control, each bidirectional and
        layout control is replaced by a visible stand-in (ESC by ␛, a
        carriage return by ␍, a bidi override by <U+202E>, a C1 CSI by
        <U+009B>); nothing of them is left raw, printable text is kept."""
        shown = safe("a" + EVERY + "z")
        self.assertNothingRaw(shown)
        self.assertNotIn("\n", shown)
        self.assertTrue(shown.startswith("a␛[2K␍") and shown.endswith("z"))
        for char, stand_in in (("\x1b", "␛"), ("\r", "␍"), ("\x07", "␇"), ("\x00", "␀"),
                               ("\n", "␊"), ("\x7f", "␡"), ("\x9b", "<U+009B>"),
                               ("\u202e", "<U+202E>"), ("\u2066", "<U+2066>"),
                               ("\u200f", "<U+200F>"), ("\u061c", "<U+061C>")):
            self.assertEqual(safe(char), stand_in)
        self.assertEqual(safe("héllo wörld ✓ 👋 مرحبا"), "héllo wörld ✓ 👋 مرحبا")

    def test_lines_are_indented(self) -> None:
        """With an indent, line breaks stay and each later line starts with
        the indent; a carriage return inside a line stays visible."""
        self.assertEqual(safe("one\ntwo\r\nthree\rx", indent="  "), "one\n  two\n  three␍x")

    def test_lone_surrogate(self) -> None:
        """A lone surrogate (not text; it cannot be printed) is shown as
        its code point."""
        self.assertEqual(safe("a\ud800b"), "a<U+D800>b")

    def test_json_is_exact_and_safe(self) -> None:
        """json_line decodes to exactly the text given, and holds none of
        the characters raw."""
        data = {"text": EVERY, "name": "\ud800" + BIDI}
        line = json_line(data)
        self.assertEqual(json.loads(line), data)
        self.assertNothingRaw(line)


def message(text: str, sender: str = "bob") -> Message:
    return Message("m1", "00000000-0000-4000-8000-000000000001", 1, sender,
                   "2024-01-01T00:00:00Z", "text", text, True, contact_verified=True)


class StandIn:
    """The library as the commands see it, with someone else's text in
    every place a person sees it."""

    cyphr_id = "alice"

    def __init__(self, text: str) -> None:
        self.text = text

    def history(self, chat_id: str, limit: int, before: int | None) -> list[Message]:
        return [message(self.text), message("first\nsecond" + self.text)]

    def display_name(self, cyphr_id: str) -> str | None:
        return f"Bob{self.text}"

    def chats(self) -> list[dict[str, Any]]:
        return [{"chatId": "00000000-0000-4000-8000-000000000002", "chatType": "group",
                 "name": f"Club{self.text}", "participants": ["alice", "bob"], "unreadCount": 0}]

    def _direct_chat_with(self, cyphr_id: str) -> str | None:
        return "00000000-0000-4000-8000-000000000001"

    def send(self, to: str, text: str, message_type: str) -> dict[str, Any]:
        raise ApiError(404, "USER_NOT_FOUND", f"No such user{self.text}",
                       {"members": [f"mallory{self.text}"]})


class CommandOutputTests(RawCharacters, SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(sys, "stdin", io.StringIO(""))
        self.client = StandIn(EVERY)
        self.patch(cli, "_open", lambda args: self.client)

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        """cli.main in this process: its status, stdout and stderr."""
        return run_cli_main(self, *argv)

    def test_message_and_display_name(self) -> None:
        """history shows a message's text and its sender's display name
        with every class neutralised, a multi-line message indented under
        its sender; --json gives the exact text."""
        status, out, err = self.run_main("history", "00000000-0000-4000-8000-000000000001")
        self.assertEqual(status, 0, err)
        self.assertNothingRaw(out)
        self.assertIn("bob (Bob␛[2K␍␛]0;pwned␇", out)
        self.assertIn("<U+202E>", out)
        # EVERY holds a line break: each message's later lines are indented
        # under it, and only a message's first line starts with its time.
        lines = out.splitlines()
        self.assertEqual([line.startswith("[") for line in lines], [True, False, True, False, False])
        self.assertTrue(all(line.startswith(render.MESSAGE_INDENT) for line in lines[1::2] + lines[4:]))
        self.assertTrue(lines[3].startswith(render.MESSAGE_INDENT + "second␛"), lines)
        status, out, err = self.run_main("--json", "history", "00000000-0000-4000-8000-000000000001")
        self.assertNothingRaw(out)
        self.assertEqual(json.loads(out)["messages"][0]["text"], EVERY)

    def test_group_name(self) -> None:
        """chats shows a group name with every class neutralised."""
        status, out, err = self.run_main("chats")
        self.assertEqual(status, 0, err)
        self.assertNothingRaw(out)
        self.assertIn("Club␛[2K␍", out)
        self.assertEqual(len(out.splitlines()), 1)

    def test_error_message_and_detail(self) -> None:
        """A server's error message and details are shown on one line of
        stderr with every class neutralised."""
        status, out, err = self.run_main("send", "bob", "hi")
        self.assertEqual(status, 1)
        self.assertNothingRaw(err.rstrip("\n"))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("No such user␛[2K␍", err)
        self.assertIn("mallory␛[2K␍", err)
        self.assertIn("(USER_NOT_FOUND)", err)


class RealServerTests(RawCharacters, SQLiteMixin, TestCase):
    """The forged line of issue #23 and every class, sent through a real
    server by one profile and shown by another, each command as a script
    runs it (cli.main in this process: what reaches the terminal is what
    the command writes, whichever process runs it)."""

    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    async def cli(self, profile: str, *args: str, stdin: str | None = None
                  ) -> subprocess.CompletedProcess[str]:
        profile = os.path.abspath(profile)
        passphrase = Path(f"{profile}.passphrase")
        passphrase.write_text(f"passphrase for {profile}")
        return await deferToThread(
            cli_in_process, ["--server", self.url, "--profile", profile,
                             "--passphrase-file", str(passphrase), *args], stdin=stdin or "")

    async def ok(self, profile: str, *args: str, stdin: str | None = None) -> str:
        result = await self.cli(profile, *args, stdin=stdin)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    async def test_forged_line_and_group_name(self) -> None:
        """A message that tries to erase its line and pass for a verified
        one from someone else shows as one line from its real sender with
        the escape visible; a group name with every class is shown
        neutralised in chats and history; --json keeps both exact."""
        alice, bob = self.mktemp(), self.mktemp()
        for profile, name in ((alice, "alice"), (bob, "bob")):
            await self.ok(profile, "init")
            await self.ok(profile, "register", name, "--prekeys", "3")
        await self.ok(bob, "send", "alice", FORGED)
        # No NUL in a command line: the text comes in on standard input.
        await self.ok(bob, "send", "alice", "-", stdin="a" + EVERY)
        shown = await self.ok(alice, "history", "bob")
        self.assertNothingRaw(shown)
        first = shown.splitlines()[0]
        self.assertIn("bob ✓ (unverified contact): ␛[2K␍[12:00:00] carol ✓: wire me", first)
        exact = json.loads(await self.ok(alice, "--json", "history", "bob"))["messages"]
        self.assertEqual([m["text"] for m in exact], [FORGED, "a" + EVERY])
        group = json.loads(await self.ok(bob, "--json", "group", "create",
                                         "Club" + EVERY.replace("\x00", ""), "alice"))["chatId"]
        await self.ok(bob, "send", group, "hello club")
        chats = await self.ok(alice, "chats")
        self.assertNothingRaw(chats)
        self.assertIn("Club␛[2K␍", chats)
        listed = json.loads(await self.ok(alice, "--json", "chats"))["chats"]
        self.assertIn("Club" + EVERY.replace("\x00", ""), [c.get("name") for c in listed])
        self.assertNothingRaw(await self.ok(alice, "history", group))
