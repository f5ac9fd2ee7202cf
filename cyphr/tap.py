"""
``twistd cyphr``: the command line options and makeService.

Every option is also a TOML key (``--config``) and a CYPHR_* environment
variable; the command line wins over the environment, which wins over the
file, which wins over the defaults (cyphr.config).
"""

from __future__ import annotations

import atexit
import gc
import os
import resource
import sys
from typing import Any, Callable

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

import cyphr
from cyphr.config import (
    SETTINGS,
    SETTINGS_BY_NAME,
    ConfigError,
    Setting,
    cli_settings,
    describe_default,
    load_config,
)
from cyphr.db import UnusableDatabase, preflight

_log = Logger()


def _help(setting: Setting) -> str:
    return f"{setting.help} [default: {describe_default(setting)}; env {setting.env}]"


def _secrets_help() -> str:
    """Where the secrets come from, for --help: they are no options, so
    that they stay out of the process list and the shell's history."""
    names = [s for s in SETTINGS if not s.cli]
    generated = ("jwt_secret", "fingerprint_key", "totp_key", "push_vapid_key")
    return (
        "Secrets are not command-line options, so that they stay out of the process list "
        "and shell history: set " + ", ".join(s.name for s in names) + " in the --config "
        "file or as " + ", ".join(s.env for s in names) + ". Those of "
        + ", ".join(generated) + " not set are generated at first start into the data "
        "directory (DATA_DIR/<name>.secret, mode 0600) and read from there afterwards; "
        "every node of a cluster needs the same ones. turn_secret and admin_token have no "
        "default: without them, no TURN server is handed out and the admin route answers 404."
    )


def _repeatable(setting: Setting) -> Any:
    def opt(self: Options, value: str) -> None:
        self.repeated.setdefault(setting.name, []).append(value)

    opt.__doc__ = _help(setting)
    return opt


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve the Cyphr API (HTTP and Socket.IO) on the given endpoints. With "
        "no options: HTTP on tcp:3001 and an embedded SQLite database in "
        "./cyphr-data/. Every option can also be set in the TOML file given "
        "with --config, or as a CYPHR_* environment variable; the command line "
        "wins over the environment, which wins over the file. " + _secrets_help()
    )

    optParameters = [
        ["config", "c", None,
         "TOML file of settings, keys named like the options with underscores "
         "[env CYPHR_CONFIG]"],
    ] + [
        [s.option, None, None, _help(s)]
        for s in cli_settings()
        if s.kind not in ("list", "bool")
    ]
    optFlags = [[s.option, None, _help(s)] for s in cli_settings() if s.kind == "bool"]

    opt_listen = _repeatable(SETTINGS_BY_NAME["listen"])
    opt_metrics_listen = _repeatable(SETTINGS_BY_NAME["metrics_listen"])
    opt_cors_origin = _repeatable(SETTINGS_BY_NAME["cors_origin"])
    opt_public_url = _repeatable(SETTINGS_BY_NAME["public_url"])
    opt_trusted_proxy = _repeatable(SETTINGS_BY_NAME["trusted_proxy"])
    opt_stun_urls = _repeatable(SETTINGS_BY_NAME["stun_urls"])
    opt_turn_urls = _repeatable(SETTINGS_BY_NAME["turn_urls"])
    opt_push_allow_endpoint = _repeatable(SETTINGS_BY_NAME["push_allow_endpoint"])

    def __init__(self) -> None:
        super().__init__()
        self.repeated: dict[str, list[str]] = {}
        self.environ: dict[str, str] = dict(os.environ)
        self.config = None

    def opt_version(self) -> None:
        """Show the versions of Cyphr and Twisted, and exit."""
        from twisted import copyright

        print(f"Cyphr {cyphr.__version__} (Twisted {copyright.version}, "
              f"Python {sys.version.split()[0]})")
        sys.exit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        # One line on what is wrong, rather than the whole usage text.
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"cyphr: {e}\nRun 'twistd cyphr --help' for the options.") from None

    def postOptions(self) -> None:
        given: dict[str, Any] = {}
        for setting in cli_settings():
            if setting.kind == "list":
                if setting.name in self.repeated:
                    given[setting.name] = tuple(self.repeated[setting.name])
            elif setting.kind == "bool":
                if self[setting.option]:
                    given[setting.name] = True
            elif self[setting.option] is not None:
                given[setting.name] = self[setting.option]
        self.config = load_config(given, self.environ, self["config"])


