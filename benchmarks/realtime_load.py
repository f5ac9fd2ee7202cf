"""
Realtime load: Socket.IO clients over WebSocket, messages and idle sockets.

    python benchmarks/realtime_load.py [--pairs 200] [--users 2*pairs] [--rate 2000]
        [--seconds 15] [--processes 1] [--payload-bytes 1024] [--workers 1] [--by-chat]
        [--devices 1] [--name-devices] [--client python|js]
        [--sqlite | --server-url URL ...]
    python benchmarks/realtime_load.py --idle 19000 [--users 1000] [--hold 30] [--workers 2]
        [--sqlite | --server-url URL]

Traffic (the default): starts a throwaway PostgreSQL cluster and ``twistd -n
cyphr`` in --processes processes (or one on SQLite, or uses running servers),
registers --users users over REST, connects each as a Socket.IO client over
WebSocket, authenticated by the CONNECT payload ``{"token": ...}``, and waits
for its ``sync_complete``. It pairs them, sender and receiver (on different
server processes when there are several, so that messages cross the bus),
makes each pair's direct chat with one message and waits for it, then sends
``send_message`` events with ack ids at --rate a second in total, on a fixed
timetable spread over the senders whatever the acks do (open loop), for
--seconds; then waits a while for stragglers. Per message it measures the ack
latency (send -> ack) and the delivery latency (send -> the receiver's
``new_message``, matched by clientMessageId), both from the time the
timetable set for the send, so that a late load generator cannot hide a slow
server. It prints counts (sent, acked, delivered, lost, duplicated,
out of order), delivered messages a second, latency percentiles, the CPU
and memory of the servers, of PostgreSQL, of itself and of the rest of the
machine (the machine is shared: a busy neighbour shows there), and, on
PostgreSQL, how the messages were written (batches, transactions and chat
row updates per message, from PostgreSQL's statistics), the server's CPU
per message, and the sizes of the server's group-commit batches over the
window's messages (its ``cyphr_send_batch_size`` histogram, read from
``/metrics`` before the window and after the stragglers). Messages name their
recipient (recipientId), as a first message does; --by-chat names the chat
instead, which spares the server two lookups a message. --payload-bytes is
the size of each message's encryptedPayload JSON.

Devices (--devices N): each user of the pairs gets N devices (N-1
recoveries keeping the others, each with its own fingerprint) and each
device its own socket; the sender's device 1 sends, and each message must
reach every other socket of the pair once (the receiver's N devices and the
sender's N-1 others): deliveries, lost and duplicated count per socket, the
delivery latency has one sample per socket, and "to the last socket" is when
a message had reached all of them. --name-devices makes each send name the
chat's devices (``devices: [{cyphrId, deviceId}]``, the sending device
aside), so that the server checks the list against the chat's devices: with
and without it gives that check's cost (server CPU per message).

Spawned servers get send and event rate limits high enough not to refuse
the load (--rate-limit-send, --realtime-event-rate); a running server keeps
its own, so spread the rate over enough pairs (the defaults allow 30
messages a second per user and 100 events a second per connection).

Idle (--idle C): one server process, C authenticated sockets (of --users
users, several sockets each, round robin: registration costs an Ed25519
signature and a key check each), held for --hold seconds so that every
socket answers the server's pings; prints the time connecting took and the
server's RSS before and after, per connection. Handshakes run --connect-
concurrency at a time: Twisted's listen backlog is 50, and a SYN beyond it
costs the client a second.

The clients are benchmarks/sioclient.py on uvloop when installed, in
--workers processes. With --client js (traffic only) they are the stock
JavaScript socket.io-client under Node instead, benchmarks/js/load.mjs in
--workers processes (``npm ci --prefix benchmarks/js`` first, which this
script runs when node_modules is missing), so that the figures do not depend
on our own client; the pairs' direct chats are then made over REST before
the sockets connect. The same table comes out either way.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import gc
import glob
import json
import multiprocessing
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator
from urllib.parse import urlsplit
from urllib.request import urlopen

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    CLOCK_TICK,
    Connection,
    User,
    cpu_seconds,
    cpu_times,
    cyphr_servers,
    family_cpu_seconds,
    percentile,
    recover,
    register,
    run_loop,
)
from sioclient import Client, ConnectFailed, connect  # noqa: E402

HOST = "127.0.0.1"
SETUP = 1_000_000_000      # ack ids from here on belong to the chat-making messages
JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
HIGH_LIMITS = ["--rate-limit-send", "100000000/1s", "--realtime-event-rate", "100000000/1s"]


# -- processes seen from /proc ----------------------------------------------------


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, every core."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / CLOCK_TICK, sum(values[:8]) / CLOCK_TICK


def listening_pid(port: int) -> int | None:
    """The local process listening on ``port``, if it can be seen."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{parts[9]}]")
        except OSError:
            continue
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                return int(fd.split("/")[2])
        except OSError:
            continue
    return None


# -- servers and users ------------------------------------------------------------


