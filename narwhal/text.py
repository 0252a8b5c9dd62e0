"""Job-controlled text made inert: safe to print on a terminal, safe to keep as a reason.

A step's output, a Docker error line or a branch name is written by whoever controls
the job. Printed unchanged on an operator's terminal it may set the window title,
clear the screen, plant an OSC 8 hyperlink, move the cursor over earlier lines or
reorder text with bidi overrides. These pure functions keep what is useful (colour,
for logs) and make everything else visible instead of active.

* ``terminal_safe(text)``: for log lines. SGR (``ESC [ ... m``, colour) is kept; every
  other escape sequence (CSI, OSC, DCS, SOS/PM/APC, bare ESC) is dropped whole; other
  control characters (C0 except tab, DEL, C1, bidi overrides and isolates) become a
  visible ``\\xNN`` / ``\\u202e`` escape.
* ``printable(text, limit)``: for one-line fields (reasons, step names, branches):
  the same, but no colour either, newlines included among the escaped characters,
  cut to ``limit`` characters.

Both are idempotent: their output passes through them unchanged.

A log holds two kinds of line (``narwhal.job.LogKind``): a step's output and narwhal's
own notes. Only the kind says which; in text the two are told apart like this:

* ``log_text_line(text, kind)``: narwhal's line as ``[narwhal] TEXT``; a step line that
  would read as narwhal's (``looks_like_narwhal``) gets ``[step] `` in front; every
  other step line is unchanged. So no step line, printed, starts like narwhal's.
"""

from __future__ import annotations

import re
import unicodedata

ESC = "\x1b"

# Escape sequences, longest first, each matched whole so that its parameters do not
# leak out as text. An OSC / DCS / SOS / PM / APC string ends at BEL or ST (ESC \),
# or at the end of the line when unterminated (a terminal would swallow the rest).
_SEQUENCE = re.compile(
    r"""
      (?P<sgr> \x1b\[ [0-9;:]* m )                              # colour: kept in logs
    | \x1b\[ [0-?]* [ -/]* [@-~]                                # any other CSI
    | \x1b\[ [0-?]* [ -/]*                                      # an unfinished CSI
    | \x1b [\]PX^_] [^\n]*? (?: \x07 | \x1b\\ | (?=\n) | \Z )    # OSC, DCS, SOS, PM, APC
    | \x1b [ -/]* [0-~]                                         # two-byte escapes (ESC c, ESC 7 ...)
    | \x1b                                                      # a bare ESC
    """,
    re.VERBOSE,
)
_LINE_END_CR = re.compile(r"\r+(?=\n|\Z)")  # CRLF output: the CR goes, quietly
# Single characters that act on a terminal or on the order of text: C0 controls
# except tab (newline and carriage return are handled by the callers), DEL, C1,
# bidi embeddings/overrides (U+202A-U+202E) and isolates (U+2066-U+2069).
# ESC itself is not listed: every ESC is either part of a sequence above or a bare ESC.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1a\x1c-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# Characters that print as nothing: a step could hide them inside "[narwhal]".
_INVISIBLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
                        "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]")
_CONTROL_ONE_LINE = re.compile("[\x00-\x08\x0a-\x1a\x1c-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    ch = match.group()
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_safe(text: str, *, colour: bool = True) -> str:
    """``text`` (one log line or several) with only SGR colour left active.

    Newlines are kept; a carriage return is made visible (mid-line it would let a
    line overwrite itself); ``colour=False`` drops SGR too."""
    if ESC not in text and not _CONTROL.search(text):
        return text  # the fast path: nearly every log line
    if ESC in text:
        text = _SEQUENCE.sub(lambda m: m.group() if colour and m.group("sgr") else "", text)
    if "\r" in text:
        text = _LINE_END_CR.sub("", text)
    return _CONTROL.sub(_visible, text)


def printable(text: object, limit: int | None = None) -> str:
    """One inert line from job-controlled text: for reasons, names, branches, titles.

    No escape sequence survives (not even colour), every control character including
    newline is shown as ``\\xNN``, and the result is cut to ``limit`` characters with
    an ellipsis."""
    text = str(text)
    if ESC in text:
        text = _SEQUENCE.sub("", text)
    text = _CONTROL_ONE_LINE.sub(_visible, text)
    if limit is not None and len(text) > limit:
        text = text[:max(limit - 1, 0)] + "…"
    return text


def is_inert(text: str, *, colour: bool = True) -> bool:
    """True when ``text`` has no active control sequence (SGR allowed when ``colour``)."""
    rest = _SEQUENCE.sub(lambda m: "" if colour and m.group("sgr") else ESC, text)
    return ESC not in rest and not _CONTROL.search(rest)


NARWHAL_MARK = "[narwhal] "  # before narwhal's own lines, in text
STEP_MARK = "[step] "  # before a step line that would otherwise read as narwhal's


# Characters that print as nothing or as a blank: dropped before a line is compared.
_UNSEEN_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Co", "Mn", "Me", "Zs", "Zl", "Zp"})
_BLANK_LETTERS = frozenset("\u2800\u3164\u115f\u1160\uffa0")
_WORD = "narwhal"


def looks_like_narwhal(line: str) -> bool:
    """True when ``line``, printed, could read as starting with "[narwhal]".

    Escape sequences, control and invisible characters (format, combining, private-use,
    blank letters), leading blanks, case and compatibility forms are not looked at; any
    opening and closing bracket counts, and any non-ASCII letter counts as the letter it
    may look like (a Cyrillic 'а' for 'a'). A carriage return may overwrite what came
    before it on a terminal, so every part after one is looked at too."""
    if "\r" in line:
        return any(looks_like_narwhal(part) for part in line.split("\r"))
    if line.isascii():
        if "[" not in line:
            return False  # the fast path: nearly every log line
        bare = _SEQUENCE.sub("", line) if ESC in line else line
        bare = _INVISIBLE.sub("", _CONTROL.sub("", bare))
        return bare.lstrip().casefold().startswith("[narwhal]")
    text = unicodedata.normalize("NFKC", _SEQUENCE.sub("", line) if ESC in line else line)
    seen = [c for c in text.casefold()
            if unicodedata.category(c) not in _UNSEEN_CATEGORIES and c not in _BLANK_LETTERS]
    if len(seen) < len(_WORD) + 2:
        return False
    opening, letters, closing = seen[0], seen[1:len(_WORD) + 1], seen[len(_WORD) + 1]
    return ((opening == "[" or unicodedata.category(opening) == "Ps")
            and (closing == "]" or unicodedata.category(closing) == "Pe")
            and all(c == want or (not c.isascii() and c.isalpha()) for c, want in zip(letters, _WORD, strict=True)))


def log_text_line(text: str, kind: str) -> str:
    """One log line as text: narwhal's marked ``[narwhal]``, a look-alike step line ``[step]``."""
    if kind == "narwhal":
        return NARWHAL_MARK + text
    if looks_like_narwhal(text):
        return STEP_MARK + text
    return text


# narwhal's note as a step starts; ``logs`` shows it as the step's header. Step names are
# one line of printable text (narwhal.config.pipeline.STEP_NAME_RE), so the form is exact.
_STEP_STARTED = re.compile(r"step (?P<name>[^\n]+) started")


def step_started(name: str) -> str:
    """The narwhal line written when a step starts: ``step build started``."""
    return f"step {name} started"


def started_step(text: str) -> str | None:
    """The step a narwhal line says has started, or None (``step_started``'s inverse)."""
    match = _STEP_STARTED.fullmatch(text)
    return match.group("name") if match else None
