"""
PostgreSQL's cost of the send batcher's statement, by batch size.

    python benchmarks/store_batch.py [--batches 400] [--chats 50] [--sizes 1,10,30,100] [--receipts 20]

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
Then what a delivery receipt costs the backend, each recipient
acknowledging its messages in order from its device, as the receipts
handler records them (ChatStore.record_deliveries: the message's look-up
for the member, its receipt row, the member's and the device's delivered
marks; schema 021): one receipt a call (a lone receipt) and --receipts
receipts a call (what gathers while a batch is written, under load); and
for comparison the same steps a round trip each, as before schema 021
(MessageStore.by_id_for_member, then the receipt's transaction).
Figures vary with the machine and its load: compare runs made side by
side.
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
from cyphr.store.chats import ChatStore, Delivery, _delivered_txn  # noqa: E402
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
    Cyphr ID ends in "a"; the other member's ends in "b"). Each member has
    a device 1 whose user id is ``_user_ids[cyphr id]``."""
    chats = []
    for i in range(count):
        members = [f"{prefix}{i}a", f"{prefix}{i}b"]
        for member in members:
            user_id = _user_ids[member] = str(uuid.uuid4())
            await database.run_operation(
                "INSERT INTO cyphr_identities (id, cyphr_id, public_key, created_at, updated_at)"
                " VALUES (?, ?, ?, 0, 0)", (user_id, member, os.urandom(32)))
            await database.run_operation(
                "INSERT INTO devices (user_id, device_id, fingerprint_hash, kyber_public_key,"
                " kyber_key_signature, kyber_key_signature_version, created_at)"
                " VALUES (?, 1, ?, ?, ?, 2, 0)", (user_id, "f" * 64, os.urandom(1568), os.urandom(64)))
        chat_id = str(uuid.uuid4())
        await database.run_operation(
            "INSERT INTO chats (id, created_at, updated_at) VALUES (?, 0, 0)", (chat_id,))
        for member in members:
            await database.run_operation(
                "INSERT INTO chat_participants (chat_id, user_id, joined_at) VALUES (?, ?, 0)",
                (chat_id, member))
        chats.append((chat_id, members[0]))
    return chats


_user_ids: dict[str, str] = {}


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
                   count: int, per_call: int) -> tuple[float, float]:
    """(backend CPU seconds, wall seconds) for ``count`` delivery receipts,
    ``per_call`` to a ChatStore.record_deliveries call, in chats of their
    own, each recipient's device acknowledging every message in order (its
    delivered marks move one message at a time)."""
    store, chat_store = MessageStore(database), ChatStore(database)
    chats = await _chats(database, chat_count, f"receipts{per_call}-")
    stored = []
    for start in range(0, count, 100):
        items = [Outgoing(str(uuid.uuid4()), *chats[n % len(chats)], PAYLOAD, "text", None,
                          int(time.time() * 1000), 1) for n in range(start, min(start + 100, count))]
        stored += (await store.store_batch(items)).answers
    deliveries = []
    for message in stored:
        recipient = message.sender_id[:-1] + "b"  # the chat's other member
        deliveries.append(Delivery(message.id, message.chat_id, recipient, (_user_ids[recipient], 1),
                                   int(time.time() * 1000)))
    cpu, wall = _cpu_seconds(backend), time.perf_counter()
    if per_call == 0:
        # Step by step, a round trip each, as before schema 021: the look-up
        # (MessageStore.by_id_for_member), then the receipt's transaction
        # (the steps SQLite runs, cyphr.store.chats._delivered_txn).
        for d in deliveries:
            seen = await store.by_id_for_member(d.message_id, d.cyphr_id, d.chat_id)
            assert seen is not None
            assert await database.run_interaction("mark_delivered", _delivered_txn, seen.chat_id, seen.id,
                                                  d.cyphr_id, d.at, seen.seq, d.device)
        return _cpu_seconds(backend) - cpu, time.perf_counter() - wall
    for start in range(0, count, per_call):
        recorded = await chat_store.record_deliveries(deliveries[start:start + per_call])
        assert all(r is not None and r.first for r in recorded), recorded
    return _cpu_seconds(backend) - cpu, time.perf_counter() - wall


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    count = len(points)
    mean_x = sum(x for x, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in points)
             / sum((x - mean_x) ** 2 for x, _ in points))
    return mean_y - slope * mean_x, slope


async def main(batches: int, chat_count: int, sizes: list[int], receipts_per_call: int) -> None:
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
        count = batches * 5
        print("  delivery receipts (look-up, receipt row, the member's and the device's marks):")
        for per_call in (0, 1, receipts_per_call):
            cpu, wall = await receipts(database, backend, chat_count, count, per_call)
            how = f"{per_call:4d} a call" if per_call else "step by step (a round trip a statement)"
            print(f"    {how}: {cpu / count * 1e6:5.0f} µs CPU, {wall / count * 1e6:5.0f} µs wall a receipt")
        await database.close()
    finally:
        cluster.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--sizes", default="1,10,30,100")
    parser.add_argument("--receipts", type=int, default=20, help="delivery receipts a call, batched")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(
        arguments.batches, arguments.chats, [int(s) for s in arguments.sizes.split(",")],
        arguments.receipts)))
