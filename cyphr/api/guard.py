"""
Who may call a route, written on the route itself.

Every route is decorated with ``@authenticated()``, ``@public()`` or
``@operator()``, so that a route open to anyone is open on purpose (a test
checks that every route has one). ``ip_limited=True`` counts the call
against the per-address limit of /api/cyphr-id/* and /api/auth/*. The API
class provides ``self.authenticator`` and ``self.limits``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import Any, Awaitable, Callable
from urllib.parse import unquote_to_bytes

from cyphr.errors import NotFound, Unauthorized

ADMIN_TOKEN_REQUIRED = "ADMIN_TOKEN_REQUIRED"
INVALID_ADMIN_TOKEN = "INVALID_ADMIN_TOKEN"

ACCESS_ATTRIBUTE = "cyphr_access"


def _guard(*, auth: bool, ip_limited: bool) -> Callable[[Callable[..., Any]], Callable[..., Awaitable[Any]]]:
    def decorate(route: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(route)
        async def guarded(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            if ip_limited:
                self.limits.auth_ip.hit(request.client_ip)
            if auth:
                user = await self.authenticator.authenticate(request.getHeader(b"authorization"))
                result = route(self, request, user, *args, **kwargs)
            else:
                result = route(self, request, *args, **kwargs)
            if hasattr(result, "__await__"):
                result = await result
            return result

        setattr(guarded, ACCESS_ATTRIBUTE, "authenticated" if auth else "public")
        return guarded

    return decorate


def authenticated(*, ip_limited: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Awaitable[Any]]]:
    """The route needs a valid bearer token; it is called with the AuthUser
    after the request."""
    return _guard(auth=True, ip_limited=ip_limited)


def public(*, ip_limited: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Awaitable[Any]]]:
    """The route is open to anyone, on purpose."""
    return _guard(auth=False, ip_limited=ip_limited)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def operator() -> Callable[[Callable[..., Any]], Callable[..., Awaitable[Any]]]:
    """
    The route is for the server's operator, who proves it with
    ``Authorization: Bearer <admin_token>``. The API class provides
    ``self.admin_token`` (bytes, or None when the operator set none: then
    the route answers 404 exactly as a route that does not exist).
    """

    def decorate(route: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(route)
        async def guarded(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            expected = self.admin_token
            if not expected:
                method = request.method.decode("ascii", "replace")
                path = unquote_to_bytes(request.path).decode("utf-8", "replace")
                raise NotFound(f"No route for {method} {path}")
            header = request.getHeader(b"authorization") or b""
            scheme, _, token = header.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                raise Unauthorized("This route needs Authorization: Bearer <admin token>",
                                   code=ADMIN_TOKEN_REQUIRED)
            # Digests of equal length: the comparison time tells nothing,
            # not even the token's length.
            if not hmac.compare_digest(_digest(token.strip()), _digest(expected)):
                raise Unauthorized("The admin token is not valid", code=INVALID_ADMIN_TOKEN)
            result = route(self, request, *args, **kwargs)
            if hasattr(result, "__await__"):
                result = await result
            return result

        setattr(guarded, ACCESS_ATTRIBUTE, "operator")
        return guarded

    return decorate
