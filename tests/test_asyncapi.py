"""
The AsyncAPI document (cyphr/api/asyncapi.json): valid AsyncAPI 3.0, served
as it is at GET /api/asyncapi.json, and exact: the events the server handles
and the events it sends are the documented ones, and what a stock client
sees on the wire (events and acks, with their error codes) fits the payload
schemas of the document.
"""

from __future__ import annotations

import ast
import configparser
import copy
import json
import os
import uuid
from typing import Any, Iterator

from jsonschema import Draft7Validator
from referencing import Registry
from referencing.jsonschema import DRAFT7
from twisted.trial.unittest import SynchronousTestCase, TestCase

import cyphr
import cyphr.errors
from cyphr.api.operations import asyncapi_document
from cyphr.realtime import client_events, events
from cyphr.realtime.client_events import SENT_EVENTS
from tests.helpers import InProcessHTTP, SQLiteMixin, start_server
from tests.test_realtime_events import RealtimeBase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The JSON schema of AsyncAPI 3.0.0 documents (tests/asyncapi/README).
SCHEMA = os.path.join(ROOT, "tests", "asyncapi", "asyncapi-3.0.0.schema.json")
DOCUMENT_URI = "urn:cyphr:asyncapi"
# Codes the Socket.IO layer answers with that no REST route does.
REALTIME_ONLY_CODES = {"UNKNOWN_EVENT"}
# Calls in cyphr/realtime/events.py and client_events.py that name an event among their arguments.
EMITTING_CALLS = {"emit", "emit_with_ack", "emit_here", "to_rooms", "to_users", "_relay",
                  "_announce", "_tell", "_frames", "encode_event_json"}


def document() -> dict[str, Any]:
    return json.loads(asyncapi_document())


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Where ``doc`` breaks the AsyncAPI 3.0 JSON schema (empty: valid)."""
    with open(SCHEMA) as f:
        validator = Draft7Validator(json.load(f))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _values(node: Any, wanted: str) -> Iterator[Any]:
    """Every value under the key ``wanted``, anywhere in ``node`` (not
    looking inside those values)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == wanted:
                yield value
            else:
                yield from _values(value, wanted)
    elif isinstance(node, list):
        for item in node:
            yield from _values(item, wanted)


def documented(doc: dict[str, Any], action: str) -> set[str]:
    """The event names of the operations with ``action``: "receive" (the
    server handles them) or "send" (the server sends them)."""
    names = set()
    for operation in doc["operations"].values():
        if operation["action"] == action:
            for ref in operation["messages"]:
                names.add(_resolve(doc, _resolve(doc, ref["$ref"])["$ref"])["name"])
    return names


def event_mismatch(doc: dict[str, Any], handled: set[str], sent: set[str]) -> list[str]:
    """What differs between the server's events and the document's: empty
    when the document describes exactly the events handled and sent."""
    problems = []
    for what, action, actual in (("handles", "receive", handled), ("sends", "send", sent)):
        listed = documented(doc, action)
        problems += [f"the server {what} {name!r}, which the document lacks"
                     for name in sorted(actual - listed)]
        problems += [f"the document says the server {what} {name!r}, which it does not"
                     for name in sorted(listed - actual)]
    return problems


