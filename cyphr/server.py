"""
build_server(config, reactor): the one way a Cyphr server is assembled.

The twistd plugin (cyphr.tap) and every test call it, so what is tested is
what runs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

import cyphr
from cyphr._compat import port_deferred
from cyphr.api.attachments import AttachmentsAPI, UploadReceiver
from cyphr.api.backups import HistoryBackupAPI
from cyphr.api.push import PushAPI
from cyphr.api.devices import DevicesAPI
from cyphr.api.health import HealthAPI
from cyphr.api.http import ApiRouter, CyphrSite, HttpPolicy, Root, connection_release
from cyphr.api.identity import IdentityAPI
from cyphr.api.linking import LinkingAPI
from cyphr.api.keys import KeysAPI
from cyphr.api.messaging import ChatsAPI, MessagingAPI
from cyphr.api.metrics import MetricsResource, MetricsRoot
from cyphr.api.operations import OperationsAPI
from cyphr.api.security import SecurityAPI
from cyphr.api.rosters import RostersAPI
from cyphr.api.sessionkeys import SessionKeysAPI
from cyphr.api.wallet import WalletAPI
from cyphr.changes import ChangeFeed, IdentityDeleted, MemberLeft
from cyphr.clock import now_ms
from cyphr.config import Config, ConfigError
from cyphr.connections import ConnectionLimits
from cyphr import heap
from cyphr.cpu import CpuPool
from cyphr.datadir import DataDirectory, ServerSecrets, load_secrets, open_data_dir
from cyphr.db import Database, Transaction, open_database
from cyphr.db.fingerprints import check_fingerprints_txn
from cyphr.db.postgres import PostgresDatabase
from cyphr.blobs import BlobStore
from cyphr.blobs.local import LocalBlobStore
from cyphr.handlers.attachments import AttachmentLimits, AttachmentsHandler
from cyphr.handlers.auth import Authenticator
from cyphr.handlers.backups import HistoryBackupHandler
from cyphr.handlers.calls import CallsHandler
from cyphr.handlers.delivery import DeliveryHandler
from cyphr.handlers.devices import DevicesHandler
from cyphr.handlers.health import HealthHandler, RealtimeStats
from cyphr.handlers.ice import IceServers
from cyphr.handlers.identity import IdentityHandler
from cyphr.handlers.keys import KeysHandler
from cyphr.handlers.rosters import RostersHandler
from cyphr.handlers.sessionkeys import SessionKeysHandler
from cyphr.handlers.linking import LinkingHandler
from cyphr.handlers.maintenance import Maintenance
from cyphr.handlers.origins import AcceptedOrigins
from cyphr.handlers.pins import PinBackupHandler
from cyphr.handlers.push import PushHandler
from cyphr.push import webpush
from cyphr.push.gateway import FORWARDED_KINDS, Gateway, GatewaySender
from cyphr.handlers.messaging import MessagingHandler
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.recipients import RecipientDevices
from cyphr.handlers.receipts import ReceiptsHandler
from cyphr.handlers.security import PasswordHashing, TotpHandler
from cyphr.handlers.sending import SendBatcher
from cyphr.handlers.storage import StorageStatus
from cyphr.handlers.tokens import TokenService
from cyphr.handlers.wallet import WalletHandler
from cyphr.logs import JsonLogObserver
from cyphr.metrics import CyphrCollector, Metrics
from cyphr.realtime.bus import Bus, LocalBus, PostgresBus
from cyphr.realtime.engine import EngineServer
from cyphr.realtime.events import Realtime
from cyphr.realtime.presence import Presence
from cyphr.realtime.socketio import SocketServer
from cyphr.store.attachments import AttachmentStore
from cyphr.store.backups import HistoryBackupStore
from cyphr.store.challenges import ChallengeStore
from cyphr.store.chats import ChatStore
from cyphr.store.devices import DeviceStore
from cyphr.store.identities import IdentityStore
from cyphr.store.keys import PrekeyStore
from cyphr.store.rosters import RosterStore
from cyphr.store.sessionkeys import SessionKeyStore
from cyphr.store.links import LinkStore
from cyphr.store.messages import MessageStore
from cyphr.store.pins import PinBackupStore
from cyphr.store.push import PushStore
from cyphr.store.status import StatusStore
from cyphr.store.tokens import TokenStore
from cyphr.store.totp import TotpStore
from cyphr.store.wallet import WalletStore

_log = Logger()
MAINTENANCE_INTERVAL = 300  # seconds between purges of expired challenges and revocations
CACHE_SWEEP_INTERVAL = 60  # seconds between sweeps of idle cache and rate-limit entries


class DatabaseService(Service):
    """Starts the database (connecting, retrying and migrating in the
    background), the bus and the realtime layer with the process; once the
    database is ready, calls ``on_ready`` (the process then listens). At the
    end, in this order: no new realtime sessions; the delivery receipts and
    the messages still waiting for a batch are written (and acknowledged);
    every socket is closed with a reason; the bus and the database close;
    the data directory is released (cyphr.datadir.DataDirectory.close)."""

    def __init__(self, database: Database, batcher: SendBatcher, receipts: ReceiptsHandler, bus: Bus,
                 realtime: Realtime, engine: EngineServer, data_dir: DataDirectory, blobs: Any,
                 push: PushHandler, on_ready: Callable[[], None] = lambda: None) -> None:
        self.data_dir = data_dir
        self.blobs = blobs
        self.push = push
        self.database = database
        self.batcher = batcher
        self.receipts = receipts
        self.bus = bus
        self.realtime = realtime
        self.engine = engine
        self.on_ready = on_ready

    def startService(self) -> None:
        super().startService()
        self.data_dir.record_holder()
        self.database.start()
        self.bus.start()
        # Realtime publishes on the bus through the database: not before
        # the database is ready (what it sent earlier would be dropped).
        self.database.when_ready().addCallback(self._database_ready)

    def _database_ready(self, _: Any) -> None:
        if self.running:
            self.realtime.start()
            self.push.start().addErrback(lambda f: _log.failure("Starting push failed", f))
            self.on_ready()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.engine.accepting = False
        await self.receipts.stop()
        await self.batcher.stop()
        self.engine.close_all("server shutting down")
        # Let each client answer its close frame, so that it hears the code
        # and reason rather than a reset (CyphrService bounds the wait).
        await self.engine.websockets_closed()
        # What the closed sockets began (last_seen, user_offline) uses the
        # database: it ends before the database closes, rather than fail
        # with "the database is unavailable".
        await self.realtime.tasks_done()
        await self.receipts.stop()  # any that came in meanwhile
        self.realtime.stop()
        await self.push.stop()
        await self.bus.stop()
        await self.database.close()
        self.blobs.stop()
        self.data_dir.close()


class CyphrService(MultiService):
    """The process: its listening endpoints, its database and its CPU pool.

    The API endpoints (``held``) open only once the database is connected,
    migrated and has passed the start check (the secrets): until then a
    client or load balancer finds nothing listening, rather than a /health
    that answers 200 in front of an API that answers 503. A port that cannot
    be bound then is fatal (``on_fatal``). ``--metrics-listen`` endpoints
    open at once: metrics help most while the database is away.

    Its stop is bounded by ``shutdown_timeout``: past it, the connections
    still open are dropped and the stop ends anyway, so that the process
    exits (twistd stops the reactor once the stop has ended). The HTTP
    connections of ``sites`` are closed as the stop begins, each once it
    has no request in hand (a keep-alive client hears it at once, rather
    than at its next request); what is left is closed when the stop ends."""

    def __init__(self, config: Config, cpu: CpuPool, engine: EngineServer, clock: Any,
                 sites: list[CyphrSite], *, on_fatal: Callable[[str], None]) -> None:
        super().__init__()
        self.config = config
        self.cpu = cpu
        self.engine = engine
        self.clock = clock
        self.sites = sites
        self.held: list[StreamServerEndpointService] = []
        self.on_fatal = on_fatal

    def open_endpoints(self) -> None:
        """Listen on the held API endpoints (the database is ready)."""
        held, self.held = self.held, []
        for endpoint_service in held:
            try:
                # Added to a running MultiService, it starts listening now.
                endpoint_service.setServiceParent(self)
            except CannotListenError as e:
                self.on_fatal(f"cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}")
                return
            port_deferred(endpoint_service).addCallback(self._listening, "API")

    def stopService(self) -> Deferred[None]:
        began = self.clock.seconds()
        timeout = self.config.shutdown_timeout
        _log.info(
            "Cyphr shutting down: writing pending messages and closing {sessions} realtime "
            "sessions (at most {timeout}s)",
            sessions=len(self.engine.sessions), timeout=timeout)
        stopped: Deferred[None] = Deferred()
        for site in self.sites:
            site.close_connections(when_idle=True)

        def out_of_time() -> None:
            dropped = self.engine.drop_all() + sum(
                site.close_connections(abort=True) for site in self.sites)
            _log.warn(
                "Cyphr shutdown took longer than {timeout}s: dropped {dropped} connections "
                "and exiting anyway", timeout=timeout, dropped=dropped)
            stopped.callback(None)

        timer = self.clock.callLater(timeout, out_of_time)

        def finished(outcome: Any) -> None:
            if isinstance(outcome, Failure):
                _log.failure("Stopping Cyphr failed", outcome)
            if timer.active():
                timer.cancel()
                for site in self.sites:
                    site.close_connections()  # requests still arriving
                _log.info("Cyphr shut down in {elapsed:.1f}s", elapsed=self.clock.seconds() - began)
                stopped.callback(None)

        super().stopService().addBoth(finished)
        return stopped.addCallback(lambda _: self.cpu.stop())

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # twistd asks the application for an ILogObserver before it sets up
        # its own logging: this is how --log-format json takes over.
        if (
            self.config.log_format == "json"
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver) is None
        ):
            parent.setComponent(ILogObserver, JsonLogObserver())

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"cyphr: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}")

    def startService(self) -> None:
        _log.info(
            "Cyphr {version} starting: will listen on {endpoints} once the database is ready, "
            "metrics {metrics}, database {database}",
            version=cyphr.__version__,
            endpoints=", ".join(self.config.listen),
            metrics=", ".join(self.config.metrics_listen) or "at /metrics on the same endpoints",
            database=self.config.describe_database(),
        )
        warning = public_url_warning(self.config)
        if warning:
            _log.warn("{reason}", reason=warning)
        super().startService()
        for child in self:
            port = port_deferred(child) if isinstance(child, StreamServerEndpointService) else None
            if port is not None:
                port.addCallback(self._listening, getattr(child, "serves", "API"))

    @staticmethod
    def _listening(port: Any, serves: str) -> Any:
        address = port.getHost()
        if hasattr(address, "port"):
            where = f"{type(address).__name__.replace('Address', '').lower()} {address.host}:{address.port}"
        else:
            where = f"unix {getattr(address, 'name', address)}"
        _log.info("Serving the {serves} on {address}", serves=serves, address=where)
        return port


def _endpoint_parts(description: str) -> list[str]:
    """An endpoint string's parts, split on the colons that are not
    backslash-escaped (as Twisted reads it: tcp:3001:interface=\\:\\:1)."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def reachable_from_elsewhere(description: str) -> bool:
    """Whether a --listen endpoint may be reached from other machines: a
    tcp or ssl endpoint not bound to a loopback interface."""
    kind, *arguments = _endpoint_parts(description)
    if kind.lower() not in ("tcp", "tcp6", "ssl"):
        return False
    interface = next((a.split("=", 1)[1] for a in arguments if a.startswith("interface=")), "")
    if interface == "localhost":
        return False
    try:
        return not ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return True


