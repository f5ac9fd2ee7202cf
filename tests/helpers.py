"""Test helpers: configurations, servers on either engine, in-process HTTP."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater

from cyphr.api.http import CyphrSite, HttpPolicy
from cyphr.clock import now_ms
from cyphr.config import Config, validate
from cyphr.server import Server, build_server
from cyphr.signing import normalize_origin
from tests import postgres, sqlite_template


# The test process's full garbage collections (of every object: some
# 500,000 by the end of a run, a fifth of a second each) come ten times
# less often than Python's default: one per 100 collections of the middle
# generation, not 10 (30 of them cost about 6 s of a run). The young
# generations are collected as usual.
gc.set_threshold(*gc.get_threshold()[:2], 100)


def make_config(testcase: Any, **overrides: Any) -> Config:
    """A valid configuration with a data directory of the test's own and an
    ephemeral port on 127.0.0.1."""
    values: dict[str, Any] = {
        "listen": ("tcp:0:interface=127.0.0.1",),
        "data_dir": testcase.mktemp(),
        # A test's server needs few PostgreSQL connections; each costs a
        # connect and a close.
        "db_pool_size": 3,
    }
    values.update(overrides)
    config = Config(**values)
    validate(config)
    return config


class SQLiteMixin:
    """Runs the test class on the embedded SQLite engine."""

    engine = "sqlite"

    def database_setting(self) -> str:
        return ""

    def migrated_data_dir(self) -> str:
        """A fresh data directory of the test's own whose database is
        already at the code's schema version (a copy of a template migrated
        once per test process): for tests of what a started server does,
        not of migrating."""
        return sqlite_template.migrated_data_dir(os.path.abspath(self.mktemp()))


class PostgresMixin:
    """Runs the test class on a fresh database in the throwaway cluster."""

    engine = "postgresql"

    def database_setting(self) -> str:
        return postgres.database_url()

    def migrated_database_setting(self) -> str:
        return postgres.migrated_database_url(self)


def run_inline(testcase: Any) -> None:
    """Until the test ends, the SQLite engine and the CPU pool do their work
    at once on the calling thread (their test switches, as tahoe-lafs's
    CPU pool has one): an in-process request is then answered within one
    pump of the in-memory connection, with no thread hop and no real time.
    For tests of rules; tests of concurrency keep the threads."""
    from cyphr import cpu
    from cyphr.db import sqlite

    previous = sqlite.run_inline_for_tests(True), cpu.run_inline_for_tests(True)

    def restore() -> None:
        sqlite.run_inline_for_tests(previous[0])
        cpu.run_inline_for_tests(previous[1])
    testcase.addCleanup(restore)


async def autobahn_timers_run() -> None:
    """Run now the batched timers Autobahn keeps for WebSocket connections
    that are gone (a close handshake's timeout, 5 s, started by a stop
    whose peer had already vanished): they do nothing but would still be
    pending when the test ends, and make trial call the reactor unclean."""
    for call in reactor.getDelayedCalls():
        if getattr(call.func, "__name__", "") == "_notify_bucket" and call.active():
            call.reset(0)
    for _ in range(100):
        if not any(getattr(call.func, "__name__", "") == "_notify_bucket"
                   for call in reactor.getDelayedCalls()):
            return
        await deferLater(reactor, 0.01, lambda: None)


async def start_server(testcase: Any, *, serve: bool = False, clock: Any = None,
                       inline: bool = False, **overrides: Any) -> Server:
    """
    A server on the test class's engine, with its database started and
    migrated. With ``serve`` the whole service runs (real ports); the test
    then finds the ports with ``server.listening()``. With ``clock`` (a
    task.Clock), the server reads time from it, so tests can move time;
    the database still runs on the real reactor. With ``inline``, the SQLite
    engine and CPU pool run on the calling thread (``run_inline``). A
    PostgreSQL database, or a SQLite data directory, starts with a copy of a
    database already migrated (the server would migrate it first thing; a
    copy is cheaper). Everything is stopped when the test ends.
    """
    if inline:
        run_inline(testcase)
    if "database" not in overrides:
        if "data_dir" not in overrides and hasattr(testcase, "migrated_data_dir"):
            # SQLite: the database a server finds in its data directory.
            overrides["data_dir"] = testcase.migrated_data_dir()
        setting = getattr(testcase, "migrated_database_setting", testcase.database_setting)
        overrides["database"] = setting()
    config = make_config(testcase, **overrides)
    fatal: list[str] = []
    server = build_server(config, reactor, clock=clock, on_fatal=fatal.append)
    server.fatal_messages = fatal  # type: ignore[attr-defined]
    if serve:
        # Cleanups run last first: this one after the service has stopped.
        testcase.addCleanup(autobahn_timers_run)
        server.service.startService()
        testcase.addCleanup(server.service.stopService)
    else:
        server.database.start()
        testcase.addCleanup(lambda: Deferred.fromCoroutine(server.database.close()))
        testcase.addCleanup(server.cpu.stop)
    await server.database.when_ready()
    return server


class JsonCalls:
    """The calls tests make, over whatever ``request`` sends with.
    ``origin`` is the server's origin as a client reaching it signs it, and
    ``now_ms()`` the server's time (what a client's clock would say), so
    that tests.users.User can build statements and key validity."""

    origin: str
    clock: Any = reactor

    def now_ms(self) -> int:
        return now_ms(self.clock)

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def get(self, url: str, **kwargs: Any) -> Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, body: Any = None, **kwargs: Any) -> Response:
        return await self.request("POST", url, **self._json(body, kwargs))

    async def put(self, url: str, body: Any = None, **kwargs: Any) -> Response:
        return await self.request("PUT", url, **self._json(body, kwargs))

    async def delete(self, url: str, body: Any = None, **kwargs: Any) -> Response:
        return await self.request("DELETE", url, **self._json(body, kwargs))

    @staticmethod
    def _json(body: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if body is not None:
            kwargs["data"] = json.dumps(body).encode("utf-8")
            headers = kwargs.setdefault("headers", {})
            headers.setdefault(b"Content-Type", [b"application/json"])
        return kwargs


class InProcessHTTP(JsonCalls):
    """
    treq's StubTreq over the server's root resource, with a Site built by
    the same class and policy as the real one (so body limits, headers and
    CORS are those of production). Answers may wait on the database thread
    or PostgreSQL, so each request pumps the in-memory connection until the
    answer is complete.
    """

    # A loopback origin: a server without public_url accepts statements for it.
    base_url = "http://127.0.0.1"

    def __init__(self, root: Any, policy: HttpPolicy, clock: Any = None) -> None:
        self.origin = normalize_origin(self.base_url)
        if clock is not None:
            self.clock = clock
        self._stub = StubTreq(root)
        agent = self._stub._agent
        agent._serverFactory = CyphrSite(root, policy, agent._memoryReactor)
        self._in_flight = 0
        self._pump: LoopingCall | None = None
        self._soon: Any = None
        self._flush_when_the_server_writes(agent._serverFactory)

    def _flush_when_the_server_writes(self, site: CyphrSite) -> None:
        """An answer that waited (on the database thread, PostgreSQL, the
        CPU pool) is moved to the client at once when the server writes or
        closes, not at the pump's next tick: a request costs its work, not
        a millisecond of waiting per step. The pump stays, for anything
        else."""
        build = site.buildProtocol

        def buildProtocol(addr: Any) -> Any:
            protocol = build(addr)
            make = protocol.makeConnection

            def makeConnection(transport: Any) -> None:
                for name in ("write", "loseConnection", "abortConnection"):
                    setattr(transport, name, self._then_flush(getattr(transport, name)))
                make(transport)
            protocol.makeConnection = makeConnection
            return protocol
        site.buildProtocol = buildProtocol  # type: ignore[method-assign]

    def _then_flush(self, f: Any) -> Any:
        def call(*args: Any) -> Any:
            result = f(*args)
            if self._in_flight and self._soon is None:
                self._soon = reactor.callLater(0, self._flush_now)
            return result
        return call

    def _flush_now(self) -> None:
        self._soon = None
        self._stub.flush()

    @classmethod
    def for_server(cls, server: Server) -> InProcessHTTP:
        return cls(server.root, server.site.policy, server.clock)

    async def _settle(self, d: Deferred[Any]) -> Any:
        # One pump serves every request in flight: pumping per request would
        # cost O(requests^2) when many run at once.
        self._in_flight += 1
        if self._pump is None:
            self._pump = LoopingCall(self._stub.flush)
            self._pump.start(0.001, now=True)
        try:
            return await d
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._pump is not None:
                self._pump.stop()
                self._pump = None
                if self._soon is not None:
                    self._soon.cancel()
                    self._soon = None

    async def request(self, method: str, url: str, **kwargs: Any) -> Response:
        if not url.startswith("http"):
            url = self.base_url + url
        response = await self._settle(self._stub.request(method, url, **kwargs))
        body = await self._settle(self._stub.content(response))
        return Response(response, body)


class RealHTTP(JsonCalls):
    """
    treq over a real port, with InProcessHTTP's calls (so tests.users.User
    works with it). ``close()`` (added as a cleanup by ``for_port``) waits
    until its kept-alive connections are closed.
    """

    def __init__(self, base_url: str, agent_options: dict[str, Any] | None = None,
                 clock: Any = None) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self.base_url = base_url
        self.origin = normalize_origin(base_url)
        if clock is not None:
            self.clock = clock
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._client = HTTPClient(Agent(reactor, pool=self._pool, **(agent_options or {})))

    @classmethod
    def for_port(cls, testcase: Any, port: int, scheme: str = "http",
                 agent_options: dict[str, Any] | None = None, clock: Any = None) -> RealHTTP:
        http = cls(f"{scheme}://127.0.0.1:{port}", agent_options, clock)
        testcase.addCleanup(http.close)
        return http

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()

    async def request(self, method: str, url: str, **kwargs: Any) -> Response:
        if not url.startswith("http"):
            url = self.base_url + url
        response = await self._client.request(method, url, **kwargs)
        body = await response.content()
        return Response(response, body)


class Response:
    """An answer, read whole."""

    def __init__(self, response: Any, body: bytes) -> None:
        self.code = response.code
        self.headers = response.headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def wait_for_sockets(server: Server, user: str, sockets: int, timeout: float = 60) -> None:
    """From a thread off the reactor (where subprocess clients are driven),
    block until ``user`` has at least ``sockets`` welcomed sockets on
    ``server``: the barrier that a client is listening, instead of a sleep
    guessed long enough for it to start and connect."""
    import time

    from twisted.internet.threads import blockingCallFromThread

    def count() -> int:
        return len(server.realtime.presence.sockets(user))

    deadline = time.monotonic() + timeout
    while blockingCallFromThread(reactor, count) < sockets:
        if time.monotonic() > deadline:
            raise AssertionError(f"{user} did not get {sockets} sockets in {timeout} s")
        time.sleep(0.02)


def fixed_clock() -> Any:
    """A task.Clock set to a plausible present (2026-09-21T14:13:20Z), for servers whose time tests move."""
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1_790_000_000)
    return clock


def with_config(config: Config, **changes: Any) -> Config:
    config = replace(config, **changes)
    validate(config)
    return config


def run_cli_main(testcase: Any, *argv: str) -> tuple[int, str, str]:
    """cyphr-client's main in this process: its status, stdout and stderr."""
    import io

    from cyphr.client import cli

    out, err = io.StringIO(), io.StringIO()
    testcase.patch(sys, "stdout", out)
    testcase.patch(sys, "stderr", err)
    try:
        status = cli.main(list(argv))
    finally:
        testcase.patch(sys, "stdout", sys.__stdout__)
        testcase.patch(sys, "stderr", sys.__stderr__)
    return status, out.getvalue(), err.getvalue()


