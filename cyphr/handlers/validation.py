"""
Reading client input: one place that says what a well-formed field is, for
REST routes and Socket.IO events alike. Every refusal is a 400 naming the
field, and happens before anything is stored.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from typing import Any, Iterable, Mapping

from cyphr.clock import parse_iso
from cyphr.errors import (
    INVALID_CYPHR_ID,
    INVALID_FIELD,
    MISSING_FIELD,
    UNKNOWN_FIELD,
    BadRequest,
)

# ASCII only: fullmatch with re.ASCII admits no look-alike letters or digits.
CYPHR_ID = re.compile(r"[a-z0-9_]{3,30}", re.ASCII)
CYPHR_ID_PREFIX = re.compile(r"[a-z0-9_]{1,30}", re.ASCII)
FINGERPRINT = re.compile(r"[0-9a-f]{64}", re.ASCII)
_MISSING = object()
# The deepest nesting of arrays and objects accepted in a REST body or a
# socket event. Far above what any request of the contract needs, far below
# where encoding the value back (json.dumps, a relay) would overflow the stack.
MAX_JSON_DEPTH = 64
# The most of a client's own text (a field name it made up) that an error
# message or its details repeat, and how many such names: a refusal must
# not cost more than the request that caused it, in the answer or a log.
MAX_ECHO = 64
MAX_ECHOED_NAMES = 10
_CONTAINERS = (dict, list, tuple)
_BYTES = (bytes, bytearray, memoryview)


def refuse_json_constant(name: str) -> Any:
    """For ``json.loads(..., parse_constant=)``: NaN, Infinity and -Infinity
    are not JSON, whatever Python's decoder accepts by default."""
    raise ValueError(f"{name} is not valid JSON")


def json_too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """
    True if arrays and objects in ``value`` nest more than ``limit`` deep (a
    bare scalar is depth 0, ``[]`` depth 1). Iterative, so any value the
    JSON decoder built is scanned without recursion; the scan stops at the
    first container past the limit.
    """
    if type(value) not in _CONTAINERS:
        return False
    stack = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > limit:
            return True
        children = container.values() if type(container) is dict else container
        for child in children:
            if type(child) in _CONTAINERS:
                stack.append((child, depth + 1))
    return False


def _json_value_problem(value: Any) -> str | None:
    """What makes ``value`` no JSON value of at most MAX_JSON_DEPTH levels:
    "deep", "bytes" (a binary Socket.IO event puts its attachments in place
    of JSON values), or None. One iterative pass."""
    if type(value) not in _CONTAINERS:
        return "bytes" if isinstance(value, _BYTES) else None
    stack = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return "deep"
        for child in container.values() if type(container) is dict else container:
            kind = type(child)
            if kind in _CONTAINERS:
                stack.append((child, depth + 1))
            elif kind in _BYTES:
                return "bytes"
    return None


def echo(text: Any) -> str:
    """``text`` (a client's) as an error may repeat it: at most MAX_ECHO
    characters, the cut marked with an ellipsis."""
    text = text if isinstance(text, str) else repr(text)
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO - 1] + "\u2026"


def invalid(field: str, message: str, code: str = INVALID_FIELD) -> BadRequest:
    return BadRequest(message, code=code, details={"field": field})


def is_cyphr_id(value: Any) -> bool:
    return isinstance(value, str) and CYPHR_ID.fullmatch(value) is not None


def check_cyphr_id(value: Any, field: str = "cyphrId") -> str:
    if not is_cyphr_id(value):
        raise invalid(field, "A Cyphr ID is 3 to 30 characters of a-z, 0-9 and _",
                      INVALID_CYPHR_ID)
    return value