def public_url_warning(config: Config) -> str | None:
    """The start-up warning of a server others can reach but whose public
    URL is not set: clients sign the origin they reached, and without
    public_url only loopback origins are accepted."""
    if config.public_url:
        return None
    exposed = [d for d in config.listen if reachable_from_elsewhere(d)]
    if not exposed:
        return None
    return (f"public_url is not set, but {', '.join(exposed)} can be reached from other machines: "
            "only clients reaching this server at a loopback address (such as localhost) "
            "can log in. Set public_url to the URL clients use (https://chat.example.com).")


@dataclass
class Server:
    """The wired object graph of one server process."""

    config: Config
    reactor: Any
    clock: Any
    data_dir: str
    secrets: ServerSecrets
    database: Database
    root: Root
    site: CyphrSite
    service: CyphrService
    endpoint_services: list[StreamServerEndpointService]
    metrics: Metrics
    metrics_site: CyphrSite | None
    metrics_services: list[StreamServerEndpointService]
    limits: RateLimits
    maintenance: Maintenance
    batcher: SendBatcher
    cpu: CpuPool
    engine: EngineServer
    realtime: Realtime
    bus: Bus
    attachments: AttachmentsHandler
    push: PushHandler

    def listening(self) -> list[Deferred[Any]]:
        """The listening ports, once the service has started and the
        database is ready (CyphrService.open_endpoints)."""
        return [port_deferred(svc) for svc in self.endpoint_services]

    def metrics_listening(self) -> list[Deferred[Any]]:
        """The ports of ``--metrics-listen``, once the service has started."""
        return [port_deferred(svc) for svc in self.metrics_services]


