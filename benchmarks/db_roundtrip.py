"""
Round trips through the Database interface, on both engines.

    python benchmarks/db_roundtrip.py [--count N]

Prints, for SQLite (a file in a temporary directory) and PostgreSQL (a
throwaway cluster started with the tests' helper, fsync off): the latency of
one autocommit query, queries a second with 50 in flight, and committed
single-row transactions a second, one after another and 50 at a time. The
fourth figure is the ceiling of "one transaction per message"; the last,
1 KiB messages through the SendBatcher with 200 in flight, is what group
commit makes of it. Figures vary with the machine and its load: compare
runs made side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from cyphr.db import Database, Transaction  # noqa: E402
from cyphr.db.postgres import PostgresDatabase  # noqa: E402
from cyphr.db.sqlite import SQLiteDatabase  # noqa: E402
from tests import postgres  # noqa: E402



def _fatal(message: str) -> None:
    raise SystemExit(message)

async def _insert(txn: Transaction, chat_id: str, seq: int) -> None:
    await txn.execute(
        "INSERT INTO messages (chat_id, seq, id, sender_id, encrypted_content, created_at)"
        " VALUES (?, ?, ?, 'bench', '{}', 0)", (chat_id, seq, str(uuid.uuid4())))


async def measure(name: str, database: Database, count: int) -> None:
    database.start()
    await database.when_ready()
    chat_id = str(uuid.uuid4())
    await database.run_operation(
        "INSERT INTO chats (id, created_at, updated_at) VALUES (?, 0, 0)", (chat_id,))

    started = time.perf_counter()
    for _ in range(count):
        await database.run_query("SELECT 1")
    sequential = (time.perf_counter() - started) / count

    started = time.perf_counter()
    for _ in range(count // 50):
        await defer.gatherResults([
            defer.Deferred.fromCoroutine(database.run_query("SELECT 1")) for _ in range(50)])
    concurrent_qps = (count // 50) * 50 / (time.perf_counter() - started)

    seq = 0
    started = time.perf_counter()
    for _ in range(count // 4):
        seq += 1
        await database.run_interaction("insert", _insert, chat_id, seq)
    txn_sequential = (count // 4) / (time.perf_counter() - started)

    started = time.perf_counter()
    rounds = count // 100
    for _ in range(rounds):
        batch = []
        for _ in range(50):
            seq += 1
            batch.append(defer.Deferred.fromCoroutine(
                database.run_interaction("insert", _insert, chat_id, seq)))
        await defer.gatherResults(batch)
    txn_concurrent = rounds * 50 / (time.perf_counter() - started)

    # Group commit: many senders at once through the SendBatcher.
    from cyphr.handlers.sending import SendBatcher
    from cyphr.store.messages import MessageStore, Outgoing
    await database.run_operation(
        "INSERT INTO cyphr_identities (id, cyphr_id, public_key, created_at, updated_at)"
        " VALUES (?, 'bench', ?, 0, 0)", (str(uuid.uuid4()), b"k" * 32))
    # A chat of its own: the inserts above did not go through chats.last_seq.
    chat_id = str(uuid.uuid4())
    await database.run_operation(
        "INSERT INTO chats (id, created_at, updated_at) VALUES (?, 0, 0)", (chat_id,))
    await database.run_operation(
        "INSERT INTO chat_participants (chat_id, user_id, joined_at) VALUES (?, 'bench', 0)", (chat_id,))
    from twisted.internet import reactor as the_reactor
    batcher = SendBatcher(MessageStore(database), the_reactor)
    payload = "{" + '"c":"' + "x" * 1000 + '"}'
    total = count * 5
    started = time.perf_counter()
    for _ in range(total // 200):
        await defer.gatherResults([batcher.submit(Outgoing(
            str(uuid.uuid4()), chat_id, "bench", payload, "text", None, 0)) for _ in range(200)])
    batched = (total // 200) * 200 / (time.perf_counter() - started)

    print(f"{name:10s} query latency {sequential * 1e6:7.0f} us | queries/s (50 in flight) "
          f"{concurrent_qps:7.0f} | 1-row txns/s sequential {txn_sequential:6.0f}, "
          f"50 in flight {txn_concurrent:6.0f} | group commit, 200 in flight: {batched:7.0f} msgs/s")
    await database.close()


async def main(reactor: object, count: int) -> None:
    from twisted.internet import reactor as the_reactor

    directory = tempfile.mkdtemp(prefix="cyphr-bench-")
    await measure("sqlite", SQLiteDatabase(os.path.join(directory, "bench.sqlite3"), the_reactor,
                                                    on_fatal=_fatal), count)
    cluster = postgres.new_cluster()
    try:
        url = cluster.create_database()
        await measure("postgresql", PostgresDatabase(url, the_reactor, on_fatal=_fatal,
                                                                   pool_size=10), count)
    finally:
        cluster.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000)
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments.count)))
