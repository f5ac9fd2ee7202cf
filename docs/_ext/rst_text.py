"""
Text for the API references: the Markdown that OpenAPI and AsyncAPI
descriptions are written in (code spans, ``## headings``, paragraphs and
``-`` lists) turned into reStructuredText that says exactly what the
document says.

Everything that is not a code span is escaped, so that a ``*``, ``_``,
``|`` or a backquote in a description never becomes markup, a broken
reference or a warning: the build runs with warnings as errors, and a
description must not be able to break it.
"""

from __future__ import annotations

import re

_CODE_SPAN = re.compile(r"`([^`]+)`")
# Characters that start or end inline markup in reStructuredText.
_SPECIAL = re.compile(r"([\\*_|`<>\[\]])")
# A paragraph that starts like a list item, an enumerator, a directive, a
# field or a heading would be read as one.
_BLOCK_START = re.compile(r"^(?:[^\w`]|\w{1,3}[.)]\s|\(\w{1,3}\)\s)")
_HEADING = re.compile(r"^#{1,6}\s+(.*)$")
_BULLET = re.compile(r"^[-*]\s+(.*)$")


def escape(text: str) -> str:
    """Plain text as reStructuredText that shows it as it is."""
    return _SPECIAL.sub(r"\\\1", text)


def literal(code: str) -> str:
    """``code`` as an inline literal (code spans never hold two backquotes)."""
    code = code.strip()
    if not code:
        return ""
    return "``" + code.replace("``", "` `") + "``"


def inline(text: str) -> str:
    """One paragraph of Markdown text (code spans and plain text) as
    reStructuredText on one line. A literal is joined to the text around it
    by escaped spaces, so that ``foo`s`` or ``(`x`)`` need no space to be
    recognised."""
    text = " ".join(text.split())
    out: list[str] = []
    position = 0
    for match in _CODE_SPAN.finditer(text):
        out.append(escape(text[position:match.start()]))
        code = literal(match.group(1))
        if code:
            before = text[match.start() - 1] if match.start() > 0 else " "
            after = text[match.end()] if match.end() < len(text) else " "
            out.append(("" if before.isspace() else "\\ ") + code + ("" if after.isspace() else "\\ "))
        position = match.end()
    out.append(escape(text[position:]))
    line = "".join(out)
    if _BLOCK_START.match(line) and not line.startswith(("``", "\\")):
        line = "\\" + line
    if line.endswith("::"):
        line = line[:-1] + "\\:"
    return line


def markdown(text: str | None) -> list[str]:
    """Markdown paragraphs as reStructuredText lines, a blank line after
    each block. ``## Heading`` becomes a rubric (a heading that is not a
    section, so a description cannot upset the page's sections)."""
    if not text:
        return []
    lines: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        rows = [row.strip() for row in block.strip().splitlines()]
        heading = _HEADING.match(rows[0]) if len(rows) == 1 else None
        if heading:
            lines += [f".. rubric:: {inline(heading.group(1))}", ""]
        elif all(_BULLET.match(row) for row in rows):
            lines += [f"- {inline(_BULLET.match(row).group(1))}" for row in rows] + [""]
        else:
            lines += [inline(" ".join(rows)), ""]
    return lines


def indented(lines: list[str], by: int) -> list[str]:
    """``lines`` indented by ``by`` spaces (blank lines stay empty)."""
    pad = " " * by
    return [pad + line if line else "" for line in lines]


def title(text: str, underline: str, overline: bool = False) -> list[str]:
    """A section title with its adornment, and the blank line after it."""
    text = escape(text)
    rule = underline * len(text)
    return ([rule] if overline else []) + [text, rule, ""]


def label(name: str) -> list[str]:
    """An explicit target, for ``:ref:`` and the anchor in the page."""
    return [f".. _{name}:", ""]


def target_name(*parts: str) -> str:
    """A label name from parts (document, kind, name): lower case, and
    only characters a label keeps as they are."""
    return "-".join(re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-") for part in parts)
