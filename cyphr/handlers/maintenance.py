"""Periodic clean-up: expired challenges and revocations of expired tokens."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from cyphr.clock import now_ms
from cyphr.db import DatabaseUnavailable
from cyphr.store.challenges import ChallengeStore
from cyphr.store.tokens import TokenStore

_log = Logger()
BATCH = 1000
MAX_BATCHES = 20  # per run: the rest waits for the next run


class Maintenance:
    def __init__(self, challenges: ChallengeStore, revocations: TokenStore, clock: Any) -> None:
        self._challenges = challenges
        self._revocations = revocations
        self._clock = clock

    async def run(self) -> None:
        """One round. Each step is caught and logged on its own, so one
        failure neither stops the other nor the schedule."""
        for name, purge in (("challenges", self._challenges.purge),
                            ("revoked tokens", self._revocations.purge)):
            try:
                for _ in range(MAX_BATCHES):
                    if await purge(now_ms(self._clock), BATCH) < BATCH:
                        break
            except DatabaseUnavailable:
                _log.info("Skipped purging expired {name}: the database is unavailable", name=name)
            except Exception:
                _log.failure("Purging expired {name} failed", name=name)
