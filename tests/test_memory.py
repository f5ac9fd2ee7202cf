"""
Memory: every in-memory table that grows with users, tokens, chats,
addresses or sockets has a bound (issue #24). Each bounded structure,
filled past its bound or moved past its expiry with a task.Clock, stays
within its limit; and a served server that has seen a few hundred users
come and go holds no more than before they came.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cyphr import heap
from cyphr.changes import ChangeFeed
from cyphr.config import load_config
from cyphr.connections import ConnectionLimits
from cyphr.errors import RateLimited
from cyphr.handlers.calls import PARTNER_CACHE, CallsHandler
from cyphr.handlers.messaging import DIRECT_CHAT_CACHE, MessagingHandler
from cyphr.handlers.origins import _CACHE_SIZE, AcceptedOrigins
from cyphr.handlers.ratelimit import RateLimit, RateLimits
from cyphr.handlers.recipients import RecipientDevices
from cyphr.handlers.sending import SendBatcher
from cyphr.handlers.tokens import TOKEN_CACHE_IDLE, TokenService
from cyphr.realtime.presence import Presence
from cyphr.server import CACHE_SWEEP_INTERVAL
from tests.helpers import InProcessHTTP, SQLiteMixin, fixed_clock, start_server
from tests.realtime import sessions_closed, until
from tests.stores import open_world
from tests.test_realtime_transport import WireSocket
from tests.users import User

KEY = b"k" * 32


class RateLimitMemoryTests(SynchronousTestCase):
    def test_idle_keys_are_forgotten(self) -> None:
        """Keys back at a full burst (idle for a period) are forgotten at
        the next hit of any key: a thousand users who sent once and left
        leave nothing behind."""
        clock = Clock()
        limit = RateLimit(clock, 10, 60)
        for n in range(1000):
            limit.hit(f"user{n}")
        self.assertEqual(len(limit), 1000)
        clock.advance(6)  # one interval: each key is back at a full burst
        limit.hit("someone")
        self.assertEqual(len(limit), 1)

    def test_busy_keys_are_kept(self) -> None:
        """A key that has used part of its burst is kept (forgetting it
        would give it a new burst), while idle ones around it go."""
        clock = Clock()
        limit = RateLimit(clock, 10, 60)
        limit.hit("idle")
        for _ in range(10):
            limit.hit("busy")  # its next arrival is a whole period ahead
        clock.advance(6)  # "idle" is back at a full burst, "busy" has one event back
        limit.hit("other")
        self.assertEqual(len(limit), 2)
        limit.hit("busy")
        self.assertRaises(RateLimited, limit.hit, "busy")  # its state was kept

    def test_tiny_interval(self) -> None:
        """A limit so high that its interval vanishes beside the clock's
        value (benchmarks lift limits so) keeps nothing, and refuses nothing."""
        clock = Clock()
        clock.advance(1_790_000_000)
        limit = RateLimit(clock, 100_000_000, 1)
        for n in range(1000):
            limit.hit(f"user{n % 3}")
        self.assertEqual(len(limit), 0)

    def test_capped(self) -> None:
        """More busy keys than max_keys at once: the table stays at max_keys."""
        clock = Clock()
        limit = RateLimit(clock, 10, 60, max_keys=100)
        for n in range(1000):
            limit.hit(f"user{n}")
        self.assertLessEqual(len(limit), 100)

    def test_setting_caps_every_limit(self) -> None:
        """The rate_limit_keys setting caps each of the server's limits."""
        limits = RateLimits(Clock(), load_config({"rate_limit_keys": "1000"}, {}))
        for limit in limits.all():
            for n in range(1500):
                limit.hit(f"key{n}")
            self.assertEqual(len(limit), 1000, limit.name)


class TokenCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_790_000_000)

    def test_unused_tokens_are_forgotten(self) -> None:
        """Tokens unused for TOKEN_CACHE_IDLE are forgotten at the next
        check of any token; a forgotten token still verifies (it is checked
        again)."""
        service = TokenService(KEY, 3600, self.clock)
        tokens = [service.issue(f"u{n}", f"c{n}", "d").token for n in range(500)]
        for token in tokens:
            service.verify(token)
        self.assertEqual(service.memory_tables(), {"token_checks": 500})
        self.clock.advance(TOKEN_CACHE_IDLE + 1)
        self.assertEqual(service.verify(tokens[0]).user_id, "u0")
        self.assertEqual(service.memory_tables(), {"token_checks": 1})

    def test_used_tokens_are_kept(self) -> None:
        """A token in use is kept past TOKEN_CACHE_IDLE from its first check."""
        service = TokenService(KEY, 3600, self.clock)
        kept = service.issue("u", "c", "d").token
        for _ in range(3):
            service.verify(kept)
            self.clock.advance(TOKEN_CACHE_IDLE / 2)
        service.verify(service.issue("v", "c2", "d").token)
        self.assertEqual(service.memory_tables(), {"token_checks": 2})

    def test_capped(self) -> None:
        """More tokens in use than cache_size: the cache stays at cache_size."""
        service = TokenService(KEY, 3600, self.clock, cache_size=50)
        for n in range(200):
            service.verify(service.issue(f"u{n}", f"c{n}", "d").token)
        self.assertEqual(service.memory_tables(), {"token_checks": 50})


class DirectChatCacheTests(TestCase):
    async def setUp(self) -> None:
        self.world = w = await open_world(self)
        self.handler = self.messaging()
        self.alice = await w.user("alice")
        self.others = [await w.user(f"user{n}") for n in range(12)]

    def messaging(self, **options: int) -> MessagingHandler:
        w = self.world
        return MessagingHandler(
            w.chats, w.messages, w.identities, SendBatcher(w.messages, reactor),
            RateLimit(w.clock, 1000, 10), ChangeFeed(), w.clock,
            group_limit=RateLimit(w.clock, 1000, 10), member_limit=RateLimit(w.clock, 1000, 10),
            recipients=RecipientDevices(w.devices), **options)

    async def send_to_all(self) -> None:
        for other in self.others:
            await self.handler.send(self.alice, payload="{}", message_type="text",
                                    client_message_id=None, recipient_id=other.cyphr_id)

    async def test_stale_pairs_are_forgotten(self) -> None:
        """Pairs learnt more than DIRECT_CHAT_CACHE ago are forgotten when
        the next pair is learnt."""
        await self.send_to_all()
        self.assertEqual(self.handler.memory_tables(), {"direct_chats": 12})
        self.world.clock.advance(DIRECT_CHAT_CACHE + 1)
        await self.handler.send(self.others[0], payload="{}", message_type="text",
                                client_message_id=None, recipient_id=self.others[1].cyphr_id)
        self.assertEqual(self.handler.memory_tables(), {"direct_chats": 1})

    async def test_capped(self) -> None:
        """More pairs than its cache_size (the cache_entries setting) within
        the minute: the cache stays at its size, and sends still reach the
        right chat."""
        self.handler = self.messaging(cache_size=5)
        await self.send_to_all()
        await self.send_to_all()
        self.assertEqual(self.handler.memory_tables(), {"direct_chats": 5})


class CallPartnerCacheTests(TestCase):
    async def setUp(self) -> None:
        self.world = w = await open_world(self)
        self.alice = await w.user("alice")
        self.others = [await w.user(f"user{n}") for n in range(6)]
        await w.group(self.alice, *self.others)
        self.handler = CallsHandler(w.chats, w.clock)

    async def test_stale_pairs_are_forgotten(self) -> None:
        """Pairs older than PARTNER_CACHE are forgotten when the next pair
        is learnt, with their users' index entries."""
        for other in self.others:
            await self.handler.check_peer(self.alice, other.cyphr_id)
        self.assertEqual(self.handler.memory_tables(), {"call_partners": 6, "call_partner_users": 7})
        self.world.clock.advance(PARTNER_CACHE + 1)
        await self.handler.check_peer(self.others[0], self.others[1].cyphr_id)
        self.assertEqual(self.handler.memory_tables(), {"call_partners": 1, "call_partner_users": 2})

    async def test_capped(self) -> None:
        """More pairs than its cache_size (the cache_entries setting): the
        cache stays at its size, and the per-user index holds only users of
        the pairs kept."""
        self.handler = CallsHandler(self.world.chats, self.world.clock, cache_size=3)
        for other in self.others:
            await self.handler.check_peer(self.alice, other.cyphr_id)
        self.assertEqual(self.handler.memory_tables(), {"call_partners": 3, "call_partner_users": 4})


