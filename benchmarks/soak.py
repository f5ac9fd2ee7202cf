"""
Soak: does the server's memory stay flat under steady work with churn?

    python benchmarks/soak.py [--minutes 20] [--warm-up 5] [--rate 1500] [--round-seconds 50]
        [--users-per-round 100] [--idle 2000] [--idle-users 200] [--settle 60] [--sqlite]
        [--trace DIR]

Starts ``twistd -n cyphr`` (one process, on a throwaway PostgreSQL cluster,
or on SQLite with --sqlite; see common.cyphr_servers), connects --idle
authenticated sockets (of --idle-users users, round robin) that stay for the
whole run, then runs rounds back to back until --minutes have passed: each
round registers --users-per-round *new* users, connects each over WebSocket
(benchmarks/sioclient.py), pairs them, and the senders send ``send_message``
(by recipientId) to their partners at --rate messages a second in total for
--round-seconds; then every socket of the round is dropped.

The rounds of the first --warm-up minutes (at least one round) are the
warm-up, not counted in the slopes: the process's allocators take several
minutes of this load to reach their working size (a 20-minute run with one
round of warm-up grew about 2 MB over its first 7 minutes and then stayed
flat, with Python's live blocks flat throughout: pymalloc arenas and the C
heap filling, not objects kept). The --minutes of counted rounds follow.

After each round it samples the server's RSS and open file descriptors
(/proc), the sizes of its in-memory tables (``cyphr_memory_table_entries``
scraped from /metrics) and Python's live blocks
(``cyphr_python_allocated_blocks``: objects held, whatever the C allocator
keeps), and prints them with the round's counts (sent,
acked, delivered, lost, duplicated). At the end it prints the RSS slope
(least squares) per round, per user seen and per minute, with R², and
whether memory returns: RSS --settle seconds after the load stops, and again
after the idle sockets close.

With --trace DIR the server runs under tracemalloc (slower: use it to find
a leak, not for the figures; see benchmarks/tracing/sitecustomize.py); a heap
snapshot is taken after each round, and the end prints where the memory
held grew most between the first counted round and the last.

The issue's targets (#24): after warm-up, under 0.2 KiB of RSS per user
seen, and a slope under 20 KiB a minute over 20 minutes at 1,500 msg/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import sys
import time
import tracemalloc
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import User, cyphr_servers, register, run_loop  # noqa: E402
from sioclient import Client, ConnectFailed, connect  # noqa: E402

HOST = "127.0.0.1"
HIGH_LIMITS = ["--rate-limit-send", "100000000/1s", "--realtime-event-rate", "100000000/1s"]
_TABLE = re.compile(r'^cyphr_memory_table_entries\{table="([^"]+)"\} ([0-9.e+]+)$', re.M)
_BLOCKS = re.compile(r'^cyphr_python_allocated_blocks ([0-9.e+]+)$', re.M)


# -- what is sampled --------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def tables(port: int) -> dict[str, int]:
    """cyphr_memory_table_entries by table, from /metrics."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
    answer = (await reader.read()).decode("utf-8", "replace")
    writer.close()
    sizes = {name: int(float(value)) for name, value in _TABLE.findall(answer)}
    blocks = _BLOCKS.search(answer)
    if blocks:  # Python's live allocations (a server before #24 has none)
        sizes["python_blocks"] = int(float(blocks.group(1)))
    return sizes


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys over xs, and R²."""
    n = len(xs)
    if n < 2:
        return 0.0, 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    b = sxy / sxx if sxx else 0.0
    r2 = (sxy * sxy) / (sxx * syy) if sxx and syy else 0.0
    return b, r2


async def snapshot(pid: int, where: str, number: int) -> str:
    """Ask the traced server for heap snapshot ``number``; its path."""
    path = os.path.join(where, f"{number}.snapshot")
    os.kill(pid, signal.SIGUSR2)
    while not os.path.exists(path):
        await asyncio.sleep(0.2)
    return path


def print_growth(first: str, last: str, top: int = 25) -> None:
    """Where the memory held grew most between two snapshots."""
    before, after = tracemalloc.Snapshot.load(first), tracemalloc.Snapshot.load(last)
    print("\nheap growth by line (--trace):")
    for stat in after.compare_to(before, "lineno")[:top]:
        print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {stat.traceback[0]}")
    print("\nlargest growth by allocation site, with callers:")
    for stat in after.compare_to(before, "traceback")[:8]:
        print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks")
        for line in stat.traceback.format()[-12:]:
            print("      " + line)


# -- the load ---------------------------------------------------------------------


async def register_users(port: int, prefix: str, count: int, concurrency: int = 16) -> list[User]:
    users = [User(f"{prefix}_{n}") for n in range(count)]
    queue = iter(users)

    async def one_by_one() -> None:
        for user in queue:
            user.token = await register(port, user)

    await asyncio.gather(*(one_by_one() for _ in range(min(concurrency, count))))
    return users


async def connect_all(port: int, tokens: list[str], concurrency: int = 32, **options: Any
                      ) -> list[Client]:
    clients: list[Client] = []
    queue = iter(tokens)

    async def one_by_one() -> None:
        for token in queue:
            clients.append(await connect(HOST, port, {"token": token}, **options))

    await asyncio.gather(*(one_by_one() for _ in range(min(concurrency, len(tokens)))))
    return clients


class Counts:
    """One round's messages: sent, acked, delivered (by clientMessageId)."""

    def __init__(self) -> None:
        self.sent = self.acked = self.failed = self.delivered = self.duplicated = 0
        self.seen: set[str] = set()
        self.refusals: Counter[str] = Counter()  # failed acks by error code

    def on_ack(self, client: Client, ack_id: int, args: list[Any]) -> None:
        if args and isinstance(args[0], dict) and args[0].get("success"):
            self.acked += 1
        else:
            self.failed += 1
            self.refusals[str(args[0].get("code") if args and isinstance(args[0], dict) else args)] += 1

    def on_event(self, client: Client, name: str, data: Any) -> None:
        if name != "new_message":
            return
        key = data["message"].get("clientMessageId") or ""
        if key in self.seen:
            self.duplicated += 1
        else:
            self.seen.add(key)
            self.delivered += 1


