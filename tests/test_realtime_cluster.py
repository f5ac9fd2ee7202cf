"""
Several server processes on one PostgreSQL database: realtime events cross
from node to node over LISTEN/NOTIFY, once per socket and in order, and
survive PostgreSQL restarting.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.clock import iso, now_ms
from cyphr.realtime.client_events import Sent
from cyphr.realtime.envelopes import Emitted, MessageAnnounced, Watching, decode
from cyphr.realtime.fanout import FanOut
from cyphr.realtime.events import HEARTBEAT, NODE_SILENCE
from tests import postgres
from cyphr.store.chats import ChatStore
from tests.helpers import InProcessHTTP, PostgresMixin, start_server
from tests.realtime import SioClient, sessions_closed, sleep, until
from tests.users import User

SHARED = {"jwt_secret": "j" * 40, "fingerprint_key": "f" * 40, "totp_key": "t" * 40,
          "push_vapid_key": "v" * 40,
          "rate_limit_send": (100_000, 1), "realtime_event_rate": (100_000, 1)}

# The event of the markers settled() sends: one the stock client records (a
# name the server sends) and the tests here never cause otherwise.
MARKER = Sent.SESSION_PREKEYS_LOW


class Node:
    def __init__(self, server: Any, url: str) -> None:
        self.server = server
        self.url = url
        self.http = InProcessHTTP.for_server(server)


class ClusterMixin:
    timeout = 120

    async def node(self, database: str, **overrides: Any) -> Node:
        server = await start_server(self, serve=True, database=database, node_id=f"node{len(self.nodes)}",
                                    **SHARED, **overrides)
        [port] = [await d for d in server.listening()]
        node = Node(server, f"http://127.0.0.1:{port.getHost().port}")
        self.nodes.append(node)
        await until(lambda: server.bus.listening, "LISTEN")
        return node

    async def cluster(self, database: str, count: int = 2, **first: Any) -> list[Node]:
        """``count`` nodes; ``first`` overrides the first one's settings.
        More may join later: ``self.node(self.database)``."""
        self.database = database
        self.nodes: list[Node] = []
        self.clients: list[SioClient] = []
        self.owners: dict[SioClient, str] = {}  # client -> its user's Cyphr ID
        self.addCleanup(self._close_clients)
        return [await self.node(database, **(first if n == 0 else {})) for n in range(count)]

    async def _close_clients(self) -> None:
        for client in self.clients:
            if client.sio.connected:
                await client.disconnect()
        for node in self.nodes:
            await sessions_closed(node.server)

    async def user(self, node: Node, name: str) -> User:
        user = User(name)
        await user.register(node.http)
        return user

    async def connect(self, node: Node, user: User, transports: list[str] | None = None) -> SioClient:
        client = SioClient(node.url, transports=transports or ["websocket"])
        self.clients.append(client)
        self.owners[client] = user.cyphr_id
        await client.connect({"token": user.token})
        await client.wait_for("sync_complete")
        return client

    async def settled(self, clients: list[SioClient]) -> None:
        """Whatever any node sent these clients before now has reached them,
        and whatever a node sent in answer to what it heard from another
        before now: a test asserting that nothing more came waits for this,
        not for a sleep.

        When no node has a background task left (an announcement waits on
        the database before it goes out), each node sends every user a
        marker, in the same turn: to its own sockets, after all it queued
        for them, and on the bus, after all it published (a node hears
        another's events in publish order). A client holding every node's
        marker holds all that came before them. A second round follows what
        a node did in answer to what it heard in the first."""
        await until(lambda: all(node.server.bus.listening for node in self.nodes), "LISTEN")
        users = sorted(set(self.owners.values()))
        for _ in range(2):
            while any(node.server.realtime.memory_tables()["realtime_tasks"] for node in self.nodes):
                for node in self.nodes:
                    await node.server.realtime.tasks_done()
            expected = [len(client.events(MARKER)) + len(self.nodes) for client in clients]
            for node in self.nodes:
                fanout = node.server.realtime.fanout
                fanout.to_rooms(["user:" + user for user in users], MARKER,
                                {"marker": fanout.node_id}, everywhere=True)
            for client, count in zip(clients, expected):
                await client.wait_for(MARKER, count)


class ClusterTests(PostgresMixin, ClusterMixin, TestCase):
    async def two_nodes_and_a_chat(self) -> tuple[Node, Node, User, User, Any]:
        """Nodes A and B, alice on A and bob on B, and alice's first message
        to bob (sent over REST before anyone connects: it makes their chat)."""
        a_node, b_node = await self.cluster(self.migrated_database_setting())
        alice = await self.user(a_node, "alice")
        bob = await self.user(b_node, "bob")
        first = await a_node.http.post("/api/messaging/send", {
            "recipientId": "bob", "encryptedPayload": {"n": 0}}, headers=alice.auth())
        return a_node, b_node, alice, bob, first

    async def test_events_cross_nodes_once(self) -> None:
        """Two nodes on one database: presence, messages (to every socket of
        the recipient, on either node, once each), replies and receipts
        cross between nodes."""
        a_node, b_node, alice, bob, first = await self.two_nodes_and_a_chat()
        chat_id = first.json()["chatId"]
        a = await self.connect(a_node, alice)
        b = await self.connect(b_node, bob, transports=["polling", "websocket"])
        # Presence crossed: bob's first socket came on node B.
        [online] = await a.wait_for("user_online")
        self.assertEqual(online, {"userId": "bob"})
        # Node A has heard it too before bob's second socket comes there.
        # (A node that has not yet heard of another's socket of the user
        # announces the user online again: a second user_online, which
        # clients take as the same news.)
        await until(lambda: a_node.server.realtime.presence.elsewhere("bob"), "node A to hear of bob")
        b2 = await self.connect(a_node, bob)  # bob on both nodes

        ack = await a.call("send_message", {"chatId": chat_id, "encryptedPayload": {"n": 1}})
        self.assertTrue(ack["success"], ack)
        got_b = await b.wait_for("new_message", 2)
        got_b2 = await b2.wait_for("new_message", 2)
        self.assertEqual([m["message"]["seq"] for m in got_b], [1, 2])
        self.assertEqual([m["message"]["seq"] for m in got_b2], [1, 2])
        reply = await b.call("send_message", {"chatId": chat_id, "encryptedPayload": {"n": 2}})
        [got] = await a.wait_for("new_message")
        self.assertEqual(got["message"]["id"], reply["messageId"])

        await b.call("message_delivered", {"messageId": ack["messageId"], "chatId": chat_id})
        [delivered] = await a.wait_for("message_delivered")
        self.assertEqual(delivered["userId"], "bob")
        await b.call("message_read", {"chatId": chat_id, "upToSeq": ack["seq"]})
        [read] = await a.wait_for("message_read")
        self.assertEqual(read["upToSeq"], ack["seq"])

        await a.call("typing", {"chatId": chat_id, "isTyping": True})
        await b.wait_for("user_typing")
        await b2.wait_for("user_typing")

        await b.call("call_offer", {"callId": "k1", "to": "alice", "offer": {"sdp": "o"}})
        [incoming] = await a.wait_for("incoming_call")
        self.assertEqual(incoming["from"], "bob")
        await a.call("call_answer", {"callId": "k1", "to": "bob", "answer": {"sdp": "a"}})
        await b.wait_for("call_answer")
        await b2.wait_for("call_answer")

        await self.settled([a, b, b2])  # anything duplicated has come by now
        self.assertEqual(len(b.events("new_message")), 2)
        self.assertEqual(len(b2.events("new_message")), 3)  # also bob's own reply from node B
        self.assertEqual(len(a.events("new_message")), 1)
        self.assertEqual(len(a.events("message_delivered")), 1)
        self.assertEqual(len(a.events("message_read")), 1)
        self.assertEqual(len(b.events("user_typing")), 1)
        self.assertEqual(len(a.events("incoming_call")), 1)
        self.assertEqual(len(b.events("call_answer")), 1)
        self.assertEqual(len(a.events("user_online")), 1)

        # Bob leaves node B but stays on node A: still online.
        await b.disconnect()
        # Node B has handled the disconnect (presence, the bus), and what
        # either node did about it has reached alice.
        await until(lambda: not b_node.server.realtime.presence.sockets("bob"), "bob's socket to go")
        await self.settled([a])
        self.assertEqual(a.events("user_offline"), [])
        await b2.disconnect()
        [offline] = await a.wait_for("user_offline")
        self.assertEqual(offline["userId"], "bob")

    async def test_a_commit_before_the_watch_is_heard_still_arrives(self) -> None:
        """The window routing opens (cyphr.realtime.fanout, "The window"):
        node B opens a chat's feed for bob and says so, and node A commits a
        message of the chat before it has taken that in, so sends it to no
        node. Bob still gets it live, once, when A's answer makes B look in
        the database; and what A commits after, A sends to B."""
        a_node, b_node, alice, bob, first = await self.two_nodes_and_a_chat()
        chat_id = first.json()["chatId"]
        fanout = a_node.server.realtime.fanout
        held: list[dict[str, Any]] = []
        self.patch(fanout, "bus_event", held.append)  # node A hears nothing for now
        b = await self.connect(b_node, bob)  # seq 1 comes in its catch-up

        def watch_held() -> bool:
            return any(isinstance(envelope, Watching) and chat_id in envelope.chats
                       for envelope in map(decode, held))
        await until(watch_held, "node B's Watching to reach node A")
        second = await a_node.http.post("/api/messaging/send", {
            "chatId": chat_id, "encryptedPayload": {"n": 1}}, headers=alice.auth())
        self.assertEqual(second.code, 201)
        await b.barrier()
        self.assertEqual(len(b.events("new_message")), 1)  # node A sent it nowhere
        del fanout.bus_event
        for event in held:  # node A takes in what it missed, in order
            fanout.bus_event(event)
        await b.wait_for("new_message", 2)
        third = await a_node.http.post("/api/messaging/send", {
            "chatId": chat_id, "encryptedPayload": {"n": 2}}, headers=alice.auth())
        await b.wait_for("new_message", 3)
        await self.settled([b])
        self.assertEqual([m["message"]["id"] for m in b.events("new_message")],
                         [first.json()["messageId"], second.json()["messageId"],
                          third.json()["messageId"]])

    async def test_nothing_crosses_that_no_node_needs(self) -> None:
        """Two nodes, both users on node A: their messages, typing and
        receipts reach them and go to no other node; node B hears only
        what concerns the nodes (presence, watching) and the test's
        markers."""
        a_node, b_node = await self.cluster(self.migrated_database_setting())
        alice = await self.user(a_node, "alice")
        bob = await self.user(a_node, "bob")
        a = await self.connect(a_node, alice)
        b = await self.connect(a_node, bob)
        fanout = b_node.server.realtime.fanout
        heard: list[Any] = []

        def hear(event: dict[str, Any]) -> None:
            heard.append(decode(event))
            FanOut.bus_event(fanout, event)
        self.patch(fanout, "bus_event", hear)
        acks = [await a.call("send_message", {"recipientId": "bob", "encryptedPayload": {"n": n}})
                for n in range(10)]
        self.assertTrue(all(ack["success"] for ack in acks), acks)
        await b.wait_for("new_message", 10)
        chat_id = acks[0]["chatId"]
        await b.call("typing", {"chatId": chat_id, "isTyping": True})
        await a.wait_for("user_typing")
        await b.call("message_read", {"chatId": chat_id, "upToSeq": acks[-1]["seq"]})
        await a.wait_for("message_read")
        await self.settled([a, b])
        crossed = [envelope for envelope in heard if isinstance(envelope, MessageAnnounced)
                   or isinstance(envelope, Emitted) and envelope.event != MARKER]
        self.assertEqual(crossed, [])
        self.assertTrue(any(isinstance(envelope, Watching) for envelope in heard))

    async def test_silent_node_users_go_offline(self) -> None:
        """A node that stops speaking on the bus without a goodbye (its bus
        stopped, as when its process dies) is declared silent by the other
        node once the silence timeout has passed: users online only through
        it get ``user_offline {userId, lastSeen}`` sent to their chat
        partners there, and their last_seen recorded; a user also connected
        to the node that remains stays online."""
        clock = Clock()
        clock.advance(reactor.seconds())  # the present: tokens work on both nodes
        # Node A reads time from the clock the test moves; no pings meanwhile.
        a_node, b_node = await self.cluster(self.migrated_database_setting(), clock=clock, ping_interval=3600)
        alice = await self.user(a_node, "alice")
        bob = await self.user(b_node, "bob")
        carol = await self.user(b_node, "carol")
        for other in ("bob", "carol"):
            response = await a_node.http.post("/api/messaging/send", {
                "recipientId": other, "encryptedPayload": {"n": 0}}, headers=alice.auth())
            self.assertEqual(response.code, 201, response.body)
        a = await self.connect(a_node, alice)
        await self.connect(a_node, carol)
        [online] = await a.wait_for("user_online")
        self.assertEqual(online, {"userId": "carol"})
        await until(lambda: b_node.server.realtime.presence.elsewhere("carol"), "carol on node A")
        await self.connect(b_node, carol)
        await self.connect(b_node, bob)
        # carol was online already: only bob's first socket is announced.
        [_, online] = await a.wait_for("user_online", 2)
        self.assertEqual(online, {"userId": "bob"})

        await b_node.server.bus.stop()  # node B falls silent; its sockets stay
        for _ in range(int(NODE_SILENCE // HEARTBEAT) + 1):
            clock.advance(HEARTBEAT)
            await sleep(0.05)
        [offline] = await a.wait_for("user_offline")
        last_seen = iso(now_ms(clock))
        self.assertEqual(offline, {"userId": "bob", "lastSeen": last_seen})
        # Only node A speaks now (node B's bus is stopped), and its clock no
        # longer moves: a user_offline for carol would come from the tasks
        # of the sweep that took bob offline, which have ended; what they
        # sent alice has arrived by the barrier's answer.
        await a_node.server.realtime.tasks_done()
        await a.barrier()
        self.assertEqual(len(a.events("user_offline")), 1)  # not carol
        profile = await a_node.http.get("/api/cyphr-id/user/bob", headers=alice.auth())
        self.assertEqual((profile.json()["user"]["lastSeen"], profile.json()["user"]["isOnline"]),
                         (last_seen, False))
        profile = await a_node.http.get("/api/cyphr-id/user/carol", headers=alice.auth())
        self.assertTrue(profile.json()["user"]["isOnline"])

    async def test_a_node_started_later_sends_to_the_watching_nodes(self) -> None:
        """A node that starts after bob's socket opened its chat's feed on
        node B learns that B watches the chat (B answers its hello with its
        list): what alice sends through it reaches bob live, once, in
        order."""
        a_node, b_node, alice, bob, first = await self.two_nodes_and_a_chat()
        b = await self.connect(b_node, bob)  # seq 1 in its catch-up
        c_node = await self.node(self.database)
        chat_id = first.json()["chatId"]
        fanout = c_node.server.realtime.fanout
        await until(lambda: fanout.memory_tables()["fanout_watched_chats"] == 1,
                    "node C to learn what node B watches")
        sent = [await c_node.http.post("/api/messaging/send", {
            "chatId": chat_id, "encryptedPayload": {"n": n}}, headers=alice.auth()) for n in (1, 2)]
        await b.wait_for("new_message", 3)
        await self.settled([b])
        self.assertEqual([m["message"]["id"] for m in b.events("new_message")],
                         [first.json()["messageId"], *(r.json()["messageId"] for r in sent)])

    async def test_large_message_is_fetched(self) -> None:
        """A message too large for a notification crosses as ids; the other
        node fetches it, and it keeps its place in the chat's order."""
        a_node, b_node = await self.cluster(self.migrated_database_setting())
        alice = await self.user(a_node, "alice")
        bob = await self.user(b_node, "bob")
        a = await self.connect(a_node, alice)
        b = await self.connect(b_node, bob)
        payloads = [{"n": 1}, {"blob": "A" * 20_000}, {"n": 3}]
        acks = [await a.call("send_message", {"recipientId": "bob", "encryptedPayload": p})
                for p in payloads]
        got = await b.wait_for("new_message", 3)
        self.assertEqual([m["message"]["encryptedPayload"] for m in got], payloads)
        self.assertEqual([m["message"]["id"] for m in got], [ack["messageId"] for ack in acks])

    async def test_ordering_across_nodes(self) -> None:
        """Members on two nodes sending at once: each receives the group's
        messages once each and in seq order, the listener all 75 of them."""
        nodes = await self.cluster(self.migrated_database_setting())
        users = [await self.user(nodes[n % 2], f"user{n}") for n in range(4)]
        for user in users[1:]:  # a group admin may add only its contacts
            await ChatStore(nodes[0].server.database).direct_chat(users[0].cyphr_id, user.cyphr_id, 0)
        response = await nodes[0].http.post("/api/messaging/create-group", {
            "members": [u.cyphr_id for u in users[1:]]}, headers=users[0].auth())
        chat_id = response.json()["chatId"]
        clients = [await self.connect(nodes[n % 2], u) for n, u in enumerate(users)]

        async def burst(client: SioClient, count: int) -> None:
            results = await DeferredList([
                client.call("send_message", {"chatId": chat_id, "encryptedPayload": {"i": i}})
                for i in range(count)], consumeErrors=True)
            for ok, ack in results:
                assert ok and ack["success"], ack

        await DeferredList([Deferred.fromCoroutine(burst(c, 25)) for c in clients[1:]],
                           fireOnOneErrback=True, consumeErrors=True)
        got = await clients[0].wait_for("new_message", 75)
        self.assertEqual([m["message"]["seq"] for m in got], list(range(1, 76)))
        for client in clients[1:]:
            seqs = [m["message"]["seq"] for m in await client.wait_for("new_message", 50)]
            self.assertEqual(seqs, sorted(set(seqs)))
            self.assertEqual(len(seqs), 50)


class RestartTests(ClusterMixin, TestCase):
    """PostgreSQL restarts mid-conversation: nothing acknowledged is lost.
    (On the cluster of the tests that stop PostgreSQL, not the shared one.)"""

    async def setUp(self) -> None:
        self.cluster_pg = await deferToThread(postgres.stoppable_cluster)
        self.url = await deferToThread(self.cluster_pg.create_database)

    def database_setting(self) -> str:
        return self.url

    async def test_restart_mid_conversation(self) -> None:
        """When PostgreSQL restarts mid-conversation, sends are refused
        DATABASE_UNAVAILABLE meanwhile, and afterwards every acknowledged
        message reaches the other node's client once, in order, including
        those written before that node listened again."""
        a_node, b_node = await self.cluster(self.url)
        alice = await self.user(a_node, "alice")
        bob = await self.user(b_node, "bob")
        a = await self.connect(a_node, alice)
        b = await self.connect(b_node, bob)
        acked: list[dict[str, Any]] = []
        ack = await a.call("send_message", {"recipientId": "bob", "encryptedPayload": {"n": 0}})
        acked.append(ack)
        await b.wait_for("new_message")

        await deferToThread(self.cluster_pg.stop)
        refused = await a.call("send_message", {"chatId": ack["chatId"], "encryptedPayload": {"n": -1}})
        self.assertEqual((refused["success"], refused["code"]), (False, "DATABASE_UNAVAILABLE"))
        await deferToThread(self.cluster_pg.start)
        # Node A writes as soon as its pool is back, perhaps before node B
        # listens again: B must recover those from the database.
        await until(lambda: a_node.server.database.ready, "node A's database")
        for n in range(1, 6):
            while True:
                ack = await a.call("send_message", {"chatId": ack["chatId"], "encryptedPayload": {"n": n}})
                if ack["success"]:
                    break
                await sleep(0.1)
            acked.append(ack)
        # No later message comes to reveal a gap: what node B missed while it
        # was not listening comes from its resync when LISTEN is back.
        await b.wait_for("new_message", len(acked), timeout=20)
        await self.settled([b])
        got = b.events("new_message")
        self.assertEqual([m["message"]["id"] for m in got], [m["messageId"] for m in acked])

    async def test_missed_notifications_are_recovered(self) -> None:
        """Whatever a node missed while its LISTEN was down reaches its
        sockets when the bus is restored, in order, once."""
        a_node, b_node = await self.cluster(self.url)
        alice = await self.user(a_node, "alice")
        bob = await self.user(b_node, "bob")
        a = await self.connect(a_node, alice)
        b = await self.connect(b_node, bob)
        acked = [await a.call("send_message", {"recipientId": "bob", "encryptedPayload": {"n": 0}})]
        await b.wait_for("new_message")
        fanout = b_node.server.realtime.fanout
        heard: list[dict[str, Any]] = []
        self.patch(fanout, "bus_event", heard.append)  # deaf, as while reconnecting
        # What node B began before it went deaf (a recheck of its feed,
        # answering a WatchNoted, or a fill) reads the database, and would
        # find there the messages sent next if it ran late (a loaded
        # machine): let it end first.
        await b_node.server.realtime.tasks_done()
        for n in range(1, 4):
            acked.append(await a.call("send_message", {"chatId": acked[0]["chatId"],
                                                       "encryptedPayload": {"n": n}}))
        # The three announcements have reached node B, which did nothing
        # with them; what it sent bob before now has arrived.
        await until(lambda: sum(isinstance(decode(e), MessageAnnounced) for e in heard) == 3,
                    "the announcements to reach node B")
        await b.barrier()
        self.assertEqual(len(b.events("new_message")), 1)
        del fanout.bus_event  # hears again
        fanout.bus_restored()
        await b.wait_for("new_message", 4)
        await self.settled([b])
        self.assertEqual([m["message"]["id"] for m in b.events("new_message")],
                         [m["messageId"] for m in acked])