def pg_counters(url: str) -> dict[str, int]:
    """PostgreSQL's activity counters for the database: transactions (an
    autocommit query is one), messages inserted, chat rows updated, stream
    position updates (one per batch of messages), and WAL bytes written. The statistics
    reach these views within a second or so: the figures are approximate."""
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database"
                           " WHERE datname = current_database()")
            counters = {"transactions": cursor.fetchone()[0]}
            # WAL written, for the whole cluster (the benchmark's own).
            cursor.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            counters["wal bytes"] = cursor.fetchone()[0]
            # messages is split into partitions messages_0 .. messages_99.
            cursor.execute("SELECT regexp_replace(relname, '_[0-9]+$', ''), sum(n_tup_ins),"
                           " sum(n_tup_upd) FROM pg_stat_user_tables"
                           " WHERE relname ~ '^(messages(_[0-9]+)?|chats|message_stream)$' GROUP BY 1")
            for name, inserted, updated in cursor.fetchall():
                counters[f"{name} inserted"] = int(inserted)
                counters[f"{name} updated"] = int(updated)
    finally:
        conn.close()
    return counters


class Target:
    """Where the clients go, and which processes to watch."""

    def __init__(self, ports: list[int], pids: list[int | None], postgres_pid: int | None,
                 description: str, database: str = "") -> None:
        self.ports, self.pids, self.postgres_pid = ports, pids, postgres_pid
        self.description, self.database = description, database


@asynccontextmanager
async def target(args: argparse.Namespace, processes: int) -> AsyncIterator[Target]:
    if args.server_url:
        ports = []
        for url in args.server_url:
            parts = urlsplit(url)
            if parts.hostname not in ("127.0.0.1", "localhost"):
                raise SystemExit("--server-url: this load generator connects to 127.0.0.1 only")
            ports.append(parts.port or 80)
        yield Target(ports, [listening_pid(p) for p in ports], None,
                     f"{len(ports)} running server(s), their own rate limits")
        return
    async with cyphr_servers(processes, args.pool, HIGH_LIMITS, sqlite=args.sqlite,
                             log=args.server_log) as servers:
        engine = "SQLite" if args.sqlite else "PostgreSQL"
        yield Target(list(servers), list(servers.pids), servers.postgres_pid,
                     f"{engine}, {processes} server process(es), send and event limits raised",
                     servers.database)


Devices = list[tuple[str, int]]  # a user's devices: (token, deviceId), device 1 first


async def register_all(port: int, count: int, concurrency: int = 32, *, devices: int = 1,
                       with_devices: int = 0) -> list[tuple[str, Devices]]:
    """``count`` new users: (cyphrId, its devices) each; the first
    ``with_devices`` users get ``devices`` devices (devices-1 recoveries
    that keep the others, each with its own fingerprint), the rest one.
    Names carry a random run prefix so that a running server can take
    several runs."""
    run = secrets.token_hex(3)
    users = [User(f"rt{run}_{n}") for n in range(count)]
    owned: list[Devices] = [[] for _ in range(count)]
    queue = iter(range(count))

    async def one_by_one() -> None:
        for n in queue:
            # Registration makes device 1 (the single-device API's device).
            owned[n].append((await register(port, users[n]), 1))
            for _ in range(devices - 1 if n < with_devices else 0):
                owned[n].append(await recover(port, users[n], secrets.token_hex(32)))

    await asyncio.gather(*(one_by_one() for _ in range(min(concurrency, count))))
    return [(u.cyphr_id, d) for u, d in zip(users, owned)]


def devices_list(sender: tuple[str, Devices], receiver: tuple[str, Devices]) -> list[dict]:
    """The ``devices`` of a send by the sender's device 1 to the receiver:
    the chat's devices, the sending device aside, as a client that sealed
    once per device names them (the server then checks the list)."""
    named = [(sender[0], d) for _, d in sender[1][1:]] + [(receiver[0], d) for _, d in receiver[1]]
    return [{"cyphrId": c, "deviceId": d} for c, d in named]


def devices_field(sender: tuple[str, Devices], receiver: tuple[str, Devices]) -> str:
    """devices_list as a member of the send's JSON, comma included."""
    return '"devices":' + json.dumps(devices_list(sender, receiver), separators=(",", ":")) + ","


def payload_json(size: int) -> str:
    """An encryptedPayload of ``size`` bytes of JSON (at least 88), base64 inside."""
    nonce = base64.b64encode(os.urandom(24)).decode()
    empty = json.dumps({"v": 2, "nonce": nonce, "encryptedMessage": ""}, separators=(",", ":"))
    room = max(16, size - len(empty))
    return json.dumps({"v": 2, "nonce": nonce,
                       "encryptedMessage": base64.b64encode(os.urandom(room)).decode()[:room]},
                      separators=(",", ":"))


async def make_chats(pairs: list[tuple], concurrency: int = 32) -> dict[int, tuple[str, int]]:
    """Each pair's direct chat, made over REST by one message of the
    sender's device 1 (--client js: before the sockets connect, so the
    receivers find it in their catch-up); pair number -> (chatId, its seq)."""
    chats: dict[int, tuple[str, int]] = {}
    queue = iter(pairs)

    async def one_by_one() -> None:
        for pair in queue:
            conn = await Connection.open(pair[1])
            try:
                status, body = await conn.post("/api/messaging/send", {
                    "recipientId": pair[5], "encryptedPayload": {"v": 2, "setup": True},
                    "clientMessageId": f"s{pair[0]}"}, token=pair[2])
            finally:
                conn.close()
            if status != 201:
                raise SystemExit(f"setup failed: making a direct chat: {status} {body}")
            chats[pair[0]] = (body["chatId"], body["seq"])

    await asyncio.gather(*(one_by_one() for _ in range(min(concurrency, len(pairs)))))
    return chats


