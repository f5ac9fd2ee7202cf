"""The Engine.IO v4 and Socket.IO v5 packet codecs, alone."""

from __future__ import annotations

import base64
from typing import Any

import engineio.packet
import engineio.payload
import socketio.packet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cyphr.realtime.codec import (
    ACK,
    BINARY_ACK,
    BINARY_EVENT,
    CLOSE,
    CONNECT,
    CONNECT_ERROR,
    DISCONNECT,
    EVENT,
    MAX_ATTACHMENTS,
    MESSAGE,
    NOOP,
    OPEN,
    PING,
    PONG,
    RESERVED_EVENTS,
    UPGRADE,
    EnginePacket,
    PacketDecoder,
    ProtocolError,
    SocketPacket,
    decode_frame,
    decode_payload,
    encode_frame,
    encode_packet,
    encode_payload,
)

# Modest example counts keep the file at a few seconds; no example database,
# so a run leaves nothing behind.
PROPERTY = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
)

OPEN_JSON = '{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}'


def to_frames(packet: SocketPacket) -> list[str | bytes]:
    """The WebSocket frames that carry ``packet``."""
    return [encode_frame(EnginePacket(MESSAGE, part)) for part in encode_packet(packet)]


def from_frames(frames: list[str | bytes]) -> SocketPacket:
    """The one packet ``frames`` carry; every frame but the last leaves the decoder waiting."""
    decoder = PacketDecoder()
    result = None
    for n, frame in enumerate(frames):
        engine = decode_frame(frame)
        if engine.type != MESSAGE:
            raise AssertionError(f"frame {frame!r} is not a message")
        result = decoder.feed(engine.data)
        if n < len(frames) - 1 and result is not None:
            raise AssertionError(f"a packet came out before frame {n + 1} of {len(frames)}")
    if result is None or decoder.waiting:
        raise AssertionError("no packet came out")
    return result


def feed_all(messages: list[str | bytes], max_attachments: int = MAX_ATTACHMENTS) -> SocketPacket | None:
    decoder = PacketDecoder(max_attachments)
    result = None
    for message in messages:
        result = decoder.feed(message)
    return result


# -- Hypothesis strategies

def json_values(binary: bool) -> st.SearchStrategy[Any]:
    """JSON-able values; with ``binary``, bytes anywhere too."""
    leaves = (
        st.none() | st.booleans() | st.integers(-(2**64), 2**64)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    )
    if binary:
        leaves = leaves | st.binary(max_size=20)
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=12,
    )


# "\x1e" would split a polling payload: a namespace never holds it in practice.
namespaces = st.just("/") | st.text(max_size=10).filter(lambda s: "," not in s and "\x1e" not in s).map(lambda s: "/" + s)
ack_ids = st.none() | st.integers(0, 2**53 - 1)
event_names = st.text(max_size=12).filter(lambda s: s not in RESERVED_EVENTS) | st.integers(0, 2**53)
event_data = st.builds(lambda name, args: [name, *args], event_names, st.lists(json_values(binary=True), max_size=4))
objects = st.dictionaries(st.text(max_size=8), json_values(binary=False), max_size=4)
def binaries(value: Any) -> int:
    if isinstance(value, bytes):
        return 1
    if isinstance(value, list):
        return sum(map(binaries, value))
    if isinstance(value, dict):
        return sum(map(binaries, value.values()))
    return 0


socket_packets = st.one_of(
    st.builds(SocketPacket, st.just(CONNECT), namespaces, st.none() | objects, ack_ids),
    st.builds(SocketPacket, st.just(DISCONNECT), namespaces, st.none(), ack_ids),
    st.builds(SocketPacket, st.just(EVENT), namespaces, event_data, ack_ids),
    st.builds(SocketPacket, st.just(ACK), namespaces, st.lists(json_values(binary=True), max_size=5), ack_ids),
    st.builds(SocketPacket, st.just(CONNECT_ERROR), namespaces, st.text(max_size=20) | objects, ack_ids),
).filter(lambda packet: binaries(packet.data) <= MAX_ATTACHMENTS)
engine_packets = st.one_of(
    st.builds(EnginePacket, st.integers(OPEN, NOOP), st.text(max_size=30)),
    st.builds(EnginePacket, st.just(MESSAGE), st.binary(max_size=30)),
)
# Text made of the characters that matter to the Socket.IO header, to reach
# deeper into the decoder than random Unicode does.
header_text = st.text(alphabet='0123456789-/,[]{}":_placeholdernumtrue .eE+\\ux', max_size=60)


# -- Engine.IO

