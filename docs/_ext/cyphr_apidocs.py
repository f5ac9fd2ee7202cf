"""
A Sphinx extension: the REST and realtime references, generated at build
time from the documents the server serves.

    .. openapi:: ../cyphr/api/openapi.json
    .. asyncapi:: ../cyphr/api/asyncapi.json

Each directive reads its JSON file (a path relative to the page), turns it
into reStructuredText (openapi_text, asyncapi_text) and parses that in
place, so the sections, labels and links are Sphinx's own. The page is
rebuilt when the document changes.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

import asyncapi_text
import openapi_text


class _DocumentDirective(SphinxDirective):
    """Renders the JSON document named by the argument."""

    required_arguments = 1
    render: Callable[[dict[str, Any]], list[str]]

    def run(self) -> list[nodes.Node]:
        relative, path = self.env.relfn2path(self.arguments[0])
        self.env.note_dependency(relative)
        try:
            with open(path, encoding="utf-8") as f:
                document = json.load(f)
        except (OSError, ValueError) as e:
            raise self.error(f"cannot read {self.arguments[0]}: {e}") from e
        lines = type(self).render(document)
        source = f"<{self.name} {self.arguments[0]}>"
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source), container)
        return list(container.children)


class OpenAPIDirective(_DocumentDirective):
    render = staticmethod(openapi_text.render)


class AsyncAPIDirective(_DocumentDirective):
    render = staticmethod(asyncapi_text.render)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("openapi", OpenAPIDirective)
    app.add_directive("asyncapi", AsyncAPIDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
