"""
The documentation site (docs/, Sphinx): it builds with warnings as errors,
its references name every operation and event of the documents the server
serves, it holds every section of README.rst, and the text of those
documents cannot break it.
"""

from __future__ import annotations

import atexit
import functools
import html
import importlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from types import ModuleType

from docutils.core import publish_doctree
from docutils.nodes import make_id
from twisted.trial.unittest import TestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")


def _module(name: str) -> ModuleType:
    """A module of the documentation's extension (docs/_ext, which Sphinx
    puts on the path as docs/conf.py says)."""
    extensions = os.path.join(DOCS, "_ext")
    if extensions not in sys.path:
        sys.path.insert(0, extensions)
    return importlib.import_module(name)


@functools.cache
def _site() -> tuple[str, int, str]:
    """The site built as CI builds it, once per test process: its
    directory, sphinx-build's status and its warnings."""
    from sphinx.cmd.build import build_main

    output = tempfile.mkdtemp(prefix="cyphr-docs-")
    atexit.register(shutil.rmtree, output, True)
    warnings = os.path.join(output, "warnings.txt")
    status = build_main(["-W", "--keep-going", "-n", "-q", "-b", "html", "-w", warnings,
                         "-d", os.path.join(output, "doctrees"), DOCS, os.path.join(output, "html")])
    with open(warnings, encoding="utf-8") as f:
        return output, status, f.read()


def _document(name: str) -> dict:
    with open(os.path.join(REPO, "cyphr", "api", name), encoding="utf-8") as f:
        return json.load(f)


class DocsBuildTests(TestCase):
    """The site as CI builds it (one build for every test here)."""

    def page(self, name: str) -> str:
        with open(os.path.join(_site()[0], "html", f"{name}.html"), encoding="utf-8") as f:
            return f.read()

    def test_builds_without_warnings(self) -> None:
        """sphinx-build -W -n (warnings are errors, every reference must
        resolve) succeeds and reports nothing."""
        _, status, warnings = _site()
        self.assertEqual((status, warnings), (0, ""))

    def test_openapi_reference_names_every_operation(self) -> None:
        """The REST reference has a section, with its anchor, for each
        operation of cyphr/api/openapi.json, titled by method and path."""
        openapi_text = _module("openapi_text")
        page = html.unescape(self.page("openapi"))
        missing = []
        for method, path, operation in openapi_text.operations(_document("openapi.json")):
            anchor = make_id(openapi_text.operation_label(operation["operationId"]))
            if f'id="{anchor}"' not in page or f"{method.upper()} {path}" not in page:
                missing.append(f"{method.upper()} {path}")
        self.assertEqual(missing, [])

    def test_asyncapi_reference_names_every_event(self) -> None:
        """The realtime reference has a section for each event of
        cyphr/api/asyncapi.json under its direction, with the error codes
        of each ack."""
        asyncapi_text = _module("asyncapi_text")
        document = _document("asyncapi.json")
        page = self.page("asyncapi")
        events = asyncapi_text.events(document)
        self.assertGreater(len(events), 10)
        missing = [f"{action} {name}" for action, name, _ in events
                   if f'id="{make_id(asyncapi_text.event_label(action, name))}"' not in page]
        self.assertEqual(missing, [])
        codes = set(re.findall(r"[A-Z][A-Z_]{3,}", json.dumps(document["components"]["messages"])))
        self.assertIn("USER_NOT_FOUND", codes)
        self.assertEqual(sorted(code for code in codes if code not in page), [])

    def test_every_readme_section_is_in_the_site(self) -> None:
        """Each section of README.rst is a heading of some page of the site
        (the pages include README.rst's text rather than copy it)."""
        with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
            readme = f.read()
        titles = re.findall(r"^([^\s=.-][^\n]*)\n(?:=+|-+)\n", readme, re.MULTILINE)
        self.assertIn("Running in production", titles)
        pages = "".join(self.page(name) for name in (
            "index", "configuration", "production", "api-conventions", "command-line-client", "code"))
        headings = {html.unescape(re.sub(r"<[^>]+>", "", h)).strip()
                    for h in re.findall(r"<h[1-6][^>]*>(.*?)</h[1-6]>", pages, re.DOTALL)}
        headings = {h.rstrip("¶").strip() for h in headings}
        self.assertEqual([t for t in titles if t.replace("``", "") not in headings], [])


class DescriptionTextTests(TestCase):
    def test_markup_characters_are_shown_as_written(self) -> None:
        """Descriptions in the API documents are Markdown: code spans become
        literals and ``-`` lines a list, and whatever is markup in
        reStructuredText (``*``, ``_``, ``|``, backquotes, a leading option
        or enumerator, a final ``::``) is shown as written, without a
        warning."""
        rst_text = _module("rst_text")
        text = ("--listen  not an option *not emphasis* a_b_ |sub| [1]_ `code`s (`x`) 'q'::\n\n"
                "1. not enumerated: <tag> \\ end::\n\n"
                "- an item with `y`\n- another")
        warnings = io.StringIO()
        tree = publish_doctree("\n".join(rst_text.markdown(text)),
                               settings_overrides={"warning_stream": warnings, "report_level": 1})
        self.assertEqual(warnings.getvalue(), "")
        paragraphs = [p.astext() for p in tree.findall(lambda n: n.tagname == "paragraph")]
        self.assertEqual(paragraphs, [
            "--listen not an option *not emphasis* a_b_ |sub| [1]_ codes (x) 'q'::",
            "1. not enumerated: <tag> \\ end::",
            "an item with y",
            "another",
        ])
        literals = [n.astext() for n in tree.findall(lambda n: n.tagname == "literal")]
        self.assertEqual(literals, ["code", "x", "y"])
        self.assertEqual(len(list(tree.findall(lambda n: n.tagname == "bullet_list"))), 1)