async def run_round(args: argparse.Namespace, port: int, number: int) -> Counts:
    """New users connect, send for round_seconds at the rate, and leave."""
    counts = Counts()
    users = await register_users(port, f"soak{secrets.token_hex(3)}r{number}", args.users_per_round)
    clients = await connect_all(port, [u.token for u in users],  # type: ignore[misc]
                                on_event=counts.on_event, on_ack=counts.on_ack)
    half = len(clients) // 2
    senders, receivers = clients[:half], users[half:half * 2]
    payload = json.dumps({"v": 2, "nonce": "AAAA", "encryptedMessage": "x" * 200})
    heads = [f'["send_message",{{"recipientId":"{r.cyphr_id}","encryptedPayload":{payload},'
             '"clientMessageId":"' for r in receivers]
    t0 = time.monotonic()
    total = int(args.rate * args.round_seconds)
    for m in range(total):
        due = t0 + m / args.rate
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        n = m % half
        senders[n].send_text(f"42{m}{heads[n]}{number}-{m}\"}}]")
        counts.sent += 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (counts.acked + counts.failed < counts.sent
                                           or counts.delivered < counts.acked):
        await asyncio.sleep(0.05)
    for client in clients:
        client.abort()
    await asyncio.gather(*(c.closed for c in clients))
    return counts


async def main(args: argparse.Namespace) -> None:
    extra = HIGH_LIMITS
    env = None
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
        here = os.path.dirname(os.path.abspath(__file__))
        env = {"CYPHR_TRACE_SNAPSHOTS": os.path.abspath(args.trace),
               "PYTHONPATH": os.pathsep.join([os.path.join(here, "tracing"), os.path.dirname(here)])}
    snapshots: list[str] = []
    async with cyphr_servers(1, 10, extra, sqlite=args.sqlite, env=env) as servers:
        port, pid = servers[0], servers.pids[0]
        engine = "SQLite" if args.sqlite else "PostgreSQL"
        print(f"soak: {engine}, {args.minutes} min, {args.rate:g} msg/s, rounds of "
              f"{args.users_per_round} new users x {args.round_seconds:g} s, {args.idle} idle sockets",
              flush=True)
        start_rss, start_fds = rss_kib(pid), open_fds(pid)
        idle_users = await register_users(port, f"idle{secrets.token_hex(3)}", args.idle_users)
        tokens = [idle_users[n % len(idle_users)].token for n in range(args.idle)]
        idle = await connect_all(port, tokens)  # type: ignore[arg-type]
        print(f"started: RSS {start_rss} KiB, fds {start_fds}; with {len(idle)} idle sockets: "
              f"RSS {rss_kib(pid)} KiB, fds {open_fds(pid)}", flush=True)

        began = time.monotonic()
        xs_round: list[float] = []
        xs_min: list[float] = []
        ys: list[float] = []
        blocks: list[float] = []  # Python's live blocks (cyphr_python_allocated_blocks)
        first_tables: dict[str, int] = {}
        number = 0
        lost_total = dup_total = sent_total = 0
        header = f"{'round':>5} {'min':>6} {'sent':>7} {'acked':>7} {'deliv':>7} {'lost':>5} " \
                 f"{'dup':>4} {'RSS KiB':>9} {'fds':>5} {'blocks':>9}  tables (changed since the warm-up)"
        print(header, flush=True)
        counting_since: float | None = None
        while counting_since is None or time.monotonic() - counting_since < args.minutes * 60:
            counts = await run_round(args, port, number)
            await asyncio.sleep(1)  # the server's last_seen writes
            minutes = (time.monotonic() - began) / 60
            warming = counting_since is None
            rss, fds, sizes = rss_kib(pid), open_fds(pid), await tables(port)
            live = sizes.pop("python_blocks", 0)
            if args.trace and number:
                snapshots.append(await snapshot(pid, args.trace, len(snapshots)))
            lost = counts.acked - counts.delivered
            if warming:
                first_tables = sizes
                if minutes >= args.warm_up:
                    counting_since = time.monotonic()
            else:
                xs_round.append(number)
                xs_min.append(minutes)
                ys.append(rss)
                blocks.append(live)
                lost_total += max(lost, 0)
                dup_total += counts.duplicated
                sent_total += counts.sent
            changed = {k: v for k, v in sizes.items() if v != first_tables.get(k)}
            print(f"{number:>5} {minutes:>6.2f} {counts.sent:>7} {counts.acked:>7} "
                  f"{counts.delivered:>7} {lost:>5} {counts.duplicated:>4} {rss:>9} {fds:>5} {live:>9}  "
                  f"{'warm-up' if warming else changed}", flush=True)
            if counts.refusals:
                print(f"      refused: {dict(counts.refusals)}", flush=True)
            number += 1

        per_round, r2 = slope(xs_round, ys)
        per_minute, r2_min = slope(xs_min, ys)
        print(f"\nafter {number - len(ys)} rounds of warm-up: {len(ys)} rounds over "
              f"{xs_min[-1] - xs_min[0] if xs_min else 0:.1f} min, {sent_total} messages, {lost_total} lost, "
              f"{dup_total} duplicated", flush=True)
        print(f"RSS slope: {per_round:+.1f} KiB per round (R² {r2:.2f}), "
              f"{per_round / args.users_per_round:+.2f} KiB per user seen, "
              f"{per_minute:+.1f} KiB per minute (R² {r2_min:.2f})", flush=True)
        # A step early on (a pool or a table reaching its working size)
        # weighs on the whole fit; the second half says whether it goes on.
        half = len(ys) // 2
        if len(ys) - half >= 3:
            late_round, late_r2 = slope(xs_round[half:], ys[half:])
            late_minute, _ = slope(xs_min[half:], ys[half:])
            print(f"second half ({len(ys) - half} rounds): {late_round:+.1f} KiB per round "
                  f"(R² {late_r2:.2f}), {late_round / args.users_per_round:+.2f} KiB per user "
                  f"seen, {late_minute:+.1f} KiB per minute", flush=True)
        if any(blocks):
            per_round_blocks, r2_blocks = slope(xs_round, blocks)
            print(f"Python's live blocks: {per_round_blocks:+.0f} per round (R² {r2_blocks:.2f}), "
                  f"{per_round_blocks / args.users_per_round:+.1f} per user seen "
                  f"({blocks[0]:.0f} after the first counted round, {blocks[-1]:.0f} at the end)",
                  flush=True)
        loaded = rss_kib(pid)
        await asyncio.sleep(args.settle)
        settled = rss_kib(pid)
        for client in idle:
            client.abort()
        await asyncio.gather(*(c.closed for c in idle))
        await asyncio.sleep(5)
        closed = rss_kib(pid)
        print(f"memory after the load: {loaded} KiB at its end, {settled} KiB {args.settle:g} s "
              f"later ({settled - loaded:+d}), {closed} KiB after every socket closed "
              f"({closed - loaded:+d}); fds {open_fds(pid)} (started with {start_fds})", flush=True)
        print(f"tables at the end: {await tables(port)}", flush=True)
        if len(snapshots) >= 2:
            print_growth(snapshots[0], snapshots[-1])


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20, help="minutes of counted rounds")
    parser.add_argument("--warm-up", type=float, default=5,
                        help="minutes of rounds before the counted ones (at least one round)")
    parser.add_argument("--rate", type=float, default=1500, help="messages a second, in total")
    parser.add_argument("--round-seconds", type=float, default=50)
    parser.add_argument("--users-per-round", type=int, default=100)
    parser.add_argument("--idle", type=int, default=2000, help="idle sockets held throughout")
    parser.add_argument("--idle-users", type=int, default=200)
    parser.add_argument("--settle", type=float, default=60, help="seconds waited after the load")
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--trace", metavar="DIR", help="run the server under tracemalloc, snapshots in DIR")
    args = parser.parse_args()
    if args.users_per_round < 2:
        parser.error("--users-per-round must be at least 2")
    try:
        run_loop(main(args))
    except ConnectFailed as e:
        sys.exit(f"soak: a client could not connect: {e}")


if __name__ == "__main__":
    cli()
