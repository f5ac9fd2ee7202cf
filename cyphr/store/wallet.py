"""Stellar accounts linked to identities."""

from __future__ import annotations

from cyphr.db import Database


class WalletStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def link(self, user_id: str, address: str, now: int) -> None:
        await self._db.run_operation(
            "INSERT INTO wallet_links (user_id, stellar_address, linked_at) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET stellar_address = excluded.stellar_address,"
            " linked_at = excluded.linked_at", (user_id, address, now))

    async def unlink(self, user_id: str) -> bool:
        return await self._db.run_operation(
            "DELETE FROM wallet_links WHERE user_id = ?", (user_id,)) == 1

    async def address_of(self, cyphr_id: str) -> tuple[bool, str | None]:
        """(whether the identity exists, its linked address or None)."""
        rows = await self._db.run_query(
            "SELECT w.stellar_address FROM cyphr_identities i"
            " LEFT JOIN wallet_links w ON w.user_id = i.id WHERE i.cyphr_id = ?", (cyphr_id,))
        if not rows:
            return False, None
        return True, rows[0][0]
