"""A throwaway PostgreSQL cluster: Debian's ``postgresql`` package, started in a temp dir.

``initdb`` refuses root and Debian keeps the binaries off PATH
(``/usr/lib/postgresql/VERSION/bin``); the system cluster needs systemd, which is not
there. So: ``initdb`` as the ``postgres`` user (as ourselves when not root) into a fresh
directory under /tmp (short: the unix socket's path must fit in 107 bytes), then
``pg_ctl start`` on 127.0.0.1 and a free port, with durability off (fsync, full-page writes,
synchronous commit: a test cluster dies with its tests). The superuser ``narwhal`` logs in
over TCP with a password (scram-sha-256), so the store's password path is the real one.

A dispatcher in a network namespace (``NetnsLink``) reaches the cluster through its cable:
``listen_also(link.gateway, link.network)`` adds that address and lets that network in
(restarting the server, which keeps its data), ``stop_listening`` takes them away again.

Tests take a fresh database each (``database()``: ``CREATE DATABASE ... TEMPLATE``), copied
from a template that the store has already migrated, which takes a few tens of ms.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from narwhal.cli.engine import ensure_apt_packages, is_root, run
from testbed.errors import TestbedUnavailable

USER = "narwhal"
_HBA_MARK = "# narwhal-testbed client network"
DEBIAN_12_INITDB = "/usr/lib/postgresql/15/bin/initdb"


def postgres_bin() -> str:
    """The directory of the newest installed server's binaries (installing ``postgresql`` if none)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        ensure_apt_packages({DEBIAN_12_INITDB: "postgresql"})
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise TestbedUnavailable("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                                 "(Debian package postgresql)")
    return os.path.dirname(found[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresCluster:
    """A running throwaway cluster; ``stop()`` ends it and removes its directory."""

    root: str
    port: int
    password: str
    bindir: str
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1"])  # listen_addresses
    clients: list[str] = field(default_factory=list)  # networks let in besides loopback (pg_hba.conf)
    _counter: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def data(self) -> str:
        return os.path.join(self.root, "data")

    def url(self, database: str = "postgres", host: str = "127.0.0.1") -> str:
        """Where a store finds one database (the password goes apart, as narwhal takes it); ``host``:
        one of the addresses it listens on."""
        return f"postgresql://{USER}@{host}:{self.port}/{database}"

    def listen_also(self, address: str, network: str) -> None:
        """Also listen on ``address`` and let clients from ``network`` in, with the password like
        loopback's: the server restarts (its data and port stay; open sessions end)."""
        ipaddress.ip_address(address)
        network = str(ipaddress.ip_network(network))
        self.listen.append(address)
        self.clients.append(network)
        self._restart()

    def stop_listening(self, address: str, network: str) -> None:
        """Undo ``listen_also`` (the server restarts)."""
        network = str(ipaddress.ip_network(network))
        if address in self.listen:
            self.listen.remove(address)
        if network in self.clients:
            self.clients.remove(network)
        self._restart()

    def _restart(self) -> None:
        self._write_hba()
        self.stop_server()
        self.start_server()

    def _write_hba(self) -> None:
        """initdb's pg_hba.conf, then one line per client network (ours, marked, rewritten each time)."""
        path = os.path.join(self.data, "pg_hba.conf")
        with open(path) as f:
            kept = [line for line in f if not line.rstrip().endswith(_HBA_MARK)]
        lines = [f"host all all {network} scram-sha-256 {_HBA_MARK}\n" for network in self.clients]
        with open(path, "w") as f:  # rewritten in place: the file keeps its owner
            f.writelines(kept + lines)

    def admin(self, sql: str) -> None:
        """Run one statement as the superuser, outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(self.url(), password=self.password, autocommit=True) as conn:
            conn.execute(sql.encode())

    def create_database(self, template: str | None = None) -> str:
        with self._lock:
            self._counter += 1
            name = f"test_{os.getpid()}_{self._counter}"
        if template:
            self.admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        else:
            self.admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if is_root() else argv

    def _options(self) -> str:
        return (f"-c listen_addresses={','.join(self.listen)} -p {self.port} -k {self.root} -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200")

    def _pg_ctl_start(self) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_owner([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-o",
                                              self._options(), "-l", os.path.join(self.root, "server.log"),
                                              "-w", "-t", "60", "start"]), capture_output=True, timeout=90)

    def stop_server(self) -> None:
        """The database goes away (its files stay, flushed: this cluster commits asynchronously, so an
        immediate stop would lose the last commits): what a dispatcher sees when its server stops."""
        run(self._as_owner([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "fast", "-w",
                            "stop"]), timeout=60)

    def start_server(self) -> None:
        """Back on the same port, with the same data."""
        proc = self._pg_ctl_start()
        if proc.returncode != 0:
            raise TestbedUnavailable(f"pg_ctl start failed: {proc.stderr.decode(errors='replace')}")

    def stop(self) -> None:
        subprocess.run(self._as_owner([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate",
                                       "-w", "stop"]), capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(say: Callable[[str], None] = lambda _text: None) -> PostgresCluster:
    """initdb + pg_ctl start, on 127.0.0.1 and a free port; TestbedUnavailable when it cannot be."""
    bindir = postgres_bin()
    if is_root() and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        raise TestbedUnavailable("the postgres user is missing (Debian package postgresql creates it)")
    root = tempfile.mkdtemp(prefix="nwpg-", dir="/tmp")
    data = os.path.join(root, "data")
    password = secrets.token_urlsafe(18)
    pwfile = os.path.join(root, "pw")
    with open(pwfile, "w") as f:
        f.write(password + "\n")
    os.chmod(root, 0o700)
    cluster = PostgresCluster(root, 0, password, bindir)
    if is_root():
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    try:
        say(f"initdb {data}")
        run(cluster._as_owner([os.path.join(bindir, "initdb"), "-D", data, "-U", USER, "--pwfile", pwfile,
                               "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
                               "--locale=C.UTF-8", "--no-sync"]), timeout=120)
        os.unlink(pwfile)
        for _ in range(5):  # another process may take the port between looking and listening
            cluster.port = _free_port()
            proc = cluster._pg_ctl_start()
            if proc.returncode == 0:
                say(f"PostgreSQL on 127.0.0.1:{cluster.port}")
                return cluster
        log = os.path.join(root, "server.log")
        tail = open(log).read()[-2000:] if os.path.exists(log) else ""
        raise TestbedUnavailable(f"pg_ctl start failed: {proc.stderr.decode(errors='replace')}{tail}")
    except BaseException:
        cluster.stop()
        raise
