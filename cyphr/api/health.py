"""GET /health and GET /api/health."""

from __future__ import annotations

from typing import Any

from klein import Klein

from cyphr.api.guard import public
from cyphr.api.http import answer
from cyphr.errors import DATABASE_UNAVAILABLE
from cyphr.handlers.health import HealthHandler


class HealthAPI:
    app = Klein()

    def __init__(self, health: HealthHandler) -> None:
        self._health = health

    @app.route("/health", methods=["GET"])
    @public()
    def liveness(self, request: Any) -> bytes:
        """200 while the process runs, whatever the database does."""
        return answer(request, {"status": "ok"})

    @app.route("/api/health", methods=["GET"])
    @public()
    async def readiness(self, request: Any) -> bytes:
        """The process and a real round trip to its database; 503 when the
        database does not answer."""
        report = await self._health.report()
        body: dict[str, Any] = {
            "success": report.ok,
            "status": "ok" if report.ok else "unavailable",
            "version": report.version,
            "uptimeSeconds": report.uptime_seconds,
            "nodeId": report.node_id,
            "database": {"ok": report.database_ok, "latencyMs": report.database_latency_ms},
            "realtime": {
                "connections": report.realtime.connections,
                "users": report.realtime.users,
            },
        }
        if not report.ok:
            body["error"] = "The database does not answer"
            body["code"] = DATABASE_UNAVAILABLE
        return answer(request, body, 200 if report.ok else 503)
