"""
Settings: one frozen Config, built from defaults < TOML file < CYPHR_*
environment variables < command line, and validated.

Every setting is declared once in SETTINGS; the command line options, the
environment variables, the TOML keys and their help all come from there.
Nonsense raises ConfigError with a message meant for the operator.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping
from urllib.parse import urlsplit

from twisted.python.usage import UsageError

from cyphr.signing import normalize_origin

MiB = 1024 * 1024
DEFAULT_CORS_ORIGINS = ("http://localhost:5173", "https://app.cyphrmessenger.app")
ENV_PREFIX = "CYPHR_"
# A history backup travels as base64 (4 bytes for every 3) in a JSON body
# of at most max_body: {"blob": "..."} and room to spare. The default fits
# the default max_body: 7 MiB is 9.33 MiB of base64 (8 MiB would be 10.67,
# over 10 MiB).
HISTORY_BACKUP_DEFAULT = 7 * MiB
HISTORY_BACKUP_FRAMING = 1024


def history_backup_room(max_body: int) -> int:
    """The largest blob whose base64, with HISTORY_BACKUP_FRAMING bytes of
    JSON around it, fits in a body of ``max_body`` bytes."""
    return max(0, (max_body - HISTORY_BACKUP_FRAMING) // 4 * 3)


class ConfigError(UsageError):
    """A setting is missing, malformed or impossible."""


@dataclass(frozen=True)
class Setting:
    """One setting: its name (TOML key; CYPHR_<NAME> in the environment;
    --name-with-dashes on the command line), its kind and its help."""

    name: str
    kind: str  # "str", "int", "size", "bool", "list", "choice", "duration", "rate"
    help: str
    choices: tuple[str, ...] = ()
    cli: bool = True  # secrets are settable only in the file or environment
    metavar: str = ""

    @property
    def option(self) -> str:
        return self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "list",
            "Endpoint to serve HTTP and Socket.IO on, as a Twisted endpoint "
            "string (tcp:3001, ssl:3443:privateKey=key.pem:certKey=cert.pem, "
            "unix:/run/cyphr.sock). Repeatable.", metavar="ENDPOINT"),
    Setting("metrics_listen", "list",
            "Endpoint to serve Prometheus metrics (/metrics) on, as a Twisted "
            "endpoint string (tcp:9100:interface=127.0.0.1). When given, "
            "/metrics is served only there and the --listen endpoints answer "
            "404 for it. Repeatable.", metavar="ENDPOINT"),
    Setting("database", "str",
            "A SQLite file path, or a postgresql:// URL. Default: "
            "cyphr.sqlite3 in the data directory.", metavar="PATH|URL"),
    Setting("data_dir", "str",
            "Directory for the embedded database and generated secrets "
            "(created mode 0700).", metavar="DIR"),
    Setting("max_body", "size",
            "Largest request body and Socket.IO event (its header and every "
            "binary attachment together), in bytes (suffixes KiB, MiB allowed).",
            metavar="BYTES"),
    Setting("cors_origin", "list",
            "Origin allowed to call the API from a browser. Repeatable.",
            metavar="ORIGIN"),
    Setting("public_url", "list",
            "URL clients use to reach this server (https://chat.example.com). "
            "Login statements and wallet links are accepted only for these "
            "origins; when none is set, only for loopback origins (localhost, "
            "127.0.0.1, ::1). Repeatable, to move between hosts.", metavar="URL"),
    Setting("accept_v1_auth", "bool",
            "Also accept v1 signatures: login signatures over the raw challenge "
            "and key signatures over \"cyphr-kyber-key:\" + key. Only while old "
            "clients are being upgraded: v1 lets a server obtain signatures of "
            "its choosing."),
    Setting("hash_password_endpoint", "bool",
            "Serve POST /api/auth/hash-password (Argon2id for clients without "
            "Argon2). Off by default: it makes a client send its passphrase to "
            "the server."),
    Setting("trusted_proxy", "list",
            "Address or network (CIDR) of a reverse proxy whose "
            "X-Forwarded-For / X-Real-IP headers are believed; 'unix' trusts "
            "peers on unix sockets. Repeatable.", metavar="NETWORK"),
    Setting("max_connections", "int",
            "Most connections (HTTP and WebSocket) open at once; past it a new "
            "connection is answered 503 and closed. 0: 80% of the open-file "
            "limit read at start (a larger value is brought down to that).",
            metavar="N"),
    Setting("max_connections_per_address", "int",
            "Most connections open at once from one client address (an IPv6 "
            "client by its /64); past it a new one is answered 429 and closed. "
            "A trusted proxy's own address is not capped: each of its requests "
            "counts for the client it names, while it is in flight. 0: no cap.",
            metavar="N"),
    Setting("request_timeout", "duration",
            "Time a client has to send a whole request, head and body, from its "
            "first byte (one more second for each 16 KiB of body received); "
            "past it the request is answered 408 and the connection closed.",
            metavar="DURATION"),
    Setting("access_log", "bool",
            "Log one line per HTTP request (off by default: it holds client "
            "addresses)."),
    Setting("log_format", "choice", "Log format: text or json (one JSON "
            "object per line on standard output).", choices=("text", "json"),
            metavar="FORMAT"),
    Setting("db_pool_size", "int",
            "Number of PostgreSQL connections in the pool.", metavar="N"),
    Setting("node_id", "str",
            "Name of this process in health answers and logs. Default: "
            "hostname:pid.", metavar="NAME"),
    Setting("token_lifetime", "duration",
            "How long a session token is valid (s, m, h, d suffixes).",
            metavar="DURATION"),
    Setting("max_prekeys", "int",
            "Most one-time prekeys one device may hold on the server.", metavar="N"),
    Setting("max_devices", "int",
            "Most devices one identity may have at once (recovery that "
            "keeps the other devices, and linking a device, are refused "
            "past it).", metavar="N"),
    Setting("cache_entries", "int",
            "Most entries in each of the in-memory caches that spare a "
            "database lookup (session tokens checked, direct chats, call "
            "partners); each also forgets what was unused for a minute, and "
            "a forgotten entry is only looked up again.", metavar="N"),
    Setting("rate_limit_keys", "int",
            "Most keys (client addresses, users) each rate limit tracks at "
            "once; an idle key is forgotten anyway once back at its full "
            "burst. Past the cap the least recently used goes first.",
            metavar="N"),
    Setting("max_payload", "size",
            "Largest encryptedPayload of one message, in bytes of JSON (the "
            "request body limit applies too).",
            metavar="BYTES"),
    Setting("max_history_backup", "size",
            "Largest history backup (a client's sealed messages, one per "
            "identity), in bytes before base64. Its base64 (4/3 of it) and "
            "1 KiB of JSON must fit in max_body. Default 7MiB, or the most "
            "that fits when max_body leaves less room.",
            metavar="BYTES"),
    Setting("retention_days", "int",
            "Delete messages older than this many days (0: keep them).",
            metavar="DAYS"),
    Setting("envelope_retention_days", "int",
            "Delete envelopes of messages sent over sessions that their device "
            "has not acknowledged after this many days, and bodies left with "
            "none (0: keep them).",
            metavar="DAYS"),
    Setting("attachment_store", "choice",
            "Where attachment blobs are kept: local (files under "
            "DATA_DIR/attachments) or s3 (an S3-compatible bucket: s3_bucket, "
            "s3_endpoint, s3_region, s3_prefix, and the credentials "
            "s3_access_key_id and s3_secret_access_key).",
            choices=("local", "s3"), metavar="STORE"),
    Setting("s3_endpoint", "str",
            "URL of an S3-compatible service (https://minio.internal:9000). "
            "Default: AWS S3 in s3_region.", metavar="URL"),
    Setting("s3_bucket", "str", "The bucket attachment blobs go to (attachment_store = s3).",
            metavar="NAME"),
    Setting("s3_region", "str", "The bucket's region.", metavar="REGION"),
    Setting("s3_prefix", "str", "What the names of the blobs' objects start with.",
            metavar="PREFIX"),
    Setting("s3_access_key_id", "str",
            "Access key id for the bucket (attachment_store = s3).", cli=False),
    Setting("s3_secret_access_key", "str",
            "Secret access key for the bucket (attachment_store = s3).", cli=False),
    Setting("push_allow_endpoint", "list",
            "A URL prefix of Web Push and UnifiedPush endpoints allowed though "
            "they are not https or reach a private or loopback address "
            "(http://127.0.0.1:8088 for a local distributor). Repeatable.",
            metavar="URL"),
    Setting("push_contact", "str",
            "Who push services may contact about this server's Web Push "
            "traffic, a mailto: or https: URL (the VAPID subject). Default: "
            "the first public_url.", metavar="URL"),
    Setting("push_vapid_key", "str",
            "Secret the server's Web Push (VAPID) key is derived from (at "
            "least 32 characters). Default: generated into the data "
            "directory. Every node of a cluster needs the same one: clients "
            "subscribe with its public key.", cli=False),
    Setting("push_gateway_url", "str",
            "Base URL of a push gateway (a Cyphr server holding the app's "
            "APNs and FCM credentials) that APNs and FCM wake-ups go through "
            "when this server has no credentials of its own; with "
            "push_gateway_secret.", metavar="URL"),
    Setting("push_gateway_secret", "str",
            "The secret this server shows the push gateway (at least 32 "
            "characters).", cli=False),
    Setting("push_gateway_accept", "list",
            "Secrets of the servers this server takes wake-ups from as a push "
            "gateway (POST /api/push/gateway); none: it is no gateway.", cli=False),
    Setting("apns_key_file", "str",
            "Path of the app's APNs token signing key (the .p8 file from "
            "Apple): with it and apns_key_id, apns_team_id, APNs wake-ups "
            "(iOS) are sent.", metavar="PATH"),
    Setting("apns_key_id", "str", "The APNs signing key's id (10 characters).", metavar="ID"),
    Setting("apns_team_id", "str", "The Apple developer team id (10 characters).", metavar="ID"),
    Setting("apns_topic", "str",
            "The app's bundle id, for registrations that name no appId.", metavar="BUNDLE"),
    Setting("apns_endpoint", "str",
            "APNs' production URL (a proxy, or a test stand-in).", metavar="URL"),
    Setting("apns_sandbox_endpoint", "str",
            "APNs' development URL, for registrations with sandbox set.", metavar="URL"),
    Setting("apns_ca_file", "str",
            "CA certificates to verify APNs with instead of the system's (a "
            "proxy's, or a test's).", metavar="PATH"),
    Setting("fcm_credentials", "str",
            "Path of the Firebase service account JSON file of the app's "
            "project: with it, FCM wake-ups (Android) are sent.", metavar="PATH"),
    Setting("fcm_endpoint", "str",
            "Base URL of FCM's HTTP v1 API (a proxy, or a test stand-in).",
            metavar="URL"),
    Setting("max_attachment", "size",
            "Largest attachment (an encrypted file's blob, Upload-Length), in bytes.",
            metavar="BYTES"),
    Setting("attachment_quota", "size",
            "Bytes of attachments one user may hold at once (finished or "
            "not, until they expire or go).", metavar="BYTES"),
    Setting("max_pending_uploads", "int",
            "Unfinished attachment uploads one user may hold at once.",
            metavar="N"),
    Setting("upload_expiry", "duration",
            "How long an unfinished upload is kept before it is removed.",
            metavar="DURATION"),
    Setting("attachment_retention_days", "int",
            "Delete attachments this many days after their upload finished "
            "(0: keep them until no message names them).",
            metavar="DAYS"),
    Setting("rate_limit_attachments", "rate",
            "Attachment uploads begun per user, as COUNT/PERIOD.", metavar="RATE"),
    Setting("rate_limit_attachment_bytes", "rate",
            "Attachment bytes uploaded per user, in MiB, as COUNT/PERIOD (an "
            "upload counts its whole length when it begins).", metavar="RATE"),
    Setting("rate_limit_send", "rate",
            "Messages sent per user (REST and realtime together), as "
            "COUNT/PERIOD: COUNT is the burst, COUNT/PERIOD the sustained rate.",
            metavar="RATE"),
    Setting("rate_limit_auth", "rate",
            "Requests per client address to /api/cyphr-id/* and /api/auth/*, "
            "as COUNT/PERIOD.", metavar="RATE"),
    Setting("rate_limit_search", "rate",
            "User searches per user, as COUNT/PERIOD.", metavar="RATE"),
    Setting("rate_limit_claim", "rate",
            "One-time prekey claims per caller and target device, as "
            "COUNT/PERIOD.", metavar="RATE"),
    Setting("rate_limit_bundle_claim", "rate",
            "Session bundles claimed per caller and target device (POST "
            "/api/sessions/bundles), as COUNT/PERIOD.", metavar="RATE"),
    Setting("rate_limit_bundle_drain", "rate",
            "One-time session prekeys handed out per target device, all callers "
            "together, as COUNT/PERIOD; past it a bundle carries the device's "
            "last-resort keys only.", metavar="RATE"),
    Setting("rate_limit_password", "rate",
            "Argon2 password hashes (POST /api/auth/hash-password) per user, "
            "as COUNT/PERIOD.", metavar="RATE"),
    Setting("rate_limit_group_create", "rate",
            "Groups created per user, as COUNT/PERIOD.", metavar="RATE"),
    Setting("rate_limit_member_add", "rate",
            "Members added to existing groups per user (the adding admin), "
            "as COUNT/PERIOD.", metavar="RATE"),
    Setting("rate_limit_provision", "rate",
            "Device provisionings (POST /api/devices/provision: a new device "
            "asking to be linked) per client address, as COUNT/PERIOD, on "
            "top of --rate-limit-auth.", metavar="RATE"),
    Setting("rate_limit_link_poll", "rate",
            "Polls of a new device waiting for its approval (POST "
            "/api/devices/provision/:id/receive) per client address, as "
            "COUNT/PERIOD; they do not count against --rate-limit-auth.",
            metavar="RATE"),
    Setting("rate_limit_link", "rate",
            "Device links approved per user (the approving account), as "
            "COUNT/PERIOD.", metavar="RATE"),
    Setting("ping_interval", "duration",
            "Socket.IO: the server pings each connection this often.", metavar="DURATION"),
    Setting("ping_timeout", "duration",
            "Socket.IO: a connection that does not answer a ping within this "
            "time is closed.", metavar="DURATION"),
    Setting("connect_timeout", "duration",
            "Socket.IO: a connection that joins no namespace within this time "
            "is closed.", metavar="DURATION"),
    Setting("realtime_handshake_rate", "rate",
            "Socket.IO: new sessions (Engine.IO handshakes) one client address "
            "may open, as COUNT/PERIOD; past it a handshake is answered 429.",
            metavar="RATE"),
    Setting("realtime_pending_sessions", "int",
            "Socket.IO: most open sessions of one client address that have "
            "joined no namespace yet; past it a handshake is answered 429. "
            "0: no cap.", metavar="N"),
    Setting("realtime_buffer", "size",
            "Socket.IO: a connection with more than this much unsent (queued, or "
            "in the transport's write buffer) is closed (slow consumer); at "
            "least max_body.", metavar="BYTES"),
    Setting("realtime_event_rate", "rate",
            "Socket.IO: events one connection may send, as COUNT/PERIOD.",
            metavar="RATE"),
    Setting("stun_urls", "list",
            "STUN server URL handed to clients by GET /api/ice-servers "
            "(stun:host:port). Repeatable.", metavar="URL"),
    Setting("turn_urls", "list",
            "TURN server URL handed to clients by GET /api/ice-servers, with "
            "time-limited credentials made with turn_secret "
            "(turn:host:3478?transport=udp, turns:host:5349). Repeatable.",
            metavar="URL"),
    Setting("turn_ttl", "duration",
            "How long the TURN credentials of GET /api/ice-servers are valid.",
            metavar="DURATION"),
    Setting("shutdown_timeout", "duration",
            "On SIGTERM, how long the server may take to write pending "
            "messages and close its sockets before the remaining connections "
            "are dropped and the process exits.", metavar="DURATION"),
    Setting("jwt_secret", "str",
            "Secret signing session tokens (at least 32 characters). Default: "
            "generated into the data directory. Every node of a cluster needs "
            "the same one.", cli=False),
    Setting("fingerprint_key", "str",
            "Key of the HMAC stored in place of device fingerprints (at least "
            "32 characters). Default: generated into the data directory.",
            cli=False),
    Setting("totp_key", "str",
            "Key encrypting stored TOTP secrets (at least 32 characters). "
            "Default: generated into the data directory.", cli=False),
    Setting("turn_secret", "str",
            "Secret shared with the TURN server (coturn's static-auth-secret) "
            "to make time-limited TURN credentials (at least 32 characters). "
            "Default: none, and no TURN server is handed out.", cli=False),
    Setting("admin_token", "str",
            "Bearer token of GET /api/admin/zero-storage-status (at least 32 "
            "characters). Default: none, and the route answers 404.", cli=False),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """The validated settings of one server process."""

    listen: tuple[str, ...] = ("tcp:3001",)
    metrics_listen: tuple[str, ...] = ()
    database: str = ""
    data_dir: str = "cyphr-data"
    max_body: int = 10 * MiB
    cors_origin: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    # Normalised origins (scheme://host[:port]); see __post_init__.
    public_url: tuple[str, ...] = ()
    accept_v1_auth: bool = False
    hash_password_endpoint: bool = False
    trusted_proxy: tuple[str, ...] = ()
    max_connections: int = 0
    max_connections_per_address: int = 256
    request_timeout: int = 30
    access_log: bool = False
    log_format: str = "text"
    db_pool_size: int = 10
    node_id: str = ""
    token_lifetime: int = 7 * 24 * 3600
    max_prekeys: int = 1000
    max_devices: int = 6
    cache_entries: int = 100_000
    rate_limit_keys: int = 200_000
    max_payload: int = 1 * MiB
    # 0: HISTORY_BACKUP_DEFAULT, or less when max_body leaves less room
    # (history_backup_limit); a value set is checked against max_body.
    max_history_backup: int = 0
    retention_days: int = 0
    # As Signal keeps undelivered messages: a device away for longer has
    # to be re-linked anyway.
    envelope_retention_days: int = 30
    # As Signal: 100 MiB files, unfinished uploads kept a day (Matrix),
    # attachments 30 days; 50 uploads begun, one more every 1.2 s; 1 GiB
    # of bytes an hour.
    push_allow_endpoint: tuple[str, ...] = ()
    push_contact: str = ""
    push_vapid_key: str = field(default="", repr=False)
    push_gateway_url: str = ""
    push_gateway_secret: str = field(default="", repr=False)
    push_gateway_accept: tuple[str, ...] = field(default=(), repr=False)
    apns_key_file: str = ""
    apns_key_id: str = ""
    apns_team_id: str = ""
    apns_topic: str = ""
    apns_endpoint: str = ""
    apns_sandbox_endpoint: str = ""
    apns_ca_file: str = ""
    fcm_credentials: str = ""
    fcm_endpoint: str = ""
    attachment_store: str = "local"
    s3_endpoint: str = ""
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_prefix: str = "attachments/"
    s3_access_key_id: str = field(default="", repr=False)
    s3_secret_access_key: str = field(default="", repr=False)
    max_attachment: int = 100 * MiB
    attachment_quota: int = 4096 * MiB
    max_pending_uploads: int = 5
    upload_expiry: int = 24 * 3600
    attachment_retention_days: int = 30
    rate_limit_attachments: tuple[int, int] = (50, 60)
    rate_limit_attachment_bytes: tuple[int, int] = (1024, 3600)
    rate_limit_send: tuple[int, int] = (300, 10)
    rate_limit_auth: tuple[int, int] = (100, 15 * 60)
    rate_limit_search: tuple[int, int] = (30, 60)
    rate_limit_claim: tuple[int, int] = (20, 3600)
    rate_limit_bundle_claim: tuple[int, int] = (20, 3600)
    # Many people may start sessions with one popular device; past this its
    # one-time prekeys are kept for later, and bundles carry last-resort keys.
    rate_limit_bundle_drain: tuple[int, int] = (200, 3600)
    rate_limit_password: tuple[int, int] = (10, 60)
    rate_limit_group_create: tuple[int, int] = (20, 3600)
    rate_limit_member_add: tuple[int, int] = (100, 3600)
    rate_limit_provision: tuple[int, int] = (10, 600)
    # A new device polls every two seconds for up to ten minutes: three at
    # once behind one address.
    rate_limit_link_poll: tuple[int, int] = (900, 600)
    rate_limit_link: tuple[int, int] = (10, 3600)
    ping_interval: int = 25
    ping_timeout: int = 20
    # Socket.IO clients send CONNECT as soon as the handshake is answered:
    # the reference's 45 s only lets unused sessions pile up.
    connect_timeout: int = 10
    realtime_handshake_rate: tuple[int, int] = (60, 3)
    realtime_pending_sessions: int = 32
    realtime_buffer: int = 32 * MiB
    realtime_event_rate: tuple[int, int] = (200, 2)
    # No STUN server by default: a public one (Google's, say) would learn
    # the address of every client that places a call.
    stun_urls: tuple[str, ...] = ()
    turn_urls: tuple[str, ...] = ()
    turn_ttl: int = 24 * 3600
    shutdown_timeout: int = 10
    jwt_secret: str = field(default="", repr=False)
    fingerprint_key: str = field(default="", repr=False)
    totp_key: str = field(default="", repr=False)
    turn_secret: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)
    config_file: str = ""

    def __post_init__(self) -> None:
        # public_url is kept as the origins it names, in the one spelling a
        # client signs (signing.normalize_origin), without repeats. A value
        # that is no URL stays as given: validate() refuses it.
        origins: list[str] = []
        for url in self.public_url:
            try:
                origin = normalize_origin(url)
            except ValueError:
                origin = url
            if origin not in origins:
                origins.append(origin)
        object.__setattr__(self, "public_url", tuple(origins))

    @property
    def history_backup_limit(self) -> int:
        """The largest history backup the server takes, in bytes."""
        return self.max_history_backup or min(HISTORY_BACKUP_DEFAULT,
                                               history_backup_room(self.max_body))

    @property
    def database_engine(self) -> str:
        return "postgresql" if is_postgres_url(self.database) else "sqlite"

    @property
    def sqlite_path(self) -> str:
        if self.database:
            return self.database
        return os.path.join(self.data_dir, "cyphr.sqlite3")

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(
            ipaddress.ip_network(p, strict=False)
            for p in self.trusted_proxy
            if p != "unix"
        )

    @property
    def trust_unix_peers(self) -> bool:
        return "unix" in self.trusted_proxy

    def describe_database(self) -> str:
        """The database, for logs: engine, then host, port, database name and
        user at most; never a password or another parameter of the URL."""
        if self.database_engine == "sqlite":
            return f"sqlite:{self.sqlite_path}"
        from psycopg2 import ProgrammingError
        from psycopg2.extensions import parse_dsn

        try:
            # parse_dsn reads the parameters given in the query string too
            # (?host=/run/postgresql), which urlsplit does not.
            params = parse_dsn(self.database)
        except ProgrammingError:
            return "postgresql (an unreadable URL)"
        host = params.get("host") or "localhost"
        port = params.get("port")
        user = params.get("user")
        return (f"postgresql://{user + '@' if user else ''}{host}{':' + port if port else ''}"
                f"/{params.get('dbname', '')}")


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


# -- parsing one value of each kind ----------------------------------------

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": MiB, "g": 1024 * MiB}


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"expected a size such as 10485760 or 10MiB, not {value!r}")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> int:
    """Seconds, from 3600 or "1h" (s, m, h, d)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int):
        return value
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration such as 3600, 15m or 7d, not {value!r}")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def parse_rate(value: Any) -> tuple[int, int]:
    """(count, period in seconds), from "100/15m"."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if not isinstance(value, str) or value.count("/") != 1:
        raise ValueError(f"expected a rate such as 100/15m, not {value!r}")
    count, period = value.split("/")
    return parse_int(count), parse_duration(period)


def format_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, not {value!r}")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected an integer, not {value!r}") from None


def parse_list(value: Any, *, from_env: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        # The environment holds one string: items are comma separated.
        items = value.split(",") if from_env else [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError("expected a list of strings")
    if not all(isinstance(item, str) for item in items):
        raise ValueError("expected a list of strings")
    return tuple(item.strip() for item in items if item.strip())


def _parse(setting: Setting, value: Any, *, from_env: bool = False) -> Any:
    kind = setting.kind
    if kind == "list":
        return parse_list(value, from_env=from_env)
    if kind == "size":
        return parse_size(value)
    if kind == "int":
        return parse_int(value)
    if kind == "bool":
        return parse_bool(value)
    if kind == "duration":
        return parse_duration(value)
    if kind == "rate":
        return parse_rate(value)
    if not isinstance(value, str):
        raise ValueError("expected a string")
    if kind == "choice" and value not in setting.choices:
        raise ValueError(f"expected one of {', '.join(setting.choices)}, not {value!r}")
    return value


# -- sources ----------------------------------------------------------------


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a TOML file, parsed but not yet validated."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    values = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        setting = SETTINGS_BY_NAME.get(name)
        if setting is None:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        try:
            values[name] = _parse(setting, value)
        except ValueError as e:
            raise ConfigError(f"config file {path}: {key}: {e}") from None
    return values


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as CYPHR_* variables. Other variables are ignored:
    CYPHR_* names not naming a setting (such as CYPHR_TEST_POSTGRES) belong
    to other tools."""
    values = {}
    for setting in SETTINGS:
        if setting.env in environ:
            try:
                values[setting.name] = _parse(setting, environ[setting.env], from_env=True)
            except ValueError as e:
                raise ConfigError(f"environment variable {setting.env}: {e}") from None
    return values