# -- the servers' batch sizes, from /metrics ---------------------------------------

BATCH_METRIC = "cyphr_send_batch_size"  # cyphr/metrics.py: messages per group-commit transaction


def batch_histogram(ports: list[int]) -> dict[str, float] | str:
    """The servers' cyphr_send_batch_size, summed over them: cumulative
    bucket counts by upper bound ("le"), plus "sum" and "count"; or why it
    could not be read (a running server with --metrics-listen serves
    /metrics elsewhere). Blocking: run it off the event loop."""
    from prometheus_client.parser import text_string_to_metric_families

    total: dict[str, float] = collections.defaultdict(float)
    for port in ports:
        try:
            with urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as answer:
                text = answer.read().decode()
        except OSError as e:
            return f"/metrics of port {port} not readable ({e})"
        for family in text_string_to_metric_families(text):
            if family.name != BATCH_METRIC:
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    total[sample.labels["le"]] += sample.value
                elif sample.name.endswith("_sum"):
                    total["sum"] += sample.value
                elif sample.name.endswith("_count"):
                    total["count"] += sample.value
    return dict(total) if total else f"no {BATCH_METRIC} in /metrics"


def batch_sizes(before: dict[str, float] | str, after: dict[str, float] | str) -> str:
    """The window's batches by size, from two readings of batch_histogram."""
    if isinstance(before, str) or isinstance(after, str):
        return f"server batch sizes: unknown, {before if isinstance(before, str) else after}"
    batches = after["count"] - before["count"]
    messages = after["sum"] - before["sum"]
    if not batches:
        return "server batch sizes: no batches in the window"
    bounds = sorted((k for k in after if k not in ("sum", "count")), key=float)
    parts, below, previous = [], 0.0, 0
    for le in bounds:
        cumulative = after[le] - before.get(le, 0.0)
        count, below = cumulative - below, cumulative
        if le == "+Inf":
            label = f">{previous}"
        else:
            bound = int(float(le))
            label = str(bound) if bound == previous + 1 else f"{previous + 1}-{bound}"
            previous = bound
        if count:
            parts.append(f"{label}: {count:.0f} ({count / batches * 100:.0f}%)")
    return (f"server batch sizes ({BATCH_METRIC}, the window's messages): {batches:.0f} batches "
            f"of {messages:.0f} messages, {messages / batches:.1f} a batch; batches by size "
            "(empty buckets left out) " + "  ".join(parts))


# -- the worker processes ---------------------------------------------------------


def worker_main(conn: Any, spec: dict[str, Any]) -> None:
    """Entry point of a load process: its sockets and its share of the load."""
    main = traffic_worker if spec["mode"] == "traffic" else idle_worker
    try:
        run_loop(main(conn, spec))
    except BaseException:
        conn.send(("error", traceback.format_exc()))  # or the coordinator would wait on
        raise


async def ask(conn: Any) -> Any:
    """The coordinator's next word (the pipe read runs off the event loop)."""
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


async def connect_all(plan: list[tuple[int, str]], concurrency: int, **options: Any
                      ) -> tuple[list[Client | None], list[str]]:
    """Connect one client per (port, token), ``concurrency`` handshakes at a
    time; the clients (None where it failed) and the failures."""
    clients: list[Client | None] = [None] * len(plan)
    failures: list[str] = []
    queue = iter(range(len(plan)))

    async def one_by_one() -> None:
        for n in queue:
            port, token = plan[n]
            try:
                clients[n] = await connect(HOST, port, {"token": token}, **options)
            except (OSError, ConnectFailed, TimeoutError) as e:
                failures.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(one_by_one() for _ in range(min(concurrency, len(plan)))))
    return clients, failures


