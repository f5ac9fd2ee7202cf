"""
Attachment upload and download throughput, and the server's memory while
many uploads run at once.

    python benchmarks/attachments.py [--size-mib 100] [--parallel 20]
                                     [--parallel-size-mib 50] [--sqlite] [--s3]

Starts ``twistd -n cyphr`` (on a throwaway PostgreSQL cluster, or SQLite
with --sqlite) with the attachment limits raised, registers a user, then:

1. uploads one blob of --size-mib MiB in one TUS PATCH over a plain socket,
   and downloads it whole (the bytes are what a client encrypted: to the
   server, any bytes);
2. runs --parallel uploads of --parallel-size-mib MiB at once, sampling the
   server's RSS every 50 ms.

With --s3 the blobs go to an S3 bucket served by moto's S3 server
(``pip install 'moto[server]'``), started in this process on 127.0.0.1:
real SigV4 over HTTP, but moto keeps objects in its own memory, so the
figures say what the server's S3 path costs, not what a real store does.

Prints MB/s (10^6 bytes a second) for the upload and the download, the
server's CPU for each, and its RSS before and at its peak during the
parallel uploads (streaming, not buffering, keeps that flat). The load
generator shares the machine: its own CPU is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import User, cpu_seconds, cyphr_servers, register, run_loop  # noqa: E402

MiB = 1024 * 1024
PIECE = os.urandom(MiB)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def _exchange(port: int, head: str, body_bytes: int = 0) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection: ``head``, then ``body_bytes`` of
    the benchmark's piece repeated; the status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * MiB)
    try:
        writer.write(head.encode("latin-1"))
        sent = 0
        while sent < body_bytes:
            piece = PIECE[:min(MiB, body_bytes - sent)]
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
        status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()


async def create(port: int, token: str, length: int) -> str:
    status, headers, body = await _exchange(port, (
        "POST /api/attachments/ HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\nUpload-Length: {length}\r\n"
        "Content-Length: 0\r\n\r\n"))
    if status != 201:
        raise RuntimeError(f"create: {status} {body[:200]!r}")
    return headers["location"].rsplit("/", 1)[1]


async def upload(port: int, token: str, attachment_id: str, length: int) -> None:
    status, headers, body = await _exchange(port, (
        f"PATCH /api/attachments/{attachment_id} HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
        "Content-Type: application/offset+octet-stream\r\n"
        f"Content-Length: {length}\r\n\r\n"), length)
    if status != 204 or headers.get("upload-offset") != str(length):
        raise RuntimeError(f"upload: {status} {headers} {body[:200]!r}")


async def download(port: int, token: str, attachment_id: str, length: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * MiB)
    try:
        writer.write((f"GET /api/attachments/{attachment_id} HTTP/1.1\r\nHost: bench\r\n"
                      f"Authorization: Bearer {token}\r\n\r\n").encode("latin-1"))
        status_line = await reader.readline()
        while await reader.readline() not in (b"\r\n", b""):
            pass
        received = 0
        while received < length:
            chunk = await reader.read(4 * MiB)
            if not chunk:
                break
            received += len(chunk)
        if int(status_line.split()[1]) != 200 or received != length:
            raise RuntimeError(f"download: {status_line!r}, {received} of {length} bytes")
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> None:
    size = args.size_mib * MiB
    parallel_size = args.parallel_size_mib * MiB
    quota = max(size, parallel_size * args.parallel) * 2
    lifted = ["--max-attachment", str(max(size, parallel_size)),
              "--attachment-quota", str(quota),
              "--max-pending-uploads", str(args.parallel + 1),
              "--rate-limit-attachments", "100000/1s",
              "--rate-limit-attachment-bytes", f"{quota // MiB + 1}/1s",
              "--request-timeout", "600"]
    env = None
    if args.s3:
        env = {"CYPHR_S3_ACCESS_KEY_ID": "bench-access-key", "CYPHR_S3_SECRET_ACCESS_KEY": "bench-secret"}
        lifted += ["--attachment-store", "s3", "--s3-endpoint", start_moto(), "--s3-bucket", "bench"]
    async with cyphr_servers(1, 10, lifted, sqlite=args.sqlite, env=env) as ports:
        port, pid = ports[0], ports.pids[0]
        user = User("bench_files")
        token = await register(port, user)
        me = os.getpid()

        attachment_id = await create(port, token, size)
        cpu0, own0, started = cpu_seconds(pid), cpu_seconds(me), time.perf_counter()
        await upload(port, token, attachment_id, size)
        up_s, up_cpu, up_own = (time.perf_counter() - started, cpu_seconds(pid) - cpu0,
                                cpu_seconds(me) - own0)
        cpu0, own0, started = cpu_seconds(pid), cpu_seconds(me), time.perf_counter()
        await download(port, token, attachment_id, size)
        down_s, down_cpu, down_own = (time.perf_counter() - started, cpu_seconds(pid) - cpu0,
                                      cpu_seconds(me) - own0)

        ids = [await create(port, token, parallel_size) for _ in range(args.parallel)]
        before = rss_bytes(pid)
        peak = before
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_bytes(pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        await asyncio.gather(*(upload(port, token, a, parallel_size) for a in ids))
        parallel_s = time.perf_counter() - started
        done.set()
        await sampler

    engine = "SQLite" if args.sqlite else "PostgreSQL"
    store = "an S3 bucket (moto)" if args.s3 else "the local store"
    print(f"attachments on {store}, {engine}, one server process")
    print(f"  upload   {args.size_mib} MiB in one PATCH: {size / up_s / 1e6:7.1f} MB/s"
          f"   server CPU {up_cpu:.2f} s, load generator {up_own:.2f} s")
    print(f"  download {args.size_mib} MiB:              {size / down_s / 1e6:7.1f} MB/s"
          f"   server CPU {down_cpu:.2f} s, load generator {down_own:.2f} s")
    print(f"  {args.parallel} parallel uploads of {args.parallel_size_mib} MiB:"
          f" {args.parallel * parallel_size / parallel_s / 1e6:.1f} MB/s in all")
    print(f"  server RSS: {before / MiB:.1f} MiB before, {peak / MiB:.1f} MiB at the peak"
          f" (growth {(peak - before) / MiB:.1f} MiB)")


def start_moto() -> str:
    """moto's S3 server on 127.0.0.1, with the bucket "bench"; its URL."""
    import logging

    import botocore.session
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    botocore.session.Session().create_client(
        "s3", region_name="us-east-1", endpoint_url=url, aws_access_key_id="bench-access-key",
        aws_secret_access_key="bench-secret").create_bucket(Bucket="bench")
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--parallel-size-mib", type=int, default=50)
    parser.add_argument("--sqlite", action="store_true")
    parser.add_argument("--s3", action="store_true", help="blobs in an S3 bucket (moto)")
    run_loop(run(parser.parse_args()))


if __name__ == "__main__":
    main()
