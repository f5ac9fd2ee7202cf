"""The server on real sockets: plain HTTP on both engines, and TLS."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
from typing import Any

import requests
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web import http as twisted_http

from cyphr.client.realtime import _OneAtATimeTLS
from cyphr.signing import LOGIN, REGISTER
from tests.certificates import self_signed
from tests.helpers import (
    InProcessHTTP,
    PostgresMixin,
    RealHTTP,
    SQLiteMixin,
    start_server,
)
from tests.realtime import SioClient, sessions_closed, until
from tests.users import User


def fetch(port: int, path: str, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET over a real socket from another thread, closing the connection."""
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


class RealPortMixin:
    async def test_health_over_tcp(self) -> None:
        """A started server answers /health and /api/health on its real port, without HSTS."""
        server = await start_server(self, serve=True)
        port = (await server.listening()[0]).getHost().port
        status, headers, body = await deferToThread(fetch, port, "/health")
        self.assertEqual((status, body), (200, b'{"status":"ok"}'))
        self.assertNotIn("strict-transport-security", headers)
        status, headers, body = await deferToThread(fetch, port, "/api/health")
        self.assertEqual(status, 200)
        self.assertTrue(json.loads(body)["database"]["ok"])


class SQLiteRealPortTests(SQLiteMixin, RealPortMixin, TestCase):
    pass


class PostgresRealPortTests(PostgresMixin, RealPortMixin, TestCase):
    pass


class TLSTests(SQLiteMixin, TestCase):
    async def tls_server(self) -> tuple[Any, int, int, str]:
        """A server on an ssl: endpoint and a plain tcp: one; its ports and the CA file."""
        directory = self.mktemp()
        os.makedirs(directory)
        key_path, cert_path = self_signed(directory)
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
        server = await start_server(self, serve=True, listen=(endpoint, "tcp:0:interface=127.0.0.1"))
        tls_port, tcp_port = [(await d).getHost().port for d in server.listening()]
        return server, tls_port, tcp_port, cert_path

    async def test_tls_endpoint(self) -> None:
        """An ssl: endpoint serves HTTPS with the given certificate and adds HSTS; the plain
        endpoint of the same server does not."""
        server, tls_port, tcp_port, cert_path = await self.tls_server()
        context = ssl.create_default_context(cafile=cert_path)
        status, headers, body = await deferToThread(fetch, tls_port, "/health", context)
        self.assertEqual((status, body), (200, b'{"status":"ok"}'))
        self.assertEqual(headers["strict-transport-security"], "max-age=31536000; includeSubDomains")
        status, headers, body = await deferToThread(fetch, tcp_port, "/health")
        self.assertEqual((status, body), (200, b'{"status":"ok"}'))
        self.assertNotIn("strict-transport-security", headers)
        # The error answers carry it too.
        status, headers, _ = await deferToThread(fetch, tls_port, "/api/nothing", context)
        self.assertEqual(status, 404)
        self.assertIn("strict-transport-security", headers)

    async def test_http2_not_negotiated(self) -> None:
        """A client offering HTTP/2 by ALPN gets HTTP/1.1 (with its limits and
        deadlines), even where Twisted could speak HTTP/2 (it can once the
        ``priority`` package is installed); the connection's place is given
        back when it closes."""
        self.patch(twisted_http, "H2_ENABLED", True)
        server, tls_port, _, cert_path = await self.tls_server()
        context = ssl.create_default_context(cafile=cert_path)
        context.set_alpn_protocols(["h2", "http/1.1"])

        def ask() -> tuple[str | None, bytes]:
            with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := tls.recv(4096):
                        answer += chunk
                    return tls.selected_alpn_protocol(), answer

        protocol, answer = await deferToThread(ask)
        self.assertEqual(protocol, "http/1.1")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        await until(lambda: server.site.connections.open == 0, "the connection's place given back")

    async def test_body_refused_over_tls(self) -> None:
        """A body declared too large is answered 413 at once over TLS, with HSTS."""
        server, tls_port, _, cert_path = await self.tls_server()
        context = ssl.create_default_context(cafile=cert_path)

        def declare_too_much() -> tuple[int, dict[str, str]]:
            conn = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=10, context=context)
            try:
                conn.putrequest("POST", "/api/messaging/send")
                conn.putheader("Content-Type", "application/json")
                conn.putheader("Content-Length", str(server.config.max_body + 1))
                conn.endheaders()  # and no body: the answer comes first
                response = conn.getresponse()
                response.read()
                return response.status, {k.lower(): v for k, v in response.getheaders()}
            finally:
                conn.close()

        status, headers = await deferToThread(declare_too_much)
        self.assertEqual(status, 413)
        self.assertEqual(headers["strict-transport-security"], "max-age=31536000; includeSubDomains")

    async def test_untrusted_certificate(self) -> None:
        """A client that does not trust the certificate fails the handshake; the server goes on."""
        server, tls_port, _, cert_path = await self.tls_server()
        with self.assertRaises(ssl.SSLCertVerificationError):
            await deferToThread(fetch, tls_port, "/health", ssl.create_default_context())
        context = ssl.create_default_context(cafile=cert_path)
        self.assertEqual((await deferToThread(fetch, tls_port, "/health", context))[0], 200)

    async def test_socketio_over_wss(self) -> None:
        """The stock python-socketio client connects over TLS (long-polling, then the upgrade
        to wss), authenticates with its token and sends a message that another user receives."""
        server, tls_port, tcp_port, cert_path = await self.tls_server()
        http = RealHTTP.for_port(self, tcp_port)
        alice, bob = User("tls_alice"), User("tls_bob")
        await alice.register(http)
        await bob.register(http)
        clients: list[SioClient] = []
        self.addCleanup(self._disconnect, clients, server)
        for user, transports in ((alice, ["polling", "websocket"]), (bob, ["websocket"])):
            session = requests.Session()
            session.verify = cert_path  # trust the test's own certificate, and only it
            session.trust_env = False  # (REQUESTS_CA_BUNDLE would win over it)
            self.addCleanup(session.close)
            client = SioClient(f"https://127.0.0.1:{tls_port}", transports=transports,
                               http_session=session)
            clients.append(client)
            await client.connect({"token": user.token})
            await client.wait_for("sync_complete")
        a, b = clients
        await until(lambda: a.sio.transport() == "websocket", "the upgrade to wss")
        # Each client's TLS WebSocket is read and written one thread at a
        # time (cyphr.client.realtime._OneAtATimeTLS; tests.test_client_tls).
        self.assertEqual([type(c.sio.eio.ws) for c in clients], [_OneAtATimeTLS, _OneAtATimeTLS])
        ack = await a.call("send_message", {"recipientId": "tls_bob", "encryptedPayload": {"c": "over tls"}})
        self.assertTrue(ack["success"], ack)
        [received] = await b.wait_for("new_message")
        self.assertEqual(received["message"]["encryptedPayload"], {"c": "over tls"})
        self.assertEqual(sorted(s.transport for s in server.engine.sessions.values()),
                         ["websocket", "websocket"])
        # Frames over TLS go through the TLS transport, never to the socket
        # underneath (EngineWebSocket._write writes there on plain TCP only).
        self.assertEqual([ws._socket for ws in server.engine.websockets], [None, None])

    async def _disconnect(self, clients: list[SioClient], server: Any) -> None:
        for client in clients:
            if client.sio.connected:
                await client.disconnect()
        await sessions_closed(server)