class Traffic:
    """One load process's share of the pairs: what it sent and what came back."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.rate: float = spec["rate"]
        self.total = int(spec["rate"] * spec["seconds"])
        self.acked = [0.0] * self.total
        # (receiving socket, message) -> when it arrived: with several
        # devices a message must reach each of them once.
        self.delivered: dict[tuple[int, int], float] = {}
        self.ack_errors: collections.Counter[str] = collections.Counter()
        self.n_acked = self.n_failed = self.n_delivered = 0
        self.duplicated = self.lower = self.gaps = 0
        self.setup_acked = self.setup_delivered = 0
        self.chat_ids: dict[int, str] = {}  # pair number -> its direct chat
        self.last_seq: dict[tuple[int, str], int] = {}
        self.other_events: collections.Counter[str] = collections.Counter()

    def on_ack(self, client: Client, ack_id: int, args: list[Any]) -> None:
        answer = args[0] if args else {}
        if ack_id >= SETUP:
            self.setup_acked += 1
            if answer.get("success"):
                self.chat_ids[ack_id - SETUP] = answer["chatId"]
            else:
                self.ack_errors[f"setup {answer.get('code')}"] += 1
            return
        if answer.get("success"):
            self.acked[ack_id] = time.monotonic()
            self.n_acked += 1
        else:
            self.n_failed += 1
            self.ack_errors[str(answer.get("code"))] += 1

    def on_event(self, client: Client, name: str, data: Any) -> None:
        if name != "new_message":
            if name != "authenticated":
                self.other_events[name] += 1
            return
        now = time.monotonic()
        message = data["message"]
        client_id = message.get("clientMessageId") or ""
        key = (id(client), message["chatId"])
        seq = message["seq"]
        if client_id[:1] == "s":
            self.setup_delivered += 1
            self.last_seq[key] = seq
            return
        m = int(client_id)
        if (id(client), m) in self.delivered:
            self.duplicated += 1
            return
        self.delivered[id(client), m] = now
        self.n_delivered += 1
        previous = self.last_seq.get(key, 0)
        if seq <= previous:
            self.lower += 1
        else:
            if seq > previous + 1:
                self.gaps += 1
            self.last_seq[key] = seq


async def traffic_worker(conn: Any, spec: dict[str, Any]) -> None:
    state = Traffic(spec)
    # (pair number, sender port, token, receiver port, token, receiver id,
    #  the other devices' (port, token), the devices field of a send or "")
    pairs = spec["pairs"]
    plan = [(p[1], p[2]) for p in pairs] + [(p[3], p[4]) for p in pairs] + \
        [d for p in pairs for d in p[6]] + spec["bystanders"]
    # Every socket of the pair but the sending one gets each message.
    fan = 1 + len(pairs[0][6]) if pairs else 1
    started = time.monotonic()
    clients, failures = await connect_all(plan, spec["connect_concurrency"],
                                          on_event=state.on_event, on_ack=state.on_ack)
    connected = time.monotonic() - started
    senders = clients[:len(pairs)]
    heads = [f'["send_message",{{"recipientId":"{p[5]}",{p[7]}"encryptedPayload":'
             f'{spec["payload"]},"clientMessageId":"' for p in pairs]

    # Each pair's direct chat, made by one message, which must arrive.
    for n, (pair, sender) in enumerate(zip(pairs, senders)):
        if sender is not None:
            sender.send_text(f"42{SETUP + pair[0]}{heads[n]}s{pair[0]}\"}}]")
    deadline = time.monotonic() + 60
    while (state.setup_acked < len(pairs) or state.setup_delivered < fan * len(pairs)) \
            and time.monotonic() < deadline and not failures:
        await asyncio.sleep(0.05)
    if spec["by_chat"]:
        # Addressed by chatId: no lookup of the recipient and its direct chat.
        heads = [f'["send_message",{{"chatId":"{state.chat_ids.get(p[0])}",{p[7]}'
                 f'"encryptedPayload":{spec["payload"]},"clientMessageId":"' for p in pairs]
    conn.send(("ready", len(plan) - len(failures), failures[:5], connected,
               state.setup_acked, state.setup_delivered))

    _, t0 = await ask(conn)
    rate, total, count = state.rate, state.total, spec["pair_count"]
    mine = {pair[0]: (n, senders[n]) for n, pair in enumerate(pairs)}
    schedule = [m for m in range(total) if m % count in mine]
    lags: list[float] = []
    # No cyclic garbage collection while measuring: a full collection of
    # this process would pause its reading and count as server latency.
    gc.freeze()
    gc.disable()
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = usage.ru_utime + usage.ru_stime
    sent = 0
    for m in schedule:
        due = t0 + m / rate
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
            now = time.monotonic()
        n, sender = mine[m % count]
        if sender is not None:
            sender.send_text(f"42{m}{heads[n]}{m}\"}}]")
            sent += 1
        lags.append(now - due)
        if now - due > 0.002 and sent % 64 == 0:
            await asyncio.sleep(0)  # behind: let what arrived be read meanwhile
    window_end = t0 + spec["seconds"]
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_window = usage.ru_utime + usage.ru_stime - cpu_start

    deadline = time.monotonic() + spec["drain"]
    while time.monotonic() < deadline and (
            state.n_acked + state.n_failed < sent or state.n_delivered < fan * state.n_acked):
        await asyncio.sleep(0.05)

    # Per receiving socket: one latency per (message, socket); "all" is
    # when the last of a message's sockets had it (all of them did).
    ack_ms, delivery_ms, all_ms, in_window = [], [], [], 0
    arrivals: dict[int, list[float]] = collections.defaultdict(list)
    for (_, m), at in state.delivered.items():
        arrivals[m].append(at)
    for m in schedule:
        due = t0 + m / rate
        if state.acked[m]:
            ack_ms.append((state.acked[m] - due) * 1000)
        for at in arrivals.get(m, ()):
            delivery_ms.append((at - due) * 1000)
            if at <= window_end:
                in_window += 1
        if len(arrivals.get(m, ())) == fan:
            all_ms.append((max(arrivals[m]) - due) * 1000)
    dropped = sum(1 for c in clients if c is not None and c.closed.done())
    conn.send(("done", {
        "sent": sent, "acked": state.n_acked, "failed": state.n_failed, "fan": fan,
        "delivered": state.n_delivered, "in_window": in_window, "all_ms": all_ms,
        "duplicated": state.duplicated, "lower": state.lower, "gaps": state.gaps,
        "ack_errors": dict(state.ack_errors), "ack_ms": ack_ms, "delivery_ms": delivery_ms,
        "lag_ms": [lag * 1000 for lag in lags], "cpu": cpu_window, "dropped": dropped,
        "other_events": dict(state.other_events)}))
    await ask(conn)
    for client in clients:
        if client is not None:
            client.abort()


async def idle_worker(conn: Any, spec: dict[str, Any]) -> None:
    conn.send(("up",))
    await ask(conn)
    started = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    clients, failures = await connect_all(spec["plan"], spec["connect_concurrency"],
                                          timeout=spec["connect_timeout"])
    elapsed = time.monotonic() - started
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage_after.ru_utime + usage_after.ru_stime - usage.ru_utime - usage.ru_stime
    conn.send(("connected", len(spec["plan"]) - len(failures), failures[:5], elapsed, cpu))
    await ask(conn)  # the hold is over
    live = [c for c in clients if c is not None]
    conn.send(("held", sum(1 for c in live if not c.closed.done()), sum(c.pings for c in live),
               sum(1 for c in live if c.closed.done()),
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    await ask(conn)
    for client in live:
        client.abort()


class Workers:
    """The load processes, each on one end of a pipe."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes, self.processes = [], []
        for spec in specs:
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(theirs, spec), daemon=True)
            process.start()
            self.pipes.append(ours)
            self.processes.append(process)

    async def gather(self, timeout: float = 600) -> list[Any]:
        """One answer from each."""
        loop = asyncio.get_running_loop()
        answers = await asyncio.wait_for(asyncio.gather(
            *(loop.run_in_executor(None, pipe.recv) for pipe in self.pipes)), timeout)
        for answer in answers:
            if answer[0] == "error":
                raise RuntimeError(f"a load process failed:\n{answer[1]}")
        return list(answers)

    def tell(self, message: Any) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def stop(self) -> None:
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()


