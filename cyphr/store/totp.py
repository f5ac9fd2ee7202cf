"""TOTP two-factor secrets, stored encrypted by the handler."""

from __future__ import annotations

from dataclasses import dataclass

from cyphr.db import Database


@dataclass(frozen=True)
class TotpState:
    encrypted_secret: bytes
    enabled: bool
    last_used_step: int | None


class TotpStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def get(self, user_id: str) -> TotpState | None:
        rows = await self._db.run_query(
            "SELECT encrypted_secret, enabled, last_used_step FROM totp_secrets WHERE user_id = ?",
            (user_id,))
        if not rows:
            return None
        secret, enabled, step = rows[0]
        return TotpState(secret, bool(enabled), step)

    async def put_pending(self, user_id: str, encrypted_secret: bytes, now: int) -> bool:
        """Store a new, not yet enabled secret; False if two-factor is already on."""
        changed = await self._db.run_operation(
            "INSERT INTO totp_secrets (user_id, encrypted_secret, enabled, created_at, updated_at)"
            " VALUES (?, ?, FALSE, ?, ?)"
            " ON CONFLICT (user_id) DO UPDATE SET encrypted_secret = excluded.encrypted_secret,"
            " last_used_step = NULL, updated_at = excluded.updated_at"
            " WHERE totp_secrets.enabled = FALSE",
            (user_id, encrypted_secret, now, now))
        return changed == 1

    async def use_step(self, user_id: str, step: int, now: int, *, enable: bool = False) -> bool:
        """Record that the code of ``step`` was used, unless that step or a
        later one was used already (a code works once). With ``enable``,
        two-factor is switched on in the same statement."""
        changed = await self._db.run_operation(
            "UPDATE totp_secrets SET last_used_step = ?, updated_at = ?"
            + (", enabled = TRUE" if enable else "")
            + " WHERE user_id = ? AND (last_used_step IS NULL OR last_used_step < ?)",
            (step, now, user_id, step))
        return changed == 1

    async def delete(self, user_id: str) -> None:
        await self._db.run_operation("DELETE FROM totp_secrets WHERE user_id = ?", (user_id,))
