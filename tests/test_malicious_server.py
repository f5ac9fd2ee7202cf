"""
The demonstrations of the cryptographic review, as regression tests: the
unmodified reference client talks to a real server through a proxy that
lies the way a malicious operator (or whoever terminates its TLS) would,
and what the client signs must never serve the liar.

- A "challenge" equal to a message's or a key's signing input (v1 or v2),
  or to a Stellar transaction hash: the client refuses anything but 32
  bytes before signing, and what it signs for 32 bytes verifies as none of
  those things.
- A login collected by a phishing server, relayed to the real server's
  /recover (or /login, with the phisher's device): refused.
- 401 after 401: the client signs in again a few times, then stops.
- Claims that lie about prekeys: a prekey handed out twice, a prekey
  presented as the main key, a relabelled key id.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import requests
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM1024PrivateKey
from nacl.signing import VerifyKey
from stellar_sdk import Account, Asset, Keypair, Network, TransactionBuilder
from stellar_sdk.exceptions import BadSignatureError as StellarBadSignature
from twisted.internet import reactor, tcp
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr import signing
from cyphr.client import Client
from cyphr.client.crypto import b64
from cyphr.client.http import ClientError
from tests.helpers import PostgresMixin, SQLiteMixin, start_server
from tests.realtime import sleep

PASSPHRASE = "correct horse battery staple 4711"

# What the proxy may answer instead of the server: (status, JSON body).
Answer = tuple[int, dict[str, Any]]
Rewrite = Callable[[str, str, Any], "Answer | None"]
Edit = Callable[[str, str, Any, int, Any], "Answer | None"]


class LyingProxy:
    """An HTTP proxy in front of the real server. ``before`` may answer a
    request itself; ``after`` may replace the server's answer. Every request
    body is recorded in ``seen`` as (method, path, body)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.before: Rewrite = lambda method, path, body: None
        self.after: Edit = lambda method, path, body, status, answer: None
        self.seen: list[tuple[str, str, Any]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                proxy.seen.append((self.command, self.path, body))
                answer = proxy.before(self.command, self.path, body)
                if answer is None:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() in ("authorization", "content-type")}
                    headers["Connection"] = "close"  # nothing left open at the test's end
                    upstream = requests.request(self.command, proxy.upstream + self.path,
                                                data=raw or None, headers=headers, timeout=30)
                    try:
                        upstream_body = upstream.json()
                    except ValueError:
                        upstream_body = {}
                    answer = proxy.after(self.command, self.path, body, upstream.status_code,
                                         upstream_body) or (upstream.status_code, upstream_body)
                status, data = answer
                out = json.dumps(data).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits for serve_forever to look at its flag, which it
        # does every poll_interval (0.5 s by default: half a second a test).
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.01})
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, path: str) -> list[Any]:
        return [body for _, p, body in self.seen if p.split("?")[0] == path]


def post(url: str, body: Any) -> tuple[int, Any]:
    """A POST straight to a server, on a connection closed right after."""
    with requests.Session() as session:
        answer = session.post(url, json=body, headers={"Connection": "close"}, timeout=30)
        return answer.status_code, answer.json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transaction_hash(source: Keypair) -> bytes:
    """The hash a Stellar key signs to pay away 99,999 XLM: 32 bytes, like
    an honest challenge."""
    tx = (TransactionBuilder(Account(source.public_key, 1234),
                             network_passphrase=Network.PUBLIC_NETWORK_PASSPHRASE, base_fee=100)
          .append_payment_op(Keypair.random().public_key, Asset.native(), "99999")
          .set_timeout(300).build())
    return tx.hash()


def forged_message_input(sender: str) -> bytes:
    """The v2 signing input of a message the attacker would like signed."""
    header = signing.MessageHeader("cyphr-hybrid-v2", None, sender, "text", "forged",
                                   (sender, "mallory_01"), bytes(32))
    return signing.sign_content(signing.MESSAGE, signing.message_content(
        header, bytes(24), b"wire the money", bytes(16), []))


