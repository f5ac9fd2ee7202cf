"""
The AsyncAPI 3.0 document that the server serves (cyphr/api/asyncapi.json)
as reStructuredText: the document's description, its servers and channel,
then every Socket.IO event in the document's order, those a client emits
(with their payload, their ack and the ack's error codes) and those the
server sends, then the named schemas. The same document gives the same
text, byte for byte.
"""

from __future__ import annotations

from typing import Any

from rst_text import escape, indented, inline, label, literal, markdown, target_name, title
from schema_text import block, schema_linker, summary

# AsyncAPI's "action" is the application's (the server's) point of view.
DIRECTIONS = {
    "receive": ("Events a client emits", "client to server: the client emits it", "emit"),
    "send": ("Events the server sends", "server to client: the server emits it", "on"),
}


def event_label(action: str, event: str) -> str:
    """The label (and the HTML anchor) of an event's section."""
    return target_name("asyncapi", DIRECTIONS[action][2], event)


def schema_label(name: str) -> str:
    return target_name("asyncapi", "schema", name)


_link = schema_linker(schema_label)


def _resolve(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` (JSON pointers within the document) until a real object."""
    while "$ref" in item:
        node: Any = document
        for part in item["$ref"].lstrip("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        item = node
    return item


def events(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (action, event name, operation) of the document, in its order."""
    found = []
    for operation in document["operations"].values():
        message = _resolve(document, operation["messages"][0])
        found.append((operation["action"], message.get("name") or operation["title"], operation))
    return found


def _ack(document: dict[str, Any], reply: dict[str, Any]) -> list[str]:
    lines = [".. rubric:: Ack", ""]
    for ref in reply.get("messages", []):
        message = _resolve(document, ref)
        lines += markdown(message.get("description"))
        payload = message.get("payload", {})
        options = payload.get("oneOf", [])
        failure = next((option for option in options if "allOf" in option), None)
        if failure is None:
            lines += block(payload, _link)
            continue
        # The usual shape: a success object, or the shared Error with the codes of this event.
        for option in options:
            if option is failure:
                codes = failure.get("properties", {}).get("code", {}).get("enum", [])
                base = ", ".join(summary(part, _link) for part in failure["allOf"])
                lines += [f"On failure: {base}, ``code`` one of:", ""]
                lines += [", ".join(literal(code) for code in codes) + ".", ""]
            else:
                lines += ["On success:", ""] + indented(block(option, _link), 2)
    return lines


def _event(document: dict[str, Any], action: str, name: str, operation: dict[str, Any]) -> list[str]:
    message = _resolve(document, operation["messages"][0])
    lines = label(event_label(action, name)) + title(name, "-")
    if operation.get("summary"):
        lines += [f"**{inline(operation['summary'])}**", ""]
    lines += markdown(message.get("description"))
    reply = operation.get("reply")
    lines += [f":Direction: {DIRECTIONS[action][1]}",
              ":Ack: " + ("answered when the event carries an ack id (below)" if reply
                          else "none: the event carries no ack id"), ""]
    lines += [".. rubric:: Payload", ""] + block(message.get("payload", {}), _link)
    if reply:
        lines += _ack(document, reply)
    return lines


def render(document: dict[str, Any]) -> list[str]:
    """The whole reference, as lines of reStructuredText whose sections
    start one level below the page's title."""
    info = document["info"]
    lines = markdown(info.get("description"))
    lines += [f"Version {escape(str(info['version']))} of the document, "
              f"AsyncAPI {escape(document['asyncapi'])}.", ""]
    lines += title("Servers and channel", "=")
    for name, server in document.get("servers", {}).items():
        lines += [f"- {literal(name)}: {literal(server['protocol'] + '://' + server['host'] + server.get('pathname', ''))}"
                  f". {inline(server.get('description', ''))}", ""]
    for name, channel in document.get("channels", {}).items():
        lines += [f"- Channel {literal(name)}, namespace {literal(channel.get('address') or '/')}: "
                  f"{inline(channel.get('description', ''))}", ""]
    for action, (heading, _, _) in DIRECTIONS.items():
        lines += title(heading, "=")
        for event_action, name, operation in events(document):
            if event_action == action:
                lines += _event(document, action, name, operation)
    lines += title("Schemas", "=")
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        lines += label(schema_label(name)) + title(name, "-") + block(schema, _link)
    return lines
