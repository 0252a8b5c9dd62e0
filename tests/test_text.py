"""narwhal.text: job-controlled text made inert for a terminal (colour kept in logs, nothing else)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from narwhal.text import is_inert, log_text_line, looks_like_narwhal, printable, terminal_safe

ESC = "\x1b"
SGR = re.compile(r"\x1b\[[0-9;:]*m")

HOSTILE = {
    "osc title (BEL)": ("a\x1b]0;pwned\x07b", "ab"),
    "osc title (ST)": ("a\x1b]2;pwned\x1b\\b", "ab"),
    "osc 8 hyperlink": ("\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\", "click"),
    "osc 52 clipboard": ("\x1b]52;c;cm0gLXJmIH4=\x07x", "x"),
    "unterminated osc": ("a\x1b]0;title to the end", "a"),
    "clear screen": ("\x1b[2J\x1b[Hhello", "hello"),
    "cursor up, erase line": ("x\x1b[1A\x1b[2Ky", "xy"),
    "private mode (alt screen)": ("\x1b[?1049hz", "z"),
    "unfinished csi": ("z\x1b[12", "z"),
    "dcs": ("\x1bP1$r0m\x1b\\ok", "ok"),
    "apc / pm / sos": ("\x1b_apc\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\ok", "ok"),
    "two-byte escapes": ("\x1bc\x1b7\x1b8\x1b(0ok", "ok"),
    "bare esc at end": ("ok\x1b", "ok"),
    "bel": ("ding\x07", "ding\\x07"),
    "backspace": ("pass\x08\x08\x08\x08fail", "pass\\x08\\x08\\x08\\x08fail"),
    "carriage return mid-line": ("PASSED\rFAILED", "PASSED\\x0dFAILED"),
    "nul and del": ("a\x00b\x7fc", "a\\x00b\\x7fc"),
    "c1 csi": ("\x9b2J", "\\x9b2J"),
    "c1 osc and st": ("\x9d0;t\x9c", "\\x9d0;t\\x9c"),
    "bidi override": ("evil\u202egnp.exe", "evil\\u202egnp.exe"),
    "bidi embeddings": ("\u202aa\u202bb\u202cc\u202dd", "\\u202aa\\u202bb\\u202cc\\u202dd"),
    "bidi isolates": ("\u2066a\u2067b\u2068c\u2069", "\\u2066a\\u2067b\\u2068c\\u2069"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_every_class_of_control_is_made_inert(name):
    text, expected = HOSTILE[name]
    assert terminal_safe(text) == expected
    assert printable(text) == expected
    assert is_inert(terminal_safe(text)) and is_inert(printable(text), colour=False)


def test_colour_is_kept_in_logs_and_dropped_from_one_line_fields():
    line = "\x1b[1;31mFAIL\x1b[0m \x1b[38;5;208morange\x1b[m \x1b[38:2:1:2:3mtruecolor\x1b[0m"
    assert terminal_safe(line) == line
    assert terminal_safe(line, colour=False) == "FAIL orange truecolor"
    assert printable(line) == "FAIL orange truecolor"
    assert is_inert(line) and not is_inert(line, colour=False)


def test_plain_text_is_unchanged():
    for text in ("", "hello world", "tab\tseparated", "caf\u00e9 \u65e5\u672c \U0001f40b", "[bold]x[/] [link=a]b[/link]",
                 "\ufffd", "a\\x1b literal backslash"):
        assert terminal_safe(text) == text
        assert printable(text) == text


def test_newlines_and_crlf():
    assert terminal_safe("one\ntwo\n") == "one\ntwo\n"  # logs keep their lines
    assert terminal_safe("one\r\ntwo\r\n") == "one\ntwo\n"  # CRLF output shows as lines, not \x0d
    assert terminal_safe("50%\r100%\r\n") == "50%\\x0d100%\n"  # a mid-line CR cannot overwrite
    assert terminal_safe("a\x1b]0;t\nb") == "a\nb"  # an unterminated OSC ends at the line
    assert printable("docker: error\nsecond line") == "docker: error\\x0asecond line"


def test_printable_cuts_to_a_limit():
    assert printable("x" * 10, 5) == "xxxx\u2026"
    assert printable("x" * 5, 5) == "x" * 5
    assert printable(None) == "None" and printable(42) == "42"
    assert len(printable("\x07" * 100, 20)) == 20


def test_the_reported_docker_reason():
    reason = "docker: Error response from daemon: \x1b]0;owned\x07\x1b[2Jbad\x1b[31m thing\x1b[0m."
    assert printable(reason, 200) == "docker: Error response from daemon: bad thing."


any_text = st.text(alphabet=st.sampled_from(
    ["\x1b", "[", "]", "\\", "m", "0", "1", ";", ":", "?", "P", "_", "^", "X", "\x07", "\x9b", "\x9c",
     "\r", "\n", "\t", "\x08", "\x7f", "\x00", "\u202e", "\u2066", "a", "H", "J", " ", "\u00e9"]), max_size=60)


@settings(max_examples=1000, deadline=None)
@given(any_text)
def test_output_never_holds_esc_outside_a_valid_sgr_and_is_idempotent(text):
    safe = terminal_safe(text)
    assert ESC not in SGR.sub("", safe)
    assert is_inert(safe)
    assert terminal_safe(safe) == safe
    one = printable(text)
    assert ESC not in one and "\n" not in one and "\r" not in one
    assert is_inert(one, colour=False)
    assert printable(one) == one
    assert printable(text, 10) == printable(printable(text, 10), 10)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_unicode_is_inert_after_either_function(text):
    assert is_inert(terminal_safe(text)) and is_inert(printable(text), colour=False)
    assert not set(terminal_safe(text)) & ({chr(c) for c in range(0x80, 0xa0)} | {"\x00", "\x07", "\x08", "\x7f"})


# --- finding 7: a step line never reads as narwhal's --------------------------------------

LOOK_ALIKES = ["[narwhal] step build: exit 0", "  [NARWHAL] x", "\x1b[2;36m[narwhal] x\x1b[0m",
               "\u200b[narwhal] x", "[nar\u200dwhal] x", "\uff3bnarwhal\uff3d x", "\x1b]0;t\x07[narwhal] x",
               "\t[Narwhal]"]


@pytest.mark.parametrize("line", LOOK_ALIKES)
def test_finding7_look_alike_step_lines_are_marked(line):
    assert looks_like_narwhal(line)
    assert log_text_line(line, "step") == "[step] " + line


@pytest.mark.parametrize("line", ["", "ok", "[step] [narwhal] x", "x [narwhal] y", "[narwhale"])
def test_finding7_ordinary_step_lines_are_unchanged(line):
    assert not looks_like_narwhal(line) and log_text_line(line, "step") == line


def test_finding7_narwhal_lines_carry_the_mark():
    assert log_text_line("step build: exit 0 (1.0s)", "narwhal") == "[narwhal] step build: exit 0 (1.0s)"


@pytest.mark.parametrize("line", [
    "[n\u0430rwhal] step build: exit 0",  # a Cyrillic 'а'
    "\u0301[narwhal] step build: exit 0",  # a combining mark first
    "\U000e0020[narwhal] step build: exit 0",  # a tag character
    "\ufff9[narwhal] step build: exit 0",  # an interlinear annotation anchor
    "\U0001d173[narwhal] step build: exit 0",  # a musical format character
    "\u2800[narwhal] step build: exit 0",  # a braille blank
    "abc\r[narwhal] step build: exit 0",  # a carriage return overwrites "abc"
    "\u27e6narwhal\u27e7 step build: exit 0",  # other brackets
])
def test_finding7_look_alikes_found_by_a_second_attack_pass_are_marked(line):
    assert looks_like_narwhal(line)
    assert log_text_line(line, "step").startswith("[step] ")


@pytest.mark.parametrize("line", ["[INFO] building", "[narwhals] x", "[\u043d\u0430\u0440\u0432\u0430\u043b] x",
                                  "[n\u0430rwhale] x", "narwhal: done", "\u00e9t\u00e9 [narwhal]"])
def test_lines_that_only_resemble_narwhal_in_passing_are_left_alone(line):
    assert not looks_like_narwhal(line)
