"""Operations: ICE servers for calls, the operator's storage report, the
OpenAPI document of the whole REST API and the AsyncAPI document of the
realtime events."""

from __future__ import annotations

import importlib.resources
from typing import Any

from klein import Klein

from cyphr.api.guard import authenticated, operator, public
from cyphr.api.http import JSON_TYPE, answer
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.ice import IceServer, IceServers
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.storage import NEVER_STORES, STORES, StorageStatus

OPENAPI_RESOURCE = "openapi.json"
ASYNCAPI_RESOURCE = "asyncapi.json"


def openapi_document() -> bytes:
    """The OpenAPI 3.1 document shipped in this package, as its bytes."""
    return importlib.resources.files("cyphr.api").joinpath(OPENAPI_RESOURCE).read_bytes()


def asyncapi_document() -> bytes:
    """The AsyncAPI 3.0 document of the Socket.IO events shipped in this
    package, as its bytes."""
    return importlib.resources.files("cyphr.api").joinpath(ASYNCAPI_RESOURCE).read_bytes()


def _ice_server(server: IceServer) -> dict[str, Any]:
    body: dict[str, Any] = {"urls": list(server.urls)}
    if server.username is not None:
        body["username"] = server.username
        body["credential"] = server.credential
    return body


class OperationsAPI:
    app = Klein()

    def __init__(self, ice: IceServers, storage: StorageStatus, authenticator: Authenticator,
                 limits: RateLimits, admin_token: str) -> None:
        self._ice = ice
        self._storage = storage
        self.authenticator = authenticator
        self.limits = limits
        self.admin_token = admin_token.encode("utf-8") if admin_token else None
        self._document = openapi_document()
        self._asyncapi = asyncapi_document()

    @app.route("/api/ice-servers", methods=["GET"])
    @authenticated()
    def ice_servers(self, request: Any, user: AuthUser) -> bytes:
        ice = self._ice.for_user(user.user_id)
        return answer(request, {
            "success": True, "iceServers": [_ice_server(s) for s in ice.servers], "ttl": ice.ttl})

    @app.route("/api/admin/zero-storage-status", methods=["GET"])
    @operator()
    async def zero_storage_status(self, request: Any) -> bytes:
        report = await self._storage.report()
        return answer(request, {
            "success": True,
            "stores": list(STORES),
            "neverStores": list(NEVER_STORES),
            "counts": report.counts,
            "engine": report.engine,
            "schemaVersion": report.schema_version,
        })

    @app.route("/api/openapi.json", methods=["GET"])
    @public()
    def openapi(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", JSON_TYPE)
        return self._document

    @app.route("/api/asyncapi.json", methods=["GET"])
    @public()
    def asyncapi(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", JSON_TYPE)
        return self._asyncapi
