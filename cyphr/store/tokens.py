"""Session tokens revoked one by one (logout)."""

from __future__ import annotations

from cyphr.db import Database


class TokenStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def revoke(self, jti: str, user_id: str, expires_at: int) -> None:
        await self._db.run_operation(
            "INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (jti) DO NOTHING", (jti, user_id, expires_at))

    async def purge(self, now: int, batch: int = 1000) -> int:
        """Forget up to ``batch`` revocations of tokens that have expired anyway."""
        return await self._db.run_operation(
            "DELETE FROM revoked_tokens WHERE jti IN"
            " (SELECT jti FROM revoked_tokens WHERE expires_at <= ? LIMIT ?)", (now, batch))
