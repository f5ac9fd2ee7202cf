"""
Sockets end with their session: a logout, a recovery or the token's expiry
ends every socket of that token (or user), including a socket still in its
welcome, and nothing more is done for it or accepted from it.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers import PostgresMixin, SQLiteMixin, fixed_clock
from tests.realtime import SioClient, until
from tests.test_realtime_cluster import ClusterMixin
from tests.test_realtime_events import MemoryRealtimeBase, RawSocket, RealtimeBase
from tests.users import User


def _send_frame(chat_id: str, ack_id: int = 1) -> str:
    return "42%d%s" % (ack_id, json.dumps(
        ["send_message", {"chatId": chat_id, "encryptedPayload": {"ct": "EVIL"}}]))


def answered_or_closed(raw: RawSocket, ack_id: int) -> None:
    """In a thread: read ``raw`` until the server answers the event of
    ``ack_id`` or the connection closes. Either way the server is done with
    that event: answered after its handler ended, or never to be handled
    (a closed session hands nothing on)."""
    import websocket

    try:
        while True:
            frame = raw.ws.recv()
            raw.frames.append(frame)
            if frame == "" or frame.startswith(f"43{ack_id}"):  # "": the close frame
                return
    except (websocket.WebSocketConnectionClosedException, OSError):
        return


def hold_welcomes(testcase: TestCase, realtime: Any) -> tuple[list[Deferred[Any]], Any]:
    """Make every welcome wait on the database: each leaves a Deferred in
    the list answered, for the test to fire with the result of the real
    lookup, answered too."""
    held: list[Deferred[Any]] = []
    real_positions = realtime._delivery.positions

    def hold(cyphr_id: str, device: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        held.append(d)
        return d

    testcase.patch(realtime._delivery, "positions", hold)
    return held, real_positions


class RawWelcomeRevocation(RealtimeBase):
    """What a socket sends during its welcome, written by hand (RawSocket),
    over a real port."""

    async def _messages(self, user: User, chat_id: str) -> list[dict[str, Any]]:
        response = await self.http.get(f"/api/messaging/chat/{chat_id}", headers=user.auth())
        assert response.code == 200, response.body
        return response.json()["messages"]

    async def test_logout_during_welcome_ends_the_socket(self) -> None:
        """A socket whose token is logged out while its welcome waits on the
        database is disconnected; when the welcome resumes it joins no room,
        announces nothing, and what the socket sent meanwhile is refused:
        nothing is stored and the user's correspondents hear nothing."""
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        chat_id = await self.direct_chat(bob, alice)
        b = await self.connect(bob)
        realtime = self.server.realtime
        held, real_positions = hold_welcomes(self, realtime)
        raw = await deferToThread(RawSocket, self.url)
        self.addCleanup(deferToThread, raw.close)
        await deferToThread(raw.ws.send, '40{"token":"%s"}' % alice.token)
        await deferToThread(raw.recv_until, "40")
        await until(lambda: held, "the welcome to wait on the database")
        response = await self.http.post("/api/cyphr-id/logout", {}, headers=alice.auth())
        self.assertEqual(response.code, 200, response.body)
        # What the socket sends now, before its welcome ends.
        try:
            await deferToThread(raw.ws.send, _send_frame(chat_id))
        except Exception:
            pass  # already closed: refused too
        await deferToThread(answered_or_closed, raw, 1)
        held[0].callback(await real_positions("alice", (alice.user_id, 1)))
        # The welcome went on from its lookup within callback(); what it
        # spawned (an announcement) has ended, and what reached bob's
        # socket before then has arrived by the barrier's answer.
        await realtime.tasks_done()
        await b.barrier()
        self.assertNotIn("user:alice", realtime.ns.rooms)
        self.assertEqual({s.state.user.cyphr_id for s in realtime.ns.rooms.get("chat:" + chat_id, ())},
                         {"bob"})
        self.assertFalse(any(s.state.user is not None and s.state.user.cyphr_id == "alice"
                             for s in realtime.ns.sockets.values()))
        self.assertFalse(realtime.presence.is_online("alice"))
        self.assertEqual(b.events("user_online"), [])
        self.assertEqual(b.events("new_message"), [])
        self.assertEqual([m["senderId"] for m in await self._messages(bob, chat_id)], ["bob"])


