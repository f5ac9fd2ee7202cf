"""
Push wake-ups: how fast they leave, and what queueing them costs a send.

    python benchmarks/push.py [--devices 1000] [--rate 1000] [--seconds 10] [--sqlite]

Starts ``twistd -n cyphr`` (on a throwaway PostgreSQL cluster, or SQLite)
allowed to reach the strict Web Push stand-in of tests/pushservice.py,
which runs in this process on a reactor thread of its own (it decrypts
every body and checks every VAPID token, as a push service does), then:

1. **Wake-ups**: --devices users each register a Web Push subscription;
   one message to each, at --rate a second (open loop, REST), queues one
   wake-up each. Prints wake-ups a second and, from each send's answer to
   its wake-up's arrival at the stand-in, the latency percentiles.
2. **The cost on the send path**: --rate messages a second for --seconds
   to recipients with no registration, then as many to the registered
   (already woken, offline) recipients, whose wake-ups coalesce: the
   server's CPU per message in each phase, the difference being what the
   queueing statement costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (  # noqa: E402
    Connection,
    User,
    cpu_seconds,
    cyphr_servers,
    percentile,
    register,
    run_loop,
)


class StandIn:
    """tests/pushservice.PushService on a Twisted reactor in a thread, with
    each push's arrival time."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        from tests.pushservice import PushService

        self.reactor = reactor
        self.service = PushService(reactor)
        self.arrived: dict[str, float] = {}  # subscription id -> first arrival
        ready = threading.Event()

        def start() -> None:
            self.service.start()
            received = self.service.received
            arrived = self.arrived

            class Timed(list):  # type: ignore[type-arg]
                def append(self, item: Any) -> None:
                    arrived.setdefault(item.subscription, time.monotonic())
                    super().append(item)
            self.service.received = Timed(received)
            ready.set()

        reactor.callWhenRunning(start)
        self.thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                       daemon=True)
        self.thread.start()
        ready.wait(10)

    def subscribe(self) -> Any:
        result: list[Any] = []
        done = threading.Event()

        def go() -> None:
            result.append(self.service.subscribe())
            done.set()
        self.reactor.callFromThread(go)
        done.wait(10)
        return result[0]

    def stop(self) -> None:
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(10)


async def send_at_rate(port: int, token: str, recipients: list[str], rate: int,
                       answered: dict[str, float], failures: list[str]) -> float:
    """One message to each of ``recipients`` in turn, at ``rate`` a second
    over 16 connections; answers the seconds it took."""
    conns = [await Connection.open(port) for _ in range(16)]
    started = time.monotonic()

    async def one(index: int, recipient: str) -> None:
        await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
        status, body = await conns[index % len(conns)].post(
            "/api/messaging/send", {"recipientId": recipient, "encryptedPayload": {"n": index}},
            token=token)
        if status != 201:
            failures.append(f"{status} {body.get('code')}")
        else:
            answered.setdefault(recipient, time.monotonic())

    # Each connection sends its messages in order.
    lanes: list[list[tuple[int, str]]] = [[] for _ in conns]
    for index, recipient in enumerate(recipients):
        lanes[index % len(conns)].append((index, recipient))

    async def lane(items: list[tuple[int, str]]) -> None:
        for index, recipient in items:
            await one(index, recipient)
    await asyncio.gather(*(lane(items) for items in lanes))
    for conn in conns:
        conn.close()
    return time.monotonic() - started


async def run(args: argparse.Namespace) -> None:
    stand_in = StandIn()
    lifted = ["--push-allow-endpoint", stand_in.service.origin,
              "--rate-limit-send", "100000000/1s"]
    try:
        async with cyphr_servers(1, 10, lifted, sqlite=args.sqlite) as ports:
            port, pid = ports[0], ports.pids[0]
            sender = User("push_sender")
            token = await register(port, sender)
            registered, plain = [], []
            tokens: dict[str, str] = {}
            subscriptions: dict[str, str] = {}  # cyphr id -> subscription id
            for n in range(args.devices):
                for group, prefix in ((registered, "woken"), (plain, "plain")):
                    user = User(f"{prefix}_{n:05d}")
                    tokens[user.cyphr_id] = await register(port, user)
                    group.append(user.cyphr_id)
            for cyphr_id in registered:
                sub = stand_in.subscribe()
                subscriptions[sub.id] = cyphr_id
                conn = await Connection.open(port)
                status, body = await conn.request("PUT", "/api/devices/me/push", {
                    "kind": "webpush", "subscription": sub.to_json()}, token=tokens[cyphr_id])
                conn.close()
                if status != 200:
                    raise RuntimeError(f"registering failed: {status} {body}")

            # 1. one wake-up each
            answered: dict[str, float] = {}
            failures: list[str] = []
            took = await send_at_rate(port, token, registered, args.rate, answered, failures)
            deadline = time.monotonic() + 30
            while len(stand_in.arrived) < len(registered) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            last = max(stand_in.arrived.values(), default=time.monotonic())
            latencies = sorted(stand_in.arrived[sub] - answered[cyphr_id]
                               for sub, cyphr_id in subscriptions.items()
                               if sub in stand_in.arrived and cyphr_id in answered)
            first_send = min(answered.values(), default=last)

            # 2. the send path, with and without registered recipients
            per_message = {}
            for name, recipients in (("no registration", plain), ("registered, coalesced", registered)):
                count = args.rate * args.seconds
                targets = [recipients[i % len(recipients)] for i in range(count)]
                cpu0 = cpu_seconds(pid)
                seconds = await send_at_rate(port, token, targets, args.rate, {}, failures)
                per_message[name] = ((cpu_seconds(pid) - cpu0) / count * 1e6, count / seconds)
    finally:
        stand_in.stop()

    engine = "SQLite" if args.sqlite else "PostgreSQL"
    print(f"push wake-ups through Web Push to the local stand-in, {engine}, one server process")
    print(f"  {len(stand_in.arrived)} of {len(registered)} wake-ups arrived"
          f" ({len(stand_in.service.errors)} refused by the stand-in),"
          f" {len(stand_in.arrived) / max(last - first_send, 1e-9):.0f} a second"
          f" (sent at {args.rate}/s over {took:.1f} s)")
    if latencies:
        print(f"  send answered -> wake-up arrived: p50 {percentile(latencies, 0.50) * 1000:.0f} ms,"
              f" p99 {percentile(latencies, 0.99) * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    for name, (micros, rate) in per_message.items():
        print(f"  sends to recipients with {name}: {micros:.0f} µs of server CPU a message"
              f" ({rate:.0f} msg/s)")
    if failures:
        print(f"  {len(failures)} sends failed: {sorted(set(failures))[:5]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--sqlite", action="store_true")
    run_loop(run(parser.parse_args()))


if __name__ == "__main__":
    main()