class EngineFrameTests(SynchronousTestCase):
    def test_text_frames(self) -> None:
        """Each packet type is its digit followed by the data, both ways."""
        cases = [
            ("0" + OPEN_JSON, EnginePacket(OPEN, OPEN_JSON)),
            ("1", EnginePacket(CLOSE)),
            ("2", EnginePacket(PING)),
            ("2probe", EnginePacket(PING, "probe")),
            ("3", EnginePacket(PONG)),
            ("3probe", EnginePacket(PONG, "probe")),
            ("4hello", EnginePacket(MESSAGE, "hello")),
            ("4", EnginePacket(MESSAGE, "")),
            ("5", EnginePacket(UPGRADE)),
            ("6", EnginePacket(NOOP)),
            ("4\u00e9\U0001f600", EnginePacket(MESSAGE, "\u00e9\U0001f600")),
        ]
        for frame, packet in cases:
            self.assertEqual(encode_frame(packet), frame)
            self.assertEqual(decode_frame(frame), packet)

    def test_binary_frame(self) -> None:
        """A binary MESSAGE is the raw bytes in a binary frame, without a type prefix."""
        self.assertEqual(encode_frame(EnginePacket(MESSAGE, b"\x01\x02\x03\x04")), b"\x01\x02\x03\x04")
        self.assertEqual(decode_frame(b"\x01\x02\x03\x04"), EnginePacket(MESSAGE, b"\x01\x02\x03\x04"))
        self.assertEqual(decode_frame(b""), EnginePacket(MESSAGE, b""))
        self.assertEqual(decode_frame(b"4hello"), EnginePacket(MESSAGE, b"4hello"))

    def test_binary_like_becomes_bytes(self) -> None:
        """bytearray and memoryview go out and come in as bytes (Autobahn sends only bytes)."""
        for value in (bytearray(b"ab"), memoryview(b"ab")):
            frame = encode_frame(EnginePacket(MESSAGE, value))
            self.assertIs(type(frame), bytes)
            self.assertEqual(frame, b"ab")
            self.assertIs(type(decode_frame(value).data), bytes)

    def test_base64_text_frame(self) -> None:
        """A text frame ``b<base64>`` (engine.io-client's forceBase64) is a
        binary MESSAGE, read with the same strict base64 as a polling payload."""
        self.assertEqual(decode_frame("bAQIDBA=="), EnginePacket(MESSAGE, b"\x01\x02\x03\x04"))
        self.assertEqual(decode_frame("b+/8="), EnginePacket(MESSAGE, b"\xfb\xff"))
        self.assertEqual(decode_frame("b"), EnginePacket(MESSAGE, b""))
        for frame in ["bAQIDBA", "bAQIDBA=", "b!!!!", "bAQID BA==", "b-_8=", "b\u00e9AAA", "b=AAA"]:
            with self.assertRaises(ProtocolError, msg=repr(frame)):
                decode_frame(frame)

    def test_bad_frames(self) -> None:
        """An empty text frame or one whose first character is not 0 to 6
        (or ``b``) is a protocol error."""
        for frame in ["", "7", "9x", "abc", "B", " 4", "\u0664hello", "-1"]:
            with self.assertRaises(ProtocolError, msg=repr(frame)):
                decode_frame(frame)

    def test_cannot_encode_nonsense(self) -> None:
        """Bytes outside a MESSAGE, or an unknown type, are the server's own bug: ValueError."""
        self.assertRaises(ValueError, encode_frame, EnginePacket(PING, b"x"))
        self.assertRaises(ValueError, encode_frame, EnginePacket(7, "x"))
        self.assertRaises(ValueError, encode_frame, EnginePacket(-1, "x"))
        self.assertRaises(ValueError, encode_frame, EnginePacket(True, "x"))  # type: ignore[arg-type]
        self.assertRaises(TypeError, encode_frame, EnginePacket(MESSAGE, None))  # type: ignore[arg-type]
        self.assertRaises(TypeError, decode_frame, None)

    @PROPERTY
    @given(engine_packets)
    def test_frame_round_trip(self, packet: EnginePacket) -> None:
        """Any packet comes back from its frame unchanged."""
        self.assertEqual(decode_frame(encode_frame(packet)), packet)

    @PROPERTY
    @given(st.text() | st.binary())
    def test_frame_fuzz(self, frame: str | bytes) -> None:
        """Random text or bytes never raise anything but ProtocolError."""
        try:
            decode_frame(frame)
        except ProtocolError:
            pass