class IdentityOverTcpTests(PostgresMixin, TestCase):
    async def test_register_login_flow(self) -> None:
        """Challenge, register, challenge, login and a protected route, over a real port."""
        server = await start_server(self, serve=True)
        port = (await server.listening()[0]).getHost().port
        user = User("tcp_user")
        # A client that reached the server at this URL signs this origin.
        user.origin = f"http://127.0.0.1:{port}"
        main_key = user.main_key_fields()

        def flow() -> tuple[int, int, int]:
            def call(method: str, path: str, body: dict | None = None, token: str | None = None
                     ) -> tuple[int, dict]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    headers = {"Connection": "close", "Content-Type": "application/json"}
                    if token:
                        headers["Authorization"] = f"Bearer {token}"
                    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                                 headers=headers)
                    response = conn.getresponse()
                    return response.status, json.loads(response.read())
                finally:
                    conn.close()

            def challenge() -> tuple[str, bytes]:
                _, body = call("POST", "/api/cyphr-id/challenge", {"cyphrId": user.cyphr_id})
                return body["challengeId"], base64.b64decode(body["challenge"])

            challenge_id, raw = challenge()
            status_register, registered = call("POST", "/api/cyphr-id/register", {
                "cyphrId": user.cyphr_id, "publicKey": base64.b64encode(user.public_key).decode(),
                **main_key, "deviceFingerprint": user.fingerprint, "challengeId": challenge_id,
                **user.proof(user.statement(REGISTER, challenge_id, raw))})
            challenge_id, raw = challenge()
            status_login, logged_in = call("POST", "/api/cyphr-id/login", {
                "cyphrId": user.cyphr_id, "deviceFingerprint": user.fingerprint,
                "challengeId": challenge_id, **user.proof(user.statement(LOGIN, challenge_id, raw))})
            status_me, _ = call("GET", f"/api/cyphr-id/user/{user.cyphr_id}", token=logged_in["token"])
            return status_register, status_login, status_me

        self.assertEqual(await deferToThread(flow), (201, 200, 200))


class MessagingOverTcpTests(SQLiteMixin, TestCase):
    async def test_send_and_read(self) -> None:
        """A message sent over a real port comes back in the recipient's history."""
        server = await start_server(self, serve=True)
        port = (await server.listening()[0]).getHost().port
        in_process = InProcessHTTP.for_server(server)
        alice, bob = User("alice"), User("bob")
        await alice.register(in_process)
        await bob.register(in_process)

        def call(method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request(method, path, body=json.dumps(body) if body is not None else None,
                             headers={"Connection": "close", "Content-Type": "application/json",
                                      "Authorization": f"Bearer {token}"})
                response = conn.getresponse()
                return response.status, json.loads(response.read())
            finally:
                conn.close()

        status, sent = await deferToThread(call, "POST", "/api/messaging/send", alice.token,
                                           {"recipientId": "bob", "encryptedPayload": {"nonce": "bm9uY2U="}})
        self.assertEqual((status, sent["seq"]), (201, 1))
        status, history = await deferToThread(call, "GET", f"/api/messaging/chat/{sent['chatId']}", bob.token)
        self.assertEqual(status, 200)
        self.assertEqual([m["encryptedPayload"] for m in history["messages"]], [{"nonce": "bm9uY2U="}])
