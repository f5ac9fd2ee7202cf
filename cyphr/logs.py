"""
Log output: ``--log-format json`` writes one JSON object per line.

Each line holds the time, the level, the namespace, the formatted message
and the event's own fields; a failure adds its traceback. Under twistd the
observer is handed over as the application's ILogObserver component (see
cyphr.server.CyphrService), which twistd then uses instead of its own.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

# Keys that Twisted's own and legacy events carry for its machinery.
_INTERNAL_KEYS = frozenset({"format", "message", "isError", "system", "time", "why", "failure"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def event_as_json(event: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name if level is not None else ("error" if event.get("isError") else "info"),
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in _INTERNAL_KEYS and key not in record:
            record[key] = _jsonable(value)
    failure = event.get("log_failure") or event.get("failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False)


@implementer(ILogObserver)
class JsonLogObserver:
    def __init__(self, out: IO[str] | None = None) -> None:
        # Taken now: once logging starts, twistd points sys.stdout at the log
        # itself, and writing there would feed this observer its own lines.
        self._out = out or sys.stdout

    def __call__(self, event: dict[str, Any]) -> None:
        self._out.write(event_as_json(event) + "\n")
        self._out.flush()
