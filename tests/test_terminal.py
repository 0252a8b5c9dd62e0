"""testbed.terminal: the pty and the small screen the report layouts are checked on."""

from __future__ import annotations

import os
import sys

from testbed.terminal import Screen, run_in_pty


def test_text_lines_and_scrolling():
    screen = Screen(10, 3)
    screen.feed("one\r\ntwo\r\nthree\r\nfour\r\n")
    assert screen.history == ["one", "two"] and screen.text() == ["three", "four", ""]
    assert screen.transcript() == ["one", "two", "three", "four"] and screen.wrapped == 0
    screen.feed("0123456789ab")
    assert screen.wrapped == 1  # one wrap: "ab" went to a line of their own


def test_cursor_moves_erase_and_colour():
    screen = Screen(20, 4)
    screen.feed("\x1b[1mbold\x1b[0m line\r\nsecond\r\n")
    screen.feed("\x1b[2A\r\x1b[2Kreplaced\x1b[3;5Hx\x1b[?25l")
    assert screen.text() == ["replaced", "second", "    x", ""]
    screen.feed("\x1b[1;1H\x1b[K\x1b[2J")
    assert screen.text() == ["", "", "", ""]


def test_the_alternate_screen_is_kept_when_left():
    screen = Screen(12, 3)
    screen.feed("before\r\n\x1b[?1049h\x1b[Hframe one\x1b[Hframe two\x1b[?1049l")
    assert screen.alternate_seen == ["frame two", "", ""]
    assert screen.text()[0] == "before"


def test_a_pty_of_a_given_size():
    code = "import os, sys; c, r = os.get_terminal_size(); print(c, r, sys.stdout.isatty())"
    run = run_in_pty([sys.executable, "-c", code], 77, 21, dict(os.environ, COLUMNS="200"))
    assert run.finish() == 0
    assert run.screen(80, 24).transcript() == ["77 21 True"]
