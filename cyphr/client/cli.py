"""
``cyphr-client``: Cyphr from a terminal or a script.

Human-readable output by default, ``--json`` for scripts (one JSON object,
or one per line for ``listen``). The passphrase that unlocks the profile
comes from ``--passphrase-file``, else ``CYPHR_PASSPHRASE``, else a prompt.
Errors are one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import queue
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from cyphr import __version__
from cyphr.client.client import Client, Message, is_chat_id
from cyphr.client.crypto import CryptoError
from cyphr.client.http import ApiError, ClientError
from cyphr.client.profile import Profile, ProfileError

DEFAULT_SERVER = "http://localhost:3001"
DEFAULT_PROFILE = "~/.cyphr"

_HINTS = {
    "TOTP_REQUIRED": "this account has two-factor authentication: run "
                     "`cyphr-client login --totp CODE`",
}


class UsageError(Exception):
    pass


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def result(self, data: dict[str, Any], text: str | Callable[[], str]) -> None:
        if self.as_json:
            print(json.dumps(data, ensure_ascii=False), flush=True)
        else:
            print(text() if callable(text) else text, flush=True)

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


# -- options ------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cyphr-client",
        description="Cyphr end-to-end encrypted messenger, from the command line.",
        epilog="Environment: CYPHR_SERVER, CYPHR_PROFILE, CYPHR_PASSPHRASE, "
               "CYPHR_STELLAR_SECRET (wallet link).")
    parser.add_argument("--version", action="version", version=f"cyphr-client {__version__}")
    parser.add_argument("--server", help=f"server URL (default: CYPHR_SERVER, the profile's, "
                                         f"or {DEFAULT_SERVER})")
    parser.add_argument("--profile", help=f"profile directory (default: CYPHR_PROFILE or "
                                          f"{DEFAULT_PROFILE})")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--passphrase-file", help="read the profile passphrase from this file")
    parser.add_argument("--insecure-tls", action="store_true",
                        help="do not check the server's TLS certificate (testing only)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help)

    command("init", "create a profile with a new identity and show its recovery phrase once")
    p = command("register", "register this profile's identity under a Cyphr ID")
    p.add_argument("cyphr_id")
    p.add_argument("--display-name")
    p.add_argument("--prekeys", type=int, default=100, help="one-time prekeys to publish (100)")
    p = command("login", "start a session (needed again after it expires)")
    p.add_argument("--totp", help="the current two-factor code")
    command("logout", "end this session")
    p = command("recover", "restore an identity on this device from its recovery phrase")
    p.add_argument("cyphr_id")
    p.add_argument("--phrase-file", help="read the 24 words from this file (else stdin or a prompt)")
    command("whoami", "show this profile's identity")
    p = command("send", "send an encrypted message to a Cyphr ID or a chat id")
    p.add_argument("to")
    p.add_argument("text", nargs="+")
    p.add_argument("--type", default="text", dest="message_type",
                   choices=["text", "image", "file", "audio", "video", "call", "payment"])
    p = command("listen", "print messages as they arrive (first those received while away)")
    p.add_argument("--count", type=int, help="exit after this many messages")
    p.add_argument("--timeout", type=float, help="exit after this many seconds")
    p = command("history", "show a chat's messages")
    p.add_argument("chat", help="a chat id, or a Cyphr ID for the direct chat with it")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--before", type=int, help="the page before this seq")
    command("chats", "list chats")

    group = command("group", "group chats").add_subparsers(dest="group_command", metavar="ACTION",
                                                           required=True)
    p = group.add_parser("create", help="create a group with members")
    p.add_argument("name")
    p.add_argument("members", nargs="*")
    for action, help in (("add", "add a member"), ("remove", "remove a member (or leave)")):
        p = group.add_parser(action, help=help)
        p.add_argument("chat")
        p.add_argument("cyphr_id")
    p = group.add_parser("role", help="make a member admin or member")
    p.add_argument("chat")
    p.add_argument("cyphr_id")
    p.add_argument("role", choices=["admin", "member"])
    p = group.add_parser("members", help="list members")
    p.add_argument("chat")

    keys = command("keys", "this identity's keys").add_subparsers(dest="keys_command",
                                                                   metavar="ACTION", required=True)
    keys.add_parser("rotate", help="replace the main ML-KEM key (older messages still open)")
    p = keys.add_parser("prekeys", help="show the one-time prekeys left and top them up")
    p.add_argument("--count", type=int, default=100, help="how many to hold (100)")
    p = command("verify", "show a contact's safety number; --accept a changed identity key")
    p.add_argument("cyphr_id")
    p.add_argument("--accept", action="store_true",
                   help="pin the identity key the server shows now (after comparing numbers)")

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
    p = wallet.add_parser("link", help="link a Stellar account (its secret signs here, never sent)")
    p.add_argument("--secret-file", help="the Stellar secret seed (else CYPHR_STELLAR_SECRET)")
    p = wallet.add_parser("show", help="show a user's linked Stellar address")
    p.add_argument("cyphr_id", nargs="?")
    wallet.add_parser("unlink", help="unlink the Stellar account")
    p = command("delete-account", "delete this identity from the server, for good")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def _read_secret_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text("utf-8").strip()
    except OSError as e:
        raise UsageError(f"cannot read the {what} file {path}: {e.strerror}") from None


def _secret(path: str | None, option: str, variable: str, prompt: str, what: str,
            confirm: bool = False) -> str:
    """A secret from its file option, else its environment variable, else a
    hidden prompt on a terminal."""
    if path:
        return _read_secret_file(path, what)
    if os.environ.get(variable):
        return os.environ[variable]
    if not sys.stdin.isatty():
        raise UsageError(f"no {what}: give {option} or set {variable}")
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != value:
        raise UsageError(f"the {what}s differ")
    return value


def _passphrase(args: argparse.Namespace, confirm: bool = False) -> str:
    passphrase = _secret(args.passphrase_file, "--passphrase-file", "CYPHR_PASSPHRASE",
                         "Profile passphrase: ", "passphrase", confirm)
    if not passphrase:
        raise UsageError("the passphrase must not be empty")
    return passphrase


def _profile_dir(args: argparse.Namespace) -> Path:
    return Path(args.profile or os.environ.get("CYPHR_PROFILE") or DEFAULT_PROFILE).expanduser()


def _server(args: argparse.Namespace) -> str | None:
    return args.server or os.environ.get("CYPHR_SERVER")


def _open(args: argparse.Namespace) -> Client:
    return Client.open(_profile_dir(args), _passphrase(args), _server(args),
                       verify_tls=not args.insecure_tls)


def _time(timestamp: str) -> str:
    try:
        moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _line(message: Message, chat_names: dict[str, str | None] | None = None) -> str:
    where = ""
    if chat_names is not None and chat_names.get(message.chat_id):
        where = f"#{chat_names[message.chat_id]} "
    if message.text is None:
        return f"[{_time(message.timestamp)}] {where}{message.sender} ✗ ({message.error})"
    mark = "✓" if message.verified else "?"
    return f"[{_time(message.timestamp)}] {where}{message.sender} {mark}: {message.text}"


def _visible(message: Message) -> bool:
    # System messages carry keys between clients; a person need not see them.
    return message.message_type != "system" or message.text is None


# -- commands -----------------------------------------------------------------

def cmd_init(args: argparse.Namespace, out: Output) -> None:
    directory = _profile_dir(args)
    if Profile.exists(directory):
        raise UsageError(f"{directory} already holds a profile (give another --profile)")
    client, phrase = Client.init(directory, _passphrase(args, confirm=True),
                                 _server(args) or DEFAULT_SERVER, verify_tls=not args.insecure_tls)
    client.close()
    out.result({"profile": str(directory), "recoveryPhrase": phrase}, lambda: (
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
    answer = client.login(args.totp)
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
    if args.phrase_file:
        phrase = _read_secret_file(args.phrase_file, "recovery phrase")
    elif sys.stdin.isatty():
        phrase = getpass.getpass("Recovery phrase (24 words): ")
    else:
        phrase = sys.stdin.read()
    passphrase = _passphrase(args, confirm=True)
    try:
        client = Client.recover(directory, passphrase, _server(args) or DEFAULT_SERVER, phrase,
                                args.cyphr_id, progress=out.progress("Publishing one-time prekeys"),
                                verify_tls=not args.insecure_tls)
    except BaseException:
        # A failed recovery leaves no half-made profile behind.
        for name in ("vault.json", "profile.json"):
            (directory / name).unlink(missing_ok=True)
        raise
    out.result({"cyphrId": client.cyphr_id, "profile": str(directory)},
               f"Recovered {client.cyphr_id} on this device; its other devices are signed out.")


def cmd_whoami(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    user = client.whoami()
    user["server"] = client.http.server
    out.result(user, lambda: "\n".join([
        f"Cyphr ID:     {user['cyphrId']}",
        f"Display name: {user.get('displayName') or '-'}",
        f"Server:       {client.http.server}",
        f"Identity key: {user['publicKey']}",
    ]))


def cmd_send(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    answer = client.send(args.to, " ".join(args.text), args.message_type)
    answer.pop("success", None)
    out.result(answer, f"Sent (chat {answer['chatId']}, #{answer['seq']}).")


def cmd_listen(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    client.top_up_prekeys(progress=out.progress("Publishing one-time prekeys"))
    arrived: queue.Queue[Message] = queue.Queue()
    listener = client.listener(arrived.put, top_up=False).start()
    names = {c["chatId"]: c.get("name") for c in client.chats() if c["chatType"] == "group"}
    deadline = time.monotonic() + args.timeout if args.timeout is not None else None
    shown = 0
    try:
        while args.count is None or shown < args.count:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                break
            try:
                message = arrived.get(timeout=wait)
            except queue.Empty:
                break
            if not _visible(message):
                continue
            if message.chat_id not in names and message.chat_id:
                names.update({c["chatId"]: c.get("name") for c in client.chats()
                              if c["chatType"] == "group"})
            out.result(message.as_json(), _line(message, names))
            if message.sender != client.cyphr_id:
                listener.mark_read(message.chat_id, message.seq)  # shown is read
            shown += 1
    finally:
        listener.stop()
    if args.count is not None and shown < args.count:
        raise ClientError(f"timed out after {shown} of {args.count} messages")


def _chat_id(client: Client, chat: str) -> str:
    if is_chat_id(chat):
        return chat
    chat_id = client._direct_chat_with(chat)
    if chat_id is None:
        raise UsageError(f"no direct chat with {chat}")
    return chat_id


def cmd_history(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    messages = [m for m in client.history(_chat_id(client, args.chat), args.limit, args.before)
                if _visible(m)]
    if out.as_json:
        out.result({"messages": [m.as_json() for m in messages]}, "")
    else:
        for message in messages:
            print(_line(message))


def cmd_chats(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    chats = client.chats()

    def text() -> str:
        lines = []
        for chat in chats:
            name = chat.get("name") or "(name not known here)"
            kind = "group" if chat["chatType"] == "group" else "direct"
            lines.append(f"{chat['chatId']}  {kind:6}  {name}  ({chat['unreadCount']} unread, "
                         f"{len(chat['participants'])} members)")
        return "\n".join(lines) or "No chats yet."
    out.result({"chats": chats}, text)


def cmd_group(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    action = args.group_command
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
            f"{m['cyphrId']:30} {m['role']:6} since {_time(m['joinedAt'])}" for m in members))


def cmd_keys(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    if args.keys_command == "rotate":
        generation = client.rotate_kyber()
        out.result({"generation": generation}, f"Published a new ML-KEM-1024 key "
                                               f"(generation {generation}).")
    else:
        added = client.top_up_prekeys(low=args.count, target=args.count,
                                      progress=out.progress("Publishing one-time prekeys"))
        remaining = client.prekeys_remaining()
        out.result({"published": added, "remaining": remaining},
                   f"{remaining} one-time prekeys on the server ({added} published now).")


def cmd_verify(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    contact = client.accept_identity(args.cyphr_id) if args.accept else client.contact(args.cyphr_id)
    out.result({"cyphrId": contact.cyphr_id, "safetyNumber": contact.safety_number,
                "verified": contact.verified}, lambda: (
        f"Safety number with {contact.cyphr_id}:\n\n    {contact.safety_number}\n\n"
        + ("Marked verified." if contact.verified else
           f"Compare it with {contact.cyphr_id}'s screen; if they match, run "
           f"`cyphr-client verify {contact.cyphr_id} --accept`.")))


def cmd_totp(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    action = args.totp_command
    if action == "enable":
        secret = client.totp_generate()
        code = args.code
        if code is None and sys.stdin.isatty() and not out.as_json:
            print(f"Add this to your authenticator app:\n  secret: {secret['secret']}\n"
                  f"  {secret['otpauthUrl']}")
            code = input("Code shown by the app: ").strip()
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


def cmd_wallet(args: argparse.Namespace, out: Output) -> None:
    client = _open(args)
    action = args.wallet_command
    if action == "link":
        secret = _secret(args.secret_file, "--secret-file", "CYPHR_STELLAR_SECRET",
                         "Stellar secret seed: ", "Stellar secret")
        address = client.wallet_link(secret)
        out.result({"stellarAddress": address}, f"Linked {address}.")
    elif action == "show":
        address = client.wallet_show(args.cyphr_id)
        out.result({"cyphrId": args.cyphr_id or client.cyphr_id, "stellarAddress": address}, address)
    else:
        client.wallet_unlink()
        out.result({"unlinked": True}, "Unlinked.")


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


COMMANDS: dict[str, Callable[[argparse.Namespace, Output], None]] = {
    "init": cmd_init, "register": cmd_register, "login": cmd_login, "logout": cmd_logout,
    "recover": cmd_recover, "whoami": cmd_whoami, "send": cmd_send, "listen": cmd_listen,
    "history": cmd_history, "chats": cmd_chats, "group": cmd_group, "keys": cmd_keys,
    "verify": cmd_verify, "totp": cmd_totp, "wallet": cmd_wallet,
    "delete-account": cmd_delete_account,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Output(args.json)
    try:
        COMMANDS[args.command](args, out)
    except ApiError as e:
        hint = _HINTS.get(e.code)
        print(f"cyphr-client: {e.message} ({e.code})" + (f": {hint}" if hint else ""),
              file=sys.stderr)
        return 1
    except (ClientError, ProfileError, CryptoError, UsageError) as e:
        print(f"cyphr-client: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
