"""Where the machine's CPU went over a window: the whole from /proc/stat, the parts by role.

The whole: busy time of every CPU (user, nice, system, irq, softirq, steal) over the window,
against its wall time x the number of CPUs. The parts, so that "the dispatchers could not go
faster because the CPUs were full" can be checked rather than guessed:

* each process's utime + stime + cutime + cstime: children it waited for count as its own
  (the ``docker run`` a step's SSH session starts lands in its sshd, a dispatcher's ``git``
  in the dispatcher), grouped by role (``ROLES``: by pid for the processes the caller names,
  else by command name). A process seen at both readings counts its difference, one seen
  only at the end all of its time; one that came and went is in its parent's children's time.
* containers from Docker's cgroup (cgroup v1 ``cpuacct``: the ``docker`` group keeps the
  usage of containers already removed), and their processes are left out of the above.

What no part explains is ``other``: the kernel's threads, containerd's shims (their parent is
pid 1), whatever else ran on the machine meanwhile.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
DOCKER_CPUACCT = Path("/sys/fs/cgroup/cpuacct/docker/cpuacct.usage")  # nanoseconds, cumulative
ROLES = {  # command name (/proc/PID/comm) -> role
    "sshd": "sshd (and the docker CLI of each step)",
    "docker": "docker CLI",
    "dockerd": "dockerd + containerd",
    "containerd": "dockerd + containerd",
}


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _busy_seconds() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot, summed over the CPUs."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / TICKS, (busy + idle + iowait) / TICKS


def _containers_seconds() -> float | None:
    try:
        return int(DOCKER_CPUACCT.read_text()) / 1e9
    except (OSError, ValueError):
        return None


def _processes() -> dict[int, tuple[str, int, float, int]]:
    """pid -> (comm, start time in ticks, CPU seconds with waited-for children, parent pid), outside containers."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if "/docker/" in Path(f"/proc/{name}/cgroup").read_text():
                continue  # in a container: counted from Docker's cgroup
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        if name == "2" or fields[1] == "2":  # kthreadd and its kernel threads: in "other"
            continue
        cpu = sum(int(x) for x in fields[11:15]) / TICKS  # utime stime cutime cstime
        out[int(name)] = (comm, int(fields[19]), cpu, int(fields[1]))
    return out


@dataclass
class Reading:
    at: float
    busy: float
    total: float
    containers: float | None
    processes: dict[int, tuple[str, int, float, int]] = field(default_factory=dict)


def read() -> Reading:
    busy, total = _busy_seconds()
    return Reading(time.monotonic(), busy, total, _containers_seconds(), _processes())


def account(start: Reading, end: Reading, named: dict[int, str] | None = None,
            parents: dict[int, str] | None = None) -> dict:
    """CPU seconds per role between two readings, with the machine's busy share.

    ``named``: pid -> role for processes the caller knows (the dispatchers, the bench itself);
    ``parents``: pid -> role for a process and its children (a PostgreSQL server's postmaster:
    its backends come and go with the connections).
    """
    named = named or {}
    parents = parents or {}
    wall = end.at - start.at
    cpus = os.cpu_count() or 1
    roles: dict[str, float] = {}
    for pid, (comm, started, cpu, ppid) in end.processes.items():
        before = start.processes.get(pid)
        spent = cpu - before[2] if before is not None and before[1] == started else cpu
        role = named.get(pid) or parents.get(pid) or parents.get(ppid) or ROLES.get(comm) or ("dockerd + containerd" if comm.startswith("containerd")
                                                     else None)
        if role is not None and spent > 0:
            roles[role] = roles.get(role, 0.0) + spent
    if start.containers is not None and end.containers is not None:
        roles["containers (the steps' processes)"] = end.containers - start.containers
    busy = end.busy - start.busy
    roles["other (kernel, containerd shims, the rest)"] = max(0.0, busy - sum(roles.values()))
    return {"wall_seconds": wall, "cpus": cpus, "busy_seconds": busy, "idle_seconds": max(0.0, wall * cpus - busy),
            "busy_share": busy / (wall * cpus) if wall > 0 else None,
            "roles": dict(sorted(roles.items(), key=lambda kv: -kv[1]))}