class DroppedOnLeaveTests(SynchronousTestCase):
    def test_presence(self) -> None:
        """Presence forgets a user with its last socket here, a remote user
        with its last node's offline, and a silent node with all it reported."""
        presence = Presence(Clock())
        for n in range(300):
            presence.add(f"u{n}", f"s{n}a")
            presence.add(f"u{n}", f"s{n}b")
            presence.remote_online("node1", f"r{n}")
            presence.remote_online("node2", f"q{n}")
        for n in range(300):
            presence.remove(f"u{n}", f"s{n}a")
            presence.remove(f"u{n}", f"s{n}b")
            presence.remote_offline("node1", f"r{n}")
        presence.forget_node("node2")
        self.assertEqual(presence.memory_tables(), {
            "presence_local_users": 0, "presence_remote_users": 0, "presence_nodes": 1})
        presence.forget_node("node1")
        self.assertEqual(presence.memory_tables()["presence_nodes"], 0)

    def test_connection_addresses(self) -> None:
        """An address is forgotten with its last connection."""
        limits = ConnectionLimits(10_000, 4)
        for n in range(500):
            self.assertTrue(limits.claim(f"10.0.{n // 250}.{n % 250}"))
        for n in range(500):
            limits.unclaim(f"10.0.{n // 250}.{n % 250}")
        self.assertEqual(limits.addresses, 0)

    def test_origins(self) -> None:
        """The accepted-origin answers stay within their cache size, however
        many origins clients name."""
        origins = AcceptedOrigins()
        for n in range(1000):
            origins.accepts(f"https://host{n}.example")
        self.assertLessEqual(len(origins._answers), _CACHE_SIZE)


def memory_gauge(server: Any) -> dict[str, float]:
    """cyphr_memory_table_entries, by table, as /metrics serves it."""
    text = server.metrics.exposition().decode("utf-8")
    for family in text_string_to_metric_families(text):
        if family.name == "cyphr_memory_table_entries":
            return {sample.labels["table"]: sample.value for sample in family.samples}
    raise AssertionError("no cyphr_memory_table_entries in /metrics")