def cli_in_process(argv: list[str], *, stdin: str = "",
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """What ``cyphr-client ARGV`` run as a script does (standard input no
    terminal, holding ``stdin``; ``env`` added to the environment), through
    cli.main in this process: its status and what it wrote. Call it off the
    reactor thread (the client blocks) and one at a time: it swaps the
    process's standard streams and environment while it runs. For tests
    whose subject is what a command does, not the process that runs it."""
    import io

    from cyphr.client import cli

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    # Only the variables given change (other threads may read the rest).
    before = {name: os.environ.get(name) for name in env or {}}
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    os.environ.update(env or {})
    try:
        status = cli.main(list(argv))
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(["cyphr-client", *argv], status, out.getvalue(),
                                       err.getvalue())


# A client process as the tests run one: cyphr-client's entry point with
# the tests' cheap vault key derivation (tests/client_process.py). Run it
# from the repository's root (cwd) or with it on PYTHONPATH.
CLIENT = (sys.executable, "-m", "tests.client_process")


def finish(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``process.communicate(timeout)`` for a client process (CLIENT); one
    that has not ended by then is made to write every thread's stack to
    stderr (tests/client_process.py) and killed, and the test fails with
    that stack, so a hang in CI says where it is."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(1)
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"{' '.join(map(str, process.args))} did not end within "
                             f"{timeout} s; its stderr, with its threads' stacks:\n{err}"
                             ) from None
