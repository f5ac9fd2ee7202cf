"""The HTTP plumbing every route shares: JSON bodies, limits, errors,
security headers, CORS and client addresses."""

from __future__ import annotations

import socket
from typing import Any

from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from cyphr.api.http import (
    ApiRouter,
    CyphrSite,
    HttpPolicy,
    Root,
    answer,
    read_json,
)
from cyphr.errors import Conflict
from tests.helpers import InProcessHTTP, make_config, with_config


class EchoAPI:
    """Routes that exercise the plumbing; they stand for every real route."""

    app = Klein()

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.slow_started: Deferred[None] = Deferred()
        self.slow_release: Deferred[None] = Deferred()
        self.slow_finished = False

    @app.route("/api/echo", methods=["POST"])
    def echo(self, request: Any) -> bytes:
        body = read_json(request)
        self.bodies.append(body)
        return answer(request, {"success": True, "body": body})

    @app.route("/api/optional", methods=["POST"])
    def optional(self, request: Any) -> bytes:
        return answer(request, {"success": True, "body": read_json(request, required=False)})

    @app.route("/api/client", methods=["GET"])
    def client(self, request: Any) -> bytes:
        return answer(request, {"success": True, "clientIp": request.client_ip})

    @app.route("/api/boom", methods=["GET"])
    def boom(self, request: Any) -> bytes:
        raise RuntimeError("internal detail that must not leak")

    @app.route("/api/async-boom", methods=["GET"])
    async def async_boom(self, request: Any) -> bytes:
        await deferToThread(lambda: None)
        raise KeyError("internal")

    @app.route("/api/conflict", methods=["POST"])
    def conflict(self, request: Any) -> bytes:
        raise Conflict("That name is taken", code="CYPHR_ID_TAKEN", details={"name": "alice"})

    @app.route("/api/slow", methods=["GET"])
    async def slow(self, request: Any) -> bytes:
        self.slow_started.callback(None)
        await self.slow_release
        self.slow_finished = True
        return answer(request, {"success": True})

    @app.route("/api/not-bytes", methods=["GET"])
    def not_bytes(self, request: Any) -> Any:
        return {"success": True}

    @app.route("/api/items/<item_id>", methods=["GET", "DELETE"])
    def item(self, request: Any, item_id: str) -> bytes:
        return answer(request, {"success": True, "id": item_id, "route": request.route})


def make_site(testcase: TestCase, **overrides: Any) -> tuple[EchoAPI, Root, HttpPolicy]:
    config = make_config(testcase, **overrides)
    api = EchoAPI()
    root = Root(ApiRouter([api]))
    return api, root, HttpPolicy.from_config(config)