# JSON may escape a lone UTF-16 surrogate ("\\ud800"), which decodes to a
# str that is not Unicode text: it cannot be encoded, stored or sent on.
_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Fields:
    """The fields of a JSON object body, read one by one with their rules.
    Fields the route does not know are refused up front."""

    def __init__(self, body: Mapping[str, Any], allowed: Iterable[str]) -> None:
        if not isinstance(allowed, (set, frozenset)):
            allowed = set(allowed)
        if not allowed.issuperset(body):  # the common case costs one C call
            unknown = sorted(name for name in body if name not in allowed)
            # Named as the client sent them, but cut short: the names are
            # the client's, of any length and number.
            shown = [echo(name) for name in unknown[:MAX_ECHOED_NAMES]]
            more = len(unknown) - len(shown)
            listed = ", ".join(shown) + (f" and {more} more" if more else "")
            raise BadRequest(f"Unknown field: {listed}", code=UNKNOWN_FIELD,
                             details={"fields": shown})
        self._body = body

    def present(self, name: str) -> bool:
        return name in self._body

    def _get(self, name: str, required: bool) -> Any:
        value = self._body.get(name, _MISSING)
        if value is _MISSING or (value is None and required):
            if required:
                raise invalid(name, f"{name} is required", MISSING_FIELD)
            return None
        return value

    def value(self, name: str) -> Any:
        """A required field as it came, for a check of its own: any JSON
        value nested at most MAX_JSON_DEPTH deep. Bytes (the attachments of
        a binary socket event) are no JSON value, and are refused here, so
        that no field of the contract can carry them into storage or a relay."""
        value = self._get(name, True)
        problem = _json_value_problem(value)
        if problem == "deep":
            raise invalid(name, f"{name} is nested deeper than {MAX_JSON_DEPTH} levels")
        if problem == "bytes":
            raise invalid(name, f"{name} must be JSON, not binary data")
        return value

    def text(self, name: str, *, required: bool = True, max_length: int = 1000,
             allow_control: bool = False) -> str | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise invalid(name, f"{name} must be a string")
        if len(value) > max_length:
            raise invalid(name, f"{name} is longer than {max_length} characters")
        if (_SURROGATE if allow_control else _CONTROL_OR_SURROGATE).search(value) is not None:
            if _SURROGATE.search(value) is not None:
                raise invalid(name, f"{name} holds a lone surrogate, which is not text")
            raise invalid(name, f"{name} holds control characters")
        return value

    def cyphr_id(self, name: str = "cyphrId", *, required: bool = True) -> str | None:
        value = self._get(name, required)
        if value is None:
            return None
        return check_cyphr_id(value, name)

    def fingerprint(self, name: str) -> str:
        value = self._get(name, True)
        if not isinstance(value, str) or not FINGERPRINT.fullmatch(value):
            raise invalid(name, f"{name} must be 64 lowercase hexadecimal characters")
        return value

    def uuid(self, name: str) -> str:
        value = self._get(name, True)
        if not isinstance(value, str) or len(value) != 36:
            raise invalid(name, f"{name} must be a UUID")
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise invalid(name, f"{name} must be a UUID") from None

    def base64(self, name: str, *, length: int | None = None, max_length: int = 4096,
               required: bool = True) -> bytes | None:
        value = self._get(name, required)
        if value is None:
            return None
        return decode_base64(value, name, length=length, max_length=max_length)

    def integer(self, name: str, *, minimum: int, maximum: int, required: bool = True) -> int | None:
        value = self._get(name, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise invalid(name, f"{name} must be an integer from {minimum} to {maximum}")
        return value

    def boolean(self, name: str, *, default: bool) -> bool:
        """An optional true or false (null or absent: ``default``)."""
        value = self._get(name, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(name, f"{name} must be true or false")
        return value

    def timestamp(self, name: str, *, required: bool = True, field: str | None = None) -> int | None:
        """An ISO 8601 UTC time with milliseconds (2026-11-27T20:36:35.123Z),
        strictly in that form, as milliseconds since the epoch."""
        value = self._get(name, required)
        if value is None:
            return None
        return parse_timestamp(value, field or name)

    def list(self, name: str, *, max_items: int, allow_empty: bool = False) -> list[Any]:
        value = self._get(name, True)
        if not isinstance(value, list):
            raise invalid(name, f"{name} must be a list")
        if not value and not allow_empty:
            raise invalid(name, f"{name} must not be empty")
        if len(value) > max_items:
            raise invalid(name, f"{name} holds more than {max_items} items")
        return value


def parse_timestamp(value: Any, field: str) -> int:
    ms = parse_iso(value)
    if ms is None:
        raise invalid(field, f"{field} must be a valid UTC time such as 2026-11-27T20:36:35.123Z")
    return ms


def decode_base64(value: Any, field: str, *, length: int | None = None,
                  max_length: int = 4096) -> bytes:
    """Standard base64 with padding, of the given decoded length."""
    if not isinstance(value, str):
        raise invalid(field, f"{field} must be a base64 string")
    if len(value) > (max_length * 4 // 3) + 4:
        raise invalid(field, f"{field} is too long")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise invalid(field, f"{field} is not valid base64") from None
    if length is not None and len(raw) != length:
        raise invalid(field, f"{field} must be {length} bytes, not {len(raw)}")
    if len(raw) > max_length:
        raise invalid(field, f"{field} is too long")
    return raw


def b64(raw: bytes | None) -> str | None:
    return base64.b64encode(raw).decode("ascii") if raw is not None else None
