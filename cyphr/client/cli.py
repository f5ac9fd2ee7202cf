"""
``cyphr-client``: Cyphr from a terminal or a script.

Human-readable output by default, ``--json`` for scripts (one JSON object,
or one per line for ``listen``). Secrets (the profile passphrase, a Stellar
secret seed) come from a hidden prompt, a file or a file descriptor, never
from the environment, where other programs of the same user can read them
and every child process inherits them (crypto review F13). Errors are one
line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import os
import queue
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from cyphr import __version__
from cyphr.client.attachcrypto import safe_file_name
from cyphr.client.attachments import public_json
from cyphr.client.backup import Written
from cyphr.client.client import Client, IdentityChanged, Message, is_chat_id
from cyphr.client.crypto import CryptoError
from cyphr.client.devices import LinkCode, LinkRequest, parse_link_code
from cyphr.client.http import (
    INSECURE_TLS_VARIABLE,
    ApiError,
    ClientError,
    allow_insecure_tls,
    check_server,
)
from cyphr.client.profile import Profile, ProfileError, check_passphrase
from cyphr.client.render import human_size, line
from cyphr.client.render import person as _person
from cyphr.client.render import receipt_mark as _receipt_mark
from cyphr.client.render import time_text as _time
from cyphr.client.render import visible as _visible
from cyphr.client.terminal import json_line, safe, safe_lines

DEFAULT_SERVER = "http://localhost:3001"
DEFAULT_PROFILE = "~/.cyphr"
TRANSFER_BAR = 30  # characters of a transfer's progress bar

# Secrets the client once read from the environment: named when set, so
# that a script relying on them learns why it now stops at a prompt.
IGNORED_VARIABLES = {
    "CYPHR_PASSPHRASE": "--passphrase-file or --passphrase-fd",
    "CYPHR_STELLAR_SECRET": "wallet link --secret-file or --secret-fd",
}
SAFETY_NUMBER_DIGITS = 60
# A secret read from a file descriptor is one line; more than this is not one.
_MAX_SECRET_BYTES = 64 * 1024

_HINTS = {
    "TOTP_REQUIRED": "this account has two-factor authentication: run "
                     "`cyphr-client login --totp CODE`",
    "INVALID_TOTP": "give the code your authenticator app shows now",
    "TOTP_CODE_USED": "each code works once: wait until your authenticator app shows a new "
                      "code, and give that",
    "DEVICE_MISMATCH": "this device is not (or no longer) one of the account's devices: it was "
                       "removed. Link it again in a new profile (`cyphr-client link`, approved "
                       "from another device) or recover it with the phrase",
    "PROVISION_NOT_FOUND": "the link code expired or was used: run `cyphr-client link` on the "
                           "new device again",
}
# Where the general hint would be wrong: recover runs on a fresh profile,
# which has no identity to log in with yet.
_COMMAND_HINTS = {
    ("recover", "TOTP_REQUIRED"): "this account has two-factor authentication: run "
                                  "`cyphr-client recover CYPHR_ID --totp CODE`",
}


class UsageError(Exception):
    pass


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, data: dict[str, Any], text: str | Callable[[], str]) -> None:
        if self.as_json:
            print(json_line(data), flush=True)
        else:
            # Each foreign field is made safe where the text is built; this
            # is the last guard for one that was not.
            print(safe_lines(text() if callable(text) else text), flush=True)

    def warn(self, text: str) -> None:
        print(safe_lines(f"cyphr-client: warning: {text}"), file=sys.stderr, flush=True)

    def progress(self, what: str) -> Callable[[int, int], None]:
        """Progress on stderr: a counter on a terminal, else a line at the
        start and at the end."""
        tty = sys.stderr.isatty()
        started = False

        def report(done: int, total: int) -> None:
            nonlocal started
            if tty:
                end = "\n" if done == total else ""
                print(f"\r{what}: {done}/{total}", end=end, file=sys.stderr, flush=True)
            elif not started or done == total:
                print(f"{what}: {done}/{total}", file=sys.stderr, flush=True)
            started = True
        return report

    def transfer(self, what: str) -> Callable[[int, int], None]:
        """Progress of a transfer on stderr: a bar redrawn in place on a
        terminal, else a line when it starts and one when it ends."""
        tty = sys.stderr.isatty()
        shown: tuple[int, int] | None = None
        ended = False

        def report(done: int, total: int) -> None:
            nonlocal shown, ended
            if ended:
                return
            ended = done >= total
            if tty:
                percent = 100 * done // total if total else 100
                filled = TRANSFER_BAR * done // total if total else TRANSFER_BAR
                if (percent, filled) == shown and not ended:
                    return  # redrawn only when it changes
                shown = (percent, filled)
                bar = "#" * filled + "-" * (TRANSFER_BAR - filled)
                print(f"\r{what} [{bar}] {percent:3d}% of {human_size(total)}\x1b[K",
                      end="\n" if ended else "", file=sys.stderr, flush=True)
            elif shown is None or ended:
                state = "done" if ended else "started"
                print(f"{what}: {state}, {human_size(total)}", file=sys.stderr, flush=True)
                shown = (0, 0)
        return report


# -- options ------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cyphr-client",
        description="Cyphr end-to-end encrypted messenger, from the command line.",
        epilog=f"Environment: CYPHR_SERVER, CYPHR_PROFILE, {INSECURE_TLS_VARIABLE}=1 (to "
               f"confirm --insecure-tls). Secrets are never read from the environment.")
    parser.add_argument("--version", action="version", version=f"cyphr-client {__version__}")
    parser.add_argument("--server", help=f"server URL (default: CYPHR_SERVER, the profile's, "
                                         f"or {DEFAULT_SERVER})")
    parser.add_argument("--profile", help=f"profile directory (default: CYPHR_PROFILE or "
                                          f"{DEFAULT_PROFILE})")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--passphrase-file", metavar="PATH",
                        help="read the profile passphrase from this file (else a prompt)")
    source.add_argument("--passphrase-fd", metavar="N", type=int,
                        help="read the profile passphrase from file descriptor N (one line)")
    parser.add_argument("--insecure-tls", action="store_true",
                        help=f"do not check the server's TLS certificate (testing only; needs "
                             f"{INSECURE_TLS_VARIABLE}=1 in the environment)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help)

    p = command("init", "create a profile with a new identity and show its recovery phrase once")
    p.add_argument("--show-phrase", action="store_true",
                   help="with --json: include the recovery phrase in the output")
    p = command("register", "register this profile's identity under a Cyphr ID")
    p.add_argument("cyphr_id")
    p.add_argument("--display-name")
    p.add_argument("--prekeys", type=int, default=100, help="one-time prekeys to publish (100)")
    p = command("login", "start a session (needed again after it expires)")
    p.add_argument("--totp", help="the current two-factor code (else asked for, when "
                                  "interactive and the account needs one)")
    command("logout", "end this session")
    p = command("recover", "restore an identity on this device from its recovery phrase")
    p.add_argument("cyphr_id")
    p.add_argument("--phrase-file", help="read the 24 words from this file (else stdin or a prompt)")
    p.add_argument("--totp", help="the current two-factor code, for an account with two-factor "
                                  "login (else asked for, when interactive)")
    p = command("link", "join an identity as a new device: show a link code, wait until one "
                        "of its devices approves it (`devices approve CODE` there)")
    p.add_argument("--name", help="a name for this device, as its devices list show it "
                                  "(sealed: the server cannot read it)")
    p.add_argument("--prekeys", type=int, default=100, help="one-time prekeys to publish (100)")
    command("whoami", "show this profile's identity")
    p = command("send", "send an encrypted message, or a file (--file), to a Cyphr ID, a "
                        "group's name or a chat id")
    p.add_argument("to")
    p.add_argument("text", nargs="*", help="the message (with --file, the file's caption, "
                                           "optional); - alone reads it from standard input")
    p.add_argument("--file", metavar="PATH",
                   help="send this file, encrypted here (its message type, image, audio, "
                        "video or file, comes from its name)")
    p.add_argument("--type", dest="message_type", choices=["text", "call", "payment"],
                   help="the message type of a text (default: text; a file goes with --file)")
    p = command("download", "download a file sent in a chat and decrypt it, checking it")
    p.add_argument("message_id", help="the file message's id (listen and history --json show it)")
    p.add_argument("--out", metavar="PATH",
                   help="a directory to write the file in under its own name, made safe, never "
                        "replacing a file there (default: the current directory); or the file "
                        "to write")
    avatar = command("avatar", "your profile picture, end-to-end encrypted, and your "
                               "contacts'").add_subparsers(dest="avatar_command",
                                                           metavar="ACTION", required=True)
    p = avatar.add_parser("set", help="make an image your avatar: cropped square, at most 512 "
                                      "pixels, its metadata (EXIF, GPS) dropped, encrypted; its "
                                      "key goes to those you have a direct chat with")
    p.add_argument("path", help="the image (any format Pillow reads)")
    p = avatar.add_parser("get", help="a contact's avatar, the one they sent you, downloaded "
                                      "and decrypted into the profile's cache")
    p.add_argument("cyphr_id")
    p.add_argument("--out", metavar="PATH",
                   help="copy it to this file, or into this directory as CYPHR_ID.jpg (default: "
                        "show where the cache keeps it)")
    p = command("listen", "print messages as they arrive (first those received while away)")
    p.add_argument("--count", type=int, help="exit after this many messages")
    p.add_argument("--timeout", type=float, help="exit after this many seconds")
    p = command("history", "show a chat's messages")
    p.add_argument("chat", help="a chat id, a group's name, or a Cyphr ID for the direct chat "
                                "with it")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--before", type=int, help="the page before this seq")
    command("chats", "list chats")
    p = command("chat", "a full-screen chat: the chats with unread counts, live messages, "
                        "receipts, typing and presence; Enter sends, Tab moves, Esc quits")
    p.add_argument("chat", nargs="?", help="open this chat first: a Cyphr ID, a group's name "
                                           "or a chat id")
    p = command("contacts", "list the people you know (pinned, or in a direct chat), with "
                            "their display names")
    p.add_argument("search", nargs="?", help="only those whose Cyphr ID or display name holds "
                                             "this")

    group = command("group", "group chats").add_subparsers(dest="group_command", metavar="ACTION",
                                                           required=True)
    p = group.add_parser("create", help="create a group with members")
    p.add_argument("name")
    p.add_argument("members", nargs="*")
    for action, help in (("add", "add a member"), ("remove", "remove a member (or leave)")):
        p = group.add_parser(action, help=help)
        p.add_argument("chat", help="the group's name or chat id")
        p.add_argument("cyphr_id")
    p = group.add_parser("role", help="make a member admin or member")
    p.add_argument("chat", help="the group's name or chat id")
    p.add_argument("cyphr_id")
    p.add_argument("role", choices=["admin", "member"])
    p = group.add_parser("members", help="list members")
    p.add_argument("chat", help="the group's name or chat id")

    keys = command("keys", "this identity's keys").add_subparsers(dest="keys_command",
                                                                   metavar="ACTION", required=True)
    keys.add_parser("rotate", help="replace the main ML-KEM key (older messages still open)")
    p = keys.add_parser("prekeys", help="show the one-time prekeys left and top them up")
    p.add_argument("--count", type=int, default=100, help="how many to hold (100)")
    keys.add_parser("sessions", help="publish what is due of this device's session keys "
                                     "(prekeys for sessions) and show them")
    p = command("backup", "the encrypted history backup (opt-in): the messages this device "
                          "kept, sealed under a key from the recovery phrase, for a recovered "
                          "or newly linked device to read")
    p.add_argument("action", choices=["on", "off", "now", "status"],
                   help="on: write it now and rewrite it daily; off: stop, and delete the "
                        "server's copy; now: write it now; status: whether it is on, and the "
                        "last one written")
    p = command("push", "wake-ups for this device when it has no connection: a UnifiedPush "
                        "distributor's endpoint (or a Web Push subscription's), told to the "
                        "server; a wake-up names nothing, and the app then syncs")
    push = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = push.add_parser("register", help="have this device woken at an endpoint")
    p.add_argument("--endpoint", required=True, help="the push endpoint (https, or a prefix the "
                                                    "server allows)")
    p.add_argument("--p256dh", help="Web Push: the subscription's public key (base64url)")
    p.add_argument("--auth", help="Web Push: the subscription's auth secret (base64url)")
    push.add_parser("unregister", help="stop this device's wake-ups")
    push.add_parser("status", help="the kinds of push the server sends, and its VAPID key")
    p = command("verify", "show a contact's safety number; --accept it once compared")
    p.add_argument("cyphr_id")
    p.add_argument("--accept", metavar="NUMBER",
                   help="the 60-digit safety number you compared with the contact's screen "
                        "(spaces optional): marks the contact verified if it is the number of "
                        "the identity key the server shows now, and fails otherwise")

    devices = command("devices", "this identity's devices (and other users')").add_subparsers(
        dest="devices_command", metavar="ACTION", required=True)
    p = devices.add_parser("list", help="list this identity's devices, or a user's, each key "
                                        "checked against the identity key")
    p.add_argument("cyphr_id", nargs="?", help="another user (default: this identity)")
    p = devices.add_parser("rename", help="name one of this identity's devices")
    p.add_argument("device_id", type=int)
    p.add_argument("name", help='the new name ("" clears it)')
    p = devices.add_parser("remove", help="remove one of this identity's devices: its session "
                                          "ends at once")
    p.add_argument("device_id", type=int)
    p = devices.add_parser("approve", help="let a new device join this identity: the code it "
                                           "shows (`cyphr-client link`), once you compared "
                                           "the fingerprint")
    p.add_argument("code", help="cyphr-link:...")
    p.add_argument("--yes", action="store_true",
                   help="do not ask whether the new device shows the same fingerprint (the "
                        "code's own fingerprint is still checked)")

    totp = command("totp", "two-factor authentication").add_subparsers(
        dest="totp_command", metavar="ACTION", required=True)
    p = totp.add_parser("enable", help="make a secret for an authenticator app, then confirm a code")
    p.add_argument("--code", help="confirm with this code (else prompted, when interactive)")
    p = totp.add_parser("confirm", help="confirm the secret made by `totp enable`")
    p.add_argument("code")
    p = totp.add_parser("disable", help="turn two-factor authentication off")
    p.add_argument("code")

    wallet = command("wallet", "the linked Stellar account").add_subparsers(
        dest="wallet_command", metavar="ACTION", required=True)
    p = wallet.add_parser(
        "link", help="link a Stellar account: sign with its secret seed here (never sent), or "
                     "with --address in your own wallet")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--secret-file", metavar="PATH",
                        help="read the Stellar secret seed from this file (else a prompt)")
    source.add_argument("--secret-fd", metavar="N", type=int,
                        help="read the Stellar secret seed from file descriptor N (one line)")
    source.add_argument("--address", metavar="G...",
                        help="link this account without its seed: print the text to sign with "
                             "your wallet's \"sign message\" (SEP-53), then read the base64 "
                             "signature from standard input")
    p = wallet.add_parser("show", help="show a user's linked Stellar address")
    p.add_argument("cyphr_id", nargs="?")
    wallet.add_parser("unlink", help="unlink the Stellar account")
    p = command("delete-account", "delete this identity from the server, for good")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def _read_secret_file(path: str, what: str) -> str:
    """A file's contents, surrounding whitespace (a final line break) left out."""
    try:
        return Path(path).read_text("utf-8").strip()
    except OSError as e:
        raise UsageError(f"cannot read the {what} file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the {what} file {path} is not UTF-8 text") from None


def _read_secret_fd(fd: int, what: str) -> str:
    """The first line on file descriptor ``fd``, surrounding whitespace left
    out. Read a byte at a time so that nothing after the line is consumed:
    with ``--passphrase-fd 0``, standard input may carry more (the signature
    of ``wallet link --address``)."""
    try:
        if os.isatty(fd):
            # Typing there would echo the secret: the prompt hides it.
            raise UsageError(f"file descriptor {fd} is a terminal: leave the option out to be "
                             f"asked for the {what} without echo")
        line = bytearray()
        while len(line) <= _MAX_SECRET_BYTES:
            byte = os.read(fd, 1)
            if not byte or byte == b"\n":
                break
            line += byte
        else:
            raise UsageError(f"file descriptor {fd} holds no {what} line (too long)")
    except OSError as e:
        raise UsageError(f"cannot read the {what} from file descriptor {fd}: "
                         f"{e.strerror}") from None
    try:
        return line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UsageError(f"the {what} on file descriptor {fd} is not UTF-8 text") from None


def _secret(path: str | None, fd: int | None, options: str, prompt: str, what: str,
            confirm: bool = False, check: Callable[[str], None] | None = None) -> str:
    """A secret from its file, else its file descriptor, else a hidden
    prompt (asked twice with ``confirm``). ``check`` vets a new secret
    before it is asked again, so a weak one is refused at once."""
    if path is not None:
        value = _read_secret_file(path, what)
    elif fd is not None:
        value = _read_secret_fd(fd, what)
    else:
        if not sys.stdin.isatty():
            raise UsageError(f"no {what}: give {options} (secrets are not read from the "
                             f"environment)")
        value = getpass.getpass(prompt)
        if not value:
            raise UsageError(f"the {what} must not be empty")
        if check is not None:
            check(value)
        if confirm and getpass.getpass("Again: ") != value:
            raise UsageError(f"the {what}s differ")
    if not value:
        raise UsageError(f"the {what} must not be empty")
    if check is not None:
        check(value)
    return value


