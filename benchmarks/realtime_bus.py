"""
Events a second through the cross-node bus (LISTEN/NOTIFY), on PostgreSQL.

    python benchmarks/realtime_bus.py [--count 50000] [--size 300] [--per-turn 200]

Starts a throwaway PostgreSQL cluster (the tests' helper, fsync off). Node
"a" publishes --count message-like events (--size random bytes of base64
ciphertext each), --per-turn of them a reactor turn while fewer than 2,000
wait to be sent; node "b" receives them and checks that each arrived once
and in order. Prints events a second from the first publish to the last
event received, twice: both nodes in this process (one reactor does all the
work: a floor), then the receiver in a process of its own. On a 2-core
machine PostgreSQL shares the cores with both.
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from cyphr.db.postgres import PostgresDatabase
from cyphr.realtime.bus import PostgresBus
from tests import postgres


def events(count: int, size: int) -> list[dict[str, Any]]:
    chat = str(uuid.uuid4())
    return [{"type": "message", "chatId": chat, "seq": i, "message": {
        "id": str(uuid.uuid4()), "senderId": "alice", "createdAt": 1_790_000_000_000 + i,
        "encryptedContent": base64.b64encode(os.urandom(size)).decode()}}
        for i in range(count)]


class Collect:
    """A bus listener that keeps what arrives."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    def bus_event(self, event: dict[str, Any]) -> None:
        self.received.append(event)

    def bus_listening(self) -> None:
        pass

    def bus_restored(self) -> None:
        pass


def _fatal(message: str) -> None:
    raise SystemExit(message)


async def node(reactor: Any, url: str, node_id: str,
               listener: Collect | None = None) -> tuple[PostgresDatabase, PostgresBus]:
    database = PostgresDatabase(url, reactor, on_fatal=_fatal, pool_size=4)
    database.start()
    await database.when_ready()
    bus = PostgresBus(database, url, node_id, reactor)
    bus.listen(listener or Collect())
    bus.start()
    while not bus.listening:
        await deferLater(reactor, 0.01, lambda: None)
    return database, bus


async def publish(reactor: Any, bus: PostgresBus, items: list[dict[str, Any]],
                  per_turn: int) -> None:
    for start in range(0, len(items), per_turn):
        while len(bus._pending) >= 2000:  # what the sender has yet to take
            await deferLater(reactor, 0, lambda: None)
        for event in items[start:start + per_turn]:
            bus.publish(event)
        await deferLater(reactor, 0, lambda: None)


async def until(reactor: Any, predicate: Any) -> None:
    while not predicate():
        await deferLater(reactor, 0.001, lambda: None)


def check(received: list[dict[str, Any]], count: int) -> None:
    if [event["seq"] for event in received] != list(range(count)):
        raise SystemExit("events arrived out of order, twice, or not at all")


async def in_one_process(reactor: Any, url: str, items: list[dict[str, Any]],
                         per_turn: int) -> float:
    db_a, a = await node(reactor, url, "a")
    collect = Collect()
    db_b, b = await node(reactor, url, "b", collect)
    received = collect.received
    started = time.perf_counter()
    await publish(reactor, a, items, per_turn)
    await until(reactor, lambda: len(received) >= len(items))
    elapsed = time.perf_counter() - started
    check(received, len(items))
    for bus in (a, b):
        await bus.stop()
    for database in (db_a, db_b):
        await database.close()
    return len(items) / elapsed


async def in_two_processes(reactor: Any, url: str, items: list[dict[str, Any]],
                           per_turn: int) -> float:
    receiver = await deferToThread(
        subprocess.Popen, [sys.executable, os.path.abspath(__file__), "--receive", url,
                           "--count", str(len(items))], stdout=subprocess.PIPE, text=True)
    db_a, a = await node(reactor, url, "a")
    if (await deferToThread(receiver.stdout.readline)).strip() != "listening":
        raise SystemExit("the receiver did not start")
    started = time.perf_counter()
    await publish(reactor, a, items, per_turn)
    # perf_counter is CLOCK_MONOTONIC on Linux: the same clock in both processes.
    finished = float(await deferToThread(receiver.stdout.readline))
    await deferToThread(receiver.wait)
    await a.stop()
    await db_a.close()
    return len(items) / (finished - started)


async def receive(reactor: Any, url: str, count: int) -> None:
    collect = Collect()
    database, bus = await node(reactor, url, "b", collect)
    received = collect.received
    print("listening", flush=True)
    await until(reactor, lambda: len(received) >= count)
    finished = time.perf_counter()
    check(received, count)
    print(finished, flush=True)
    await bus.stop()
    await database.close()


async def main(reactor: Any, arguments: argparse.Namespace) -> None:
    if arguments.receive:
        await receive(reactor, arguments.receive, arguments.count)
        return
    items = events(arguments.count, arguments.size)
    cluster = postgres.new_cluster()
    try:
        url = cluster.create_database()
        same = await in_one_process(reactor, url, items, arguments.per_turn)
        split = await in_two_processes(reactor, url, items, arguments.per_turn)
    finally:
        cluster.destroy()
    print(f"{arguments.count} events of about {len(str(items[0])) + 30} bytes: "
          f"{same:,.0f} events/s with both nodes in one process, "
          f"{split:,.0f} events/s with the receiver in another")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--per-turn", type=int, default=200)
    parser.add_argument("--receive", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))
