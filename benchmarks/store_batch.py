"""
PostgreSQL's cost of the send batcher's statement, by batch size.

    python benchmarks/store_batch.py [--batches 400] [--chats 50] [--sizes 1,10,30,100]

Starts a throwaway PostgreSQL cluster (the tests' helper, fsync off),
makes --chats direct chats of two members each, and stores --batches
batches of each size through MessageStore.store_batch on one connection,
one after another, as the send batcher does: with the push wake-ups of
the messages (the statement every server runs) and without them. Each
batch holds messages of different chats, 200-byte payloads. Prints, for
each size, the PostgreSQL backend's CPU per batch and per message (from
/proc: the backend runs on this machine) and the wall time per batch; and
from the sizes, the fixed cost of a statement and the cost of each message
in it (a least-squares line through CPU per batch against batch size).
Then what a delivery receipt costs the backend, one after another as a
recipient acknowledges its messages in order: the message's look-up for
the member (ReceiptsHandler checks it is visible) and
ChatStore.mark_delivered (the receipt row and the member's delivered mark,
one transaction; a device's own mark, which a real receipt also moves, is
left out). Figures vary with the machine and its load: compare runs made
side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from cyphr.db.postgres import PostgresDatabase  # noqa: E402
from cyphr.store.chats import ChatStore  # noqa: E402
from cyphr.store.messages import MessageStore, Outgoing  # noqa: E402
from cyphr.store.push import WakeUps  # noqa: E402
from tests import postgres  # noqa: E402

PAYLOAD = '{"c":"' + "x" * 192 + '"}'
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _fatal(message: str) -> None:
    raise SystemExit(message)


async def _chats(database: PostgresDatabase, count: int, prefix: str = "bench"
                 ) -> list[tuple[str, str]]:
    """``count`` direct chats of two members each: (chat id, a sender whose
    Cyphr ID ends in "a"; the other member's ends in "b")."""
    chats = []
    for i in range(count):
        members = [f"{prefix}{i}a", f"{prefix}{i}b"]
        for member in members:
            await database.run_operation(
                "INSERT INTO cyphr_identities (id, cyphr_id, public_key, created_at, updated_at)"
                " VALUES (?, ?, ?, 0, 0)", (str(uuid.uuid4()), member, os.urandom(32)))
        chat_id = str(uuid.uuid4())
        await database.run_operation(
            "INSERT INTO chats (id, created_at, updated_at) VALUES (?, 0, 0)", (chat_id,))
        for member in members:
            await database.run_operation(
                "INSERT INTO chat_participants (chat_id, user_id, joined_at) VALUES (?, ?, 0)",
                (chat_id, member))
        chats.append((chat_id, members[0]))
    return chats


async def measure(database: PostgresDatabase, backend: int, chats: list[tuple[str, str]],
                  size: int, batches: int, waking: bool) -> tuple[float, float]:
    """(backend CPU seconds, wall seconds) for ``batches`` batches of ``size``."""
    store = MessageStore(database)
    n = 0

    def batch() -> list[Outgoing]:
        nonlocal n
        items = []
        for _ in range(size):
            chat_id, sender = chats[n % len(chats)]
            items.append(Outgoing(str(uuid.uuid4()), chat_id, sender, PAYLOAD, "text", None,
                                  int(time.time() * 1000), 1))
            n += 1
        return items

    for _ in range(10):  # plans made, caches warm
        await store.store_batch(batch(), WakeUps(0, 0) if waking else None)
    cpu, wall = _cpu_seconds(backend), time.perf_counter()
    for _ in range(batches):
        now = int(time.time() * 1000)
        await store.store_batch(batch(), WakeUps(now, now - 20_000) if waking else None)
    return _cpu_seconds(backend) - cpu, time.perf_counter() - wall


async def receipts(database: PostgresDatabase, backend: int, chat_count: int,
                   count: int) -> tuple[float, float]:
    """(backend CPU seconds, wall seconds) for ``count`` delivery receipts
    in chats of their own, each recipient acknowledging every message in
    order (its delivered mark moves one message at a time)."""
    store, chat_store = MessageStore(database), ChatStore(database)
    chats = await _chats(database, chat_count, "receipts")
    stored = []
    for start in range(0, count, 100):
        items = [Outgoing(str(uuid.uuid4()), *chats[n % len(chats)], PAYLOAD, "text", None,
                          int(time.time() * 1000), 1) for n in range(start, min(start + 100, count))]
        stored += (await store.store_batch(items)).answers
    cpu, wall = _cpu_seconds(backend), time.perf_counter()
    for message in stored:
        recipient = message.sender_id[:-1] + "b"  # the chat's other member
        seen = await store.by_id_for_member(message.id, recipient, message.chat_id)
        assert seen is not None
        await chat_store.mark_delivered(message.chat_id, message.id, recipient,
                                        int(time.time() * 1000), seq=message.seq)
    return _cpu_seconds(backend) - cpu, time.perf_counter() - wall


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in points)
             / sum((x - mean_x) ** 2 for x, _ in points))
    return mean_y - slope * mean_x, slope


async def main(batches: int, chat_count: int, sizes: list[int]) -> None:
    from twisted.internet import reactor

    cluster = postgres.new_cluster()
    try:
        database = PostgresDatabase(cluster.take_migrated(), reactor, on_fatal=_fatal, pool_size=1)
        database.start()
        await database.when_ready()
        [[backend]] = await database.run_query("SELECT pg_backend_pid()")
        chats = await _chats(database, chat_count)
        print(f"PostgreSQL backend CPU, {batches} batches of each size over {chat_count} chats, "
              "one statement at a time:")
        for waking in (True, False):
            label = "with push wake-ups (what servers run)" if waking else "without wake-ups"
            print(f"  {label}:")
            points = []
            for size in sizes:
                cpu, wall = await measure(database, backend, chats, size, batches, waking)
                points.append((size, cpu / batches * 1e6))
                print(f"    {size:4d} a batch: {cpu / batches * 1e6:7.0f} µs CPU a batch, "
                      f"{cpu / batches / size * 1e6:5.0f} µs a message; "
                      f"{wall / batches * 1e6:7.0f} µs wall a batch")
            if len(points) > 1:
                fixed, each = _line(points)
                print(f"    fit: {fixed:.0f} µs a statement + {each:.0f} µs a message")
        cpu, wall = await receipts(database, backend, chat_count, batches * 5)
        print(f"  a delivery receipt (look-up and mark_delivered), one after another: "
              f"{cpu / (batches * 5) * 1e6:.0f} µs CPU, {wall / (batches * 5) * 1e6:.0f} µs wall")
        await database.close()
    finally:
        cluster.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--sizes", default="1,10,30,100")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(
        arguments.batches, arguments.chats, [int(s) for s in arguments.sizes.split(",")])))
