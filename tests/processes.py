"""
Cyphr server processes for the tests that run it as operators do:
``twistd -n cyphr`` in a subprocess, reached over real sockets; and a real
HTTP client (treq) with the interface of InProcessHTTP, so that
``tests.users.User`` registers through it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from twisted.internet.threads import deferToThread

from tests.helpers import JsonCalls, Response

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_environment(**extra: str) -> dict[str, str]:
    """The test's environment without CYPHR_* settings, with the repository
    importable (its twisted/plugins included) whether or not it is installed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYPHR_")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class CyphrProcess:
    """One ``twistd -n cyphr`` process; its output goes to ``<log>``."""

    def __init__(self, testcase: Any, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.args = ["--listen", f"tcp:{self.port}:interface=127.0.0.1", *args]
        self.env = env if env is not None else clean_environment()
        self.log = os.path.abspath(testcase.mktemp())
        self.process: subprocess.Popen[bytes] | None = None
        testcase.addCleanup(self.kill)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "cyphr", *self.args],
                cwd=os.path.dirname(self.log), env=self.env,
                stdout=output, stderr=subprocess.STDOUT)

    def output(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/api/health", timeout=2) as r:
                    if json.loads(r.read())["database"]["ok"]:
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"the server did not become ready:\n{self.output()}")

    async def started(self, timeout: float = 60) -> CyphrProcess:
        """Start and wait until /api/health answers with the database up."""
        self.start()
        await deferToThread(self._wait_ready, timeout)
        return self

    async def terminate(self, timeout: float = 60) -> int:
        """SIGTERM; wait for the exit and answer its status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await deferToThread(self.process.wait, timeout)

    def kill(self) -> None:
        """Cleanup: a process the test has not stopped is killed and reaped."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


class RealResponse(Response):
    def __init__(self, code: int, headers: dict[str, str], body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class UrllibHTTP(JsonCalls):
    """JSON over real HTTP (urllib, in a thread: each request on a
    connection of its own, closed before the answer is handed back), shaped
    like InProcessHTTP."""

    def __init__(self, base: str, context: Any = None) -> None:
        from cyphr.signing import normalize_origin

        self.base = base
        self.origin = normalize_origin(base)  # what a client reaching ``base`` signs
        self.context = context

    def _fetch(self, method: str, url: str, data: bytes | None,
               headers: dict[str, str]) -> RealResponse:
        request = urllib.request.Request(self.base + url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=20, context=self.context) as r:
                return RealResponse(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        except urllib.error.HTTPError as e:
            with e:
                return RealResponse(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())

    async def request(self, method: str, url: str, data: bytes | None = None,
                      headers: dict[bytes, list[bytes]] | None = None) -> RealResponse:
        flat = {k.decode(): v[0].decode() for k, v in (headers or {}).items()}
        return await deferToThread(self._fetch, method, url, data, flat)