class RevocationMixin(RealtimeBase):
    """Sessions ended while sockets are being welcomed, with whichever
    client the base class makes."""

    async def test_recovery_during_welcome_ends_the_socket(self) -> None:
        """A recovery on a new device while a socket of the old device is in
        its welcome ends that socket: it is disconnected and joins no room."""
        await self.serve()
        alice = await self.user("alice")
        client = self.new_client()
        realtime = self.server.realtime
        held, real_positions = hold_welcomes(self, realtime)
        await client.connect({"token": alice.token})
        await until(lambda: held, "the welcome to wait on the database")
        response = await alice.recover(self.http, "ab" * 32)
        self.assertEqual(response.code, 200, response.body)
        held[0].callback(await real_positions("alice", (alice.user_id, 1)))
        await client.wait_disconnected(timeout=3)
        # The welcome went on from its lookup within callback() (rooms and
        # presence are decided there); what it spawned has ended.
        await realtime.tasks_done()
        self.assertEqual(client.events("authenticated"), [])
        self.assertNotIn("user:alice", realtime.ns.rooms)
        self.assertFalse(realtime.presence.is_online("alice"))

    async def test_concurrent_connects_while_logging_out(self) -> None:
        """Many sockets connecting with a token while it is logged out: once
        the logout is answered and the connects have settled, none of them
        is still connected on the server (no socket, no room, offline)."""
        # Not asserted here: whether each stock client says it is
        # disconnected. Now and then one python-socketio client keeps
        # ``connected`` True although its Engine.IO client is disconnected
        # (no sid) and the server holds no session for it: the stock
        # client's own flag, when its connection closes while connect()
        # still waits for the namespace.
        await self.serve()
        alice = await self.user("alice")
        realtime = self.server.realtime
        # Every welcome's lookup, to wait for: a welcome that resumes once
        # its socket has gone must not put it in a room or online.
        lookups: list[Deferred[Any]] = []
        positions = realtime._delivery.positions

        def looked_up(*args: Any, **kwargs: Any) -> Deferred[Any]:
            lookup = ensureDeferred(positions(*args, **kwargs))
            lookups.append(lookup)
            return lookup

        self.patch(realtime._delivery, "positions", looked_up)
        for _ in range(5):
            token = alice.token
            clients = [self.new_client() for _ in range(10)]
            connects = [c.connect({"token": token}) for c in clients]
            settled = DeferredList(connects, consumeErrors=True)
            # The logout lands while the first sockets are in their welcome
            # and the others are still having their token checked.
            await until(lambda: realtime.ns.sockets or settled.called, "a socket to be accepted",
                        step=0.002)
            response = await self.http.post("/api/cyphr-id/logout", {}, headers=alice.auth(token))
            self.assertEqual(response.code, 200, response.body)
            await settled
            await until(lambda: not realtime.ns.sockets, "every socket of the token to end", timeout=5)
            # No welcome starts now (every connect was answered). Each
            # welcome awaits its lookup first, so it resumes before this
            # does; then what it spawned ends.
            await DeferredList(lookups, consumeErrors=True)
            await realtime.tasks_done()
            self.assertEqual(realtime.ns.sockets, {})
            self.assertNotIn("user:alice", realtime.ns.rooms)
            self.assertFalse(realtime.presence.is_online("alice"))
            await alice.login(self.http)


class SQLiteRevocationTests(SQLiteMixin, RevocationMixin, MemoryRealtimeBase, TestCase):
    """On SQLite, in memory (tests.memory_socket)."""


