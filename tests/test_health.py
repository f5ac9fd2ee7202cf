"""GET /health and GET /api/health, on both engines."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cyphr.handlers.health import HealthHandler
from tests.helpers import InProcessHTTP, PostgresMixin, SQLiteMixin, start_server


class HealthTestsMixin:
    async def setUp(self) -> None:
        self.server = await start_server(self, node_id="node-a")
        self.http = InProcessHTTP.for_server(self.server)

    async def test_liveness(self) -> None:
        """GET /health is exactly {"status":"ok"} while the process runs."""
        response = await self.http.get("/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b'{"status":"ok"}')

    async def test_readiness(self) -> None:
        """GET /api/health reports the version, node, uptime and a real database round trip."""
        response = await self.http.get("/api/health")
        self.assertEqual(response.code, 200)
        body = response.json()
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["nodeId"], "node-a")
        self.assertEqual(body["database"]["ok"], True)
        self.assertIsInstance(body["database"]["latencyMs"], float)
        self.assertGreaterEqual(body["database"]["latencyMs"], 0)
        self.assertEqual(body["realtime"], {"connections": 0, "users": 0})
        self.assertIsInstance(body["uptimeSeconds"], int)
        self.assertRegex(body["version"], r"^\d+\.\d+\.\d+")

    async def test_database_down(self) -> None:
        """Without a database /api/health is 503 DATABASE_UNAVAILABLE, and /health stays 200."""
        await self.server.database.close()
        response = await self.http.get("/api/health")
        self.assertEqual(response.code, 503)
        body = response.json()
        self.assertEqual((body["status"], body["code"], body["database"]["ok"]),
                         ("unavailable", "DATABASE_UNAVAILABLE", False))
        self.assertIsNone(body["database"]["latencyMs"])
        self.assertEqual((await self.http.get("/health")).code, 200)


class SQLiteHealthTests(SQLiteMixin, HealthTestsMixin, TestCase):
    pass


class PostgresHealthTests(PostgresMixin, HealthTestsMixin, TestCase):
    pass


class _Status:
    """A status store whose ping answers when told to."""

    def __init__(self) -> None:
        self.pending: list[Deferred[None]] = []

    def ping(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d


class HealthHandlerTests(TestCase):
    def test_uptime_from_the_clock(self) -> None:
        """Uptime is read from the injected clock."""
        clock, status = Clock(), _Status()
        handler = HealthHandler(status, clock, node_id="n")  # type: ignore[arg-type]
        clock.advance(42.5)
        d = Deferred.fromCoroutine(handler.report())
        status.pending[0].callback(None)
        report = self.successResultOf(d)
        self.assertEqual(report.uptime_seconds, 42)
        self.assertTrue(report.ok)

    def test_ping_timeout(self) -> None:
        """A database that does not answer within the timeout is reported down, not waited for."""
        clock, status = Clock(), _Status()
        handler = HealthHandler(status, clock, node_id="n", ping_timeout=2.0)  # type: ignore[arg-type]
        d = Deferred.fromCoroutine(handler.report())
        self.assertNoResult(d)
        clock.advance(2.0)
        report = self.successResultOf(d)
        self.assertFalse(report.ok)
        self.assertIsNone(report.database_latency_ms)
        # The late answer is dropped quietly.
        status.pending[0].errback(RuntimeError("late"))
