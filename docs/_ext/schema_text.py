"""
JSON Schema (the dialect of OpenAPI 3.1 and AsyncAPI 3.0) as
reStructuredText: a one-line summary of a schema (its type, format and
limits, or a link to a named schema), and nested lists of its fields and
alternatives. Named schemas (``#/components/schemas/X``) are linked, never
copied, so each is described once, in its own section.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from rst_text import escape, indented, literal, markdown

# Turns a "$ref" into a reference to the named schema's section.
Linker = Callable[[str], str]


SCHEMA_REF = "#/components/schemas/"  # where both documents keep their named schemas


def schema_linker(schema_label: Callable[[str], str]) -> Linker:
    """The linker of a document: a ``$ref`` to one of its named schemas
    becomes a reference to that schema's section (``schema_label``)."""

    def link(ref: str) -> str:
        if not ref.startswith(SCHEMA_REF):
            raise ValueError(f"a $ref the reference cannot show: {ref}")
        name = ref[len(SCHEMA_REF):]
        return f":ref:`{escape(name)} <{schema_label(name)}>`"

    return link

_ALTERNATIVES = (("oneOf", "Exactly one of"), ("anyOf", "Any of"), ("allOf", "All of"))


def _json(value: Any) -> str:
    return literal(json.dumps(value, ensure_ascii=False, sort_keys=True))


def _nullable(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The other schema of ``anyOf``/``oneOf`` [X, {"type": "null"}], if that is what it is."""
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
            return next(option for option in options if option != {"type": "null"})
    return None


def _limits(schema: dict[str, Any]) -> list[str]:
    parts = []
    if "format" in schema:
        parts.append(f"format {literal(schema['format'])}")
    if "contentEncoding" in schema:
        parts.append(f"encoded {literal(schema['contentEncoding'])}")
    if "pattern" in schema:
        parts.append(f"pattern {literal(schema['pattern'])}")
    for low, high, unit in (("minLength", "maxLength", "characters"), ("minItems", "maxItems", "items"),
                            ("minimum", "maximum", None), ("minProperties", "maxProperties", "fields")):
        lo, hi = schema.get(low), schema.get(high)
        count = lo if hi is None else hi
        unit_text = f" {unit[:-1] if count == 1 else unit}" if unit else ""
        if lo is not None and lo == hi:
            parts.append(f"exactly {lo}{unit_text}")
        elif lo is not None and hi is not None:
            parts.append(f"{lo} to {hi}{unit_text}" if unit else f"from {lo} to {hi}")
        elif lo is not None:
            parts.append(f"at least {lo}{unit_text}")
        elif hi is not None:
            parts.append(f"at most {hi}{unit_text}")
    if "enum" in schema:
        parts.append("one of " + ", ".join(_json(value) for value in schema["enum"]))
    if "default" in schema:
        parts.append(f"default {_json(schema['default'])}")
    return parts


def _only(schema: dict[str, Any]) -> Any:
    """The one schema of an ``allOf`` that is all there is (beside a description)."""
    parts = schema.get("allOf")
    if isinstance(parts, list) and len(parts) == 1 and set(schema) <= {"allOf", "description"}:
        return parts[0]
    return None


def summary(schema: Any, link: Linker) -> str:
    """One line: what a value of this schema is."""
    if not isinstance(schema, dict):
        return "any value" if schema is True else "no value"
    if "$ref" in schema:
        return link(schema["$ref"])
    if _only(schema) is not None:
        return summary(_only(schema), link)
    other = _nullable(schema)
    if other is not None:
        return f"{summary(other, link)}, or null"
    if "const" in schema:
        return f"always {_json(schema['const'])}"
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if "array" in kinds and "items" in schema:
        kinds[kinds.index("array")] = f"array of {summary(schema['items'], link)}"
    text = " or ".join(kinds)
    if not text and "properties" in schema:
        text = "object"
    limits = _limits(schema)
    if limits:
        text = f"{text}, {', '.join(limits)}" if text else ", ".join(limits)
    return text


def _first_and_rest(description: str | None) -> tuple[str, list[str]]:
    paragraphs = markdown(description)
    if not paragraphs or paragraphs[0].startswith(("- ", ".. ")):
        return "", paragraphs
    return paragraphs[0], paragraphs[2:] if len(paragraphs) > 2 else []


def _field(name: str, schema: Any, required: bool, link: Linker) -> list[str]:
    """One field as a list item: name, whether required, summary, description, details."""
    schema = schema if isinstance(schema, dict) else {}
    head = f"- {literal(name)} ({'required' if required else 'optional'})"
    kind = summary(schema, link)
    if kind:
        head += f": {kind}"
    first, rest = _first_and_rest(schema.get("description"))
    if first:
        head += f". {first}"
    body = rest + details(schema, link)
    return [head, ""] + (indented(body, 2) if body else [])


def fields(schema: dict[str, Any], link: Linker) -> list[str]:
    """The list of an object's fields, required ones first as the schema orders them."""
    properties = schema.get("properties") or {}
    required = list(schema.get("required") or [])
    lines: list[str] = []
    for name in required:
        lines += _field(name, properties.get(name, True), True, link)
    for name, sub in properties.items():
        if name not in required:
            lines += _field(name, sub, False, link)
    extra = schema.get("additionalProperties")
    if extra is False and properties:
        lines += ["- No other field.", ""]
    elif isinstance(extra, dict):
        lines += [f"- Any other field: {summary(extra, link)}.", ""]
    return lines


def details(schema: Any, link: Linker) -> list[str]:
    """What the summary does not say: fields, alternatives, exclusions, items."""
    if not isinstance(schema, dict) or "$ref" in schema:
        return []
    other = _nullable(schema)
    if other is None:
        other = _only(schema)
    if other is not None:
        return details(other, link)
    lines = fields(schema, link) if "properties" in schema or "required" in schema else []
    for key, words in _ALTERNATIVES:
        if key in schema:
            lines += [f"{words}:", ""]
            for option in schema[key]:
                kind = summary(option, link)
                lines += ["#. " + ("With:" if kind in ("", "object") else kind + "."), ""]
                lines += indented(block_body(option, link), 3)
    if "not" in schema:
        excluded = schema["not"]
        if isinstance(excluded, dict) and set(excluded) == {"required"}:
            names = ", ".join(literal(name) for name in excluded["required"])
            lines += [f"Without {names}.", ""]
        else:
            lines += [f"Not: {summary(excluded, link)}.", ""] + block_body(excluded, link)
    items = schema.get("items")
    if isinstance(items, dict) and "$ref" not in items and details(items, link):
        lines += ["Each item:", ""] + indented(details(items, link), 2)
    return lines


def block_body(schema: Any, link: Linker) -> list[str]:
    """A schema's description and details (the summary said elsewhere)."""
    if not isinstance(schema, dict):
        return []
    description = [] if "$ref" in schema else markdown(schema.get("description"))
    return description + details(schema, link)


def block(schema: Any, link: Linker) -> list[str]:
    """A schema in full: its summary as a paragraph, then its description and details."""
    head = summary(schema, link)
    if head == "object" and isinstance(schema, dict) and "properties" in schema:
        head = ""  # the list of fields says so
    if head[:1].isalpha():
        head = head[0].upper() + head[1:]
    return ([head + ".", ""] if head else []) + block_body(schema, link)
