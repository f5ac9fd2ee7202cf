"""
ICE servers for WebRTC calls: STUN from the configuration, and TURN with
time-limited credentials in the TURN REST scheme that coturn checks with
``use-auth-secret`` and ``static-auth-secret``: the username is
``"<expiry, Unix seconds>:<user>"`` and the password is the base64 of the
HMAC-SHA1 of that username under the shared secret. The TURN server needs
no database of users, and a credential stops working at its expiry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IceServer:
    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class IceConfiguration:
    servers: tuple[IceServer, ...]
    ttl: int  # seconds the TURN credentials stay valid


def turn_credential(secret: bytes, username: str) -> str:
    """coturn's password for ``username``: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret, username.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


class IceServers:
    def __init__(self, stun_urls: tuple[str, ...], turn_urls: tuple[str, ...], turn_secret: str,
                 ttl: int, clock: Any) -> None:
        self._stun = tuple(stun_urls)
        self._turn = tuple(turn_urls)
        self._secret = turn_secret.encode("utf-8") if turn_secret else None
        self._ttl = ttl
        self._clock = clock

    def for_user(self, user_id: str) -> IceConfiguration:
        """
        The ICE servers for one user. The TURN username names the user by
        its internal id (the JWT ``sub``), not its cyphrId: the TURN
        server's logs then show an opaque id, not who calls whom.
        """
        servers = []
        if self._stun:
            servers.append(IceServer(self._stun))
        if self._turn and self._secret is not None:
            expiry = int(self._clock.seconds()) + self._ttl
            username = f"{expiry}:{user_id}"
            servers.append(IceServer(self._turn, username, turn_credential(self._secret, username)))
        return IceConfiguration(tuple(servers), self._ttl)
