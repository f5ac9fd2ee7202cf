"""Pin backups: a client keeps here one blob holding the identity keys it
pinned for its contacts, sealed on the device under a key derived from the
recovery phrase, so that a device recovered from the phrase gets its pins
back. The server stores the blob as it came and hands it back to its owner
only; it cannot read it."""

from __future__ import annotations

from typing import Any

from cyphr.clock import now_ms
from cyphr.errors import PIN_BACKUP_NOT_FOUND, NotFound
from cyphr.handlers.auth import AuthUser
from cyphr.store.pins import PinBackup, PinBackupStore

MAX_PIN_BACKUP_BYTES = 256 * 1024


class PinBackupHandler:
    def __init__(self, store: PinBackupStore, clock: Any) -> None:
        self._store = store
        self._clock = clock

    async def put(self, user: AuthUser, blob: bytes) -> int:
        """Replace the caller's backup; answers when (ms)."""
        now = now_ms(self._clock)
        await self._store.put(user.user_id, blob, now)
        return now

    async def get(self, user: AuthUser) -> PinBackup:
        backup = await self._store.get(user.user_id)
        if backup is None:
            raise NotFound("No PIN backup is stored for this identity", code=PIN_BACKUP_NOT_FOUND)
        return backup