class EnginePayloadTests(SynchronousTestCase):
    def test_text_payload(self) -> None:
        """Packets are joined by the record separator, both ways."""
        packets = [EnginePacket(MESSAGE, "hello"), EnginePacket(PING), EnginePacket(MESSAGE, "world")]
        self.assertEqual(encode_payload(packets), b"4hello\x1e2\x1e4world")
        self.assertEqual(decode_payload(b"4hello\x1e2\x1e4world"), packets)

    def test_binary_payload(self) -> None:
        """A binary MESSAGE is "b" and padded standard base64, both ways."""
        packets = [EnginePacket(MESSAGE, "hello"), EnginePacket(MESSAGE, b"\x01\x02\x03\x04")]
        self.assertEqual(encode_payload(packets), b"4hello\x1ebAQIDBA==")
        self.assertEqual(decode_payload(b"4hello\x1ebAQIDBA=="), packets)
        self.assertEqual(encode_payload([EnginePacket(MESSAGE, b"\xfb\xff")]), b"b+/8=")
        self.assertEqual(decode_payload(b"b"), [EnginePacket(MESSAGE, b"")])

    def test_utf8(self) -> None:
        """The body is UTF-8 both ways."""
        packets = [EnginePacket(MESSAGE, "\u00e9\U0001f600"), EnginePacket(OPEN, OPEN_JSON)]
        body = "4\u00e9\U0001f600\x1e0".encode() + OPEN_JSON.encode()
        self.assertEqual(encode_payload(packets), body)
        self.assertEqual(decode_payload(body), packets)

    def test_bad_payloads(self) -> None:
        """Not UTF-8, empty, an empty record, an unknown type or bad base64: ProtocolError."""
        bad = [
            b"", b"\x1e", b"4a\x1e", b"\x1e4a", b"4a\x1e\x1e2", b"7", b"abc", b"4a\x1ex",
            b"\xff", b"4\xc3", b"4\xed\xa0\x80",  # a UTF-8-encoded lone surrogate
            b"bAQIDBA", b"bAQIDBA=", b"bAQIDBA===", b"b!!!!", b"bAQID BA==", b"b-_8=", b"b\xc3\xa9AAA",
            b"b=AAA", b"4ok\x1ebAQ==AQ==",
        ]
        for body in bad:
            with self.assertRaises(ProtocolError, msg=repr(body)):
                decode_payload(body)

    def test_packet_limit(self) -> None:
        """More than max_packets records is refused before they are split."""
        self.assertEqual(len(decode_payload(b"\x1e".join([b"2"] * 1000))), 1000)
        self.assertRaises(ProtocolError, decode_payload, b"\x1e".join([b"2"] * 1001))
        self.assertEqual(len(decode_payload(b"2\x1e2", max_packets=2)), 2)
        self.assertRaises(ProtocolError, decode_payload, b"2\x1e2\x1e2", max_packets=2)

    def test_cannot_encode_nonsense(self) -> None:
        """An empty payload (clients read it as a parse error) or bytes outside a MESSAGE: ValueError."""
        self.assertRaises(ValueError, encode_payload, [])
        self.assertRaises(ValueError, encode_payload, [EnginePacket(PONG, b"x")])
        self.assertRaises(ValueError, encode_payload, [EnginePacket(8)])

    def test_generator(self) -> None:
        """Any iterable of packets will do."""
        self.assertEqual(encode_payload(EnginePacket(NOOP) for _ in range(2)), b"6\x1e6")

    @PROPERTY
    @given(st.lists(engine_packets.filter(lambda p: "\x1e" not in p.data if isinstance(p.data, str) else True),
                    min_size=1, max_size=10))
    def test_payload_round_trip(self, packets: list[EnginePacket]) -> None:
        """Mixed text and binary packets come back from their payload unchanged."""
        self.assertEqual(decode_payload(encode_payload(packets)), packets)

    @PROPERTY
    @given(st.binary() | st.text().map(str.encode) | st.lists(st.text(max_size=8)).map(lambda r: "\x1e".join(r).encode()))
    def test_payload_fuzz(self, body: bytes) -> None:
        """Random bodies never raise anything but ProtocolError."""
        try:
            decode_payload(body, max_packets=5)
        except ProtocolError:
            pass


# -- Socket.IO: the wire examples of socketio-protocol.md §3.2, as whole frames

PLACEHOLDER_0 = {"_placeholder": True, "num": 0}
PLACEHOLDER_1 = {"_placeholder": True, "num": 1}
WIRE_EXAMPLES: list[tuple[list[str | bytes], SocketPacket]] = [
    (["40"], SocketPacket(CONNECT)),
    (['40{"token":"x"}'], SocketPacket(CONNECT, "/", {"token": "x"})),
    (['40{"sid":"wZX3oN0bSVIhsaknAAAI"}'], SocketPacket(CONNECT, "/", {"sid": "wZX3oN0bSVIhsaknAAAI"})),
    (['40/admin,{"token":"123"}'], SocketPacket(CONNECT, "/admin", {"token": "123"})),
    (['40/admin,{"sid":"oSO0OpakMV_3jnilAAAA"}'], SocketPacket(CONNECT, "/admin", {"sid": "oSO0OpakMV_3jnilAAAA"})),
    (['44{"message":"Not authorized"}'], SocketPacket(CONNECT_ERROR, "/", {"message": "Not authorized"})),
    (['44/random,{"message":"Invalid namespace"}'],
     SocketPacket(CONNECT_ERROR, "/random", {"message": "Invalid namespace"})),
    (['44{"message":"unauthorized","data":{"code":"TOKEN_EXPIRED"}}'],
     SocketPacket(CONNECT_ERROR, "/", {"message": "unauthorized", "data": {"code": "TOKEN_EXPIRED"}})),
    (['42["send_message",{"chatId":"c1","blob":"..."}]'],
     SocketPacket(EVENT, "/", ["send_message", {"chatId": "c1", "blob": "..."}])),
    (['4231["send_message",{"chatId":"c1"}]'], SocketPacket(EVENT, "/", ["send_message", {"chatId": "c1"}], 31)),
    (['4331[{"ok":true,"id":"m123"}]'], SocketPacket(ACK, "/", [{"ok": True, "id": "m123"}], 31)),
    (['42/admin,13["ping"]'], SocketPacket(EVENT, "/admin", ["ping"], 13)),
    (["43/admin,13[]"], SocketPacket(ACK, "/admin", [], 13)),
    (['451-["upload",{"_placeholder":true,"num":0}]', b"\x00\xff"], SocketPacket(EVENT, "/", ["upload", b"\x00\xff"])),
    (['462-789[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]', b"one", b"two"],
     SocketPacket(ACK, "/", [b"one", b"two"], 789)),
    (["41"], SocketPacket(DISCONNECT)),
    (["41/admin,"], SocketPacket(DISCONNECT, "/admin")),
    (["40/custom,"], SocketPacket(CONNECT, "/custom")),
]


