"""
build_server(config, reactor): the one way a Cyphr server is assembled.

The twistd plugin (cyphr.tap) and every test call it, so what is tested is
what runs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

import cyphr
from cyphr.api.health import HealthAPI
from cyphr.api.http import ApiRouter, CyphrSite, HttpPolicy, Root
from cyphr.config import Config
from cyphr.datadir import ServerSecrets, load_secrets, prepare_data_dir
from cyphr.db import Database, open_database
from cyphr.handlers.health import HealthHandler
from cyphr.logs import JsonLogObserver
from cyphr.store.status import StatusStore

_log = Logger()


class DatabaseService(Service):
    """Starts the database with the process (connecting, retrying and
    migrating in the background) and closes it last."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def startService(self) -> None:
        super().startService()
        self.database.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.database.close())


class CyphrService(MultiService):
    """The process: its listening endpoints and its database."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config

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
            "Cyphr {version} starting: listening on {endpoints}, database {database}",
            version=cyphr.__version__,
            endpoints=", ".join(self.config.listen),
            database=self.config.describe_database(),
        )
        super().startService()


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

    def listening(self) -> list[Deferred[Any]]:
        """The listening ports, once the service has started."""
        return [svc._waitingForPort for svc in self.endpoint_services]


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
    data_dir = prepare_data_dir(config.data_dir)
    secrets = load_secrets(config, data_dir)

    database = open_database(config, reactor)

    def fatal(message: str) -> None:
        _log.critical("Cyphr cannot go on: {message}", message=message)
        if reactor.running:
            reactor.stop()

    database.on_fatal = on_fatal or fatal

    status_store = StatusStore(database)
    health = HealthHandler(status_store, clock, node_id=config.node_id or default_node_id())

    router = ApiRouter([HealthAPI(health)])
    root = Root(router)
    site = CyphrSite(root, HttpPolicy.from_config(config), reactor)

    service = CyphrService(config)
    DatabaseService(database).setServiceParent(service)
    endpoint_services = []
    for description in config.listen:
        endpoint_service = StreamServerEndpointService(serverFromString(reactor, description), site)
        # Fail the start (with a clear message) rather than run deaf.
        endpoint_service._raiseSynchronously = True
        endpoint_service.setServiceParent(service)
        endpoint_services.append(endpoint_service)

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
    )
