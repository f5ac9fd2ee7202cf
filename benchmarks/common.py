"""
What the HTTP benchmarks share: keep-alive HTTP/1.1 connections on asyncio,
and Cyphr server processes on a throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import postgres  # noqa: E402
from cyphr.signing import RECOVER, REGISTER  # noqa: E402
from tests.users import User  # noqa: E402


class Connection:
    """One keep-alive HTTP/1.1 connection, JSON in and out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
        return await self.request("POST", path, body, token=token)

    async def request(self, method: str, path: str, body: dict,
                      token: str | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value:
                chunked = True
        if chunked:
            payload = b""
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                if size == 0:
                    await self.reader.readline()
                    break
                payload += await self.reader.readexactly(size)
                await self.reader.readline()
        else:
            payload = await self.reader.readexactly(length)
        return status, json.loads(payload)

    def close(self) -> None:
        self.writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = await Connection.open(port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        conn.writer.write(b"GET /api/health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        answer = await conn.reader.read()
        conn.close()
        if b" 200 " in answer.split(b"\r\n", 1)[0]:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the server did not become ready")


async def register(port: int, user: User) -> str:
    """Register ``user`` as a v2 client does (a signed statement for the
    origin it reaches, a signed key binding); its session token."""
    conn = await Connection.open(port)
    user.origin = f"http://127.0.0.1:{port}"
    try:
        _, challenge = await conn.post("/api/cyphr-id/challenge", {"cyphrId": user.cyphr_id})
        raw = base64.b64decode(challenge["challenge"])
        statement = user.statement(REGISTER, challenge["challengeId"], raw)
        status, body = await conn.post("/api/cyphr-id/register", {
            "cyphrId": user.cyphr_id,
            "publicKey": base64.b64encode(user.public_key).decode(),
            **user.main_key_fields(),
            "deviceFingerprint": user.fingerprint,
            "challengeId": challenge["challengeId"],
            **user.proof(statement),
        })
        if status != 201:
            raise RuntimeError(f"registration failed: {status} {body}")
        return body["token"]
    finally:
        conn.close()


async def recover(port: int, user: User, fingerprint: str) -> tuple[str, int]:
    """Add a device of fingerprint ``fingerprint`` to the registered
    ``user`` by recovery, keeping its other devices (the device takes the
    key of device 1, as a recovery without a key does); the new device's
    token and deviceId."""
    conn = await Connection.open(port)
    user.origin = f"http://127.0.0.1:{port}"
    try:
        _, challenge = await conn.post("/api/cyphr-id/challenge", {"cyphrId": user.cyphr_id})
        raw = base64.b64decode(challenge["challenge"])
        statement = user.statement(RECOVER, challenge["challengeId"], raw, fingerprint=fingerprint)
        status, body = await conn.post("/api/cyphr-id/recover", {
            "cyphrId": user.cyphr_id,
            "newDeviceFingerprint": fingerprint,
            "keepOtherDevices": True,
            "challengeId": challenge["challengeId"],
            **user.proof(statement),
        })
        if status != 200:
            raise RuntimeError(f"recovery failed: {status} {body}")
        return body["token"], body["deviceId"]
    finally:
        conn.close()


class Servers(list):
    """The servers' ports, in process order (what callers index), and what
    a benchmark may watch: the servers' process ids, the database's
    postmaster (None on SQLite) and its URL (empty on SQLite)."""

    pids: list[int]
    postgres_pid: int | None = None
    database: str = ""


@asynccontextmanager
async def cyphr_servers(processes: int, pool: int, extra: list[str],
                        profile: str | None = None, *, sqlite: bool = False,
                        env: dict[str, str] | None = None,
                        log: str | None = None) -> AsyncIterator[Servers]:
    """``processes`` twistd processes on one throwaway database; their ports.
    With ``sqlite`` one process on an embedded SQLite file instead; ``env``
    adds to the servers' environment; ``log`` is a path prefix for their
    output (``<log>.<number>``), discarded otherwise."""
    if sqlite and processes != 1:
        raise ValueError("SQLite serves one process only")
    cluster = None if sqlite else postgres.new_cluster()
    running: list[subprocess.Popen[bytes]] = []
    data_dir = ""
    try:
        url = cluster.create_database() if cluster is not None else ""
        ports = Servers(free_port() for _ in range(processes))
        ports.pids, ports.database = [], url
        if cluster is not None:
            with open(os.path.join(cluster.datadir, "postmaster.pid")) as f:
                ports.postgres_pid = int(f.readline())
        data_dir = tempfile.mkdtemp(prefix="cyphr-bench-")
        env = {**os.environ, "PYTHONPATH": ROOT,
               # The same secrets for every process, as in a cluster.
               "CYPHR_JWT_SECRET": hashlib.sha256(b"bench-jwt").hexdigest(),
               "CYPHR_FINGERPRINT_KEY": hashlib.sha256(b"bench-fp").hexdigest(),
               "CYPHR_TOTP_KEY": hashlib.sha256(b"bench-totp").hexdigest(),
               "CYPHR_PUSH_VAPID_KEY": hashlib.sha256(b"bench-vapid").hexdigest(),
               **(env or {})}
        for number, port in enumerate(ports):
            output = open(f"{log}.{number}", "wb") if log else subprocess.DEVNULL
            running.append(subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=",
                 *(["--profile", f"{profile}.{number}", "--profiler", "cprofile", "--savestats"]
                   if profile else []),
                 "cyphr", "--listen", f"tcp:{port}:interface=127.0.0.1",
                 *(["--database", url] if url else []),
                 "--data-dir", data_dir, "--node-id", f"bench-{number}",
                 "--rate-limit-auth", "100000000/1s", "--db-pool-size", str(pool),
                 # Every load client comes from 127.0.0.1: no per-address caps.
                 "--max-connections-per-address", "1000000",
                 "--realtime-handshake-rate", "100000000/1s", "--realtime-pending-sessions", "0",
                 *extra],
                env=env, stdout=output, stderr=subprocess.STDOUT if log else subprocess.DEVNULL))
            if not isinstance(output, int):
                output.close()  # the child holds its own copy
            ports.pids.append(running[-1].pid)
            await wait_ready(port)
        yield ports
    finally:
        for server in running:
            server.send_signal(signal.SIGTERM)
        for server in running:
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        if cluster is not None:
            cluster.destroy()
        if data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


# -- CPU time of processes, from /proc ---------------------------------------------

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc/PID/stat after the command name (which may
    hold spaces), or None once the process is gone."""
    try:
        with open(path) as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def cpu_times(pid: int) -> tuple[float, float]:
    """A process's CPU time so far: user plus system, and system alone (the
    kernel's share on its behalf: system calls, socket reads and writes);
    (0, 0) once it is gone."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        return 0.0, 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK, int(fields[12]) / CLOCK_TICK


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (0 once it is gone)."""
    return cpu_times(pid)[0]


def family_cpu_seconds(parent: int) -> float:
    """CPU time of a process and its children (PostgreSQL's backends)."""
    total = cpu_seconds(parent)
    for stat in glob.glob("/proc/[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields is not None and int(fields[1]) == parent:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICK
    return total


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def run_loop(main: object) -> None:
    try:
        # The clients share the machine with the server: the cheaper they are,
        # the closer the figure comes to the server's own capacity.
        import uvloop
    except ImportError:
        asyncio.run(main)  # type: ignore[arg-type]
    else:
        uvloop.run(main)  # type: ignore[arg-type]