def _passphrase(args: argparse.Namespace) -> str:
    """The passphrase of an existing profile."""
    return _secret(args.passphrase_file, args.passphrase_fd, "--passphrase-file or "
                   "--passphrase-fd", "Profile passphrase: ", "passphrase")


def _new_passphrase(args: argparse.Namespace) -> str:
    """The passphrase for a new profile: asked twice at a prompt, and held
    to Profile.create's floor before any work is done."""
    return _secret(args.passphrase_file, args.passphrase_fd, "--passphrase-file or "
                   "--passphrase-fd", "New profile passphrase (12 characters or more; a few "
                   "uncommon words): ", "passphrase", confirm=True, check=check_passphrase)


def warn_ignored_variables(environ: Mapping[str, str] = os.environ) -> None:
    """Say on stderr that secrets in the environment are not read, and why."""
    for name, instead in IGNORED_VARIABLES.items():
        if environ.get(name):
            print(f"cyphr-client: {name} is set and ignored: secrets are not read from the "
                  f"environment (other programs of this user can read it, and every child "
                  f"process inherits it); use {instead}, or the prompt", file=sys.stderr)


def _profile_dir(args: argparse.Namespace) -> Path:
    return Path(args.profile or os.environ.get("CYPHR_PROFILE") or DEFAULT_PROFILE).expanduser()


def _server(args: argparse.Namespace) -> str | None:
    return args.server or os.environ.get("CYPHR_SERVER")


def _verify_tls(args: argparse.Namespace) -> bool:
    return not args.insecure_tls


def _open(args: argparse.Namespace) -> Client:
    server = _server(args)
    if server:
        check_server(server, _verify_tls(args))  # before the passphrase is asked for
    return Client.open(_profile_dir(args), _passphrase(args), server,
                       verify_tls=_verify_tls(args))


def safety_number(value: str) -> str:
    """A safety number as typed (60 digits, spaces optional) in the form
    it is shown: twelve groups of five."""
    digits = "".join(value.split())
    if len(digits) != SAFETY_NUMBER_DIGITS or not (digits.isascii() and digits.isdigit()):
        raise UsageError(f"--accept takes the {SAFETY_NUMBER_DIGITS}-digit safety number you "
                         f"compared (spaces optional), not {value!r}")
    return " ".join(digits[i:i + 5] for i in range(0, SAFETY_NUMBER_DIGITS, 5))


def message_json(message: Message) -> dict[str, Any]:
    return message.as_json()


def api_error_text(error: ApiError, command: str | None = None) -> str:
    """The server's refusal in one line: its message, code and details,
    every part of them shown safely (the server, or a user whose text it
    quotes, wrote them), and a hint of what to do."""
    text = f"{safe(error.message)} ({safe(error.code)})"
    if error.details:
        text += f" [{safe(_plain(error.details))}]"
    hint = _COMMAND_HINTS.get((command, error.code)) or _HINTS.get(error.code)
    return text + (f": {hint}" if hint else "")


def _plain(value: Any) -> str:
    """Error details as a person reads them: ``key: value; key: a, b``."""
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_plain(item)}" for key, item in value.items())
    if isinstance(value, list):
        return ", ".join(_plain(item) for item in value)
    return str(value)