class SocketWireTests(SynchronousTestCase):
    def test_encode_examples(self) -> None:
        """Each example packet is encoded to exactly the frames of the protocol notes."""
        for frames, packet in WIRE_EXAMPLES:
            self.assertEqual(to_frames(packet), frames)

    def test_decode_examples(self) -> None:
        """Each example's frames decode to the packet; a binary one comes back as EVENT or ACK."""
        for frames, packet in WIRE_EXAMPLES:
            self.assertEqual(from_frames(frames), packet, repr(frames))

    def test_namespace_to_the_end(self) -> None:
        """A namespace without a comma runs to the end of the packet (the suite sends 40/custom)."""
        self.assertEqual(from_frames(["40/custom"]), SocketPacket(CONNECT, "/custom"))
        self.assertEqual(from_frames(["41/custom"]), SocketPacket(DISCONNECT, "/custom"))

    def test_binary_types_on_the_wire(self) -> None:
        """An EVENT or ACK carrying bytes goes out as BINARY_EVENT or BINARY_ACK, with the count."""
        header, *attachments = encode_packet(SocketPacket(EVENT, "/", ["upload", b"x"]))
        self.assertEqual(header[0], str(BINARY_EVENT))
        self.assertEqual(attachments, [b"x"])
        header, *attachments = encode_packet(SocketPacket(ACK, "/", [b"x"], 1))
        self.assertEqual(header, '61-1[{"_placeholder":true,"num":0}]')

    def test_binary_type_without_bytes(self) -> None:
        """A BINARY_* packet without bytes goes out as EVENT or ACK: the reference refuses 0 attachments."""
        self.assertEqual(encode_packet(SocketPacket(BINARY_EVENT, "/", ["x"])), ['2["x"]'])
        self.assertEqual(encode_packet(SocketPacket(BINARY_ACK, "/", [], 4)), ["34[]"])

    def test_binary_anywhere(self) -> None:
        """Bytes deep in lists and objects become numbered placeholders in document order."""
        packet = SocketPacket(EVENT, "/chat", ["files", {"a": [b"0", {"b": bytearray(b"1")}]}, memoryview(b"2")], 7)
        frames = encode_packet(packet)
        self.assertEqual(frames, [
            ('53-/chat,7["files",{"a":[{"_placeholder":true,"num":0},{"b":{"_placeholder":true,"num":1}}]},'
             '{"_placeholder":true,"num":2}]'),
            b"0", b"1", b"2",
        ])
        self.assertEqual([type(f) for f in frames[1:]], [bytes] * 3)
        self.assertEqual(feed_all(frames), SocketPacket(EVENT, "/chat", ["files", {"a": [b"0", {"b": b"1"}]}, b"2"], 7))

    def test_the_same_bytes_twice(self) -> None:
        """The same bytes object twice is sent twice, as the reference does."""
        blob = b"blob"
        self.assertEqual(encode_packet(SocketPacket(EVENT, "/", ["x", blob, blob]))[1:], [blob, blob])

    def test_text_json(self) -> None:
        """The JSON is compact and keeps non-ASCII characters as they are."""
        self.assertEqual(encode_packet(SocketPacket(EVENT, "/", ["caf\u00e9", {"n": 1.5, "z": None}])),
                         ['2["caf\u00e9",{"n":1.5,"z":null}]'])

    def test_lone_surrogate(self) -> None:
        """A lone surrogate a peer sent in JSON goes back out escaped, so the frame is valid UTF-8."""
        packet = feed_all(['2["echo","\\ud800 caf\u00e9",{"b":"\\udfff"}]'])
        self.assertEqual(packet, SocketPacket(EVENT, "/", ["echo", "\ud800 caf\u00e9", {"b": "\udfff"}]))
        assert packet is not None
        frames = encode_packet(packet)
        self.assertEqual(frames, ['2["echo","\\ud800 caf\\u00e9",{"b":"\\udfff"}]'])
        self.assertEqual(feed_all(frames), packet)
        # and with attachments
        frames = encode_packet(SocketPacket(ACK, "/", ["\ud800", b"z"], 3))
        self.assertEqual(frames, ['61-3["\\ud800",{"_placeholder":true,"num":0}]', b"z"])
        self.assertEqual(encode_payload([EnginePacket(MESSAGE, frames[0])]), b'461-3["\\ud800",{"_placeholder":true,"num":0}]')

    def test_cannot_encode_nonsense(self) -> None:
        """What a client would refuse, or what cannot be written, fails at once."""
        bad = [
            SocketPacket(EVENT),  # no name
            SocketPacket(EVENT, "/", []),
            SocketPacket(EVENT, "/", ["connect"]),
            SocketPacket(EVENT, "/", [True]),
            SocketPacket(EVENT, "/", ["x", float("nan")]),
            SocketPacket(EVENT, "/", ["x", float("inf")]),
            SocketPacket(ACK, "/", {"a": 1}),
            SocketPacket(CONNECT, "/", []),
            SocketPacket(DISCONNECT, "/", {}),
            SocketPacket(CONNECT_ERROR),
            SocketPacket(7, "/", ["x"]),
            SocketPacket(EVENT, "admin", ["x"]),
            SocketPacket(EVENT, "", ["x"]),
            SocketPacket(EVENT, "/a,b", ["x"]),
            SocketPacket(EVENT, "/", ["x"], -1),
            SocketPacket(EVENT, "/", ["x"], 2**53),
            SocketPacket(EVENT, "/", ["x"], True),
            SocketPacket(EVENT, "/", ["x", *[b"b"] * (MAX_ATTACHMENTS + 1)]),
        ]
        for packet in bad:
            self.assertRaises(ValueError, encode_packet, packet)
        self.assertRaises(TypeError, encode_packet, SocketPacket(CONNECT, "/", {"b": b"x"}))
        self.assertRaises(TypeError, encode_packet, SocketPacket(EVENT, "/", ["x", {1, 2}]))
        self.assertRaises(TypeError, encode_packet, SocketPacket(EVENT, "/", ["x", b"y", object()]))


