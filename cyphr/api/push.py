"""/api/devices/me/push and /api/push/config: push registrations (cyphr.handlers.push)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from klein import Klein

from cyphr.api.guard import authenticated, public
from cyphr.errors import ApiError, BadRequest, NotFound, Unauthorized
from cyphr.api.http import answer, read_json
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.push import KINDS, PushHandler
from cyphr.push.gateway import FORWARDED_KINDS, Gateway
from cyphr.push.gateway import PATH as GATEWAY_PATH
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.validation import Fields, invalid
from cyphr.store.push import Registration

MAX_TOKEN = 4096
MAX_ENDPOINT = 2048
MAX_APP_ID = 255
INVALID_GATEWAY_SECRET = "INVALID_GATEWAY_SECRET"  # 401: not a secret this gateway accepts
PUSH_SERVICE_UNAVAILABLE = "PUSH_SERVICE_UNAVAILABLE"  # 503: APNs or FCM did not take it; retry
PUSH_REFUSED = "PUSH_REFUSED"  # 400: APNs or FCM refused the request


def _b64url(value: Any, where: str, size: int) -> bytes:
    """A Web Push key as subscriptions give it: base64url (padded or not)."""
    if not isinstance(value, str) or len(value) > 4 * size:
        raise invalid(where, f"{where} must be base64url of {size} bytes")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise invalid(where, f"{where} must be base64url of {size} bytes") from None
    if len(raw) != size:
        raise invalid(where, f"{where} must be base64url of {size} bytes")
    return raw


def parse_registration(body: dict[str, Any], user: AuthUser) -> Registration:
    """``{kind, token | subscription {endpoint, keys {p256dh, auth}}, appId?,
    sandbox?}``: APNs and FCM name a token; Web Push a subscription with its
    keys; UnifiedPush a subscription whose keys are optional (without them
    the wake-up is an empty POST)."""
    fields = Fields(body, {"kind", "token", "subscription", "appId", "sandbox"})
    kind = fields.text("kind", max_length=16)
    if kind not in KINDS:
        raise invalid("kind", f"kind must be one of {', '.join(KINDS)}")
    app_id = fields.text("appId", required=False, max_length=MAX_APP_ID)
    sandbox = fields.boolean("sandbox", default=False)
    token = endpoint = p256dh = auth = None
    if kind in ("apns", "fcm"):
        if fields.present("subscription"):
            raise invalid("subscription", f"a {kind} registration names a token, not a subscription")
        token = fields.text("token", max_length=MAX_TOKEN)
        if not token:
            raise invalid("token", "token must not be empty")
    else:
        if fields.present("token"):
            raise invalid("token", f"a {kind} registration names a subscription, not a token")
        subscription = fields.value("subscription")
        if not isinstance(subscription, dict):
            raise invalid("subscription", "subscription must be an object {endpoint, keys}")
        inner = Fields(subscription, {"endpoint", "keys", "expirationTime"})
        endpoint = inner.text("endpoint", max_length=MAX_ENDPOINT)
        keys = subscription.get("keys")
        if keys is None and kind == "webpush":
            raise invalid("keys", "a webpush subscription has keys {p256dh, auth}")
        if keys is not None:
            if not isinstance(keys, dict) or set(keys) != {"p256dh", "auth"}:
                raise invalid("keys", "keys must be an object {p256dh, auth}")
            p256dh = _b64url(keys["p256dh"], "keys.p256dh", 65)
            if p256dh[0] != 4:
                raise invalid("keys.p256dh", "keys.p256dh must be an uncompressed P-256 point")
            auth = _b64url(keys["auth"], "keys.auth", 16)
    return Registration(user.user_id, user.device_id, kind, token, endpoint, p256dh, auth, app_id,
                        sandbox, 0)


class PushAPI:
    app = Klein()

    def __init__(self, push: PushHandler, authenticator: Authenticator, limits: RateLimits,
                 gateway: Gateway) -> None:
        self._push = push
        self._gateway = gateway
        self.authenticator = authenticator
        self.limits = limits

    @app.route("/api/push/gateway", methods=["POST"])
    @public()  # servers, with a secret this gateway accepts (checked below)
    async def gateway(self, request: Any) -> bytes:
        """A server without APNs or FCM credentials hands a wake-up over
        (cyphr.push.gateway). 404 unless this server is a gateway."""
        if not self._gateway.serving:
            raise NotFound(f"No route for POST {GATEWAY_PATH}")
        if not self._gateway.allows(request.getHeader(b"authorization")):
            raise Unauthorized("A push gateway secret is required", code=INVALID_GATEWAY_SECRET)
        fields = Fields(read_json(request), {"notification"})
        notification = fields.value("notification")
        if not isinstance(notification, dict):
            raise invalid("notification", "notification must be an object")
        inner = Fields(notification, {"kind", "token", "appId", "sandbox", "counter"})
        kind = inner.text("kind", max_length=16)
        if kind not in FORWARDED_KINDS:
            raise invalid("kind", f"kind must be one of {', '.join(FORWARDED_KINDS)}")
        token = inner.text("token", max_length=MAX_TOKEN)
        if not token:
            raise invalid("token", "token must not be empty")
        counter = inner.integer("counter", minimum=0, maximum=2**53 - 1)
        registration = Registration("", 0, kind, token, None, None, None,
                                    inner.text("appId", required=False, max_length=MAX_APP_ID),
                                    inner.boolean("sandbox", default=False), 0)
        result = await self._gateway.forward(registration, counter or 0)
        if result.outcome == "retry":
            raise ApiError("The push service did not take the wake-up; try again",
                           code=PUSH_SERVICE_UNAVAILABLE, status=503,
                           headers={"Retry-After": str(int(result.retry_after or 5))})
        if result.outcome == "refused":
            raise BadRequest(f"The push service refused the wake-up ({result.reason})",
                             code=PUSH_REFUSED)
        rejected = [token] if result.outcome == "gone" else []
        return answer(request, {"success": True, "rejected": rejected})

    @app.route("/api/push/config", methods=["GET"])
    @authenticated()
    def config(self, request: Any, user: AuthUser) -> bytes:
        return answer(request, {"success": True, **self._push.config()})

    @app.route("/api/devices/me/push", methods=["PUT"])
    @authenticated()
    async def register(self, request: Any, user: AuthUser) -> bytes:
        registration = parse_registration(read_json(request), user)
        await self._push.register(user, registration)
        return answer(request, {"success": True, "kind": registration.kind})

    @app.route("/api/devices/me/push", methods=["DELETE"])
    @authenticated()
    async def unregister(self, request: Any, user: AuthUser) -> bytes:
        Fields(read_json(request, required=False), set())
        await self._push.unregister(user)
        return answer(request, {"success": True})