# Each realtime client holds a socket, and each socket is a file: below this
# many, a busy server refuses connections with EMFILE long before it runs
# out of CPU or memory.
OPEN_FILES_WANTED = 4096


def raise_open_file_limit(wanted: int = OPEN_FILES_WANTED) -> int | None:
    """Raise the soft limit on open files to the hard limit, and warn when
    even that is below ``wanted``. Answers the soft limit now in force
    (None when it cannot be read)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError) as e:
        _log.warn("Could not read the open file limit: {error}", error=e)
        return None
    target = hard
    if hard == resource.RLIM_INFINITY:
        # "Unlimited" is not a value the kernel takes for a soft limit on
        # open files (fs.nr_open caps it); 2**20 is its usual cap.
        target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            _log.warn("Could not raise the open file limit from {soft} to {target}: {error}",
                      soft=soft, target=target, error=e)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        _log.warn(
            "The open file limit is {limit}, below the {wanted} a busy server needs (one per "
            "connection): raise it with LimitNOFILE=65536 in the systemd unit, or 'ulimit -n "
            "65536' (as allowed by the hard limit) before starting",
            limit=soft, wanted=wanted)
    else:
        _log.info("Open file limit: {limit}", limit=soft)
    return soft


GC_YOUNG = 10_000  # net allocations between young-generation collections (Python's: 700)


def freeze_startup_objects() -> int:
    """Move every object alive now (modules, classes, the server built at
    start) out of reach of the cyclic garbage collector, which would
    otherwise walk them all again in each full collection: a pause of tens
    of milliseconds in the reactor, every few seconds under load; and
    collect the young generation less often. Answers how many were frozen."""
    gc.collect()
    gc.freeze()
    # A young-generation collection every GC_YOUNG net allocations rather
    # than Python's 700: each message makes short-lived containers that
    # mostly die before a collection would look at them. At 6,000 messages
    # a second the collector then takes 0.1 s in 25 rather than 0.3 s (about
    # 2.5 µs a message), in pauses of a few milliseconds.
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
    return gc.get_freeze_count()


def _exit_status_1() -> None:
    # twistd exits 0 whenever its reactor stops; by now it has stopped the
    # service, removed its pid file and closed its log. What is buffered is
    # written out; atexit handlers registered before this one are skipped.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(1)


def stop_and_fail(reactor: Any) -> Callable[[str], None]:
    """``on_fatal`` under twistd, for what makes the server refuse to go on
    once the reactor runs (a database newer than the code, secrets that
    differ from the other nodes', a port taken meanwhile): one critical
    line, a clean stop, and exit status 1, so that systemd and scripts see
    a failure."""
    failed: list[str] = []

    def fatal(message: str) -> None:
        _log.critical("Cyphr cannot go on: {message}", message=message)
        if failed:
            return
        failed.append(message)
        atexit.register(_exit_status_1)
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    return fatal


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor
    config = options.config
    # Before build_server: the cap on connections (max_connections) is read
    # from the limit now in force.
    raise_open_file_limit()
    # Imported here, not above: the server's modules take longer to import
    # than the rest of twistd's start, and `twistd cyphr --help` or a
    # refused option needs none of them.
    from cyphr.server import build_server

    try:
        preflight(config)
        server = build_server(config, reactor, on_fatal=stop_and_fail(reactor))
    except (ConfigError, UnusableDatabase) as e:
        raise SystemExit(f"cyphr: {e}") from None
    freeze_startup_objects()
    return server.service