class SocketDecodeTests(SynchronousTestCase):
    def test_ack_id_on_any_type(self) -> None:
        """As in the reference, an ack id is read on every packet type and left to the layer above."""
        self.assertEqual(feed_all(["012"]), SocketPacket(CONNECT, "/", None, 12))
        self.assertEqual(feed_all(["1/admin,7"]), SocketPacket(DISCONNECT, "/admin", None, 7))
        self.assertEqual(feed_all(['45{"message":"x"}']), SocketPacket(CONNECT_ERROR, "/", {"message": "x"}, 5))

    def test_ack_id_limits(self) -> None:
        """The largest exact JavaScript integer is an ack id; 2**53 is not."""
        self.assertEqual(feed_all(['29007199254740991["x"]']), SocketPacket(EVENT, "/", ["x"], 2**53 - 1))
        self.assertEqual(feed_all(['20["x"]']), SocketPacket(EVENT, "/", ["x"], 0))
        self.assertRaises(ProtocolError, feed_all, ['29007199254740992["x"]'])
        self.assertRaises(ProtocolError, feed_all, ["2" + "1" * 17 + '["x"]'])
        self.assertRaises(ProtocolError, feed_all, ["2" + "1" * 100_000 + '["x"]'])

    def test_event_names(self) -> None:
        """An event name is a string that is not reserved, or a number (JavaScript's, so floats too)."""
        self.assertEqual(feed_all(['2["message"]']), SocketPacket(EVENT, "/", ["message"]))
        self.assertEqual(feed_all(['2["",1]']), SocketPacket(EVENT, "/", ["", 1]))
        self.assertEqual(feed_all(["2[7]"]), SocketPacket(EVENT, "/", [7]))
        self.assertEqual(feed_all(["2[1.5,{}]"]), SocketPacket(EVENT, "/", [1.5, {}]))
        self.assertEqual(feed_all(['2["Connect"]']), SocketPacket(EVENT, "/", ["Connect"]))
        for name in RESERVED_EVENTS:
            self.assertRaises(ProtocolError, feed_all, [f'2["{name}",1]'])
            self.assertRaises(ProtocolError, feed_all, [f'51-["{name}",{{"_placeholder":true,"num":0}}]'])

    def test_connect_error_string(self) -> None:
        """A legacy CONNECT_ERROR with a bare string still decodes, as in the reference."""
        self.assertEqual(feed_all(['4"nope"']), SocketPacket(CONNECT_ERROR, "/", "nope"))

    def test_json_whitespace(self) -> None:
        """Whitespace inside and after the JSON is JSON's business; before it, it is refused."""
        self.assertEqual(feed_all(['2[ "x" , 1 ]\r\n\t ']), SocketPacket(EVENT, "/", ["x", 1]))
        # The reference reads " " as an ack id of 0 here (Number(" ") is 0).
        self.assertRaises(ProtocolError, feed_all, ['2 ["x"]'])
        self.assertRaises(ProtocolError, feed_all, ['2["x"]\u00a0'])

    def test_placeholder_in_a_text_packet(self) -> None:
        """A placeholder in a packet that has no attachments is left as plain data."""
        self.assertEqual(feed_all(['2["x",{"_placeholder":true,"num":0}]']),
                         SocketPacket(EVENT, "/", ["x", PLACEHOLDER_0]))

    def test_attachment_bookkeeping(self) -> None:
        """Attachments fill placeholders by num, in any order, used once, twice or never."""
        decoder = PacketDecoder()
        self.assertFalse(decoder.waiting)
        self.assertIsNone(decoder.feed('53-/up,9["x",{"_placeholder":true,"num":2},[{"_placeholder":true,"num":0}],'
                                       '{"_placeholder":true,"num":2,"extra":1}]'))
        self.assertTrue(decoder.waiting)
        self.assertIsNone(decoder.feed(b"zero"))
        self.assertIsNone(decoder.feed(bytearray(b"one")))
        packet = decoder.feed(memoryview(b"two"))
        self.assertEqual(packet, SocketPacket(EVENT, "/up", ["x", b"two", [b"zero"], b"two"], 9))
        self.assertFalse(decoder.waiting)
        # the decoder goes on with the next packet
        self.assertEqual(decoder.feed("3/up,9[]"), SocketPacket(ACK, "/up", [], 9))

    def test_placeholder_fields(self) -> None:
        """Only _placeholder exactly true marks a placeholder; its other keys do not matter."""
        packet = feed_all(['51-["x",{"_placeholder":1,"num":0},{"_placeholder":"true"},{"num":0}]', b"a"])
        self.assertEqual(packet, SocketPacket(EVENT, "/", ["x", {"_placeholder": 1, "num": 0},
                                                           {"_placeholder": "true"}, {"num": 0}]))

    def test_max_attachments(self) -> None:
        """At most max_attachments attachments; ten by default."""
        def header(count: int) -> str:
            return f'5{count}-["x",{{"_placeholder":true,"num":0}}]'

        self.assertIsNone(feed_all([header(10)]))
        self.assertRaises(ProtocolError, feed_all, [header(11)])
        self.assertIsNone(feed_all([header(2)], max_attachments=2))
        self.assertRaises(ProtocolError, feed_all, [header(3)], max_attachments=2)
        self.assertEqual(feed_all(["61-[1]", b"a"], max_attachments=1), SocketPacket(ACK, "/", [1]))

    def test_deep_but_legal(self) -> None:
        """Nesting the JSON decoder accepts does not overflow the placeholder search."""
        depth = 400
        header = "51-[\"x\"," + "[" * depth + '{"_placeholder":true,"num":0}' + "]" * depth + "]"
        packet = feed_all([header, b"deep"])
        assert packet is not None
        value = packet.data[1]
        for _ in range(depth - 1):
            value = value[0]
        self.assertEqual(value, [b"deep"])

    def test_not_str_or_bytes(self) -> None:
        """Feeding something that is neither text nor bytes is the transport's bug: TypeError."""
        decoder = PacketDecoder()
        decoder.feed('51-["x",{"_placeholder":true,"num":0}]')
        self.assertRaises(TypeError, decoder.feed, 5)


