"""
What a person expects of ``cyphr-client``: empty messages refused before
the passphrase is asked, ``send CONTACT -`` reading standard input, Ctrl-D
at a prompt ending the command cleanly, no Python traceback, contacts
with display names and search, groups by name.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr.client import cli
from cyphr.client.client import Client
from tests.helpers import SQLiteMixin, start_server

STRONG = "correct horse battery staple 4711"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def main(*argv: str, stdin: io.StringIO | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = stdin or io.StringIO(""), out, err
    try:
        status = cli.main(list(argv))
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    return status, out.getvalue(), err.getvalue()


class Sent:
    cyphr_id = "alice"
    no_session = None  # sent over sessions

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def _direct_chat_with(self, cyphr_id: str) -> str:
        return "00000000-0000-4000-8000-000000000001"

    def send(self, to: str, text: str, message_type: str) -> dict[str, Any]:
        self.sent.append((to, text))
        return {"chatId": to, "seq": 1}


class CommandTests(SynchronousTestCase):
    def test_empty_message_refused_before_the_passphrase(self) -> None:
        """An empty or whitespace-only message is refused, and the profile
        is not opened (no passphrase asked) for it."""
        opened: list[Any] = []
        self.patch(cli, "_open", lambda args: opened.append(args))
        for words in ([""], ["  ", "\t"], ["-"]):
            status, out, err = main("send", "bob", *words, stdin=io.StringIO(" \n"))
            self.assertEqual(status, 1)
            self.assertIn("an empty message is not sent", err)
        self.assertEqual(opened, [])

    def test_send_reads_standard_input(self) -> None:
        """send CONTACT - sends standard input, lines and all, without its
        final line break."""
        client = Sent()
        self.patch(cli, "_open", lambda args: client)
        status, out, err = main("send", "bob", "-", stdin=io.StringIO("two\nlines\n"))
        self.assertEqual(status, 0, err)
        self.assertEqual(client.sent, [("bob", "two\nlines")])

    def test_ctrl_d_at_a_prompt(self) -> None:
        """Ctrl-D at a prompt (end of input) ends the command with one
        line and status 1, no traceback."""
        def end_of_input(prompt: str = "") -> str:
            raise EOFError

        self.patch(cli.getpass, "getpass", end_of_input)
        status, out, err = main("--profile", self.mktemp(), "whoami", stdin=Terminal(""))
        self.assertEqual(status, 1)
        self.assertEqual(err.strip(), "cyphr-client: cancelled")

    def test_no_traceback(self) -> None:
        """An unexpected error is one line on stderr and status 1."""
        def broken(args: Any) -> Any:
            raise KeyError("surprise")

        self.patch(cli, "_open", broken)
        status, out, err = main("whoami")
        self.assertEqual(status, 1)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertNotIn("Traceback", err)
        self.assertIn("KeyError", err)


class PeopleTests(SQLiteMixin, TestCase):
    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    async def test_contacts_and_groups_by_name(self) -> None:
        """contacts lists the people in direct chats with their display
        names and finds them by part of the name; history and listen lines
        show the sender's display name; a group is addressed by its name
        in send, history and group members."""
        await deferToThread(self.scenario)

    def scenario(self) -> None:
        bob, _ = Client.init(self.mktemp(), STRONG, self.url)
        self.addCleanup(bob.close)
        bob.register("bob", display_name="Bobby Tables", prekeys=3)
        passphrase = Path(self.mktemp()).resolve()
        passphrase.write_text(STRONG)
        alice = str(Path(self.mktemp()).resolve())
        common = ["--server", self.url, "--profile", alice, "--passphrase-file", str(passphrase)]
        self.assertEqual(main(*common, "init")[0], 0)
        self.assertEqual(main(*common, "register", "alice", "--prekeys", "3")[0], 0)
        bob.send("alice", "hi alice")
        status, out, err = main(*common, "contacts")
        self.assertEqual((status, out.strip()), (0, "bob (Bobby Tables)"), err)
        status, out, err = main(*common, "--json", "contacts", "tabl")
        self.assertEqual(json.loads(out)["contacts"],
                         [{"cyphrId": "bob", "displayName": "Bobby Tables"}])
        status, out, err = main(*common, "contacts", "nobody")
        self.assertEqual(out.strip(), "Nobody matches.")
        status, out, err = main(*common, "history", "bob")
        self.assertIn("bob (Bobby Tables) ✓ (unverified contact): hi alice", out)
        status, out, err = main(*common, "--json", "group", "create", "Chess club", "bob")
        self.assertEqual(status, 0, err)
        chat = json.loads(out)["chatId"]
        self.assertEqual(main(*common, "send", "Chess club", "first move")[0], 0)
        status, out, err = main(*common, "--json", "history", "Chess club")
        self.assertIn("first move", [m["text"] for m in json.loads(out)["messages"]])
        status, out, err = main(*common, "--json", "group", "members", "Chess club")
        self.assertEqual(status, 0, err)
        self.assertEqual(sorted(m["cyphrId"] for m in json.loads(out)["members"]),
                         ["alice", "bob"])
        self.assertTrue(chat)
