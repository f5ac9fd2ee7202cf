"""Queries about the database itself: liveness and table sizes."""

from __future__ import annotations

from cyphr.db import Database

# The tables whose sizes operators may see (never their contents).
COUNTED_TABLES = (
    "cyphr_identities",
    "auth_challenges",
    "revoked_tokens",
    "one_time_prekeys",
    "totp_secrets",
    "wallet_links",
    "chats",
    "chat_participants",
    "messages",
    "message_receipts",
)


class StatusStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def ping(self) -> None:
        """One round trip to the database."""
        await self._db.run_query("SELECT 1")

    async def table_counts(self) -> dict[str, int]:
        counts = {}
        for table in COUNTED_TABLES:
            # The table name is one of the constants above, never input.
            rows = await self._db.run_query("SELECT COUNT(*) FROM " + table)
            counts[table] = rows[0][0]
        return counts
