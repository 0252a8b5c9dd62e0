"""Docker CLI command lines, built as argv lists by pure functions.

Nothing here runs anything: the runner hands these lists to a transport. Keeping
them pure means every flag (the hardened baseline above all) is unit-tested
without Docker, and user data (image, env, run) can only ever be one argv
element each, never a flag.
"""

from __future__ import annotations

import hashlib
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
# What the reaper lists: a cache volume (narwhal.cache set) is not a job's leftover.
REAP_VOLUME_FORMAT = VOLUME_FORMAT + '\t{{.Label "narwhal.cache"}}'


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


# --- caches (narwhal.execution.cache) ----------------------------------------------------
#
# A cache is a Docker volume per (repository, key), named from a hash of the two in the
# owner's namespace and labelled narwhal.cache=1 (the reaper leaves such volumes alone;
# the cache sweep evicts them by age and size). Inside it:
#
#   current         "gen-ID": the complete generation restores read (replaced by rename)
#   gen-ID/         a complete generation: the saved paths, as they sit in the workspace
#   tmp-ID/         a generation being written (renamed to gen-ID when whole)
#   ID.born         when save ID began (epoch seconds)
#   ID.retired      when gen-ID stopped being current
#
# A save copies into tmp-ID, renames it gen-ID and then points `current` at it by writing
# `current.ID` and renaming that over `current`: each rename is atomic within the volume,
# so a restore sees the old generation or the new one, whole, and two saves of one key at
# once leave one of theirs, whole. Old generations go only STALE seconds after they
# stopped being current (a restore reading one is stopped by then: STALE is more than the
# cache timeout), and so do the leftovers of a save that was interrupted (tmp-ID).
# User paths reach the scripts only as positional arguments, never inside the script.

LABEL_CACHE = "narwhal.cache"
LABEL_CACHE_REPO = "narwhal.cache.repo"
LABEL_CACHE_KEY = "narwhal.cache.key"
CACHE_DIR = "/narwhal-cache"
_CACHE_ID = re.compile(r"[0-9a-z][0-9a-z-]{0,62}")
_CACHE_LABEL_MAX = 1024

# $1 token, then per cache: INDEX COUNT PATH... Prints "TOKEN INDEX hit KiB" or "miss" or "failed".
CACHE_RESTORE = r'''exec 2>&1; t=$1; shift
while [ "$#" -gt 0 ]; do
  i=$1; k=$2; shift 2; c=/narwhal-cache/$i
  g=$(cat "$c/current" 2>/dev/null) || g=
  case $g in gen-*[!0-9a-z-]*|gen-) g=;; gen-*) ;; *) g=;; esac
  if [ -z "$g" ] || [ ! -d "$c/$g" ]; then echo "$t $i miss"; shift "$k"; continue; fi
  ok=1
  while [ "$k" -gt 0 ]; do
    p=$1; shift; k=$((k - 1))
    if [ -e "$c/$g/$p" ] || [ -L "$c/$g/$p" ]; then
      case $p in */*) mkdir -p "/workspace/${p%/*}" || ok=;; esac
      cp -a "$c/$g/$p" "/workspace/$p" || ok=
    fi
  done
  if [ -n "$ok" ]; then s=$(du -sk "$c/$g"); echo "$t $i hit ${s%%[!0-9]*}"; else echo "$t $i failed"; fi
done'''

