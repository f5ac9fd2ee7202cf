"""History backups (the client's sealed messages): one opaque blob per identity."""

from __future__ import annotations

from dataclasses import dataclass

from cyphr.db import Database


@dataclass(frozen=True)
class HistoryBackup:
    blob: bytes
    updated_at: int  # ms


class HistoryBackupStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def put(self, user_id: str, blob: bytes, now: int) -> None:
        """Replace the user's backup (it goes with the identity: ON DELETE CASCADE)."""
        await self._db.run_operation(
            "INSERT INTO history_backups (user_id, blob, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET blob = excluded.blob,"
            " updated_at = excluded.updated_at", (user_id, blob, now))

    async def get(self, user_id: str) -> HistoryBackup | None:
        rows = await self._db.run_query(
            "SELECT blob, updated_at FROM history_backups WHERE user_id = ?", (user_id,))
        return HistoryBackup(bytes(rows[0][0]), rows[0][1]) if rows else None

    async def delete(self, user_id: str) -> bool:
        """Delete the user's backup; whether there was one."""
        return await self._db.run_operation(
            "DELETE FROM history_backups WHERE user_id = ?", (user_id,)) > 0
