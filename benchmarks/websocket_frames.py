"""
CPU time a WebSocket message costs the server, framing only: Autobahn's
general path against cyphr.realtime.frames (the common case done
directly), for reading one client message and for writing one message.

    python benchmarks/websocket_frames.py [--count 100000] [--size 260]

Each side runs on an open server protocol over an in-memory transport
(no socket, no reactor), with an onMessage that only counts, so the
figures are the framing's alone; a ``send_message`` event of the
benchmarks is about 260 bytes. Prints microseconds a message (process
time, so other load on the machine matters less).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.testing import StringTransport

from cyphr._compat import websocket_between_messages, websocket_data_received
from cyphr.realtime import frames


class _Counting(WebSocketServerProtocol):
    received = 0
    dataReceived = websocket_data_received  # as the server's, without Autobahn's debug line

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received += 1


def _open() -> _Counting:
    factory = WebSocketServerFactory()
    factory.protocol = _Counting
    factory.setProtocolOptions(webStatus=False, autoPingInterval=0, openHandshakeTimeout=0,
                               closeHandshakeTimeout=0, utf8validateIncoming=False,
                               failByDrop=False)
    protocol: _Counting = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    key = base64.b64encode(os.urandom(16))
    protocol.dataReceived(
        b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: localhost\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key
        + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert protocol.state == protocol.STATE_OPEN
    protocol.transport.write = lambda data: None  # type: ignore[method-assign]
    return protocol


def _client_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    header = bytes((0x81, 0x80 | size)) if size < 126 else bytes((0x81, 0xFE)) + size.to_bytes(2, "big")
    return header + mask + frames.unmask(payload, mask)


def _per_message(count: int, run: object) -> float:
    started = time.process_time()
    run()  # type: ignore[operator]
    return (time.process_time() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=260, help="payload bytes of each message")
    args = parser.parse_args()
    payload = b"4" * args.size
    frame = _client_frame(payload)

    protocol = _open()

    def autobahn_reads() -> None:
        for _ in range(args.count):
            protocol.dataReceived(frame)

    def directly_reads() -> None:
        for _ in range(args.count):
            if websocket_between_messages(protocol):
                taken = frames.next_message(frame, 0, 1 << 20)
                if taken is not None:
                    protocol.onMessage(taken[0], taken[1])

    def autobahn_writes() -> None:
        for _ in range(args.count):
            protocol.sendMessage(payload, isBinary=False)

    def directly_writes() -> None:
        write = protocol.transport.write
        for _ in range(args.count):
            write(frames.frame(payload, False))

    print(f"{args.count} messages of {args.size} bytes, µs of CPU a message (framing only):")
    print(f"  read   Autobahn {_per_message(args.count, autobahn_reads):6.2f}"
          f"   directly {_per_message(args.count, directly_reads):6.2f}")
    print(f"  write  Autobahn {_per_message(args.count, autobahn_writes):6.2f}"
          f"   directly {_per_message(args.count, directly_writes):6.2f}")
    assert protocol.received == 2 * args.count


if __name__ == "__main__":
    main()
