"""Masking secrets in output: every value, in its common encodings, becomes ``[masked:NAME]``.

``Masker`` works on a byte stream (a step's output as it arrives over SSH), so a value
split across reads, across the lines of a multi-line secret, or printed one byte at a
time is still found: it holds back only the unfinished tail that could still grow into
a value, and hands on everything else at once. ``mask_text`` does the same for one
finished string (a job's reason, a line of narwhal's own log).

The encodings masked besides the raw value: base64 (standard and URL-safe, padded and
not, and the value's part of a longer base64 text such as HTTP Basic's ``user:TOKEN``, at
each of the three alignments), URL-encoding (``%20`` and ``+`` for spaces) and JSON string
escaping (ASCII-only and not), each only where it differs from the raw value. Besides, the
value without surrounding blanks, in Unicode's other normal forms, and each line of a
multi-line value on its own (whatever its line ending), where that is at least ``PART``
characters long.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus

import ahocorasick_rs

MASK = "[masked:{name}]"
HEAD = 8  # bytes of a value's beginning the tail search looks for (values are at least 8)
PART = 8  # characters a piece of a value (a line, the value trimmed) needs to be masked on its own
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encodings(value: str, partial: bool = True) -> list[str]:
    """The spellings of ``value`` that are masked, the raw value first, without repeats.

    ``partial`` adds those that match a part of it (its base64 inside a longer text, each line
    of a multi-line value): what gets masked tells a step what it printed, so a part masked on
    its own can be guessed alone. A job gets them for its own secrets only (see ``Masker``)."""
    raw = value.encode("utf-8")
    out = [value]
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = encoded.decode("ascii")
        out += [text, text.rstrip("=")]
    # Inside a longer base64 text (HTTP Basic's user:TOKEN, a JSON document encoded whole) the
    # value starts at any of the three byte alignments: the whole 3-byte groups after its
    # first group boundary are spelled the same whatever comes before and after.
    for skip in (0, 1, 2) if partial else ():
        core = raw[skip:skip + 3 * ((len(raw) - skip) // 3)]
        if len(core) >= 6:
            out += [base64.b64encode(core).decode("ascii"), base64.urlsafe_b64encode(core).decode("ascii")]
    out += [quote(value, safe=""), quote_plus(value, safe=""),
            json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]]
    # What a step prints without meaning to transform it: the value trimmed (`$(cat FILE)` and
    # an unquoted `echo $T` drop trailing newlines and blanks), in another Unicode normal
    # form, and each line of a multi-line value alone (read line by line, or with its CRLF
    # turned into LF or back).
    pieces = [value.strip()] + [unicodedata.normalize(form, value) for form in ("NFC", "NFD", "NFKC", "NFKD")]
    lines = _LINE_BREAK.split(value)
    if partial and len(lines) > 1:
        pieces += [line.strip() for line in lines]
    out += [p for p in pieces if len(p) >= PART]
    return [s for s in dict.fromkeys(out) if s]


class Masker:
    """Replaces secret values (and their encodings) in bytes or text.

    ``secrets`` maps a name to its value, or is (name, value) pairs (a rotated secret's
    old and new value). An empty masker passes everything through unchanged. ``partial``
    names the secrets whose parts are masked too (``encodings``; None: all of them): a job's
    masker knows every secret, but the parts only of those it was granted, so that its
    output is no oracle for guessing another secret a piece at a time.

    The search is one Aho-Corasick automaton over every spelling (ahocorasick_rs: one
    pass over the output whatever the number of secrets), leftmost-longest, so a secret
    that contains another is masked whole.
    """

    def __init__(self, secrets: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 partial: Iterable[str] | None = None):
        pairs = sorted(secrets.items() if isinstance(secrets, Mapping) else secrets or ())
        parts = None if partial is None else set(partial)
        names: dict[bytes, bytes] = {}
        for name, value in pairs:
            for spelling in encodings(value, parts is None or name in parts):
                names.setdefault(spelling.encode("utf-8"), MASK.format(name=name).encode())
        self._patterns = list(names)
        self._replacement = [names[p] for p in self._patterns]
        self._search = (ahocorasick_rs.BytesAhoCorasick(self._patterns,
                                                        matchkind=ahocorasick_rs.MatchKind.LeftmostLongest)
                        if self._patterns else None)
        self._longest = max(map(len, self._patterns), default=0)
        # Where a value may start near the end of a read: every HEAD-byte beginning of one.
        heads = sorted({p[:HEAD] for p in self._patterns})
        self._heads = ahocorasick_rs.BytesAhoCorasick(heads) if heads else None
        self._by_first: dict[int, list[bytes]] = {}
        for p in self._patterns:
            self._by_first.setdefault(p[0], []).append(p)
        self._held = b""
        self.names = sorted({name for name, _ in pairs})

    def __bool__(self) -> bool:
        return self._search is not None

    def __repr__(self) -> str:  # never the values
        return f"<Masker {', '.join(self.names) or 'empty'}>"

    # --- a stream ------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Masked bytes that are safe to hand on; a tail that may still become a value is held."""
        if self._search is None:
            return data
        buf = self._held + data if self._held else data
        hold = self._hold_from(buf)
        out = bytearray()
        pos = 0
        for index, start, end in self._search.find_matches_as_indexes(buf):
            if start >= hold:
                break  # a value that may still grow into a longer one: decided with more data
            out += buf[pos:start]
            out += self._replacement[index]
            pos = end
        if pos > hold:  # a whole value reached into the tail: what follows it is held
            hold = pos + self._hold_from(buf[pos:])
        out += buf[pos:hold]
        self._held = buf[hold:]
        return bytes(out)

    def flush(self) -> bytes:
        """The end of the stream: whatever was held, masked."""
        held, self._held = self._held, b""
        return self.mask_bytes(held)

    def _hold_from(self, buf: bytes) -> int:
        """The first index from which ``buf``'s tail is the unfinished start of a value.

        Only the last ``longest - 1`` bytes can be: the last HEAD - 1 positions are
        checked one by one, and before them only where a value's first HEAD bytes are
        (found by the second automaton, in one pass).
        """
        end = len(buf)
        first = max(0, end - self._longest + 1)
        by_first = self._by_first
        best = end
        short = max(first, end - HEAD + 1)
        for i in range(short, end):
            starting = by_first.get(buf[i])
            if starting is not None and any(p.startswith(buf[i:]) for p in starting):
                best = i
                break
        if first < short:
            assert self._heads is not None
            for _, start, _ in self._heads.find_matches_as_indexes(memoryview(buf)[first:], overlapping=True):
                i = first + start
                if i < best and any(len(p) > end - i and p.startswith(buf[i:]) for p in by_first[buf[i]]):
                    best = i
        return best

    # --- finished text -------------------------------------------------------------------

    def mask_bytes(self, data: bytes) -> bytes:
        if self._search is None or not data:
            return data
        out = bytearray()
        pos = 0
        for index, start, end in self._search.find_matches_as_indexes(data):
            out += data[pos:start]
            out += self._replacement[index]
            pos = end
        if pos == 0:
            return data
        out += data[pos:]
        return bytes(out)

    def mask_text(self, text: str) -> str:
        if self._search is None or not text:
            return text
        return self.mask_bytes(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")


class LogMasking(logging.Filter):
    """A logging filter for handlers: secrets in a record's message or traceback are masked.

    Put it on the handlers (a logger's own filters miss records from its children).
    ``add`` takes the values of a reload; old ones stay masked too (a job that started
    before a rotation still holds the old value)."""

    def __init__(self, secrets: Mapping[str, str] | None = None):
        super().__init__()
        self._pairs: set[tuple[str, str]] = set()
        self.masker = Masker()
        self.add(secrets or {})

    def add(self, secrets: Mapping[str, str]) -> None:
        self._pairs |= set(secrets.items())
        self.masker = Masker(self._pairs)

    def filter(self, record: logging.LogRecord) -> bool:
        masker = self.masker
        if not masker:
            return True
        message = record.getMessage()
        masked = masker.mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = masker.mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = masker.mask_text(record.stack_info)
        return True

    def install(self, logger: logging.Logger | None = None) -> None:
        """On every handler of ``logger`` (the root logger by default)."""
        for handler in (logger or logging.getLogger()).handlers:
            if self not in handler.filters:
                handler.addFilter(self)