def load_config(
    command_line: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: str | None = None,
) -> Config:
    """
    Merge the sources, later ones winning: defaults, the TOML file, the
    environment, the command line. ``command_line`` holds only the options
    that were given. A repeatable option given in a later source replaces
    the list of an earlier one; it does not add to it.
    """
    if config_file is None:
        config_file = environ.get(ENV_PREFIX + "CONFIG") or None
    merged: dict[str, Any] = {}
    # Where each setting given came from, for the errors of validate().
    sources: dict[str, str] = {}
    if config_file:
        from_file = read_config_file(config_file)
        merged.update(from_file)
        sources.update(dict.fromkeys(from_file, "file"))
    from_environment = read_environment(environ)
    merged.update(from_environment)
    sources.update(dict.fromkeys(from_environment, "environment"))
    for name, value in command_line.items():
        setting = SETTINGS_BY_NAME[name]
        try:
            merged[name] = _parse(setting, value)
        except ValueError as e:
            raise ConfigError(f"--{setting.option}: {e}") from None
        sources[name] = "command line"
    merged["config_file"] = config_file or ""
    config = Config(**merged)
    try:
        validate(config)
    except ConfigError as e:
        raise ConfigError(named_by_source(str(e), sources, config_file or "")) from None
    return config


_OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")
_SETTINGS_BY_OPTION = {s.option: s for s in SETTINGS}


