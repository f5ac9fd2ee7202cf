"""
Push wake-ups: a device that has no live socket on any node is woken
through its push service when a message is stored for it, so that the app
connects and catches up. A wake-up names no sender, no chat and no content:
its payload is an opaque per-device counter, and every wake-up of a device
carries the same Topic, so a push service keeps only the newest.

- **Registration** (``PUT /api/devices/me/push``): one per device; a Web
  Push or UnifiedPush endpoint must be https and reach a public address,
  unless it starts with one of the operator's ``push_allow_endpoint``
  prefixes (local distributors, tests).
- **The outbox** (cyphr.store.push): each batch of messages, in the
  transaction that stores it (on PostgreSQL the same statement), queues a
  wake-up for each registered device of the chats' members but the
  sending device that has no live socket and none queued or sent already (a
  device is woken once, however many messages wait for it, until it
  connects again). The queue is in the database: a process that stops
  before sending leaves it to the next drain, on any node. A device that
  connects drops what was queued for it.
- **Draining**: every node drains the outbox every DRAIN_INTERVAL seconds,
  and at once after it queued something; on PostgreSQL nodes drain
  together (FOR UPDATE SKIP LOCKED) and each claimed wake-up is the
  claiming node's for a while, then anyone's again (the node died).
- **Failures**: a registration the service calls dead is dropped; 429,
  5xx, time-outs and lost connections are tried again with backoff and
  jitter (or after Retry-After), MAX_ATTEMPTS times in all; a refusal of
  the request itself is logged and dropped. Sending never blocks a message.
- **Live sockets** across nodes: each node records which devices hold
  sockets on it (device_connections) and says it is alive every
  HEARTBEAT seconds; a node not heard from for NODE_SILENCE seconds counts
  no more, and its rows go.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cyphr.clock import now_ms
from cyphr.db import DatabaseUnavailable
from cyphr.errors import ApiError, BadRequest, NotFound
from cyphr.handlers.auth import AuthUser
from cyphr.push.webpush import PushResult
from cyphr.store.push import PushStore, Registration, WakeUps

_log = Logger()

KINDS = ("apns", "fcm", "webpush", "unifiedpush")
DRAIN_INTERVAL = 1.0   # seconds; an enqueue drains at once besides
DRAIN_BATCH = 100
HEARTBEAT = 5.0        # seconds between a node's "alive"
NODE_SILENCE = 20_000  # ms: a node not heard from for this long holds no sockets
MAX_ATTEMPTS = 5
BACKOFF = (1, 2, 4, 8, 16)  # seconds before attempt 2, 3, ...; jitter ±50%
TTL = 86_400           # seconds a push service keeps an undelivered wake-up
TOPIC = "cyphr-wake"   # the same for every wake-up of a device: only the newest is kept
PUSH_NOT_AVAILABLE = "PUSH_NOT_AVAILABLE"  # 400: this server sends no pushes of that kind
INVALID_PUSH_ENDPOINT = "INVALID_PUSH_ENDPOINT"  # 400: an endpoint the server will not call
PUSH_NOT_REGISTERED = "PUSH_NOT_REGISTERED"  # 404: the device has no push registration


class Sender(Protocol):
    """A push service's sender (cyphr.push.webpush.WebPushSender): never
    fails, answers a PushResult."""

    def send(self, registration: Registration, payload: bytes, *, ttl: int,
             topic: str) -> Deferred[PushResult]: ...

    def close(self) -> Deferred[None]: ...


@dataclass
class PushStats:
    sent: Counter[str]              # by kind
    failed: Counter[tuple[str, str]]  # by (kind, outcome): gone, retry, refused
    queued: int = 0                 # wake-ups queued by this node
    depth: int = 0                  # the outbox's waiting wake-ups, at the last drain


class PushHandler:
    def __init__(self, store: PushStore, senders: Mapping[str, Sender], clock: Any, reactor: Any,
                 node_id: str, *, check_endpoint: Callable[[str], Deferred[str | None]],
                 public_config: Mapping[str, Any] | None = None) -> None:
        self._store = store
        self._senders = dict(senders)
        # Business time (when a wake-up is due, the drain's and heartbeat's
        # schedule) from the clock; "the next turn" from the reactor.
        self._clock = clock
        self._reactor = reactor
        self._node_id = node_id
        self._check_endpoint = check_endpoint
        self._public_config = dict(public_config or {})
        self.stats = PushStats(Counter(), Counter())
        self._draining: Deferred[None] | None = None
        self._again = False
        self._tasks: set[Deferred[Any]] = set()
        self._device_chains: dict[tuple[str, int], Deferred[None]] = {}
        self._sending: set[Deferred[PushResult]] = set()  # pushes awaiting their service
        self._stopped = False
        self._drain_loop = LoopingCall(self._drain_now)
        self._drain_loop.clock = clock
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock

    # -- registration -------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """What a client needs to register: the kinds this server sends,
        and (Web Push) the VAPID public key."""
        return {"kinds": sorted(self._senders), **self._public_config}

    async def register(self, user: AuthUser, registration: Registration) -> None:
        if registration.kind not in self._senders:
            raise BadRequest(f"This server sends no {registration.kind} pushes", code=PUSH_NOT_AVAILABLE,
                             details={"field": "kind", "available": sorted(self._senders)})
        if registration.endpoint is not None:
            problem = await self._check_endpoint(registration.endpoint)
            if problem is not None:
                raise BadRequest(f"The push endpoint is refused: {problem}",
                                 code=INVALID_PUSH_ENDPOINT, details={"field": "endpoint"})
        await self._store.register(registration, now_ms(self._clock))

    async def unregister(self, user: AuthUser) -> None:
        if not await self._store.unregister(user.user_id, user.device_id):
            raise NotFound("This device has no push registration", code=PUSH_NOT_REGISTERED)

    # -- queueing -------------------------------------------------------------

    def wake_ups(self) -> WakeUps:
        """What a batch of messages stored now queues its wake-ups with
        (SendBatcher, in the batch's own statement): the devices of the
        chats' members that have no socket on a node heard from lately."""
        now = now_ms(self._clock)
        return WakeUps(now, now - NODE_SILENCE)

    def queued(self, count: int) -> None:
        """A batch of messages queued ``count`` wake-ups: they go now."""
        if count:
            self.stats.queued += count
            self.kick()

    # -- live sockets ---------------------------------------------------------

    def connected(self, user_id: str, device_id: int) -> None:
        """A socket of the device came (the realtime layer tells)."""
        self._in_order((user_id, device_id), lambda: self._store.connected(
            user_id, device_id, self._node_id))

    def disconnected(self, user_id: str, device_id: int) -> None:
        self._in_order((user_id, device_id), lambda: self._store.disconnected(
            user_id, device_id, self._node_id))

    def _in_order(self, device: tuple[str, int], work: Callable[[], Any]) -> None:
        """Run a device's socket counts in the order they came: a socket
        that comes and goes at once must not be counted after it went (the
        device would look connected for ever, and never be woken)."""
        before = self._device_chains.get(device)

        async def after() -> None:
            if before is not None:
                try:
                    await before
                except Exception:
                    pass  # logged where it failed
            await work()

        d = Deferred.fromCoroutine(after())
        self._device_chains[device] = d

        def done(result: Any) -> Any:
            if self._device_chains.get(device) is d:
                del self._device_chains[device]
            return result
        d.addBoth(done)
        self._spawn(d)

    # -- the node's life ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """The node starts: what a process of its name left goes; the
        heartbeat and the drain begin."""
        async def start() -> None:
            await self._store.node_started(self._node_id, now_ms(self._clock))
            if self._stopped:
                return  # stopped while it started
            self._heartbeat.start(HEARTBEAT, now=False).addErrback(
                lambda f: _log.failure("The push heartbeat stopped", f))
            self._drain_loop.start(DRAIN_INTERVAL, now=True).addErrback(
                lambda f: _log.failure("The push drain stopped", f))
        return Deferred.fromCoroutine(start())

    async def stop(self) -> None:
        """Stop draining: sends under way are abandoned (their claims run
        out and another node, or this one restarted, sends them: a push
        service that hangs must not hold up a shutdown); the node's sockets
        count no more."""
        self._stopped = True
        for sending in list(self._sending):
            sending.cancel()
        for loop in (self._heartbeat, self._drain_loop):
            if loop.running:
                loop.stop()
        while self._tasks:
            await next(iter(self._tasks))
        if self._draining is not None:
            await self._draining
        for sender in {id(s): s for s in self._senders.values()}.values():
            await sender.close()
        try:
            await self._store.node_stopped(self._node_id)
        except DatabaseUnavailable:
            pass

    async def _beat(self) -> None:
        now = now_ms(self._clock)
        try:
            await self._store.heard(self._node_id, now)
            await self._store.forget_silent_nodes(now - 3 * NODE_SILENCE)
            self.stats.depth = await self._store.depth()
        except DatabaseUnavailable:
            pass

    # -- draining -------------------------------------------------------------

    def kick(self) -> None:
        """Drain now (something was queued)."""
        self._drain_now()

    def _drain_now(self) -> Deferred[None] | None:
        if self._draining is not None:
            self._again = True
            return None
        draining = self._draining = Deferred.fromCoroutine(self._drain())

        def done(result: Any) -> Any:
            if self._draining is draining:
                self._draining = None
            if self._again:
                self._again = False
                self._drain_now()
            return result
        draining.addErrback(lambda f: _log.failure("Draining the push outbox failed", f))
        draining.addBoth(done)
        return None

    async def _drain(self) -> None:
        while True:
            now = now_ms(self._clock)
            try:
                claimed = await self._store.claim(now, now - NODE_SILENCE, DRAIN_BATCH)
            except DatabaseUnavailable:
                return
            if not claimed:
                return
            # Each send on its own: one slow service does not hold the others.
            sent: list[Registration] = []
            sends = [self._send(registration, attempts, sent) for registration, attempts in claimed]
            for d in sends:
                try:
                    await d
                except CancelledError:
                    pass  # the node stops: the claim runs out, and it goes again
            try:
                await self._store.sent(sent, now_ms(self._clock))
            except DatabaseUnavailable:
                pass  # the claims run out, and the wake-ups go again
            if len(claimed) < DRAIN_BATCH or self._stopped:
                return

    def _send(self, registration: Registration, attempts: int,
              sent: list[Registration]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._send_one(registration, attempts, sent))

    async def _send_one(self, registration: Registration, attempts: int,
                        sent: list[Registration]) -> None:
        """Send one wake-up; a success joins ``sent`` (recorded for the
        whole batch at once), a failure is recorded here."""
        kind = registration.kind
        sender = self._senders.get(kind)
        payload = json.dumps({"n": registration.counter + 1}, separators=(",", ":")).encode()
        if sender is None:  # registered when this server sent them; no more
            result = PushResult("refused", reason="no sender for this kind")
        else:
            sending = sender.send(registration, payload, ttl=TTL, topic=TOPIC)
            self._sending.add(sending)
            try:
                result = await sending
            except CancelledError:
                raise  # the node stops (see stop()): nothing is recorded
            except Exception as e:  # a sender's bug must not stop the drain
                _log.failure("A push sender failed", None)
                result = PushResult("retry", reason=type(e).__name__)
            finally:
                self._sending.discard(sending)
        now = now_ms(self._clock)
        try:
            if result.outcome == "sent":
                self.stats.sent[kind] += 1
                sent.append(registration)
                return
            # By outcome, not reason: a metric's labels must stay few.
            self.stats.failed[(kind, result.outcome)] += 1
            if result.outcome == "gone":
                await self._store.drop(registration)
            elif result.outcome == "retry" and attempts + 1 < MAX_ATTEMPTS:
                delay = result.retry_after
                if delay is None:
                    base = BACKOFF[min(attempts, len(BACKOFF) - 1)]
                    delay = base * random.uniform(0.5, 1.5)
                await self._store.retry_at(registration, now + int(delay * 1000))
            else:
                if result.outcome == "refused":
                    _log.warn("A push service refused a wake-up ({kind}, {reason})", kind=kind,
                              reason=result.reason)
                await self._store.give_up(registration)
        except DatabaseUnavailable:
            pass  # the claim runs out, and the wake-up is taken again

    def _spawn(self, work: Any) -> None:
        d = Deferred.fromCoroutine(work) if not isinstance(work, Deferred) else work
        if d.called:
            d.addErrback(self._failed)
            return
        self._tasks.add(d)

        def finished(result: Any) -> Any:
            self._tasks.discard(d)
            return result
        d.addBoth(finished).addErrback(self._failed)

    @staticmethod
    def _failed(failure: Any) -> None:
        if failure.check(DatabaseUnavailable, ApiError):
            return
        _log.failure("Push bookkeeping failed", failure)
