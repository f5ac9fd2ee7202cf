"""Group rosters: /api/chats/:chatId/roster (cyphr.handlers.rosters;
docs/encryption.rst, "Group rosters")."""

from __future__ import annotations

from typing import Any

from klein import Klein

from cyphr.api.guard import authenticated
from cyphr.api.http import answer, read_json
from cyphr.api.messaging import _uuid_or_404
from cyphr.errors import CHAT_NOT_FOUND
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.rosters import RostersHandler
from cyphr.handlers.validation import Fields, b64
from cyphr.rosters import MAX_CHANGE_BYTES


class RostersAPI:
    app = Klein()

    def __init__(self, rosters: RostersHandler, authenticator: Authenticator) -> None:
        self._rosters = rosters
        self.authenticator = authenticator

    @app.route("/api/chats/<chat_id>/roster", methods=["GET"])
    @authenticated()
    async def chain(self, request: Any, user: AuthUser, chat_id: str) -> bytes:
        chat_id = _uuid_or_404(chat_id, CHAT_NOT_FOUND, "chat")
        chain = await self._rosters.chain(user, chat_id)
        return answer(request, {"success": True, "chatId": chat_id, "epoch": len(chain),
                                "changes": [b64(stored.change) for stored in chain]})

    @app.route("/api/chats/<chat_id>/roster", methods=["POST"])
    @authenticated()
    async def append(self, request: Any, user: AuthUser, chat_id: str) -> bytes:
        chat_id = _uuid_or_404(chat_id, CHAT_NOT_FOUND, "chat")
        fields = Fields(read_json(request), {"change"})
        # base64 of at most MAX_CHANGE_BYTES and its framing
        data = fields.base64("change", max_length=MAX_CHANGE_BYTES + 1024)
        assert data is not None
        epoch = await self._rosters.append(user, chat_id, data)
        return answer(request, {"success": True, "chatId": chat_id, "epoch": epoch}, 201)
