"""
The OpenAPI 3.1 document that the server serves (cyphr/api/openapi.json)
as reStructuredText: the API's description, its authentication schemes,
then each operation under its tag, in the document's order (method and
path, parameters, request body, every answer with its error codes), then
the named schemas. The same document gives the same text, byte for byte.
"""

from __future__ import annotations

from typing import Any

from rst_text import escape, indented, inline, label, literal, markdown, target_name, title
from schema_text import block, schema_linker, summary

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def operation_label(operation_id: str) -> str:
    """The label (and the HTML anchor) of an operation's section."""
    return target_name("openapi", "op", operation_id)


def schema_label(name: str) -> str:
    return target_name("openapi", "schema", name)


_link = schema_linker(schema_label)


def _resolve(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """A component (``#/components/responses/X``) in place of its ``$ref``."""
    ref = item.get("$ref")
    if ref is None:
        return item
    node: Any = document
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (method, path, operation) of the document, in its order."""
    return [(method, path, item[method])
            for path, item in document["paths"].items() for method in METHODS if method in item]


def _security(document: dict[str, Any], operation: dict[str, Any]) -> str:
    requirements = operation.get("security", document.get("security", []))
    names = [name for requirement in requirements for name in requirement]
    if not names:
        return "none"
    return ", ".join(f"{literal(name)} ({inline(document['components']['securitySchemes'][name].get('description', ''))})"
                     for name in names)


def _parameters(operation: dict[str, Any]) -> list[str]:
    lines = [".. rubric:: Parameters", ""]
    for parameter in operation["parameters"]:
        required = "required" if parameter.get("required") else "optional"
        line = (f"- {literal(parameter['name'])} ({escape(parameter['in'])}, {required}): "
                f"{summary(parameter.get('schema', {}), _link)}")
        if parameter.get("description"):
            line += f". {inline(parameter['description'])}"
        lines += [line, ""]
    return lines


def _content(content: dict[str, Any]) -> list[str]:
    """Each media type and its schema: on one line when the schema is one
    sentence (a named schema), else as a term and its description."""
    lines: list[str] = []
    for media_type, media in content.items():
        text = block(media.get("schema", {}), _link)
        if len(text) == 2:
            lines += [f"{literal(media_type)}: {text[0]}", ""]
        else:
            lines += [literal(media_type)] + indented(text, 4)
    return lines


def _request_body(document: dict[str, Any], operation: dict[str, Any]) -> list[str]:
    body = _resolve(document, operation["requestBody"])
    lines = [".. rubric:: Request body" + ("" if body.get("required") else " (optional)"), ""]
    return lines + markdown(body.get("description")) + _content(body.get("content", {}))


def _responses(document: dict[str, Any], operation: dict[str, Any]) -> list[str]:
    lines = [".. rubric:: Answers", ""]
    for status, response in operation["responses"].items():
        response = _resolve(document, response)
        body = markdown(response.get("description"))
        for name, header in response.get("headers", {}).items():
            header = _resolve(document, header)
            body += [f"Header {literal(name)}: {summary(header.get('schema', {}), _link)}. "
                     f"{inline(header.get('description', ''))}", ""]
        body += _content(response.get("content", {}))
        lines += [literal(str(status))] + indented(body, 4)
    return lines


def _operation(document: dict[str, Any], method: str, path: str, operation: dict[str, Any]) -> list[str]:
    lines = label(operation_label(operation["operationId"]))
    lines += title(f"{method.upper()} {path}", "-")
    if operation.get("summary"):
        lines += [f"**{inline(operation['summary'])}**", ""]
    lines += markdown(operation.get("description"))
    lines += [f":Operation: {literal(operation['operationId'])}",
              f":Authentication: {_security(document, operation)}", ""]
    if operation.get("parameters"):
        lines += _parameters(operation)
    if operation.get("requestBody"):
        lines += _request_body(document, operation)
    return lines + _responses(document, operation)


def render(document: dict[str, Any]) -> list[str]:
    """The whole reference, as lines of reStructuredText whose sections
    start one level below the page's title."""
    lines = markdown(document["info"].get("description"))
    lines += [f"Version {escape(str(document['info']['version']))} of the document, "
              f"OpenAPI {escape(document['openapi'])}.", ""]
    # Each operation once, under its first tag (an untagged one under "Other").
    groups: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
        tag["name"]: [] for tag in document.get("tags", [])}
    for method, path, operation in operations(document):
        groups.setdefault((operation.get("tags") or ["Other"])[0], []).append((method, path, operation))
    for tag, members in groups.items():
        if members:
            lines += title(tag, "=")
            for method, path, operation in members:
                lines += _operation(document, method, path, operation)
    lines += title("Schemas", "=")
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        lines += label(schema_label(name)) + title(name, "-") + block(schema, _link)
    return lines