class SQLiteRawRevocationTests(SQLiteMixin, RawWelcomeRevocation, TestCase):
    pass


class PostgresRevocationTests(PostgresMixin, RevocationMixin, RawWelcomeRevocation, TestCase):
    pass


class ExpiryTests(SQLiteMixin, RealtimeBase, TestCase):
    """Sockets end when their token expires, on the server's clock."""

    async def test_socket_ends_at_token_expiry(self) -> None:
        """A socket is disconnected (told, so it does not reconnect) when its
        token expires, not before."""
        clock = fixed_clock()
        await self.serve(clock=clock, token_lifetime=60)
        alice = await self.user("alice")
        client = await self.connect(alice)
        clock.advance(59.5)
        # The expiry timer would have fired within advance(): a disconnect
        # it sent has arrived by the barrier's answer.
        await client.barrier()
        self.assertEqual(client.disconnects, [])
        self.assertTrue(client.sio.connected)
        clock.advance(1)
        reason = await client.wait_disconnected(timeout=3)
        # Told: the server's DISCONNECT packet arrived. The stock client
        # reports the transport's close instead when it handles that first,
        # but its reading thread has seen the packet either way.
        self.assertIn(reason, (client.sio.reason.SERVER_DISCONNECT,
                               client.sio.reason.TRANSPORT_ERROR))
        self.assertTrue(client.sio.eio.server_ended)
        await until(lambda: not self.server.realtime.ns.sockets, "the socket to go")
        self.assertFalse(self.server.realtime.presence.is_online("alice"))

    async def test_events_after_expiry_are_refused(self) -> None:
        """An event that arrives once the token has expired is refused with
        TOKEN_EXPIRED and nothing is stored, even before the expiry timer
        has run (the clock reads past expiry, its timers not yet fired)."""
        clock = fixed_clock()
        await self.serve(clock=clock, token_lifetime=60)
        alice, bob = await self.user("alice"), await self.user("bob")
        chat_id = await self.direct_chat(bob, alice)
        client = await self.connect(alice)
        clock.rightNow += 61  # time passes; the timers have not run yet
        ack = await client.call("send_message", {"chatId": chat_id, "encryptedPayload": {"ct": "X"}})
        self.assertEqual((ack["success"], ack["code"]), (False, "TOKEN_EXPIRED"))
        clock.rightNow -= 61
        response = await self.http.get(f"/api/messaging/chat/{chat_id}", headers=bob.auth())
        self.assertEqual([m["senderId"] for m in response.json()["messages"]], ["bob"])


class ClusterRevocationTests(PostgresMixin, ClusterMixin, TestCase):
    """Sessions ended on one node end the sockets of another."""

    timeout = 120

    async def test_logout_on_another_node_ends_a_welcoming_socket(self) -> None:
        """A logout on node A ends a socket of that token on node B that is
        still in its welcome: it is disconnected and joins no room there."""
        a_node, b_node = await self.cluster(self.migrated_database_setting())
        alice = User("alice")
        await alice.register(a_node.http)
        realtime = b_node.server.realtime
        held, real_positions = hold_welcomes(self, realtime)
        client = SioClient(b_node.url, transports=["websocket"])
        self.clients.append(client)
        await client.connect({"token": alice.token})
        await until(lambda: held, "the welcome to wait on the database")
        response = await a_node.http.post("/api/cyphr-id/logout", {}, headers=alice.auth())
        self.assertEqual(response.code, 200, response.body)
        await client.wait_disconnected(timeout=5)
        held[0].callback(await real_positions("alice", (alice.user_id, 1)))
        # The welcome went on from its lookup within callback(); what it
        # spawned has ended.
        await realtime.tasks_done()
        self.assertEqual(client.events("authenticated"), [])
        self.assertNotIn("user:alice", realtime.ns.rooms)
        self.assertEqual(realtime.ns.sockets, {})
