"""
Packet codecs for Socket.IO v5 over Engine.IO v4: pure functions, no I/O.

Two layers, one inside the other (``/work/shared/socketio-protocol.md``):

* Engine.IO v4 is the session: ``<type digit><data>`` packets (open, close,
  ping, pong, message, upgrade, noop). On a WebSocket each packet is one frame
  and a binary frame is a message packet as is; in an HTTP long-polling body
  the packets are joined by ``\\x1e`` and a binary message becomes
  ``b<base64>``.
* Socket.IO v5 rides in Engine.IO message packets:
  ``<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]``. Binary values
  travel as separate message packets right after that text header, and a
  ``{"_placeholder": true, "num": i}`` in the JSON marks where each belongs.

Decoding follows the reference parsers (npm engine.io-parser 5.2.3 and
socket.io-parser 4.2.7) rule for rule, except where they accept input only
through JavaScript's loose number conversion (" " reads as 0, "0x1" as 1);
each such place says so. Errors a peer causes raise ``ProtocolError``; errors
in what this server asks to encode raise ``ValueError`` or ``TypeError``.
"""

from __future__ import annotations

import binascii
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class ProtocolError(ValueError):
    """What a peer sent breaks the protocol; the session that sent it is closed."""


class EventTooLarge(ProtocolError):
    """A Socket.IO packet, header and binary attachments together, passes
    its decoder's ``limit``: the session is closed before the rest is read."""


class NestedTooDeep(ProtocolError):
    """
    A packet whose JSON nests deeper than the decoder can go. The packet is
    framed like any other, so the layer above may refuse just this one (an
    EVENT: with an error ack, by ``ack_id``) and keep the session; a binary
    one is still followed by its attachments, and is a protocol error.
    """

    def __init__(self, kind: int, namespace: str, ack_id: int | None) -> None:
        super().__init__("payload nested too deeply")
        self.kind = kind
        self.namespace = namespace
        self.ack_id = ack_id


_BYTES_LIKE = (bytes, bytearray, memoryview)


def _as_bytes(value: object) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, _BYTES_LIKE):
        return bytes(value)
    raise TypeError(f"expected str or bytes, not {type(value).__name__}")


# ---- Engine.IO v4

OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP = range(7)

_ENGINE_TYPES = {str(kind): kind for kind in range(7)}  # "4" -> MESSAGE
_ENGINE_DIGITS = {kind: str(kind) for kind in range(7)}  # MESSAGE -> "4"


@dataclass(frozen=True, slots=True)
class EnginePacket:
    """One Engine.IO packet; ``data`` is bytes only in a binary MESSAGE."""

    type: int
    data: str | bytes = ""


def _engine_digit(kind: int) -> str:
    digit = _ENGINE_DIGITS.get(kind)
    if digit is None or type(kind) is not int:
        raise ValueError(f"no Engine.IO packet type {kind!r}")
    return digit


def encode_frame(packet: EnginePacket) -> str | bytes:
    """
    The WebSocket frame for ``packet``: text ``"4hello"`` (type digit and
    data), or for a binary MESSAGE the raw bytes, without a type prefix.
    """
    data = packet.data
    if type(data) is str:
        return _engine_digit(packet.type) + data
    if packet.type != MESSAGE:
        raise ValueError(f"Engine.IO packet type {packet.type!r} cannot carry bytes")
    return _as_bytes(data)


def decode_frame(frame: str | bytes) -> EnginePacket:
    """
    The Engine.IO packet in one WebSocket frame: a binary frame is a MESSAGE;
    a text frame starts with a type digit 0 to 6, or is ``b<base64>``: a
    binary MESSAGE from a client that cannot send binary frames
    (engine.io-client's ``forceBase64``), read as in a polling payload.
    """
    if type(frame) is not str:
        return EnginePacket(MESSAGE, _as_bytes(frame))
    if not frame:
        raise ProtocolError("empty Engine.IO packet")
    kind = _ENGINE_TYPES.get(frame[0])
    if kind is None:
        # Looked at only here, off the path of every ordinary frame.
        if frame[0] == "b":
            return EnginePacket(MESSAGE, _decode_base64(frame[1:]))
        raise ProtocolError(f"unknown Engine.IO packet type {frame[0]!r}")
    return EnginePacket(kind, frame[1:])