def _ask(prompt: str, hidden: bool = False) -> str:
    """A line typed at the terminal (Ctrl-D ends the command: EOFError)."""
    return (getpass.getpass(prompt) if hidden else input(prompt)).strip()


def _ask_totp() -> str | None:
    if not sys.stdin.isatty():
        return None
    return _ask("Two-factor code: ") or None


# -- commands -----------------------------------------------------------------

def cmd_init(args: argparse.Namespace, out: Output) -> None:
    directory = _profile_dir(args)
    if Profile.exists(directory):
        raise UsageError(f"{directory} already holds a profile (give another --profile)")
    server = _server(args) or DEFAULT_SERVER
    check_server(server, _verify_tls(args))  # before a profile is made for it
    client, phrase = Client.init(directory, _new_passphrase(args), server,
                                 verify_tls=_verify_tls(args))
    client.close()
    result: dict[str, Any] = {"profile": str(directory)}
    # Scripts log their output: the phrase is in it only when asked for.
    if args.show_phrase:
        result["recoveryPhrase"] = phrase
    elif out.as_json:
        print("cyphr-client: the recovery phrase is left out of the JSON output (give "
              "--show-phrase to include it); without it this identity cannot be recovered",
              file=sys.stderr)
    out.result(result, lambda: (
        f"Created a profile in {directory}.\n\n"
        f"Your recovery phrase (it is shown only this once; write it down and keep it\n"
        f"offline: it alone restores your identity, and anyone who has it can be you):\n\n"
        f"    {phrase}\n\n"
        f"Next: cyphr-client register <cyphrId>"))