def emitted_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal passed to a call that emits an
    event, in ``source``: event names must come from client_events.Sent."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in EMITTING_CALLS:
                found += [(arg.lineno, arg.value) for arg in node.args
                          if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    return found


def message_key(doc: dict[str, Any], action: str, event: str, reply: bool = False) -> str:
    """The components/messages key of ``event`` in the operation with
    ``action`` (its request, or with ``reply`` its ack)."""
    for operation in doc["operations"].values():
        if operation["action"] != action:
            continue
        refs = operation["reply"]["messages"] if reply else operation["messages"]
        for ref in refs:
            target = _resolve(doc, ref["$ref"])["$ref"]
            if _resolve(doc, target)["name"] == event:
                return target.rsplit("/", 1)[1]
    raise KeyError(f"{action} {event}")


class PayloadChecker:
    """Validates values against the payload schemas of the document, with
    its ``$ref``s resolved within it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry = Registry().with_resource(DOCUMENT_URI, DRAFT7.create_resource(doc))

    def errors(self, key: str, value: Any) -> list[str]:
        schema = {"$ref": f"{DOCUMENT_URI}#/components/messages/{key}/payload"}
        validator = Draft7Validator(schema, registry=self.registry)
        return [f"{key} {'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(value)]


class AsyncAPIDocumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.doc = document()

    def test_document_is_valid_asyncapi_30(self) -> None:
        """The document validates against the AsyncAPI 3.0.0 JSON schema."""
        self.assertEqual(self.doc["asyncapi"], "3.0.0")
        self.assertEqual(schema_errors(self.doc), [])

    def test_schema_check_catches_a_broken_document(self) -> None:
        """The schema check is not vacuous: an operation with an action
        AsyncAPI does not know, or a payload that is no JSON schema, fails."""
        broken = copy.deepcopy(self.doc)
        next(iter(broken["operations"].values()))["action"] = "publish"
        self.assertNotEqual(schema_errors(broken), [])
        broken = copy.deepcopy(self.doc)
        next(iter(broken["components"]["messages"].values()))["payload"] = {"type": "text"}
        self.assertNotEqual(schema_errors(broken), [])

    def test_every_reference_resolves(self) -> None:
        """Every ``$ref`` in the document names something in it, and every
        reply's messages are messages of the reply's channel."""
        for ref in set(_values(self.doc, "$ref")):
            try:
                _resolve(self.doc, ref)
            except (KeyError, AssertionError):
                self.fail(f"unresolved $ref {ref}")
        for name, operation in self.doc["operations"].items():
            channel = _resolve(self.doc, operation["channel"]["$ref"])
            for key in ("messages",) + (("reply",) if "reply" in operation else ()):
                refs = operation[key]["messages"] if key == "reply" else operation[key]
                for ref in refs:
                    self.assertIn(ref["$ref"].rsplit("/", 1)[1], channel["messages"], name)

    def test_version(self) -> None:
        """The document's version is the package's (update info.version with cyphr.__version__)."""
        self.assertEqual(self.doc["info"]["version"], cyphr.__version__)

    def test_sent_events_documented(self) -> None:
        """The events the server sends (client_events.Sent) are exactly the send
        operations of the document."""
        self.assertEqual(len(SENT_EVENTS), 14)
        self.assertEqual(documented(self.doc, "send"), set(SENT_EVENTS))

    def test_events_named_only_through_the_registry(self) -> None:
        """cyphr/realtime/events.py and client_events.py pass no event name as
        a string literal to a call that emits: each comes from Sent, which the document
        is checked against. The scan finds such a literal where there is one."""
        for module in (events, client_events):
            with open(module.__file__) as f:
                self.assertEqual(emitted_literals(f.read()), [], module.__name__)
        self.assertEqual(emitted_literals('socket.emit("surprise", {})\nx.to_users(u, "boo", {})'),
                         [(1, "surprise"), (2, "boo")])

    def test_error_codes_exist(self) -> None:
        """Every error code an ack is documented to carry is one the server
        has (cyphr.errors), and every ack lists RATE_LIMITED and
        INTERNAL_ERROR, which any event may meet."""
        known = {value for name, value in vars(cyphr.errors).items()
                 if name.isupper() and isinstance(value, str)} | REALTIME_ONLY_CODES
        acks = [(key, message) for key, message in self.doc["components"]["messages"].items()
                if key.endswith("_ack")]
        self.assertEqual(len(acks), len(documented(self.doc, "receive")))
        for key, message in acks:
            [_, error] = message["payload"]["oneOf"]
            codes = set(error["properties"]["code"]["enum"])
            self.assertEqual(codes - known, set(), key)
            self.assertTrue({"RATE_LIMITED", "INTERNAL_ERROR"} <= codes, key)

    def test_user_id_is_a_cyphr_id(self) -> None:
        """Every ``userId`` in the document is a Cyphr ID, and the document
        says so."""
        found = list(_values(self.doc["components"]["messages"], "userId"))
        self.assertTrue(len(found) >= 6, found)
        for schema in found:
            self.assertIn("#/components/schemas/CyphrId", json.dumps(schema))
        self.assertIn("`userId` holds a Cyphr ID", self.doc["info"]["description"])

    def test_protocol_versions(self) -> None:
        """The document, the OpenAPI document and the README name the same
        protocols: Socket.IO v5 over Engine.IO v4."""
        from cyphr.api.operations import openapi_document

        openapi = json.loads(openapi_document())["info"]["description"]
        with open(os.path.join(ROOT, "README.rst")) as f:
            readme = f.read()
        self.assertIn("Socket.IO protocol v5 over the Engine.IO protocol v4", self.doc["info"]["description"])
        self.assertIn("Socket.IO protocol v5 over the Engine.IO protocol v4", openapi)
        self.assertIn("Socket.IO v5 over Engine.IO v4", readme)
        self.assertNotIn("Socket.IO v4", openapi)

    def test_shipped_in_the_package(self) -> None:
        """setup.cfg puts the document into the installed package."""
        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        self.assertIn("asyncapi.json", parser["options.package_data"]["cyphr.api"])

    def test_no_reference_to_a_missing_document(self) -> None:
        """Neither the README nor any module sends its reader to API.md,
        which is not in the repository."""
        offenders = []
        paths = [os.path.join(ROOT, "README.rst")]
        for folder, _, files in os.walk(os.path.join(ROOT, "cyphr")):
            paths += [os.path.join(folder, name) for name in files if name.endswith(".py")]
        for path in paths:
            with open(path, encoding="utf-8") as f:
                if "API.md" in f.read():
                    offenders.append(os.path.relpath(path, ROOT))
        self.assertEqual(offenders, [])


class AsyncAPIServerTests(SQLiteMixin, TestCase):
    async def test_handled_events_documented(self) -> None:
        """The events a built server's namespace handles are exactly the
        receive operations of the document, and the check reports an event
        the document lacks."""
        server = await start_server(self, inline=True)
        handled = set(server.realtime.ns.handlers)
        self.assertIn("send_message", handled)
        doc = document()
        self.assertEqual(event_mismatch(doc, handled, set(SENT_EVENTS)), [])
        # Without the typing operation, the check says what is missing.
        lacking = copy.deepcopy(doc)
        del lacking["operations"]["typing"]
        self.assertEqual(event_mismatch(lacking, handled, set(SENT_EVENTS)),
                         ["the server handles 'typing', which the document lacks"])
        lacking = copy.deepcopy(doc)
        del lacking["operations"]["onUserTyping"]
        self.assertEqual(event_mismatch(lacking, handled, set(SENT_EVENTS)),
                         ["the server sends 'user_typing', which the document lacks"])

    async def test_served_document_equals_the_file(self) -> None:
        """GET /api/asyncapi.json needs no token and answers the file's bytes as JSON."""
        server = await start_server(self, inline=True)
        response = await InProcessHTTP.for_server(server).get("/api/asyncapi.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header("Content-Type"), "application/json; charset=utf-8")
        with open(os.path.join(ROOT, "cyphr", "api", "asyncapi.json"), "rb") as f:
            self.assertEqual(response.body, f.read())
        self.assertEqual(response.json(), document())


class AsyncAPIWireTests(RealtimeBase, SQLiteMixin, TestCase):
    """What the stock client sees, checked against the document."""

    async def low_session_prekeys(self, owner: Any, claimer: Any) -> None:
        """``owner`` publishes session keys with one one-time prekey of each
        kind, and ``claimer`` takes it: the device is left with none."""
        from tests.test_session_keys import Keys

        response = await self.http.put("/api/sessions/keys", Keys(owner).full(1, 1),
                                       headers=owner.auth())
        assert response.code == 200, response.body
        claimed = await self.http.post(f"/api/sessions/bundles/{owner.cyphr_id}",
                                       headers=claimer.auth())
        assert claimed.code == 200, claimed.body

    async def test_traffic_fits_the_document(self) -> None:
        """Every event a client emits here and the server accepts fits its
        documented payload; every ack (successes and refusals) fits its documented ack, with a
        documented error code; every event the server sends (all fourteen are
        seen) fits its documented payload."""
        doc = document()
        check = PayloadChecker(doc)
        await self.serve()
        alice, bob = await self.user("alice"), await self.user("bob")
        chat_id = await self.direct_chat(alice, bob)
        acks: list[tuple[str, Any, Any]] = []

        async def call(client: Any, event: str, data: Any) -> Any:
            answer = await client.call(event, data)
            acks.append((event, data, answer))
            return answer

        a = await self.connect(alice)
        b = await self.connect(None)
        ack = await call(b, "authenticate", {"token": bob.token})
        self.assertTrue(ack["success"], ack)
        await b.wait_for("sync_complete")
        await a.wait_for("user_online")
        sent = await call(a, "send_message", {"chatId": chat_id, "encryptedPayload": {"ct": "AA"},
                                              "clientMessageId": "c-1", "messageType": "text"})
        self.assertTrue(sent["success"], sent)
        await b.wait_for("new_message", 2)  # the catch-up's, then this one
        await call(b, "message_delivered", {"messageId": sent["messageId"], "chatId": chat_id})
        await a.wait_for("message_delivered")
        await call(b, "message_read", {"chatId": chat_id, "upToSeq": 1})
        await call(b, "message_read", {"messageId": sent["messageId"]})
        await a.wait_for("message_read", 2)
        await call(a, "typing", {"chatId": chat_id, "isTyping": True})
        await b.wait_for("user_typing")
        await call(a, "join_chat", {"chatId": chat_id})
        await call(a, "call_offer", {"callId": "k1", "to": "bob", "offer": {"sdp": "o"},
                                     "callType": "audio"})
        await b.wait_for("incoming_call")
        await call(b, "call_answer", {"callId": "k1", "to": "alice", "answer": {"sdp": "a"}})
        await a.wait_for("call_answer")
        await call(a, "call_ice_candidate", {"callId": "k1", "to": "bob", "candidate": {"c": 1}})
        await b.wait_for("call_ice_candidate")
        await call(b, "call_end", {"callId": "k1", "to": "alice", "reason": "hung up"})
        await a.wait_for("call_end")
        # Alice adds a device: her contact hears of it.
        recovered = await alice.recover(self.http, "ab" * 32, keepOtherDevices=True)
        self.assertEqual(recovered.code, 200, recovered.body)
        await b.wait_for("devices_changed")
        # Bob's device runs out of one-time session prekeys: his socket hears.
        await self.low_session_prekeys(bob, alice)
        await b.wait_for("session_prekeys_low")
        # Refusals: each answered with a documented code.
        for event, data in [
            ("send_message", {"recipientId": "nobody_here", "encryptedPayload": {}}),
            ("send_message", {"chatId": chat_id}),
            ("message_delivered", {"messageId": str(uuid.uuid4())}),
            ("message_read", {"chatId": str(uuid.uuid4()), "upToSeq": 1}),
            ("typing", {"chatId": str(uuid.uuid4())}),
            ("join_chat", {"chatId": "not-a-uuid"}),
            ("call_offer", {"callId": "k2", "to": "nobody_here", "offer": {}}),
            ("call_end", {"callId": "k2"}),
        ]:
            answer = await call(a, event, data)
            self.assertFalse(answer["success"], (event, answer))
        refused = await self.connect(None)
        answer = await refused.call("typing", {"chatId": chat_id})
        acks.append(("typing", {"chatId": chat_id}, answer))
        self.assertEqual(answer["code"], "UNAUTHORIZED")
        await b.disconnect()
        await a.wait_for("user_offline")
        await a.barrier()

        problems = []
        for event, data, answer in acks:
            if answer["success"]:
                problems += check.errors(message_key(doc, "receive", event), data)
            problems += check.errors(message_key(doc, "receive", event, reply=True), answer)
        received = a.received + b.received
        for event, data in received:
            problems += check.errors(message_key(doc, "send", event), data)
        self.assertEqual(problems, [])
        self.assertEqual({event for event, _ in received}, set(SENT_EVENTS))
        # A value the schema forbids is caught: the check can fail.
        self.assertNotEqual(check.errors(message_key(doc, "send", "user_typing"),
                                         {"chatId": chat_id, "userId": "x", "isTyping": True}), [])