def _decode_base64(text: str) -> bytes:
    try:
        # strict: no foreign characters, no missing or stray padding
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise ProtocolError("bad base64 in a binary packet") from None


def encode_payload(packets: Iterable[EnginePacket]) -> bytes:
    """
    A long-polling body (UTF-8): the packets joined by ``\\x1e``, each binary
    MESSAGE written as ``b`` and standard base64 with padding.
    """
    records: list[str] = []
    for packet in packets:
        data = packet.data
        if type(data) is str:
            records.append(_engine_digit(packet.type) + data)
        elif packet.type != MESSAGE:
            raise ValueError(f"Engine.IO packet type {packet.type!r} cannot carry bytes")
        elif isinstance(data, _BYTES_LIKE):
            records.append("b" + binascii.b2a_base64(data, newline=False).decode("ascii"))
        else:
            raise TypeError(f"expected str or bytes, not {type(data).__name__}")
    if not records:
        # A client reads an empty body as a parse error and closes.
        raise ValueError("a polling payload needs at least one packet")
    return "\x1e".join(records).encode("utf-8")


def decode_payload(body: bytes, max_packets: int = 1000) -> list[EnginePacket]:
    """The packets of a long-polling body, as :func:`encode_payload` writes them."""
    if not body:
        raise ProtocolError("empty polling payload")
    # Counted before splitting, so a body of separators costs no list.
    if body.count(b"\x1e") >= max_packets:
        raise ProtocolError(f"more than {max_packets} packets in one payload")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("polling payload is not UTF-8") from None
    packets: list[EnginePacket] = []
    for record in text.split("\x1e"):
        if not record:
            raise ProtocolError("empty packet in a polling payload")
        first = record[0]
        if first == "b":
            packets.append(EnginePacket(MESSAGE, _decode_base64(record[1:])))
            continue
        kind = _ENGINE_TYPES.get(first)
        if kind is None:
            raise ProtocolError(f"unknown Engine.IO packet type {first!r}")
        packets.append(EnginePacket(kind, record[1:]))
    return packets


# ---- Socket.IO v5

CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR, BINARY_EVENT, BINARY_ACK = range(7)
RESERVED_EVENTS = frozenset({
    "connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener",
})
MAX_ATTACHMENTS = 10
# The longest namespace name read. Names are the application's ("/",
# "/admin"), never user data: anything longer is a protocol error, and no
# answer ever echoes more than this of what a client sent.
MAX_NAMESPACE = 128

_SOCKET_TYPES = {str(kind): kind for kind in range(7)}
_SOCKET_DIGITS = {kind: str(kind) for kind in range(7)}
_UNBINARY = {BINARY_EVENT: EVENT, BINARY_ACK: ACK}
_BINARY = {EVENT: BINARY_EVENT, ACK: BINARY_ACK, BINARY_EVENT: BINARY_EVENT, BINARY_ACK: BINARY_ACK}
# Ack ids are JavaScript numbers on the other side: exact below 2**53.
_ACK_ID_LIMIT = 2**53
_ACK_ID_DIGITS = len(str(_ACK_ID_LIMIT))
# The longest attachment count read; far above any sane max_attachments.
_COUNT_DIGITS = 6
_JSON_WHITESPACE = " \t\n\r"


@dataclass(slots=True)
class SocketPacket:
    """One Socket.IO packet. ``data`` None means no payload; ``id`` is the ack id."""

    type: int
    namespace: str = "/"
    data: Any = None
    id: int | None = None


def _payload_problem(kind: int, data: Any) -> str | None:
    """What breaks the payload rule of ``kind`` (reference ``isPayloadValid``), or None."""
    if kind == EVENT or kind == BINARY_EVENT:
        if not isinstance(data, (list, tuple)) or not data:
            return "an event needs a non-empty array"
        name = data[0]
        if isinstance(name, str):
            if name in RESERVED_EVENTS:
                return f"reserved event name {name!r}"
        # A JavaScript number: int or float, but bool is an int in Python.
        elif not isinstance(name, (int, float)) or isinstance(name, bool):
            return "an event name must be a string or a number"
        return None
    if kind == ACK or kind == BINARY_ACK:
        return None if isinstance(data, (list, tuple)) else "an ack needs an array"
    if kind == CONNECT:
        return None if data is None or isinstance(data, dict) else "a connect payload must be an object"
    if kind == DISCONNECT:
        return None if data is None else "a disconnect has no payload"
    if kind == CONNECT_ERROR:
        return None if isinstance(data, (str, dict)) else "a connect error must be an object or a string"
    return f"unknown Socket.IO packet type {kind!r}"