def cmd_register(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    answer = client.register(args.cyphr_id, args.display_name, args.prekeys,
                             out.progress("Publishing one-time prekeys"))
    out.result({"cyphrId": answer["cyphrId"], "userId": answer["userId"]},
               f"Registered {answer['cyphrId']} on {client.http.server}.")


def cmd_login(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    try:
        answer = client.login(args.totp)
    except ApiError as e:
        code = None if args.totp or e.code != "TOTP_REQUIRED" else _ask_totp()
        if not code:
            raise
        answer = client.login(code)
    out.result({"cyphrId": client.cyphr_id, "expiresAt": answer.get("expiresAt")},
               f"Logged in as {client.cyphr_id} until {_time(answer.get('expiresAt', ''))}.")


def cmd_logout(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    client.logout()
    out.result({"loggedOut": True}, "Logged out.")


def cmd_recover(args: argparse.Namespace, out: Output) -> None:
    directory = _profile_dir(args)
    if Profile.exists(directory):
        raise UsageError(f"{directory} already holds a profile (give another --profile)")
    server = _server(args) or DEFAULT_SERVER
    check_server(server, _verify_tls(args))
    if args.phrase_file:
        phrase = _read_secret_file(args.phrase_file, "recovery phrase")
    elif sys.stdin.isatty():
        phrase = getpass.getpass("Recovery phrase (24 words): ")
    elif args.passphrase_fd == 0:
        raise UsageError("the phrase and the passphrase cannot both come from standard input: "
                         "give --phrase-file")
    else:
        phrase = sys.stdin.read()
    passphrase = _new_passphrase(args)
    try:
        client = Client.recover(directory, passphrase, server, phrase,
                                args.cyphr_id, progress=out.progress("Publishing one-time prekeys"),
                                totp_code=args.totp, ask_totp=_ask_totp,
                                verify_tls=_verify_tls(args))
    except BaseException as e:
        # A failed recovery leaves no half-made profile behind.
        for name in ("vault.json", "profile.json", "vault.lock"):
            (directory / name).unlink(missing_ok=True)
        if isinstance(e, ApiError) and e.code == "INVALID_SIGNATURE":
            raise _recovery_refused(server, args.cyphr_id, _verify_tls(args)) from None
        raise
    restored = getattr(client, "restored_pins", 0)
    problem = getattr(client, "pin_backup_error", None)
    if problem:
        out.warn(f"the pinned contacts could not be restored ({problem}): every contact is "
                 f"pinned again on first use; compare safety numbers with `cyphr-client verify`")
    messages = _restored_messages(client, out)
    out.result({"cyphrId": client.cyphr_id, "profile": str(directory), "restoredPins": restored,
                "restoredMessages": messages},
               f"Recovered {client.cyphr_id} on this device; its other devices are signed out. "
               f"{restored} pinned contact(s) restored from the encrypted backup. "
               f"{_restored_text(messages)}")


def _restored_messages(client: Client, out: Output) -> int:
    """How many messages the history backup restored; a warning when it
    could not be read."""
    problem = getattr(client, "history_backup_error", None)
    if problem:
        out.warn(f"the history backup could not be restored ({safe(problem)}): nothing of it "
                 f"was added")
    return getattr(client, "restored_messages", None) or 0


def _restored_text(count: int) -> str:
    return f"{count} message(s) restored from the history backup."


def _recovery_refused(server: str, cyphr_id: str, verify_tls: bool) -> ClientError:
    """Why the server refused a recovery's signature, as far as can be
    told: the server refuses an unknown Cyphr ID like a wrong phrase, but
    whether the Cyphr ID is free is public (a deleted one never is)."""
    from cyphr.client.http import Http

    http = Http(server, verify=verify_tls)
    try:
        free = http.call("POST", "/api/cyphr-id/check", {"cyphrId": cyphr_id},
                         auth=False).get("available")
    except ClientError:
        free = None
    finally:
        http.close()
    if free is True:
        return ClientError(f"no account has the Cyphr ID {safe(cyphr_id)} on {server}: check "
                           f"its spelling")
    return ClientError(f"this recovery phrase is not the one of {safe(cyphr_id)} (or that "
                       f"account was deleted, and cannot be recovered): check the 24 words")


def cmd_link(args: argparse.Namespace, out: Output) -> None:
    directory = _profile_dir(args)
    if Profile.exists(directory):
        raise UsageError(f"{directory} already holds a profile (give another --profile)")
    server = _server(args) or DEFAULT_SERVER
    check_server(server, _verify_tls(args))
    passphrase = _new_passphrase(args)  # asked before the wait, not after

    def show(code: LinkCode) -> None:
        out.result({"linkCode": code.code, "fingerprint": code.fingerprint,
                    "provisioningId": code.provisioning_id, "expiresAt": code.expires_at},
                   lambda: (f"On a device already signed in to your identity, run\n\n"
                            f"    cyphr-client devices approve {code.code}\n\n"
                            f"or scan this code:"))
        if not out.as_json:
            _show_qr(code.code)
            print(f"Fingerprint: {_spaced(code.fingerprint)}  (the approving device must show "
                  f"the same)\nWaiting for the approval (until {_time(code.expires_at)})...",
                  flush=True)

    client = Client.link(directory, passphrase, server, on_code=show, name=args.name,
                         prekeys=args.prekeys, progress=out.progress("Publishing one-time prekeys"),
                         verify_tls=_verify_tls(args))
    device_id = client.profile.settings.get("deviceId")
    restored = client.restored_pins or 0
    if client.pin_backup_error:
        out.warn(f"the pinned contacts could not be restored ({client.pin_backup_error}): every "
                 f"contact is pinned again on first use")
    messages = _restored_messages(client, out)
    out.result({"cyphrId": client.cyphr_id, "deviceId": device_id, "profile": str(directory),
                "restoredPins": restored, "restoredMessages": messages},
               f"Linked: this is device {device_id} of {client.cyphr_id}. Check that "
               f"{client.cyphr_id} is your identity. {restored} pinned contact(s) restored. "
               f"{_restored_text(messages)}")


def _spaced(fingerprint: str) -> str:
    """A link fingerprint as read aloud: groups of four hex digits."""
    return " ".join(fingerprint[i:i + 4] for i in range(0, len(fingerprint), 4))


def cmd_devices(args: argparse.Namespace, out: Output) -> None:
    action = args.devices_command
    if action == "approve":
        parse_link_code(args.code)  # a mistyped code fails before the passphrase is asked
    client = _open(args)
    if action == "list":
        own = args.cyphr_id in (None, client.cyphr_id)
        found = client.devices() if own else client.devices_of(args.cyphr_id)
        owner = client.cyphr_id if own else args.cyphr_id

        def text() -> str:
            lines = []
            for d in found:
                name = f" {safe(d.name)!r}" if d.name else ""
                mark = " (this device)" if d.current else ""
                seen = f", last seen {_time(d.last_seen)}" if d.last_seen else ""
                state = "key verified" if d.verified else f"REFUSED: {safe(d.problem)}"
                if d.verified and d.problem:
                    state += f" ({safe(d.problem)})"
                lines.append(f"device {d.device_id}{name}{mark}: added {_time(d.created_at or '')}"
                             f"{seen}; {state}")
            return "\n".join(lines) or "No devices."
        out.result({"cyphrId": owner, "devices": [d.as_json() for d in found]}, text)
        refused = [d for d in found if not d.verified]
        if refused:
            out.warn(f"{len(refused)} device(s) of {owner} are not signed by the identity key "
                     f"and are never sealed to: " + ", ".join(str(d.device_id) for d in refused))
    elif action == "rename":
        client.rename_device(args.device_id, args.name or None)
        out.result({"deviceId": args.device_id, "name": args.name or None},
                   f"Device {args.device_id} is now called {safe(args.name)!r}." if args.name
                   else f"Device {args.device_id} has no name now.")
    elif action == "remove":
        client.remove_device(args.device_id)
        out.result({"removed": args.device_id}, f"Removed device {args.device_id}: its session "
                                                f"has ended.")
    else:
        def confirm(request: LinkRequest) -> bool:
            if args.yes:
                return True
            question = f"Does the new device show {_spaced(request.fingerprint)}? [y/N] "
            if sys.stdin.isatty():
                answer = _ask(question)
            else:
                # A script answers on standard input; no answer is a no.
                print(question, file=sys.stderr, flush=True)
                answer = sys.stdin.readline().strip()
            if answer.lower() not in ("y", "yes"):
                raise UsageError("not approved: the fingerprints were not confirmed to match; "
                                 "nothing was sent")
            return True

        device_id = client.approve(args.code, confirm)
        out.result({"approved": True, "deviceId": device_id},
                   f"Approved: the new device becomes device {device_id} of {client.cyphr_id}.")


def cmd_whoami(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    user = client.whoami()
    user["server"] = client.http.server
    out.result(user, lambda: "\n".join([
        f"Cyphr ID:     {user['cyphrId']}",
        f"Display name: {safe(user.get('displayName')) or '-'}",
        f"Server:       {client.http.server}",
        f"Identity key: {user['publicKey']}",
    ]))


def _message_text(args: argparse.Namespace) -> str:
    """The text to send: the words given, or standard input for ``-``;
    never empty or only whitespace."""
    if args.text == ["-"]:
        if args.passphrase_fd == 0:
            raise UsageError("the message and the passphrase cannot both come from standard "
                             "input: give --passphrase-file")
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            raise UsageError("standard input is not UTF-8 text") from None
        # One final line break is how a file or `echo` ends; not the text's.
        text = text[:-1] if text.endswith("\n") else text
    else:
        text = " ".join(args.text)
    if not text.strip():
        raise UsageError("an empty message is not sent")
    return text


def cmd_send(args: argparse.Namespace, out: Output) -> None:
    if args.file is not None:
        _send_file(args, out)
        return
    text = _message_text(args)  # before the passphrase is asked for
    client = _open(args)
    answer = client.send(_target(client, args.to), text, args.message_type or "text")
    _sent(client, answer, out, "Sent")


def _sent(client: Client, answer: dict[str, Any], out: Output, what: str) -> None:
    answer.pop("success", None)
    # Told, not hidden: without sessions a message has no forward secrecy.
    answer["sessions"] = client.no_session is None
    note = "" if client.no_session is None else (
        f" Sealed as version 3, without forward secrecy: {client.no_session}.")
    out.result(answer, f"{what} (chat {answer['chatId']}, #{answer['seq']}).{note}")


def _send_file(args: argparse.Namespace, out: Output) -> None:
    """send --file PATH [CAPTION]: the file encrypted, uploaded (a progress
    bar on a terminal) and sent in a file message."""
    if args.message_type is not None:
        raise UsageError("--type does not go with --file: a file's message type (image, audio, "
                         "video or file) comes from its name")
    path = Path(args.file).expanduser()
    if not path.is_file():  # before the passphrase is asked for
        raise UsageError(f"{args.file} is not a file")
    caption = _message_text(args) if args.text else None
    client = _open(args)
    answer = client.send_file(_target(client, args.to), path, caption,
                              progress=out.transfer(f"Uploading {safe(path.name)}"))
    size = answer.get("attachment", {}).get("size", path.stat().st_size)
    _sent(client, answer, out, f"Sent {safe(path.name)} ({human_size(size)})")


def cmd_download(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    message = client.find_message(args.message_id)
    if message is None:
        raise UsageError(f"no message {safe(args.message_id)} here: neither this device's store "
                         f"nor the recent history of its chats has it")
    pointer = message.attachment
    if pointer is None:
        raise UsageError(f"message {safe(args.message_id)} carries no file"
                         + (f" ({safe(message.error)})" if message.error else ""))
    name = safe(pointer.file_name)
    written = client.download(message, Path(args.out).expanduser() if args.out else Path.cwd(),
                              progress=out.transfer(f"Downloading {name}"))
    out.result({"messageId": message.id, "path": str(written),
                "attachment": public_json(pointer), "checked": True},
               lambda: f"Wrote {name} ({human_size(pointer.size)}) to {safe(str(written))}: its "
                       f"digest and every chunk checked.")


def cmd_avatar(args: argparse.Namespace, out: Output) -> None:
    if args.avatar_command == "set":
        path = Path(args.path).expanduser()
        if not path.is_file():  # before the passphrase is asked for
            raise UsageError(f"{args.path} is not a file")
        client = _open(args)
        answer = client.set_avatar(path)

        def text() -> str:
            shown = answer["attachment"]
            said = [f"Avatar set: {shown.get('width')} x {shown.get('height')} pixels, "
                    f"{human_size(shown['size'])}, encrypted."]
            if answer["sentTo"]:
                said.append(f"Its key went to {', '.join(map(safe, answer['sentTo']))}.")
            else:
                said.append("No direct chat yet: its key went to no one.")
            said += [f"Not sent to {safe(who)}: {safe(why)}"
                     for who, why in answer["notSent"].items()]
            return "\n".join(said)
        out.result(answer, text)
        return
    client = _open(args)
    kept = client.avatar(args.cyphr_id)
    if kept is None:
        raise UsageError(f"no avatar of {safe(args.cyphr_id)} here: they have none, or theirs "
                         f"has not reached this device yet (it comes in a message from them)")
    written = kept
    if args.out:
        written = Path(args.out).expanduser()
        if written.is_dir():
            written = written / safe_file_name(f"{args.cyphr_id}{kept.suffix}")
        try:
            shutil.copyfile(kept, written)
        except OSError as e:
            raise UsageError(f"cannot write {args.out}: {e.strerror}") from None
    out.result({"cyphrId": args.cyphr_id, "path": str(written)},
               f"{safe(args.cyphr_id)}'s avatar: {safe(str(written))}")


WAKE_SECONDS = 0.5  # how long listen's main thread waits at most before looking again


def cmd_listen(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    client.top_up_prekeys(progress=out.progress("Publishing one-time prekeys"))
    # Messages and what happens to the connection, in the order they came.
    arrived: queue.Queue[Message | tuple[str, str]] = queue.Queue()
    listener = client.listener(arrived.put, top_up=False,
                               on_status=lambda status, detail: arrived.put((status, detail))
                               ).start()
    names = {c["chatId"]: c.get("name") for c in client.chats() if c["chatType"] == "group"}
    deadline = time.monotonic() + args.timeout if args.timeout is not None else None
    shown = 0
    try:
        while args.count is None or shown < args.count:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                break
            try:
                # Never asleep for long: the kernel may hand Ctrl-C to another
                # thread, and Python runs the handler (KeyboardInterrupt) only
                # when this, the main thread, next runs; blocked on the queue
                # with no timeout it would not until a message came.
                message = arrived.get(timeout=WAKE_SECONDS if wait is None
                                      else min(wait, WAKE_SECONDS))
            except queue.Empty:
                continue  # the deadline is checked again
            if isinstance(message, tuple):
                _connection_status(client, *message)
                continue
            if not _visible(message):
                continue
            if message.chat_id not in names and message.chat_id:
                names.update({c["chatId"]: c.get("name") for c in client.chats()
                              if c["chatType"] == "group"})
            out.result(message_json(message), line(message, client.cyphr_id, names,
                                                   client.display_name))
            if message.sender != client.cyphr_id:
                listener.mark_read(message.chat_id, message.seq)  # shown is read
            shown += 1
    finally:
        listener.stop()
    if args.count is not None and shown < args.count:
        raise ClientError(f"timed out after {shown} of {args.count} messages")


def _connection_status(client: Client, status: str, detail: str) -> None:
    """What happened to ``listen``'s connection, on stderr; a session the
    server ended stops the command."""
    if status == "ended":
        raise ClientError(f"{detail}: run `cyphr-client login` to sign in again")
    if status == "lost":
        print(f"cyphr-client: the connection to {client.http.server} was lost "
              f"({safe(detail)}); reconnecting", file=sys.stderr, flush=True)
    else:
        print(f"cyphr-client: reconnected to {client.http.server}", file=sys.stderr, flush=True)


def _group_named(client: Client, name: str) -> str | None:
    """The chat id of the group called ``name`` here; UsageError when
    several are."""
    found = [c["chatId"] for c in client.chats()
             if c["chatType"] == "group" and c.get("name") == name]
    if len(found) > 1:
        raise UsageError(f"{len(found)} groups are called {safe(name)!r}: give one of their "
                         f"chat ids ({', '.join(found)})")
    return found[0] if found else None


def _target(client: Client, to: str) -> str:
    """Whom ``send`` means: a chat id, a group's name, or a Cyphr ID."""
    if is_chat_id(to):
        return to
    if client._direct_chat_with(to) is None:
        group = _group_named(client, to)
        if group is not None:
            return group
    return to


def _chat_id(client: Client, chat: str) -> str:
    if is_chat_id(chat):
        return chat
    chat_id = client._direct_chat_with(chat) or _group_named(client, chat)
    if chat_id is None:
        raise UsageError(f"no direct chat with {safe(chat)} and no group of that name")
    return chat_id


def _group_id(client: Client, chat: str) -> str:
    if is_chat_id(chat):
        return chat
    chat_id = _group_named(client, chat)
    if chat_id is None:
        raise UsageError(f"no group called {safe(chat)!r} (give its name or chat id)")
    return chat_id


def cmd_history(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    chat_id = _chat_id(client, args.chat)
    messages = [m for m in client.history(chat_id, args.limit, args.before) if _visible(m)]
    if out.as_json:
        out.result({"messages": [message_json(m) for m in messages]}, "")
        return
    others: int | None = None
    if any(m.receipts is not None for m in messages):
        chat = client._chat(chat_id)
        if chat is not None and chat["chatType"] == "group":
            others = len([m for m in chat["participants"] if m != client.cyphr_id])
    for message in messages:
        text = line(message, client.cyphr_id, None, client.display_name)
        receipts = message.receipts
        if receipts is not None:
            # As chat shows it: one's own messages say who got and read them.
            text += f"  · {_receipt_mark(set(receipts.delivered), set(receipts.read), others, True)}"
        print(safe_lines(text))


def cmd_chats(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    chats = client.chats()

    def text() -> str:
        lines = []
        for chat in chats:
            name = safe(chat.get("name")) or "(name not known here)"
            if chat["chatType"] == "direct" and chat.get("name"):
                name = _person(chat["name"], client.display_name)
            kind = "group" if chat["chatType"] == "group" else "direct"
            lines.append(f"{chat['chatId']}  {kind:6}  {name}  ({chat['unreadCount']} unread, "
                         f"{len(chat['participants'])} members)")
        return "\n".join(lines) or "No chats yet."
    out.result({"chats": chats}, text)


def cmd_chat(args: argparse.Namespace, out: Output) -> int:
    if out.as_json:
        raise UsageError("chat is for a person at a terminal; scripts use listen and send "
                         "(with --json)")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("chat needs a terminal (scripts use listen and send)")
    client = _open(args)
    try:
        target = _target(client, args.chat) if args.chat else None
        from cyphr.client.chat import run_chat  # prompt_toolkit only for this command

        return run_chat(client, target, lambda e: _error_text(e, "chat"))
    finally:
        client.close()


def _error_text(error: BaseException, command: str | None = None) -> str:
    """An error in one line, as ``main`` says it."""
    if isinstance(error, ApiError):
        return api_error_text(error, command)
    if isinstance(error, (ClientError, ProfileError, CryptoError, UsageError)):
        return safe(error)
    return (f"unexpected error ({type(error).__name__}): {safe(error)}; this is a bug of "
            f"cyphr-client, please report it")


def cmd_contacts(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    wanted = (args.search or "").casefold()
    people = []
    for cyphr_id in client.contacts():
        name = client.display_name(cyphr_id)
        if wanted in cyphr_id.casefold() or (name is not None and wanted in name.casefold()):
            people.append({"cyphrId": cyphr_id, "displayName": name})
    out.result({"contacts": people}, lambda: "\n".join(
        _person(p["cyphrId"], lambda _: p["displayName"]) for p in people)
        or ("Nobody matches." if wanted else "No contacts yet."))


def cmd_group(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    action = args.group_command
    if action != "create":
        args.chat = _group_id(client, args.chat)
    if action == "create":
        chat_id = client.create_group(args.name, args.members)
        out.result({"chatId": chat_id}, f"Created group {args.name}: {chat_id}")
    elif action == "add":
        client.add_member(args.chat, args.cyphr_id)
        out.result({"added": args.cyphr_id}, f"Added {args.cyphr_id}.")
    elif action == "remove":
        client.remove_member(args.chat, args.cyphr_id)
        out.result({"removed": args.cyphr_id}, f"Removed {args.cyphr_id}.")
    elif action == "role":
        client.set_role(args.chat, args.cyphr_id, args.role)
        out.result({"cyphrId": args.cyphr_id, "role": args.role},
                   f"{args.cyphr_id} is now {args.role}.")
    else:
        members = client.members(args.chat)
        out.result({"members": members}, lambda: "\n".join(
            f"{_person(m['cyphrId'], client.display_name):40} {safe(m['role']):6} since "
            f"{_time(m['joinedAt'])}" for m in members))


def cmd_keys(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    if args.keys_command == "rotate":
        generation = client.rotate_kyber()
        out.result({"generation": generation}, f"Published a new ML-KEM-1024 key "
                                               f"(generation {generation}).")
    elif args.keys_command == "sessions":
        stock = client.publish_session_keys()
        stock.pop("success", None)
        out.result(stock, f"Session keys of device {stock['deviceId']}: signed prekey "
                          f"{(stock['signedPrekey'] or {}).get('keyId')}, last-resort prekey "
                          f"{(stock['lastResortPrekey'] or {}).get('keyId')}, "
                          f"{stock['oneTimePrekeys']} one-time X25519 and "
                          f"{stock['kemOneTimePrekeys']} one-time ML-KEM prekeys.")
    else:
        added = client.top_up_prekeys(low=args.count, target=args.count,
                                      progress=out.progress("Publishing one-time prekeys"))
        remaining = client.prekeys_remaining()
        out.result({"published": added, "remaining": remaining},
                   f"{remaining} one-time prekeys on the server ({added} published now).")


def _size_text(size: Any) -> str:
    if not isinstance(size, int):
        return "?"
    return f"{size} bytes" if size < 1024 else (
        f"{size / 1024:.1f} KiB" if size < 1024 * 1024 else f"{size / 1024 / 1024:.2f} MiB")


def _written_text(written: Written) -> str:
    left_out = written.kept - written.messages
    return (f"{_size_text(written.size)}, {written.messages} message(s)"
            + (f"; the {left_out} oldest left out, over the server's limit" if left_out else ""))


def cmd_backup(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    if args.action == "on":
        written = client.history_backup_on()
        out.result({"on": True, **written.as_json()},
                   f"The history backup is on: written now ({_written_text(written)}), then "
                   f"rewritten once a day. Whoever has your recovery phrase can read it.")
    elif args.action == "off":
        deleted = client.history_backup_off()
        out.result({"on": False, "deleted": deleted},
                   "The history backup is off" + (", and the server's copy deleted." if deleted
                                                  else "; the server held none."))
    elif args.action == "now":
        written = client.backup_history()
        out.result({"on": True, **written.as_json()},
                   f"The history backup is written ({_written_text(written)}).")
    else:
        status = client.history_backup_status()

        def text() -> str:
            if not status["on"]:
                return "The history backup is off."
            lines = ["The history backup is on."]
            if status["lastAt"]:
                lines.append(f"Last written {_time(status['lastAt'])}: "
                             f"{_size_text(status['lastSize'])}, {status['lastMessages']} "
                             f"message(s); next from {_time(status['nextAt'])}.")
            if status["lastError"]:
                lines.append(f"The last rewrite failed: {safe(status['lastError'])}")
            return "\n".join(lines)
        out.result(status, text)


def cmd_push(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    if args.action == "register":
        if (args.p256dh is None) != (args.auth is None):
            raise UsageError("--p256dh and --auth go together (a Web Push subscription's keys)")
        keys = {"p256dh": args.p256dh, "auth": args.auth} if args.p256dh is not None else None
        kind = "webpush" if keys is not None else "unifiedpush"
        client.register_push(args.endpoint, kind=kind, keys=keys)
        out.result({"registered": kind},
                   f"This device is woken through {kind} when a message waits for it and it "
                   "has no connection (the wake-up names nothing; the app then syncs).")
    elif args.action == "unregister":
        client.unregister_push()
        out.result({"registered": None}, "This device is no longer woken.")
    else:
        config = client.push_config()
        out.result(config, f"The server sends {', '.join(config['kinds']) or 'no pushes'}; "
                           f"its VAPID key (applicationServerKey): {config.get('vapidPublicKey')}")


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    if args.accept is not None:
        number = safety_number(args.accept)  # a typo fails before the passphrase is asked
        client = _open(args)
        # Compare-and-swap: the library pins the key only if its number is
        # the one the user compared, so a key the server swaps in between
        # is refused rather than marked verified (crypto review F7).
        contact = client.accept_identity(args.cyphr_id, number)
        out.result({"cyphrId": contact.cyphr_id, "safetyNumber": contact.safety_number,
                    "verified": contact.verified},
                   f"{contact.cyphr_id} is verified: the safety number matches, and this "
                   f"identity key is pinned.")
        return 0
    client = _open(args)
    accept = (f'cyphr-client verify {args.cyphr_id} --accept '
              f'"<the {SAFETY_NUMBER_DIGITS} digits you compared>"')
    try:
        contact = client.contact(args.cyphr_id)
    except IdentityChanged as error:
        changed = error  # a name the lambda below may use after this block
        # Shown, not hidden: comparing this number is how the user finds
        # out whether the change is real.
        out.result({"cyphrId": args.cyphr_id, "safetyNumber": changed.safety_number,
                    "pinnedSafetyNumber": changed.pinned_safety_number,
                    "verified": False, "identityChanged": True}, lambda: (
            f"{args.cyphr_id}'s identity key is NOT the one pinned here. Identity keys do not "
            f"change when a phrase is recovered, so this is another key: someone may be in the "
            f"middle.\nSafety number with the key pinned here:\n\n"
            f"    {changed.pinned_safety_number}\n\n"
            f"Safety number with the key the server shows now:\n\n"
            f"    {changed.safety_number}\n\n"
            f"Only if {args.cyphr_id}'s own screen shows the very same number, run\n\n"
            f"    {accept}"))
        return 1
    out.result({"cyphrId": contact.cyphr_id, "safetyNumber": contact.safety_number,
                "verified": contact.verified}, lambda: (
        f"Safety number with {contact.cyphr_id}:\n\n    {contact.safety_number}\n\n"
        + (f"{contact.cyphr_id} is verified (you compared this number before)."
           if contact.verified else
           f"Compare it with the number {contact.cyphr_id}'s screen shows (in person, or over "
           f"a channel you trust). If every digit matches, type the number you compared:\n\n"
           f"    {accept}")))
    return 0


def cmd_totp(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    action = args.totp_command
    if action == "enable":
        secret = client.totp_generate()
        code = args.code
        if code is None and sys.stdin.isatty() and not out.as_json:
            print("Scan this with your authenticator app:")
            _show_qr(secret["otpauthUrl"])
            print(f"or type the secret in it: {safe(secret['secret'])}\n"
                  f"  {safe(secret['otpauthUrl'])}")
            code = _ask("Code shown by the app: ")
        if code is None:
            out.result({"secret": secret["secret"], "otpauthUrl": secret["otpauthUrl"],
                        "enabled": False},
                       f"secret: {secret['secret']}\n{secret['otpauthUrl']}\n"
                       f"Confirm with `cyphr-client totp confirm CODE`.")
            return
        client.totp_verify(code)
        out.result({"enabled": True}, "Two-factor authentication is on.")
    elif action == "confirm":
        client.totp_verify(args.code)
        out.result({"enabled": True}, "Two-factor authentication is on.")
    else:
        client.totp_disable(args.code)
        out.result({"enabled": False}, "Two-factor authentication is off.")


def _show_qr(text: str) -> None:
    """``text`` as a QR code drawn in the terminal."""
    import segno

    segno.make(text, error="m").terminal(out=sys.stdout, compact=True)


def cmd_wallet(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    action = args.wallet_command
    if action == "link" and args.address is not None:
        address = _wallet_link_own(args.address.strip(), client, out)
        out.result({"stellarAddress": address}, f"Linked {address}.")
    elif action == "link":
        secret = _secret(args.secret_file, args.secret_fd, "--secret-file, --secret-fd or "
                         "--address", "Stellar secret seed: ", "Stellar secret")
        address = client.wallet_link(secret)
        out.result({"stellarAddress": address}, f"Linked {address}.")
    elif action == "show":
        address = client.wallet_show(args.cyphr_id)
        out.result({"cyphrId": args.cyphr_id or client.cyphr_id, "stellarAddress": address}, address)
    else:
        client.wallet_unlink()
        out.result({"unlinked": True}, "Unlinked.")


def _wallet_link_own(address: str, client: Client, out: Output) -> str:
    """Link an account whose seed stays in the user's own wallet: show the
    text to sign (SEP-53 "sign message"), read the base64 signature from
    standard input (one line), submit it."""
    from stellar_sdk import StrKey

    if not StrKey.is_valid_ed25519_public_key(address):
        raise UsageError(f"not a Stellar account address (G...): {address!r}")
    challenge_id, text = client.wallet_link_text(address)
    # With --json, the text is a JSON line of its own, before the result.
    out.result({"stellarAddress": address, "challengeId": challenge_id, "text": text}, lambda: (
        f"Sign this message with the \"sign message\" function (SEP-53) of the wallet that "
        f"holds {address}. It is not a transaction. Sign every line between the markers "
        f"exactly as it stands"
        + (", with the line break that ends the last one" if text.endswith("\n") else "")
        + f":\n-----BEGIN MESSAGE-----\n{text}{'' if text.endswith(chr(10)) else chr(10)}"
        f"-----END MESSAGE-----\n"
        f"Then paste the signature (base64, one line) and press Enter:"))
    signature = sys.stdin.readline().strip()
    if not signature:
        raise UsageError("no signature on standard input")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("the signature is not base64") from None
    if len(raw) != 64:
        raise UsageError(f"the signature is {len(raw)} bytes, not the 64 of an Ed25519 "
                         f"signature: paste the wallet's signature of the message")
    return client.wallet_link_signed(address, challenge_id, signature) or address


def cmd_delete_account(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("delete-account needs --yes when not interactive")
        answer = input(f"Delete {client.cyphr_id} from {client.http.server} for good? "
                       f"Type the Cyphr ID to confirm: ")
        if answer.strip() != client.cyphr_id:
            raise UsageError("not confirmed; nothing deleted")
    cyphr_id = client.cyphr_id
    client.delete_account()
    out.result({"deleted": cyphr_id}, f"Deleted {cyphr_id}.")


COMMANDS: dict[str, Callable[[argparse.Namespace, Output], int | None]] = {
    "init": cmd_init, "register": cmd_register, "login": cmd_login, "logout": cmd_logout,
    "recover": cmd_recover, "link": cmd_link, "devices": cmd_devices, "whoami": cmd_whoami, "send": cmd_send, "download": cmd_download,
    "avatar": cmd_avatar, "listen": cmd_listen,
    "history": cmd_history, "chats": cmd_chats, "chat": cmd_chat, "contacts": cmd_contacts, "group": cmd_group,
    "keys": cmd_keys, "backup": cmd_backup, "push": cmd_push,
    "verify": cmd_verify, "totp": cmd_totp, "wallet": cmd_wallet,
    "delete-account": cmd_delete_account,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a "*" positional its share, none, before an option:
    # the caption of `send CHAT --file PATH CAPTION` comes back unknown.
    if extra and args.command == "send" \
            and not any(word.startswith("-") and word != "-" for word in extra):
        args.text = [*args.text, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    out = Output(args.json)
    warn_ignored_variables()
    try:
        if args.insecure_tls:
            allow_insecure_tls()
            print("cyphr-client: not checking the server's TLS certificate (--insecure-tls)",
                  file=sys.stderr)
        status = COMMANDS[args.command](args, out)
    except ApiError as e:
        print(f"cyphr-client: {api_error_text(e, args.command)}", file=sys.stderr)
        return 1
    except (ClientError, ProfileError, CryptoError, UsageError) as e:
        print(f"cyphr-client: {safe(e)}", file=sys.stderr)
        return 1
    except EOFError:
        # Ctrl-D at a prompt: the person changed their mind.
        print("\ncyphr-client: cancelled", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last guard: one line, never a traceback
        print(f"cyphr-client: unexpected error ({type(e).__name__}): {safe(e)}; this is a "
              f"bug of cyphr-client, please report it", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
