"""How deep a JSON document nests, found before it is parsed (the parser recurses per level)."""

from __future__ import annotations

import re

_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|"', re.DOTALL)


def nested_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` opens more than ``limit`` arrays/objects inside each other.

    One left-to-right pass over strings and brackets (strings are skipped whole, so brackets
    inside them do not count); an unclosed string ends the scan and the parser reports it.
    """
    depth = 0
    for match in _JSON_TOKEN.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b'"':
            return False
    return False
