"""ANSI colours in a log line as (classes, text) runs: safe to render, never HTML.

A step's output is hostile, so nothing of it becomes markup: each run's text is escaped
by the template (or set as a text node by ``static/app.js``, which implements the same
rules), and its look is a set of CSS classes from a fixed list (``a-b`` bold, ``a-d``
dim, ``a-i`` italic, ``a-u`` underline, ``a-fN``/``a-gN`` foreground/background colour
N of 16), never an inline style (the Content-Security-Policy allows none).

Understood: SGR (``ESC [ ... m``) 0, 1, 2, 3, 4, 22, 23, 24, 30-37, 39, 40-47, 49, 90-97,
100-107, and 38;5;N / 48;5;N for N < 16. Other colours (256-colour above 15, 24-bit) keep
the default. Every other escape sequence (cursor moves, OSC titles and links) is dropped,
and so are control characters other than tab.
"""

from __future__ import annotations

import re

# CSI (ESC [ params intermediates final), OSC (ESC ] ... BEL or ST), other two-byte escapes.
ESCAPE = re.compile(r"\x1b\[([0-9;:?<=>]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?|\x9b[0-9;]*[@-~]")
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")

Run = tuple[str, str]  # (space-separated classes, text)


class _Style:
    __slots__ = ("bold", "dim", "italic", "underline", "fg", "bg")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bold = self.dim = self.italic = self.underline = False
        self.fg: int | None = None
        self.bg: int | None = None

    def classes(self) -> str:
        out = []
        if self.bold:
            out.append("a-b")
        if self.dim:
            out.append("a-d")
        if self.italic:
            out.append("a-i")
        if self.underline:
            out.append("a-u")
        if self.fg is not None:
            out.append(f"a-f{self.fg}")
        if self.bg is not None:
            out.append(f"a-g{self.bg}")
        return " ".join(out)

    def apply(self, params: str) -> None:
        codes = [int(p) if p.isdigit() else 0 for p in params.replace(":", ";").split(";")] if params else [0]
        i = 0
        while i < len(codes):
            c = codes[i]
            if c == 0:
                self.reset()
            elif c == 1:
                self.bold = True
            elif c == 2:
                self.dim = True
            elif c == 3:
                self.italic = True
            elif c == 4:
                self.underline = True
            elif c == 22:
                self.bold = self.dim = False
            elif c == 23:
                self.italic = False
            elif c == 24:
                self.underline = False
            elif 30 <= c <= 37:
                self.fg = c - 30
            elif 90 <= c <= 97:
                self.fg = c - 90 + 8
            elif c == 39:
                self.fg = None
            elif 40 <= c <= 47:
                self.bg = c - 40
            elif 100 <= c <= 107:
                self.bg = c - 100 + 8
            elif c == 49:
                self.bg = None
            elif c in (38, 48):
                mode = codes[i + 1] if i + 1 < len(codes) else None
                if mode == 5:
                    n = codes[i + 2] if i + 2 < len(codes) else 0
                    colour = n if n < 16 else None
                    if c == 38:
                        self.fg = colour
                    else:
                        self.bg = colour
                    i += 2
                elif mode == 2:
                    if c == 38:
                        self.fg = None
                    else:
                        self.bg = None
                    i += 4
            i += 1


def runs(line: str) -> list[Run]:
    """The line's visible text as runs of one style each (empty runs left out)."""
    style = _Style()
    out: list[Run] = []
    pos = 0
    for match in ESCAPE.finditer(line):
        if match.start() > pos:
            _add(out, style.classes(), line[pos:match.start()])
        if match.group(2) == "m":
            style.apply(match.group(1))
        pos = match.end()
    if pos < len(line):
        _add(out, style.classes(), line[pos:])
    return out


def _add(out: list[Run], classes: str, text: str) -> None:
    text = CONTROL.sub("", text)
    if not text:
        return
    if out and out[-1][0] == classes:
        out[-1] = (classes, out[-1][1] + text)
    else:
        out.append((classes, text))


def plain(line: str) -> str:
    """The visible text alone."""
    return "".join(text for _, text in runs(line))