def named_by_source(message: str, sources: Mapping[str, str], config_file: str) -> str:
    """A validation error (which names settings as their command-line
    options) as the operator wrote the settings at fault: a setting from
    the config file by its key, with the file named in front; one from the
    environment by its variable; one from the command line (or a default)
    as the option it is."""
    in_file = False

    def name(match: re.Match[str]) -> str:
        nonlocal in_file
        setting = _SETTINGS_BY_OPTION.get(match.group(1))
        source = sources.get(setting.name) if setting is not None else None
        if setting is None or source in (None, "command line"):
            return match.group(0)
        if source == "file":
            in_file = True
            return setting.name
        return setting.env

    text = _OPTION.sub(name, message)
    # Settings with no option (the secrets) are named by their key already.
    for setting_name, source in sources.items():
        if source == "file" and re.search(rf"\b{setting_name}\b", text):
            in_file = True
    return f"config file {config_file}: {text}" if in_file else text


# -- validation -------------------------------------------------------------


def _check_endpoint(description: str, option: str = "--listen") -> None:
    # Parsing builds the endpoint against a memory reactor: nothing listens,
    # but a malformed string or an ssl: endpoint whose files cannot be read
    # is found now rather than after the process has started.
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:  # Twisted raises many kinds here, none of them useful to a traceback
        reason = str(e) or type(e).__name__
        raise ConfigError(f"{option} {description!r} is not a valid endpoint: {reason}") from None


