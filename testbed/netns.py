"""Network namespaces joined to this machine by a veth pair: runner hosts, or dispatchers, with a cable to cut."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from narwhal.cli.engine import ensure_apt_packages, is_root, run
from testbed.errors import PortInUse, TestbedUnavailable


def existing_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@dataclass
class NetnsLink:
    """A network namespace joined to this machine by a veth pair: a runner host with a cable.

    The namespace side gets 10.213.INDEX.2, this side 10.213.INDEX.1 (a /30 of our own,
    reachable from nowhere else). ``cut`` takes the namespace's end of the cable down, so
    packets to it vanish while sshd and its sessions keep running; ``restore`` plugs it in.
    The Docker socket is a file, so the Docker CLI inside still reaches the engine.

    The other way round, a process started under ``exec_prefix`` (a dispatcher) lives inside
    and reaches this machine only at ``gateway``, through the cable: what it needs (the
    database, the runners' sshd) must listen there too, and let ``network`` in.
    """

    index: int

    @property
    def namespace(self) -> str:
        return f"narwhal-net{self.index}"

    @property
    def host_side(self) -> str:
        return f"nwh{self.index}"

    @property
    def inside(self) -> str:
        return f"nwn{self.index}"

    @property
    def address(self) -> str:
        return f"10.213.{self.index}.2"

    @property
    def gateway(self) -> str:
        return f"10.213.{self.index}.1"

    @property
    def network(self) -> str:
        """The cable's two addresses, as a CIDR (for an allow list such as pg_hba.conf)."""
        return f"10.213.{self.index}.0/30"

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        """The argv that runs a command inside (``ip netns exec`` execs it: its pid is the command's)."""
        return ("ip", "netns", "exec", self.namespace)

    def create(self) -> NetnsLink:
        if not 0 <= self.index <= 255:
            raise ValueError(f"netns index {self.index} out of range 0..255")
        if not is_root():
            raise TestbedUnavailable("network namespaces need root")
        ensure_apt_packages({"ip": "iproute2"})
        if self.namespace in existing_namespaces():
            raise PortInUse(f"network namespace {self.namespace} exists already")
        subprocess.run(["ip", "link", "del", self.host_side], capture_output=True, timeout=30)  # a stale cable
        ns = ["ip", "netns", "exec", self.namespace, "ip"]
        for argv in (["ip", "netns", "add", self.namespace],
                     ["ip", "link", "add", self.host_side, "type", "veth", "peer", "name", self.inside],
                     ["ip", "link", "set", self.inside, "netns", self.namespace],
                     ["ip", "addr", "add", f"{self.gateway}/30", "dev", self.host_side],
                     ["ip", "link", "set", self.host_side, "up"],
                     [*ns, "addr", "add", f"{self.address}/30", "dev", self.inside],
                     [*ns, "link", "set", self.inside, "up"],
                     [*ns, "link", "set", "lo", "up"]):
            run(argv, timeout=30)
        return self

    def cut(self) -> None:
        run(["ip", "netns", "exec", self.namespace, "ip", "link", "set", self.inside, "down"], timeout=30)

    def restore(self) -> None:
        run(["ip", "netns", "exec", self.namespace, "ip", "link", "set", self.inside, "up"], timeout=30)

    def delete(self) -> None:
        """Remove the namespace (its end of the veth pair goes with it, and so the pair)."""
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.host_side], capture_output=True, timeout=30)
