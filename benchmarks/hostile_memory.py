"""
Memory and reactor time a client without an account can take (issue 18,
HIGH 2 and MEDIUM 4). Starts one ``twistd -n cyphr`` (SQLite), then runs,
one after the other, with nobody signed in:

* ws-attachments: WebSockets that CONNECT without a token, announce 10
  binary attachments and send 10 MiB frames;
* polling-attachments: the same over long-polling (bodies of ~7 MiB of
  base64 each);
* long-namespace: a CONNECT to a 10 MiB namespace name from a client that
  never reads;
* json-before-connect: 10 MiB JSON frames before any CONNECT.

It prints the server's RSS before, at its peak during, and after each
attack, and the latency of ``GET /health`` (polled every 10 ms on a
keep-alive connection) during it: p50 and p99. Targets: RSS growth under
50 MB, /health p99 under 20 ms. Bounded: each attack stops after its
frames or ``--attack-seconds``.

    python benchmarks/hostile_memory.py [--sessions 10] [--attack-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import socket
import struct
import sys
import time
from typing import Awaitable, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cyphr_servers, percentile, run_loop  # noqa: E402

MiB = 1024 * 1024
BIG = 10 * MiB
HEADER = "4510-" + json.dumps(
    ["upload", *({"_placeholder": True, "num": n} for n in range(10))], separators=(",", ":"))


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# -- a bare WebSocket client (the attacker writes what it likes) --------------------

def ws_frame(payload: bytes, binary: bool) -> bytes:
    """One final client frame, masked with a zero key (the payload as it is:
    masking 10 MiB in Python would measure the client)."""
    head = bytes([0x82 if binary else 0x81])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\x00\x00\x00\x00" + payload


async def ws_open(port: int, rcvbuf: int | None = None
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: bench\r\n"
                 b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


async def ws_read_frame(reader: asyncio.StreamReader) -> bytes:
    first, second = await reader.readexactly(2)
    n = second & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return await reader.readexactly(n)


async def send_all(writer: asyncio.StreamWriter, frames: list[bytes], deadline: float) -> int:
    """Write frames until the server hangs up or time is up; how many went."""
    sent = 0
    for frame in frames:
        if time.monotonic() > deadline or writer.is_closing():
            break
        try:
            writer.write(frame)
            await asyncio.wait_for(writer.drain(), max(0.1, deadline - time.monotonic()))
        except (OSError, asyncio.TimeoutError, ConnectionError):
            break
        sent += 1
    return sent


# -- the attacks ----------------------------------------------------------------------

async def ws_attachments(port: int, deadline: float, big: bytes) -> None:
    reader, writer = await ws_open(port)
    try:
        await ws_read_frame(reader)  # the open packet
        writer.write(ws_frame(b"40", False))
        await ws_read_frame(reader)  # 40{"sid":...}
        frames = [ws_frame(HEADER.encode(), False)] + [ws_frame(big, True)] * 10
        await send_all(writer, frames, deadline)
    except (OSError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def http(port: int, method: str, query: str, body: bytes = b"") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} /socket.io/?EIO=4&transport=polling{query} HTTP/1.1\r\n"
                     f"Host: bench\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        answer = await reader.read()
        status = int(answer.split(b" ", 2)[1]) if answer else 0
        return status, answer.partition(b"\r\n\r\n")[2]
    except (OSError, ConnectionError, IndexError, ValueError):
        return 0, b""
    finally:
        writer.close()


async def polling_attachments(port: int, deadline: float, chunk_b64: bytes) -> None:
    status, body = await http(port, "GET", "")
    if status != 200:
        return
    sid = json.loads(body[1:])["sid"]
    await http(port, "POST", f"&sid={sid}", b"40")
    await http(port, "GET", f"&sid={sid}")
    await http(port, "POST", f"&sid={sid}", HEADER.encode())
    for _ in range(10):
        if time.monotonic() > deadline:
            break
        status, _ = await http(port, "POST", f"&sid={sid}", b"b" + chunk_b64)
        if status != 200:
            break


async def long_namespace(port: int, deadline: float, big: bytes) -> None:
    reader, writer = await ws_open(port, rcvbuf=4096)
    try:
        await ws_read_frame(reader)
        await send_all(writer, [ws_frame(b"40/" + big + b",", False)] * 4, deadline)
        # ... and never read what comes back.
        await asyncio.sleep(max(0.0, min(3.0, deadline - time.monotonic())))
    except (OSError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.transport.abort()


async def json_before_connect(port: int, deadline: float, big: bytes) -> None:
    reader, writer = await ws_open(port)
    try:
        await ws_read_frame(reader)
        text = b'42["x","' + big[:BIG - 10] + b'"]'
        await send_all(writer, [ws_frame(text, False)] * 5, deadline)
    except (OSError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


# -- measuring ------------------------------------------------------------------------

async def health_probe(port: int, stop: asyncio.Event, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"
    try:
        while not stop.is_set():
            started = time.perf_counter()
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            if b"content-length:" in head:
                await reader.readexactly(int(head.split(b"content-length:")[1].split(b"\r\n")[0]))
            else:  # chunked
                while size := int((await reader.readline()).strip(), 16):
                    await reader.readexactly(size + 2)
                await reader.readline()
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
    finally:
        writer.close()


def _probe_process(port: int, stop: object, out: object) -> None:
    """The /health probe in a process of its own: the attackers' writes of
    10 MiB must not delay it on the client's side."""
    async def run() -> None:
        latencies: list[float] = []
        event = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():  # type: ignore[attr-defined]
                await asyncio.sleep(0.02)
            event.set()
        await asyncio.gather(health_probe(port, event, latencies), watch())
        out.send(latencies)  # type: ignore[attr-defined]
    asyncio.run(run())