# -- encoding

class _BinaryFound(Exception):
    """Raised out of the JSON encoder: this data needs the attachment pass."""


def _refuse_binary(value: object) -> object:
    if isinstance(value, _BYTES_LIKE):
        raise _BinaryFound
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_encoder(default: Any, ensure_ascii: bool = False) -> json.JSONEncoder:
    return json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=False, default=default,
    )


_dumps_plain = _json_encoder(_refuse_binary).encode


def _dumps(data: Any, attachments: list[bytes] | None, ensure_ascii: bool = False) -> str:
    """
    ``data`` as compact JSON. With a list for ``attachments``, each bytes value
    is moved there and replaced by its placeholder, in document order like the
    reference's deconstructPacket.
    """
    if attachments is None:
        return _json_encoder(_refuse_binary, ensure_ascii).encode(data)

    def placeholder(value: object) -> object:
        if isinstance(value, _BYTES_LIKE):
            attachments.append(_as_bytes(value))
            return {"_placeholder": True, "num": len(attachments) - 1}
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    return _json_encoder(placeholder, ensure_ascii).encode(data)


def encode_packet(packet: SocketPacket) -> list[str | bytes]:
    """
    The Engine.IO MESSAGE payloads for ``packet``: the text header, then one
    bytes value per binary attachment.

    Bytes anywhere in the data of an EVENT or ACK become attachments, and the
    packet goes out as BINARY_EVENT or BINARY_ACK; a BINARY_* packet without
    bytes goes out as EVENT or ACK, since the reference decoder refuses a
    binary packet with no attachments. The payload rules of the decoder, and
    its limit of MAX_ATTACHMENTS, apply here too, so the server cannot send
    what a client would refuse.
    """
    kind = packet.type
    data = packet.data
    problem = _payload_problem(kind, data)
    if problem is not None or type(kind) is not int:
        raise ValueError(f"cannot encode: {problem or 'bad packet type'}")
    binary_capable = kind in _BINARY
    attachments: list[bytes] = []
    if data is None:
        body = ""
    else:
        try:
            body = _dumps_plain(data)
        except _BinaryFound:
            if not binary_capable:
                raise TypeError("bytes can only travel in an EVENT or ACK") from None
            body = _dumps(data, attachments)
        if not body.isascii():
            try:
                body.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate (a peer may send "\ud800" in its JSON) cannot
                # be written as UTF-8: escape it, as JSON.stringify does.
                attachments.clear()
                body = _dumps(data, attachments if binary_capable else None, ensure_ascii=True)

    if attachments:
        if len(attachments) > MAX_ATTACHMENTS:
            # The reference decoder, in clients too, refuses more.
            raise ValueError(f"cannot encode more than {MAX_ATTACHMENTS} attachments")
        head = f"{_BINARY[kind]}{len(attachments)}-"
    else:
        head = _SOCKET_DIGITS[_UNBINARY.get(kind, kind)]
    namespace = packet.namespace
    if namespace != "/":
        if not namespace.startswith("/") or "," in namespace:
            raise ValueError(f"cannot encode namespace {namespace!r}")
        head += namespace + ","
    ack_id = packet.id
    if ack_id is not None:
        if type(ack_id) is not int or not 0 <= ack_id < _ACK_ID_LIMIT:
            raise ValueError(f"cannot encode ack id {ack_id!r}")
        head += str(ack_id)
    if not attachments:
        return [head + body]
    frames: list[str | bytes] = [head + body]
    frames.extend(attachments)
    return frames


# -- decoding

@dataclass(frozen=True, slots=True)
class EncodedJson:
    """A value already written as compact JSON text with no bytes in it,
    which a handler may answer as its ack (the ack of a send, made once per
    message): it goes out as it is, not encoded again."""

    text: str


def encode_event_json(event: str, json_text: str) -> list[str | bytes]:
    """``encode_packet(SocketPacket(EVENT, "/", [event, data]))`` where
    ``json_text`` is ``data`` already encoded as compact JSON with no bytes
    in it (a stored message on its way out: it is not parsed again)."""
    name = _EVENT_NAMES.get(event)
    if name is None:
        name = _dumps_plain(event)
        if len(_EVENT_NAMES) < 64:  # the server's own few event names
            _EVENT_NAMES[event] = name
    return ["2[" + name + "," + json_text + "]"]


