"""
cyphr.realtime.frames against RFC 6455 and against Autobahn, whose framing
it does for the common case: what it takes must read as Autobahn reads it,
what it writes must be the bytes Autobahn writes, and everything else must
be left to Autobahn untouched. (tests.test_realtime_transport checks the
same over a real connection, with frames in one read, across reads, and
between control frames and fragments.)
"""

from __future__ import annotations

import os

from autobahn.websocket.xormasker import create_xor_masker
from twisted.trial.unittest import SynchronousTestCase

from cyphr.realtime import frames
from tests.test_compat import open_websocket
from tests.test_realtime_transport import client_frame

SIZES = (0, 1, 5, 125, 126, 127, 300, 2047, 2048, 2049, 4096, 65535)


def _autobahn_server_frame(test: SynchronousTestCase, payload: bytes, binary: bool) -> bytes:
    """What an open Autobahn server WebSocket writes for one message."""
    protocol, transport = open_websocket(test)
    transport.clear()
    protocol.sendMessage(payload, isBinary=binary)
    return transport.value()


class UnmaskTests(SynchronousTestCase):
    def test_same_as_autobahn_at_every_size(self) -> None:
        """Unmasking gives the bytes Autobahn's masker gives, on either side
        of the size where the method changes."""
        for size in SIZES + (70000,):
            payload, mask = os.urandom(size), os.urandom(4)
            expected = create_xor_masker(mask, size).process(payload) if size else b""
            self.assertEqual(frames.unmask(payload, mask), expected, size)

    def test_leading_zero_bytes_kept(self) -> None:
        """Bytes that unmask to zero at the start or end stay (the integer
        XOR must not drop them)."""
        mask = b"\x01\x02\x03\x04"
        self.assertEqual(frames.unmask(b"\x01\x02\x03\x04\x01", mask), b"\x00\x00\x00\x00\x00")
        self.assertEqual(frames.unmask(b"\x01\x02\x03\x05", mask), b"\x00\x00\x00\x01")


class NextMessageTests(SynchronousTestCase):
    def test_whole_frames_read(self) -> None:
        """A masked text or binary frame with FIN set is read whole, at
        every length up to 65535, and the position after it is answered."""
        for size in SIZES:
            for opcode, binary in ((1, False), (2, True)):
                payload = os.urandom(size)
                data = b"xy" + client_frame(payload, opcode=opcode) + b"rest"
                taken = frames.next_message(data, 2, 1 << 20)
                assert taken is not None, (size, opcode)
                self.assertEqual(taken, (payload, binary, len(data) - 4))

    def test_frames_one_after_another(self) -> None:
        """Several frames in one buffer are read one after the other."""
        data = b"".join(client_frame(str(n).encode()) for n in range(5))
        start, read = 0, []
        while (taken := frames.next_message(data, start, 100)) is not None:
            payload, _, start = taken
            read.append(payload)
        self.assertEqual((read, start), ([b"0", b"1", b"2", b"3", b"4"], len(data)))

    def test_left_to_autobahn(self) -> None:
        """Whatever is not one whole, masked, single-frame text or binary
        message within the limit is left alone (None): Autobahn reads or
        refuses it."""
        message = client_frame(b"x" * 200)
        left = {
            "not whole": message[:-1],
            "header not whole": message[:7],
            "under six bytes": client_frame(b"")[:5],
            "ping": client_frame(b"hi", opcode=9),
            "pong": client_frame(b"hi", opcode=10),
            "close": client_frame(b"\x03\xe8", opcode=8),
            "first fragment": client_frame(b"hi", fin=False),
            "continuation": client_frame(b"hi", opcode=0),
            "reserved opcode": client_frame(b"hi", opcode=3),
            "reserved bits": client_frame(b"hi", rsv=4),
            "unmasked": client_frame(b"hi", masked=False),
            "16-bit length that fits in 7": client_frame(b"hi", wide=True),
            "64-bit length": client_frame(b"x" * 65536),
            "over the limit": client_frame(b"x" * 101),
        }
        for what, data in left.items():
            self.assertIsNone(frames.next_message(data, 0, 100), what)
        self.assertIsNotNone(frames.next_message(client_frame(b"x" * 100), 0, 100))


class FrameTests(SynchronousTestCase):
    def test_same_bytes_as_autobahn(self) -> None:
        """A message is framed as Autobahn's server frames it, with each
        length encoding (7, 16 and 64 bits)."""
        for size in SIZES + (65536, 70000):
            for binary in (False, True):
                payload = os.urandom(size)
                self.assertEqual(frames.frame(payload, binary),
                                 _autobahn_server_frame(self, payload, binary), (size, binary))
