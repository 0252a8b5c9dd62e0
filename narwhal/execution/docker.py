"""Docker CLI command lines, built as argv lists by pure functions.

Nothing here runs anything: the runner hands these lists to a transport. Keeping
them pure means every flag (the hardened baseline above all) is unit-tested
without Docker, and user data (image, env, run) can only ever be one argv
element each, never a flag.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from pydantic import ValidationError

from narwhal.config.inventory import DEFAULT_LIMITS, Limits

DOCKER = "docker"
WORKSPACE = "/workspace"
# How a step's `run` is executed: `/bin/sh -e -c RUN`, inside a fixed wrapper (no user
# input in it) that points stderr at stdout within the container first: one pipe, so the
# log keeps the order the step wrote in. RUN arrives as the wrapper's $1, one argv element.
RUN_STEP = 'exec 2>&1; exec /bin/sh -e -c "$1"'
# The first step to start also checks the source out: it unpacks the tar it reads on stdin
# into the workspace, then runs like any step. One container instead of two saves a whole
# `docker run` per job. A failed unpack ends with CHECKOUT_FAILED on the last line; a good
# one prints the wrapper's $2 (a random token narwhal made for this job) on a line of its
# own before the step's command starts: then narwhal knows the workspace is whole and may
# start the steps that run beside this one (the runner drops that line). Nothing of the
# step's own can come before it, and no file name in the tar can guess the token. (Bare
# hex, so that no secret's masking can change it.)
CHECKOUT_FAILED = "[narwhal] checkout failed"
CHECKOUT = f'tar -x -C {WORKSPACE} || {{ echo "{CHECKOUT_FAILED}: tar exit $?"; exit 125; }}; echo "$2"; '
# Secrets come first on stdin, never in argv or `--env` (both show in `ps` on the runner
# and in `docker inspect`): one `NAME=ESCAPED` line each (see ``secrets_header``), then an
# empty line. The shell's `read` takes one byte at a time from a pipe, so it never eats
# into the source tar behind them. `printf %b` turns the escapes back into the value; it
# must be the shell's builtin, or the value would be an argument of a process after all.
# Each value becomes an exported variable and a file in SECRETS_DIR (a tmpfs, mode 0700).
SECRETS_DIR = "/run/secrets"
SECRETS_FAILED = "[narwhal] secrets not delivered"
# `set +x` first: bash as /bin/sh takes SHELLOPTS (xtrace) from a pipeline's env, and a
# traced loop would print each value in its escaped spelling, which no masker knows.
SECRETS = (
    f'set +x; case $(command -V printf 2>&1) in *builtin*) ;; *) echo "{SECRETS_FAILED}: the image\'s '
    '/bin/sh has no builtin printf"; exit 125;; esac; '
    'while IFS= read -r l && [ -n "$l" ]; do n=${l%%=*}; v=$(printf "%bx" "${l#*=}"); v=${v%x}; '
    f'export "$n=$v"; (umask 077; printf %s "$v" > {SECRETS_DIR}/"$n"); done; unset l n v; '
)
NO_STDIN = "exec </dev/null; "  # what a step reads after narwhal's own input: nothing


def wrapper(*, checkout: bool = False, secrets: bool = False) -> tuple[str, ...]:
    """The fixed `sh -c` program around a step's `run` (which comes after it, as $1; with
    ``checkout``, the checkout token is $2)."""
    script = (SECRETS if secrets else "") + (CHECKOUT if checkout else NO_STDIN if secrets else "")
    return ("/bin/sh", "-c", script + RUN_STEP, "sh")


MERGE_WRAPPER = wrapper()
CHECKOUT_WRAPPER = wrapper(checkout=True)
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:/+,@")


def secrets_header(values: Mapping[str, str]) -> bytes:
    """What SECRETS reads: `NAME=ESCAPED` lines and an empty line; every other byte `\\0ooo`."""
    lines = []
    for name, value in validate_env(values).items():
        escaped = "".join(chr(b) if b in _SAFE_BYTES else f"\\0{b:03o}" for b in value.encode("utf-8"))
        lines.append(f"{name}={escaped}\n")
    return ("".join(lines) + "\n").encode("ascii")


SECRETS_TMPFS_MIN = 1024 * 1024  # bytes; a size of its own would tell how long the values are


def secrets_mount(size: int) -> list[str]:
    """A private tmpfs for the secret files: in memory only, gone with the container. Its size
    limit is the next power of two of at least ``size`` and SECRETS_TMPFS_MIN: it shows in argv
    and `docker inspect`, so it may not tell the values' length."""
    limit = SECRETS_TMPFS_MIN
    while limit < size:
        limit *= 2
    return ["--mount", f"type=tmpfs,destination={SECRETS_DIR},tmpfs-mode=0700,tmpfs-size={limit}"]


