"""
The hardening of the reference client's edges: which servers it talks to
(plain HTTP only to loopback, TLS checks off only when confirmed), where
secrets come from (a prompt, a file or a file descriptor, never the
environment), the passphrase floor of a new profile, what ``init --json``
prints, and the command line of ``verify --accept NUMBER``, ``history``
(with its receipt marks), ``login --totp`` and ``wallet link --address``.
Most run in-process against ``cli.main`` with stand-ins for the network; a
few run the command as a script does.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyotp
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr.client import cli
from cyphr.client.client import Client, Contact, IdentityChanged, Message, Receipts
from cyphr.client.http import INSECURE_TLS_VARIABLE, ClientError, Http, check_server
from cyphr.client.profile import Profile, ProfileError, _derive, check_passphrase
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.receipts import ReceiptsHandler
from cyphr.store.chats import ChatStore
from cyphr.store.messages import MessageStore
from tests.helpers import CLIENT, SQLiteMixin, cli_in_process, run_cli_main, start_server

ROOT = Path(__file__).resolve().parent.parent
STRONG = "correct horse battery staple 4711"
NUMBER = " ".join(f"{i:05d}" for i in range(12000, 12012))  # 12 groups of 5 digits


class Environment:
    """Set (or, with None, remove) environment variables for one test."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.testcase = testcase

    def set(self, **values: str | None) -> None:
        for name, value in values.items():
            old = os.environ.get(name)
            self.testcase.addCleanup(self._restore, name, old)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    @staticmethod
    def _restore(name: str, value: str | None) -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class Terminal(io.StringIO):
    """Standard input that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class CliTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.env = Environment(self)
        self.env.set(CYPHR_SERVER=None, CYPHR_PROFILE=None, CYPHR_PASSPHRASE=None,
                     CYPHR_STELLAR_SECRET=None, **{INSECURE_TLS_VARIABLE: None})
        # Not a terminal unless a test says so: no prompt may block the run.
        self.patch(sys, "stdin", io.StringIO(""))

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        """cli.main in this process: its status, stdout and stderr."""
        return run_cli_main(self, *argv)

    def passphrase_file(self, passphrase: str = STRONG) -> str:
        path = Path(self.mktemp()).resolve()  # scripts run elsewhere
        path.write_text(passphrase + "\n")
        return str(path)


# -- 1. transport ---------------------------------------------------------------

class TransportTests(CliTestCase):
    def test_https_anywhere(self) -> None:
        """https:// is accepted for any host, with or without a port or path."""
        for url in ("https://cyphr.example", "https://cyphr.example:8443/",
                    "https://10.1.2.3/cyphr", "HTTPS://Cyphr.Example"):
            check_server(url)

    def test_plain_http_to_loopback_only(self) -> None:
        """http:// is accepted for localhost, *.localhost, 127.0.0.0/8 and
        ::1, and refused for every other host with a ClientError that says
        why and what to use."""
        for url in ("http://localhost:3001", "http://LOCALHOST", "http://cyphr.localhost:3001",
                    "http://127.0.0.1:3001/", "http://127.8.9.10", "http://[::1]:3001"):
            self.assertEqual(check_server(url), url.rstrip("/"))
        for url in ("http://cyphr.example", "http://10.0.0.1:3001", "http://192.168.1.2",
                    "http://localhost.evil.example", "http://127.0.0.1.evil.example",
                    "http://[::2]:3001", "http://0.0.0.0:3001"):
            with self.assertRaises(ClientError) as raised:
                check_server(url)
            self.assertIn("refusing plain http://", str(raised.exception))
            self.assertIn("https://", str(raised.exception))

    def test_not_a_server_url(self) -> None:
        """Anything but an http(s) URL with a host is a ClientError."""
        for url in ("localhost:3001", "ftp://cyphr.example", "https://", "cyphr.example",
                    "https://user:pw@cyphr.example"):
            with self.assertRaises(ClientError):
                check_server(url)

    def test_http_obeys_it(self) -> None:
        """The library's Http refuses the same servers, so library users
        and the command line are held to one rule."""
        with self.assertRaises(ClientError):
            Http("http://cyphr.example")
        self.assertEqual(Http("http://127.0.0.1:3001/").server, "http://127.0.0.1:3001")
        self.assertEqual(Http("https://cyphr.example/").server, "https://cyphr.example")

    def test_library_init_leaves_no_profile_for_a_refused_server(self) -> None:
        """Client.init refuses plain http:// to a remote host before it
        makes a profile."""
        from cyphr.client import Client

        directory = Path(self.mktemp())
        with self.assertRaises(ClientError):
            Client.init(directory, "correct horse battery staple 4711", "http://cyphr.example")
        self.assertFalse(directory.exists())

    def test_insecure_tls_needs_the_environment(self) -> None:
        """Turning TLS checks off is refused, naming the variable, unless
        CYPHR_ALLOW_INSECURE_TLS=1 is set; "1" and nothing else confirms."""
        for value in (None, "", "0", "yes", "true"):
            self.env.set(**{INSECURE_TLS_VARIABLE: value})
            with self.assertRaises(ClientError) as raised:
                Http("https://cyphr.example", verify=False)
            self.assertIn(f"{INSECURE_TLS_VARIABLE}=1", str(raised.exception))
        # A CA bundle is not "off".
        Http("https://cyphr.example", verify="/etc/ssl/certs/ca-certificates.crt")
        self.env.set(**{INSECURE_TLS_VARIABLE: "1"})
        self.assertFalse(Http("https://cyphr.example", verify=False).session.verify)

    def test_cli_insecure_tls(self) -> None:
        """--insecure-tls without the variable stops the command before it
        asks for anything, naming the variable; with it, the command runs and
        says on stderr that certificates are not checked."""
        profile = self.mktemp()
        status, out, err = self.run_main("--profile", profile, "--insecure-tls",
                                         "--passphrase-file", self.passphrase_file(),
                                         "--server", "https://cyphr.example", "init")
        self.assertEqual((status, out), (1, ""))
        self.assertIn(INSECURE_TLS_VARIABLE, err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertFalse(Profile.exists(profile))
        self.env.set(**{INSECURE_TLS_VARIABLE: "1"})
        status, out, err = self.run_main("--profile", profile, "--insecure-tls",
                                         "--passphrase-file", self.passphrase_file(),
                                         "--server", "https://cyphr.example", "init")
        self.assertEqual(status, 0, err)
        self.assertIn("not checking the server's TLS certificate", err)

    def test_cli_refuses_plain_http_before_making_a_profile(self) -> None:
        """init with an http:// server that is not loopback fails in one
        line and leaves no profile behind."""
        profile = self.mktemp()
        status, out, err = self.run_main("--profile", profile, "--server",
                                         "http://cyphr.example", "--passphrase-file",
                                         self.passphrase_file(), "init")
        self.assertEqual(status, 1)
        self.assertIn("refusing plain http:// to http://cyphr.example", err)
        self.assertFalse(Path(profile).exists())

    def test_cli_refuses_plain_http_for_an_existing_profile(self) -> None:
        """A registered profile opened with --server http://remote is
        refused before the passphrase is asked for."""
        profile = self.mktemp()
        self.assertEqual(self.run_main("--profile", profile, "--passphrase-file",
                                       self.passphrase_file(), "init")[0], 0)
        status, _, err = self.run_main("--profile", profile, "--server", "http://10.0.0.1:3001",
                                       "whoami")
        self.assertEqual(status, 1)
        self.assertIn("refusing plain http://", err)


# -- 2. secrets -----------------------------------------------------------------

class SecretSourceTests(CliTestCase):
    def test_passphrase_file(self) -> None:
        """--passphrase-file seals the new profile with the file's first
        line, its final line break left out."""
        profile = self.mktemp()
        status, _, err = self.run_main("--profile", profile, "--passphrase-file",
                                       self.passphrase_file(), "init")
        self.assertEqual(status, 0, err)
        Profile.open(profile, STRONG)

    def test_passphrase_fd(self) -> None:
        """--passphrase-fd N reads one line from the descriptor and nothing
        after it (standard input may carry more)."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        os.write(write, STRONG.encode() + b"\nthe rest stays\n")
        os.close(write)
        profile = self.mktemp()
        status, _, err = self.run_main("--profile", profile, "--passphrase-fd", str(read), "init")
        self.assertEqual(status, 0, err)
        Profile.open(profile, STRONG)
        self.assertEqual(os.read(read, 100), b"the rest stays\n")

    def test_bad_fd(self) -> None:
        """A descriptor that is not open is a one-line error."""
        read, write = os.pipe()
        os.close(read)
        os.close(write)
        status, _, err = self.run_main("--profile", self.mktemp(), "--passphrase-fd",
                                       str(read), "init")
        self.assertEqual(status, 1)
        self.assertIn(f"cannot read the passphrase from file descriptor {read}", err)

    def test_file_and_fd_exclusive(self) -> None:
        """The passphrase comes from one place: --passphrase-file and
        --passphrase-fd together are a usage error."""
        with self.assertRaises(SystemExit):
            self.run_main("--passphrase-file", "x", "--passphrase-fd", "3", "init")

    def test_prompt_asks_twice_when_creating(self) -> None:
        """On a terminal, init asks for the passphrase twice and refuses two
        that differ, making no profile."""
        self.patch(sys, "stdin", Terminal())
        answers = [STRONG, STRONG]
        asked: list[str] = []

        def getpass(prompt: str = "") -> str:
            asked.append(prompt)
            return answers.pop(0)

        self.patch(cli.getpass, "getpass", getpass)
        profile = self.mktemp()
        status, out, err = self.run_main("--profile", profile, "init")
        self.assertEqual(status, 0, err)
        self.assertEqual(len(asked), 2)
        Profile.open(profile, STRONG)
        answers[:] = [STRONG, STRONG + "!"]
        other = self.mktemp()
        status, _, err = self.run_main("--profile", other, "init")
        self.assertEqual(status, 1)
        self.assertIn("passphrases differ", err)
        self.assertFalse(Profile.exists(other))

    def test_prompt_refuses_weak_at_once(self) -> None:
        """A weak passphrase typed at the prompt is refused, with the
        estimator's reason, before it is asked a second time."""
        self.patch(sys, "stdin", Terminal())
        asked: list[str] = []
        self.patch(cli.getpass, "getpass", lambda prompt="": asked.append(prompt) or "password1234")
        profile = self.mktemp()
        status, _, err = self.run_main("--profile", profile, "init")
        self.assertEqual((status, len(asked)), (1, 1))
        self.assertIn("too easy to guess", err)
        self.assertIn("very common password", err)
        self.assertFalse(Profile.exists(profile))

    def test_environment_is_ignored_and_said_so(self) -> None:
        """CYPHR_PASSPHRASE and CYPHR_STELLAR_SECRET are not read: when set,
        stderr says they are ignored and why, and without another source of
        the passphrase the command stops (no prompt off a terminal)."""
        self.env.set(CYPHR_PASSPHRASE=STRONG, CYPHR_STELLAR_SECRET="S" * 56)
        profile = self.mktemp()
        status, out, err = self.run_main("--profile", profile, "init")
        self.assertEqual((status, out), (1, ""))
        for name in ("CYPHR_PASSPHRASE", "CYPHR_STELLAR_SECRET"):
            self.assertIn(f"{name} is set and ignored", err)
        self.assertIn("secrets are not read from the environment", err)
        self.assertIn("no passphrase: give --passphrase-file or --passphrase-fd", err)
        self.assertFalse(Profile.exists(profile))
        # With a file, the file's passphrase seals it, not the variable's.
        other = "a different passphrase entirely 8812"
        status, _, err = self.run_main("--profile", profile, "--passphrase-file",
                                       self.passphrase_file(other), "init")
        self.assertEqual(status, 0, err)
        Profile.open(profile, other)
        with self.assertRaises(ProfileError):
            Profile.open(profile, STRONG)

    def test_stellar_secret_not_from_environment(self) -> None:
        """wallet link does not take the seed from CYPHR_STELLAR_SECRET: off
        a terminal and without --secret-file/--secret-fd/--address it stops."""
        self.env.set(CYPHR_STELLAR_SECRET="S" * 56)
        client = FakeClient()
        self.patch(cli, "_open", lambda args: client)
        status, _, err = self.run_main("wallet", "link")
        self.assertEqual(status, 1)
        self.assertIn("no Stellar secret: give --secret-file, --secret-fd or --address", err)
        self.assertEqual(client.calls, [])

    def test_stellar_secret_fd(self) -> None:
        """--secret-fd N hands the seed on that descriptor to wallet_link."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        os.write(write, b"SSEED\n")
        os.close(write)
        client = FakeClient()
        self.patch(cli, "_open", lambda args: client)
        status, out, err = self.run_main("--json", "wallet", "link", "--secret-fd", str(read))
        self.assertEqual(status, 0, err)
        self.assertEqual(client.calls, [("wallet_link", "SSEED")])

    def test_script_run(self) -> None:
        """As a script runs it (a separate process, stdin not a terminal):
        CYPHR_PASSPHRASE is named as ignored and --passphrase-file used."""
        profile = os.path.abspath(self.mktemp())
        env = dict(os.environ, PYTHONPATH=str(ROOT), CYPHR_PASSPHRASE="ignored")
        result = subprocess.run(
            [sys.executable, "-m", "cyphr.client.cli", "--profile", profile, "--json",
             "--passphrase-file", self.passphrase_file(), "init"],
            env=env, capture_output=True, text=True, timeout=60, cwd=str(ROOT),
            stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("CYPHR_PASSPHRASE is set and ignored", result.stderr)
        self.assertEqual(json.loads(result.stdout), {"profile": profile})
        Profile.open(profile, STRONG)


# -- 3. the passphrase floor ------------------------------------------------------

class PassphraseFloorTests(SynchronousTestCase):
    def test_strong_passes(self) -> None:
        """A few uncommon words pass, also past zxcvbn's 72 characters."""
        check_passphrase(STRONG)
        check_passphrase("velvet tundra origami 58 lantern " * 5)

    def test_short_refused(self) -> None:
        """Fewer than 12 characters is refused, however random."""
        with self.assertRaises(ProfileError) as raised:
            check_passphrase("x7#Qp!2vZ9a")
        self.assertIn("at least 12 characters", str(raised.exception))

    def test_guessable_refused_with_feedback(self) -> None:
        """A long but guessable passphrase is refused with zxcvbn's reason."""
        for weak, why in (("password1234", "very common password"),
                          ("aaaaaaaaaaaaaaaa", "Repeats"),
                          ("qwertyuiop12", "commonly used password")):
            with self.assertRaises(ProfileError) as raised:
                check_passphrase(weak)
            self.assertIn("too easy to guess", str(raised.exception))
            self.assertIn(why, str(raised.exception))

    def test_create_obeys_it(self) -> None:
        """Profile.create (and so Client.init and recover) refuses a weak
        passphrase and writes nothing."""
        directory = Path(self.mktemp())
        for weak in ("", "pw", "password1234"):
            with self.assertRaises(ProfileError):
                Profile.create(directory, weak, {}, {"seed": "x"})
            self.assertFalse(Profile.exists(directory))
        with self.assertRaises(ProfileError):
            Client.init(directory, "password1234", "http://127.0.0.1:3001")
        Profile.create(directory, STRONG, {}, {"seed": "x"})
        self.assertEqual(Profile.open(directory, STRONG).vault, {"seed": "x"})

    def test_open_is_not_subject_to_it(self) -> None:
        """A profile sealed before the floor, with a weak passphrase, still
        opens."""
        directory = Path(self.mktemp())
        directory.mkdir(mode=0o700)
        salt = os.urandom(16)
        Profile(directory, {"format": 1}, {"seed": "x"}, _derive("pw", salt, 1, 8192), salt,
                1, 8192).save()
        self.assertEqual(Profile.open(directory, "pw").vault, {"seed": "x"})


# -- 4. the recovery phrase in --json ---------------------------------------------

class InitOutputTests(CliTestCase):
    def init(self, *options: str) -> tuple[int, str, str]:
        return self.run_main("--profile", self.mktemp(), "--passphrase-file",
                             self.passphrase_file(), *options)

    def test_json_leaves_the_phrase_out(self) -> None:
        """init --json prints no recovery phrase, and says on stderr how to
        get it and what leaving it out means."""
        status, out, err = self.init("--json", "init")
        self.assertEqual(status, 0, err)
        self.assertNotIn("recoveryPhrase", json.loads(out))
        self.assertIn("--show-phrase", err)
        self.assertIn("cannot be recovered", err)

    def test_json_show_phrase(self) -> None:
        """init --json --show-phrase includes the 24 words."""
        status, out, err = self.init("--json", "init", "--show-phrase")
        self.assertEqual(status, 0, err)
        self.assertEqual(len(json.loads(out)["recoveryPhrase"].split()), 24)
        self.assertEqual(err, "")

    def test_text_shows_the_phrase(self) -> None:
        """Text output shows the phrase once, as before: that is its purpose."""
        status, out, err = self.init("init")
        self.assertEqual(status, 0, err)
        self.assertIn("recovery phrase", out)
        words = [line for line in out.splitlines() if line.startswith("    ")]
        self.assertEqual(len(words[0].split()), 24)


# -- 5 and 6: verify, the verification marker, wallet link ------------------------

class FakeClient:
    """The library as the commands see it, without a server."""

    cyphr_id = "alice"

    def __init__(self, contact: Contact | None = None, changed: str | None = None,
                 messages: list[Message] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._contact = contact
        self._changed = changed
        self._messages = messages or []

    def contact(self, cyphr_id: str) -> Contact:
        self.calls.append(("contact", cyphr_id))
        if self._changed:
            raise IdentityChanged(cyphr_id, self._changed, NUMBER)
        assert self._contact is not None
        return self._contact

    def accept_identity(self, cyphr_id: str, number: str) -> Contact:
        self.calls.append(("accept_identity", cyphr_id, number))
        if self._contact is None or number != self._contact.safety_number:
            raise ClientError(f"the safety number of {cyphr_id} is not the one you compared")
        return dataclasses.replace(self._contact, verified=True)

    def history(self, chat_id: str, limit: int, before: int | None) -> list[Message]:
        return self._messages

    def display_name(self, cyphr_id: str) -> str | None:
        return None

    def wallet_link(self, secret: str) -> str:
        self.calls.append(("wallet_link", secret))
        return "GLINKED"

    def wallet_link_text(self, address: str) -> tuple[str, str]:
        self.calls.append(("wallet_link_text", address))
        return "challenge-1", f"cyphr-v2 wallet link\naddress: {address}\n"

    def wallet_link_signed(self, address: str, challenge_id: str, signature: str) -> str:
        self.calls.append(("wallet_link_signed", address, challenge_id, signature))
        return address


def contact(verified: bool = False) -> Contact:
    return Contact("bob", b"k" * 32, b"p" * 1568, NUMBER, verified)


def message(sender: str, contact_verified: bool, verified: bool = True,
            error: str | None = None) -> Message:
    return Message(id="m1", chat_id="00000000-0000-4000-8000-000000000001", seq=1,
                   sender=sender, timestamp="2026-11-28T14:02:11.000Z", message_type="text",
                   text="hi", verified=verified, error=error, contact_verified=contact_verified)


class VerifyTests(CliTestCase):
    def test_safety_number_forms(self) -> None:
        """--accept takes all 60 digits, spaces (or none) anywhere, and
        nothing else."""
        digits = NUMBER.replace(" ", "")
        for typed in (NUMBER, digits, " ".join(digits[i:i + 3] for i in range(0, 60, 3)),
                      f"  {NUMBER}\n"):
            self.assertEqual(cli.safety_number(typed), NUMBER)
        for typed in ("", digits[:-1], digits + "1", digits[:-1] + "x", "٠" * 60):
            with self.assertRaises(cli.UsageError):
                cli.safety_number(typed)

    def test_accept_passes_the_number(self) -> None:
        """verify --accept NUMBER hands the compared number to the library
        (compare-and-swap) and reports the contact verified."""
        client = FakeClient(contact())
        self.patch(cli, "_open", lambda args: client)
        status, out, err = self.run_main("--json", "verify", "bob", "--accept",
                                         NUMBER.replace(" ", ""))
        self.assertEqual(status, 0, err)
        self.assertEqual(client.calls, [("accept_identity", "bob", NUMBER)])
        self.assertEqual(json.loads(out), {"cyphrId": "bob", "safetyNumber": NUMBER,
                                           "verified": True})

    def test_accept_other_number_fails(self) -> None:
        """A number that is not the current key's fails in one line."""
        client = FakeClient(contact())
        self.patch(cli, "_open", lambda args: client)
        status, out, err = self.run_main("verify", "bob", "--accept", "1" * 60)
        self.assertEqual((status, out), (1, ""))
        self.assertIn("not the one you compared", err)

    def test_accept_malformed_fails_before_opening(self) -> None:
        """A mistyped number fails before the profile is opened."""
        self.patch(cli, "_open", lambda args: self.fail("opened"))
        status, _, err = self.run_main("verify", "bob", "--accept", "12345 678")
        self.assertEqual(status, 1)
        self.assertIn("60-digit safety number", err)

    def test_without_accept_shows_the_command(self) -> None:
        """verify CONTACT shows the number and how to accept it: by typing
        the number compared, not a bare --accept."""
        self.patch(cli, "_open", lambda args: FakeClient(contact()))
        status, out, err = self.run_main("verify", "bob")
        self.assertEqual(status, 0, err)
        self.assertIn(NUMBER, out)
        self.assertIn('cyphr-client verify bob --accept "<the 60 digits you compared>"', out)

    def test_changed_key_shows_its_number(self) -> None:
        """When the key is not the pinned one, verify still shows the number
        (comparing it is how the user finds out), says so, and exits 1."""
        other = NUMBER.replace("1", "7")
        self.patch(cli, "_open", lambda args: FakeClient(changed=other))
        status, out, err = self.run_main("--json", "verify", "bob")
        self.assertEqual(status, 1)
        self.assertEqual(json.loads(out), {"cyphrId": "bob", "safetyNumber": other,
                                           "pinnedSafetyNumber": NUMBER,
                                           "verified": False, "identityChanged": True})
        status, out, err = self.run_main("verify", "bob")
        self.assertEqual(status, 1)
        self.assertIn(f"key pinned here:\n\n    {NUMBER}", out)
        self.assertIn(f"server shows now:\n\n    {other}", out)


class MessageMarkTests(CliTestCase):
    def test_line(self) -> None:
        """A verified contact's message has ✓ alone; an unverified one's
        says so; one's own needs no marker; a bad signature is ?."""
        self.assertIn("bob ✓: hi", cli.line(message("bob", True), "alice"))
        self.assertIn("bob ✓ (unverified contact): hi", cli.line(message("bob", False), "alice"))
        self.assertIn("alice ✓: hi", cli.line(message("alice", False), "alice"))
        self.assertIn("bob ? (unverified contact): hi",
                      cli.line(message("bob", False, verified=False), "alice"))

    def test_an_unproven_message_says_why(self) -> None:
        """A message that opened but whose signature proves nothing (v1)
        shows the reason beside its text."""
        old = message("bob", True, verified=False, error="sealed under v1")
        self.assertIn("bob ? (sealed under v1): hi", cli.line(old, "alice"))

    def test_history(self) -> None:
        """history shows the marker, and contactVerified in --json."""
        client = FakeClient(messages=[message("bob", False), message("carol", True)])
        self.patch(cli, "_open", lambda args: client)
        chat = "00000000-0000-4000-8000-000000000001"
        status, out, err = self.run_main("history", chat)
        self.assertEqual(status, 0, err)
        self.assertIn("bob ✓ (unverified contact): hi", out)
        self.assertIn("carol ✓: hi", out)
        status, out, err = self.run_main("--json", "history", chat)
        self.assertEqual([(m["sender"], m["contactVerified"]) for m in json.loads(out)["messages"]],
                         [("bob", False), ("carol", True)])


class ReceiptsParseTests(SynchronousTestCase):
    def test_only_the_documented_shape(self) -> None:
        """The client takes a message's receipts only as two lists of
        Cyphr IDs; anything else a server sends is no receipts at all."""
        self.assertEqual(Receipts.parse({"delivered": ["bob", "carol"], "read": ["carol"]}),
                         Receipts(("bob", "carol"), ("carol",)))
        self.assertEqual(Receipts.parse({"delivered": [], "read": []}), Receipts())
        for bad in (None, [], "read", {"delivered": ["bob"]}, {"delivered": "bob", "read": []},
                    {"delivered": [1], "read": []}, {"delivered": [], "read": [None]}):
            self.assertIsNone(Receipts.parse(bad), bad)


class WalletLinkTests(CliTestCase):
    ADDRESS = "GAAZI4TCR3TY5OJHCTJC2A4QSY6CJWJH5IAJTGKIN2ER7LBNVKOCCWN7"

    def test_own_wallet(self) -> None:
        """wallet link --address shows the text to sign (exactly, between
        markers), reads the base64 signature from stdin, and submits it with
        the challenge id."""
        client = FakeClient()
        self.patch(cli, "_open", lambda args: client)
        signature = "A" * 86 + "=="  # 64 bytes
        self.patch(sys, "stdin", io.StringIO(signature + "\n"))
        status, out, err = self.run_main("wallet", "link", "--address", self.ADDRESS)
        self.assertEqual(status, 0, err)
        self.assertIn(f"-----BEGIN MESSAGE-----\ncyphr-v2 wallet link\naddress: {self.ADDRESS}\n"
                      f"-----END MESSAGE-----", out)
        self.assertIn("SEP-53", out)
        self.assertTrue(out.endswith(f"Linked {self.ADDRESS}.\n"))
        self.assertEqual(client.calls, [
            ("wallet_link_text", self.ADDRESS),
            ("wallet_link_signed", self.ADDRESS, "challenge-1", signature)])

    def test_own_wallet_json(self) -> None:
        """With --json: a line with the text and challenge id, then the result."""
        self.patch(cli, "_open", lambda args: FakeClient())
        self.patch(sys, "stdin", io.StringIO("A" * 86 + "==\n"))
        status, out, err = self.run_main("--json", "wallet", "link", "--address", self.ADDRESS)
        self.assertEqual(status, 0, err)
        first, second = (json.loads(line) for line in out.splitlines())
        self.assertEqual(first["challengeId"], "challenge-1")
        self.assertIn(self.ADDRESS, first["text"])
        self.assertEqual(second, {"stellarAddress": self.ADDRESS})

    def test_own_wallet_refusals(self) -> None:
        """No signature, not base64, not 64 bytes, or not an address: one
        line, nothing submitted."""
        for address, typed, why in ((self.ADDRESS, "", "no signature"),
                                    (self.ADDRESS, "not base64!", "not base64"),
                                    (self.ADDRESS, "AAAA", "3 bytes"),
                                    ("GNOTANADDRESS", "A" * 86 + "==", "not a Stellar account")):
            client = FakeClient()
            self.patch(cli, "_open", lambda args: client)
            self.patch(sys, "stdin", io.StringIO(typed + "\n"))
            status, _, err = self.run_main("wallet", "link", "--address", address)
            self.assertEqual(status, 1)
            self.assertIn(why, err)
            self.assertNotIn("wallet_link_signed", [c[0] for c in client.calls])

    def test_secret_file(self) -> None:
        """--secret-file still signs here with the seed from the file."""
        client = FakeClient()
        self.patch(cli, "_open", lambda args: client)
        path = Path(self.mktemp())
        path.write_text("SSEED\n")
        status, out, err = self.run_main("wallet", "link", "--secret-file", str(path))
        self.assertEqual(status, 0, err)
        self.assertEqual(client.calls, [("wallet_link", "SSEED")])


# -- against a real server, as a script runs the command --------------------------

class RealServerTests(SQLiteMixin, TestCase):
    """verify --accept NUMBER, history's receipts, login --totp and wallet
    link --address end to end against a server on a real port, as a script
    runs them: cli.main in this process (cli_in_process), and wallet link,
    which a wallet answers on standard input, as a separate process."""

    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    def arguments(self, profile: str, *args: str) -> list[str]:
        passphrase = Path(f"{os.path.abspath(profile)}.passphrase")
        passphrase.write_text(f"passphrase for {passphrase}")
        return ["--server", self.url, "--profile",
                os.path.abspath(profile), "--passphrase-file", str(passphrase), *args]

    def command(self, profile: str, *args: str) -> list[str]:
        return [*CLIENT, *self.arguments(profile, *args)]

    async def cli(self, profile: str, *args: str) -> subprocess.CompletedProcess[str]:
        return await deferToThread(cli_in_process, self.arguments(profile, *args))

    async def ok(self, profile: str, *args: str) -> str:
        result = await self.cli(profile, *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    async def test_verify_accept_and_marker(self) -> None:
        """A message from a contact pinned on first use is marked
        unverified; --accept with another number pins nothing; with the
        number both sides see, the contact is verified and the marker goes."""
        alice, bob = self.mktemp(), self.mktemp()
        for profile, name in ((alice, "alice"), (bob, "bob")):
            await self.ok(profile, "init")
            await self.ok(profile, "register", name, "--prekeys", "2")
        await self.ok(bob, "send", "alice", "hello")
        self.assertIn("bob ✓ (unverified contact): hello", await self.ok(alice, "history", "bob"))
        theirs = json.loads(await self.ok(bob, "--json", "verify", "alice"))["safetyNumber"]
        shown = await self.ok(alice, "verify", "bob")
        self.assertIn(theirs, shown)
        self.assertIn('verify bob --accept "<the 60 digits you compared>"', shown)
        wrong = await self.cli(alice, "verify", "bob", "--accept", "1" * 60)
        self.assertEqual(wrong.returncode, 1)
        self.assertIn("nothing was pinned", wrong.stderr)
        accepted = json.loads(await self.ok(alice, "--json", "verify", "bob", "--accept",
                                            theirs.replace(" ", "")))
        self.assertTrue(accepted["verified"])
        self.assertIn("bob ✓: hello", await self.ok(alice, "history", "bob"))
        [message] = json.loads(await self.ok(alice, "--json", "history", "bob"))["messages"]
        self.assertTrue(message["contactVerified"])

    async def test_send_says_when_not_over_sessions(self) -> None:
        """send tells whether the message went over sessions: yes between
        two current clients; to a contact whose device published no
        session keys, no, and why, in its JSON and its text."""
        alice, bob = self.mktemp(), self.mktemp()
        for profile, name in ((alice, "alice"), (bob, "bob")):
            await self.ok(profile, "init")
            await self.ok(profile, "register", name, "--prekeys", "2")
        sent = json.loads(await self.ok(alice, "--json", "send", "bob", "over sessions"))
        self.assertIs(sent["sessions"], True)
        await self.server.database.run_operation(
            "DELETE FROM session_prekeys WHERE user_id ="
            " (SELECT id FROM cyphr_identities WHERE cyphr_id = 'alice')")
        told = await self.ok(bob, "send", "alice", "the old way")
        self.assertIn("Sealed as version 3, without forward secrecy: device 1 of alice published"
                      " no session keys", told)
        self.assertIn("bob ✓ (unverified contact): the old way", await self.ok(alice, "history", "bob"))

    async def test_history_shows_receipts(self) -> None:
        """history marks one's own messages with what the server recorded
        before the command ran (read by a read-up-to mark or by id,
        delivered, or only sent; in a group, counts of the other members),
        others' messages with nothing, and --json carries the server's
        receipts exactly, on one's own messages only."""
        alice, bob = self.mktemp(), self.mktemp()
        for profile, name in ((alice, "alice"), (bob, "bob")):
            await self.ok(profile, "init")
            await self.ok(profile, "register", name, "--prekeys", "2")
        sent = [json.loads(await self.ok(alice, "--json", "send", "bob", text))
                for text in ("first", "second", "third", "fourth")]
        await self.ok(bob, "send", "alice", "a reply")
        database = self.server.database
        receipts = ReceiptsHandler(ChatStore(database), MessageStore(database), self.server.clock)
        [(bob_id,)] = await database.run_query("SELECT id FROM cyphr_identities WHERE cyphr_id = 'bob'")
        as_bob = AuthUser(user_id=str(bob_id), cyphr_id="bob", jti="", expires_at=0, device_hash="",
                          device_id=1)
        chat = sent[0]["chatId"]
        await receipts.read_up_to(as_bob, chat, sent[0]["seq"])
        await receipts.read(as_bob, sent[1]["messageId"], chat)
        await receipts.delivered(as_bob, sent[2]["messageId"], chat)

        shown = (await self.ok(alice, "history", "bob")).splitlines()
        self.assertEqual(len(shown), 5, shown)
        for text, mark in zip(shown, ("first  · read", "second  · read", "third  · delivered",
                                      "fourth  · sent")):
            self.assertTrue(text.endswith(f"alice ✓: {mark}"), text)
        self.assertTrue(shown[4].endswith("bob ✓ (unverified contact): a reply"), shown[4])
        listed = json.loads(await self.ok(alice, "--json", "history", "bob"))["messages"]
        self.assertEqual([m.get("receipts") for m in listed], [
            {"delivered": ["bob"], "read": ["bob"]}, {"delivered": ["bob"], "read": ["bob"]},
            {"delivered": ["bob"], "read": []}, {"delivered": [], "read": []}, None])
        theirs = json.loads(await self.ok(bob, "--json", "history", "alice"))["messages"]
        self.assertEqual([m.get("receipts") for m in theirs],
                         [None, None, None, None, {"delivered": [], "read": []}])

        group = json.loads(await self.ok(alice, "--json", "group", "create", "Club", "bob"))["chatId"]
        posted = json.loads(await self.ok(alice, "--json", "send", group, "hello club"))
        await receipts.delivered(as_bob, posted["messageId"], group)
        self.assertIn("alice ✓: hello club  · delivered to 1/1, read by 0/1",
                      await self.ok(alice, "history", group))

    async def test_code_used_twice_said_plainly(self) -> None:
        """login --totp with a code used already fails with TOTP_CODE_USED
        and says to wait for the next code; a wrong code says INVALID_TOTP."""
        alice = self.mktemp()
        await self.ok(alice, "init")
        await self.ok(alice, "register", "alice", "--prekeys", "0")
        secret = json.loads(await self.ok(alice, "--json", "totp", "enable"))["secret"]
        await self.ok(alice, "totp", "confirm", pyotp.TOTP(secret).now())
        code = pyotp.TOTP(secret).at(time.time() + 30)
        await self.ok(alice, "login", "--totp", code)
        again = await self.cli(alice, "login", "--totp", code)
        self.assertEqual(again.returncode, 1)
        self.assertIn("This code was used already: wait for the next one (TOTP_CODE_USED)", again.stderr)
        self.assertIn("wait until your authenticator app shows a new code", again.stderr)
        self.assertNotIn("Traceback", again.stderr)
        near = {pyotp.TOTP(secret).at(time.time() + 30 * step) for step in range(-3, 4)}
        wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in near)
        refused = await self.cli(alice, "login", "--totp", wrong)
        self.assertIn("(INVALID_TOTP)", refused.stderr)

    async def test_wallet_link_own_wallet(self) -> None:
        """wallet link --address: the command prints the text, a wallet
        (here stellar-sdk's sign_message) signs it, the signature goes in on
        stdin, and the account is linked."""
        from stellar_sdk import Keypair

        alice = self.mktemp()
        await self.ok(alice, "init")
        await self.ok(alice, "register", "alice", "--prekeys", "0")
        keypair = Keypair.random()

        def link() -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
            process = subprocess.Popen(
                self.command(alice, "--json", "wallet", "link", "--address", keypair.public_key),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
            assert process.stdout is not None and process.stdin is not None
            to_sign = json.loads(process.stdout.readline())
            signature = base64.b64encode(keypair.sign_message(to_sign["text"])).decode()
            out, err = process.communicate(signature + "\n", timeout=60)
            return to_sign, subprocess.CompletedProcess([], process.returncode, out, err)

        to_sign, result = await deferToThread(link)
        self.assertIn("not a transaction", to_sign["text"])
        self.assertIn(keypair.public_key, to_sign["text"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), {"stellarAddress": keypair.public_key})
        shown = await self.ok(alice, "--json", "wallet", "show")
        self.assertEqual(json.loads(shown)["stellarAddress"], keypair.public_key)
