"""Two-factor login (TOTP) and Argon2 password hashing for clients."""

from __future__ import annotations

import base64
import hmac
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pyotp
import segno
from argon2 import PasswordHasher
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from cyphr.clock import now_ms
from cyphr.cpu import CpuPool
from cyphr.errors import (
    INVALID_TOTP,
    TOTP_ALREADY_ENABLED,
    TOTP_CODE_USED,
    TOTP_NOT_ENABLED,
    TOTP_REQUIRED,
    ApiError,
    BadRequest,
    Conflict,
    Unauthorized,
)
from cyphr.store.totp import TotpStore

ISSUER = "Cyphr"
STEP_SECONDS = 30
WINDOW = 1  # steps either side of now, for clocks a little off
USED_MESSAGE = "This code was used already: wait for the next one"


class CodeCheck(Enum):
    """What became of a code: taken, no code of the window, or right but
    of a step that was (or is older than one that was) used already."""

    TAKEN = "taken"
    INVALID = "invalid"
    USED = "used"


@dataclass(frozen=True)
class TotpSetup:
    secret: str
    otpauth_url: str
    qr_code: str  # an SVG data URL


class TotpHandler:
    def __init__(self, store: TotpStore, key: bytes, clock: Any) -> None:
        self._store = store
        self._box = SecretBox(key)
        self._clock = clock

    async def generate(self, user_id: str, cyphr_id: str) -> TotpSetup:
        """A new secret, stored encrypted and not active until verified."""
        secret = pyotp.random_base32()
        if not await self._store.put_pending(user_id, self._box.encrypt(secret.encode("ascii")),
                                             now_ms(self._clock)):
            raise Conflict("Two-factor login is already enabled", code=TOTP_ALREADY_ENABLED)
        url = pyotp.TOTP(secret).provisioning_uri(name=cyphr_id, issuer_name=ISSUER)
        svg = segno.make(url, error="m").svg_inline(scale=4)
        qr = "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")
        return TotpSetup(secret, url, qr)

    def _matching_step(self, encrypted_secret: bytes, code: str) -> int | None:
        try:
            secret = self._box.decrypt(encrypted_secret).decode("ascii")
        except CryptoError:
            # Stored under another key (the TOTP key was changed): no code can match.
            return None
        totp = pyotp.TOTP(secret, interval=STEP_SECONDS)
        now_step = int(self._clock.seconds() // STEP_SECONDS)
        for step in range(now_step - WINDOW, now_step + WINDOW + 1):
            if hmac.compare_digest(totp.generate_otp(step), code):
                return step
        return None

    async def _use(self, user_id: str, code: str, *, must_be_enabled: bool,
                   enable: bool = False) -> CodeCheck:
        state = await self._store.get(user_id)
        if state is None or state.enabled != must_be_enabled:
            return CodeCheck.INVALID
        step = self._matching_step(state.encrypted_secret, code)
        if step is None:
            return CodeCheck.INVALID
        # The store refuses a step at or before the last one used (also one
        # used by a concurrent request since the read above): the code is
        # right, and telling the person so spares them doubting their app.
        # It gives a guesser nothing: that step's code is spent either way.
        if await self._store.use_step(user_id, step, now_ms(self._clock), enable=enable):
            return CodeCheck.TAKEN
        return CodeCheck.USED

    async def verify(self, user_id: str, code: str) -> None:
        """Enable two-factor login with a first code from the authenticator."""
        state = await self._store.get(user_id)
        if state is not None and state.enabled:
            raise Conflict("Two-factor login is already enabled", code=TOTP_ALREADY_ENABLED)
        if state is None:
            raise BadRequest("Generate a TOTP secret first", code=TOTP_NOT_ENABLED)
        _refuse(await self._use(user_id, code, must_be_enabled=False, enable=True), BadRequest,
                "The code is not valid")

    async def disable(self, user_id: str, code: str) -> None:
        state = await self._store.get(user_id)
        if state is None or not state.enabled:
            raise BadRequest("Two-factor login is not enabled", code=TOTP_NOT_ENABLED)
        _refuse(await self._use(user_id, code, must_be_enabled=True), BadRequest, "The code is not valid")
        await self._store.delete(user_id)

    async def check_login(self, user_id: str, code: str | None) -> None:
        """For a user with two-factor on: the code must be given, right, and
        unused (a right code used already is TOTP_CODE_USED, so that a
        person who typed it twice learns to wait for the next one)."""
        if code is None:
            raise Unauthorized("This account needs a TOTP code", code=TOTP_REQUIRED)
        _refuse(await self._use(user_id, code, must_be_enabled=True), Unauthorized,
                "The TOTP code is not valid")


def _refuse(check: CodeCheck, error: type[ApiError], invalid_message: str) -> None:
    """Raise ``error`` (the route's status) for a code that was not taken."""
    if check is CodeCheck.INVALID:
        raise error(invalid_message, code=INVALID_TOTP)
    if check is CodeCheck.USED:
        raise error(USED_MESSAGE, code=TOTP_CODE_USED)


# argon2-cffi's defaults, RFC 9106's second recommendation: 3 passes over
# 64 MiB, 4 lanes. (The tests lower them: tests/__init__.py.)
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 64 * 1024


class PasswordHashing:
    """Argon2id for clients that have no Argon2 of their own. Each hash costs
    about 100 ms of CPU and 64 MiB: it runs in the CPU pool, never on the
    reactor, and the route is rate limited."""

    def __init__(self, cpu: CpuPool) -> None:
        self._cpu = cpu
        self._hasher = PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB)

    async def hash(self, password: str) -> str:
        return await self._cpu.run(self._hasher.hash, password)
