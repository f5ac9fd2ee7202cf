"""History backups: a client keeps here one blob holding the messages its
device read and sent, compressed and sealed on the device under a key
derived from the identity seed, so that a device recovered from the phrase,
or newly linked, reads its past (docs/encryption.rst, "The history
backup"). The server stores the blob as it came, at most
``max_history_backup`` bytes, and hands it back to its owner only; it
cannot read it."""

from __future__ import annotations

from typing import Any

from cyphr.clock import now_ms
from cyphr.errors import HISTORY_BACKUP_NOT_FOUND, NotFound, PayloadTooLarge
from cyphr.handlers.auth import AuthUser
from cyphr.store.backups import HistoryBackup, HistoryBackupStore


class HistoryBackupHandler:
    def __init__(self, store: HistoryBackupStore, clock: Any, max_size: int) -> None:
        self._store = store
        self._clock = clock
        self.max_size = max_size

    async def put(self, user: AuthUser, blob: bytes) -> int:
        """Replace the caller's backup; answers when (ms). Larger than the
        limit: 413, and the stored one stays."""
        if len(blob) > self.max_size:
            raise PayloadTooLarge(f"the history backup is larger than {self.max_size} bytes",
                                  details={"field": "blob", "limit": self.max_size})
        now = now_ms(self._clock)
        await self._store.put(user.user_id, blob, now)
        return now

    async def get(self, user: AuthUser) -> HistoryBackup:
        backup = await self._store.get(user.user_id)
        if backup is None:
            raise NotFound("No history backup is stored for this identity",
                           code=HISTORY_BACKUP_NOT_FOUND)
        return backup

    async def delete(self, user: AuthUser) -> bool:
        """Delete the caller's backup (the client turned backups off);
        whether there was one."""
        return await self._store.delete(user.user_id)
