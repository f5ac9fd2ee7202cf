"""Sphinx configuration of Cyphr's documentation site.

Build it as CI does (warnings are errors)::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The local extension that renders the OpenAPI and AsyncAPI documents.
sys.path.insert(0, os.path.join(HERE, "_ext"))


def _version() -> str:
    """cyphr.__version__, read without importing the package (the site
    builds from a checkout, installed or not)."""
    with open(os.path.join(HERE, os.pardir, "cyphr", "__init__.py"), encoding="utf-8") as f:
        found = re.search(r'^__version__ = "([^"]+)"', f.read(), re.MULTILINE)
    if found is None:
        raise RuntimeError("no __version__ in cyphr/__init__.py")
    return found.group(1)


project = "Cyphr"
author = "The Cyphr authors"
copyright = "the Cyphr authors, AGPL-3.0-or-later"
version = release = _version()

extensions = ["cyphr_apidocs"]
root_doc = "index"
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "_ext", "examples/node_modules"]

# Every reference must resolve, and the text is shown as written: "--listen"
# keeps its two hyphens and quotes stay straight, as in a terminal.
nitpicky = True
smartquotes = False

html_theme = "alabaster"
html_title = f"Cyphr {release}"
html_show_sourcelink = False
html_last_updated_fmt = None