# Capabilities a container keeps after `--cap-drop ALL`: what a normal build
# (package installs, unpacking archives, fixing file modes) needs as root, and
# nothing more. No network capabilities (NET_RAW, NET_BIND_SERVICE), no KILL
# across users, no MKNOD, no SYS_*.
CAPABILITIES: tuple[str, ...] = (
    "CHOWN",  # chown files (tar -x, package installs)
    "DAC_OVERRIDE",  # root reading/writing files it does not own (e.g. in the workspace)
    "FOWNER",  # chmod/utime on files root does not own
    "SETUID",  # tools that drop privileges (apt's _apt user, su)
    "SETGID",  # the same for groups
)


# Labels (design.md): every container and volume carries narwhal=1 plus these.
LABEL = "narwhal"
LABEL_OWNER = "narwhal.owner"
LABEL_JOB = "narwhal.job"
LABEL_ATTEMPT = "narwhal.attempt"
LABEL_STEP = "narwhal.step"
LABEL_SERVICE = "narwhal.service"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: "$" lets "A\n" through
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_image(image: str) -> str:
    """An image reference is one argv element: no leading '-', no spaces or control chars."""
    if not isinstance(image, str) or not image:
        raise ValueError("image name is empty")
    if image.startswith("-"):
        raise ValueError(f"invalid image name {image!r}: must not start with '-'")
    if _CONTROL.search(image) or any(c.isspace() for c in image):
        raise ValueError(f"invalid image name {image!r}: contains whitespace or control characters")
    return image


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    """Env names must be plain identifiers: `-e NAME` without '=' would leak the runner's env."""
    out = {}
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        if "\x00" in str(value):
            raise ValueError(f"environment variable {name} contains a NUL byte")
        out[name] = str(value)
    return out


LimitsLike = Limits | Mapping[str, object] | None


def limits_of(limits: LimitsLike) -> Limits:
    """inventory.Limits from an inventory.Limits, a mapping or None, checked by the
    inventory's own rules: one definition of what a limit may be."""
    if limits is None:
        return DEFAULT_LIMITS
    if isinstance(limits, Limits):
        return limits
    values = dict(limits)
    try:
        return Limits.model_validate(values)
    except ValidationError as exc:
        raise ValueError(f"invalid limits {values!r}: {exc.errors()[0]['msg']}") from None


# --- names and labels ------------------------------------------------------------------


def namespace(owner: str) -> str:
    """A short piece of the owner id for names: names are global on an engine, and two
    dispatchers sharing one (each with its own job 1) must never meet on a name."""
    return re.sub(r"[^a-z0-9]", "", owner.lower())[-8:] or "x"


def container_name(owner: str, job_id: int, attempt: int, idx: int | str) -> str:
    return f"narwhal-{namespace(owner)}-{int(job_id)}-{int(attempt)}-{idx}"


def volume_name(owner: str, job_id: int, attempt: int) -> str:
    return f"narwhal-{namespace(owner)}-{int(job_id)}-{int(attempt)}"


def network_name(owner: str, job_id: int, attempt: int) -> str:
    """A job's own network (only when its pipeline has services); named like its volume."""
    return volume_name(owner, job_id, attempt)


