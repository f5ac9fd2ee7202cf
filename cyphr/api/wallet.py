"""/api/wallet: a Stellar account linked to a Cyphr ID."""

from __future__ import annotations

from typing import Any

from klein import Klein

from cyphr.api.guard import authenticated
from cyphr.api.http import answer, read_json
from cyphr.crypto import ED25519_SIGNATURE_BYTES
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.validation import Fields, check_cyphr_id
from cyphr.handlers.wallet import WalletHandler, check_stellar_address

# As an AuthStatement's origin field.
MAX_ORIGIN_LENGTH = 512


class WalletAPI:
    app = Klein()

    def __init__(self, wallet: WalletHandler, authenticator: Authenticator, limits: RateLimits) -> None:
        self._wallet = wallet
        self.authenticator = authenticator
        self.limits = limits

    @app.route("/api/wallet/link", methods=["POST"])
    @authenticated()
    async def link(self, request: Any, user: AuthUser) -> bytes:
        fields = Fields(read_json(request), {"stellarAddress", "challengeId", "origin", "signature"})
        address = check_stellar_address(fields.value("stellarAddress"))
        challenge_id = fields.uuid("challengeId")
        origin = fields.text("origin", max_length=MAX_ORIGIN_LENGTH)
        assert origin is not None
        await self._wallet.link(user, address, challenge_id, origin,
                                fields.base64("signature", length=ED25519_SIGNATURE_BYTES))
        return answer(request, {"success": True, "stellarAddress": address})

    @app.route("/api/wallet/link", methods=["DELETE"])
    @authenticated()
    async def unlink(self, request: Any, user: AuthUser) -> bytes:
        Fields(read_json(request, required=False), set())
        return answer(request, {"success": True, "unlinked": await self._wallet.unlink(user)})

    @app.route("/api/wallet/<cyphr_id>", methods=["GET"])
    @authenticated()
    async def address_of(self, request: Any, user: AuthUser, cyphr_id: str) -> bytes:
        cyphr_id = check_cyphr_id(cyphr_id)
        address = await self._wallet.address_of(cyphr_id)
        return answer(request, {"success": True, "cyphrId": cyphr_id, "stellarAddress": address})
