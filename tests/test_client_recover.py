"""
Recovery on a new device of an account with two-factor login: ``recover
--totp CODE`` (``Client.recover`` sends ``totpCode``); without a code the
error says to give one to recover, not to log in.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pyotp
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.client import cli
from cyphr.client.client import Client
from tests.helpers import SQLiteMixin, start_server

STRONG = "correct horse battery staple 4711"


class RecoverWithTotpTests(SQLiteMixin, TestCase):
    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    def main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin, sys.stdout, sys.stderr
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(""), out, err
        try:
            status = cli.main(list(argv))
        finally:
            sys.stdin, sys.stdout, sys.stderr = saved
        return status, out.getvalue(), err.getvalue()

    async def test_recover_with_totp(self) -> None:
        """Without --totp, recover fails, and the hint is to run recover
        with --totp (not login); with the current code it succeeds, and the
        new profile lists the old messages but cannot open what was sent
        over sessions before it."""
        await deferToThread(self.scenario)

    def scenario(self) -> None:
        alice, phrase = Client.init(self.mktemp(), STRONG, self.url)
        self.addCleanup(alice.close)
        alice.register("alice", prekeys=2)
        secret = alice.totp_generate()["secret"]
        alice.totp_verify(pyotp.TOTP(secret).now())
        alice.send("alice", "note to self")
        phrase_file = Path(self.mktemp()).resolve()
        phrase_file.write_text(phrase)
        passphrase = Path(self.mktemp()).resolve()
        passphrase.write_text(STRONG)
        moved = str(Path(self.mktemp()).resolve())
        common = ["--server", self.url, "--profile", moved, "--passphrase-file", str(passphrase)]
        status, out, err = self.main(*common, "recover", "alice", "--phrase-file", str(phrase_file))
        self.assertEqual(status, 1)
        self.assertIn("TOTP_REQUIRED", err)
        self.assertIn("recover CYPHR_ID --totp CODE", err)
        self.assertNotIn("login --totp", err)
        # The next period's code: the one just used for set-up is taken.
        import time
        code = pyotp.TOTP(secret).at(time.time() + 30)
        status, out, err = self.main(*common, "recover", "alice", "--phrase-file",
                                     str(phrase_file), "--totp", code)
        self.assertEqual(status, 0, err)
        status, out, err = self.main(*common, "history", "alice")
        self.assertEqual(status, 0, err)
        # Sent over sessions: its key was kept on the old device only, so the
        # phrase does not open it (docs/encryption.rst, "What a new device reads").
        self.assertNotIn("note to self", out)
        self.assertIn("not a recipient", out)
