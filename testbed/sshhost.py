"""sshd runner hosts on loopback addresses: keys, known_hosts, start/stop/kill/freeze.

Only OpenSSH's own tools are used (subprocess); asyncssh stays in ``narwhal.execution.ssh``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field

from narwhal.api.server import port_free
from narwhal.cli.engine import ensure_apt_packages, run, wait_until
from testbed.errors import PortInUse, TestbedUnavailable
from testbed.system import RUNNER_USER, _descendants, _process_table, _signal, _stopped, ensure_runner_user

SSHD = "/usr/sbin/sshd"


def _keygen(path: str, comment: str) -> None:
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])


def _public_key(private_path: str) -> str:
    """'ssh-ed25519 AAAA...' (type and key, without the comment)."""
    with open(private_path + ".pub") as f:
        return " ".join(f.read().split()[:2])


def known_hosts_line(address: str, port: int, host_pubkey: str) -> str:
    """The client's known_hosts entry: port 22 is written bare, any other as [ADDRESS]:PORT."""
    where = address if port == 22 else f"[{address}]:{port}"
    return f"{where} {host_pubkey}\n"


@dataclass
class SshHost:
    """One sshd on a loopback address that plays a runner machine; start/stop/kill/freeze like one."""

    name: str
    address: str
    port: int
    user: str
    key_path: str
    known_hosts_path: str
    host_pubkey: str
    workdir: str
    pid: int | None = None
    netns: str | None = None  # network namespace sshd runs in (see NetnsLink), else the host's
    also: list[tuple[str, int]] = field(default_factory=list)  # more (address, port) it listens on
    _proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)
    _keys_dir: str | None = field(default=None, repr=False, compare=False)

    @property
    def config_path(self) -> str:
        return os.path.join(self.workdir, "sshd_config")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "sshd.log")

    @property
    def host_key_path(self) -> str:
        return os.path.join(self.workdir, "ssh_host_ed25519_key")

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def runner_config(self, **extra) -> dict:
        """This host as an inventory runner entry (ssh transport, its own key and known_hosts)."""
        return {"name": self.name, "host": self.address, "port": self.port, "user": self.user,
                "key": self.key_path, "known_hosts": self.known_hosts_path, "transport": "ssh",
                "labels": [], "capacity": 1, **extra}

    def ssh_argv(self, command: list[str], *, connect_timeout: float = 10) -> list[str]:
        """An OpenSSH client argv running COMMAND here, strict host keys, no user ssh config."""
        return ["ssh", "-F", "/dev/null", "-i", self.key_path, "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts_path}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={connect_timeout:g}", "-p", str(self.port),
                f"{self.user}@{self.address}", "--", shlex.join(command)]

    def listen_also(self, address: str, port: int) -> None:
        """Listen on ``address:port`` too (a dispatcher in a network namespace reaches the host at its
        cable's gateway), with a known_hosts line for it; sshd restarts if it runs (its sessions end)."""
        ipaddress.ip_address(address)
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {port!r}")
        if not port_free(address, port):
            raise PortInUse(f"{self.name}: {address}:{port} is already in use")
        self.also.append((address, port))
        with open(self.known_hosts_path, "w") as f:
            f.writelines(known_hosts_line(a, p, self.host_pubkey) for a, p in [(self.address, self.port), *self.also])
        if self.is_running:
            self.stop()
            self.start()

    def _sshd_config(self) -> str:
        assert self._keys_dir is not None
        return "\n".join([
            *(f"ListenAddress {address}:{port}" if ":" not in address else f"ListenAddress [{address}]:{port}"
              for address, port in [(self.address, self.port), *self.also]),
            f"HostKey {self.host_key_path}",
            f"PidFile {os.path.join(self.workdir, 'sshd.pid')}",
            f"AuthorizedKeysFile {self._keys_dir}/%u",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin no",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "MaxSessions 100",
            "MaxStartups 100:30:200",
            "LogLevel VERBOSE",
            "",
        ])

    def _write_authorized_keys(self) -> None:
        # sshd reads authorized keys with the user's uid, and a test's workdir (pytest's tmp_path is
        # 0700) is often unreadable for the runner user: keep them in a world-traversable dir of our own.
        self._keys_dir = tempfile.mkdtemp(prefix=f"narwhal-authkeys-{self.name}-", dir="/tmp")
        os.chmod(self._keys_dir, 0o755)
        path = os.path.join(self._keys_dir, self.user)
        with open(path, "w") as f:
            f.write(_public_key(self.key_path) + "\n")
        os.chmod(path, 0o644)

    def _remove_authorized_keys(self) -> None:
        if self._keys_dir:
            shutil.rmtree(self._keys_dir, ignore_errors=True)
            self._keys_dir = None

    def start(self, timeout: float = 30) -> None:
        """Start sshd and wait until it listens; a no-op when already running."""
        if self.is_running:
            return
        if self.netns is None and not port_free(self.address, self.port):
            raise PortInUse(f"{self.name}: {self.address}:{self.port} is already in use")
        self._write_authorized_keys()
        with open(self.config_path, "w") as f:
            f.write(self._sshd_config())
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        with open(self.log_path, "ab") as log:
            # `ip netns exec` execs sshd in the namespace: the pid is still sshd's own.
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self._proc = subprocess.Popen([*prefix, SSHD, "-D", "-f", self.config_path, "-E", self.log_path],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True, close_fds=True)
        self.pid = self._proc.pid
        proc = self._proc
        if wait_until(lambda: proc.poll() is not None or self._listening(offset), timeout) and proc.poll() is None:
            return
        log_text = self._log_since(offset)
        self.kill()
        if "Address already in use" in log_text:
            raise PortInUse(f"{self.name}: {self.address}:{self.port} is already in use")
        state = f"exited with status {proc.returncode}" if proc.returncode is not None else \
            f"did not listen within {timeout:g}s"
        raise TestbedUnavailable(f"sshd for {self.name} on {self.address}:{self.port} {state}; "
                                 f"{self.log_path}:\n{log_text[-2000:]}")

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _listening(self, offset: int) -> bool:
        return "Server listening on" in self._log_since(offset)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM sshd and its sessions and wait; SIGKILL whatever outlives the timeout."""
        if self._proc is None:
            return
        tree = [self._proc.pid, *_descendants(self._proc.pid)]
        _signal(tree, signal.SIGCONT)  # a frozen process would not act on SIGTERM
        _signal(tree, signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        def alive() -> list[int]:
            table = _process_table()
            return [pid for pid in tree[1:] if pid in table]

        if alive() and not wait_until(lambda: not alive(), timeout):
            _signal(alive(), signal.SIGKILL)
        self.kill()

    def kill(self) -> None:
        """SIGKILL sshd and every process below it, like pulling the plug."""
        if self._proc is not None:
            if self._proc.poll() is None:
                tree = [self._proc.pid, *_descendants(self._proc.pid)]
                _signal(tree[:1], signal.SIGSTOP)  # no new children while we collect them
                tree = [self._proc.pid, *_descendants(self._proc.pid)]
                _signal(tree, signal.SIGKILL)
            self._proc.wait()
        self._remove_authorized_keys()

    def freeze(self) -> None:
        """SIGSTOP sshd and all its descendants: the host hangs, its connections stay open."""
        if not self.is_running:
            return
        _signal([self._proc.pid], signal.SIGSTOP)  # stop the parent first so it forks no more
        seen: set[int] = {self._proc.pid}
        while True:  # children may fork until they are stopped themselves
            new = [pid for pid in _descendants(self._proc.pid) if pid not in seen]
            if not new:
                break
            _signal(new, signal.SIGSTOP)
            seen.update(new)
        # signals arrive asynchronously: return only once every process really is stopped
        if not wait_until(lambda: all(_stopped(pid) for pid in seen), 30, 0.01):
            raise TestbedUnavailable(f"{self.name}: sshd processes did not stop: {sorted(seen)}")

    def thaw(self) -> None:
        """SIGCONT everything freeze() stopped."""
        if self._proc is None or self._proc.poll() is not None:
            return
        _signal([self._proc.pid, *_descendants(self._proc.pid)], signal.SIGCONT)

    def regenerate_host_key(self) -> None:
        """Give the host a new key (restarting sshd if it runs); known_hosts keeps the old one."""
        running = self.is_running
        if running:
            self.stop()
        for path in (self.host_key_path, self.host_key_path + ".pub"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        _keygen(self.host_key_path, f"narwhal-testbed {self.name}")
        self.host_pubkey = _public_key(self.host_key_path)
        if running:
            self.start()


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def start_ssh_host(name: str, address: str, workdir: str, *, client_key: str | None = None,
                   port: int = 22, user: str = RUNNER_USER, netns: str | None = None) -> SshHost:
    """Start an sshd runner host on ADDRESS:PORT with its own host key, known_hosts and logs in WORKDIR."""
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid host name {name!r}: letters, digits, '.', '_' and '-' only")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"invalid address {address!r}: expected an IP address such as 127.0.0.20") from None
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port!r}")
    ensure_apt_packages({SSHD: "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client"})
    ensure_runner_user(user)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    host_key = os.path.join(workdir, "ssh_host_ed25519_key")
    _keygen(host_key, f"narwhal-testbed {name}")
    client_key = os.path.abspath(client_key or os.path.join(workdir, "client_ed25519"))
    _keygen(client_key, "narwhal-testbed client")  # only when it does not exist yet
    host_pubkey = _public_key(host_key)
    known_hosts = os.path.join(workdir, "known_hosts")
    with open(known_hosts, "w") as f:
        f.write(known_hosts_line(address, port, host_pubkey))
    host = SshHost(name=name, address=address, port=port, user=user, key_path=client_key,
                   known_hosts_path=known_hosts, host_pubkey=host_pubkey, workdir=workdir, netns=netns)
    host.start()
    return host


def start_ssh_hosts(n: int, workdir: str, first: int = 10) -> list[SshHost]:
    """N runner hosts runner-1..N on 127.0.0.FIRST, FIRST+1, ...; they share one client key."""
    if n < 1 or first < 1 or first + n - 1 > 254:
        raise ValueError(f"cannot place {n} hosts on 127.0.0.{first}..: addresses end at 127.0.0.254")
    os.makedirs(workdir, exist_ok=True)
    client_key = os.path.join(os.path.abspath(workdir), "client_ed25519")
    ensure_apt_packages({"ssh-keygen": "openssh-client"})
    _keygen(client_key, "narwhal-testbed client")
    hosts: list[SshHost] = []
    try:
        for i in range(n):
            name = f"runner-{i + 1}"
            hosts.append(start_ssh_host(name, f"127.0.0.{first + i}", os.path.join(workdir, name),
                                        client_key=client_key))
    except BaseException:
        for host in hosts:
            host.kill()
        raise
    return hosts
