"""Time as the server speaks it: milliseconds from the injected clock, and
the contract's ISO 8601 form. Nothing here reads the system clock."""

from __future__ import annotations

import calendar
import re
import time
from typing import Any

_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{3})Z", re.ASCII)


def now_ms(clock: Any) -> int:
    """Milliseconds since the epoch, from a clock with ``seconds()``."""
    return int(clock.seconds() * 1000)


def iso(ms: int | None) -> str | None:
    """``2026-11-27T20:36:35.123Z`` from milliseconds since the epoch."""
    if ms is None:
        return None
    # Integer arithmetic: exact to the millisecond, and cheap on hot paths,
    # where the same second comes many times in a row. (One tuple, swapped
    # whole, so that a thread never reads one second with another's text.)
    global _iso_cache
    seconds, millis = divmod(ms, 1000)
    cached = _iso_cache
    if cached[0] != seconds:
        cached = _iso_cache = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{cached[1]}.{millis:03d}Z"


_iso_cache: tuple[int | None, str] = (None, "")


def parse_iso(value: Any) -> int | None:
    """Milliseconds since the epoch of a time written exactly as :func:`iso`
    writes it (a valid date, 1970 or later); None for anything else."""
    match = _ISO.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second, millis = (int(g) for g in match.groups())
    if not (1970 <= year and 1 <= month <= 12 and hour < 24 and minute < 60 and second < 60
            and 1 <= day <= calendar.monthrange(year, month)[1]):
        return None
    return calendar.timegm((year, month, day, hour, minute, second)) * 1000 + millis
