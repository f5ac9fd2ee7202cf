"""
Session bundle claims a second (POST /api/sessions/bundles/:cyphrId),
through the real HTTP stack, on PostgreSQL.

    python benchmarks/bundle_claims.py [--seconds 15] [--concurrency 32]
                                       [--targets 100] [--one-time 100] [--profile PATH]

Starts a throwaway PostgreSQL cluster (fsync off) and ``twistd -n cyphr``
with the claim limits lifted, registers --targets users that each publish
a device's session keys (an X25519 identity key, a signed prekey, a
last-resort ML-KEM-1024 prekey and --one-time one-time prekeys of each
kind, all signed), and as many claimers; then --concurrency clients loop,
each claiming a bundle of a target in turn (each claim hands out, and
deletes, one one-time prekey of each kind while any is left; then the
last-resort key). Prints claims a second, latency percentiles, how many
claims got a one-time prekey, the server's CPU per claim, and failures.
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
    percentile,
    register,
    run_loop,
)

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402

from cyphr.client import sessions  # noqa: E402
from cyphr.client.crypto import iso_ms  # noqa: E402

DAY = 86_400_000


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def prekey(user: User, kind: int, key_id: int, now: int) -> dict[str, object]:
    if kind in (sessions.DH_SIGNED, sessions.DH_ONE_TIME):
        public = X25519PrivateKey.generate().public_key().public_bytes_raw()
    else:
        public = MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()
    signed = sessions.Prekey(kind, user.cyphr_id, 1, key_id, now, now + 30 * DAY,
                             public).signed(user.signing_key)
    return {"keyId": key_id, "publicKey": b64(public), "signature": b64(signed.signature),
            "createdAt": iso_ms(now), "expiresAt": iso_ms(now + 30 * DAY)}


async def publish(port: int, user: User, token: str, one_time: int) -> None:
    now = int(time.time() * 1000) - 60_000
    identity_dh = X25519PrivateKey.generate().public_key().public_bytes_raw()
    ids = iter(range(1, 10**9))
    body = {
        "identityDh": {"publicKey": b64(identity_dh), "signature": b64(
            sessions.sign_identity_dh(user.signing_key, user.cyphr_id, identity_dh))},
        "signedPrekey": prekey(user, sessions.DH_SIGNED, next(ids), now),
        "lastResortPrekey": prekey(user, sessions.KEM_LAST_RESORT, next(ids), now),
        "oneTimePrekeys": [prekey(user, sessions.DH_ONE_TIME, next(ids), now)
                           for _ in range(one_time)],
        "kemOneTimePrekeys": [prekey(user, sessions.KEM_ONE_TIME, next(ids), now)
                              for _ in range(one_time)],
    }
    conn = await Connection.open(port)
    try:
        status, answer = await conn.request("PUT", "/api/sessions/keys", body, token=token)
        if status != 200:
            raise RuntimeError(f"publishing failed: {status} {answer}")
    finally:
        conn.close()


async def claimer(port: int, token: str, targets: list[User], stop_at: float,
                  latencies: list[float], one_time: list[int], failures: list[str],
                  index: int) -> None:
    conn = await Connection.open(port)
    n = index
    try:
        while time.monotonic() < stop_at:
            target = targets[n % len(targets)]
            n += 1
            started = time.perf_counter()
            status, answer = await conn.request("POST", f"/api/sessions/bundles/{target.cyphr_id}",
                                                {}, token=token)
            if status != 200:
                failures.append(f"{status} {answer.get('code')}")
                continue
            latencies.append(time.perf_counter() - started)
            one_time.append(sum(1 for b in answer["bundles"] if b.get("oneTimePrekey")))
    finally:
        conn.close()


async def run(args: argparse.Namespace) -> None:
    lifted = ["--rate-limit-bundle-claim", "100000000/1s",
              "--rate-limit-bundle-drain", "100000000/1s", "--rate-limit-keys", "10000000",
              "--max-prekeys", str(max(1000, args.one_time))]
    async with cyphr_servers(1, args.pool, lifted, args.profile) as ports:
        port = ports[0]
        targets = [User(f"target_{n:05d}") for n in range(args.targets)]
        claimers = [User(f"claimer_{n:05d}") for n in range(args.concurrency)]
        tokens: dict[str, str] = {}
        for group in (targets, claimers):
            for start in range(0, len(group), 25):
                chunk = group[start:start + 25]
                for user, token in zip(chunk, await asyncio.gather(*(register(port, u)
                                                                     for u in chunk))):
                    tokens[user.cyphr_id] = token
        for start in range(0, len(targets), 10):
            chunk = targets[start:start + 10]
            await asyncio.gather(*(publish(port, u, tokens[u.cyphr_id], args.one_time)
                                   for u in chunk))
        latencies: list[float] = []
        one_time: list[int] = []
        failures: list[str] = []
        cpu_before = cpu_seconds(ports.pids[0])
        started = time.monotonic()
        await asyncio.gather(*(claimer(port, tokens[c.cyphr_id], targets, started + args.seconds,
                                       latencies, one_time, failures, i)
                               for i, c in enumerate(claimers)))
        elapsed = time.monotonic() - started
        spent = cpu_seconds(ports.pids[0]) - cpu_before
        latencies.sort()
        print(f"targets {args.targets} ({args.one_time} one-time prekeys of each kind), "
              f"claimers {args.concurrency}, {elapsed:.1f} s")
        print(f"claims/s {len(latencies) / elapsed:8.0f}")
        if latencies:
            print(f"latency ms  p50 {percentile(latencies, 0.50) * 1000:6.1f}  "
                  f"p95 {percentile(latencies, 0.95) * 1000:6.1f}  "
                  f"p99 {percentile(latencies, 0.99) * 1000:6.1f}  "
                  f"mean {statistics.mean(latencies) * 1000:6.1f}")
            print(f"with a one-time prekey {sum(one_time)} of {len(one_time)}; "
                  f"server CPU per claim {spent / len(latencies) * 1e6:.0f} µs")
        print(f"failures {len(failures)}" + (f": {sorted(set(failures))[:5]}" if failures else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--one-time", type=int, default=100)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--profile", metavar="PATH",
                        help="profile the server process with cProfile into PATH.0")
    run_loop(run(parser.parse_args()))
