"""The demo's Docker engine: make sure one answers and the small busybox image exists.

``narwhal demo`` must work on a fresh Debian machine with no Docker. As root on Debian,
``ensure_docker`` installs ``docker.io`` and starts a ``dockerd`` of its own, and
``ensure_image`` builds the busybox image with ``docker import`` (no registry needed).
Each step that changes the machine is announced through ``say`` first. Elsewhere,
``EngineUnavailable`` says exactly what is missing and how to install it.
Every step is idempotent and takes a lock file in /tmp, so that several processes on
one machine do not collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

from narwhal.errors import CommandFailed, NarwhalError


class EngineUnavailable(NarwhalError):
    """The machine lacks something the demo's engine needs and it cannot be set up here."""


LOCK_DIR = "/tmp"
DOCKERD_LOG = "/tmp/narwhal-dockerd.log"
DOCKERD_ARGV = ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none"]
BUSYBOX_IMAGE = "narwhal-test/busybox:latest"
SBIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

_apt_updated = False
_dockerd: subprocess.Popen | None = None  # kept so Python does not warn about a running child


def _say_nothing(text: str) -> None:
    pass


say: Callable[[str], None] = _say_nothing  # the demo sets this to announce what it installs



def run(argv: list[str], *, input: bytes | None = None, timeout: float = 120,
         env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run argv, capture output; a non-zero exit or a timeout raises CommandFailed."""
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                              env=env, cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"") + (exc.stderr or b"")
        raise CommandFailed(argv, None, f"timed out after {timeout:g}s\n" + output.decode(errors="replace")) from None
    except FileNotFoundError as exc:
        raise EngineUnavailable(f"command not found: {argv[0]} ({exc})") from None
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace"))
    return proc


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold an exclusive fcntl lock on /tmp/narwhal-testbed-NAME.lock (several processes share one machine)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    path = os.path.join(LOCK_DIR, f"narwhal-testbed-{safe}.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor too
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll condition until it is true or timeout passes; True when it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])
    except OSError:
        return ""


def is_root() -> bool:
    return os.geteuid() == 0


def _installer_problems() -> list[str]:
    """Why packages cannot be installed here (empty when apt-get as root is possible)."""
    problems = []
    if not is_root():
        problems.append(f"not running as root (uid {os.geteuid()})")
    if not os.path.exists("/etc/debian_version"):
        problems.append("not a Debian system (no /etc/debian_version)")
    elif shutil.which("apt-get") is None:
        problems.append("apt-get not found")
    return problems


# --- apt packages -------------------------------------------------------------------


def _present(command_or_path: str) -> bool:
    if command_or_path.startswith("/"):
        return os.path.exists(command_or_path)
    if shutil.which(command_or_path):
        return True
    # a non-root PATH often lacks the sbin directories where dockerd and sshd live
    return any(os.access(os.path.join(d, command_or_path), os.X_OK) for d in SBIN_DIRS)


def _missing(packages: dict[str, str]) -> dict[str, str]:
    return {cmd: pkg for cmd, pkg in packages.items() if not _present(cmd)}


def _describe(missing: dict[str, str]) -> str:
    return ", ".join(f"{cmd} (Debian package {pkg})" for cmd, pkg in sorted(missing.items()))


def ensure_apt_packages(packages: dict[str, str]) -> None:
    """Install the Debian packages providing the missing commands/paths ({command_or_path: package})."""
    missing = _missing(packages)
    if not missing:
        return
    problems = _installer_problems()
    if problems:
        wanted = " ".join(sorted(set(missing.values())))
        raise EngineUnavailable(
            f"the narwhal test environment is missing {_describe(missing)}; cannot install here: "
            f"{'; '.join(problems)}. Install as root on Debian 12: apt-get install -y {wanted}")
    with locked("apt"):
        missing = _missing(packages)  # another process may have installed them meanwhile
        if not missing:
            return
        say(f"installing Debian packages: {' '.join(sorted(set(missing.values())))} (apt-get)")
        _apt_install(sorted(set(missing.values())))
    still = _missing(packages)
    if still:
        raise EngineUnavailable(f"apt-get install succeeded but still missing: {_describe(still)}")


@contextlib.contextmanager
def _no_service_starts() -> Iterator[None]:
    """Keep package scripts from starting system services (a system sshd on 0.0.0.0:22 would block our hosts)."""
    policy = "/usr/sbin/policy-rc.d"
    if os.path.exists(policy):
        yield
        return
    with open(policy, "w") as f:
        f.write("#!/bin/sh\n# written by narwhal during apt-get install\nexit 101\n")
    os.chmod(policy, 0o755)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(policy)


def _apt_install(debian_packages: list[str]) -> None:
    """apt-get update (once per process) and install, noninteractive. Caller holds the apt lock."""
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock_wait = ["-o", "DPkg::Lock::Timeout=300"]
    try:
        if not _apt_updated:
            run(["apt-get", "update", "-q", *lock_wait], env=env, timeout=600)
            _apt_updated = True
        with _no_service_starts():
            run(["apt-get", "install", "-y", "-q", *lock_wait,
                  "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
                  *debian_packages], env=env, timeout=1800)
    except CommandFailed as exc:
        raise EngineUnavailable(f"could not install {' '.join(debian_packages)}: {exc}") from None


def _apt_install_now(debian_packages: list[str]) -> None:
    problems = _installer_problems()
    if problems:
        raise EngineUnavailable(
            f"need Debian packages {' '.join(debian_packages)}; cannot install here: {'; '.join(problems)}")
    with locked("apt"):
        say(f"installing Debian packages: {' '.join(debian_packages)} (apt-get)")
        _apt_install(debian_packages)


# --- docker engine ------------------------------------------------------------------


def _docker_info() -> str | None:
    """None when the engine answers, else why not."""
    try:
        run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
        return None
    except (CommandFailed, EngineUnavailable) as exc:
        return str(exc)


def ensure_docker(timeout: float = 60) -> None:
    """Make `docker` work: install docker.io if missing, start our own dockerd if none answers."""
    global _dockerd
    ensure_apt_packages({"docker": "docker.io", "dockerd": "docker.io"})
    if _docker_info() is None:
        return
    with locked("dockerd"):
        why = _docker_info()
        if why is None:
            return
        if not is_root():
            raise EngineUnavailable(f"the Docker engine does not answer and starting dockerd needs root: {why}")
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        say(f"starting a Docker engine: {' '.join(DOCKERD_ARGV)} (log: {DOCKERD_LOG})")
        with open(DOCKERD_LOG, "ab") as log:
            _dockerd = subprocess.Popen([dockerd, *DOCKERD_ARGV[1:]], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, start_new_session=True, close_fds=True)
        proc = _dockerd
        if not wait_until(lambda: proc.poll() is not None or _docker_info() is None, timeout, 0.25):
            raise EngineUnavailable(
                f"dockerd did not answer within {timeout:g}s; {DOCKERD_LOG}:\n{tail(DOCKERD_LOG)}")
        if _docker_info() is not None:
            raise EngineUnavailable(
                f"dockerd exited with status {proc.returncode}; {DOCKERD_LOG}:\n{tail(DOCKERD_LOG)}")


# --- test image ---------------------------------------------------------------------


def _image_exists(name: str) -> bool:
    try:
        run(["docker", "image", "inspect", "--format", "{{.Id}}", name], timeout=30)
        return True
    except CommandFailed:
        return False


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (it runs in an empty image)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            return False
        is64, order = header[4] == 2, "<" if header[5] == 1 else ">"
        if is64:
            phoff, = struct.unpack_from(order + "Q", header, 32)
            phentsize, phnum = struct.unpack_from(order + "HH", header, 54)
        else:
            phoff, = struct.unpack_from(order + "I", header, 28)
            phentsize, phnum = struct.unpack_from(order + "HH", header, 42)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(struct.unpack_from(order + "I", table, i * phentsize)[0] != pt_interp for i in range(phnum))


def _static_busybox() -> str:
    path = "/bin/busybox"
    ensure_apt_packages({path: "busybox-static"})
    if not _is_static_elf(path):  # the dynamic `busybox` package is installed instead
        _apt_install_now(["busybox-static"])
        if not _is_static_elf(path):
            raise EngineUnavailable(f"{path} is not statically linked even after installing busybox-static")
    return path


PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


def _build_busybox_rootfs(busybox: str, root: str) -> None:
    """A minimal root filesystem: static busybox, its applets as symlinks, /tmp, /etc/passwd, /workspace."""
    for d in ("bin", "etc", "root", "tmp", "workspace"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    target = os.path.join(root, "bin", "busybox")
    shutil.copyfile(busybox, target)
    os.chmod(target, 0o755)
    applets = run([busybox, "--list"]).stdout.decode().split()
    for applet in applets:
        link = os.path.join(root, "bin", applet)
        # linking busybox onto itself would replace the binary with a dangling loop
        if applet == "busybox" or "/" in applet or os.path.lexists(link):
            continue
        os.symlink("busybox", link)
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write(PASSWD)
    with open(os.path.join(root, "etc", "group"), "w") as f:
        f.write(GROUP)


def _docker_import(root: str, name: str) -> None:
    tar_argv = ["tar", "-C", root, "--numeric-owner", "--owner=0", "--group=0", "-c", "."]
    import_argv = ["docker", "import", "--change", 'CMD ["/bin/sh"]', "-", name]
    tar = subprocess.Popen(tar_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdout is not None and tar.stderr is not None  # both are pipes
    try:
        imported = subprocess.run(import_argv, stdin=tar.stdout, capture_output=True, timeout=300, check=False)
    finally:
        tar.stdout.close()
        tar_err = tar.stderr.read()
        tar.stderr.close()
        tar.wait()
    if tar.returncode != 0:
        raise CommandFailed(tar_argv, tar.returncode, tar_err.decode(errors="replace"))
    if imported.returncode != 0:
        raise CommandFailed(import_argv, imported.returncode,
                            (imported.stdout + imported.stderr).decode(errors="replace"))


def ensure_image(name: str = BUSYBOX_IMAGE) -> str:
    """Make the tiny busybox image NAME exist (docker import; no registry is reachable)."""
    ensure_docker()
    if _image_exists(name):
        return name
    with locked("image"):
        if _image_exists(name):
            return name
        busybox = _static_busybox()
        say(f"building the image {name} from {busybox} (docker import)")
        with tempfile.TemporaryDirectory(prefix="narwhal-rootfs-") as root:
            _build_busybox_rootfs(busybox, root)
            _docker_import(root, name)
    return name