_EVENT_NAMES: dict[str, str] = {}


def encode_ack_json(namespace: str, ack_id: int, value: EncodedJson) -> list[str | bytes]:
    """``encode_packet(SocketPacket(ACK, namespace, [value], ack_id))`` for
    a value already encoded (EncodedJson)."""
    if type(ack_id) is not int or not 0 <= ack_id < _ACK_ID_LIMIT:
        raise ValueError(f"cannot encode ack id {ack_id!r}")
    if namespace == "/":
        return ["3" + str(ack_id) + "[" + value.text + "]"]
    if not namespace.startswith("/") or "," in namespace:
        raise ValueError(f"cannot encode namespace {namespace!r}")
    return ["3" + namespace + "," + str(ack_id) + "[" + value.text + "]"]


def _refuse_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not JSON")


def _parse_float(text: str) -> float:
    # 1e400 reads as infinity (in JavaScript too), which could then not be
    # written back as JSON: refuse it here rather than fail when relaying it.
    value = float(text)
    if math.isinf(value):
        raise ProtocolError("number out of range")
    return value


# raw_decode parses from an offset, so the payload is not copied out first.
_scan_json = json.JSONDecoder(parse_float=_parse_float, parse_constant=_refuse_constant).raw_decode


def _find_placeholders(data: list[Any], count: int) -> list[tuple[Any, Any, int]]:
    """
    Where each placeholder sits in ``data``: (container, key, num). Iterative,
    so no nesting that the JSON decoder accepted can overflow the stack.
    """
    found: list[tuple[Any, Any, int]] = []
    stack: list[Any] = [data]
    while stack:
        container = stack.pop()
        items = enumerate(container) if type(container) is list else container.items()
        for key, value in items:
            kind = type(value)
            if kind is dict:
                if value.get("_placeholder") is True:
                    num = value.get("num")
                    if type(num) is not int or not 0 <= num < count:
                        raise ProtocolError("placeholder for an attachment that does not exist")
                    found.append((container, key, num))
                else:
                    stack.append(value)
            elif kind is list:
                stack.append(value)
    return found