class SocketInvalidTests(SynchronousTestCase):
    """Each of these breaks the protocol: ProtocolError, so the session is closed."""

    def assertRefused(self, *messages: str | bytes, max_attachments: int = MAX_ATTACHMENTS) -> ProtocolError:
        with self.assertRaises(ProtocolError, msg=repr(messages)) as caught:
            feed_all(list(messages), max_attachments)
        self.assertTrue(str(caught.exception), "a ProtocolError needs a message")
        return caught.exception

    def test_header(self) -> None:
        """An empty packet, an unknown type or garbage where the ack id goes."""
        for text in ["", "7", "9[]", "abc", " 2[\"x\"]", "\u0662[\"x\"]", '2abc["x"]', '2-1["x"]', '2\u0661["x"]',
                     '2/admin["x"]', "2x", "0x1{}"]:
            self.assertRefused(text)

    def test_payload_rules(self) -> None:
        """Payloads that break the reference's isPayloadValid."""
        for text in [
            "2", "2{}", "2[]", '2"x"', "2[null]", "2[true]", '2[["x"]]', '2[{"a":1}]', '2["connect"]',
            "3", "3{}", '3"x"', "3/admin,1",
            "0[]", '0"x"', "0[{}]",
            '1"x"', "1{}", "1[]",
            "4", "4[]", "4/admin,",
            "5", "6",
        ]:
            self.assertRefused(text)

    def test_json(self) -> None:
        """Not JSON, or JSON with more after it, or numbers JavaScript would not keep."""
        for text in [
            '2["x"', '2["x"]]', '2["x"]["y"]', "2['x']", '2["x",]', '2["x",NaN]', '2["x",Infinity]',
            '2["x",-Infinity]', '2["x",1e400]', '2["x",-1e999]', '2["x",01]', '2["\\x"]', '2["x",undefined]',
            '2["x"' + ",9" * 3 + "]garbage", "2[" + "9" * 5000 + "]", '2["x"]\x00',
        ]:
            self.assertRefused(text)

    def test_deep_nesting(self) -> None:
        """Nesting deeper than the JSON decoder's recursion limit is a ProtocolError, not RecursionError."""
        self.assertRefused("2" + "[" * 100_000)
        self.assertRefused("2" + "[" * 100_000 + "]" * 100_000)
        self.assertRefused('2["x",' + '{"a":' * 100_000 + "1" + "}" * 100_000 + "]")

    def test_attachment_count(self) -> None:
        """A binary packet needs a count of plain digits, at least 1, at most max_attachments."""
        for text in ['5["x"]', '5-["x"]', '50-["x"]', '500-["x"]', '5a-["x"]', '5 1-["x"]', '50x1-["x"]',
                     '51e1-["x"]', '5\u0661-["x"]', '511-["x"]', '599999999999-["x"]', "5" + "1" * 100_000 + "-",
                     '6-1[]', "51-", "61-"]:
            self.assertRefused(text)

    def test_too_many_attachments(self) -> None:
        """Over the limit is refused before any attachment is awaited."""
        self.assertIn("attachments", str(self.assertRefused('511-["x"]')))
        self.assertRefused('53-["x"]', max_attachments=2)

    def test_bad_placeholders(self) -> None:
        """A placeholder whose num is out of range or not an integer."""
        for placeholder in ['{"_placeholder":true,"num":1}', '{"_placeholder":true,"num":-1}',
                            '{"_placeholder":true,"num":"0"}', '{"_placeholder":true,"num":0.0}',
                            '{"_placeholder":true,"num":true}', '{"_placeholder":true}',
                            '{"_placeholder":true,"num":null}', '{"_placeholder":true,"num":[0]}']:
            self.assertRefused(f'51-["x",{placeholder}]', b"a")
        # the event name cannot be an attachment
        self.assertRefused('51-[{"_placeholder":true,"num":0}]', b"a")

    def test_unexpected_binary(self) -> None:
        """Bytes with no binary packet waiting for them."""
        self.assertRefused(b"\x01")
        self.assertRefused('2["x"]', b"\x01")
        self.assertRefused('51-["x",{"_placeholder":true,"num":0}]', b"a", b"b")

    def test_text_while_waiting(self) -> None:
        """Text while a binary packet still waits for its attachments."""
        self.assertRefused('52-["x",{"_placeholder":true,"num":0}]', b"a", '2["y"]')

    def test_decoder_after_an_error(self) -> None:
        """A decoder that refused text while waiting no longer waits (it may also just be dropped)."""
        decoder = PacketDecoder()
        decoder.feed('51-["x",{"_placeholder":true,"num":0}]')
        self.assertRaises(ProtocolError, decoder.feed, '2["y"]')
        self.assertFalse(decoder.waiting)
        self.assertEqual(decoder.feed('2["y"]'), SocketPacket(EVENT, "/", ["y"]))