class NodeWorkers:
    """--client js: the load processes are benchmarks/js/load.mjs under Node,
    the stock socket.io-client, each given its spec on stdin and answering
    in JSON lines on stdout (the protocol is in load.mjs's header). It
    answers as Workers does, so that the coordinator does not tell them
    apart."""

    def __init__(self, processes: list[asyncio.subprocess.Process]) -> None:
        self.processes = processes
        self.payload_bytes = 0

    @classmethod
    async def start(cls, specs: list[dict[str, Any]]) -> NodeWorkers:
        node = node_ready()
        processes = []
        for spec in specs:
            # Its results come as one line of a few MB: raise the line limit.
            process = await asyncio.create_subprocess_exec(
                node, os.path.join(JS_DIR, "load.mjs"), cwd=JS_DIR, limit=2**30,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            process.stdin.write(json.dumps(spec).encode() + b"\n")  # type: ignore[union-attr]
            processes.append(process)
        return cls(processes)

    async def gather(self, timeout: float = 600) -> list[Any]:
        """One answer from each, in Workers' shapes."""
        async def one(process: asyncio.subprocess.Process) -> dict[str, Any]:
            line = await process.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"a Node load process failed (status {await process.wait()}; "
                                   "its stderr is above)")
            return json.loads(line)

        answers = []
        for answer in await asyncio.wait_for(asyncio.gather(*map(one, self.processes)), timeout):
            if "ready" in answer:
                r = answer["ready"]
                self.payload_bytes = r["payloadBytes"]
                # The chats were made over REST: first messages "acked" by
                # it; seen by the receivers in their catch-up.
                answers.append(("ready", r["sockets"], r["failures"], r["connectSeconds"],
                                None, r["setupSeen"]))
            else:
                answers.append(("done", answer["done"]))
        return answers

    def tell(self, message: Any) -> None:
        if message[0] == "go":
            # A common instant on the one clock Node and we share: the wall clock.
            word = {"start": (time.time() + message[1] - time.monotonic()) * 1000}
        else:
            word = {"close": True}
        for process in self.processes:
            process.stdin.write(json.dumps(word).encode() + b"\n")  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Told to close, they end by themselves; otherwise (a failure) they are killed."""
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 5)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()


def url(port: int) -> str:
    return f"http://{HOST}:{port}"


def node_ready() -> str:
    """The node executable, with benchmarks/js's packages installed."""
    node = shutil.which("node")
    if node is None:
        raise SystemExit("--client js needs Node.js (node on PATH)")
    if not os.path.exists(os.path.join(JS_DIR, "node_modules", "socket.io-client", "package.json")):
        print("benchmarks/js/node_modules is missing: running npm ci --prefix benchmarks/js",
              flush=True)
        subprocess.run(["npm", "ci", "--prefix", JS_DIR], check=True)
    return node


def client_description(client: str) -> str:
    """Which client drives the load, and its version or event loop."""
    if client == "js":
        with open(os.path.join(JS_DIR, "node_modules", "socket.io-client", "package.json")) as f:
            version = json.load(f)["version"]
        node = subprocess.run([node_ready(), "--version"], capture_output=True, text=True).stdout
        return f"stock socket.io-client {version} on Node {node.strip()}"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "benchmarks/sioclient.py on asyncio (uvloop is not installed)"
    return "benchmarks/sioclient.py on uvloop"


# -- the modes --------------------------------------------------------------------


def ms(values: list[float], label: str) -> str:
    if not values:
        return f"{label:<20} (none)"
    values.sort()
    return (f"{label:<20} p50 {percentile(values, 0.50):7.1f}  p95 {percentile(values, 0.95):7.1f}  "
            f"p99 {percentile(values, 0.99):7.1f}  max {values[-1]:7.1f}")