def _redact(message: str, url: str) -> str:
    """The message without the URL's password, should it quote it."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return message.replace(password, "***") if password else message


def _check_postgres_url(url: str) -> None:
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import parse_dsn

    def refuse(reason: str) -> ConfigError:
        return ConfigError(_redact(f"--database is not a valid PostgreSQL URL: {reason}", url))

    try:
        parsed = parse_dsn(url)
        urlsplit(url).port
    except (ProgrammingError, ValueError) as e:
        raise refuse(" ".join(str(e).split())) from None
    if not parsed.get("dbname"):
        raise refuse("it names no database")


def _check_origin(origin: str) -> None:
    parts = urlsplit(origin)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
    ):
        raise ConfigError(
            f"--cors-origin {origin!r} is not an origin such as https://app.example.com"
        )


# RFC 7064 / RFC 7065 URIs: scheme, host, optional port and transport.
_ICE_URL = re.compile(r"^(stuns?|turns?):[A-Za-z0-9.\-\[\]:]+(\?transport=(udp|tcp))?$")


def validate(config: Config) -> None:
    if not config.listen:
        raise ConfigError("at least one --listen endpoint is required")
    for description in config.listen:
        _check_endpoint(description)
    for description in config.metrics_listen:
        _check_endpoint(description, "--metrics-listen")
    if config.database:
        if is_postgres_url(config.database):
            _check_postgres_url(config.database)
        elif "://" in config.database:
            scheme = config.database.split("://", 1)[0]
            raise ConfigError(
                f"--database: {scheme}:// URLs are not supported; give a SQLite "
                "path or a postgresql:// URL"
            )
    if not config.data_dir:
        raise ConfigError("--data-dir must not be empty")
    if not 1024 <= config.max_body <= 1024 * MiB:
        raise ConfigError("--max-body must be between 1KiB and 1GiB")
    for origin in config.cors_origin:
        _check_origin(origin)
    for url in config.public_url:
        try:
            normalize_origin(url)
        except ValueError as e:
            raise ConfigError(
                f"--public-url {url!r} is not the URL of this server such as "
                f"https://chat.example.com: {e}") from None
    for proxy in config.trusted_proxy:
        if proxy == "unix":
            continue
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"--trusted-proxy {proxy!r} is not an IP address, a network or 'unix'"
            ) from None
    if not 1 <= config.db_pool_size <= 500:
        raise ConfigError("--db-pool-size must be between 1 and 500")
    if not 60 <= config.token_lifetime <= 365 * 86400:
        raise ConfigError("--token-lifetime must be between 1m and 365d")
    if not 1024 <= config.max_payload <= 1024 * MiB:
        raise ConfigError("--max-payload must be between 1KiB and 1GiB")
    if config.max_history_backup:
        room = history_backup_room(config.max_body)
        if not 1024 <= config.max_history_backup <= room:
            raise ConfigError(
                f"--max-history-backup must be between 1KiB and {room} bytes: its base64 (4/3 "
                f"of it) and {HISTORY_BACKUP_FRAMING} bytes of JSON must fit in --max-body "
                f"({config.max_body} bytes)")
    if not 0 <= config.retention_days <= 100_000:
        raise ConfigError("--retention-days must be 0 (keep) or a number of days")
    if not 1024 <= config.max_attachment <= 64 * 1024 * MiB:
        raise ConfigError("--max-attachment must be between 1KiB and 64GiB")
    if not config.max_attachment <= config.attachment_quota <= 2**62:
        raise ConfigError("--attachment-quota must be at least --max-attachment")
    for prefix in config.push_allow_endpoint:
        parts = urlsplit(prefix)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--push-allow-endpoint {prefix!r} is not a URL prefix such as "
                              "http://127.0.0.1:8088")
    if config.push_contact and not re.match(r"^(mailto:[^\s@]+@[^\s@]+|https://\S+)$",
                                            config.push_contact):
        raise ConfigError(f"--push-contact {config.push_contact!r} is not a mailto: or https: URL")
    if config.push_gateway_url:
        parts = urlsplit(config.push_gateway_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--push-gateway-url {config.push_gateway_url!r} is not a URL such as "
                              "https://push.example.org")
        if not config.push_gateway_secret:
            raise ConfigError("push_gateway_url needs push_gateway_secret")
    for secret in config.push_gateway_accept:
        if len(secret) < 32:
            raise ConfigError("each of push_gateway_accept must be at least 32 characters long")
    if config.apns_key_file and not (config.apns_key_id and config.apns_team_id):
        raise ConfigError("apns_key_file needs apns_key_id and apns_team_id")
    for name in ("apns_endpoint", "apns_sandbox_endpoint"):
        value = getattr(config, name)
        if value and (urlsplit(value).scheme != "https" or not urlsplit(value).hostname):
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not an https URL")
    if config.fcm_endpoint:
        parts = urlsplit(config.fcm_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--fcm-endpoint {config.fcm_endpoint!r} is not a URL")
    if config.attachment_store == "s3":
        if not config.s3_bucket:
            raise ConfigError("attachment_store = s3 needs s3_bucket")
        if not (config.s3_access_key_id and config.s3_secret_access_key):
            raise ConfigError("attachment_store = s3 needs s3_access_key_id and s3_secret_access_key "
                              "(in the configuration file or the environment, never the command line)")
    if config.s3_endpoint:
        endpoint = urlsplit(config.s3_endpoint)
        if endpoint.scheme not in ("http", "https") or not endpoint.hostname or endpoint.path not in ("", "/"):
            raise ConfigError(f"--s3-endpoint {config.s3_endpoint!r} is not a URL such as "
                              "https://minio.internal:9000")
    if config.rate_limit_attachment_bytes[0] * MiB < config.max_attachment:
        raise ConfigError("--rate-limit-attachment-bytes must allow at least one upload of "
                          "--max-attachment (its COUNT is in MiB)")
    if not 1 <= config.max_pending_uploads <= 10_000:
        raise ConfigError("--max-pending-uploads must be between 1 and 10000")
    if not 60 <= config.upload_expiry <= 30 * 86400:
        raise ConfigError("--upload-expiry must be between 1m and 30d")
    if not 0 <= config.attachment_retention_days <= 100_000:
        raise ConfigError("--attachment-retention-days must be 0 (keep) or a number of days")
    if not 0 <= config.envelope_retention_days <= 100_000:
        raise ConfigError("--envelope-retention-days must be 0 (keep) or a number of days")
    if not 0 <= config.max_connections <= 10_000_000:
        raise ConfigError("--max-connections must be 0 (from the open-file limit) or a number of connections")
    if not 0 <= config.max_connections_per_address <= 10_000_000:
        raise ConfigError("--max-connections-per-address must be 0 (no cap) or a number of connections")
    if not 0 <= config.realtime_pending_sessions <= 1_000_000:
        raise ConfigError("--realtime-pending-sessions must be 0 (no cap) or a number of sessions")
    for name in ("ping_interval", "ping_timeout", "connect_timeout", "shutdown_timeout",
                 "request_timeout"):
        if not 1 <= getattr(config, name) <= 3600:
            raise ConfigError(f"--{name.replace('_', '-')} must be between 1s and 1h")
    if not config.max_body <= config.realtime_buffer <= 64 * 1024 * MiB:
        raise ConfigError("--realtime-buffer must be at least --max-body")
    if not 1 <= config.max_prekeys <= 100_000:
        raise ConfigError("--max-prekeys must be between 1 and 100000")
    if not 1 <= config.max_devices <= 100:
        raise ConfigError("--max-devices must be between 1 and 100")
    if not 100 <= config.cache_entries <= 100_000_000:
        raise ConfigError("--cache-entries must be between 100 and 100000000")
    if not 1000 <= config.rate_limit_keys <= 100_000_000:
        raise ConfigError("--rate-limit-keys must be between 1000 and 100000000")
    for setting in SETTINGS:
        if setting.kind == "rate":
            count, period = getattr(config, setting.name)
            if count < 1 or period < 1:
                raise ConfigError(f"--{setting.option}: a rate needs a count and a period of at least 1")
    for url in config.stun_urls:
        if not _ICE_URL.match(url) or not url.startswith("stun"):
            raise ConfigError(f"--stun-urls {url!r} is not a stun: or stuns: URL such as stun:stun.example.com:3478")
    for url in config.turn_urls:
        if not _ICE_URL.match(url) or not url.startswith("turn"):
            raise ConfigError(f"--turn-urls {url!r} is not a turn: or turns: URL such as turn:turn.example.com:3478")
    if config.turn_urls and not config.turn_secret:
        raise ConfigError("turn_urls needs turn_secret (the TURN server's static-auth-secret)")
    if not 60 <= config.turn_ttl <= 30 * 86400:
        raise ConfigError("--turn-ttl must be between 1m and 30d")
    for name in ("jwt_secret", "fingerprint_key", "totp_key", "turn_secret", "admin_token",
                 "push_vapid_key", "push_gateway_secret"):
        value = getattr(config, name)
        if value and len(value) < 32:
            raise ConfigError(f"{name} must be at least 32 characters long")


def cli_settings() -> list[Setting]:
    return [s for s in SETTINGS if s.cli]


def default_value(setting: Setting) -> Any:
    return {f.name: f.default for f in fields(Config)}[setting.name]


def describe_default(setting: Setting) -> str:
    value = default_value(setting)
    if setting.name == "database":
        return "DATA_DIR/cyphr.sqlite3"
    if setting.name == "node_id":
        return "hostname:pid"
    if setting.kind == "list":
        return ", ".join(value) if value else "none"
    if setting.kind == "bool":
        return "on" if value else "off"
    if setting.name == "max_history_backup":
        value = HISTORY_BACKUP_DEFAULT
    if setting.kind == "size":
        return f"{value // MiB}MiB" if value % MiB == 0 else str(value)
    if setting.kind == "duration":
        return format_duration(value)
    if setting.kind == "rate":
        return f"{value[0]}/{format_duration(value[1])}"
    if setting.name in ("turn_secret", "admin_token", "s3_access_key_id", "s3_secret_access_key",
                        "s3_bucket"):
        return "none"
    if setting.name == "s3_endpoint":
        return "AWS"
    if setting.name == "push_contact":
        return "the first public_url"
    if setting.name in ("fcm_credentials", "push_gateway_url", "push_gateway_secret",
                        "push_gateway_accept", "apns_key_file", "apns_key_id", "apns_team_id",
                        "apns_topic"):
        return "none"
    if setting.name == "apns_endpoint":
        return "https://api.push.apple.com"
    if setting.name == "apns_sandbox_endpoint":
        return "https://api.sandbox.push.apple.com"
    if setting.name == "apns_ca_file":
        return "the system's"
    if setting.name == "fcm_endpoint":
        return "https://fcm.googleapis.com"
    return str(value) if value != "" else "generated"

