"""
The push gateway, both sides. APNs and FCM credentials belong to whoever
publishes the app: a self-hosted Cyphr server has none, so it hands its
APNs and FCM wake-ups to a gateway (a Cyphr server that has them, run by
the app's publisher), as Matrix homeservers hand theirs to Sygnal.

    POST /api/push/gateway
    Authorization: Bearer <a secret the gateway accepts>
    {"notification": {"kind": "apns" | "fcm", "token": "...", "appId"?: "...",
                      "sandbox"?: bool, "counter": 7}}

    200 {"success": true, "rejected": []}         sent
    200 {"success": true, "rejected": ["<token>"]} the service says the token is dead
    503 (Retry-After)                              try again later
    400                                            refused (the request was wrong)

The notification carries what the wake-up needs and nothing more: no
Cyphr ID, chat, sender or content (the gateway learns which device tokens
a server wakes, and when).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from cyphr.handlers.push import TOPIC, TTL
from cyphr.push.webpush import BytesBody, PushResult, retry_after_seconds
from cyphr.store.push import Registration

_log = Logger()
PATH = "/api/push/gateway"
FORWARDED_KINDS = ("apns", "fcm")


def notification_json(registration: Registration, payload: bytes) -> dict[str, Any]:
    """What a server tells the gateway of one wake-up."""
    counter = json.loads(payload).get("n", 0)
    body: dict[str, Any] = {"kind": registration.kind, "token": registration.token,
                            "counter": counter}
    if registration.app_id:
        body["appId"] = registration.app_id
    if registration.sandbox:
        body["sandbox"] = True
    return body


class GatewaySender:
    """Sends APNs and FCM wake-ups through a gateway (``url``: the
    gateway's base URL) with a shared ``secret``."""

    def __init__(self, reactor: Any, url: str, secret: str, *, timeout: float = 10) -> None:
        self._reactor = reactor
        self._url = url.rstrip("/") + PATH
        self._secret = secret
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 8
        self._agent = Agent(reactor, connectTimeout=timeout, pool=self._pool)

    def send(self, registration: Registration, payload: bytes, *, ttl: int,
             topic: str) -> Deferred[PushResult]:
        return Deferred.fromCoroutine(self._send(registration, payload))

    async def _send(self, registration: Registration, payload: bytes) -> PushResult:
        body = json.dumps({"notification": notification_json(registration, payload)}).encode()
        request = self._agent.request(
            b"POST", self._url.encode("ascii"),
            Headers({b"Content-Type": [b"application/json"],
                     b"Authorization": [b"Bearer " + self._secret.encode("utf-8")]}),
            BytesBody(body))
        timer = self._reactor.callLater(self._timeout, request.cancel)
        try:
            response = await request
            raw = await readBody(response)
        except Exception as e:  # refused, reset, cancelled: the gateway is away
            return PushResult("retry", reason=f"the gateway could not be reached ({type(e).__name__})")
        finally:
            if timer.active():
                timer.cancel()
        status = response.code
        if status == 200:
            try:
                rejected = json.loads(raw).get("rejected", [])
            except (ValueError, AttributeError):
                return PushResult("retry", status, "the gateway's answer is not JSON")
            if registration.token in rejected:
                return PushResult("gone", status, "the gateway says the token is dead")
            return PushResult("sent", status)
        if status == 429 or status >= 500:
            retry_after = (response.headers.getRawHeaders(b"retry-after") or [None])[0]
            return PushResult("retry", status, f"the gateway answered {status}",
                              retry_after_seconds(retry_after, self._reactor.seconds()))
        return PushResult("refused", status, f"the gateway answered {status}")

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()


class Gateway:
    """The gateway's side: takes notifications from servers holding one of
    ``secrets`` and sends them with its own ``senders`` (APNs, FCM)."""

    def __init__(self, senders: Mapping[str, Any], secrets: tuple[str, ...]) -> None:
        self._senders = {kind: sender for kind, sender in senders.items() if kind in FORWARDED_KINDS}
        self._secrets = tuple(s.encode("utf-8") for s in secrets)

    @property
    def serving(self) -> bool:
        return bool(self._secrets)

    def allows(self, authorization: bytes | None) -> bool:
        """Whether the request's bearer token is one of the secrets
        (compared in constant time, every one of them)."""
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        found = False
        for secret in self._secrets:
            found |= hmac.compare_digest(token.strip(), secret)
        return found

    def kinds(self) -> list[str]:
        return sorted(self._senders)

    async def forward(self, registration: Registration, counter: int) -> PushResult:
        sender = self._senders.get(registration.kind)
        if sender is None:
            return PushResult("refused", reason=f"this gateway sends no {registration.kind} pushes")
        payload = json.dumps({"n": counter}, separators=(",", ":")).encode()
        return await sender.send(registration, payload, ttl=TTL, topic=TOPIC)
