"""yamlfile: safe, bounded loading with line numbers."""

from __future__ import annotations

import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from narwhal.config.yamlfile import MAX_BYTES, format_path, load_yaml, parse_yaml
from narwhal.errors import ConfigError


def problems_of(text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "f.yaml", **kw)
    return [str(p) for p in info.value.problems]


def laughs(size: int) -> str:
    """Billion laughs: each anchor is a list of ten aliases of the previous one."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    while sum(len(line) + 1 for line in lines) < size:
        i = len(lines)
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_plain_data_and_lines():
    doc = parse_yaml("a: 1\nb:\n  - x\n  - {p: 2,\n     q: 3}\nc: 2024-01-01\n", "f.yaml")
    assert doc.data == {"a": 1, "b": ["x", {"p": 2, "q": 3}], "c": "2024-01-01"}
    assert doc.line_of(("a",)) == 1
    assert doc.line_of(("b",)) == 2
    assert doc.line_of(("b", 0)) == 3
    assert doc.line_of(("b", 1, "q")) == 5
    assert doc.line_of(("b", 1, "nope", 3)) == 4  # nearest recorded parent
    assert doc.line_of(()) == 1


def test_scalar_types_follow_the_safe_loader():
    doc = parse_yaml("i: 12\nf: 1.5\nt: true\nn: null\ns: '12'\nx: !!str 3\ne: ~\n")
    assert doc.data == {"i": 12, "f": 1.5, "t": True, "n": None, "s": "12", "x": "3", "e": None}


def test_aliases_and_merge_keys_are_plain_data():
    doc = parse_yaml("base: &b {user: ci, port: 22}\nr:\n  <<: *b\n  port: 2222\nl: [*b]\n")
    assert doc.data["r"] == {"user": "ci", "port": 2222}
    assert doc.data["l"] == [{"user": "ci", "port": 22}]


def test_empty_file_is_none():
    assert parse_yaml("", "f.yaml").data is None
    assert parse_yaml("# only a comment\n", "f.yaml").data is None


def test_duplicate_keys_are_errors_at_the_duplicate():
    found = problems_of("a: 1\nb:\n  x: 1\n  x: 2\na: 3\n")
    assert found == [
        "f.yaml:4: b.x: duplicate key (first at line 3)",
        "f.yaml:5: a: duplicate key (first at line 1)",
    ]


def test_syntax_error_has_file_and_line():
    (message,) = problems_of("a: 1\nb: [1, 2\nc: 3\n")
    assert message.startswith("f.yaml:")
    assert "invalid YAML" in message
    (message,) = problems_of("a: 1\n b: 2\n")
    assert message.startswith("f.yaml:2: invalid YAML")


def test_unsupported_tags_are_refused():
    assert "unsupported YAML tag" in problems_of("a: !!python/object:os.system x\n")[0]
    assert "unsupported YAML tag" in problems_of("a: !!binary aGVsbG8=\n")[0]
    assert "unsupported YAML tag" in problems_of("a: !!set {x, y}\n")[0]
    assert "not a valid int" in problems_of("a: !!int abc\n")[0]


def test_collection_keys_and_multiple_documents_are_refused():
    assert "mapping keys must be plain" in problems_of("? [a, b]\n: 1\n")[0]
    assert "single YAML document" in problems_of("a: 1\n---\nb: 2\n")[0]


def test_recursive_alias_is_refused():
    assert "recursive alias" in problems_of("a: &a [1, *a]\n")[0]


def test_small_billion_laughs_is_refused():
    (message,) = problems_of(laughs(400))
    assert message.endswith(": YAML too large after alias expansion")


def test_one_megabyte_bomb_is_refused_without_expanding(capsys):
    text = laughs(1024 * 1024)
    assert len(text) >= 1024 * 1024
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "bomb.yaml", max_bytes=2 * 1024 * 1024)
    elapsed = time.perf_counter() - started
    assert "YAML too large after alias expansion" in str(info.value)
    with capsys.disabled():  # reported, never asserted: the machine is shared
        print(f"\n1 MiB billion-laughs refused in {elapsed * 1000:.1f} ms")


def test_wide_alias_fanout_counts_every_revisit():
    text = "a: &a [" + ",".join(["x"] * 100) + "]\nb: [" + ",".join(["*a"] * 1500) + "]\n"
    assert "YAML too large after alias expansion" in problems_of(text)[0]


def test_deep_nesting_is_refused_early():
    # libyaml takes minutes on this and its own composer crashes; ours stops at 64
    text = "[" * 200_000 + "]" * 200_000
    assert "nested too deeply" in problems_of(text, max_bytes=1024 * 1024)[0]
    assert parse_yaml("[" * 64 + "]" * 64).data is not None


def test_deep_nesting_is_refused_in_our_words_whatever_libyaml_says():
    # libyaml >= 0.2.5 (PyYAML 6.0.4 wheels) refuses 1000 levels itself while it reads ahead,
    # before we see one event; the answer must still be ours, with file and line
    text = "[" * 200_000 + "]" * 200_000
    assert problems_of(text, max_bytes=1024 * 1024) == ["f.yaml:1: YAML nested too deeply (more than 64 levels)"]
    text = "a: 1\nb:\n  c: " + "[" * 5000 + "]" * 5000 + "\n"
    assert problems_of(text) == ["f.yaml:3: YAML nested too deeply (more than 64 levels)"]
    # what our composer refuses before the depth is the answer too, as it would be without the limit
    text = "a: 1\nb: " + "{" * 5000 + "}" * 5000 + "\n"
    assert problems_of(text) == ["f.yaml:2: mapping keys must be plain values, not mappings or lists"]


class _ImpatientLoader(yaml.SafeLoader):
    """A parser with its own, differently worded nesting limit that it hits while reading ahead."""

    def fetch_flow_collection_start(self, token_class):
        if self.flow_level >= 100:
            raise yaml.scanner.ScannerError(None, None, "some other words about depth", self.get_mark())
        super().fetch_flow_collection_start(token_class)


def test_a_parser_refusing_deep_nesting_first_is_answered_by_our_limit(monkeypatch):
    from narwhal.config import yamlfile

    monkeypatch.setattr(yamlfile, "_Loader", _ImpatientLoader)
    assert problems_of("a: 1\nb: " + "[" * 500 + "]" * 500) == ["f.yaml:2: YAML nested too deeply (more than 64 levels)"]
    # its other errors pass through unchanged, brackets or not
    (message,) = problems_of('"' + "[" * 100 + '" ]\n')
    assert "invalid YAML" in message and "nested" not in message
    assert parse_yaml("[" * 64 + "]" * 64).data is not None


def test_deep_nesting_through_aliases_is_refused():
    inner = "[" * 40 + "1" + "]" * 40
    text = f"a: &a {inner}\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n"
    assert "nested too deeply" in problems_of(text)[0]


def test_files_over_the_limit_are_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(laughs(1024 * 1024))
    with pytest.raises(ConfigError) as info:
        load_yaml(big, "big.yaml")
    assert str(info.value) == f"big.yaml: file too large (more than {MAX_BYTES // 1024} KiB)"


def test_load_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_yaml(tmp_path / "missing.yaml", "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"a: 1\nb: \xff\xfe\n")
    with pytest.raises(ConfigError, match="bad.yaml:2: not valid UTF-8"):
        load_yaml(bad, "bad.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("a: [1, 2]\n")
    assert load_yaml(good).data == {"a": [1, 2]}
    assert load_yaml(good).filename == str(good)


def test_format_path():
    assert format_path(("runners", 0, "port")) == "runners[0].port"
    assert format_path((3, "a")) == "[3].a"
    assert format_path(()) == ""


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{},&*!? \n'\"#<|>01.")), max_size=80))
def test_any_text_loads_or_raises_config_error(text):
    try:
        parse_yaml(text, "fuzz.yaml")
    except ConfigError:
        pass


def test_control_characters_are_located():
    assert problems_of("a: 1\nb: \x07\n") == ["f.yaml:2: invalid YAML: unacceptable character #x0007"]


def test_pure_python_parser_gives_the_same_answers(monkeypatch):
    import yaml

    from narwhal.config import yamlfile

    monkeypatch.setattr(yamlfile, "_Loader", yaml.SafeLoader)
    doc = parse_yaml("a: &x [1, {b: 2}]\nc: *x\n")
    assert doc.data == {"a": [1, {"b": 2}], "c": [1, {"b": 2}]} and doc.line_of(("c",)) == 2
    assert "too large after alias expansion" in problems_of(laughs(400))[0]
    assert "nested too deeply" in problems_of("[" * 100 + "]" * 100)[0]
    assert problems_of("a: 1\na: 2\n") == ["f.yaml:2: a: duplicate key (first at line 1)"]


def test_matching_builds_a_validator_with_the_expected_message():
    import re

    from narwhal.config.yamlfile import matching

    check = matching(re.compile(r"[a-z]+"), "lowercase letters", max_length=5)
    assert check("abc") == "abc"
    with pytest.raises(ValueError, match=r"^expected lowercase letters, got 'ABC'$"):
        check("ABC")
    with pytest.raises(ValueError, match="expected lowercase letters"):
        check("abcdef")  # matches, but too long
