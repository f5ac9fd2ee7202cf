"""Stellar accounts linked to Cyphr IDs. The server never holds a Stellar
secret key and never submits a transaction.

A link is proven by a SEP-53 signed message (``Keypair.sign_message`` in
stellar-sdk, what wallets sign; checked by cyphr.signing.verify_sep53) over ``signing.wallet_link_text``: the
server's origin, the Cyphr ID, the address and a fresh challenge. A SEP-53
signature signs a hash of a prefixed message, so it can never be a
transaction signature; and a signature over raw challenge bytes (or over a
transaction hash) does not verify as one."""

from __future__ import annotations

from typing import Any

from cyphr.clock import now_ms
from cyphr.errors import (
    INVALID_SIGNATURE,
    INVALID_STELLAR_ADDRESS,
    STATEMENT_MISMATCH,
    USER_NOT_FOUND,
    WALLET_NOT_LINKED,
    BadRequest,
    NotFound,
    Unauthorized,
)
from cyphr.handlers.auth import AuthUser
from cyphr.handlers.identity import IdentityHandler
from cyphr.handlers.origins import AcceptedOrigins
from cyphr.signing import stellar_account_key, verify_sep53, wallet_link_text
from cyphr.store.wallet import WalletStore


def check_stellar_address(address: Any) -> str:
    if stellar_account_key(address) is None:
        raise BadRequest("stellarAddress is not a valid Stellar account (G... StrKey)",
                         code=INVALID_STELLAR_ADDRESS, details={"field": "stellarAddress"})
    return address


class WalletHandler:
    def __init__(self, store: WalletStore, identity: IdentityHandler, clock: Any,
                 origins: AcceptedOrigins) -> None:
        self._store = store
        self._identity = identity
        self._clock = clock
        self._origins = origins

    async def link(self, user: AuthUser, address: str, challenge_id: str, origin: str,
                   signature: bytes) -> None:
        """Link ``address``, proven by its key's SEP-53 signature over the
        link text for this server's ``origin``, the caller's Cyphr ID and a
        challenge issued for it (used up whatever happens next)."""
        challenge = await self._identity.consume_challenge(challenge_id, user.cyphr_id)
        if not self._origins.accepts(origin):
            raise Unauthorized(
                f"The link names another server origin than this server accepts "
                f"({self._origins.describe()})", code=STATEMENT_MISMATCH,
                details={"field": "origin", "expected": self._origins.describe()})
        text = wallet_link_text(origin, user.cyphr_id, address, challenge_id, challenge)
        key = stellar_account_key(address)
        if key is None or not verify_sep53(key, text.encode("utf-8"), signature):
            raise Unauthorized("The signature is not the Stellar account's SEP-53 signature of "
                               "the wallet link text", code=INVALID_SIGNATURE)
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
