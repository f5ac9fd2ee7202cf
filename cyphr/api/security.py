"""/api/auth: two-factor login and password hashing."""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable

from klein import Klein

from cyphr.api.guard import authenticated
from cyphr.api.http import answer, read_json
from cyphr.api.identity import totp_code
from cyphr.errors import NotFound
from cyphr.handlers.auth import Authenticator, AuthUser
from cyphr.handlers.ratelimit import RateLimits
from cyphr.handlers.security import PasswordHashing, TotpHandler
from cyphr.handlers.validation import Fields, invalid

MAX_PASSWORD_LENGTH = 1024


def _hash_password_setting(route: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """hash-password is off unless the operator turns it on
    (hash_password_endpoint): it makes a client send its passphrase here.
    Off, it answers as a route that does not exist, before any token is
    looked at."""

    @functools.wraps(route)
    async def guarded(self: SecurityAPI, request: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._hash_password_endpoint:
            raise NotFound("No route for POST /api/auth/hash-password")
        return await route(self, request, *args, **kwargs)

    return guarded


class SecurityAPI:
    app = Klein()

    def __init__(self, totp: TotpHandler, passwords: PasswordHashing, authenticator: Authenticator,
                 limits: RateLimits, *, hash_password_endpoint: bool = False) -> None:
        self._totp = totp
        self._passwords = passwords
        self._hash_password_endpoint = hash_password_endpoint
        self.authenticator = authenticator
        self.limits = limits

    @app.route("/api/auth/hash-password", methods=["POST"])
    @_hash_password_setting
    @authenticated(ip_limited=True)
    async def hash_password(self, request: Any, user: AuthUser) -> bytes:
        fields = Fields(read_json(request), {"password"})
        password = fields.text("password", max_length=MAX_PASSWORD_LENGTH, allow_control=True)
        if not password:
            raise invalid("password", "password must not be empty")
        self.limits.password.hit(user.user_id)
        return answer(request, {"success": True, "hash": await self._passwords.hash(password)})

    @app.route("/api/auth/totp/generate", methods=["POST"])
    @authenticated(ip_limited=True)
    async def totp_generate(self, request: Any, user: AuthUser) -> bytes:
        Fields(read_json(request, required=False), set())
        setup = await self._totp.generate(user.user_id, user.cyphr_id)
        return answer(request, {
            "success": True, "secret": setup.secret, "otpauthUrl": setup.otpauth_url,
            "qrCode": setup.qr_code})

    @app.route("/api/auth/totp/verify", methods=["POST"])
    @authenticated(ip_limited=True)
    async def totp_verify(self, request: Any, user: AuthUser) -> bytes:
        code = totp_code(Fields(read_json(request), {"code"}), "code", required=True)
        assert code is not None
        await self._totp.verify(user.user_id, code)
        return answer(request, {"success": True, "enabled": True})

    @app.route("/api/auth/totp/disable", methods=["POST"])
    @authenticated(ip_limited=True)
    async def totp_disable(self, request: Any, user: AuthUser) -> bytes:
        code = totp_code(Fields(read_json(request), {"code"}), "code", required=True)
        assert code is not None
        await self._totp.disable(user.user_id, code)
        return answer(request, {"success": True, "enabled": False})
