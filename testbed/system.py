"""The machine's processes and accounts: the runner user, process trees and signals.

Processes are read from /proc, so procps is not needed.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
from pathlib import Path

from narwhal.cli.engine import ensure_apt_packages, is_root, locked, run
from testbed.errors import TestbedUnavailable

RUNNER_USER = "nwrunner"

# --- runner user --------------------------------------------------------------------

_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _in_group(user: str, group: str) -> bool:
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return False
    return user in g.gr_mem or pwd.getpwnam(user).pw_gid == g.gr_gid


def _passwordlocked(user: str) -> bool:
    """True when sshd without PAM would refuse the account ('!' password); unknown counts as fine."""
    try:
        with open("/etc/shadow") as f:
            for line in f:
                fields = line.split(":")
                if fields[0] == user:
                    return fields[1].startswith("!")
    except OSError:
        pass
    return False


def _user_ready(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return _in_group(user, "docker") and not _passwordlocked(user)


def ensure_runner_user(user: str = RUNNER_USER) -> str:
    """The unprivileged account runner hosts log in as: /bin/sh, in group docker, unlocked for sshd."""
    if not _USER_RE.match(user):
        raise ValueError(f"invalid user name {user!r}")
    ensure_apt_packages({"docker": "docker.io"})  # creates the docker group
    if _user_ready(user):
        return user
    if not is_root():
        raise TestbedUnavailable(f"runner user {user!r} must exist, be in group docker and be unlocked; "
                                 f"creating it needs root (uid {os.geteuid()})")
    with locked("user"):
        try:
            grp.getgrnam("docker")
        except KeyError:
            run(["groupadd", "-r", "docker"])
        try:
            pwd.getpwnam(user)
        except KeyError:
            run(["useradd", "-m", "-s", "/bin/sh", "-G", "docker", user])
        if not _in_group(user, "docker"):
            run(["usermod", "-a", "-G", "docker", user])
        if _passwordlocked(user):
            run(["usermod", "-p", "*", user])  # '*': no password login, but not locked
    return user


# --- process trees ------------------------------------------------------------------


def _process_table() -> dict[int, int]:
    """pid -> parent pid for every process (from /proc, so procps is not needed)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm (field 2) may contain spaces and parentheses: parse after the last ')'
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":  # a zombie has already exited; only its parent's wait() is missing
            table[int(entry)] = int(ppid)
    return table


def _descendants(pid: int) -> list[int]:
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, parent in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stopped(pid: int) -> bool:
    """True when PID is stopped by a signal (state T) or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "Z", "X")
    except (OSError, IndexError):
        return True


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def every_cmdline() -> bytes:
    """The argv of every process on the machine, NUL-separated as /proc has it, one per line:
    where a test looks for a value that must never be an argument."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return b"\n".join(out)


def everything_under(path: Path) -> bytes:
    """Every regular file's bytes under PATH (links not followed): a state directory a value must not reach."""
    return b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file() and not p.is_symlink())
