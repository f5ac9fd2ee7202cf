"""
Challenge + login round trips a second, through the real HTTP stack, on
PostgreSQL.

    python benchmarks/login_throughput.py [--seconds 15] [--concurrency 64]
                                          [--users 200] [--processes 1] [--profile PATH]

Starts a throwaway PostgreSQL cluster (the tests' helper, fsync off) and
``twistd -n cyphr`` in --processes processes on one database, registers
--users users with real Ed25519 and ML-KEM-1024 keys, then runs
--concurrency clients over keep-alive connections, each looping: POST
/api/cyphr-id/challenge, sign it, POST /api/cyphr-id/login. Prints logins
a second, latency percentiles of a whole login (both requests), and any
failures. The clients run in this process on asyncio with hand-written
HTTP/1.1 (on uvloop when installed: ``pip install '.[bench]'``), to leave
as much CPU as possible to the server; on a 2-core machine they still share
it, so the figure is a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


from tests import postgres  # noqa: E402
from tests.users import User  # noqa: E402


class Connection:
    """One keep-alive HTTP/1.1 connection, JSON in and out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
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


async def register(port: int, user: User) -> None:
    conn = await Connection.open(port)
    try:
        _, challenge = await conn.post("/api/cyphr-id/challenge", {"cyphrId": user.cyphr_id})
        raw = base64.b64decode(challenge["challenge"])
        status, body = await conn.post("/api/cyphr-id/register", {
            "cyphrId": user.cyphr_id,
            "publicKey": base64.b64encode(user.public_key).decode(),
            "kyberPublicKey": base64.b64encode(user.kyber_key).decode(),
            "kyberKeySignature": user.kyber_signature(),
            "deviceFingerprint": user.fingerprint,
            "challengeId": challenge["challengeId"],
            "signature": user.sign(raw),
        })
        if status != 201:
            raise RuntimeError(f"registration failed: {status} {body}")
    finally:
        conn.close()


async def client(port: int, users: list[User], stop_at: float, latencies: list[float],
                 failures: list[str], index: int) -> None:
    conn = await Connection.open(port)
    n = index
    try:
        while time.monotonic() < stop_at:
            user = users[n % len(users)]
            n += 1
            started = time.perf_counter()
            status, challenge = await conn.post("/api/cyphr-id/challenge", {"cyphrId": user.cyphr_id})
            if status != 200:
                failures.append(f"challenge {status} {challenge.get('code')}")
                continue
            signature = user.signing_key.sign(base64.b64decode(challenge["challenge"])).signature
            status, body = await conn.post("/api/cyphr-id/login", {
                "cyphrId": user.cyphr_id, "deviceFingerprint": user.fingerprint,
                "challengeId": challenge["challengeId"],
                "signature": base64.b64encode(signature).decode()})
            if status != 200:
                failures.append(f"login {status} {body.get('code')}")
                continue
            latencies.append(time.perf_counter() - started)
    finally:
        conn.close()


async def run(args: argparse.Namespace) -> None:
    cluster = postgres.new_cluster()
    servers: list[subprocess.Popen[bytes]] = []
    try:
        url = cluster.create_database()
        ports = [free_port() for _ in range(args.processes)]
        data_dir = tempfile.mkdtemp(prefix="cyphr-bench-")
        env = {**os.environ, "PYTHONPATH": ROOT,
               # The same secrets for every process, as in a cluster.
               "CYPHR_JWT_SECRET": hashlib.sha256(b"bench-jwt").hexdigest(),
               "CYPHR_FINGERPRINT_KEY": hashlib.sha256(b"bench-fp").hexdigest(),
               "CYPHR_TOTP_KEY": hashlib.sha256(b"bench-totp").hexdigest()}
        for number, port in enumerate(ports):
            servers.append(subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=",
                 *(["--profile", f"{args.profile}.{number}", "--profiler", "cprofile", "--savestats"]
                   if args.profile else []),
                 "cyphr", "--listen", f"tcp:{port}:interface=127.0.0.1",
                 "--database", url, "--data-dir", data_dir, "--node-id", f"bench-{number}",
                 "--rate-limit-auth", "100000000/1s", "--db-pool-size", str(args.pool)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            await wait_ready(port)

        users = [User(f"bench_{n:05d}") for n in range(args.users)]
        for start in range(0, len(users), 50):
            await asyncio.gather(*(register(ports[i % len(ports)], u)
                                   for i, u in enumerate(users[start:start + 50])))

        latencies: list[float] = []
        failures: list[str] = []
        # A short warm-up, not counted.
        await asyncio.gather(*(client(ports[i % len(ports)], users, time.monotonic() + 2, [], [], i)
                               for i in range(args.concurrency)))
        started = time.monotonic()
        await asyncio.gather(*(client(ports[i % len(ports)], users, started + args.seconds,
                                      latencies, failures, i) for i in range(args.concurrency)))
        elapsed = time.monotonic() - started

        latencies.sort()
        def pct(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000

        print(f"server processes {args.processes}, clients {args.concurrency}, users {args.users}, "
              f"{elapsed:.1f} s")
        print(f"logins/s {len(latencies) / elapsed:8.0f}   (challenge + login, both HTTP requests)")
        if latencies:
            print(f"latency ms  p50 {pct(0.50):6.1f}  p95 {pct(0.95):6.1f}  p99 {pct(0.99):6.1f}  "
                  f"mean {statistics.mean(latencies) * 1000:6.1f}")
        print(f"failures {len(failures)}" + (f": {sorted(set(failures))[:5]}" if failures else ""))
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        cluster.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--profile", metavar="PATH",
                        help="profile each server process with cProfile into PATH.<n>")
    arguments = parser.parse_args()
    try:
        # The clients share the machine with the server: the cheaper they are,
        # the closer the figure comes to the server's own capacity.
        import uvloop
    except ImportError:
        asyncio.run(run(arguments))
    else:
        uvloop.run(run(arguments))
