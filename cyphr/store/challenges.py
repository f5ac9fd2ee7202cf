"""Login challenges: issued, consumed once, purged when stale."""

from __future__ import annotations

from cyphr.db import Database

# Uses up a challenge if it was issued for the Cyphr ID, is unexpired and
# unused. One statement, so two requests presenting the same challenge
# cannot both have it. Parameters: now, challenge id, cyphr id, now.
CONSUME = (
    "UPDATE auth_challenges SET used_at = ?"
    " WHERE id = ? AND cyphr_id = ? AND used_at IS NULL AND expires_at > ?"
    " RETURNING challenge"
)


class ChallengeStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def create(self, challenge_id: str, cyphr_id: str, challenge: bytes,
                     now: int, expires_at: int) -> None:
        await self._db.run_operation(
            "INSERT INTO auth_challenges (id, cyphr_id, challenge, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?)", (challenge_id, cyphr_id, challenge, now, expires_at))

    async def consume(self, challenge_id: str, cyphr_id: str, now: int) -> bytes | None:
        """The challenge's bytes, if it was issued for ``cyphr_id``, is
        unexpired and unused; it is used from then on."""
        rows = await self._db.run_query(CONSUME, (now, challenge_id, cyphr_id, now))
        return rows[0][0] if rows else None

    async def purge(self, now: int, batch: int = 1000) -> int:
        """Delete up to ``batch`` expired challenges; answer how many."""
        return await self._db.run_operation(
            "DELETE FROM auth_challenges WHERE id IN"
            " (SELECT id FROM auth_challenges WHERE expires_at <= ? LIMIT ?)", (now, batch))
