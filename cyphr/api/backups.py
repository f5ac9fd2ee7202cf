"""/api/cyphr-id/history-backup: the client's sealed history backup."""

from __future__ import annotations

from typing import Any

from klein import Klein

from cyphr.api.guard import authenticated
from cyphr.api.http import answer, read_json
from cyphr.clock import iso
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.backups import HistoryBackupHandler
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.validation import Fields, b64, invalid


class HistoryBackupAPI:
    app = Klein()

    def __init__(self, backups: HistoryBackupHandler, authenticator: Authenticator,
                 limits: RateLimits, max_body: int) -> None:
        self._backups = backups
        self._max_body = max_body
        self.authenticator = authenticator
        self.limits = limits

    @app.route("/api/cyphr-id/history-backup", methods=["PUT"])
    @authenticated(ip_limited=True)
    async def put(self, request: Any, user: AuthUser) -> bytes:
        fields = Fields(read_json(request), {"blob"})
        # Decoded up to what the body limit lets through: the handler
        # answers a blob over its own limit 413, not 400.
        blob = fields.base64("blob", max_length=self._max_body)
        assert blob is not None
        if not blob:
            raise invalid("blob", "blob must not be empty")
        updated_at = await self._backups.put(user, blob)
        return answer(request, {"success": True, "updatedAt": iso(updated_at), "size": len(blob)})

    @app.route("/api/cyphr-id/history-backup", methods=["GET"])
    @authenticated(ip_limited=True)
    async def get(self, request: Any, user: AuthUser) -> bytes:
        backup = await self._backups.get(user)
        return answer(request, {"success": True, "blob": b64(backup.blob),
                                "updatedAt": iso(backup.updated_at)})

    @app.route("/api/cyphr-id/history-backup", methods=["DELETE"])
    @authenticated(ip_limited=True)
    async def delete(self, request: Any, user: AuthUser) -> bytes:
        Fields(read_json(request, required=False), set())
        return answer(request, {"success": True, "deleted": await self._backups.delete(user)})
