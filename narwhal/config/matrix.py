"""A pipeline's ``matrix:``: one job per combination of values, as in Woodpecker and GitLab.

::

    matrix:
      PY: ["3.11", "3.12"]
      DB: [pg15, pg16]
      exclude: [{PY: "3.11", DB: pg16}]
      include: [{PY: "3.13", DB: pg16}]

Each combination becomes a pipeline of its own, named ``NAME[PY=3.11,DB=pg15]`` (the
name jobs, statuses and the report show), with the values as environment variables of
every step and substituted for ``${PY}`` in ``image:``, ``env:``, ``services:`` and ``cache:`` (only
declared matrix variables, never the shell's: ``$PY`` and ``${HOME}`` stay as written).
Expansion happens on the raw YAML, before the pipeline is validated, so a substituted
image is checked like any other.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from narwhal.config.yamlfile import show_value

MAX_COMBINATIONS = 64
MAX_VALUE = 128
VARIABLE_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
RESERVED = ("exclude", "include")
SUBSTITUTED = ("image", "env", "services", "cache")  # where ${VAR} is replaced, at pipeline and step level


class MatrixError(ValueError):
    """A problem with ``matrix:``; ``path`` is where, below ``matrix``."""

    def __init__(self, path: tuple, message: str):
        super().__init__(message)
        self.path = path


def combinations(raw: Any) -> list[dict[str, str]]:
    """Every combination the matrix asks for, in order: the product of the axes, minus
    ``exclude`` (an entry excludes every combination it agrees with on all its keys),
    plus ``include`` (added as written, unless already there)."""
    if not isinstance(raw, dict) or not raw:
        raise MatrixError((), f"expected a mapping of variables to lists of values, got {show_value(raw)}")
    axes: dict[str, list[str]] = {}
    for name, values in raw.items():
        if name in RESERVED:
            continue
        if not isinstance(name, str) or not VARIABLE_RE.fullmatch(name):
            raise MatrixError((name,), f"expected a variable name in capitals (A-Z, 0-9, _), got {show_value(name)}")
        if name.startswith("NARWHAL_") or name == "CI":
            raise MatrixError((name,), f"{name} is reserved for narwhal's own variables")
        if not isinstance(values, list) or not values:
            raise MatrixError((name,), f"expected a non-empty list of values, got {show_value(values)}")
        axes[name] = [_value((name, i), v) for i, v in enumerate(values)]
    exclude = [_entry(("exclude", i), e, axes) for i, e in enumerate(_list(raw.get("exclude"), "exclude"))]
    include = [_entry(("include", i), e, axes, complete=True) for i, e in enumerate(_list(raw.get("include"), "include"))]
    if not axes and not include:
        raise MatrixError((), "no variables: give at least one, such as PY: [\"3.11\", \"3.12\"]")
    total = 1
    for values in axes.values():
        total *= len(values)
    if total > 10 * MAX_COMBINATIONS:
        raise MatrixError((), f"{total} combinations; at most {MAX_COMBINATIONS} are allowed")
    out = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        if not any(all(values.get(k) == v for k, v in e.items()) for e in exclude):
            out.append(values)
    for extra in include:
        if extra not in out:
            out.append(extra)
    if not out:
        raise MatrixError(("exclude",), "every combination is excluded")
    if len(out) > MAX_COMBINATIONS:
        raise MatrixError((), f"{len(out)} combinations; at most {MAX_COMBINATIONS} are allowed")
    return out


def label(values: dict[str, str]) -> str:
    """``PY=3.11,DB=pg15``: how a combination is named."""
    return ",".join(f"{k}={v}" for k, v in values.items())


def substitute(value: Any, values: dict[str, str]) -> Any:
    """``value`` with ``${NAME}`` replaced for each matrix variable NAME, in every string inside it."""
    if isinstance(value, str):
        return _SUBSTITUTION.sub(lambda m: values.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, values) for v in value]
    return value


def apply(raw: dict, values: dict[str, str]) -> dict:
    """The raw pipeline of one combination: no ``matrix``, the values substituted where
    SUBSTITUTED says (pipeline and steps) and added under the pipeline's ``env``."""
    out = {k: v for k, v in raw.items() if k != "matrix"}
    for key in SUBSTITUTED:
        if key in out:
            out[key] = substitute(out[key], values)
    if isinstance(out.get("steps"), list):
        out["steps"] = [{k: substitute(v, values) if k in SUBSTITUTED else v for k, v in step.items()}
                        if isinstance(step, dict) else step for step in out["steps"]]
    env = out.get("env")
    out["env"] = {**values, **env} if isinstance(env, dict) else (values if env is None else env)
    return out


_SUBSTITUTION = re.compile(r"\$\{([A-Z][A-Z0-9_]{0,63})\}")


def _value(path: tuple, value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > MAX_VALUE \
            or any(ord(c) < 32 or c == "\x7f" for c in value) or any(c in value for c in ",=[]"):
        raise MatrixError(path, f"expected a short value without control characters or , = [ ], got {show_value(value)}")
    return value


def _list(value: Any, key: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MatrixError((key,), f"expected a list of mappings, got {show_value(value)}")
    return value


def _entry(path: tuple, entry: Any, axes: dict[str, list[str]], complete: bool = False) -> dict[str, str]:
    if not isinstance(entry, dict) or not entry:
        raise MatrixError(path, f"expected a mapping of variables to values, got {show_value(entry)}")
    out = {}
    for name, value in entry.items():
        if not isinstance(name, str) or not VARIABLE_RE.fullmatch(name):
            raise MatrixError(path + (name,), f"expected a variable name in capitals, got {show_value(name)}")
        if not complete and name not in axes:
            raise MatrixError(path + (name,), f"{name} is not a variable of this matrix")
        out[name] = _value(path + (name,), value)
    if complete and axes and set(out) != set(axes):
        missing = sorted(set(axes) - set(out))
        if missing:
            raise MatrixError(path, f"an included combination needs every variable: missing {', '.join(missing)}")
    return out