class JsonBodyTests(TestCase):
    def setUp(self) -> None:
        self.api, root, policy = make_site(self, max_body=4096)
        self.http = InProcessHTTP(root, policy)

    async def test_json_object_is_parsed(self) -> None:
        """A JSON object body reaches the route parsed, and the answer is JSON."""
        response = await self.http.post("/api/echo", {"a": [1, "é"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header("Content-Type"), "application/json; charset=utf-8")
        self.assertEqual(response.json(), {"success": True, "body": {"a": [1, "é"]}})

    async def test_vendor_json_type_is_json(self) -> None:
        """application/something+json counts as JSON, with a charset too."""
        response = await self.http.request(
            "POST", "/api/echo", data=b'{"x": 1}',
            headers={b"Content-Type": [b"application/vnd.cyphr+json; charset=utf-8"]})
        self.assertEqual(response.code, 200)

    async def test_not_json_is_415(self) -> None:
        """A body that is not declared as JSON is 415 and reaches no route."""
        response = await self.http.request(
            "POST", "/api/echo", data=b"a=1", headers={b"Content-Type": [b"application/x-www-form-urlencoded"]})
        self.assertEqual(response.code, 415)
        self.assertEqual(response.json()["code"], "UNSUPPORTED_MEDIA_TYPE")
        self.assertEqual(response.json()["success"], False)
        self.assertEqual(self.api.bodies, [])

    async def test_missing_content_type_is_415(self) -> None:
        """A body without a Content-Type is 415."""
        response = await self.http.request("POST", "/api/echo", data=b'{"a": 1}')
        self.assertEqual(response.code, 415)

    async def test_malformed_json_is_400_with_position(self) -> None:
        """Malformed JSON is 400 INVALID_JSON, saying where it breaks."""
        response = await self.http.request(
            "POST", "/api/echo", data=b'{"a": 1,\n "b": }',
            headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 400)
        body = response.json()
        self.assertEqual(body["code"], "INVALID_JSON")
        self.assertEqual(body["details"], {"line": 2, "column": 7, "position": 15})
        self.assertEqual(self.api.bodies, [])

    async def test_invalid_utf8_is_400(self) -> None:
        """A body that is not UTF-8 is 400 INVALID_JSON with the offending byte's position."""
        response = await self.http.request(
            "POST", "/api/echo", data=b'{"a": "\xff"}', headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 400)
        self.assertEqual(response.json()["code"], "INVALID_JSON")
        self.assertEqual(response.json()["details"], {"position": 7})

    async def test_nan_is_400(self) -> None:
        """NaN and Infinity are not JSON and are refused."""
        response = await self.http.request(
            "POST", "/api/echo", data=b'{"a": NaN}', headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 400)
        self.assertEqual(response.json()["code"], "INVALID_JSON")

    async def test_deep_nesting_is_400(self) -> None:
        """JSON nested deeper than the parser can go is 400, not 500."""
        self.http = InProcessHTTP(*make_site(self, max_body=1024 * 1024)[1:])
        response = await self.http.request(
            "POST", "/api/echo", data=b"[" * 200000, headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 400)
        self.assertEqual(response.json()["code"], "INVALID_JSON")

    async def test_huge_integer_is_400(self) -> None:
        """An integer of more digits than Python converts is 400, not 500."""
        self.http = InProcessHTTP(*make_site(self, max_body=1024 * 1024)[1:])
        response = await self.http.request(
            "POST", "/api/echo", data=b'{"a": ' + b"9" * 4400 + b"}",
            headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 400)
        self.assertEqual(response.json()["code"], "INVALID_JSON")

    async def test_array_is_400_invalid_body(self) -> None:
        """Valid JSON that is not an object is 400 INVALID_BODY."""
        response = await self.http.post("/api/echo", [1, 2])
        self.assertEqual(response.code, 400)
        self.assertEqual(response.json()["code"], "INVALID_BODY")

    async def test_empty_body_required(self) -> None:
        """A route that needs a body answers 400 to an empty one."""
        response = await self.http.request("POST", "/api/echo")
        self.assertEqual(response.code, 400)
        self.assertEqual(response.json()["code"], "INVALID_JSON")

    async def test_empty_body_optional(self) -> None:
        """A route whose fields are all optional takes an empty body as {}."""
        response = await self.http.request("POST", "/api/optional")
        self.assertEqual(response.json(), {"success": True, "body": {}})

    async def test_body_at_limit_is_accepted(self) -> None:
        """A body of exactly the limit is accepted."""
        payload = b'{"a": "' + b"x" * (4096 - 9) + b'"}'
        self.assertEqual(len(payload), 4096)
        response = await self.http.request(
            "POST", "/api/echo", data=payload, headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(response.code, 200)


class ErrorFormatTests(TestCase):
    def setUp(self) -> None:
        self.api, root, policy = make_site(self)
        self.http = InProcessHTTP(root, policy)

    async def test_unknown_route_is_404_json(self) -> None:
        """An unknown path is 404 in the contract's error format."""
        response = await self.http.get("/api/no-such-thing")
        self.assertEqual(response.code, 404)
        body = response.json()
        self.assertEqual((body["success"], body["code"]), (False, "NOT_FOUND"))
        self.assertIn("error", body)

    async def test_root_is_404_json(self) -> None:
        """GET / is 404 in the same format."""
        response = await self.http.get("/")
        self.assertEqual(response.code, 404)
        self.assertEqual(response.json()["code"], "NOT_FOUND")

    async def test_wrong_method_is_405_with_allow(self) -> None:
        """A known path with a wrong method is 405, with an Allow header."""
        response = await self.http.request("PUT", "/api/items/7")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.json()["code"], "METHOD_NOT_ALLOWED")
        self.assertEqual(response.header("Allow"), "DELETE, GET, HEAD")

    async def test_route_template_is_recorded(self) -> None:
        """The router records the route template, never the raw path."""
        response = await self.http.get("/api/items/abc")
        self.assertEqual(response.json(), {"success": True, "id": "abc", "route": "/api/items/:itemId"})

    async def test_api_error_is_rendered(self) -> None:
        """An ApiError raised in a route becomes its status, code, message and details."""
        response = await self.http.post("/api/conflict", {})
        self.assertEqual(response.code, 409)
        self.assertEqual(response.json(), {
            "success": False, "error": "That name is taken",
            "code": "CYPHR_ID_TAKEN", "details": {"name": "alice"}})

    async def test_unexpected_exception_is_bare_500(self) -> None:
        """An unexpected exception is logged with its traceback and answered with a bare 500."""
        response = await self.http.get("/api/boom")
        self.assertEqual(response.code, 500)
        self.assertEqual(response.json(), {
            "success": False, "error": "Internal server error", "code": "INTERNAL_ERROR"})
        self.assertNotIn(b"internal detail", response.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_async_unexpected_exception_is_bare_500(self) -> None:
        """The same holds for an exception after an await."""
        response = await self.http.get("/api/async-boom")
        self.assertEqual(response.code, 500)
        self.assertEqual(response.json()["code"], "INTERNAL_ERROR")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    async def test_route_answering_other_than_bytes(self) -> None:
        """A route that answers something other than bytes is a bare 500, logged."""
        response = await self.http.get("/api/not-bytes")
        self.assertEqual((response.code, response.json()["code"]), (500, "INTERNAL_ERROR"))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    async def test_undecodable_path_is_404(self) -> None:
        """A path that is not UTF-8 is 404, not 500."""
        response = await self.http.get("/api/items/%ff%fe")
        self.assertEqual(response.code, 404)


class HeaderTests(TestCase):
    def setUp(self) -> None:
        self.api, root, policy = make_site(self)
        self.http = InProcessHTTP(root, policy)

    def assertSecurityHeaders(self, response: Any) -> None:
        self.assertEqual(response.header("X-Content-Type-Options"), "nosniff")
        self.assertEqual(response.header("X-Frame-Options"), "DENY")
        self.assertEqual(response.header("Referrer-Policy"), "no-referrer")
        self.assertIn("default-src 'none'", response.header("Content-Security-Policy"))
        self.assertEqual(response.header("Server"), "Cyphr")
        # Plain HTTP: HSTS would be meaningless and is not sent.
        self.assertIsNone(response.header("Strict-Transport-Security"))

    async def test_security_headers_on_success(self) -> None:
        """Every answer carries the security headers; the Server header names no version."""
        self.assertSecurityHeaders(await self.http.post("/api/echo", {}))

    async def test_security_headers_on_errors(self) -> None:
        """Errors (404, 405, 500) carry them too."""
        self.assertSecurityHeaders(await self.http.get("/nowhere"))
        self.assertSecurityHeaders(await self.http.request("PUT", "/api/items/1"))
        self.assertSecurityHeaders(await self.http.get("/api/boom"))
        self.flushLoggedErrors(RuntimeError)


class CorsTests(TestCase):
    def setUp(self) -> None:
        self.api, root, policy = make_site(self)
        self.http = InProcessHTTP(root, policy)

    async def test_allowed_origin(self) -> None:
        """A configured origin is named in Access-Control-Allow-Origin."""
        response = await self.http.get(
            "/api/items/1", headers={b"Origin": [b"https://app.cyphrmessenger.app"]})
        self.assertEqual(response.header("Access-Control-Allow-Origin"), "https://app.cyphrmessenger.app")
        self.assertEqual(response.header("Vary"), "Origin")

    async def test_other_origin(self) -> None:
        """Another origin gets no CORS headers, so browsers keep the answer from it."""
        response = await self.http.get("/api/items/1", headers={b"Origin": [b"https://evil.example"]})
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.header("Access-Control-Allow-Origin"))

    async def test_preflight_allowed(self) -> None:
        """A preflight from a configured origin is 204 with the allowed methods and headers."""
        response = await self.http.request("OPTIONS", "/api/echo", headers={
            b"Origin": [b"http://localhost:5173"],
            b"Access-Control-Request-Method": [b"POST"],
            b"Access-Control-Request-Headers": [b"content-type, authorization"]})
        self.assertEqual(response.code, 204)
        self.assertEqual(response.header("Access-Control-Allow-Origin"), "http://localhost:5173")
        self.assertEqual(response.header("Access-Control-Allow-Methods"),
                         "GET, POST, PUT, PATCH, DELETE, HEAD")
        self.assertEqual(response.header("Access-Control-Allow-Headers"), "Content-Type, Authorization, Range, If-Range, Tus-Resumable,"
                         " Upload-Length, Upload-Offset")
        self.assertEqual(self.api.bodies, [])

    async def test_preflight_refused(self) -> None:
        """A preflight from another origin is 403 CORS_ORIGIN_DENIED."""
        response = await self.http.request("OPTIONS", "/api/echo", headers={
            b"Origin": [b"https://evil.example"], b"Access-Control-Request-Method": [b"POST"]})
        self.assertEqual(response.code, 403)
        self.assertEqual(response.json()["code"], "CORS_ORIGIN_DENIED")
        self.assertIsNone(response.header("Access-Control-Allow-Methods"))

    async def test_plain_options_is_405(self) -> None:
        """OPTIONS without preflight headers is an ordinary request: 405 here."""
        response = await self.http.request("OPTIONS", "/api/echo")
        self.assertEqual(response.code, 405)

    async def test_configured_origins_replace_defaults(self) -> None:
        """--cors-origin replaces the default origins."""
        self.http = InProcessHTTP(*make_site(self, cors_origin=("https://chat.example.org",))[1:])
        allowed = await self.http.get("/api/items/1", headers={b"Origin": [b"https://chat.example.org"]})
        default = await self.http.get("/api/items/1", headers={b"Origin": [b"http://localhost:5173"]})
        self.assertEqual(allowed.header("Access-Control-Allow-Origin"), "https://chat.example.org")
        self.assertIsNone(default.header("Access-Control-Allow-Origin"))


def _request_from(peer: str, headers: dict[bytes, bytes]) -> DummyRequest:
    from twisted.internet.address import IPv4Address, IPv6Address

    request = DummyRequest([b""])
    address_type = IPv6Address if ":" in peer else IPv4Address
    request.client = address_type("TCP", peer, 40000)
    for name, value in headers.items():
        request.requestHeaders.addRawHeader(name, value)
    return request


class ClientAddressTests(TestCase):
    def policy(self, *trusted: str) -> HttpPolicy:
        return HttpPolicy.from_config(make_config(self, trusted_proxy=trusted))

    def test_untrusted_peer_headers_ignored(self) -> None:
        """Without trusted proxies, X-Forwarded-For and X-Real-IP are ignored."""
        request = _request_from("203.0.113.9", {b"X-Forwarded-For": b"1.2.3.4", b"X-Real-IP": b"5.6.7.8"})
        self.assertEqual(self.policy().client_ip(request), "203.0.113.9")

    def test_peer_not_in_trusted_network(self) -> None:
        """A peer outside the trusted networks cannot speak for others."""
        request = _request_from("203.0.113.9", {b"X-Forwarded-For": b"1.2.3.4"})
        self.assertEqual(self.policy("10.0.0.0/8").client_ip(request), "203.0.113.9")

    def test_trusted_proxy_forwarded_for(self) -> None:
        """Behind a trusted proxy, the rightmost untrusted X-Forwarded-For entry is the client."""
        request = _request_from("10.0.0.5", {b"X-Forwarded-For": b"6.6.6.6, 198.51.100.7, 10.0.0.9"})
        self.assertEqual(self.policy("10.0.0.0/8").client_ip(request), "198.51.100.7")

    def test_trusted_proxy_real_ip(self) -> None:
        """Without X-Forwarded-For, X-Real-IP from a trusted proxy is believed."""
        request = _request_from("127.0.0.1", {b"X-Real-IP": b"198.51.100.8"})
        self.assertEqual(self.policy("127.0.0.1").client_ip(request), "198.51.100.8")

    def test_garbage_forwarded_for(self) -> None:
        """A malformed entry stops the walk: nothing left of it is believed."""
        request = _request_from("127.0.0.1", {b"X-Forwarded-For": b"1.2.3.4, not-an-ip"})
        self.assertEqual(self.policy("127.0.0.1").client_ip(request), "127.0.0.1")

    def test_ipv6_peer(self) -> None:
        """IPv6 peers and networks work the same way."""
        request = _request_from("::1", {b"X-Forwarded-For": b"2001:db8::5"})
        self.assertEqual(self.policy("::1").client_ip(request), "2001:db8::5")

    async def test_client_ip_reaches_routes(self) -> None:
        """Routes see the client address the policy decided on."""
        api, root, policy = make_site(self)
        http = InProcessHTTP(root, policy)
        response = await http.get("/api/client", headers={b"X-Forwarded-For": [b"1.2.3.4"]})
        self.assertEqual(response.json()["clientIp"], "127.0.0.1")


class AccessLogTests(TestCase):
    def capture(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    async def test_off_by_default(self) -> None:
        """No request is logged unless access logging is on."""
        events = self.capture()
        api, root, policy = make_site(self)
        await InProcessHTTP(root, policy).get("/api/items/1")
        self.assertEqual([e for e in events if e.get("log_namespace") == "cyphr.api.http"], [])

    async def test_on(self) -> None:
        """With --access-log, each request is logged with its client, method, path and status."""
        events = self.capture()
        api, root, policy = make_site(self, access_log=True)
        await InProcessHTTP(root, policy).get("/api/items/1?secret=no")
        logged = [e for e in events if e.get("log_namespace") == "cyphr.api.http"]
        self.assertEqual(len(logged), 1)
        self.assertEqual((logged[0]["client"], logged[0]["method"], logged[0]["path"], logged[0]["code"]),
                         ("127.0.0.1", "GET", "/api/items/1", 200))


class _OverSocket:
    """A site with a 1 KiB body limit on a real port, and raw exchanges with it."""

    async def setUp(self) -> None:
        self.api, root, policy = make_site(self, max_body=1024)
        site = CyphrSite(root, policy, reactor)
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(self.port.stopListening)

    def exchange(self, data: bytes) -> Deferred[bytes]:
        port = self.port.getHost().port

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(data)
                received = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return received
                    received += chunk

        return deferToThread(talk)


class BodyLimitOverSocketTests(_OverSocket, TestCase):
    """The body limit, over a real socket, since it acts before the body is read."""

    async def test_declared_length_over_limit(self) -> None:
        """A Content-Length over the limit is 413 at once and the connection
        closes, although the body was never sent."""
        answer_bytes = await self.exchange(
            b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 104857600\r\n\r\n")
        self.assertTrue(answer_bytes.startswith(b"HTTP/1.1 413 "), answer_bytes[:80])
        self.assertIn(b'"code":"PAYLOAD_TOO_LARGE"', answer_bytes)
        self.assertIn(b"X-Content-Type-Options: nosniff", answer_bytes)
        self.assertEqual(self.api.bodies, [])

    async def test_chunked_body_over_limit(self) -> None:
        """A chunked body is counted as it arrives and refused once it passes the limit."""
        chunk = b"x" * 600
        request = (b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
        request += (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n"
        answer_bytes = await self.exchange(request)
        self.assertTrue(answer_bytes.startswith(b"HTTP/1.1 413 "), answer_bytes[:80])
        self.assertEqual(self.api.bodies, [])

    async def test_small_body_still_works(self) -> None:
        """Below the limit the same socket path answers normally."""
        body = b'{"a": 1}'
        answer_bytes = await self.exchange(
            b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        self.assertTrue(answer_bytes.startswith(b"HTTP/1.1 200 "), answer_bytes[:80])
        self.assertEqual(self.api.bodies, [{"a": 1}])


class ConfigReuseTests(TestCase):
    def test_with_config(self) -> None:
        """Policies follow the configuration they are made from."""
        config = with_config(make_config(self), max_body=2048, access_log=True)
        policy = HttpPolicy.from_config(config)
        self.assertEqual((policy.max_body, policy.access_log), (2048, True))


class GoneClientTests(_OverSocket, TestCase):
    async def test_route_finishes_after_client_leaves(self) -> None:
        """A route whose client disconnects runs to its end; its answer is dropped quietly."""
        port = self.port.getHost().port
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"GET /api/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await self.api.slow_started
        client.close()
        await deferLater(reactor, 0.05, lambda: None)  # the server sees the close
        self.api.slow_release.callback(None)
        self.assertTrue(self.api.slow_finished)
        self.assertEqual(self.flushLoggedErrors(), [])


class ExpectContinueTests(_OverSocket, TestCase):
    """The same limits for clients that wait for 100 Continue (curl does, for large bodies)."""

    async def test_no_continue_for_refused_body(self) -> None:
        """A refused body is not invited with 100 Continue: the answer is the 413 alone."""
        answer_bytes = await self.exchange(
            b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
        self.assertTrue(answer_bytes.startswith(b"HTTP/1.1 413 "), answer_bytes[:80])
        self.assertNotIn(b"100 Continue", answer_bytes)
        self.assertTrue(answer_bytes.endswith(b"}"), answer_bytes[-40:])
