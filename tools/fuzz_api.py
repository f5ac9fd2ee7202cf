"""
Fuzz the REST API against its OpenAPI document with schemathesis.

For each engine (SQLite, then PostgreSQL in a throwaway cluster from
tests/postgres.py) this starts a real server (``python -m twisted cyphr``)
on a free local port, registers real users with real keys (a v2 login
statement signed with the Ed25519 identity key, an ML-KEM-1024 key with its
signed key binding), makes a group chat with a message
so that fuzzed requests can reach real resources, and runs schemathesis
against the served document (GET /api/openapi.json):

1. every operation but logout, with the user's token (and the operator's
   admin token on the admin route), with generated parameters;
2. the operations that take a user, chat or message in their path, once
   more with the real ones, so that they get past 404;
3. logout alone, last, since it revokes the token.

Checks: no 5xx, every status code documented, the content type and the
body as documented, documented headers present. The server's rate limits
are set high (a fuzzer is one client sending thousands of requests); the
429 answers are documented all the same. The script prints the cases run
per engine and the failures, and exits non-zero when schemathesis finds a
failure, when the server logged an unexpected error, or when fewer than
--min-cases cases ran on an engine.

    python tools/fuzz_api.py [--engines sqlite,postgresql] [--max-examples 25]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from nacl.signing import SigningKey

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cyphr.clock import iso  # noqa: E402
from cyphr.signing import (  # noqa: E402
    REGISTER,
    AuthStatement,
    KeyBinding,
    device_hash,
    normalize_origin,
)
from tests import postgres  # noqa: E402

CHECKS = os.environ.get("CYPHR_FUZZ_CHECKS") or ",".join((
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
))
# Operations that name a user, chat, message or attachment in their path.
WITH_RESOURCES = (
    "getUser", "getPublicKey", "claimPrekey", "getWallet", "chatHistory", "listMembers", "addMember",
    "removeMember", "setMemberRole", "editMessage", "deleteMessage", "downloadAttachment",
    "appendAttachment", "deleteAttachment",
)
GENEROUS = "1000000/1m"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Account:
    cyphr_id: str
    token: str


def register(base: str, cyphr_id: str) -> Account:
    """Register as a v2 client does: real keys, a signed key binding, and a
    login statement for the origin of ``base``."""
    key = SigningKey.generate()
    kyber = MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()
    fingerprint = hashlib.sha256(os.urandom(16)).hexdigest()
    challenge = requests.post(f"{base}/api/cyphr-id/challenge", json={"cyphrId": cyphr_id}, timeout=30)
    challenge.raise_for_status()
    issued = challenge.json()
    now = int(time.time() * 1000)
    binding = KeyBinding(one_time=False, owner=cyphr_id, key_id=1, created_at=now,
                         expires_at=now + 180 * 86400 * 1000, public_key=kyber)
    statement = AuthStatement(REGISTER, normalize_origin(base), cyphr_id, device_hash(fingerprint),
                              issued["challengeId"], base64.b64decode(issued["challenge"]))
    response = requests.post(f"{base}/api/cyphr-id/register", timeout=30, json={
        "cyphrId": cyphr_id,
        "publicKey": b64(bytes(key.verify_key)),
        "kyberPublicKey": b64(kyber),
        "kyberKeySignature": b64(binding.sign(key)),
        "kyberKeyId": binding.key_id,
        "kyberKeyCreatedAt": iso(binding.created_at),
        "kyberKeyExpiresAt": iso(binding.expires_at),
        "deviceFingerprint": fingerprint,
        "challengeId": issued["challengeId"],
        "statement": b64(statement.encode()),
        "signature": b64(statement.sign(key)),
    })
    if response.status_code != 201:
        raise SystemExit(f"cannot register {cyphr_id}: {response.status_code} {response.text}")
    return Account(cyphr_id, response.json()["token"])


class Server:
    """``python -m twisted cyphr`` in a process of its own."""

    def __init__(self, workdir: str, database: str, admin_token: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, "server.log")
        env = dict(os.environ)
        env.update({
            "CYPHR_ADMIN_TOKEN": admin_token,
            "CYPHR_TURN_SECRET": secrets.token_hex(32),
            "CYPHR_STUN_URLS": "stun:stun.example.com:3478",
            "CYPHR_TURN_URLS": "turn:turn.example.com:3478?transport=udp,turns:turn.example.com:5349",
            "CYPHR_RATE_LIMIT_AUTH": GENEROUS,
            "CYPHR_RATE_LIMIT_SEND": GENEROUS,
            "CYPHR_RATE_LIMIT_SEARCH": GENEROUS,
            "CYPHR_RATE_LIMIT_CLAIM": GENEROUS,
            "CYPHR_RATE_LIMIT_PASSWORD": GENEROUS,
            "CYPHR_RATE_LIMIT_ATTACHMENTS": GENEROUS,
            "CYPHR_RATE_LIMIT_ATTACHMENT_BYTES": GENEROUS,  # MiB
            "CYPHR_MAX_PENDING_UPLOADS": "10000",
            "CYPHR_ATTACHMENT_QUOTA": "1000000MiB",
        })
        command = [sys.executable, "-m", "twisted", "cyphr", "--listen",
                   f"tcp:{self.port}:interface=127.0.0.1",
                   "--data-dir", os.path.join(workdir, "data"), "--log-format", "json"]
        if database:
            command += ["--database", database]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited ({self.process.returncode}); see {self.log_path}")
            try:
                if requests.get(f"{self.base}/api/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the server did not become ready in {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def unexpected_errors(self) -> list[str]:
        """Log lines of exceptions the server did not expect (answered 500)."""
        found = []
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if "Unexpected error" in line or '"log_failure"' in line:
                    found.append(line.strip()[:500])
        return found


def schemathesis(workdir: str, name: str, base: str, config: dict[str, Any], arguments: list[str],
                 max_examples: int, workers: int, seed: int | None) -> tuple[int, int, int]:
    """One schemathesis run: (exit status, cases, failures)."""
    config_path = os.path.join(workdir, f"{name}.toml")
    with open(config_path, "w") as f:
        f.write(to_toml(config))
    report = os.path.join(workdir, f"{name}.ndjson")
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", config_path, "--no-color",
               "run", f"{base}/api/openapi.json", "--checks", CHECKS,
               "--max-examples", str(max_examples), "--workers", str(workers),
               "--generation-database", "none", "--report", "ndjson", "--report-ndjson-path", report,
               "--phases", "examples,coverage,fuzzing", *arguments]
    if seed is not None:
        command += ["--seed", str(seed)]
    # tools/fuzz_hooks.py: a serializer for TUS PATCH bodies.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, (os.path.dirname(os.path.abspath(__file__)),
                                                       os.environ.get("PYTHONPATH"))))}
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
    cases, failures = read_report(report)
    if result.returncode != 0:
        print(result.stdout[-20000:])
        print(result.stderr[-5000:], file=sys.stderr)
    return result.returncode, cases, failures


def read_report(path: str) -> tuple[int, int]:
    """Cases run and failures found, from schemathesis's ndjson events."""
    cases = failures = 0
    if not os.path.exists(path):
        return 0, 0
    with open(path) as f:
        for line in f:
            event = json.loads(line)
            finished = event.get("ScenarioFinished")
            if finished is None:
                continue
            recorder = finished.get("recorder", {})
            cases += len(recorder.get("cases", {}))
            for checks in recorder.get("checks", {}).values():
                failures += sum(1 for check in checks if str(check.get("status", "")).lower() == "failure")
    return cases, failures


