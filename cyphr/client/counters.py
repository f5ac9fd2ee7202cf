"""
What a device has seen of each sending device's message counters, per
chat (docs/encryption.rst, "Counters, gaps and time"): a message over
sessions (cyphr.client.sessionmessages) carries a counter per chat and
sending device, from 1. :class:`Counters` says of each message whether it
is new, a duplicate (refused) or late, and which counters are missing
before it (a gap to show); its memory is bounded, and it is stored in
the vault as JSON (:meth:`Counters.export`, :meth:`Counters.load`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_MISSING = 1000  # missing counters remembered per chat and sending device
MAX_COUNTER = 2**53 - 1  # what JSON carries exactly


def _count(value: Any, lowest: int) -> bool:
    return type(value) is int and lowest <= value <= MAX_COUNTER


@dataclass(frozen=True)
class Arrival:
    duplicate: bool                   # seen before, or too old to tell: refused
    missing: range = range(0)         # the counters skipped just before it: a gap to show
    late: bool = False                # it fills a gap shown earlier
    reason: str = ""


@dataclass
class _Stream:
    high: int = 0                     # the highest counter seen
    forgotten: int = 0                # counters up to this one not in missing are unknown
    missing: set[int] = field(default_factory=set)

    def trim(self, most: int) -> None:
        if len(self.missing) > most:
            dropped = sorted(self.missing)[:len(self.missing) - most]
            self.missing.difference_update(dropped)
            self.forgotten = max(self.forgotten, dropped[-1])


class Counters:
    """The counters seen of each sending device, per chat: the highest,
    and the missing ones below it (at most ``max_missing`` per chat and
    device, the oldest forgotten first). Counters start at 1 in each chat,
    so a member of some chats only sees no gaps for the others."""

    def __init__(self, max_missing: int = MAX_MISSING) -> None:
        self.max_missing = max_missing
        self._streams: dict[tuple[str, str, int], _Stream] = {}

    def check(self, chat_id: str, sender_id: str, device_id: int, counter: int) -> Arrival:
        """What ``counter`` would be; nothing changes."""
        s = self._streams.get((chat_id, sender_id, device_id), _Stream())
        what = f"message {counter} of device {device_id} of {sender_id} in chat {chat_id}"
        if counter > s.high:
            return Arrival(False, range(s.high + 1, counter))
        if counter in s.missing:
            return Arrival(False, late=True)
        if counter <= s.forgotten:
            return Arrival(True, reason=f"{what} is too old to tell from a replay")
        return Arrival(True, reason=f"{what} was received before (a replay)")

    def record(self, chat_id: str, sender_id: str, device_id: int, counter: int) -> Arrival:
        """:meth:`check`, and remember ``counter`` unless it is a duplicate."""
        if not _count(counter, 1):
            raise ValueError("a counter is between 1 and 2^53 - 1")
        arrival = self.check(chat_id, sender_id, device_id, counter)
        if arrival.duplicate:
            return arrival
        s = self._streams.setdefault((chat_id, sender_id, device_id), _Stream())
        s.missing.discard(counter)
        if counter > s.high:
            # A gap wider than max_missing: its oldest counters are forgotten at once.
            kept = max(s.high + 1, counter - self.max_missing)
            s.forgotten = max(s.forgotten, kept - 1)
            s.missing.update(range(kept, counter))
            s.high = counter
        s.trim(self.max_missing)
        return arrival

    def missing(self, chat_id: str, sender_id: str, device_id: int) -> list[int]:
        """The counters still missing (the latest ``max_missing``)."""
        return sorted(self._streams.get((chat_id, sender_id, device_id), _Stream()).missing)

    def export(self) -> dict[str, Any]:
        return {"version": 1, "streams": [
            {"chatId": c, "senderId": sender, "deviceId": d, "high": s.high,
             "forgotten": s.forgotten, "missing": sorted(s.missing)}
            for (c, sender, d), s in sorted(self._streams.items())]}

    @classmethod
    def load(cls, data: Any, *, max_missing: int = MAX_MISSING) -> Counters:
        counters = cls(max_missing)
        try:
            if data["version"] != 1:
                raise ValueError("stored counters of an unknown version")
            for entry in data["streams"]:
                key = (entry["chatId"], entry["senderId"], entry["deviceId"])
                numbers = [entry["high"], entry["forgotten"], *entry["missing"]]
                if not all(isinstance(k, str) for k in key[:2]) or not _count(key[2], 1) \
                        or not all(_count(n, 0) for n in numbers) or key in counters._streams:
                    raise ValueError("stored counters are malformed")
                stream = _Stream(entry["high"], entry["forgotten"], set(entry["missing"]))
                stream.trim(max_missing)
                counters._streams[key] = stream
        except (KeyError, TypeError) as e:
            raise ValueError(f"stored counters are malformed: {e!r}") from None
        return counters