class PropertyTests(SynchronousTestCase):
    @PROPERTY
    @given(socket_packets)
    def test_socket_round_trip_frames(self, packet: SocketPacket) -> None:
        """Any valid packet, with bytes anywhere in its data, comes back from its WebSocket frames."""
        self.assertEqual(from_frames(to_frames(packet)), packet)

    @PROPERTY
    @given(st.lists(socket_packets, min_size=1, max_size=4))
    def test_socket_round_trip_polling(self, packets: list[SocketPacket]) -> None:
        """Several packets in one polling payload come back in order."""
        parts = [part for packet in packets for part in encode_packet(packet)]
        body = encode_payload(EnginePacket(MESSAGE, part) for part in parts)
        decoder = PacketDecoder()
        out = []
        for engine in decode_payload(body):
            self.assertEqual(engine.type, MESSAGE)
            result = decoder.feed(engine.data)
            if result is not None:
                out.append(result)
        self.assertEqual(out, packets)
        self.assertFalse(decoder.waiting)

    @PROPERTY
    @given(st.lists(st.text() | st.binary() | header_text | st.sampled_from("0123456").flatmap(
        lambda digit: header_text.map(lambda rest: digit + rest)), max_size=6))
    def test_socket_fuzz(self, messages: list[str | bytes]) -> None:
        """Random text and bytes never raise anything but ProtocolError."""
        decoder = PacketDecoder()
        for message in messages:
            try:
                decoder.feed(message)
            except ProtocolError:
                decoder = PacketDecoder()

    @PROPERTY
    @given(socket_packets, st.data())
    def test_socket_mutation_fuzz(self, packet: SocketPacket, data: st.DataObject) -> None:
        """A valid header with a slice cut out or text spliced in never raises anything but ProtocolError."""
        header, *attachments = encode_packet(packet)
        start = data.draw(st.integers(0, len(header)))
        stop = data.draw(st.integers(start, len(header)))
        mutated = header[:start] + data.draw(header_text | st.text(max_size=3)) + header[stop:]
        decoder = PacketDecoder()
        try:
            for message in [mutated, *attachments]:
                decoder.feed(message)
        except ProtocolError:
            pass