def to_toml(value: dict[str, Any], prefix: str = "") -> str:
    """The little TOML the schemathesis configuration needs."""
    lines, tables = [], []
    for key, item in value.items():
        if isinstance(item, dict):
            tables.append((key, item))
        elif isinstance(item, list) and item and isinstance(item[0], dict):
            for entry in item:
                lines.append(f"\n[[{prefix}{key}]]")
                lines.append(to_toml(entry))
        else:
            lines.append(f"{json.dumps(key)} = {json.dumps(item)}")
    for key, item in tables:
        lines.insert(0, f"{json.dumps(key)} = {{ " + ", ".join(
            f"{json.dumps(k)} = {json.dumps(v)}" for k, v in item.items()) + " }")
    return "\n".join(lines) + "\n"


def upload(base: str, auth: dict[str, str], data: bytes) -> str:
    """A finished attachment of ``data``; its id."""
    tus = {**auth, "Tus-Resumable": "1.0.0"}
    created = requests.post(f"{base}/api/attachments/", timeout=30,
                            headers={**tus, "Upload-Length": str(len(data))})
    created.raise_for_status()
    attachment_id = created.json()["id"]
    requests.patch(f"{base}/api/attachments/{attachment_id}", data=data, timeout=30, headers={
        **tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
    }).raise_for_status()
    return attachment_id


