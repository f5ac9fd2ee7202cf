"""Stellar accounts linked to Cyphr IDs. The server never holds a Stellar
secret key and never submits a transaction."""

from __future__ import annotations

from typing import Any

from stellar_sdk import Keypair, StrKey
from stellar_sdk.exceptions import BadSignatureError

from cyphr.clock import now_ms
from cyphr.errors import (
    INVALID_SIGNATURE,
    INVALID_STELLAR_ADDRESS,
    USER_NOT_FOUND,
    WALLET_NOT_LINKED,
    BadRequest,
    NotFound,
    Unauthorized,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.identity import IdentityHandler
from cyphr.store.wallet import WalletStore


def check_stellar_address(address: Any) -> str:
    if not isinstance(address, str) or len(address) != 56 or not StrKey.is_valid_ed25519_public_key(address):
        raise BadRequest("stellarAddress is not a valid Stellar account (G... StrKey)",
                         code=INVALID_STELLAR_ADDRESS, details={"field": "stellarAddress"})
    return address


class WalletHandler:
    def __init__(self, store: WalletStore, identity: IdentityHandler, clock: Any) -> None:
        self._store = store
        self._identity = identity
        self._clock = clock

    async def link(self, user: AuthUser, address: str, challenge_id: str, signature: bytes) -> None:
        """Link ``address``, proven by its key's signature over a challenge
        issued for the caller's Cyphr ID."""
        challenge = await self._identity.consume_challenge(challenge_id, user.cyphr_id)
        try:
            Keypair.from_public_key(address).verify(challenge, signature)
        except BadSignatureError:
            raise Unauthorized("The signature does not verify with the Stellar account's key",
                               code=INVALID_SIGNATURE) from None
        await self._store.link(user.user_id, address, now_ms(self._clock))

    async def unlink(self, user: AuthUser) -> bool:
        return await self._store.unlink(user.user_id)

    async def address_of(self, cyphr_id: str) -> str:
        exists, address = await self._store.address_of(cyphr_id)
        if not exists:
            raise NotFound("No such user", code=USER_NOT_FOUND)
        if address is None:
            raise NotFound("No Stellar account is linked to this Cyphr ID", code=WALLET_NOT_LINKED)
        return address