class StockImplementationTests(SynchronousTestCase):
    """
    python-socketio and python-engineio (in the test extras) as independent
    implementations, where they behave like the reference. They differ in
    places, so the data here is kept to what they handle the reference way:
    ASCII only (they escape non-ASCII, as json.dumps does by default), no
    NaN (they write it), no "?" in namespaces (their decoder cuts a query
    string off), bytes only in EVENT and ACK.
    """

    # (DEL is escaped by json.dumps's ASCII mode too, so it stops at "~".)
    ascii_text = st.text(st.characters(max_codepoint=126), max_size=12)

    @staticmethod
    def ascii_values(binary: bool) -> st.SearchStrategy[Any]:
        leaves = (
            st.none() | st.booleans() | st.integers(-(2**64), 2**64)
            | st.floats(allow_nan=False, allow_infinity=False) | StockImplementationTests.ascii_text
        )
        if binary:
            leaves = leaves | st.binary(max_size=8)
        return st.recursive(
            leaves,
            lambda children: st.lists(children, max_size=3)
            | st.dictionaries(StockImplementationTests.ascii_text, children, max_size=3),
            max_leaves=8,
        )

    def test_wire_examples(self) -> None:
        """python-socketio writes every wire example's frames as we do."""
        for frames, packet in WIRE_EXAMPLES:
            if packet.namespace == "/custom":
                continue  # the notes' "40/custom" is the comma-less form we only decode
            stock = socketio.packet.Packet(packet.type, data=packet.data, namespace=packet.namespace, id=packet.id)
            encoded = stock.encode()
            self.assertEqual(["4" + encoded] if isinstance(encoded, str)
                             else ["4" + encoded[0], *encoded[1:]], frames)

    @settings(PROPERTY, max_examples=100)
    @given(st.data())
    def test_same_encoding(self, data: st.DataObject) -> None:
        """python-socketio encodes random packets exactly as we do, and decodes ours to the same packet."""
        kind = data.draw(st.sampled_from([CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR]))
        namespace = data.draw(st.just("/") | self.ascii_text.filter(lambda s: not set(s) & set(",?\x1e")).map(
            lambda s: "/" + s))
        ack_id = data.draw(ack_ids)
        objects = st.dictionaries(self.ascii_text, self.ascii_values(False), max_size=3)
        if kind == CONNECT:
            payload = data.draw(st.none() | objects)
        elif kind == DISCONNECT:
            payload = None
        elif kind == EVENT:
            name = data.draw(self.ascii_text.filter(lambda s: s not in RESERVED_EVENTS))
            payload = [name, *data.draw(st.lists(self.ascii_values(True), max_size=3))]
        elif kind == ACK:
            payload = data.draw(st.lists(self.ascii_values(True), max_size=3))
        else:
            payload = data.draw(self.ascii_text | objects)
        if binaries(payload) > MAX_ATTACHMENTS:
            return  # we refuse to encode it; see SocketWireTests.test_cannot_encode_nonsense
        ours = encode_packet(SocketPacket(kind, namespace, payload, ack_id))

        stock = socketio.packet.Packet(kind, data=payload, namespace=namespace, id=ack_id).encode()
        self.assertEqual(ours, [stock] if isinstance(stock, str) else stock)

        decoded = socketio.packet.Packet(encoded_packet=ours[0])
        for attachment in ours[1:]:
            decoded.add_attachment(attachment)
        self.assertEqual(decoded.packet_type, {EVENT: BINARY_EVENT, ACK: BINARY_ACK}.get(kind, kind)
                         if len(ours) > 1 else kind)
        self.assertEqual(decoded.namespace or "/", namespace)
        self.assertEqual((decoded.data, decoded.id), (payload, ack_id))

    @PROPERTY
    @given(st.lists(engine_packets.filter(lambda p: "\x1e" not in p.data if isinstance(p.data, str) else True),
                    min_size=1, max_size=6))
    def test_same_engine_encoding(self, packets: list[EnginePacket]) -> None:
        """
        python-engineio writes frames and polling payloads as we do. (Its
        decoder is not compared: it parses the data of text packets as JSON.)
        """
        stock = [engineio.packet.Packet(p.type, p.data) for p in packets]
        self.assertEqual([encode_frame(p) for p in packets], [s.encode() for s in stock])
        for s in stock:
            s.encode_cache = None  # it caches the first encoding, without base64
        self.assertEqual(encode_payload(packets).decode(), engineio.payload.Payload(stock).encode())

    def test_stock_base64(self) -> None:
        """The base64 in a polling payload is the standard alphabet, padded."""
        data = bytes(range(256))
        body = encode_payload([EnginePacket(MESSAGE, data)])
        self.assertEqual(body, b"b" + base64.b64encode(data))
