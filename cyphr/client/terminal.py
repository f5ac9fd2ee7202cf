"""
Text from someone else, made safe to show on a terminal.

A message, a display name, a group name, a file name or a server's error
detail is written by someone other than the person reading it. Printed
raw, its control characters and escape sequences drive the reader's
terminal (erase a line, move the cursor, set the title, ring the bell: a
contact could redraw a line to look like a verified message from someone
else), and bidirectional overrides reorder what is shown (Trojan Source,
CVE-2021-42574). :func:`safe` shows each such character as a visible
stand-in instead, so nothing is hidden and nothing acts; :func:`json_line`
keeps the exact text for scripts, with the same characters JSON-escaped.
"""

from __future__ import annotations

import json
import re
from typing import Any

# C0 controls and DEL as their Unicode "control pictures" (U+2400-2421):
# ESC shows as ␛, a carriage return as ␍, a bell as ␇.
_PICTURES = {chr(code): chr(0x2400 + code) for code in range(0x20)}
_PICTURES["\x7f"] = "\u2421"
# Everything that is replaced: C0, DEL, C1 (U+0080-009F: a terminal may take
# U+009B as CSI); the bidirectional controls: embeddings and overrides
# (U+202A-202E), isolates (U+2066-2069), the implicit marks (U+200E, U+200F,
# U+061C); other invisible characters that change the layout around them:
# the line and paragraph separators, the deprecated format controls
# (U+206A-206F), the interlinear annotation marks (U+FFF9-FFFB); and lone
# surrogates (no terminal encoding can carry them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     "\u2066-\u206f\ufff9-\ufffb\ud800-\udfff]")


def _stand_in(match: re.Match[str]) -> str:
    char = match.group()
    return _PICTURES.get(char) or f"<U+{ord(char):04X}>"


def safe(text: Any, indent: str | None = None) -> str:
    """``text`` with every control character, escape sequence introducer,
    bidirectional or layout control made visible (``\\x1b`` as ``␛``,
    U+202E as ``<U+202E>``), so that printing it can neither drive the
    terminal nor reorder what is shown. With ``indent``, line breaks are
    kept, and each line after the first starts with ``indent`` (a message
    under its sender); without, a line break shows as ``␊``."""
    text = "" if text is None else str(text)
    if indent is None:
        return _UNSAFE.sub(_stand_in, text)
    lines = text.replace("\r\n", "\n").split("\n")
    return ("\n" + indent).join(_UNSAFE.sub(_stand_in, one) for one in lines)


def safe_lines(text: str) -> str:
    """Output already built for a person, line breaks kept: the last
    guard, so that a foreign field someone forgot to pass through
    :func:`safe` still cannot act on the terminal."""
    return "\n".join(_UNSAFE.sub(_stand_in, one) for one in text.split("\n"))


_ESCAPE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                             "\u2066-\u206f\ufff9-\ufffb\ud800-\udfff]")


def json_line(data: Any) -> str:
    """``data`` as one line of JSON that decodes to exactly the same
    values, with every character :func:`safe` would replace written as a
    ``\\uXXXX`` escape (json.dumps already escapes C0), so that the line
    itself is safe on a terminal too."""
    dumped = json.dumps(data, ensure_ascii=False)
    # These characters occur only inside JSON strings, where an escape
    # stands for the same character.
    return _ESCAPE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", dumped)
