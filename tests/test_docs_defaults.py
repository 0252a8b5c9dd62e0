"""The defaults the docs state are the defaults the code has: Settings is the one source.

README.md carries a table generated from ``Settings.describe()`` (regenerated here and
compared); ``inventory.yaml``'s comments list every setting and the runner defaults;
``docs/design.md`` need not mention a setting, but any default it does state must match.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from narwhal.config.inventory import DEFAULT_LIMITS, Runner
from narwhal.config.settings import DEFAULT_LISTEN, TABLE_BEGIN, TABLE_END, Settings, parse_setting, settings_table

ROOT = Path(__file__).resolve().parent.parent
NAMES = [f.name for f in fields(Settings)]
# fetch_hosts defaults to what the pipelines name: no value to state, but the docs must name it.
SCALAR_NAMES = [n for n in NAMES if Settings.kind(n) != "hosts"]


def default(name: str):
    return getattr(Settings(), name)


def read_value(name: str, text: str):
    """A stated default, read the way inventory.yaml's settings: would read it ("4 MiB" -> 4m)."""
    text = re.sub(r"(?<=\d)\s+(?=[A-Za-z])", "", text.strip().strip("`").strip())
    if text in ("true", "false") or text.startswith("["):
        return parse_setting(name, yaml.safe_load(text))
    return parse_setting(name, int(text) if text.isdigit() else text)


def stated_defaults(text: str) -> list[tuple[str, str, int]]:
    """(setting, value, line) for every default TEXT states: a table row ``| `name` | 10s |``,
    a YAML-like ``name: 10s`` or prose ``name (default 10s)`` / ``name defaults to 10s``.
    Values must start with a digit, or be ``true``/``false``/``none`` or a ``[list]``, so type
    hints such as ``log_cap: int`` are not taken."""
    value = r"`?(\d[\w.]*(?:\s?(?:[KMG]i?B|ms|s|m|h|k|g)\b)?|true|false|none|\[[^\]]*\])`?"
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for name in SCALAR_NAMES:
            n = re.escape(name)
            for pattern in (rf"^\s*\|\s*`?{n}`?\s*\|\s*{value}\s*\|",
                            rf"(?<![\w.]){n}`?\s*:\s*{value}(?=\s*(?:$|#|,|\}}))",
                            rf"(?<![\w.]){n}`?\s*\((?:default|defaults to)[:\s]\s*{value}\s*\)",
                            rf"(?<![\w.]){n}`?\s+defaults\s+to\s+{value}"):
                found += [(name, m.group(1), number) for m in re.finditer(pattern, line)]
    return found


def check_stated(path: Path) -> list[tuple[str, str, int]]:
    stated = stated_defaults(path.read_text())
    wrong = []
    for name, text, line in stated:
        try:
            ok = read_value(name, text) == default(name)
        except ValueError:
            ok = False
        if not ok:
            wrong.append(f"{path.name}:{line}: {name} documented as {text!r}, Settings has {default(name)!r}")
    assert not wrong, "\n".join(wrong)
    return stated


def test_describe_matches_the_instance():
    assert [(n, d) for n, d, _ in Settings.describe()] == [(n, default(n)) for n in NAMES]


def test_readme_table_is_generated_from_settings():
    text = (ROOT / "README.md").read_text()
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    assert text[start:end] == settings_table(), "run: python -m narwhal.config.settings README.md"
    assert sorted({name for name, _, _ in check_stated(ROOT / "README.md")}) == sorted(SCALAR_NAMES)
    assert all(f"`{name}`" in text for name in NAMES)


def test_readme_states_the_default_listen_address():
    text = (ROOT / "README.md").read_text()
    stated = set(re.findall(r"\b127\.0\.0\.1:\d+\b", text))
    assert stated <= {DEFAULT_LISTEN}, f"README names {stated}, the server listens on {DEFAULT_LISTEN}"


def test_inventory_yaml_lists_every_setting_with_its_default():
    text = (ROOT / "inventory.yaml").read_text()
    block = text[text.index("# settings:"):]
    stated = {name: value for name, value, _ in stated_defaults(block)}
    assert sorted(stated) == sorted(SCALAR_NAMES)
    assert all(f"#   {name}:" in block for name in NAMES)
    check_stated(ROOT / "inventory.yaml")


def test_inventory_yaml_states_the_runner_defaults():
    text = (ROOT / "inventory.yaml").read_text()
    comment = text[text.index("other keys have defaults:"):text.index("\nrunners:")]
    fields_ = Runner.model_fields
    for key in ("host", "port", "user", "known_hosts", "capacity", "transport", "network"):
        match = re.search(rf"#\s+(?:.*\s)?{key}:\s*(\S+)", comment)
        assert match, f"inventory.yaml does not state the default of {key}"
        assert yaml.safe_load(match.group(1)) == fields_[key].default, key
    limits = re.search(r"limits:\s*(\{[^}]*\})", comment)
    assert limits and yaml.safe_load(limits.group(1)) == DEFAULT_LIMITS.model_dump()
    labels = re.search(r"labels:\s*(\[\])", comment)
    assert labels and fields_["labels"].default == []


def test_design_md_states_no_other_defaults():
    """design.md may leave a setting out; any default it does state must be Settings'."""
    path = ROOT / "docs" / "design.md"
    if path.exists():
        check_stated(path)


@pytest.mark.parametrize("text, name, value", [
    ("| `health_timeout` | 15 s | ... |", "health_timeout", "15 s"),
    ("#   log_cap: 8m", "log_cap", "8m"),
    ("`stop_grace` (default 3s)", "stop_grace", "3s"),
    ("max_body defaults to 2 MiB.", "max_body", "2 MiB"),
    ("#   read_token: true", "read_token", "true"),
    ("#   public_names: [ci.example.org]", "public_names", "[ci.example.org]"),
])
def test_the_reader_finds_stated_defaults(text, name, value):
    assert stated_defaults(text) == [(name, value, 1)]
    assert read_value(name, value) != default(name)  # so check_stated would object


def test_the_reader_ignores_type_hints():
    assert stated_defaults("limits: Limits; log_cap: int; grace: float") == []
