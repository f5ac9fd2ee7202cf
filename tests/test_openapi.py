"""
The OpenAPI document (cyphr/api/openapi.json): valid OpenAPI 3.1, served
as it is at GET /api/openapi.json, and complete: every route the server
dispatches is in it and it names no route the server lacks.
"""

from __future__ import annotations

import configparser
import json
import os
import re

from openapi_spec_validator import OpenAPIV31SpecValidator
from twisted.trial.unittest import TestCase

import cyphr
from cyphr.api.guard import ACCESS_ATTRIBUTE
from cyphr.api.operations import openapi_document
from tests.helpers import InProcessHTTP, SQLiteMixin, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Werkzeug answers HEAD for every GET route on its own: the document may
# describe it (a route that answers HEAD its own way, as TUS's on
# /api/attachments/<id>), and need not. OPTIONS is an operation only where
# a route declares it (TUS discovery on /api/attachments/): werkzeug adds
# none, and the CORS preflight is answered before routing.
IMPLICIT_METHODS = {"HEAD"}
# Answers that have no body.
BODILESS = {"204", "304"}
_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def openapi_path(rule: str) -> str:
    """A werkzeug rule as an OpenAPI path: ``/a/<cyphr_id>`` and
    ``/a/<string:cyphr_id>`` are ``/a/{cyphrId}`` (the document names
    parameters in the API's camelCase)."""
    return _ARGUMENT.sub(lambda m: "{" + _camel(m.group(1)) + "}", rule)


class _PublicResource:
    pass


setattr(_PublicResource, ACCESS_ATTRIBUTE, "public")


def document() -> dict:
    return json.loads(openapi_document())


class OpenAPIDocumentTests(SQLiteMixin, TestCase):
    async def setUp(self) -> None:
        self.server = await start_server(self)
        self.doc = document()

    def routes(self) -> dict[tuple[str, str], object]:
        """(path, METHOD) of every route the server dispatches, with its endpoint."""
        found = {}
        for api in self.server.root._router.apis:
            for rule in api.app.url_map.iter_rules():
                for method in set(rule.methods or ()) - IMPLICIT_METHODS:
                    found[(openapi_path(rule.rule), method)] = api.app.endpoints[rule.endpoint]
        # /metrics is a resource of its own beside the routes (so that
        # --metrics-listen can move it), public on the endpoints serving it.
        self.assertIsNotNone(self.server.root._metrics)
        found[("/metrics", "GET")] = _PublicResource()
        return found

    def operations(self) -> dict[tuple[str, str], dict]:
        return {(path, method.upper()): operation
                for path, item in self.doc["paths"].items()
                for method, operation in item.items() if method in HTTP_METHODS}

    def test_rule_conversion(self) -> None:
        """Werkzeug rules become OpenAPI paths with camelCase parameter names."""
        self.assertEqual(openapi_path("/api/chats/<chat_id>/members/<string:cyphr_id>/role"),
                         "/api/chats/{chatId}/members/{cyphrId}/role")
        self.assertEqual(openapi_path("/health"), "/health")

    def test_every_route_documented(self) -> None:
        """The routes of the server and the operations of the document are the same set."""
        routes, operations = set(self.routes()), set(self.operations())
        undocumented = sorted(routes - operations)
        heads = {(path, "HEAD") for path, method in routes if method == "GET"}
        unknown = sorted(operations - routes - heads)
        self.assertTrue(len(routes) > 30, routes)
        self.assertEqual(
            (undocumented, unknown), ([], []),
            "routes missing from cyphr/api/openapi.json: "
            + ", ".join(f"{m} {p}" for p, m in undocumented)
            + "; operations in the document the server lacks: "
            + ", ".join(f"{m} {p}" for p, m in unknown))

    def test_document_is_valid_openapi_31(self) -> None:
        """The document validates against the OpenAPI 3.1 schema."""
        self.assertEqual(self.doc["openapi"], "3.1.0")
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in OpenAPIV31SpecValidator(self.doc).iter_errors()]
        self.assertEqual(errors, [])

    def test_version(self) -> None:
        """The document's version is the package's (update info.version with cyphr.__version__)."""
        self.assertEqual(self.doc["info"]["version"], cyphr.__version__)

    def test_operations_complete(self) -> None:
        """Every operation has a unique operationId, a summary, a success answer, a schema for
        every body (none for 204, 304 and HEAD), the error shape for every failure, and the
        security its route enforces."""
        ids = [op["operationId"] for op in self.operations().values()]
        self.assertEqual(len(ids), len(set(ids)))
        routes = self.routes()
        for (path, method), op in self.operations().items():
            where = f"{method} {path}"
            self.assertTrue(op.get("summary"), where)
            answers = op["responses"]
            self.assertTrue([code for code in answers if code.startswith("2")], where)
            for code, answer in answers.items():
                if "$ref" in answer:
                    answer = self.doc["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
                content = answer.get("content", {})
                if code in BODILESS or method == "HEAD":
                    self.assertEqual(content, {}, f"{where} {code}")
                    continue
                self.assertTrue(content, f"{where} {code}")
                for media in content.values():
                    self.assertIn("schema", media, f"{where} {code}")
            access = getattr(routes.get((path, method)) or routes[(path, "GET")], ACCESS_ATTRIBUTE)
            security = op.get("security", self.doc.get("security"))
            expected = {"authenticated": [{"bearerAuth": []}], "public": [],
                        "operator": [{"adminToken": []}]}[access]
            self.assertEqual(security, expected, where)
            if access != "public":
                self.assertIn("401", answers, where)
            # A POST without a body (TUS creation) has no content type to refuse.
            if method in ("POST", "PUT") or "requestBody" in op:
                for code in ("400", "413") + (("415",) if "requestBody" in op else ()):
                    self.assertIn(code, answers, where)
            names = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
            self.assertEqual(names, set(re.findall(r"{(\w+)}", path)), where)

    async def test_served_document_equals_the_file(self) -> None:
        """GET /api/openapi.json needs no token and answers the file's bytes as JSON."""
        http = InProcessHTTP.for_server(self.server)
        response = await http.get("/api/openapi.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header("Content-Type"), "application/json; charset=utf-8")
        with open(os.path.join(ROOT, "cyphr", "api", "openapi.json"), "rb") as f:
            self.assertEqual(response.body, f.read())
        self.assertEqual(response.json(), self.doc)

    def test_shipped_in_the_package(self) -> None:
        """setup.cfg puts the document into the installed package."""
        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        self.assertIn("openapi.json", parser["options.package_data"]["cyphr.api"])