class ChurnTests(SQLiteMixin, TestCase):
    """A served server, users connecting over raw WebSocket (Engine.IO and
    Socket.IO spoken by hand: lighter than a threaded client, for many)."""

    timeout = 240
    # Enough to fill every table well past what a few users leave, in
    # rounds that overlap (benchmarks/soak.py churns at scale).
    USERS = 60
    AT_ONCE = 20

    async def test_tables_return_after_churn(self) -> None:
        """Sixty users register, send a message, connect, are welcomed and
        leave, twenty at a time; once the caches' time has passed and the
        next user comes, every in-memory table holds what it held before
        they came."""
        self.clock = fixed_clock()
        # Every client here is 127.0.0.1: the per-address caps are lifted.
        server = await start_server(
            self, serve=True, clock=self.clock, rate_limit_auth=(100_000, 1),
            realtime_handshake_rate=(100_000, 1), realtime_pending_sessions=0,
            max_connections_per_address=0)
        [port] = [await d for d in server.listening()]
        self.port = port.getHost().port
        self.http = InProcessHTTP.for_server(server)
        self.server = server
        probe, peer = await self.register("probe"), await self.register("peer")

        await self.visit(probe, peer)
        # What the registrations left (the address's auth limit) expires.
        self.clock.advance(TOKEN_CACHE_IDLE + 1)
        await self.visit(probe, peer)
        before = self.tables()
        users = [await self.register(f"user{n}") for n in range(self.USERS)]
        for start in range(0, self.USERS, self.AT_ONCE):
            group = users[start:start + self.AT_ONCE]
            await DeferredList([Deferred.fromCoroutine(self.visit(user, peer)) for user in group],
                               fireOnOneErrback=True, consumeErrors=True)
        during = self.tables()
        self.assertGreaterEqual(during["token_checks"], self.USERS)  # the caches did fill
        self.assertGreaterEqual(during["direct_chats"], self.USERS)
        # Past every cache's time (60 s for tokens, direct chats, call pairs), the next user's
        # visit trims each table.
        self.clock.advance(TOKEN_CACHE_IDLE + 1)
        await self.visit(probe, peer)
        after = self.tables()
        self.assertEqual(after, before)
        # No one comes any more: the server's sweep empties the caches and
        # rate limits all the same, within an idle time and a sweep.
        self.clock.advance(TOKEN_CACHE_IDLE + CACHE_SWEEP_INTERVAL + 1)
        idle = self.tables()
        cached = {name: count for name, count in idle.items()
                  if name.startswith(("rate_limit_", "token_", "direct_", "call_", "engine_handshake"))}
        self.assertEqual(set(cached.values()), {0}, cached)
        self.assertGreater(before["token_checks"], 0)  # the sweep did empty them

    def tables(self) -> dict[str, float]:
        """Every table, as /metrics counts them."""
        return dict(memory_gauge(self.server))

    async def register(self, name: str) -> User:
        user = User(name)
        await user.register(self.http)
        return user

    async def visit(self, user: User, peer: User) -> None:
        """``user`` sends ``peer`` a message over REST, connects a WebSocket
        with its token, waits for sync_complete, and leaves."""
        response = await self.http.post("/api/messaging/send", {
            "recipientId": peer.cyphr_id, "encryptedPayload": {"hello": True}}, headers=user.auth())
        self.assertEqual(response.code, 201, response.body)
        url = f"ws://127.0.0.1:{self.port}/socket.io/?EIO=4&transport=websocket"
        factory = WebSocketClientFactory(url)
        factory.protocol = WireSocket
        ws: WireSocket = await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        await ws.opened.addTimeout(10, reactor)
        opened = await ws.recv(10)
        self.assertEqual(opened[0], "0")
        ws.send_text("40" + json.dumps({"token": user.token}))
        while not str(await ws.recv(10)).startswith('42["sync_complete"'):
            pass
        ws.sendClose(1000)
        await ws.wait_closed(10)
        await until(lambda: not self.server.realtime.presence.sockets(user.cyphr_id),
                    "the socket to be gone")
        await sessions_closed(self.server)
        await self.server.realtime.tasks_done()  # its last_seen written


class HeapTests(SQLiteMixin, TestCase):
    def test_trim_returns_freed_memory(self) -> None:
        """After a burst of buffers is freed (with survivors in between, so
        that no heap can shrink from its top), heap.trim gives the pages
        back: RSS falls by most of the burst."""
        self.assertTrue(heap.can_trim(), "glibc's malloc_trim is expected on Linux")
        burst = [bytes(600 + (n * 7919) % 100_000) for n in range(2000)]  # about 100 MB
        survivors = [bytes(1000) for _ in range(200)]
        del burst
        freed = rss_kib()
        heap.trim()
        self.assertLess(rss_kib(), freed - 40_000)
        self.assertEqual(len(survivors), 200)

    async def test_python_blocks_gauge(self) -> None:
        """/metrics counts the blocks Python has handed out: holding a
        hundred thousand more objects raises it by at least that many."""
        server = await start_server(self)

        def blocks() -> float:
            text = server.metrics.exposition().decode("utf-8")
            [family] = [f for f in text_string_to_metric_families(text)
                        if f.name == "cyphr_python_allocated_blocks"]
            return family.samples[0].value

        before = blocks()
        held = [[n] for n in range(100_000)]
        self.assertGreaterEqual(blocks() - before, 100_000)
        self.assertEqual(len(held), 100_000)

    async def test_server_trims_every_sweep(self) -> None:
        """The server's sweep gives freed memory back once a minute."""
        trims: list[None] = []
        self.patch(heap, "trim", lambda: trims.append(None))
        clock = fixed_clock()
        await start_server(self, serve=True, clock=clock, inline=True)
        before = len(trims)
        clock.advance(CACHE_SWEEP_INTERVAL)
        self.assertEqual(len(trims), before + 1)
        clock.advance(CACHE_SWEEP_INTERVAL)
        self.assertEqual(len(trims), before + 2)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")
