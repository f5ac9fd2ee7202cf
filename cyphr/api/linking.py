"""Linking a device: /api/devices/provision and /api/devices/link (see
cyphr.handlers.linking)."""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

from klein import Klein

from cyphr.api.guard import authenticated, public
from cyphr.api.http import answer, read_json
from cyphr.api.identity import MAIN_KEY_FIELDS, main_key, own_profile
from cyphr.clock import iso
from cyphr.errors import PROVISION_NOT_FOUND, NotFound
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.linking import (
    EPHEMERAL_KEY_BYTES,
    LINK_TOKEN_BYTES,
    MAX_SEALED_BYTES,
    SECRET_BYTES,
    LinkingHandler,
    token_text,
)
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.validation import Fields, b64, invalid

# 32 bytes as base64url without padding: 43 characters.
assert SECRET_BYTES == LINK_TOKEN_BYTES == 32
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


def parse_provisioning_id(value: str) -> str:
    """A provisioning id in a route: anything that is not a UUID is a
    provisioning nobody has (404, as for an unknown one)."""
    try:
        if len(value) == 36:
            return str(uuid.UUID(value))
    except ValueError:
        pass
    raise NotFound("No such provisioning: unknown, expired or already used",
                   code=PROVISION_NOT_FOUND)


def token_field(fields: Fields, name: str) -> bytes:
    """A 32-byte secret or token, as base64url without padding."""
    value = fields.text(name, max_length=64)
    if value is None or not _TOKEN.fullmatch(value):
        raise invalid(name, f"{name} must be 32 bytes as base64url without padding")
    return base64.urlsafe_b64decode(value + "=")


class LinkingAPI:
    app = Klein()

    def __init__(self, linking: LinkingHandler, authenticator: Authenticator,
                 limits: RateLimits) -> None:
        self._linking = linking
        self.authenticator = authenticator
        self.limits = limits

    # -- the new device -----------------------------------------------------------

    @app.route("/api/devices/provision", methods=["POST"])
    @public(ip_limited=True)
    async def provision(self, request: Any) -> bytes:
        self.limits.provision.hit(request.client_ip)
        fields = Fields(read_json(request), {"ephemeralKey"})
        key = fields.base64("ephemeralKey", length=EPHEMERAL_KEY_BYTES,
                            max_length=EPHEMERAL_KEY_BYTES)
        assert key is not None
        provisioning = await self._linking.provision(key)
        return answer(request, {
            "success": True,
            "provisioningId": provisioning.provisioning_id,
            "secret": token_text(provisioning.secret),
            "expiresAt": iso(provisioning.expires_at),
        }, 201)

    @app.route("/api/devices/provision/<provisioning_id>/receive", methods=["POST"])
    @public()
    async def receive(self, request: Any, provisioning_id: str) -> bytes:
        # Its own limit: a device polls for minutes, and would use up the
        # sign-ins of everyone behind its address (rate_limit_auth).
        self.limits.link_poll.hit(request.client_ip)
        fields = Fields(read_json(request), {"secret"})
        secret = token_field(fields, "secret")
        received = await self._linking.receive(parse_provisioning_id(provisioning_id), secret)
        if received is None:
            return answer(request, {"success": True, "pending": True}, 202)
        return answer(request, {
            "success": True,
            "cyphrId": received.cyphr_id,
            "deviceId": received.device_id,
            "sealed": b64(received.sealed),
            "linkToken": token_text(received.link_token),
        })

    @app.route("/api/devices/link", methods=["POST"])
    @public(ip_limited=True)
    async def link(self, request: Any) -> bytes:
        fields = Fields(read_json(request), {"cyphrId", "linkToken", "deviceFingerprint",
                                             *MAIN_KEY_FIELDS})
        cyphr_id = fields.cyphr_id()
        assert cyphr_id is not None
        link_token = token_field(fields, "linkToken")
        fingerprint = fields.fingerprint("deviceFingerprint")
        key = main_key(fields, required=True)
        assert key is not None
        session = await self._linking.link(cyphr_id=cyphr_id, link_token=link_token,
                                           device_fingerprint=fingerprint, key=key)
        return answer(request, {
            "success": True,
            "token": session.token.token,
            "expiresAt": iso(session.token.expires_at * 1000),
            "deviceId": session.device_id,
            "user": own_profile(session.identity,
                                self._linking.is_online(session.identity.cyphr_id)),
        }, 201)

    # -- the approving device -----------------------------------------------------

    @app.route("/api/devices/provision/<provisioning_id>", methods=["GET"])
    @authenticated()
    async def open(self, request: Any, user: AuthUser, provisioning_id: str) -> bytes:
        found = await self._linking.open(user, parse_provisioning_id(provisioning_id))
        return answer(request, {
            "success": True,
            "ephemeralKey": b64(found.ephemeral_key),
            "expiresAt": iso(found.expires_at),
        })

    @app.route("/api/devices/provision/<provisioning_id>/approve", methods=["POST"])
    @authenticated()
    async def approve(self, request: Any, user: AuthUser, provisioning_id: str) -> bytes:
        self.limits.link.hit(user.user_id)
        fields = Fields(read_json(request), {"sealed"})
        sealed = fields.base64("sealed", max_length=MAX_SEALED_BYTES)
        assert sealed is not None
        if not sealed:
            raise invalid("sealed", "sealed must not be empty")
        device_id = await self._linking.approve(user, parse_provisioning_id(provisioning_id),
                                                sealed)
        return answer(request, {"success": True, "deviceId": device_id})
