"""A command under a pseudo-terminal of a given size, and the screen it leaves.

``run_in_pty(argv, cols, rows)`` starts a process whose stdin, stdout and stderr are a
pty of that size (``TIOCSWINSZ``, so it learns the size as it would in a terminal window);
``Screen`` is a small VT100 emulator, enough for what rich writes (text, CR/LF, SGR,
cursor moves, erase, the alternate screen), that turns the bytes into the lines a person
would see. Lines written past the right edge are counted (``wrapped``): a layout that fits
has none.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_CSI = re.compile(r"\x1b\[([0-?]*)([ -/]*)([@-~])")
_OSC = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


@dataclass
class Screen:
    cols: int
    rows: int
    lines: list[list[str]] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # lines scrolled off the top
    row: int = 0
    col: int = 0
    wrapped: int = 0  # characters written past the right edge
    alternate: list[list[str]] | None = None  # the main screen, while the alternate one shows
    alternate_seen: list[str] | None = None  # the alternate screen as it was when it was left

    def __post_init__(self) -> None:
        self.lines = self._blank()

    def _blank(self) -> list[list[str]]:
        return [[" "] * self.cols for _ in range(self.rows)]

    def text(self) -> list[str]:
        """The screen now, each line without trailing blanks."""
        return [("".join(line)).rstrip() for line in self.lines]

    def transcript(self) -> list[str]:
        """Everything written to the main screen: what scrolled away, then the screen."""
        screen = self.text()
        while screen and not screen[-1]:
            screen.pop()
        return self.history + screen

    def feed(self, data: str) -> None:
        data = _OSC.sub("", data)
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                match = _CSI.match(data, i)
                if match:
                    self._csi(match.group(1), match.group(3))
                    i = match.end()
                    continue
                i += 2  # a two-character escape (ESC 7, ESC =): nothing to draw
                continue
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self._line_feed()
            elif ch == "\b":
                self.col = max(0, self.col - 1)
            elif ch >= " ":
                if self.col >= self.cols:
                    self.wrapped += 1
                    self.col = 0
                    self._line_feed()
                self.lines[self.row][self.col] = ch
                self.col += 1
            i += 1

    def _line_feed(self) -> None:
        if self.row + 1 < self.rows:
            self.row += 1
            return
        top = self.lines.pop(0)
        if self.alternate is None:
            self.history.append("".join(top).rstrip())
        self.lines.append([" "] * self.cols)

    def _csi(self, params: str, command: str) -> None:
        private = params.startswith("?")
        numbers = [int(p) if p.isdigit() else 0 for p in params.lstrip("?").split(";")] if params.lstrip("?") else []
        n = numbers[0] if numbers and numbers[0] else 1
        if private and command in "hl" and 1049 in numbers:
            if command == "h" and self.alternate is None:
                self.alternate, self.lines = self.lines, self._blank()
            elif command == "l" and self.alternate is not None:
                self.alternate_seen = self.text()
                self.lines, self.alternate = self.alternate, None
            return
        if private:
            return  # cursor visibility and other modes
        if command == "A":
            self.row = max(0, self.row - n)
        elif command == "B":
            self.row = min(self.rows - 1, self.row + n)
        elif command == "C":
            self.col = min(self.cols, self.col + n)
        elif command == "D":
            self.col = max(0, self.col - n)
        elif command == "G":
            self.col = min(self.cols - 1, n - 1)
        elif command in "Hf":
            row = numbers[0] if numbers and numbers[0] else 1
            col = numbers[1] if len(numbers) > 1 and numbers[1] else 1
            self.row, self.col = min(self.rows, row) - 1, min(self.cols, col) - 1
        elif command == "J":
            mode = numbers[0] if numbers else 0
            if mode in (2, 3):
                self.lines = self._blank()
            elif mode == 0:
                self.lines[self.row][self.col:] = [" "] * (self.cols - self.col)
                for r in range(self.row + 1, self.rows):
                    self.lines[r] = [" "] * self.cols
        elif command == "K":
            mode = numbers[0] if numbers else 0
            if mode == 2:
                self.lines[self.row] = [" "] * self.cols
            elif mode == 0:
                self.lines[self.row][self.col:] = [" "] * (self.cols - self.col)
            elif mode == 1:
                self.lines[self.row][:self.col + 1] = [" "] * (self.col + 1)
        # "m" (colour) and anything else: nothing to draw


@dataclass
class PtyRun:
    """A process on a pty: its output so far, and a way to wait for some of it."""

    proc: subprocess.Popen
    master: int
    output: bytearray = field(default_factory=bytearray)

    def read(self, timeout: float) -> bool:
        """Read what is there within ``timeout``; False once the process closed the pty."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError as exc:
            if exc.errno == errno.EIO:  # the other end is closed
                return False
            raise
        if not data:
            return False
        self.output += data
        return True

    def wait_for(self, condition: Callable[[str], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.text()):
            if time.monotonic() > deadline or not self.read(0.2):
                raise AssertionError(f"not seen within {timeout}s:\n{self.text()[-3000:]}")

    def finish(self, timeout: float = 60) -> int:
        """Read to the end and reap the process."""
        deadline = time.monotonic() + timeout
        while self.read(0.2):
            if time.monotonic() > deadline:
                self.proc.kill()
                break
        os.close(self.master)
        return self.proc.wait(timeout=30)

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def screen(self, cols: int, rows: int) -> Screen:
        screen = Screen(cols, rows)
        screen.feed(self.text())
        return screen


def run_in_pty(argv: list[str], cols: int, rows: int, env: dict[str, str]) -> PtyRun:
    """Start ARGV with a pty of COLS x ROWS as its terminal (no COLUMNS/LINES: it asks the pty)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                            close_fds=True)
    os.close(slave)
    return PtyRun(proc, master)
