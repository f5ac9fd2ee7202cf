"""
Giving freed memory back to the system.

CPython hands every block over 512 bytes (socket reads and writes, message
JSON, database rows) to the C library's malloc. glibc keeps what is freed
inside its heaps for reuse, and returns pages to the system only from the
top of a heap: after a burst (a backlog of messages, a storm of reconnects)
the process's RSS stays at the burst's peak although the memory is free,
and an operator cannot tell a leak from a past burst. ``malloc_trim(0)``
returns every free page of every heap. It costs about 10 ms after a burst
of a hundred megabytes and next to nothing otherwise; build_server calls it
once a minute, in the CPU pool (it takes the heaps' own locks).

Elsewhere than glibc (musl, macOS) there is no malloc_trim and this does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

from twisted.logger import Logger

_log = Logger()


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def can_trim() -> bool:
    """Whether this C library can give free memory back (glibc)."""
    return _TRIM is not None


def trim() -> None:
    """Give the C heap's free pages back to the system; never raises."""
    if _TRIM is None:
        return
    try:
        _TRIM(0)
    except Exception:  # noqa: BLE001 - a missed trim costs memory, not service
        _log.failure("malloc_trim failed")
