"""Periodic clean-up: expired challenges, revocations of expired tokens,
expired device provisionings and links, envelopes that their devices did
not acknowledge within the envelope retention (with the bodies they leave
bare), messages past the retention period (when the operator set one), and
attachments that are due (expired, deleted, or named by no message now),
from the database and from the blob store."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from cyphr.clock import now_ms
from cyphr.db import DatabaseUnavailable
from cyphr.store.challenges import ChallengeStore
from cyphr.store.links import LinkStore
from cyphr.store.messages import MessageStore
from cyphr.store.tokens import TokenStore

_log = Logger()
BATCH = 1000
MAX_BATCHES = 20  # per run: the rest waits for the next run


class Maintenance:
    def __init__(self, challenges: ChallengeStore, revocations: TokenStore, messages: MessageStore,
                 retention_days: int, clock: Any, *, links: LinkStore | None = None,
                 envelope_retention_days: int = 0, attachments: Any = None) -> None:
        # cyphr.handlers.attachments.AttachmentsHandler: its clean-up.
        self._attachments = attachments
        self._challenges = challenges
        self._links = links
        self._revocations = revocations
        self._messages = messages
        self._retention_ms = retention_days * 86_400_000
        self._envelope_retention_ms = envelope_retention_days * 86_400_000
        self._clock = clock

    async def _expired_messages(self, now: int, batch: int) -> int:
        if not self._retention_ms:
            return 0
        return await self._messages.purge_older_than(now - self._retention_ms, batch)

    async def _expired_envelopes(self, now: int, batch: int) -> int:
        if not self._envelope_retention_ms:
            return 0
        return await self._messages.envelopes.purge_older_than(now - self._envelope_retention_ms, batch)

    async def _expired_links(self, now: int, batch: int) -> int:
        if self._links is None:
            return 0
        return await self._links.purge(now, batch)

    async def _attachments_due(self, now: int, batch: int) -> int:
        if self._attachments is None:
            return 0
        return await self._attachments.clean(now, batch)

    async def run(self) -> None:
        """One round, in batches of BATCH rows (each its own short transaction,
        so neither the reactor nor other writers wait long). Each step is
        caught and logged on its own, so one failure neither stops the others
        nor the schedule."""
        for name, purge in (("challenges", self._challenges.purge),
                            ("revoked tokens", self._revocations.purge),
                            ("device provisionings", self._expired_links),
                            ("envelopes", self._expired_envelopes),
                            ("messages", self._expired_messages),
                            # After messages: those purged free attachments.
                            ("attachments", self._attachments_due)):
            try:
                for _ in range(MAX_BATCHES):
                    if await purge(now_ms(self._clock), BATCH) < BATCH:
                        break
            except DatabaseUnavailable:
                _log.info("Skipped purging expired {name}: the database is unavailable", name=name)
            except Exception:
                _log.failure("Purging expired {name} failed", name=name)
