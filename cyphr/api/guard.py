"""
Who may call a route, written on the route itself.

Every route is decorated with ``@authenticated()`` or ``@public()``, so that
a route open to anyone is open on purpose (a test checks that none is
neither). ``ip_limited=True`` counts the call against the per-address limit
of /api/cyphr-id/* and /api/auth/*. The API class provides
``self.authenticator`` and ``self.limits``.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable

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