class MaliciousServerTests:
    async def setUp(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = await start_server(self, serve=True, listen=(f"tcp:{port}:interface=127.0.0.1",),
                                         public_url=(self.url,))
        self.addCleanup(self._connections_closed)
        self.proxy = LyingProxy(self.url)
        self.addCleanup(self.proxy.close)
        self.clients: list[Client] = []
        self.addCleanup(lambda: [c.close() for c in self.clients])

    async def _connections_closed(self) -> None:
        """Wait until the server has seen every client connection close
        (the clients close theirs from threads, so the server learns late)."""
        deadline = time.monotonic() + 10
        while any(isinstance(r, tcp.Server) for r in reactor.getReaders()):
            if time.monotonic() > deadline:
                break
            await sleep(0.02)

    def client(self, name: str, server: str | None = None, prekeys: int = 5) -> Client:
        """(In a thread.) A registered client of the real server."""
        client, _ = Client.init(self.mktemp(), PASSPHRASE, server or self.url)
        self.clients.append(client)
        client.register(name, prekeys=prekeys)
        return client

    def through_proxy(self, client: Client) -> Client:
        """The same profile, talking to the proxy this run."""
        proxied = Client(client.profile, self.proxy.url)
        self.clients.append(proxied)
        return proxied

    def lie_about_challenges(self, challenge: bytes) -> None:
        def before(method: str, path: str, body: Any) -> Answer | None:
            if path == "/api/cyphr-id/challenge":
                return 200, {"success": True, "challengeId": "6f1c1f7e-0d6b-4a4f-9a59-3c1f4f0e2b7d",
                             "challenge": b64(challenge), "expiresAt": "2030-01-01T00:00:00.000Z"}
            return None
        self.proxy.before = before

    # -- the signing oracle -------------------------------------------------

    async def test_no_signature_over_a_message_or_key_input(self) -> None:
        """Handed a message's or a key's signing input (v2 or v1) as the
        challenge, the client refuses it and signs nothing."""
        def run() -> None:
            alice = self.through_proxy(self.client("alice_mal"))
            attacker_key = MLKEM1024PrivateKey.generate().public_key().public_bytes_raw()
            binding = signing.KeyBinding(False, "alice_mal", 9, 0, 2**62, attacker_key)
            for lie in (forged_message_input("alice_mal"),
                        signing.sign_content(binding.label, binding.encode()),
                        b"cyphr-kyber-key:" + attacker_key,
                        b"cyphr-message-signature-v1\x00{}",
                        b"x" * 31, b"x" * 33, b""):
                self.lie_about_challenges(lie)
                before = len(self.proxy.seen)
                self.assertRaises(ClientError, alice.login)
                signed = [p for _, p, _ in self.proxy.seen[before:] if p != "/api/cyphr-id/challenge"]
                self.assertEqual(signed, [], f"the client sent {signed} for a {len(lie)}-byte challenge")

        await deferToThread(run)

    async def test_a_transaction_hash_as_challenge(self) -> None:
        """Handed the hash of a Stellar payment as a (32-byte) challenge, the
        client signs its own statement: the signature is no signature of
        the hash, nor of any message or key."""
        def run() -> tuple[bytes, bytes, bytes, bytes]:
            alice = self.client("alice_tx")
            identity_key = alice.identity.public_key
            proxied = self.through_proxy(alice)
            tx_hash = transaction_hash(Keypair.random())
            self.lie_about_challenges(tx_hash)
            try:
                proxied.login()
            except ClientError:
                pass  # the real server refuses the unknown challenge id
            [body] = self.proxy.bodies("/api/cyphr-id/login")
            return identity_key, tx_hash, base64.b64decode(body["statement"]), \
                base64.b64decode(body["signature"])

        identity_key, tx_hash, statement, signature = await deferToThread(run)
        self.assertRaises(Exception, VerifyKey(identity_key).verify, tx_hash, signature)
        decoded = signing.AuthStatement.decode(statement)
        self.assertEqual((decoded.purpose, decoded.origin, decoded.challenge),
                         (signing.LOGIN, self.proxy.url, tx_hash))
        self.assertTrue(signing.verify_with_label(identity_key, signing.AUTH, statement, signature))
        for label in signing.LABELS:
            if label != signing.AUTH:
                self.assertFalse(signing.verify_with_label(identity_key, label, statement, signature))

    async def test_wallet_link_is_no_transaction_signature(self) -> None:
        """Handed a payment's hash as the wallet link challenge, the
        Stellar key's signature does not sign that payment."""
        stellar = Keypair.random()

        def run() -> tuple[bytes, bytes]:
            alice = self.through_proxy(self.client("alice_wallet"))
            tx_hash = transaction_hash(stellar)
            self.lie_about_challenges(tx_hash)
            try:
                alice.wallet_link(stellar.secret)
            except ClientError:
                pass
            [body] = self.proxy.bodies("/api/wallet/link")
            return tx_hash, base64.b64decode(body["signature"])

        tx_hash, signature = await deferToThread(run)
        self.assertRaises(StellarBadSignature, stellar.verify, tx_hash, signature)

    async def test_honest_wallet_link(self) -> None:
        """Without lies, the wallet link goes through and the server
        answers the address."""
        stellar = Keypair.random()

        def run() -> str:
            alice = self.client("alice_honest")
            alice.wallet_link(stellar.secret)
            return alice.wallet_show()

        self.assertEqual(await deferToThread(run), stellar.public_key)

    # -- relayed statements -------------------------------------------------

    async def test_a_phished_login_cannot_recover_the_account(self) -> None:
        """A phishing server passes on a real challenge, collects Alice's
        login statement, and spends it at the real server's /recover and
        /login with a device of its own: both refused; Alice still logs in."""
        def run() -> list[tuple[int, Any]]:
            alice = self.client("alice_phish")
            phished = self.through_proxy(alice)
            stolen: list[Any] = []

            def before(method: str, path: str, body: Any) -> Answer | None:
                if path == "/api/cyphr-id/login":
                    stolen.append(body)
                    return 500, {"success": False, "error": "try again", "code": "INTERNAL_ERROR"}
                return None
            self.proxy.before = before
            self.assertRaises(Exception, phished.login)
            [body] = stolen
            mine = "ff" * 32
            answers = [
                post(self.url + "/api/cyphr-id/recover", {
                    "cyphrId": body["cyphrId"], "newDeviceFingerprint": mine,
                    "challengeId": body["challengeId"], "statement": body["statement"],
                    "signature": body["signature"]}),
                post(self.url + "/api/cyphr-id/login", {**body, "deviceFingerprint": mine}),
            ]
            alice.login()
            alice.whoami()
            return answers

        (recover_status, recover), (login_status, login) = await deferToThread(run)
        self.assertEqual((recover_status, recover["code"]), (401, "STATEMENT_MISMATCH"), recover)
        self.assertEqual(login_status, 401, login)
        self.assertIn(login["code"], ("STATEMENT_MISMATCH", "INVALID_CHALLENGE"))

    async def test_a_phishing_origin_is_refused(self) -> None:
        """A statement made for the phishing server's origin, relayed at
        once with its fresh challenge, is refused by the real server."""
        def run() -> tuple[int, Any]:
            alice = self.client("alice_origin")
            phished = self.through_proxy(alice)
            relayed: list[tuple[int, Any]] = []

            def before(method: str, path: str, body: Any) -> Answer | None:
                if path == "/api/cyphr-id/login":
                    relayed.append(post(self.url + path, body))
                    return relayed[-1]
                return None
            self.proxy.before = before
            self.assertRaises(Exception, phished.login)
            return relayed[0]

        status, answer = await deferToThread(run)
        self.assertEqual(status, 401, answer)
        self.assertEqual((answer["code"], answer["details"]["field"]),
                         ("STATEMENT_MISMATCH", "origin"))

    # -- silent re-signing --------------------------------------------------

    async def test_no_endless_re_login(self) -> None:
        """A server answering 401 to everything gets a few automatic logins,
        then the client stops and says so."""
        def run() -> int:
            alice = self.through_proxy(self.client("alice_401"))

            def before(method: str, path: str, body: Any) -> Answer | None:
                if path == "/api/messaging/chats":
                    return 401, {"success": False, "error": "expired", "code": "TOKEN_EXPIRED"}
                return None
            self.proxy.before = before
            for _ in range(10):
                try:
                    alice.chats()
                except ClientError:
                    pass
            return len(self.proxy.bodies("/api/cyphr-id/login"))

        logins = await deferToThread(run)
        self.assertGreaterEqual(logins, 1)
        self.assertLessEqual(logins, 3)

    # -- lying claims -------------------------------------------------------

    async def test_lying_claims_are_refused(self) -> None:
        """Sealing as version 3 (to a contact without sessions): a one-time
        prekey handed out twice, a prekey presented as the main key, and a
        relabelled key id are all refused by the sender."""
        def run() -> list[str]:
            bob = self.client("bob_claims", prekeys=5)
            alice = self.through_proxy(self.client("alice_claims"))
            first: list[dict[str, Any]] = []
            mode = ["record"]

            def after(method: str, path: str, body: Any, status: int, answer: Any) -> Answer | None:
                if path.startswith("/api/sessions/bundles/"):
                    # As a server without sessions: the messages go as version 3,
                    # whose claims are what is tested here.
                    return 404, {"success": False, "error": "Not found", "code": "NOT_FOUND"}
                if not path.startswith("/api/keys/claim/") or status != 200:
                    return None
                if mode[0] == "record":
                    first.append(answer)
                    return None
                if mode[0] == "again":
                    return 200, first[0]
                if mode[0] == "as-main":
                    return 200, {**first[0], "oneTime": False}
                if mode[0] == "relabel":
                    return 200, {**answer, "keyId": answer["keyId"] + 1000}
                return None
            self.proxy.after = after
            alice.send(bob.cyphr_id, "first")
            errors = []
            for lie in ("again", "as-main", "relabel"):
                mode[0] = lie
                try:
                    alice.send(bob.cyphr_id, f"after {lie}")
                except ClientError as e:
                    errors.append(str(e))
                else:
                    errors.append("")
            del bob
            return errors

        errors = await deferToThread(run)
        for lie, error in zip(("again", "as-main", "relabel"), errors):
            self.assertTrue(error, f"the client accepted a claim that lied ({lie})")


class SQLiteMaliciousServerTests(SQLiteMixin, MaliciousServerTests, TestCase):
    pass


class PostgresMaliciousServerTests(PostgresMixin, MaliciousServerTests, TestCase):
    pass
