"""Queries about the database itself."""

from __future__ import annotations

from cyphr.db import Database


class StatusStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def ping(self) -> None:
        """One round trip to the database."""
        await self._db.run_query("SELECT 1")
