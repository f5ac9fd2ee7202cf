"""
Malformed socket events over a real port, with the stock python-socketio
client: a handler that fails at once, the wrong number of arguments, bytes
where JSON belongs, nesting past the cap. Each gets an error ack in the
contract's format ({success: false, error, code}), and the connection lives.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.errors import BadRequest
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, start_server
from tests.realtime import SioClient, sessions_closed, until
from tests.users import User


def nested(depth: int) -> Any:
    """An object ``depth`` levels deep, objects and arrays alternating, an
    object outermost (built without recursion)."""
    value: Any = 0
    for level in range(depth):
        value = {"a": value} if (depth - 1 - level) % 2 == 0 else [value]
    return value


class HardeningMixin:
    async def setUp(self) -> None:
        self.server = await start_server(self, serve=True)
        [port] = [await d for d in self.server.listening()]
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.http = InProcessHTTP.for_server(self.server)
        self.clients: list[SioClient] = []
        self.addCleanup(self._close_clients)
        self.alice = User("alice")
        await self.alice.register(self.http)
        self.bob = User("bob")
        await self.bob.register(self.http)

    async def _close_clients(self) -> None:
        for client in self.clients:
            if client.sio.connected:
                await client.disconnect()
        await sessions_closed(self.server)

    async def connect(self, user: User | None) -> SioClient:
        client = SioClient(self.url, transports=["websocket"])
        self.clients.append(client)
        await client.connect({"token": user.token} if user is not None else None)
        if user is not None:
            await client.wait_for("sync_complete")
        return client

    def call(self, client: SioClient, event: str, *args: Any) -> Any:
        """An event with exactly these arguments (python-socketio spreads a tuple)."""
        return deferToThread(client.sio.call, event, args, timeout=10)

    def assert_refused(self, ack: Any, code: str) -> None:
        self.assertIsInstance(ack, dict, ack)
        self.assertEqual((ack.get("success"), ack.get("code")), (False, code), ack)
        self.assertIsInstance(ack.get("error"), str, ack)

    async def assert_alive(self, client: SioClient) -> None:
        """The connection still answers: a valid event gets its ack."""
        ack = await client.call("authenticate", {"token": self.alice.token})
        self.assertIs(ack["success"], True, ack)
        self.assertEqual(client.disconnects, [])

    async def stored(self) -> int:
        response = await self.http.get("/api/messaging/sync", headers=self.bob.auth())
        return len(response.json()["messages"])

    # -- a handler that raises at once ---------------------------------------------------

    async def test_authenticate_with_two_arguments(self) -> None:
        """`authenticate` sent with two arguments (its handler takes one) gets an INVALID_BODY error ack
        and the connection lives; nothing is logged as an error."""
        client = await self.connect(None)
        ack = await self.call(client, "authenticate", {"token": self.alice.token}, "extra")
        self.assert_refused(ack, "INVALID_BODY")
        self.assertIn("authenticate", ack["error"])
        await self.assert_alive(client)
        await client.wait_for("sync_complete")
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_synchronous_raise_is_answered(self) -> None:
        """A handler that raises before it returns (not a coroutine) is answered like one that fails
        later: an ApiError is its error ack, anything else INTERNAL_ERROR (logged); without an ack id
        nothing is sent; the connection lives in every case."""
        def refuse(socket: Any, data: Any = None) -> None:
            raise BadRequest("No, thank you", code="INVALID_FIELD")

        def crash(socket: Any, data: Any = None) -> None:
            raise ZeroDivisionError("a bug")

        self.server.realtime.ns.on("refuse", refuse)
        self.server.realtime.ns.on("crash", crash)
        client = await self.connect(self.alice)
        ack = await client.call("refuse", {})
        self.assertEqual(ack, {"success": False, "error": "No, thank you", "code": "INVALID_FIELD"})
        self.assert_refused(await client.call("crash", {}), "INTERNAL_ERROR")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        await client.emit("refuse", {})  # no ack id
        await self.assert_alive(client)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_wrong_argument_count_on_a_plain_handler(self) -> None:
        """A handler with a fixed signature is never called with arguments it does not take: too
        many or too few are INVALID_BODY, the handler does not run, the connection lives."""
        calls: list[Any] = []
        self.server.realtime.ns.on("one", lambda socket, data: calls.append(data) or {"success": True})
        client = await self.connect(self.alice)
        self.assert_refused(await self.call(client, "one", 1, 2), "INVALID_BODY")
        self.assert_refused(await self.call(client, "one"), "INVALID_BODY")
        self.assertEqual(await self.call(client, "one", 1), {"success": True})
        self.assertEqual(calls, [1])
        await self.assert_alive(client)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_send_message_with_two_arguments(self) -> None:
        """`send_message` sent with two arguments gets an INVALID_BODY error ack and stores nothing."""
        client = await self.connect(self.alice)
        ack = await self.call(client, "send_message",
                              {"recipientId": "bob", "encryptedPayload": {"c": "x"}}, "extra")
        logged = self.flushLoggedErrors()
        self.assert_refused(ack, "INVALID_BODY")
        self.assertEqual(logged, [])
        self.assertEqual(await self.stored(), 0)
        await self.assert_alive(client)


    # -- bytes where JSON belongs ------------------------------------------------------------

    async def test_bytes_in_encrypted_payload(self) -> None:
        """Bytes inside encryptedPayload (a binary event's attachment) are 400 INVALID_FIELD naming the
        field, not a 500; nothing is stored and the connection lives."""
        client = await self.connect(self.alice)
        for payload in ({"c": b"\x00\x01"}, {"c": [1, {"d": b"x"}]}):
            ack = await client.call("send_message", {"recipientId": "bob", "encryptedPayload": payload})
            self.assert_refused(ack, "INVALID_FIELD")
            self.assertEqual(ack["details"], {"field": "encryptedPayload"})
        self.assertEqual(await self.stored(), 0)
        ack = await client.call("send_message", {"recipientId": "bob", "encryptedPayload": {"c": "x"}})
        self.assertIs(ack["success"], True, ack)
        self.assertEqual(self.flushLoggedErrors(), [])

    # -- nesting ----------------------------------------------------------------------

    async def raw_call(self, client: SioClient, ack_id: int, text: str) -> Any:
        """Send an EVENT written by hand (the stock client's encoder recurses,
        and cannot write data this deep) and wait for its ack."""
        got: list[Any] = []
        client.sio.callbacks.setdefault("/", {})[ack_id] = lambda *args: got.append(args)
        await deferToThread(client.sio.eio.send, f"2{ack_id}{text}")
        await until(lambda: got, f"the ack of event {ack_id}")
        [[ack]] = got
        return ack

    async def test_nesting_is_capped(self) -> None:
        """Event data nested deeper than 64 levels gets an INVALID_JSON error ack, whether the decoder
        can read it (65, 100, 400, 960) or not (5000); the handler never runs, nothing is stored and
        the connection lives. 64 levels are accepted."""
        client = await self.connect(self.alice)
        for depth in (65, 100, 400):
            data = {"recipientId": "bob", "encryptedPayload": nested(depth - 1)}
            ack = await client.call("send_message", data)
            self.assert_refused(ack, "INVALID_JSON")
            self.assertIn("64", ack["error"])
        for ack_id, depth in ((9998, 960), (9999, 5000)):
            pairs = (depth - 1) // 2
            text = ('["send_message",{"recipientId":"bob","encryptedPayload":'
                    + '{"a":[' * pairs + "]}" * pairs + "}]")
            self.assert_refused(await self.raw_call(client, ack_id, text), "INVALID_JSON")
        self.assertEqual(await self.stored(), 0)
        ack = await client.call("send_message", {"recipientId": "bob", "encryptedPayload": nested(63)})
        self.assertIs(ack["success"], True, ack)
        self.assertEqual(await self.stored(), 1)
        await self.assert_alive(client)
        self.assertEqual(self.flushLoggedErrors(), [])


class SQLiteHardeningTests(SQLiteMixin, HardeningMixin, TestCase):
    pass


class PostgresHardeningTests(PostgresMixin, HardeningMixin, TestCase):
    pass
