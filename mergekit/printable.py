"""Text from the inputs (tensor names from a safetensors header, paths) made safe to print:
control characters would otherwise reach the terminal, where ESC starts escape sequences
and a newline forges a line of output."""

from __future__ import annotations


def printable(text: str, keep: str = "") -> str:
    """``text`` with every unprintable character (controls, line breaks, Unicode format
    characters such as bidi overrides) except those in ``keep`` shown as a Python string
    escape: ESC as ``\\x1b``, a newline as ``\\n``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode()
                   for c in text)