async def traffic(args: argparse.Namespace) -> None:
    users_count = args.users or 2 * args.pairs
    if users_count < 2 * args.pairs:
        raise SystemExit("--users must be at least 2 x --pairs: every pair has its own two users")
    async with target(args, args.processes) as where:
        ports = where.ports
        began = time.monotonic()
        users = await register_all(ports[0], users_count, devices=args.devices,
                                   with_devices=2 * args.pairs)
        print(f"registered {users_count} users ({args.devices} device(s) each in the pairs) "
              f"in {time.monotonic() - began:.1f} s")
        k = len(ports)
        # Pair n: users 2n -> 2n+1, the sender on one server, the receiver on the next;
        # the sender's device 1 sends, every other device of both listens.
        pairs = [(n, ports[n % k], users[2 * n][1][0][0], ports[(n + 1) % k],
                  users[2 * n + 1][1][0][0], users[2 * n + 1][0],
                  [(ports[n % k], t) for t, _ in users[2 * n][1][1:]]
                  + [(ports[(n + 1) % k], t) for t, _ in users[2 * n + 1][1][1:]],
                  devices_field(users[2 * n], users[2 * n + 1]) if args.name_devices else "")
                 for n in range(args.pairs)]
        bystanders = [(ports[n % k], users[n][1][0][0])
                      for n in range(2 * args.pairs, users_count)]
        payload = payload_json(args.payload_bytes)
        payload_bytes = len(payload)
        workers: Workers | NodeWorkers
        if args.client == "js":
            began = time.monotonic()
            chats = await make_chats(pairs)
            print(f"made {len(chats)} direct chats over REST in {time.monotonic() - began:.1f} s")
            workers = await NodeWorkers.start([{
                "pairs": [{"n": p[0], "sender": [url(p[1]), p[2]],
                           # The receiver's device 1 first, then every other device of both.
                           "listeners": [[url(p[3]), p[4]]] + [[url(q), t] for q, t in p[6]],
                           "recipientId": p[5], "chatId": chats[p[0]][0], "setupSeq": chats[p[0]][1],
                           "devices": devices_list(users[2 * p[0]], users[2 * p[0] + 1])
                           if args.name_devices else None}
                          for p in pairs[w::args.workers]],
                "bystanders": [[url(q), t] for q, t in bystanders[w::args.workers]],
                "pairCount": args.pairs, "rate": args.rate, "seconds": args.seconds,
                "drain": args.drain, "payloadBytes": args.payload_bytes, "byChat": args.by_chat,
                "acknowledge": args.acknowledge,
                "connectConcurrency": max(1, args.connect_concurrency // args.workers),
                "connectTimeout": 60,
            } for w in range(args.workers)])
        else:
            workers = Workers([{
                "mode": "traffic", "pairs": pairs[w::args.workers], "pair_count": args.pairs,
                "bystanders": bystanders[w::args.workers], "rate": args.rate,
                "seconds": args.seconds, "payload": payload, "drain": args.drain,
                "connect_concurrency": max(1, args.connect_concurrency // args.workers),
                "by_chat": args.by_chat,
            } for w in range(args.workers)])
        try:
            began = time.monotonic()
            ready = await workers.gather()
            sockets = sum(r[1] for r in ready)
            if isinstance(workers, NodeWorkers):
                payload_bytes = workers.payload_bytes
                made = (f"({sum(r[5] for r in ready)} first messages seen in the receivers' "
                        "catch-up)")
            else:
                made = (f"and made {sum(r[4] for r in ready)} direct chats "
                        f"({sum(r[5] for r in ready)} first messages delivered)")
            print(f"connected {sockets}/{len(bystanders) + 2 * args.pairs * args.devices} "
                  f"sockets {made} in {time.monotonic() - began:.1f} s")
            problems = [f for r in ready for f in r[2]]
            if problems or sum(r[5] for r in ready) < args.pairs:
                raise SystemExit(f"setup failed: {problems or 'first messages missing'}")

            await asyncio.sleep(1.5)  # PostgreSQL's statistics catch up with the setup
            counters0 = pg_counters(where.database) if where.database else {}
            batches0 = await asyncio.to_thread(batch_histogram, ports)
            t0 = time.monotonic() + 1.0
            workers.tell(("go", t0))
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
            watched = [p for p in where.pids if p]
            times0 = [cpu_times(p) for p in watched]
            pg0 = family_cpu_seconds(where.postgres_pid) if where.postgres_pid else 0.0
            machine0 = machine_cpu()
            await asyncio.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
            machine1 = machine_cpu()
            window = time.monotonic() - t0
            times1 = [cpu_times(p) for p in watched]
            # Each server's CPU over the window, and the kernel's share of it.
            spent = [b[0] - a[0] for a, b in zip(times0, times1)]
            in_kernel = sum(b[1] - a[1] for a, b in zip(times0, times1))
            pg1 = family_cpu_seconds(where.postgres_pid) if where.postgres_pid else 0.0
            rss = [rss_bytes(p) for p in watched]
            results = [r[1] for r in await workers.gather(args.seconds + args.drain + 120)]
            # After the stragglers: the histogram then holds the window's messages.
            batches1 = await asyncio.to_thread(batch_histogram, ports)
            workers.tell(("close",))
            await asyncio.sleep(1.5)
            counters1 = pg_counters(where.database) if where.database else {}
        finally:
            if isinstance(workers, NodeWorkers):
                await workers.stop()
            else:
                workers.stop()

    total = {key: sum(r[key] for r in results)
             for key in ("sent", "acked", "failed", "delivered", "in_window", "duplicated",
                         "lower", "gaps", "dropped")}
    errors: collections.Counter[str] = collections.Counter()
    others: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r["ack_errors"])
        others.update(r["other_events"])
    expected = sum(r["sent"] * r["fan"] for r in results)
    lost = expected - total["delivered"]
    fan = results[0]["fan"] if results else 1
    complete = [x for r in results for x in r["all_ms"]]
    print(f"realtime traffic: {where.description}; {users_count} users, {args.pairs} pairs, "
          f"{args.devices} device(s) a user ({fan} receiving socket(s) a message"
          f"{', the devices named in each send' if args.name_devices else ''}), "
          f"{args.workers} load process(es) of {client_description(args.client)}; "
          f"{args.rate:g} msg/s offered for {args.seconds:g} s, "
          f"{payload_bytes}-byte encryptedPayload, by {'chatId' if args.by_chat else 'recipientId'}"
          f"{', each delivery acknowledged' if args.acknowledge else ''}")
    print(f"sent {total['sent']}  acked {total['acked']}  deliveries {total['delivered']}"
          f"/{expected} (one per receiving socket)  lost {lost}  duplicated {total['duplicated']}  "
          f"out-of-order {total['lower'] + total['gaps']} (lower seq {total['lower']}, "
          f"gaps {total['gaps']})")
    print(f"ack errors {total['failed']}" + (f" {dict(errors)}" if errors else "")
          + f"; sockets dropped {total['dropped']}"
          + (f"; other events {dict(others)}" if others else ""))
    print(f"achieved {len(complete) / args.seconds:.0f} msg/s delivered to every socket, "
          f"{total['delivered'] / args.seconds:.0f} deliveries/s "
          f"({total['in_window'] / args.seconds:.0f} deliveries/s within the window)")
    print(ms([x for r in results for x in r["ack_ms"]], "ack latency ms"))
    print(ms([x for r in results for x in r["delivery_ms"]], "delivery latency ms"))
    if fan > 1:
        print(ms(complete, "to the last socket"))
    print(ms([x for r in results for x in r["lag_ms"]], "send lag ms"))
    cpu = [f"{seconds / window * 100:.0f}%" for seconds in spent]
    print(f"CPU over the window (100% = one core): servers {', '.join(cpu) or 'unknown'}"
          + (f"; PostgreSQL {(pg1 - pg0) / window * 100:.0f}%" if where.postgres_pid else "")
          + f"; load generator {sum(r['cpu'] for r in results) / window * 100:.0f}%")
    if counters1:
        change = {key: counters1.get(key, 0) - counters0.get(key, 0) for key in counters1}
        stored = change.get("messages inserted", 0)
        batches = change.get("message_stream updated", 0)
        print(f"PostgreSQL (approximate): {stored} messages stored in {batches} batches"
              + (f" ({stored / max(1, batches):.1f} a batch); "
                 f"{change['transactions'] / stored:.2f} transactions and "
                 f"{change.get('chats updated', 0) / stored:.2f} chat row updates and "
                 f"{change.get('wal bytes', 0) / stored:.0f} bytes of WAL per message"
                 if stored else f"; {change['transactions']} transactions"))
    ours = sum(spent) + pg1 - pg0 + sum(r["cpu"] for r in results)
    busy = machine1[0] - machine0[0]
    print(f"machine: {busy / window * 100:.0f}% busy of {os.cpu_count()} cores x 100%, of which "
          f"others (not the processes above) {max(0.0, busy - ours) / window * 100:.0f}%; "
          f"load average {os.getloadavg()[0]:.1f}")
    if rss:
        print(f"server RSS MiB: {', '.join(f'{b / 2**20:.0f}' for b in rss)}")
    if total["sent"]:
        print(f"server CPU per message: "
              f"{sum(spent) / total['sent'] * 1e6:.0f} µs "
              f"(in the kernel {in_kernel / total['sent'] * 1e6:.0f})"
              + (f"; PostgreSQL {(pg1 - pg0) / total['sent'] * 1e6:.0f} µs"
                 if where.postgres_pid else ""))
    print(batch_sizes(batches0, batches1))


async def idle(args: argparse.Namespace) -> None:
    count = args.idle
    users_count = args.users or min(count, 1000)
    async with target(args, 1) as where:
        port, pid = where.ports[0], where.pids[0]
        began = time.monotonic()
        users = await register_all(port, users_count)
        print(f"registered {users_count} users in {time.monotonic() - began:.1f} s")
        plan = [(port, users[n % users_count][1][0][0]) for n in range(count)]
        workers = Workers([{
            "mode": "idle", "plan": plan[w::args.workers],
            "connect_concurrency": max(1, args.connect_concurrency // args.workers),
            "connect_timeout": 120,
        } for w in range(args.workers)])
        try:
            await workers.gather()
            await asyncio.sleep(2)  # the server settles after the registrations
            before = rss_bytes(pid) if pid else 0
            cpu0 = cpu_seconds(pid) if pid else 0.0
            counters0 = pg_counters(where.database) if where.database else {}
            pg0 = family_cpu_seconds(where.postgres_pid) if where.postgres_pid else 0.0
            began, machine0 = time.monotonic(), machine_cpu()
            workers.tell(("connect",))
            connected = await workers.gather(3600)
            took = time.monotonic() - began
            machine1 = machine_cpu()
            cpu1 = cpu_seconds(pid) if pid else 0.0
            pg1 = family_cpu_seconds(where.postgres_pid) if where.postgres_pid else 0.0
            after_connect = rss_bytes(pid) if pid else 0
            ok = sum(c[1] for c in connected)
            problems = [f for c in connected for f in c[2]]
            await asyncio.sleep(args.hold)
            after = rss_bytes(pid) if pid else 0
            counters1 = pg_counters(where.database) if where.database else {}
            workers.tell(("report",))
            held = await workers.gather()
            workers.tell(("close",))
        finally:
            workers.stop()
    print(f"idle: {where.description}; {count} sockets of {users_count} users, "
          f"{args.workers} load process(es)")
    print(f"connected {ok}/{count} in {took:.1f} s ({ok / took:.0f}/s; server CPU "
          f"{(cpu1 - cpu0) / took * 100:.0f}%, "
          + (f"PostgreSQL {(pg1 - pg0) / took * 100:.0f}% and ~"
             f"{(counters1['transactions'] - counters0['transactions']) / max(ok, 1):.1f} "
             "transactions per socket, " if counters1 else "")
          + "load generator "
          f"{sum(c[4] for c in connected) / took * 100:.0f}%)"
          + (f"; failures e.g. {problems[:3]}" if problems else ""))
    print(f"machine while connecting: {(machine1[0] - machine0[0]) / took * 100:.0f}% busy of "
          f"{os.cpu_count()} cores x 100%; load average {os.getloadavg()[0]:.1f}")
    print(f"held {args.hold:g} s: {sum(h[1] for h in held)} open, {sum(h[2] for h in held)} pings "
          f"answered, {sum(h[3] for h in held)} closed by the server")
    if pid:
        print(f"server RSS before {before / 2**20:.1f} MiB, after connecting "
              f"{after_connect / 2**20:.1f} MiB, after the hold {after / 2**20:.1f} MiB")
        print(f"RSS per connection: {(after_connect - before) / max(ok, 1) / 1024:.1f} KiB after "
              f"connecting, {(after - before) / max(ok, 1) / 1024:.1f} KiB after the hold")
        print(f"load generator peak RSS MiB: {', '.join(f'{h[4] / 2**20:.0f}' for h in held)}")
    else:
        print("server RSS unknown: its process is not visible from here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=0,
                        help="users to register (traffic: 2 x pairs; idle: up to 1000)")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--rate", type=float, default=2000, help="messages a second, in total")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--drain", type=float, default=10,
                        help="seconds to wait for stragglers after the send window")
    parser.add_argument("--processes", type=int, default=1, help="server processes (traffic)")
    parser.add_argument("--payload-bytes", type=int, default=1024,
                        help="size of each message's encryptedPayload JSON (at least about 100)")
    parser.add_argument("--client", choices=("python", "js"), default="python",
                        help="the load's clients: our own (benchmarks/sioclient.py) or the stock "
                             "JavaScript socket.io-client under Node (benchmarks/js)")
    parser.add_argument("--workers", type=int, default=0,
                        help="load generator processes (traffic: 1, idle: 2)")
    parser.add_argument("--pool", type=int, default=10, help="the servers' --db-pool-size")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices of each user of the pairs, each with its own socket")
    parser.add_argument("--name-devices", action="store_true",
                        help="sends name the chat's devices (the server checks the list)")
    parser.add_argument("--by-chat", action="store_true",
                        help="address messages by chatId rather than recipientId")
    parser.add_argument("--acknowledge", action="store_true",
                        help="each receiving socket acknowledges each message it gets "
                             "(message_delivered {messageId, chatId}), as real clients do "
                             "(--client js)")
    parser.add_argument("--sqlite", action="store_true",
                        help="one server process on SQLite instead of PostgreSQL")
    parser.add_argument("--server-url", action="append", default=[],
                        help="a running server, http://127.0.0.1:PORT (repeatable)")
    parser.add_argument("--server-log", help="path prefix for the spawned servers' output")
    parser.add_argument("--idle", type=int, default=0, metavar="C",
                        help="hold C idle sockets instead of sending")
    parser.add_argument("--hold", type=float, default=30,
                        help="idle: seconds to hold them (pings come every 25 s)")
    parser.add_argument("--connect-concurrency", type=int, default=40,
                        help="handshakes in flight (the server's listen backlog is "
                             "Twisted's default, 50: more overflow it and cost SYN retries)")
    args = parser.parse_args()
    if args.sqlite and (args.processes != 1 or args.server_url):
        parser.error("--sqlite runs one spawned server process")
    if args.devices < 1:
        parser.error("--devices is at least 1")
    if args.idle and args.client == "js":
        parser.error("--client js drives traffic only, not --idle")
    if args.acknowledge and args.client != "js":
        parser.error("--acknowledge is for --client js")
    args.workers = args.workers or (2 if args.idle else 1)
    if args.client == "js":
        node_ready()  # before the servers start: npm ci when node_modules is missing
    run_loop(idle(args) if args.idle else traffic(args))


if __name__ == "__main__":
    main()