_SERVICE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # narwhal.config.pipeline's rule


def service_container_name(owner: str, job_id: int, attempt: int, service: str) -> str:
    return container_name(owner, job_id, attempt, f"svc-{validate_service_name(service)}")


def validate_service_name(name: str) -> str:
    """A service name is a host name on the job's network: one lowercase DNS label."""
    if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
        raise ValueError(f"invalid service name {name!r}")
    return name


def labels(owner: str, job_id: int, attempt: int, step: str | None = None) -> dict[str, str]:
    """The labels of a job's containers and volume: who made it, for which job and attempt."""
    out = {LABEL: "1", LABEL_OWNER: owner, LABEL_JOB: str(int(job_id)),
           LABEL_ATTEMPT: str(int(attempt))}
    if step is not None:
        out[LABEL_STEP] = step
    return out


def label_args(values: Mapping[str, str]) -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        args += ["--label", f"{key}={value}"]
    return args


def filter_args(values: Mapping[str, str]) -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        args += ["--filter", f"label={key}={value}"]
    return args


def hardening_args(limits: LimitsLike = None) -> list[str]:
    """The baseline every narwhal container gets: no privileges, few caps, bounded resources."""
    lim = limits_of(limits)
    args = ["--cap-drop", "ALL"]
    for cap in CAPABILITIES:
        args += ["--cap-add", cap]
    return args + [
        "--security-opt", "no-new-privileges",
        "--memory", lim.memory,
        "--memory-swap", lim.memory,  # no swap on top: the limit is the limit
        "--cpus", f"{lim.cpus:g}",
        "--pids-limit", str(lim.pids),
    ]


# --- commands ------------------------------------------------------------------------


_MOUNT_SAFE = re.compile(r"[A-Za-z0-9._-]+")


def workspace_mount(volume: str, label_values: Mapping[str, str], readonly: bool = False) -> str:
    """`--mount` value for the workspace: the first container creates the volume, labelled.

    Only narwhal's own names and label values go in (checked: no ',' or '=' can sneak
    into the comma-separated syntax); a later step's mount reuses the volume as it is.
    """
    parts = ["type=volume", f"source={_mount_safe(volume)}", f"target={WORKSPACE}"]
    for key, value in label_values.items():
        if key == LABEL_STEP:
            continue  # per container, not per volume
        parts.append(f"volume-label={_mount_safe(key)}={_mount_safe(value)}")
    if readonly:
        parts.append("readonly")
    return ",".join(parts)


def _mount_safe(value: str) -> str:
    if not _MOUNT_SAFE.fullmatch(value):
        raise ValueError(f"unsafe value in a mount specification: {value!r}")
    return value


def run_container(name: str, image: str, command: Iterable[str], *, volume: str,
                  label_values: Mapping[str, str], limits: LimitsLike = None,
                  env: Mapping[str, str] | None = None, network: str = "none",
                  interactive: bool = False, mounts: Iterable[str] = (), readonly: bool = False) -> list[str]:
    """`docker run --rm` of one hardened container with the workspace volume at /workspace
    (``readonly``: the workspace and the container's own files cannot be written)."""
    validate_image(image)
    # --log-driver none: narwhal reads the output from the attached stream; Docker's own
    # on-disk copy would halve throughput and fill the runner's disk with build logs.
    argv = [DOCKER, "run", "--rm", "--name", name, "--log-driver", "none"]
    if interactive:
        argv.append("-i")
    argv += label_args(label_values)
    argv += hardening_args(limits)
    if readonly:
        argv.append("--read-only")
    argv += ["--network", network, "--mount", workspace_mount(volume, label_values, readonly),
             "--workdir", WORKSPACE, *mounts]
    for key, value in validate_env(env or {}).items():
        argv += ["--env", f"{key}={value}"]
    return argv + ["--", image, *command]


_TOKEN = re.compile(r"[0-9a-f]{16,64}")