def prepare(base: str) -> tuple[Account, Account, str, str, str]:
    """Two users, a group of both, a message in it, a finished attachment:
    real resources."""
    fuzzer = register(base, "fuzzer")
    peer = register(base, "peer")
    auth = {"Authorization": f"Bearer {fuzzer.token}"}
    # A group holds only contacts (a direct chat first).
    direct = requests.post(f"{base}/api/messaging/send", headers=auth, timeout=30,
                           json={"recipientId": peer.cyphr_id, "encryptedPayload": {"ciphertext": "AAAA"}})
    direct.raise_for_status()
    group = requests.post(f"{base}/api/messaging/create-group", headers=auth, timeout=30,
                          json={"members": [peer.cyphr_id], "encryptedName": "x"})
    group.raise_for_status()
    chat_id = group.json()["chatId"]
    sent = requests.post(f"{base}/api/messaging/send", headers=auth, timeout=30,
                         json={"chatId": chat_id, "encryptedPayload": {"ciphertext": "AAAA"}})
    sent.raise_for_status()
    return fuzzer, peer, chat_id, sent.json()["messageId"], upload(base, auth, os.urandom(3000))


def fuzz_engine(engine: str, args: argparse.Namespace) -> tuple[int, int, bool, float]:
    """(cases, failures, passed, seconds) of one engine."""
    started = time.monotonic()
    cluster = None
    with tempfile.TemporaryDirectory(prefix=f"cyphr-fuzz-{engine}-") as workdir:
        database = ""
        if engine == "postgresql":
            cluster = postgres.new_cluster()
            database = cluster.create_database()
        admin_token = secrets.token_hex(32)
        server = Server(workdir, database, admin_token)
        try:
            server.wait_ready()
            fuzzer, peer, chat_id, message_id, attachment_id = prepare(server.base)
            user = {"Authorization": f"Bearer {fuzzer.token}"}
            admin = [{"include-operation-id": "zeroStorageStatus",
                      "headers": {"Authorization": f"Bearer {admin_token}"}}]
            runs = [
                ("generated", {"headers": user, "operations": admin},
                 ["--exclude-operation-id", "logout"], args.max_examples),
                ("resources", {"headers": user, "parameters": {
                    "path.cyphrId": peer.cyphr_id, "path.chatId": chat_id, "path.messageId": message_id,
                    "path.attachmentId": attachment_id}},
                 [arg for op in WITH_RESOURCES for arg in ("--include-operation-id", op)],
                 args.max_examples),
                ("logout", {"headers": user}, ["--include-operation-id", "logout"], args.max_examples),
            ]
            cases = failures = 0
            passed = True
            for name, config, arguments, examples in runs:
                status, run_cases, run_failures = schemathesis(
                    workdir, name, server.base, config, arguments, examples, args.workers, args.seed)
                print(f"  {engine} {name}: {run_cases} cases, {run_failures} failures"
                      f" (schemathesis exit {status})")
                cases += run_cases
                failures += run_failures
                passed = passed and status == 0
        finally:
            server.stop()
            if cluster is not None:
                cluster.destroy()
        errors = server.unexpected_errors()
        if errors:
            print(f"  {engine}: the server logged {len(errors)} unexpected errors:")
            for line in errors[:10]:
                print("   ", line)
            passed = False
        if cases < args.min_cases:
            print(f"  {engine}: only {cases} cases ran, fewer than {args.min_cases}")
            passed = False
    return cases, failures, passed, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--max-examples", type=int, default=25,
                        help="schemathesis --max-examples per operation and run")
    parser.add_argument("--min-cases", type=int, default=1000,
                        help="fail when fewer cases than this ran on an engine")
    # One worker: schemathesis's threads share hypothesis, whose parsing of
    # lambda sources (ast.parse) fails now and then when two threads do it at
    # once on Python 3.11 ("AST constructor recursion depth mismatch").
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    ok = True
    for engine in args.engines.split(","):
        cases, failures, passed, seconds = fuzz_engine(engine, args)
        print(f"{engine}: {cases} cases, {failures} failures, {seconds:.0f} s: "
              f"{'passed' if passed else 'FAILED'}")
        ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
