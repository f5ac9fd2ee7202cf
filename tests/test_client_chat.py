"""
``cyphr-client chat``, the full-screen chat, as a person meets it: the real
command in a pseudo-terminal (pexpect), its screen as a VT100 emulator
(pyte) draws it, against a real server, with Bob on the client library.

Each test quits with one of the quitting keys and checks that the terminal
is left as it was found: the command's exit status, the alternate screen
left, the terminal's settings (``stty -g``) the same before and after, and
no traceback anywhere in what reached the terminal.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pexpect
import pyte
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr.client.chatstate import TYPING_SHOWN, ChatEntry, ChatState, Shown
from cyphr.client.client import Client, Message, Receipts
from tests.helpers import CLIENT, SQLiteMixin, cli_in_process, start_server

ROOT = Path(__file__).resolve().parent.parent
STRONG = "correct horse battery staple 4711"
ROWS, COLUMNS = 30, 160
ENTER, TAB, ESC, CTRL_C, CTRL_D = "\r", "\t", "\x1b", "\x03", "\x04"


class Terminal:
    """A command in a pseudo-terminal, with the screen it draws. Run
    through ``sh`` so that the terminal's settings are printed before and
    after it."""

    def __init__(self, argv: list[str]) -> None:
        script = f"stty -g; {shlex.join(argv)}; echo exit=$?; stty -g"
        env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="xterm-256color", LC_ALL="C.UTF-8")
        self.child = pexpect.spawn("/bin/sh", ["-c", script], env=env, cwd=str(ROOT),
                                   dimensions=(ROWS, COLUMNS))
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def _read(self, timeout: float) -> bool:
        """Read what came; False at the end of the output."""
        try:
            data = self.child.read_nonblocking(65536, timeout)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False
        self.raw += data
        self.stream.feed(data)
        return True

    def wait_for(self, wanted: str | Callable[[str], bool], timeout: float = 20) -> str:
        """The screen once it shows ``wanted`` (a text, or a test of the
        screen's text); AssertionError with the screen after ``timeout``."""
        check = wanted if callable(wanted) else lambda text: wanted in text
        deadline = time.monotonic() + timeout
        while not check(self.text()):
            if time.monotonic() > deadline or not self._read(0.1):
                raise AssertionError(f"not on the screen: {wanted!r}\n{self.text()}\n"
                                     f"(output: {bytes(self.raw[-2000:])!r})")
        return self.text()

    def type(self, keys: str) -> None:
        self.child.send(keys.encode("utf-8"))

    def quit(self, key: str) -> bytes:
        """Press ``key``, wait for the end; the output after the screen."""
        self.type(key)
        deadline = time.monotonic() + 20
        while self._read(0.2):
            assert time.monotonic() < deadline, bytes(self.raw[-2000:])
        self.child.close()
        return bytes(self.raw)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


class ChatTests(SQLiteMixin, TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.port = port.getHost().port
        self.url = f"http://127.0.0.1:{self.port}"
        self.alice_dir = os.path.abspath(self.mktemp())
        self.passphrase = Path(os.path.abspath(self.mktemp()))
        self.passphrase.write_text(STRONG + "\n")
        alice = await self.user(self.alice_dir, "alice")
        alice.close()  # from here on, the command alone holds Alice's profile
        self.bob = await self.user(os.path.abspath(self.mktemp()), "bob", "Bob B.")

    async def user(self, directory: str, cyphr_id: str, name: str | None = None) -> Client:
        client, _ = await deferToThread(Client.init, directory, STRONG, self.url)
        self.addCleanup(client.close)
        await deferToThread(client.register, cyphr_id, name, 3)
        return client

    def chat(self, *args: str, server: str | None = None, prompt: bool = False) -> Terminal:
        """``cyphr-client chat`` as Alice, in a terminal of its own."""
        secret = [] if prompt else ["--passphrase-file", str(self.passphrase)]
        terminal = Terminal([*CLIENT, "--server",
                             server or self.url, "--profile", self.alice_dir, *secret,
                             "chat", *args])
        self.addCleanup(terminal.close)
        return terminal

    def assertLeftClean(self, output: bytes) -> None:
        """The command exited 0, left the alternate screen, and the terminal
        settings are as before; no traceback reached the terminal."""
        lines = output.replace(b"\r", b"").split(b"\n")
        settings = [line for line in lines if line.count(b":") > 10]
        self.assertEqual(len(settings), 2, output[-500:])
        self.assertEqual(settings[0], settings[1])
        self.assertIn(b"exit=0", output)
        self.assertGreater(output.rfind(b"\x1b[?1049l"), output.rfind(b"\x1b[?1049h"))
        for sign in (b"Traceback", b"Exception", b"cannot join"):
            self.assertNotIn(sign, output)

    async def test_chat_list_with_unread_counts(self) -> None:
        """The chats are listed with their unread counts; a message that
        arrives for a chat not open adds one; opening it shows its
        messages, clears the count, and tells the sender they were read.
        Ctrl-C quits."""
        await deferToThread(self.bob.send, "alice", "first")
        await deferToThread(self.bob.send, "alice", "second")
        events: list[tuple[str, Any]] = []
        read = threading.Event()

        def on_event(name: str, data: Any) -> None:
            events.append((name, data))
            if name == "message_read":
                read.set()

        listener = await deferToThread(
            lambda: self.bob.listener(lambda m: None, on_event=on_event).start())
        self.addCleanup(lambda: deferToThread(listener.stop))

        def scenario() -> bytes:
            terminal = self.chat()
            terminal.wait_for(lambda s: "bob (Bob B.) [2]" in s and " online │" in s)
            self.bob.send("alice", "third")
            terminal.wait_for("bob (Bob B.) [3]")
            terminal.type(TAB)
            screen = terminal.wait_for("third")
            self.assertIn("first", screen)
            self.assertIn("second", screen)
            self.assertNotIn("[3]", screen)
            self.assertTrue(read.wait(20), events)
            return terminal.quit(CTRL_C)

        self.assertLeftClean(await deferToThread(scenario))
        [(_, receipt)] = [e for e in events if e[0] == "message_read"]
        self.assertEqual((receipt["userId"], receipt.get("upToSeq")), ("alice", 3))

    async def test_live_message_with_escapes_neutralised(self) -> None:
        """A message arrives live in the open chat, and the escape
        sequences, control and bidirectional characters in it are shown
        as visible stand-ins: none reaches the terminal raw. A `send` run
        on the same profile in another process meanwhile works, and its
        message shows up as Alice's own. Esc quits."""
        await deferToThread(self.bob.send, "alice", "hello")

        def scenario() -> bytes:
            terminal = self.chat("bob")
            terminal.wait_for(lambda s: "hello" in s and " online │" in s)
            sent = subprocess.run(
                [*CLIENT, "--server", self.url, "--profile",
                 self.alice_dir, "--passphrase-file", str(self.passphrase), "send", "bob",
                 "from another terminal"], capture_output=True, text=True, timeout=60,
                cwd=str(ROOT), stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            self.assertEqual(sent.returncode, 0, sent.stderr)
            terminal.wait_for("alice ✓: from another terminal")
            self.bob.send("alice", "\x1b]2;HACKED\x07\x1b[2K\rcarol \u202eok\u202c: wire me")
            screen = terminal.wait_for("wire me")
            self.assertIn("␛]2;HACKED␇␛[2K␍carol <U+202E>ok<U+202C>: wire me", screen)
            return terminal.quit(ESC)

        output = await deferToThread(scenario)
        self.assertNotIn(b"\x1b]2;HACKED", output)
        self.assertNotIn("\u202e".encode(), output)
        self.assertIn("␛]2;HACKED␇".encode(), output)
        self.assertLeftClean(output)

    async def test_send_with_enter_receipts_typing_presence(self) -> None:
        """Bob shows as online; what Alice types tells Bob she is typing;
        Enter sends it, Bob's client opens it, and Alice sees it marked
        delivered, then read; Bob's typing is shown to Alice; Bob leaving
        shows him as last seen. Ctrl-D quits."""
        await deferToThread(self.bob.send, "alice", "hello")
        received: list[Any] = []
        typing = threading.Event()
        got = threading.Event()

        def on_message(message: Any) -> None:
            received.append(message)
            got.set()

        def on_event(name: str, data: Any) -> None:
            if name == "user_typing" and data.get("userId") == "alice" and data.get("isTyping"):
                typing.set()

        listener = await deferToThread(
            lambda: self.bob.listener(on_message, on_event=on_event).start())
        stopped = False
        self.addCleanup(lambda: None if stopped else deferToThread(listener.stop))

        def scenario() -> bytes:
            nonlocal stopped
            terminal = self.chat("bob")
            terminal.wait_for(lambda s: "hello" in s and "online" in s.splitlines()[0])
            terminal.type("hi bob, from the chat")
            self.assertTrue(typing.wait(20), "Bob was not told that Alice is typing")
            terminal.type(ENTER)
            self.assertTrue(got.wait(20), "Bob did not get the message")
            [message] = received
            self.assertEqual((message.sender, message.text, message.verified),
                             ("alice", "hi bob, from the chat", True))
            terminal.wait_for("hi bob, from the chat  · delivered")
            listener.mark_read(message.chat_id, message.seq)
            terminal.wait_for("hi bob, from the chat  · read")
            listener.typing(message.chat_id)
            terminal.wait_for("bob is typing…")
            listener.stop()
            stopped = True
            terminal.wait_for(lambda s: "last seen" in s.splitlines()[0])
            return terminal.quit(CTRL_D)

        self.assertLeftClean(await deferToThread(scenario))

    async def test_dropped_connection_is_shown_and_retried(self) -> None:
        """The passphrase is asked once at the prompt; a connection cut
        under the chat is shown on the status line and retried, and a
        message sent after it arrives. Esc quits."""
        factory = portforward.ProxyFactory("127.0.0.1", self.port)
        factory.protocol = _Proxy
        factory.connections = []
        proxy = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(proxy.stopListening)
        await deferToThread(self.bob.send, "alice", "hello")
        terminal = self.chat("bob", server=f"http://127.0.0.1:{proxy.getHost().port}",
                             prompt=True)

        def start() -> None:
            terminal.wait_for("Profile passphrase:")
            terminal.type(STRONG + ENTER)
            terminal.wait_for(lambda s: "hello" in s and " online │" in s)

        await deferToThread(start)

        def lost() -> bool:
            try:
                terminal.wait_for("the connection was lost", timeout=0.5)
            except AssertionError:
                return False
            return True

        # Until the chat sees it: the stock client may be upgrading from
        # long-polling to a WebSocket, on a connection made after this cut.
        for _ in range(60):
            for connection in list(factory.connections):
                connection.transport.abortConnection()
            if await deferToThread(lost):
                break

        def scenario() -> bytes:
            terminal.wait_for("the connection was lost")
            terminal.wait_for("reconnected")
            self.bob.send("alice", "after the drop")
            terminal.wait_for("after the drop")
            return terminal.quit(ESC)

        self.assertLeftClean(await deferToThread(scenario))


class _Proxy(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        super().connectionMade()


def _message(seq: int, sender: str, chat: str = "chat-1") -> Message:
    return Message(f"m{seq}", chat, seq, sender, "2026-01-01T00:00:00Z", "text", f"text {seq}",
                   True)


class ChatStateTests(SynchronousTestCase):
    """The rules of what the chat shows, without a screen or a server."""

    def setUp(self) -> None:
        self.now = 100.0
        self.state = ChatState("alice", clock=lambda: self.now)
        self.state.set_chats([
            ChatEntry("chat-1", False, "bob", ["alice", "bob"], peer="bob", unread=2),
            ChatEntry("chat-2", True, "club", ["alice", "bob", "carol"], unread=0)])

    def test_unread_counts(self) -> None:
        """A live message from someone else counts as unread in a chat not
        open, not in the open one, and one's own never; a message loaded
        with the history never counts; the chat moves to the top."""
        self.state.select("chat-1")
        self.state.add([Shown(_message(5, "bob", "chat-1"), "")], live=True)
        self.state.add([Shown(_message(1, "carol", "chat-2"), "")], live=True)
        self.state.add([Shown(_message(2, "alice", "chat-2"), "")], live=True)
        self.state.add([Shown(_message(3, "bob", "chat-2"), "")])
        self.assertEqual([(e.chat_id, e.unread) for e in self.state.chat_list()],
                         [("chat-2", 1), ("chat-1", 0)])
        self.assertTrue(self.state.add([Shown(_message(1, "dave", "chat-9"), "")], live=True))

    def test_nothing_open(self) -> None:
        """With no chat open, every chat keeps its unread count (a group,
        which has no peer, is not taken for the open chat)."""
        self.state.set_chats([ChatEntry("chat-2", True, "club", ["alice", "bob"], unread=3)])
        self.assertIsNone(self.state.selected)
        self.assertIsNone(self.state.entry(None))
        self.assertEqual([e.unread for e in self.state.chat_list()], [3])

    def test_direct_receipts(self) -> None:
        """One's own message sent here is "sent", then "delivered", then
        "read" (by id, or by a read up to a later seq); a message from
        before this session has no mark until a receipt comes; another's
        message never has one."""
        sent = Shown(_message(1, "alice"), "", sent_here=True)
        old, later, theirs = Shown(_message(2, "alice"), ""), Shown(_message(4, "alice"), ""), \
            Shown(_message(3, "bob"), "")
        self.state.add([sent, old, later, theirs])
        self.assertEqual([self.state.mark(one) for one in (sent, old, theirs)], ["sent", "", ""])
        self.state.receipt("message_delivered", {"messageId": "m1", "chatId": "chat-1",
                                                 "userId": "bob"})
        self.assertEqual(self.state.mark(sent), "delivered")
        self.state.receipt("message_read", {"upToSeq": 2, "chatId": "chat-1", "userId": "bob"})
        self.assertEqual([self.state.mark(one) for one in (sent, old, later)], ["read", "read", ""])

    def test_group_receipts(self) -> None:
        """In a group, the mark counts the other members who got and who
        read the message."""
        mine = Shown(_message(1, "alice", "chat-2"), "", sent_here=True)
        self.state.add([mine])
        self.state.receipt("message_delivered", {"messageId": "m1", "userId": "bob"})
        self.state.receipt("message_read", {"messageId": "m1", "userId": "carol"})
        self.assertEqual(self.state.mark(mine), "delivered to 2/2, read by 1/2")

    def test_receipts_from_history(self) -> None:
        """Receipts that came with the history seed the marks of one's own
        messages: read, delivered, or "sent" when nobody has it yet (the
        server said so); in a group, the counts; live receipts add to them."""
        def own(seq: int, chat: str, delivered: tuple[str, ...], read: tuple[str, ...]) -> Shown:
            return Shown(dataclasses.replace(_message(seq, "alice", chat),
                                             receipts=Receipts(delivered, read)), "")

        read, delivered, nobody = own(1, "chat-1", ("bob",), ("bob",)), \
            own(2, "chat-1", ("bob",), ()), own(3, "chat-1", (), ())
        group = own(4, "chat-2", ("bob", "carol"), ("carol",))
        self.state.add([read, delivered, nobody, group])
        self.assertEqual([self.state.mark(one) for one in (read, delivered, nobody, group)],
                         ["read", "delivered", "sent", "delivered to 2/2, read by 1/2"])
        self.state.receipt("message_read", {"messageId": "m4", "chatId": "chat-2", "userId": "bob"})
        self.assertEqual(self.state.mark(group), "delivered to 2/2, read by 2/2")

    def test_typing_shown_for_a_while(self) -> None:
        """Someone typing is shown until they say they stopped, until their
        message comes, or for TYPING_SHOWN seconds after their last word;
        one's own typing (another device) is not shown."""
        self.state.typing({"chatId": "chat-1", "userId": "bob", "isTyping": True})
        self.state.typing({"chatId": "chat-1", "userId": "alice", "isTyping": True})
        self.assertEqual(self.state.typing_now("chat-1"), ["bob"])
        self.now += TYPING_SHOWN + 0.1
        self.assertEqual(self.state.typing_now("chat-1"), [])
        self.state.typing({"chatId": "chat-1", "userId": "bob", "isTyping": True})
        self.state.add([Shown(_message(9, "bob"), "")], live=True)
        self.assertEqual(self.state.typing_now("chat-1"), [])
        self.state.typing({"chatId": "chat-1", "userId": "bob", "isTyping": True})
        self.state.typing({"chatId": "chat-1", "userId": "bob", "isTyping": False})
        self.assertEqual(self.state.typing_now("chat-1"), [])


class NotATerminalTests(SynchronousTestCase):
    def test_refused_without_a_terminal(self) -> None:
        """Without a terminal (a script, a pipe) chat says so in one line and
        exits 1, before it asks for the passphrase or opens a profile (run
        as a script runs it, through cli.main in this process)."""
        result = cli_in_process(["--profile", self.mktemp(), "chat"])
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr, "cyphr-client: chat needs a terminal (scripts use listen "
                                         "and send)\n")