def run_step(name: str, image: str, run: str, *, volume: str, label_values: Mapping[str, str],
             limits: LimitsLike = None, env: Mapping[str, str] | None = None,
             network: str = "none", checkout: str | None = None, secrets_size: int = 0) -> list[str]:
    """One step: `run` is a single argv element, run by `/bin/sh -e -c` with stderr on stdout.

    With ``checkout`` (a token of hex digits) the container first unpacks the source tar
    from its stdin and then prints ``CHECKOUT_DONE TOKEN``. With ``secrets_size`` (the
    bytes of the values) it first reads the secrets from its stdin (``secrets_header``),
    before the tar.
    """
    if not isinstance(run, str):
        raise ValueError("step run must be a string")
    if checkout is not None and not _TOKEN.fullmatch(checkout):
        raise ValueError("checkout token must be 16-64 lowercase hex digits")
    secrets = secrets_size > 0
    mounts = secrets_mount(secrets_size + 64 * 1024) if secrets else []
    command = [*wrapper(checkout=checkout is not None, secrets=secrets), run]
    if checkout is not None:
        command.append(checkout)
    return run_container(name, image, command, volume=volume,
                         label_values=label_values, limits=limits, env=env, network=network,
                         interactive=checkout is not None or secrets, mounts=mounts)


# --- artifacts -----------------------------------------------------------------------

# The artifact collector: the patterns arrive as its positional arguments ($@), never as
# text of the script. IFS='' turns off field splitting, so an unquoted $p is only globbed
# (a pattern with spaces stays one pattern); what matched goes to `tar -c` on stdout as
# `./NAME` (never an option). Links are stored as links (no -h): the dispatcher decides
# what a link may bring. Nothing matched: no output at all.
COLLECT = (f'cd {WORKSPACE} || exit 3; IFS=""; n=$#; '
           'for p in "$@"; do for f in $p; do '
           'if [ -e "$f" ] || [ -h "$f" ]; then set -- "$@" "./$f"; fi; '
           'done; done; shift "$n"; [ "$#" -gt 0 ] || exit 0; exec tar -c -f - "$@"')


def collect_artifacts(name: str, image: str, patterns: Iterable[str], *, volume: str,
                      label_values: Mapping[str, str], limits: LimitsLike = None) -> list[str]:
    """The collector: the pipeline's image, no network, the workspace read-only, writing a tar of
    the files ``patterns`` match to its stdout (``COLLECT``; each pattern one argv element)."""
    args = list(patterns)
    if not args or not all(isinstance(p, str) and p and "\x00" not in p for p in args):
        raise ValueError("artifact patterns must be non-empty strings without NUL bytes")
    return run_container(name, image, ["/bin/sh", "-c", COLLECT, "narwhal-artifacts", *args], volume=volume,
                         label_values=label_values, limits=limits, network="none", readonly=True)


# --- services ------------------------------------------------------------------------

# Whether a TCP port listens inside a service container, with nothing but the image's
# /bin/sh and its builtins (`read`, `case`, `[`): the kernel's socket tables of the
# container's own network namespace, state 0A (LISTEN). $1 is the port as 4 hex digits.
PORT_CHECK = ('p=$1; for f in /proc/net/tcp /proc/net/tcp6; do [ -r "$f" ] || continue; '
              'while read -r n a r s rest; do case "$a:$s" in *:"$p":0A) exit 0;; esac; done < "$f"; '
              'done; exit 1')


def create_network(name: str, label_values: Mapping[str, str], *, internal: bool) -> list[str]:
    """A job's user-defined network: steps and services find each other on it by name.

    ``internal``: no route out (where the engine enforces it; see docs/security.md).
    """
    argv = [DOCKER, "network", "create", "--driver", "bridge"]
    if internal:
        argv.append("--internal")
    return argv + label_args(label_values) + ["--", _mount_safe(name)]


def remove_networks(names: Iterable[str]) -> list[str]:
    return [DOCKER, "network", "rm", "--", *names]


