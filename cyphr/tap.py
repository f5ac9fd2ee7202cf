"""
``twistd cyphr``: the command line options and makeService.

Every option is also a TOML key (``--config``) and a CYPHR_* environment
variable; the command line wins over the environment, which wins over the
file, which wins over the defaults (cyphr.config).
"""

from __future__ import annotations

import os
import resource
from typing import Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from cyphr.config import (
    SETTINGS_BY_NAME,
    ConfigError,
    Setting,
    cli_settings,
    describe_default,
    load_config,
)
from cyphr.db import UnusableDatabase, preflight
from cyphr.server import build_server

_log = Logger()


def _help(setting: Setting) -> str:
    return f"{setting.help} [default: {describe_default(setting)}; env {setting.env}]"


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
        "wins over the environment, which wins over the file."
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
    opt_trusted_proxy = _repeatable(SETTINGS_BY_NAME["trusted_proxy"])
    opt_stun_urls = _repeatable(SETTINGS_BY_NAME["stun_urls"])
    opt_turn_urls = _repeatable(SETTINGS_BY_NAME["turn_urls"])

    def __init__(self) -> None:
        super().__init__()
        self.repeated: dict[str, list[str]] = {}
        self.environ: dict[str, str] = dict(os.environ)
        self.config = None

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


def raise_open_file_limit() -> None:
    """Each socket is a file: let the process use all it may."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        _log.warn("Could not raise the open file limit: {error}", error=e)


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor
    config = options.config
    raise_open_file_limit()
    try:
        preflight(config)
        server = build_server(config, reactor)
    except (ConfigError, UnusableDatabase) as e:
        raise SystemExit(f"cyphr: {e}") from None
    return server.service
