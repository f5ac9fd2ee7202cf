"""Push registrations, the wake-up outbox, and which node holds which device's sockets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyphr.db import Database, Transaction

# How long a node claims the wake-ups it is sending: past it (the node died
# mid-send) another node takes them.
CLAIM_MS = 30_000
# Sends whose wake-ups one statement queues.
ENQUEUE_ROWS = 200


@dataclass(frozen=True)
class Registration:
    user_id: str
    device_id: int
    kind: str
    token: str | None
    endpoint: str | None
    p256dh: bytes | None
    auth: bytes | None
    app_id: str | None
    sandbox: bool
    counter: int

    @property
    def key(self) -> tuple[str, int]:
        return self.user_id, self.device_id


_COLUMNS = ("r.user_id, r.device_id, r.kind, r.token, r.endpoint, r.p256dh, r.auth, r.app_id,"
            " r.sandbox, r.counter")


def _registration(row: tuple[Any, ...]) -> Registration:
    return Registration(str(row[0]), row[1], row[2], row[3], row[4],
                        None if row[5] is None else bytes(row[5]),
                        None if row[6] is None else bytes(row[6]), row[7], bool(row[8]), row[9])


def _live(alias: str) -> str:
    """SQL: the device of ``alias`` (user_id, device_id) has a socket on a
    node heard from since the first parameter (ms)."""
    return ("EXISTS (SELECT 1 FROM device_connections c JOIN nodes n ON n.node_id = c.node_id"
            f" WHERE c.user_id = {alias}.user_id AND c.device_id = {alias}.device_id"
            " AND n.seen_at > ?)")


@dataclass(frozen=True)
class WakeUps:
    """Wake-ups to queue with a batch of messages, in the same statement
    (MessageStore.store_batch): at ``now`` (ms), for the devices with no
    socket on a node heard from since ``live_since`` (ms)."""

    now: int
    live_since: int


def wake_ups_sql(sends: str) -> str:
    """SQL that queues a wake-up for every registered device of the members
    of each chat in the relation ``sends`` (chat_id, sender: the sender's
    Cyphr ID, device: the sending device or 0), but the sending device,
    that has no live socket and none queued or sent already; it answers
    the devices queued (RETURNING). Its parameters: now, now, live_since.
    On PostgreSQL the send batcher's statement is schema 020's
    store_messages_waking, which holds the same rule: change both."""
    return ("INSERT INTO push_outbox (user_id, device_id, created_at, due_at)"
            " SELECT DISTINCT r.user_id, r.device_id, ?, ? FROM " + sends + " s"
            " JOIN chat_participants p ON p.chat_id = s.chat_id"
            " JOIN cyphr_identities i ON i.cyphr_id = p.user_id"
            " JOIN push_registrations r ON r.user_id = i.id"
            " WHERE NOT (i.cyphr_id = s.sender AND r.device_id = s.device)"
            " AND NOT " + _live("r") +
            " ON CONFLICT DO NOTHING RETURNING device_id")


def _enqueue_statement(sends: list[tuple[str, str, int | None]], wake_ups: WakeUps,
                       postgres: bool) -> tuple[str, tuple[Any, ...]]:
    row = "(?::uuid, ?, ?::integer)" if postgres else "(?, ?, ?)"
    return ("WITH sent (chat_id, sender, device) AS (VALUES " + ", ".join(row for _ in sends) + ") "
            + wake_ups_sql("sent"),
            (*(value for chat_id, sender, device in sends for value in (chat_id, sender, device or 0)),
             wake_ups.now, wake_ups.now, wake_ups.live_since))


async def queue_wake_ups_txn(txn: Transaction, engine: str, sends: list[tuple[str, str, int | None]],
                             wake_ups: WakeUps) -> int:
    """In a transaction: the wake-ups for ``sends`` (chat id, sender's
    Cyphr ID, sending device), ENQUEUE_ROWS sends a statement. Answers how
    many were queued."""
    queued = 0
    for start in range(0, len(sends), ENQUEUE_ROWS):
        sql, params = _enqueue_statement(sends[start:start + ENQUEUE_ROWS], wake_ups,
                                         engine == "postgresql")
        queued += len(await txn.execute(sql, params))
    return queued


class PushStore:
    def __init__(self, database: Database) -> None:
        self._db = database
        self.engine = database.engine

    # -- registrations ------------------------------------------------------

    async def register(self, registration: Registration, now: int) -> None:
        """The device's one registration, replacing any before (and what it
        had queued)."""
        async def register(txn: Transaction) -> None:
            r = registration
            await txn.execute("DELETE FROM push_registrations WHERE user_id = ? AND device_id = ?",
                              (r.user_id, r.device_id))
            await txn.execute(
                "INSERT INTO push_registrations (user_id, device_id, kind, token, endpoint, p256dh,"
                " auth, app_id, sandbox, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.user_id, r.device_id, r.kind, r.token, r.endpoint, r.p256dh, r.auth, r.app_id,
                 r.sandbox, now))
        await self._db.run_interaction("push_register", register)

    async def unregister(self, user_id: str, device_id: int) -> bool:
        return await self._db.run_operation(
            "DELETE FROM push_registrations WHERE user_id = ? AND device_id = ?",
            (user_id, device_id)) > 0

    async def registration(self, user_id: str, device_id: int) -> Registration | None:
        rows = await self._db.run_query(
            "SELECT " + _COLUMNS + " FROM push_registrations r WHERE r.user_id = ? AND r.device_id = ?",
            (user_id, device_id))
        return _registration(rows[0]) if rows else None

    async def drop(self, registration: Registration) -> None:
        """The push service says the registration is dead: it goes, unless
        the device registered anew meanwhile."""
        r = registration
        await self._db.run_operation(
            "DELETE FROM push_registrations WHERE user_id = ? AND device_id = ? AND kind = ?"
            " AND token IS NOT DISTINCT FROM ? AND endpoint IS NOT DISTINCT FROM ?",
            (r.user_id, r.device_id, r.kind, r.token, r.endpoint))

    # -- the outbox -----------------------------------------------------------

    async def claim(self, now: int, live_since: int, batch: int) -> list[tuple[Registration, int]]:
        """Take up to ``batch`` due wake-ups to send, each with its
        registration and its attempts so far; they are this node's for
        CLAIM_MS. One whose device has a live socket now is dropped: it is
        awake. Several nodes claim together without taking one twice."""
        async def claim(txn: Transaction) -> list[tuple[Registration, int]]:
            await txn.execute(
                "DELETE FROM push_outbox WHERE sent_at IS NULL AND due_at <= ? AND " + _live("push_outbox"),
                (now, live_since))
            # The due rows (locked, skipping those another node holds),
            # pushed past the claim; then their registrations.
            lock = " FOR UPDATE SKIP LOCKED" if self.engine == "postgresql" else ""
            claimed = await txn.execute(
                "UPDATE push_outbox SET due_at = ?, attempts = attempts + 1"
                " WHERE (user_id, device_id) IN (SELECT user_id, device_id FROM push_outbox"
                "  WHERE sent_at IS NULL AND due_at <= ? ORDER BY due_at LIMIT ?" + lock + ")"
                " RETURNING user_id, device_id, attempts - 1", (now + CLAIM_MS, now, batch))
            if not claimed:
                return []
            attempts = {(str(user_id), device_id): tried for user_id, device_id, tried in claimed}
            rows = await txn.execute(
                "SELECT " + _COLUMNS + " FROM push_registrations r WHERE (r.user_id, r.device_id) IN ("
                + ", ".join("(?, ?)" for _ in claimed) + ")",
                [value for user_id, device_id, _ in claimed for value in (user_id, device_id)])
            registrations = sorted((_registration(row) for row in rows), key=lambda r: r.key)
            return [(r, attempts[r.key]) for r in registrations]
        return await self._db.run_interaction("push_claim", claim)

    async def sent(self, registrations: list[Registration], now: int) -> None:
        """These wake-ups went: kept, as sent, until their devices connect;
        the registrations' counters move on. Two statements for them all."""
        if not registrations:
            return
        keys = [value for r in registrations for value in r.key]
        marks = ", ".join("(?, ?)" for _ in registrations)

        async def sent(txn: Transaction) -> None:
            await txn.execute("UPDATE push_outbox SET sent_at = ? WHERE (user_id, device_id) IN ("
                              + marks + ")", (now, *keys))
            await txn.execute("UPDATE push_registrations SET counter = counter + 1"
                              " WHERE (user_id, device_id) IN (" + marks + ")", keys)
        await self._db.run_interaction("push_sent", sent)

    async def retry_at(self, registration: Registration, due_at: int) -> None:
        await self._db.run_operation(
            "UPDATE push_outbox SET due_at = ? WHERE user_id = ? AND device_id = ? AND sent_at IS NULL",
            (due_at, registration.user_id, registration.device_id))

    async def give_up(self, registration: Registration) -> None:
        """Tried often enough: the wake-up goes (the next message queues another)."""
        await self._db.run_operation(
            "DELETE FROM push_outbox WHERE user_id = ? AND device_id = ? AND sent_at IS NULL",
            (registration.user_id, registration.device_id))

    async def depth(self) -> int:
        """Wake-ups waiting to be sent."""
        rows = await self._db.run_query("SELECT COUNT(*) FROM push_outbox WHERE sent_at IS NULL")
        return int(rows[0][0])

    # -- live sockets ---------------------------------------------------------

    async def connected(self, user_id: str, device_id: int, node_id: str) -> None:
        """A socket of the device is live on ``node_id``: counted, and what
        was queued or sent for it goes (it is awake)."""
        async def connected(txn: Transaction) -> None:
            await txn.execute(
                "INSERT INTO device_connections (user_id, device_id, node_id, sockets)"
                " VALUES (?, ?, ?, 1) ON CONFLICT (user_id, device_id, node_id)"
                " DO UPDATE SET sockets = device_connections.sockets + 1",
                (user_id, device_id, node_id))
            await txn.execute("DELETE FROM push_outbox WHERE user_id = ? AND device_id = ?",
                              (user_id, device_id))
        await self._db.run_interaction("push_connected", connected)

    async def disconnected(self, user_id: str, device_id: int, node_id: str) -> None:
        async def disconnected(txn: Transaction) -> None:
            await txn.execute(
                "UPDATE device_connections SET sockets = sockets - 1"
                " WHERE user_id = ? AND device_id = ? AND node_id = ? AND sockets > 1",
                (user_id, device_id, node_id))
            if not txn.rowcount:
                await txn.execute(
                    "DELETE FROM device_connections WHERE user_id = ? AND device_id = ? AND node_id = ?",
                    (user_id, device_id, node_id))
        await self._db.run_interaction("push_disconnected", disconnected)

    async def heard(self, node_id: str, now: int) -> None:
        """This node is alive (its device connections count)."""
        await self._db.run_operation(
            "INSERT INTO nodes (node_id, seen_at) VALUES (?, ?)"
            " ON CONFLICT (node_id) DO UPDATE SET seen_at = excluded.seen_at", (node_id, now))

    async def node_started(self, node_id: str, now: int) -> None:
        """A node (re)starts with no sockets: what a process of the same
        name left goes."""
        async def started(txn: Transaction) -> None:
            await txn.execute("DELETE FROM device_connections WHERE node_id = ?", (node_id,))
            await txn.execute(
                "INSERT INTO nodes (node_id, seen_at) VALUES (?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET seen_at = excluded.seen_at", (node_id, now))
        await self._db.run_interaction("push_node_started", started)

    async def node_stopped(self, node_id: str) -> None:
        async def stopped(txn: Transaction) -> None:
            await txn.execute("DELETE FROM device_connections WHERE node_id = ?", (node_id,))
            await txn.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))
        await self._db.run_interaction("push_node_stopped", stopped)

    async def forget_silent_nodes(self, before: int) -> None:
        """Nodes not heard from since ``before`` (ms) and their rows go."""
        async def forget(txn: Transaction) -> None:
            await txn.execute("DELETE FROM device_connections WHERE node_id IN"
                              " (SELECT node_id FROM nodes WHERE seen_at < ?)", (before,))
            await txn.execute("DELETE FROM nodes WHERE seen_at < ?", (before,))
        await self._db.run_interaction("push_forget_nodes", forget)
