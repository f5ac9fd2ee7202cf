"""
Challenge + login round trips a second, through the real HTTP stack, on
PostgreSQL.

    python benchmarks/login_throughput.py [--seconds 15] [--concurrency 64]
                                          [--users 200] [--processes 1] [--profile PATH]

Starts a throwaway PostgreSQL cluster (the tests' helper, fsync off) and
``twistd -n cyphr`` in --processes processes on one database, registers
--users users with real Ed25519 and ML-KEM-1024 keys, then runs
--concurrency clients over keep-alive connections, each looping: POST
/api/cyphr-id/challenge, sign a v2 login statement, POST
/api/cyphr-id/login. Prints logins a second, latency percentiles of a whole
login (both requests), the CPU time each login cost the server processes,
PostgreSQL and the load generator, and any failures. The clients run in
this process on asyncio with hand-written HTTP/1.1 (on uvloop when
installed: ``pip install '.[bench]'``), to leave as much CPU as possible to
the server; on a 2-core machine they still share it, so the figure is a
floor.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Connection,
    User,
    cpu_seconds,
    cyphr_servers,
    family_cpu_seconds,
    percentile,
    register,
    run_loop,
)

from cyphr.signing import LOGIN, AuthStatement, device_hash  # noqa: E402


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
            # A v2 login: a statement for this server's origin, signed with its label.
            statement = AuthStatement(LOGIN, f"http://127.0.0.1:{port}", user.cyphr_id,
                                      device_hash(user.fingerprint), challenge["challengeId"],
                                      base64.b64decode(challenge["challenge"]))
            status, body = await conn.post("/api/cyphr-id/login", {
                "cyphrId": user.cyphr_id, "deviceFingerprint": user.fingerprint,
                "challengeId": challenge["challengeId"],
                "statement": base64.b64encode(statement.encode()).decode(),
                "signature": base64.b64encode(statement.sign(user.signing_key)).decode()})
            if status != 200:
                failures.append(f"login {status} {body.get('code')}")
                continue
            latencies.append(time.perf_counter() - started)
    finally:
        conn.close()


async def run(args: argparse.Namespace) -> None:
    async with cyphr_servers(args.processes, args.pool, [], args.profile) as ports:
        users = [User(f"bench_{n:05d}") for n in range(args.users)]
        for start in range(0, len(users), 50):
            await asyncio.gather(*(register(ports[i % len(ports)], u)
                                   for i, u in enumerate(users[start:start + 50])))

        latencies: list[float] = []
        failures: list[str] = []
        # A short warm-up, not counted.
        await asyncio.gather(*(client(ports[i % len(ports)], users, time.monotonic() + 2, [], [], i)
                               for i in range(args.concurrency)))
        # CPU time over the measured window: the servers', PostgreSQL's (its
        # backends included) and this load generator's, so that a change of
        # cost shows even where the shared cores hide it in logins/s.
        def cpu() -> tuple[float, float, float]:
            return (sum(cpu_seconds(pid) for pid in ports.pids),
                    family_cpu_seconds(ports.postgres_pid), cpu_seconds(os.getpid()))

        cpu_before = cpu()
        started = time.monotonic()
        await asyncio.gather(*(client(ports[i % len(ports)], users, started + args.seconds,
                                      latencies, failures, i) for i in range(args.concurrency)))
        elapsed = time.monotonic() - started
        spent = [after - before for after, before in zip(cpu(), cpu_before)]

        latencies.sort()
        print(f"server processes {args.processes}, clients {args.concurrency}, users {args.users}, "
              f"{elapsed:.1f} s")
        print(f"logins/s {len(latencies) / elapsed:8.0f}   (challenge + login, both HTTP requests)")
        if latencies:
            print(f"latency ms  p50 {percentile(latencies, 0.50) * 1000:6.1f}  "
                  f"p95 {percentile(latencies, 0.95) * 1000:6.1f}  "
                  f"p99 {percentile(latencies, 0.99) * 1000:6.1f}  mean {statistics.mean(latencies) * 1000:6.1f}")
        if latencies:
            per_login = [seconds / len(latencies) * 1e6 for seconds in spent]
            print(f"CPU per login µs  server {per_login[0]:6.0f}  PostgreSQL {per_login[1]:6.0f}  "
                  f"load generator {per_login[2]:6.0f}")
        print(f"failures {len(failures)}" + (f": {sorted(set(failures))[:5]}" if failures else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--profile", metavar="PATH",
                        help="profile each server process with cProfile into PATH.<n>")
    run_loop(run(parser.parse_args()))