def blob_store(config: Config, data_dir: str, reactor: Any) -> BlobStore:
    """Where attachment blobs are kept: the data directory, or a bucket."""
    if config.attachment_store == "s3":
        from cyphr.blobs.s3 import S3BlobStore  # botocore loads only when used

        return S3BlobStore(reactor, endpoint=config.s3_endpoint or None, bucket=config.s3_bucket,
                           region=config.s3_region, prefix=config.s3_prefix,
                           access_key=config.s3_access_key_id,
                           secret_key=config.s3_secret_access_key)
    return LocalBlobStore(os.path.join(data_dir, "attachments"), reactor)


def push_handler(config: Config, secrets: ServerSecrets, store: PushStore, clock: Any, reactor: Any,
                 node_id: str, cpu: CpuPool) -> tuple[PushHandler, Gateway]:
    """Push wake-ups, with a sender for each push service this server can
    reach (cyphr.push): Web Push and UnifiedPush always (the VAPID key is
    derived from push_vapid_key)."""
    allowed = config.push_allow_endpoint
    vapid = webpush.VapidKey.from_scalar(vapid_scalar(secrets.vapid_seed))
    contact = config.push_contact or next(
        (url for url in config.public_url if url.startswith("https://")), "mailto:postmaster@localhost")
    web = webpush.WebPushSender(reactor, vapid, contact,
                                allow_endpoint=lambda url: webpush.matches_prefix(url, allowed))
    senders: dict[str, Any] = {"webpush": web, "unifiedpush": web}
    if config.fcm_credentials:
        from cyphr.push.fcm import FCM_BASE_URL, FcmSender  # google-auth loads only when used

        try:
            senders["fcm"] = FcmSender(reactor, read_service_account(config.fcm_credentials),
                                       base_url=config.fcm_endpoint or FCM_BASE_URL)
        except ValueError as e:
            raise ConfigError(f"fcm_credentials: {e}") from None
    if config.apns_key_file:
        from cyphr.push.apns import PRODUCTION, SANDBOX, ApnsSender  # httpx loads only when used

        try:
            with open(config.apns_key_file, "rb") as f:
                key = f.read()
            senders["apns"] = ApnsSender(
                reactor, key, config.apns_key_id, config.apns_team_id,
                topic=config.apns_topic or None, endpoint=config.apns_endpoint or PRODUCTION,
                sandbox_endpoint=config.apns_sandbox_endpoint or SANDBOX,
                verify=config.apns_ca_file or True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"apns_key_file: {getattr(e, 'strerror', None) or e}") from None
    # What this server may send itself, it may send for others (a gateway).
    gateway = Gateway(senders, config.push_gateway_accept)
    if config.push_gateway_url:
        forwarded = GatewaySender(reactor, config.push_gateway_url, config.push_gateway_secret)
        for kind in FORWARDED_KINDS:
            senders.setdefault(kind, forwarded)

    def check_endpoint(url: str) -> Deferred[str | None]:
        problem = webpush.check_endpoint(url, allowed)
        if problem is not None or webpush.matches_prefix(url, allowed):
            return succeed(problem)
        # A name must resolve to public addresses only (resolving blocks).
        host = urlsplit(url).hostname or ""
        return cpu.run(webpush.resolves_to_public, host).addCallback(
            lambda public: None if public else "it resolves to a private or local address")

    return PushHandler(store, senders, clock, reactor, node_id, check_endpoint=check_endpoint,
                       public_config={"vapidPublicKey": vapid.public_key_b64url()}), gateway


