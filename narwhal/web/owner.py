"""Whose is a log line, when steps run side by side.

A graph pipeline's steps overlap, and so do their lines in the job's one log: the runner
writes each output line as ``NAME | text`` and narwhal's own notes name their step
(``step NAME started``, ``step NAME: exit 1``, ``stopping NAME: ...``). A line that names
no step (a service's, a note about the job) belongs to the step that started last before
it and had not ended, as in a pipeline without a graph. The page's script applies the same
rule to the lines that arrive live (``lineOwner`` in static/app.js).
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATOR = " | "


@dataclass(frozen=True)
class Range:
    idx: int
    name: str
    first: int | None  # the first log line written while the step ran
    last: int | None  # its last; None while it runs


def named(kind: str, text: str, names: list[str]) -> str | None:
    """The step a line names itself, if any (the longest name that fits: ``a`` and ``a b``)."""
    for name in sorted(names, key=len, reverse=True):
        if kind == "narwhal":
            if text.startswith((f"step {name} ", f"step {name}:", f"stopping {name}:")) or \
                    text.endswith(f" in step {name}; stopping it"):
                return name
        elif text.startswith(name + SEPARATOR):
            return name
    return None


def owner(n: int, kind: str, text: str, ranges: list[Range]) -> int | None:
    """The idx of the step line ``n`` belongs to; None: before, between or after the steps."""
    name = named(kind, text, [r.name for r in ranges])
    if name is not None:
        return next(r.idx for r in ranges if r.name == name)
    holding = [r for r in ranges if r.first is not None and r.first <= n and (r.last is None or n <= r.last)]
    return max(holding, key=lambda r: (r.first or 0, r.idx)).idx if holding else None