def networks_by_label(label_values: Mapping[str, str], fmt: str | None = None) -> list[str]:
    return [DOCKER, "network", "ls", *filter_args(label_values), "--format", fmt or VOLUME_FORMAT]


def run_service(name: str, image: str, command: str | list[str] | None, *, alias: str, network: str,
                label_values: Mapping[str, str], limits: LimitsLike = None,
                env: Mapping[str, str] | None = None) -> list[str]:
    """`docker run --rm` of one service, attached (its end is the service's death), on the job's
    network under ``alias``, with the steps' hardened baseline and limits and no workspace.

    A string ``command`` is run by the image's `/bin/sh -c` (one argv element); a list is
    the image's arguments, each one element; None keeps the image's own command.
    """
    validate_image(image)
    validate_service_name(alias)
    if isinstance(command, str):
        args = ["/bin/sh", "-c", command]
    elif command is None:
        args = []
    elif isinstance(command, list) and all(isinstance(a, str) for a in command):
        args = list(command)
    else:
        raise ValueError("service command must be a string or a list of strings")
    if any("\x00" in a for a in args):
        raise ValueError("service command contains a NUL byte")
    argv = [DOCKER, "run", "--rm", "--name", name, "--log-driver", "none"]
    argv += label_args(label_values)
    argv += hardening_args(limits)
    argv += ["--network", _mount_safe(network), "--network-alias", alias]
    for key, value in validate_env(env or {}).items():
        argv += ["--env", f"{key}={value}"]
    return argv + ["--", image, *args]


def exec_command(name: str, command: str) -> list[str]:
    """A readiness check: ``command`` run by `/bin/sh -c` inside the running container."""
    if not isinstance(command, str) or "\x00" in command:
        raise ValueError("check command must be a string without NUL bytes")
    return [DOCKER, "exec", "--", name, "/bin/sh", "-c", command]


def exec_port_check(name: str, port: int) -> list[str]:
    """A readiness check: whether ``port`` listens (TCP, v4 or v6) inside the container."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port!r}")
    return [DOCKER, "exec", "--", name, "/bin/sh", "-c", PORT_CHECK, "sh", f"{port:04X}"]


def stop(name: str, grace: float) -> list[str]:
    return [DOCKER, "stop", "--time", str(max(0, int(grace))), "--", name]


def kill(name: str) -> list[str]:
    return [DOCKER, "kill", "--", name]


def remove_containers(names: Iterable[str]) -> list[str]:
    return [DOCKER, "rm", "--force", "--volumes", "--", *names]


def remove_volumes(names: Iterable[str]) -> list[str]:
    return [DOCKER, "volume", "rm", "--force", "--", *names]


_JOB_ATTEMPT = f'{{{{.Label "{LABEL_JOB}"}}}}\t{{{{.Label "{LABEL_ATTEMPT}"}}}}'
PS_FORMAT = "{{.Names}}\t" + _JOB_ATTEMPT
VOLUME_FORMAT = "{{.Name}}\t" + _JOB_ATTEMPT


def ps_by_label(label_values: Mapping[str, str], fmt: str = PS_FORMAT) -> list[str]:
    """All containers (running or not) carrying every given label."""
    return [DOCKER, "ps", "--all", "--no-trunc", *filter_args(label_values), "--format", fmt]


def ps_by_name(name: str) -> list[str]:
    """Whether a container of exactly this name exists (prints its name, or nothing)."""
    return [DOCKER, "ps", "--all", "--filter", f"name=^{re.escape(name)}$", "--format", "{{.Names}}"]


def ps_running(name: str) -> list[str]:
    """Whether a container of exactly this name is running (prints its name, or nothing)."""
    return [DOCKER, "ps", "--filter", f"name=^{re.escape(name)}$", "--filter", "status=running",
            "--format", "{{.Names}}"]


def volumes_by_label(label_values: Mapping[str, str], fmt: str = VOLUME_FORMAT) -> list[str]:
    return [DOCKER, "volume", "ls", *filter_args(label_values), "--format", fmt]
