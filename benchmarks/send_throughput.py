"""
REST sends a second with many concurrent senders, on PostgreSQL.

    python benchmarks/send_throughput.py [--seconds 15] [--concurrency 128]
                                         [--senders 64] [--chats 16] [--processes 1]

Starts a throwaway PostgreSQL cluster (the tests' helper, fsync off) and
``twistd -n cyphr`` in --processes processes, registers --senders users,
makes --chats groups that each hold all of them, then runs --concurrency
clients over keep-alive connections, each looping POST /api/messaging/send
with a 1 KiB encryptedPayload into a chat of its own choosing, as one of
the senders. Prints sends a second, latency percentiles, failures, and
checks afterwards that every chat's seq runs 1..N without gaps.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Connection, User, cyphr_servers, percentile, register, run_loop  # noqa: E402

PAYLOAD = {"v": 2, "kyberCiphertext": base64.b64encode(os.urandom(600)).decode(),
           "encryptedMessage": base64.b64encode(os.urandom(160)).decode(),
           "nonce": base64.b64encode(os.urandom(24)).decode(), "tag": base64.b64encode(os.urandom(16)).decode()}


async def client(port: int, tokens: list[str], chats: list[str], stop_at: float,
                 latencies: list[float], failures: list[str], seqs: dict[str, list[int]], index: int) -> None:
    conn = await Connection.open(port)
    n = index
    try:
        while time.monotonic() < stop_at:
            token, chat = tokens[n % len(tokens)], chats[n % len(chats)]
            n += 1
            started = time.perf_counter()
            status, body = await conn.post("/api/messaging/send",
                                           {"chatId": chat, "encryptedPayload": PAYLOAD}, token)
            if status != 201:
                failures.append(f"{status} {body.get('code')}")
                continue
            latencies.append(time.perf_counter() - started)
            seqs.setdefault(chat, []).append(body["seq"])
    finally:
        conn.close()


async def run(args: argparse.Namespace) -> None:
    async with cyphr_servers(args.processes, args.pool, ["--rate-limit-send", "100000000/1s"]) as ports:
        users = [User(f"sender_{n:04d}") for n in range(args.senders)]
        tokens = await asyncio.gather(*(register(ports[0], u) for u in users))
        conn = await Connection.open(ports[0])
        for token in tokens[1:]:  # a group admin may add only its contacts: each writes to it first
            status, body = await conn.post("/api/messaging/send", {
                "recipientId": users[0].cyphr_id, "encryptedPayload": PAYLOAD}, token)
            assert status == 201, body
        chats = []
        for _ in range(args.chats):
            status, body = await conn.post("/api/messaging/create-group", {
                "encryptedName": "YmVuY2g=", "members": [u.cyphr_id for u in users[1:]]}, tokens[0])
            assert status == 201, body
            chats.append(body["chatId"])
        conn.close()

        seqs: dict[str, list[int]] = {}
        await asyncio.gather(*(client(ports[i % len(ports)], tokens, chats, time.monotonic() + 2,
                                      [], [], seqs, i) for i in range(args.concurrency)))
        latencies: list[float] = []
        failures: list[str] = []
        started = time.monotonic()
        await asyncio.gather(*(client(ports[i % len(ports)], tokens, chats, started + args.seconds,
                                      latencies, failures, seqs, i) for i in range(args.concurrency)))
        elapsed = time.monotonic() - started

        gaps = sum(1 for chat, got in seqs.items() if sorted(got) != list(range(1, len(got) + 1)))
        latencies.sort()
        print(f"server processes {args.processes}, clients {args.concurrency}, senders {args.senders}, "
              f"chats {args.chats}, {elapsed:.1f} s")
        print(f"sends/s {len(latencies) / elapsed:8.0f}   (1 KiB encryptedPayload each)")
        if latencies:
            print(f"latency ms  p50 {percentile(latencies, 0.50) * 1000:6.1f}  "
                  f"p99 {percentile(latencies, 0.99) * 1000:6.1f}")
        print(f"failures {len(failures)}" + (f": {sorted(set(failures))[:5]}" if failures else "")
              + f"; chats whose seq has a gap or a duplicate: {gaps}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--senders", type=int, default=64)
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--pool", type=int, default=10)
    run_loop(run(parser.parse_args()))