# $1 token, $2 generation ID, $3 most KiB, $4 STALE seconds, then per cache: INDEX COUNT PATH...
# Prints "TOKEN INDEX saved KiB", "empty" (no path exists), "toobig KiB" or "failed".
CACHE_SAVE = r'''exec 2>&1; t=$1; id=$2; max=$3; stale=$4; shift 4; now=$(date +%s)
while [ "$#" -gt 0 ]; do
  i=$1; k=$2; shift 2; c=/narwhal-cache/$i; tmp=$c/tmp-$id
  ok=1; found=
  rm -rf "$tmp"; { echo "$now" > "$c/$id.born" && mkdir "$tmp"; } || ok=
  while [ "$k" -gt 0 ]; do
    p=$1; shift; k=$((k - 1))
    [ -n "$ok" ] || continue
    if [ -e "/workspace/$p" ] || [ -L "/workspace/$p" ]; then
      found=1
      case $p in */*) mkdir -p "$tmp/${p%/*}" || ok=;; esac
      cp -a "/workspace/$p" "$tmp/$p" || ok=
    fi
  done
  s=$(du -sk "$tmp" 2>/dev/null); s=${s%%[!0-9]*}; s=${s:-0}
  if [ -z "$ok" ]; then r=failed
  elif [ -z "$found" ]; then r=empty
  elif [ "$s" -gt "$max" ]; then r="toobig $s"
  else
    old=$(cat "$c/current" 2>/dev/null) || old=
    if mv "$tmp" "$c/gen-$id" && echo "gen-$id" > "$c/current.$id" && mv -f "$c/current.$id" "$c/current"; then
      r="saved $s"
      case $old in gen-*[!0-9a-z-]*|gen-) ;; gen-*) echo "$now" > "$c/${old#gen-}.retired";; esac
    else r=failed; fi
  fi
  case $r in saved*) ;; *) rm -rf "$tmp" "$c/gen-$id"; rm -f "$c/current.$id" "$c/$id.born";; esac
  echo "$t $i $r"
  cur=$(cat "$c/current" 2>/dev/null) || cur=
  for d in "$c"/gen-* "$c"/tmp-*; do
    [ -d "$d" ] || continue
    n=${d##*/}; g=${n#*-}
    [ "$n" = "$cur" ] && continue
    b=$(cat "$c/$g.born" 2>/dev/null) || b=; b=${b%%[!0-9]*}; b=${b:-0}
    case $n in
      tmp-*) if [ $((now - b)) -gt "$stale" ]; then rm -rf "$d"; rm -f "$c/$g.born"; fi;;
      *) if [ -f "$c/$g.retired" ]; then
           e=$(cat "$c/$g.retired" 2>/dev/null) || e=; e=${e%%[!0-9]*}; e=${e:-0}
           if [ $((now - e)) -gt "$stale" ]; then rm -rf "$d" && rm -f "$c/$g.retired" "$c/$g.born"; fi
         elif [ $((now - b)) -gt "$stale" ]; then echo "$now" > "$c/$g.retired"; fi;;
    esac
  done
done'''


def cache_volume_name(owner: str, repo: str, key: str) -> str:
    """A cache's volume: a hash of (repository, key), never their text, in the owner's namespace."""
    digest = hashlib.sha256(f"{repo}\0{key}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return f"narwhal-{namespace(owner)}-cache-{digest}"


def cache_labels(owner: str, repo: str, key: str) -> dict[str, str]:
    """A cache volume's labels: narwhal's and owner's (so only its dispatcher evicts it), the
    cache marker, and the repository and key for people (values checked: one line, bounded)."""
    for what, value in (("repository", repo), ("key", key)):
        if not isinstance(value, str) or not value or len(value) > _CACHE_LABEL_MAX or _CONTROL.search(value):
            raise ValueError(f"invalid cache {what} for a label: {value!r}")
    return {LABEL: "1", LABEL_OWNER: owner, LABEL_CACHE: "1", LABEL_CACHE_REPO: repo, LABEL_CACHE_KEY: key}


def create_cache_volume(name: str, label_values: Mapping[str, str]) -> list[str]:
    """`docker volume create`: labels the volume when it is new; an existing one is left as it is."""
    return [DOCKER, "volume", "create", *label_args(label_values), "--", _mount_safe(name)]


def existing_volumes(names: Iterable[str]) -> list[str]:
    """Prints the name of each of ``names`` that exists (exits non-zero when one does not)."""
    return [DOCKER, "volume", "inspect", "--format", "{{.Name}}", "--", *map(_mount_safe, names)]


def cache_mount(volume: str, index: int, owner: str, *, readonly: bool) -> str:
    """A cache volume at /narwhal-cache/INDEX. Should it be gone (evicted since it was looked
    at), the mount creates it labelled as a cache of ``owner``: never a job's leftover."""
    parts = ["type=volume", f"source={_mount_safe(volume)}", f"target={CACHE_DIR}/{int(index)}", "volume-nocopy"]
    if readonly:
        parts.append("readonly")
    for key, value in ((LABEL, "1"), (LABEL_OWNER, owner), (LABEL_CACHE, "1")):
        parts.append(f"volume-label={_mount_safe(key)}={_mount_safe(value)}")
    return ",".join(parts)


def _cache_args(groups: Iterable[tuple[int, Iterable[str]]]) -> list[str]:
    args: list[str] = []
    for index, paths in groups:
        paths = list(paths)
        for path in paths:
            if not isinstance(path, str) or not path or "\x00" in path or path.startswith(("/", "-")) \
                    or ".." in path.split("/"):
                raise ValueError(f"invalid cache path {path!r}")
        args += [str(int(index)), str(len(paths)), *paths]
    return args


def _cache_container(name: str, image: str, script: str, args: list[str], *, volume: str,
                     label_values: Mapping[str, str], limits: LimitsLike, mounts: list[str],
                     workspace_readonly: bool) -> list[str]:
    validate_image(image)
    workspace = workspace_mount(volume, label_values) + (",readonly" if workspace_readonly else "")
    argv = [DOCKER, "run", "--rm", "--name", name, "--log-driver", "none"]
    argv += label_args(label_values)
    argv += hardening_args(limits)
    argv += ["--network", "none", "--mount", workspace]
    for mount in mounts:
        argv += ["--mount", mount]
    return argv + ["--workdir", WORKSPACE, "--", image, "/bin/sh", "-c", script, "sh", *args]


def restore_caches(name: str, image: str, token: str, caches: Iterable[tuple[str, Iterable[str]]], *,
                   owner: str, volume: str, label_values: Mapping[str, str], limits: LimitsLike = None) -> list[str]:
    """One container (the pipeline's image, hardened, no network) that copies each cache's
    current generation of ``paths`` into the workspace, which it creates (labelled, as a
    step would). ``caches``: (cache volume, paths) in order; each mounted read-only."""
    if not _TOKEN.fullmatch(token):
        raise ValueError("cache token must be 16-64 lowercase hex digits")
    caches = list(caches)
    mounts = [cache_mount(v, i, owner, readonly=True) for i, (v, _) in enumerate(caches)]
    args = [token, *_cache_args((i, paths) for i, (_, paths) in enumerate(caches))]
    return _cache_container(name, image, CACHE_RESTORE, args, volume=volume, label_values=label_values,
                            limits=limits, mounts=mounts, workspace_readonly=False)


def save_caches(name: str, image: str, token: str, generation: str, caches: Iterable[tuple[str, Iterable[str]]], *,
                owner: str, volume: str, label_values: Mapping[str, str], max_kib: int, stale: float,
                limits: LimitsLike = None) -> list[str]:
    """One container that writes ``paths`` of the (read-only) workspace into a new generation
    of each cache and switches to it atomically (CACHE_SAVE)."""
    if not _TOKEN.fullmatch(token):
        raise ValueError("cache token must be 16-64 lowercase hex digits")
    if not _CACHE_ID.fullmatch(generation):
        raise ValueError(f"invalid cache generation {generation!r}")
    caches = list(caches)
    mounts = [cache_mount(v, i, owner, readonly=False) for i, (v, _) in enumerate(caches)]
    args = [token, generation, str(max(1, int(max_kib))), str(max(1, int(stale))),
            *_cache_args((i, paths) for i, (_, paths) in enumerate(caches))]
    return _cache_container(name, image, CACHE_SAVE, args, volume=volume, label_values=label_values,
                            limits=limits, mounts=mounts, workspace_readonly=True)


CACHE_FORMAT = "{{.Name}}\t{{.Label \"" + LABEL_CACHE + "\"}}"


def cache_volumes(owner: str) -> list[str]:
    """The owner's cache volumes: NAME lines."""
    return [DOCKER, "volume", "ls", *filter_args({LABEL_OWNER: owner, LABEL_CACHE: "1"}), "--format", "{{.Name}}"]


def volume_sizes() -> list[str]:
    """The engine's volumes with their sizes (the daemon measures them): one JSON list."""
    return [DOCKER, "system", "df", "--verbose", "--format", "{{json .Volumes}}"]
