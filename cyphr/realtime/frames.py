"""
The common case of RFC 6455 framing, done directly: a whole message in one
masked text or binary frame from a client, and an unfragmented, unmasked
frame to it. Autobahn does the rest (the handshake, control frames,
fragmented messages, frames split across reads, the closing handshake and
every protocol violation); ``EngineWebSocket`` hands it the bytes from the
first frame these functions do not take.

Why: ``python benchmarks/websocket_frames.py`` (framing alone, a
260-byte message): Autobahn reads one in 9.8 µs of CPU (a frame header
object, a masker built through cffi, a txaio future and observers fired for
every message) and writes one in 5.2 µs; these take 1.6 µs and 0.3 µs. A
delivered message is one frame in and two out (the sender's ack, the
recipient's copy): about 18 µs less a message.
"""

from __future__ import annotations

from autobahn.websocket.xormasker import create_xor_masker

TEXT = 0x81  # FIN and opcode 1: a whole text message
BINARY = 0x82  # FIN and opcode 2: a whole binary message
_MASKED = 0x80

# Unmasking through one big-integer XOR costs less than Autobahn's cffi
# masker up to about 2 KiB (1.0 µs against 3.0 µs at 300 bytes) and more
# above (8.5 µs against 3.0 µs at 4 KiB).
_INT_UNMASK_LIMIT = 2048


def unmask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the four-byte ``mask`` repeated (RFC 6455 5.3)."""
    size = len(payload)
    if size > _INT_UNMASK_LIMIT:
        return create_xor_masker(mask, size).process(payload)
    key = (mask * ((size >> 2) + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def next_message(data: bytes, start: int, limit: int) -> tuple[bytes, bool, int] | None:
    """The message that begins at ``start`` in ``data`` (payload, whether
    binary, where the next frame begins) if it is whole in ``data``, in one
    masked text or binary frame with no reserved bits set, with a payload of
    at most ``limit`` bytes and a length in the shortest encoding; None for
    anything else, which is left to Autobahn from ``start`` on (it refuses
    what breaks the protocol, and buffers what is not whole yet)."""
    available = len(data) - start
    if available < 6:
        return None
    first = data[start]
    if first != TEXT and first != BINARY:
        return None  # a control frame, a fragment, reserved bits or opcodes
    second = data[start + 1]
    if not second & _MASKED:
        return None  # a client's frame must be masked: Autobahn refuses it
    size = second & 0x7F
    if size < 126:
        header = 6
    elif size == 126:
        if available < 8:
            return None
        size = (data[start + 2] << 8) | data[start + 3]
        if size < 126:
            return None  # not the shortest encoding: Autobahn refuses it
        header = 8
    else:
        return None  # 64-bit lengths (64 KiB and more): rare, Autobahn's
    end = start + header + size
    if size > limit or end > start + available:
        return None
    mask = data[start + header - 4:start + header]
    return unmask(data[start + header:end], mask), first == BINARY, end


def frame(payload: bytes, binary: bool) -> bytes:
    """A whole, unmasked message in one frame (a server's frames are not
    masked)."""
    size = len(payload)
    first = BINARY if binary else TEXT
    if size < 126:
        return bytes((first, size)) + payload
    if size < 0x10000:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload
