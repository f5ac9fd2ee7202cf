"""
The client author's guide's example (docs/examples/realtime-client.mjs),
run with Node.js and the stock socket.io-client that its package-lock.json
pins, against a real server on a real port.

Node.js and the example's packages (``npm ci --prefix docs/examples``, as
.ci/run does) must be installed: where they are not, these tests fail and
say so, since CI runs every test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers import RealHTTP, SQLiteMixin, start_server
from tests.realtime import sessions_closed
from tests.users import User

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "docs", "examples")
EXAMPLE = os.path.join(EXAMPLES, "realtime-client.mjs")
SOCKET_IO_CLIENT = os.path.join(EXAMPLES, "node_modules", "socket.io-client", "package.json")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def node() -> str:
    """The node executable, or a failure that says how to get what is missing."""
    found = shutil.which("node")
    if found is None:
        raise AssertionError("Node.js is not installed: the documentation's example client "
                             "needs `node` on PATH (Debian: apt-get install nodejs npm)")
    if not os.path.exists(SOCKET_IO_CLIENT):
        raise AssertionError("the example's packages are not installed: run "
                             "`npm ci --prefix docs/examples` (as .ci/run does)")
    return found


def run_example(server_url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the example as its header says, with the token in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYPHR_")}
    env.update(CYPHR_SERVER=server_url, CYPHR_TOKEN=token)
    return subprocess.run([node(), EXAMPLE, *args], env=env, cwd=EXAMPLES, capture_output=True,
                          text=True, timeout=60)


class DocsExampleTests(SQLiteMixin, TestCase):
    async def serve(self) -> tuple[Any, str, RealHTTP]:
        """A server on a real port; its URL and an HTTP client for it."""
        server = await start_server(self, serve=True)
        port = (await server.listening()[0]).getHost().port
        http = RealHTTP.for_port(self, port)
        return server, http.base_url, http

    async def test_example_catches_up_and_sends(self) -> None:
        """The example connects with Alice's token, receives Bob's message in
        the catch-up and acknowledges it as delivered, then sends Bob a
        message that Bob finds in the chat's history with the payload the
        example sent."""
        node()  # before the server starts: a missing tool fails at once
        server, url, http = await self.serve()
        alice, bob = User("alice"), User("bob")
        await alice.register(http)
        await bob.register(http)
        sent = await http.post("/api/messaging/send",
                               {"recipientId": "alice", "encryptedPayload": {"sealed": "by bob"}},
                               headers=bob.auth())
        self.assertEqual(sent.code, 201, sent.body)
        first = sent.json()

        result = await deferToThread(run_example, url, alice.token, "bob", "hello from node")
        self.assertEqual(result.returncode, 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], "authenticated as alice")
        self.assertIn(f"new_message {first['messageId']} seq 1 in chat {first['chatId']} from bob", lines)
        self.assertIn(f"delivered {first['messageId']}", lines)
        self.assertIn("caught up, sync cursor", result.stdout)
        found = re.search(rf"^sent ({UUID}) seq 2 in chat ({UUID})$", result.stdout, re.MULTILINE)
        self.assertIsNotNone(found, result.stdout)
        assert found is not None
        message_id, chat_id = found.groups()
        self.assertEqual(chat_id, first["chatId"])

        history = await http.get(f"/api/messaging/chat/{chat_id}", headers=bob.auth())
        self.assertEqual(history.code, 200, history.body)
        mine = [m for m in history.json()["messages"] if m["id"] == message_id]
        self.assertEqual(len(mine), 1, history.body)
        self.assertEqual(mine[0]["senderId"], "alice")
        self.assertEqual(mine[0]["encryptedPayload"], {"example": "not sealed", "text": "hello from node"})
        await sessions_closed(server)

    async def test_example_refused_token(self) -> None:
        """Given a token the server does not accept, the example says that
        the connection was refused, with the server's code, and exits 1."""
        node()
        server, url, http = await self.serve()
        result = await deferToThread(run_example, url, "not-a-token", "bob", "hello")
        self.assertEqual(result.returncode, 1, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        self.assertIn("connection refused", result.stderr)
        self.assertIn("(INVALID_TOKEN)", result.stderr)
        self.assertNotIn("sent ", result.stdout)
        await sessions_closed(server)
