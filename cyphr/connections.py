"""
What one client address, and the process as a whole, may hold open.

Counting only: the HTTP site (cyphr.api.http) counts its connections here
and refuses those over a cap; the Engine.IO server (cyphr.realtime.engine)
keys its handshake caps with ``address_key``. Everything runs on the
reactor thread: plain integers and dicts, no lock.
"""

from __future__ import annotations

import ipaddress
import resource

from twisted.logger import Logger

_log = Logger()

# Of the open-file limit, the share that client connections may take: the
# rest is for the database pool, the event bus, log and database files, the
# listening sockets, and the connections being refused (each is accepted,
# answered and closed, so it holds a descriptor for a moment).
CONNECTION_SHARE = 0.8
# "Unlimited" open files is capped by the kernel (fs.nr_open), usually 2**20.
UNLIMITED_FILES = 1 << 20


def address_key(ip: str) -> str:
    """The key a client address is counted under: an IPv4 address as it is
    (an IPv4-mapped IPv6 address as its IPv4 one); an IPv6 address by its
    /64, the block one subscriber is usually given (counting each of its
    2**64 addresses apart would cap nothing); anything else (a unix socket
    peer) as it is."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


def open_file_limit() -> int:
    """The soft limit on open files now in force (the tap raises it to the
    hard limit before the server is built)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED_FILES if soft == resource.RLIM_INFINITY else soft


def connection_cap(setting: int, open_files: int) -> int:
    """The cap on open connections: ``setting``, or, when it is 0 or more
    than the open-file limit allows, that share of the limit."""
    most = max(1, int(open_files * CONNECTION_SHARE))
    if setting and setting > most:
        _log.warn("max_connections {setting} is more than the open-file limit ({files}) allows: "
                  "{most} are used", setting=setting, files=open_files, most=most)
    return min(setting, most) if setting else most


class ConnectionLimits:
    """
    Open connections of one site: at most ``total`` in all, and at most
    ``per_address`` counted for one client address (0: no cap per address).
    The site admits and releases connections, and claims and unclaims the
    address each is counted for. ``refused`` counts refusals by reason, for
    metrics.
    """

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.open = 0
        self._by_address: dict[str, int] = {}
        self.refused = {"total": 0, "per_address": 0, "request_timeout": 0}

    @property
    def addresses(self) -> int:
        """How many addresses hold a connection now."""
        return len(self._by_address)

    def admit(self) -> bool:
        """Count a new connection, unless the cap is reached."""
        if self.open >= self.total:
            self.refused["total"] += 1
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1

    def claim(self, key: str) -> bool:
        """Count one connection for the address ``key`` (see address_key),
        unless it holds ``per_address`` already."""
        count = self._by_address.get(key, 0)
        if self.per_address and count >= self.per_address:
            self.refused["per_address"] += 1
            return False
        self._by_address[key] = count + 1
        return True

    def unclaim(self, key: str) -> None:
        count = self._by_address.get(key, 0) - 1
        if count > 0:
            self._by_address[key] = count
        else:
            self._by_address.pop(key, None)  # an address gone is not remembered