def read_service_account(path: str) -> dict[str, Any]:
    """The FCM service account JSON file (its private key never logged)."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"fcm_credentials {path!r} cannot be read as a service account JSON "
                          f"file: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    if not isinstance(info, dict):
        raise ConfigError(f"fcm_credentials {path!r} is not a service account JSON object")
    return info


def vapid_scalar(seed: bytes) -> bytes:
    """The VAPID private key, a P-256 scalar in [1, n - 1], from the
    push_vapid_key secret: the same on every node that shares it."""
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    digest = hashlib.sha512(b"cyphr-v1 vapid key\0" + seed).digest()
    return (int.from_bytes(digest, "big") % (order - 1) + 1).to_bytes(32, "big")


def default_node_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def build_server(
    config: Config,
    reactor: Any,
    *,
    clock: Any = None,
    on_fatal: Callable[[str], None] | None = None,
) -> Server:
    """
    Assemble a server from its configuration. Nothing listens and nothing
    connects until ``server.service`` starts. ``clock`` (default: the
    reactor) is where every component reads time. ``on_fatal`` is called
    when the database can never be used (default: stop the reactor).
    """
    clock = clock if clock is not None else reactor
    # Locked on SQLite: two servers there would split the realtime side.
    # Nodes on one PostgreSQL database may share a data directory (and so
    # their secrets) on one host.
    directory = open_data_dir(config.data_dir, lock=config.database_engine == "sqlite")
    data_dir = directory.path
    try:
        secrets = load_secrets(config, data_dir)
    except Exception:
        directory.close()
        raise

    def fatal(message: str) -> None:
        _log.critical("Cyphr cannot go on: {message}", message=message)
        if reactor.running:
            reactor.stop()

    fatal_messages: list[str] = []

    def database_fatal(message: str) -> None:
        fatal_messages.append(message)  # the start failed: see ready()
        (on_fatal or fatal)(message)
    # Ready means migrated and, in the same transaction, this node's secrets
    # found equal to those the database was first started with.
    fingerprints = secrets.fingerprints()

    async def check_secrets(txn: Transaction) -> None:
        await check_fingerprints_txn(txn, fingerprints, now_ms(clock), secrets.generated)

    database = open_database(config, reactor, on_fatal=database_fatal, start_check=check_secrets)

    # The change feed first: handlers publish on it, listeners subscribe.
    changes = ChangeFeed()
    presence = Presence(clock)
    cpu = CpuPool(reactor)
    limits = RateLimits(clock, config)
    identities = IdentityStore(database)
    devices = DeviceStore(database)
    challenges = ChallengeStore(database)
    revocations = TokenStore(database)

    tokens = TokenService(secrets.jwt_key, config.token_lifetime, clock, cache_size=config.cache_entries)
    authenticator = Authenticator(tokens, identities, reactor)
    totp = TotpHandler(TotpStore(database), secrets.totp_key, clock)
    # One rule for the origins login statements and wallet links may name.
    origins = AcceptedOrigins(config.public_url)
    chats = ChatStore(database)
    identity = IdentityHandler(identities, challenges, revocations, tokens, totp,
                               secrets.fingerprint_key, clock, devices=devices,
                               max_devices=config.max_devices, is_online=presence.is_online,
                               chats=chats, changes=changes, origins=origins,
                               accept_v1=config.accept_v1_auth)
    keys = KeysHandler(identities, identity, PrekeyStore(database), devices, cpu, limits.claim,
                       config.max_prekeys, clock)
    wallet = WalletHandler(WalletStore(database), identity, clock, origins)
    messages = MessageStore(database)
    node_id = config.node_id or default_node_id()
    push, gateway = push_handler(config, secrets, PushStore(database), clock, reactor, node_id, cpu)
    # Each batch of messages queues the wake-ups of the devices with no
    # socket, in its own statement.
    batcher = SendBatcher(messages, reactor, wake_ups=push)
    attachments = AttachmentsHandler(
        AttachmentStore(database), blob_store(config, data_dir, reactor), clock, AttachmentLimits(max_size=config.max_attachment, quota=config.attachment_quota,
                                max_pending=config.max_pending_uploads,
                                upload_expiry=config.upload_expiry,
                                retention_days=config.attachment_retention_days),
        limits.attachments, limits.attachment_bytes)
    rosters = RosterStore(database)
    messaging = MessagingHandler(chats, messages, identities, batcher, limits.send, changes, clock,
                                 group_limit=limits.group_create, member_limit=limits.member_add,
                                 recipients=RecipientDevices(devices), rosters=rosters,
                                 attachments=attachments, cache_size=config.cache_entries)
    receipts = ReceiptsHandler(chats, messages, clock)
    calls = CallsHandler(chats, clock, cache_size=config.cache_entries)
    # A call may be signalled only while the two share a chat: a leave ends
    # what this node believed of its member's pairs.
    changes.subscribe(MemberLeft, calls.member_left)
    delivery = DeliveryHandler(chats, messages, identities, devices, clock)

    def identity_deleted(change: IdentityDeleted) -> None:
        # Nothing about a deleted identity stays in memory.
        messaging.forget_user(change.cyphr_id)
        calls.forget_user(change.cyphr_id)

    changes.subscribe(IdentityDeleted, identity_deleted)

    bus: Bus
    if isinstance(database, PostgresDatabase):
        bus = PostgresBus(database, config.database, node_id, reactor)
    else:
        bus = LocalBus(node_id)
    sockets = SocketServer(
        clock, connect_timeout=config.connect_timeout,
        event_rate=config.realtime_event_rate[0] / config.realtime_event_rate[1],
        event_burst=config.realtime_event_rate[0])
    realtime = Realtime(sockets=sockets, authenticator=authenticator, messaging=messaging,
                        receipts=receipts, calls=calls, delivery=delivery, presence=presence,
                        bus=bus, changes=changes, clock=clock, reactor=reactor,
                        max_payload=min(config.max_payload, config.max_body), push=push)
    http_policy = HttpPolicy.from_config(config)
    # The API site's open connections, within the policy's caps.
    connections = ConnectionLimits(http_policy.max_connections, http_policy.max_connections_per_address)
    engine = EngineServer(
        clock, on_session=sockets.on_session, ping_interval=config.ping_interval,
        ping_timeout=config.ping_timeout, max_payload=config.max_body,
        buffer_limit=config.realtime_buffer, client_ip=http_policy.client_ip,
        handshake_rate=config.realtime_handshake_rate, max_pending=config.realtime_pending_sessions,
        connection_release=connection_release)
    status = StatusStore(database)
    health = HealthHandler(status, clock, node_id=node_id,
                           realtime_stats=lambda: RealtimeStats(**realtime.stats()))
    links = LinkStore(database)
    maintenance = Maintenance(challenges, revocations, messages, config.retention_days, clock,
                              links=links, envelope_retention_days=config.envelope_retention_days,
                              attachments=attachments)

    router = ApiRouter([
        HealthAPI(health),
        IdentityAPI(identity, authenticator, limits, PinBackupHandler(PinBackupStore(database), clock),
                    attachments),
        HistoryBackupAPI(HistoryBackupHandler(HistoryBackupStore(database), clock,
                                              config.history_backup_limit),
                         authenticator, limits, config.max_body),
        KeysAPI(keys, authenticator, limits),
        DevicesAPI(DevicesHandler(identities, devices, changes, clock), authenticator, limits),
        LinkingAPI(LinkingHandler(links, identities, identity, tokens, changes, cpu,
                                  secrets.fingerprint_key, config.max_devices, clock),
                   authenticator, limits),
        SecurityAPI(totp, PasswordHashing(cpu), authenticator, limits,
                    hash_password_endpoint=config.hash_password_endpoint),
        WalletAPI(wallet, authenticator, limits),
        SessionKeysAPI(SessionKeysHandler(identities, devices, SessionKeyStore(database), cpu,
                                          limits, changes, config.max_prekeys, clock),
                       authenticator),
        MessagingAPI(messaging, authenticator, limits, min(config.max_payload, config.max_body)),
        AttachmentsAPI(attachments, authenticator, limits),
        PushAPI(push, authenticator, limits, gateway),
        ChatsAPI(messaging, authenticator, limits),
        RostersAPI(RostersHandler(rosters, chats, identities, cpu, changes, clock,
                                  change_limit=limits.member_add), authenticator),
        OperationsAPI(
            IceServers(config.stun_urls, config.turn_urls, config.turn_secret, config.turn_ttl, clock),
            StorageStatus(status), authenticator, limits, config.admin_token),
    ])
    metrics = Metrics()
    metrics.registry.register(CyphrCollector(
        http=metrics.http, engine=engine, presence=presence, receipts=receipts, batcher=batcher,
        database=database, bus=bus, limits=limits, sockets=sockets, connections=connections,
        attachments=attachments, push=push, tables=(realtime, messaging, calls, tokens)))
    metrics_resource = MetricsResource(metrics)
    # With --metrics-listen, /metrics is served only there: the public
    # endpoints answer 404 for it, as for any unknown path.
    root = Root(router, engine.resource, None if config.metrics_listen else metrics_resource)
    site = CyphrSite(root, http_policy, reactor, metrics=metrics.http,
                     on_body_refused=engine.resource.body_refused, connections=connections,
                     uploads=UploadReceiver(attachments, authenticator))

    metrics_site = None
    if config.metrics_listen:
        # Scrapes there are not counted among the API's requests.
        metrics_site = CyphrSite(MetricsRoot(metrics_resource), http_policy, reactor)

    service = CyphrService(config, cpu, engine, clock, [site] + ([metrics_site] if metrics_site else []),
                           on_fatal=database_fatal)
    def ready() -> None:
        service.open_endpoints()
        if not fatal_messages:
            directory.served()

    DatabaseService(database, batcher, receipts, bus, realtime, engine, directory, attachments.blobs,
                    push, on_ready=ready).setServiceParent(service)
    def purge_now() -> Deferred[None] | None:
        # Not before the database is up (the pool says so when it is down).
        return Deferred.fromCoroutine(maintenance.run()) if database.ready else None

    purge = TimerService(MAINTENANCE_INTERVAL, purge_now)
    purge.clock = clock
    purge.setServiceParent(service)

    def forget_idle() -> Deferred[None]:
        # The caches and rate limits trim their idle entries as they are
        # used; this is for one no longer used (the load has stopped), so
        # that it empties within a minute or two all the same.
        for table in (tokens, messaging, calls, engine, *limits.all()):
            table.expire()
        # And what the process freed (a burst's buffers) goes back to the
        # system, so that RSS follows what is in use (cyphr.heap).
        return cpu.run(heap.trim)

    sweep = TimerService(CACHE_SWEEP_INTERVAL, forget_idle)
    sweep.clock = clock
    sweep.setServiceParent(service)

    def serve(description: str, factory: CyphrSite, serves: str) -> StreamServerEndpointService:
        # strports.service makes a service that fails the start (with a
        # clear message) rather than run deaf when it cannot listen.
        endpoint_service = strports.service(description, factory, reactor=reactor)
        endpoint_service.serves = serves  # type: ignore[attr-defined]  # for the log
        if serves == "API":
            service.held.append(endpoint_service)  # until the database is ready
        else:
            endpoint_service.setServiceParent(service)
        return endpoint_service

    endpoint_services = [serve(description, site, "API") for description in config.listen]
    metrics_services = [serve(description, metrics_site, "metrics")
                        for description in config.metrics_listen]

    return Server(
        config=config,
        reactor=reactor,
        clock=clock,
        data_dir=data_dir,
        secrets=secrets,
        database=database,
        root=root,
        site=site,
        service=service,
        endpoint_services=endpoint_services,
        metrics=metrics,
        metrics_site=metrics_site,
        metrics_services=metrics_services,
        limits=limits,
        maintenance=maintenance,
        batcher=batcher,
        cpu=cpu,
        engine=engine,
        realtime=realtime,
        bus=bus,
        attachments=attachments,
        push=push,
    )