class PacketDecoder:
    """
    Socket.IO packets from the Engine.IO MESSAGE payloads of one session.

    A binary packet comes back as EVENT or ACK with the attachments in place of
    their placeholders, as the reference decoder returns it.
    """

    __slots__ = ("_attachments", "_expected", "_max_attachments", "_pending", "_placeholders",
                 "_size", "limit")

    def __init__(self, max_attachments: int = MAX_ATTACHMENTS, limit: int = 0) -> None:
        self._max_attachments = max_attachments
        # The most one packet may weigh, its header (in characters) and
        # every attachment (in bytes) together; 0: no limit. The owner may
        # change it between packets (raise it once the peer is trusted).
        self.limit = limit
        self._pending: SocketPacket | None = None
        self._expected = 0
        self._size = 0  # what the pending packet weighs so far
        self._attachments: list[bytes] = []
        self._placeholders: list[tuple[Any, Any, int]] = []

    @property
    def waiting(self) -> bool:
        """True while a binary packet waits for its attachments."""
        return self._pending is not None

    @property
    def budget(self) -> int:
        """The most the next message may weigh (0: no limit): what is left
        of the limit while a binary packet waits for attachments."""
        if not self.limit:
            return 0
        return max(self.limit - self._size, 1) if self._pending is not None else self.limit

    def feed(self, message: str | bytes) -> SocketPacket | None:
        """
        Decode the next MESSAGE payload: a complete packet, or None while a
        binary packet still waits for attachments.
        """
        limit = self.limit
        if type(message) is str:
            if self._pending is not None:
                self._reset()
                raise ProtocolError("text packet while binary attachments were awaited")
            if limit and len(message) > limit:
                raise EventTooLarge(f"a packet larger than {limit}")
            return self._decode(message)
        if self._pending is None:
            raise ProtocolError("binary data without a binary packet")
        self._size += len(message)
        if limit and self._size > limit:
            # Dropped now: the attachments already read go with the session.
            self._reset()
            raise EventTooLarge(f"an event and its attachments larger than {limit}")
        attachments = self._attachments
        attachments.append(_as_bytes(message))
        if len(attachments) < self._expected:
            return None
        packet = self._pending
        for container, key, num in self._placeholders:
            container[key] = attachments[num]
        self._reset()
        return packet

    def _reset(self) -> None:
        self._pending = None
        self._expected = 0
        self._attachments = []
        self._placeholders = []
        self._size = 0

    def _decode(self, text: str) -> SocketPacket | None:
        end = len(text)
        if not end:
            raise ProtocolError("empty Socket.IO packet")
        kind = _SOCKET_TYPES.get(text[0])
        if kind is None:
            raise ProtocolError(f"unknown Socket.IO packet type {text[0]!r}")
        i = 1

        count = 0
        if kind == BINARY_EVENT or kind == BINARY_ACK:
            # The reference takes anything JavaScript's Number() reads as an
            # integer (" 1", "0x1", "1e1"); only plain digits are taken here.
            dash = text.find("-", 1, 2 + _COUNT_DIGITS)
            digits = text[1:dash]
            if dash < 0 or not (digits.isascii() and digits.isdigit()):
                raise ProtocolError("binary packet without a valid attachment count")
            count = int(digits)
            if count < 1:
                raise ProtocolError("binary packet without attachments")
            if count > self._max_attachments:
                raise ProtocolError(f"more than {self._max_attachments} attachments")
            i = dash + 1

        # The namespace runs to the first comma, which is consumed, or to the end.
        namespace = "/"
        if i < end and text[i] == "/":
            # Looked for no further than the longest name: bounded work.
            comma = text.find(",", i, i + MAX_NAMESPACE + 1)
            if comma < 0:
                if end - i > MAX_NAMESPACE:
                    raise ProtocolError("namespace name too long")
                namespace = text[i:]
                i = end
            else:
                namespace = text[i:comma]
                i = comma + 1

        # The ack id: allowed on every type, as in the reference, which keeps it
        # and lets the layer above ignore it where it means nothing.
        ack_id = None
        start = i
        while i < end and "0" <= text[i] <= "9":
            i += 1
            if i - start > _ACK_ID_DIGITS:  # bounded work for a megabyte of digits
                raise ProtocolError("ack id too large")
        if i > start:
            ack_id = int(text[start:i])
            if ack_id >= _ACK_ID_LIMIT:
                raise ProtocolError("ack id too large")

        data = None
        if i < end:
            # raw_decode does not skip leading whitespace, so " " here is an
            # error; the reference would read it as an ack id of 0.
            try:
                data, stop = _scan_json(text, i)
            except ProtocolError:
                raise
            except RecursionError:
                raise NestedTooDeep(kind, namespace, ack_id) from None
            except ValueError:  # JSONDecodeError, or an int of over 4300 digits
                raise ProtocolError("payload is not valid JSON") from None
            if stop != end and text[stop:].strip(_JSON_WHITESPACE):
                raise ProtocolError("data after the JSON payload")

        # The reference checks the payload only when there is one, so it would
        # take "42" (an event without a name); only CONNECT and DISCONNECT may
        # go without a payload here.
        problem = _payload_problem(kind, data)
        if problem is not None:
            raise ProtocolError(problem)

        if not count:
            return SocketPacket(kind, namespace, data, ack_id)
        self._placeholders = _find_placeholders(data, count)
        self._pending = SocketPacket(_UNBINARY[kind], namespace, data, ack_id)
        self._expected = count
        self._size = end
        return None


def peek_event(text: str) -> tuple[str, int | None] | None:
    """The namespace and ack id of a text EVENT packet (``2...``), read
    from its header alone, without its JSON: None for any other packet, or
    a header that does not parse (decoding the whole packet then says
    why). Cheap, so that an event over a rate can be refused unparsed."""
    if text[:1] != "2":
        return None
    end = len(text)
    i = 1
    namespace = "/"
    if i < end and text[i] == "/":
        comma = text.find(",", i, i + MAX_NAMESPACE + 1)
        if comma < 0:
            return None
        namespace = text[i:comma]
        i = comma + 1
    start = i
    while i < end and "0" <= text[i] <= "9" and i - start <= _ACK_ID_DIGITS:
        i += 1
    if i - start > _ACK_ID_DIGITS:
        return None
    ack_id = int(text[start:i]) if i > start else None
    if ack_id is not None and ack_id >= _ACK_ID_LIMIT:
        return None
    return namespace, ack_id
