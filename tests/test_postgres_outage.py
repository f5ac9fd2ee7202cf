"""PostgreSQL going away and coming back while the server runs."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.db import DatabaseUnavailable
from cyphr.db.migrations import latest_version
from cyphr.server import build_server
from tests import postgres
from tests.helpers import InProcessHTTP, make_config


class OutageTests(TestCase):
    """Each test stops PostgreSQL: the tests run on the cluster of those
    that do (postgres.stoppable_cluster), not the shared one."""

    timeout = 90

    async def setUp(self) -> None:
        self.cluster = await deferToThread(postgres.stoppable_cluster)
        self.url = await deferToThread(self.cluster.create_database)

    def build(self) -> Any:
        config = make_config(self, database=self.url, db_pool_size=4)
        self.fatal: list[str] = []
        server = build_server(config, reactor, on_fatal=self.fatal.append)
        server.database.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(server.database.close()))
        return server

    async def health_until(self, http: InProcessHTTP, code: int, seconds: float) -> float:
        """Poll /api/health until it answers ``code``; answer how long that took."""
        started = reactor.seconds()
        while True:
            response = await http.get("/api/health")
            if response.code == code:
                return reactor.seconds() - started
            if reactor.seconds() - started > seconds:
                self.fail(f"/api/health still {response.code} after {seconds}s, wanted {code}")
            await deferLater(reactor, 0.1, lambda: None)

    async def test_restart_while_running(self) -> None:
        """When PostgreSQL stops, requests are answered 503 promptly (no hang,
        no 500); when it comes back, the pool recovers within seconds without
        restarting the server."""
        server = self.build()
        await server.database.when_ready()
        http = InProcessHTTP.for_server(server)
        self.assertEqual((await http.get("/api/health")).code, 200)

        await deferToThread(self.cluster.stop)
        started = reactor.seconds()
        response = await http.get("/api/health")
        self.assertEqual(response.code, 503)
        self.assertEqual(response.json()["code"], "DATABASE_UNAVAILABLE")
        self.assertLess(reactor.seconds() - started, 3)
        with self.assertRaises(DatabaseUnavailable):
            await server.database.run_query("SELECT 1")

        waiting = server.database.when_ready()  # asked during the outage
        self.assertFalse(waiting.called)
        await deferToThread(self.cluster.start)
        recovery = await self.health_until(http, 200, seconds=10)
        await waiting
        self.assertLess(recovery, 10)
        rows = await server.database.run_query("SELECT COUNT(*) FROM schema_version")
        self.assertEqual(rows, [(1,)])
        # Every connection of the pool came back, not only one.
        for _ in range(50):
            if server.database.stats["up"] == 4:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(server.database.stats["up"], 4)
        self.assertEqual(self.fatal, [])
        # Counted for metrics: each of the four connections was lost once,
        # and at least the query above was answered "unavailable".
        self.assertEqual(server.database.failures["connection_lost"], 4)
        self.assertGreaterEqual(server.database.failures["unavailable"], 1)

    async def test_start_while_down(self) -> None:
        """A server whose PostgreSQL is down at start runs anyway, answers 503,
        and migrates and serves once PostgreSQL comes up."""
        await deferToThread(self.cluster.stop)
        server = self.build()
        http = InProcessHTTP.for_server(server)
        response = await http.get("/api/health")
        self.assertEqual(response.code, 503)
        self.assertEqual((await http.get("/health")).code, 200)
        self.assertFalse(server.database.ready)

        await deferToThread(self.cluster.start)
        await self.health_until(http, 200, seconds=10)
        self.assertEqual(server.database.schema_version, latest_version())
