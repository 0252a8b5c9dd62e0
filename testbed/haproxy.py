"""HAProxy from Debian's ``haproxy`` package in front of test dispatchers, running the example
that ships with narwhal (``deploy/haproxy.cfg``), so that what docs/deploy.md shows is what the
HA test runs.

``render`` changes exactly two things in the example, by a rule a reader can check: the address
on its one ``bind`` line becomes the test's (the rest of that line kept), and its ``server``
lines become one line per test node, each written like the example's first ``server`` line
(its options kept, the example server's name, which is also its cookie value, replaced by
``node1``, ``node2``, ...). Everything else (timeouts, health check, retries, persistence, the
per-client stream limit) is the shipped file as it is. The result is checked with
``haproxy -c`` before it runs.

HAProxy runs in the foreground (``-db``) as our child, on 127.0.0.1 and a free port, logging
to a file (the example logs to stderr), from which a test reads request lines (which server,
how many retries, redispatched or not) and server state changes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from narwhal.api.server import free_port
from narwhal.cli.engine import ensure_apt_packages, is_root
from testbed.errors import TestbedUnavailable

HAPROXY = "/usr/sbin/haproxy"
EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
BACKEND = "narwhal"  # the example's backend, as its log lines name it
START_TIMEOUT = 10.0
CONFIG, LOG = "haproxy.cfg", "haproxy.log"


def ensure_haproxy() -> str:
    """Debian's haproxy (installed when missing: apt-get, as root); its path."""
    ensure_apt_packages({HAPROXY: "haproxy"})
    return HAPROXY


def _directive(line: str) -> str:
    words = line.split("#", 1)[0].split()
    return words[0] if words else ""


def render(example: str, listen: str, servers: list[str]) -> str:
    """The example with ``listen`` (HOST:PORT) on its bind line and one server line per address
    in ``servers``; ValueError when the example does not have the shape this relies on."""
    lines = example.splitlines()
    binds = [i for i, line in enumerate(lines) if _directive(line) == "bind"]
    found = [i for i, line in enumerate(lines) if _directive(line) == "server"]
    if len(binds) != 1:
        raise ValueError(f"the example has {len(binds)} bind lines; the test replaces exactly one")
    if not found or found != list(range(found[0], found[0] + len(found))):
        raise ValueError("the example's server lines must be one block of consecutive lines")
    if not servers:
        raise ValueError("no servers to put behind HAProxy")
    bind = lines[binds[0]]
    indent, rest = bind[:len(bind) - len(bind.lstrip())], bind.split("#", 1)[0].split()
    lines[binds[0]] = " ".join([indent + "bind", listen, *rest[2:]])
    template = lines[found[0]].split("#", 1)[0].split()  # server NAME ADDRESS OPTION...
    if len(template) < 3:
        raise ValueError(f"the example's server line {lines[found[0]].strip()!r} has no address")
    indent = lines[found[0]][:len(lines[found[0]]) - len(lines[found[0]].lstrip())]
    name = template[1]
    made = []
    for n, address in enumerate(servers, start=1):
        options = [f"node{n}" if word == name else word for word in template[3:]]
        made.append(" ".join([indent + "server", f"node{n}", address, *options]))
    lines[found[0]:found[-1] + 1] = made
    return "\n".join(lines) + "\n"


@dataclass
class HAProxy:
    """A running haproxy (the rendered example); ``stop()`` ends it and removes its directory."""

    proc: subprocess.Popen
    port: int
    root: str  # its config and log
    servers: list[str]  # the server names, node1.., in the order of the addresses given

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> str:
        return os.path.join(self.root, CONFIG)

    def log(self) -> str:
        try:
            with open(os.path.join(self.root, LOG), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def request_lines(self) -> list[str]:
        """The HTTP log lines (option httplog), one per request once it ended."""
        return [line for line in self.log().splitlines() if f" {BACKEND}/" in line and '"' in line]

    def state_changes(self, server: str, state: str) -> int:
        """How many times the log said ``server`` went ``state`` (UP or DOWN)."""
        return len(re.findall(rf"Server {BACKEND}/{re.escape(server)} is {state}\b", self.log()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a hard stop: open connections are closed
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_haproxy(servers: list[str], say: Callable[[str], None] = lambda _text: None) -> HAProxy:
    """HAProxy on 127.0.0.1 and a free port in front of ``servers`` (HOST:PORT each), running
    the rendered example; TestbedUnavailable when this machine cannot run it."""
    binary = ensure_haproxy()
    if not is_root():  # the example drops privileges into a chroot, as Debian's service does
        raise TestbedUnavailable("the HAProxy example chroots to /var/lib/haproxy and runs as user haproxy: "
                                 "run the tests as root")
    example = EXAMPLE.read_text()
    names = [f"node{n}" for n in range(1, len(servers) + 1)]
    root = tempfile.mkdtemp(prefix="nwhaproxy-", dir="/tmp")
    config, log_path = os.path.join(root, CONFIG), os.path.join(root, LOG)
    for _ in range(5):  # another process may take the port between looking and listening
        port = free_port()
        with open(config, "w") as f:
            f.write(render(example, f"127.0.0.1:{port}", servers))
        check = subprocess.run([binary, "-c", "-q", "-f", config], capture_output=True, timeout=30)
        if check.returncode != 0:  # the example itself is wrong: a failure, not a missing tool
            shutil.rmtree(root, ignore_errors=True)
            raise AssertionError(f"haproxy -c refused the example {EXAMPLE} as rendered:\n"
                                 f"{check.stdout.decode(errors='replace')}{check.stderr.decode(errors='replace')}")
        with open(log_path, "ab") as log:  # appended to: a truncated file would grow a hole
            proc = subprocess.Popen([binary, "-db", "-f", config], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        proxy = HAProxy(proc, port, root, names)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None and not _listening(port):
            time.sleep(0.05)
        if proc.poll() is None and _listening(port):
            say(f"HAProxy on {proxy.url} in front of {', '.join(servers)}")
            return proxy
        text = proxy.log()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if "Address already in use" not in text and "cannot bind" not in text:
            shutil.rmtree(root, ignore_errors=True)
            raise TestbedUnavailable(f"haproxy did not start:\n{text[-3000:]}")
    shutil.rmtree(root, ignore_errors=True)
    raise TestbedUnavailable("haproxy found no free port in 5 tries")