async def rss_sampler(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_bytes(pid))
        await asyncio.sleep(0.05)


async def measure(name: str, port: int, pid: int, sessions: int, seconds: float,
                  attack: Callable[[int, float], Awaitable[None]]) -> bool:
    before = rss_bytes(pid)
    stop = asyncio.Event()
    peak = [before]
    probes = [asyncio.ensure_future(rss_sampler(pid, stop, peak))]
    context = multiprocessing.get_context("spawn")
    stop_probe = context.Event()
    receive, send = context.Pipe(duplex=False)
    prober = context.Process(target=_probe_process, args=(port, stop_probe, send))
    prober.start()
    await asyncio.sleep(1.5)  # the probe's process starts and polls
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(attack(port, deadline) for _ in range(sessions)),
                                          return_exceptions=True), seconds + 30)
    took = time.monotonic() - started
    await asyncio.sleep(2)  # what the server frees once the attack is over
    stop.set()
    stop_probe.set()
    await asyncio.gather(*probes, return_exceptions=True)
    latencies: list[float] = await asyncio.get_running_loop().run_in_executor(None, receive.recv)
    prober.join()
    after = rss_bytes(pid)
    latencies.sort()
    p50 = percentile(latencies, 0.50) * 1000 if latencies else float("nan")
    p99 = percentile(latencies, 0.99) * 1000 if latencies else float("nan")
    growth = (peak[0] - before) / 1e6
    ok = growth < 50 and p99 < 20
    print(f"{name:22} RSS before {before / MiB:6.1f} MiB, peak {peak[0] / MiB:6.1f} MiB "
          f"(+{growth:5.1f} MB), after {after / MiB:6.1f} MiB; attack {took:4.1f} s; "
          f"/health p50 {p50:5.1f} ms, p99 {p99:5.1f} ms over {len(latencies)}"
          f" {'ok' if ok else 'OVER TARGET'}", flush=True)
    return ok


async def main(args: argparse.Namespace) -> None:
    big = b"A" * BIG
    chunk_b64 = base64.b64encode(b"\x00" * (7 * MiB))
    async with cyphr_servers(1, 1, [], sqlite=True) as servers:
        port, pid = servers[0], servers.pids[0]
        print(f"server pid {pid}, RSS at start {rss_bytes(pid) / MiB:.1f} MiB", flush=True)
        results = [
            await measure("ws-attachments", port, pid, args.sessions, args.attack_seconds,
                          lambda p, d: ws_attachments(p, d, big)),
            await measure("polling-attachments", port, pid, args.sessions, args.attack_seconds,
                          lambda p, d: polling_attachments(p, d, chunk_b64)),
            await measure("long-namespace", port, pid, args.sessions, args.attack_seconds,
                          lambda p, d: long_namespace(p, d, big)),
            await measure("json-before-connect", port, pid, 2, args.attack_seconds,
                          lambda p, d: json_before_connect(p, d, big)),
        ]
        print(f"server RSS at the end {rss_bytes(pid) / MiB:.1f} MiB; "
              f"{'all within targets' if all(results) else 'some over target'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10, help="attacking sessions at once")
    parser.add_argument("--attack-seconds", type=float, default=20.0,
                        help="the longest one attack may run")
    run_loop(main(parser.parse_args()))
