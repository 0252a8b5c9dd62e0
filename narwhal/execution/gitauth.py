"""Handing git a repository credential without leaking it.

A token goes to git as an ``Authorization`` header in ``http.extraHeader``, set through
the environment (``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n``/``GIT_CONFIG_VALUE_n``): never
on argv (which every user of the machine can read in /proc), never in the remote URL git
writes into the mirror's config. The environment of a process is readable only by its
own user and root.

Redirects are not followed when a credential is set (``http.followRedirects=false``):
git 2.39 with its default ``initial`` sends the header to the host a first answer
redirects to, on every request after the first (checked in
tests/test_repo_credentials.py). curl drops it on the redirect itself; git adds it again.

An ssh deploy key is written to a file of its own (0600, in a fresh 0700 directory in
/dev/shm when there is one, else the system temp dir: never the state directory) for
the length of one git command, used with ``GIT_SSH_COMMAND`` (``-i FILE -o
IdentitiesOnly=yes``, strict host keys from the configured known_hosts, no agent, no
user ssh config) and removed when the command ends, however it ends. A process killed
before it could remove one leaves it behind; the next ``sweep_key_dirs`` takes it.

Whatever git prints goes through ``GitAuth.mask`` (a Masker of the value and the header
made from it) before it becomes a message anywhere.
"""

from __future__ import annotations

import atexit
import base64
import os
import re
import shlex
import shutil
import tempfile
import threading
from collections.abc import Mapping

from narwhal.config.credentials import GitCredential, known_hosts_path
from narwhal.masking import Masker

SSH_CONNECT_TIMEOUT = 30
KEY_DIR_PREFIX = "narwhal-gitkey-"
_KEY_DIR_RE = re.compile(re.escape(KEY_DIR_PREFIX) + r"(\d+)-")
_ADVICE = ("Please make sure you have the correct access rights", "and the repository exists.")
_live_dirs: set[str] = set()
_live_lock = threading.Lock()


def authorization(credential: GitCredential) -> str:
    """The ``Authorization`` header's value: Basic USERNAME:TOKEN, or Bearer TOKEN."""
    if credential.bearer:
        return f"Bearer {credential.value}"
    raw = f"{credential.username}:{credential.value}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def http_config(credential: GitCredential, repo: str) -> list[tuple[str, str]]:
    """git config pairs for a token: the header (after clearing any inherited ones) and no
    redirects, for every URL and for REPO's own (a URL-specific setting in a user's
    gitconfig would otherwise win over the general one)."""
    return [
        ("http.extraHeader", ""),  # an empty value clears the list: ours is the only one
        ("http.extraHeader", f"Authorization: {authorization(credential)}"),
        ("http.followRedirects", "false"),
        (f"http.{repo}.followRedirects", "false"),
    ]


def config_env(pairs: list[tuple[str, str]], environ: Mapping[str, str]) -> dict[str, str]:
    """``GIT_CONFIG_COUNT``/``KEY_n``/``VALUE_n`` adding PAIRS after any the environment has."""
    try:
        start = int(environ.get("GIT_CONFIG_COUNT", "0") or "0")
    except ValueError:
        start = 0
    start = max(start, 0)
    env = {"GIT_CONFIG_COUNT": str(start + len(pairs))}
    for i, (key, value) in enumerate(pairs, start):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


def ssh_command(key_file: str, known_hosts: str, connect_timeout: int = SSH_CONNECT_TIMEOUT) -> str:
    """``GIT_SSH_COMMAND`` for a deploy key: that key only, strict host keys from KNOWN_HOSTS."""
    argv = ["ssh", "-F", "/dev/null", "-i", key_file,
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={connect_timeout}"]
    return shlex.join(argv)


def key_dir_base() -> str:
    """Where deploy keys are written: /dev/shm (memory) when usable, else the system temp dir."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def write_key(value: str, base: str | None = None) -> str:
    """VALUE in ``BASE/narwhal-gitkey-PID-XXXX/key`` (directory 0700, file 0600); the file's path."""
    directory = tempfile.mkdtemp(prefix=f"{KEY_DIR_PREFIX}{os.getpid()}-", dir=base or key_dir_base())
    with _live_lock:
        _live_dirs.add(directory)
    path = os.path.join(directory, "key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(value if value.endswith("\n") else value + "\n")  # OpenSSH wants the last newline
    except BaseException:
        remove_key(path)
        raise
    return path


def remove_key(path: str) -> None:
    directory = os.path.dirname(path)
    shutil.rmtree(directory, ignore_errors=True)
    with _live_lock:
        _live_dirs.discard(directory)


@atexit.register
def _remove_live_keys() -> None:
    """A key still in use when the dispatcher exits (a fetch thread cut short) goes too."""
    with _live_lock:
        left = list(_live_dirs)
    for directory in left:
        shutil.rmtree(directory, ignore_errors=True)


def sweep_key_dirs(base: str | None = None) -> list[str]:
    """Remove key directories left by processes that no longer run (killed mid-fetch)."""
    base = base or key_dir_base()
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return []
    for name in names:
        match = _KEY_DIR_RE.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        path = os.path.join(base, name)
        try:
            if os.lstat(path).st_uid != os.geteuid():
                continue  # another user's: not ours to judge
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GitAuth:
    """The environment one git command needs for CREDENTIAL (None: nothing added), and the mask
    for what it prints. Use as a context manager: a deploy key exists only inside it."""

    def __init__(self, credential: GitCredential | None, repo: str):
        self.credential = credential
        self.repo = repo
        self.key_file: str | None = None
        pairs: list[tuple[str, str]] = []
        if credential is not None:
            pairs.append((credential.secret, credential.value))
            if credential.kind == "token":
                header = authorization(credential)
                pairs += [(credential.secret, header), (credential.secret, header.split(" ", 1)[1])]
        self.masker = Masker(pairs)

    def __repr__(self) -> str:  # never the value
        return f"<GitAuth {self.credential.describe() if self.credential else 'none'} for {self.repo}>"

    def __enter__(self) -> GitAuth:
        if self.credential is not None and self.credential.kind == "ssh_key":
            self.key_file = write_key(self.credential.value)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.key_file is not None:
            remove_key(self.key_file)
            self.key_file = None

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """BASE plus what the credential needs (call inside the ``with``)."""
        env = dict(base)
        credential = self.credential
        if credential is None:
            return env
        env["GIT_TRACE_REDACT"] = "1"  # a GIT_TRACE_CURL the admin set shows no header
        if credential.kind == "token":
            env.update(config_env(http_config(credential, self.repo), base))
        else:
            assert self.key_file is not None, "GitAuth.env outside its with block"
            env["GIT_SSH_COMMAND"] = ssh_command(self.key_file, known_hosts_path(credential))
            env.pop("GIT_SSH", None)
        return env

    def mask(self, text: str) -> str:
        return self.masker.mask_text(text)

    def failure(self, stderr: bytes, returncode: int) -> str:
        """What a failed git command said, masked, in one line, with what it most likely means.

        git's own closing advice ("Please make sure you have the correct access rights / and
        the repository exists.") is left out; when git only says it could not read from the
        remote, the line before (ssh's reason) comes with it."""
        text = self.mask(stderr.decode("utf-8", "replace"))  # masked whole: a value may span lines
        lines = [line.strip() for line in text.splitlines()
                 if line.strip() and not line.strip().startswith(_ADVICE)]
        detail = lines[-1] if lines else f"git exited {returncode}"
        if len(lines) > 1 and detail.startswith("fatal: Could not read from remote repository"):
            detail = f"{lines[-2]} ({detail.removeprefix('fatal: ').rstrip('.')})"
        hint = self.hint(text)
        return detail + (f" ({hint})" if hint else "")

    def hint(self, stderr: str) -> str | None:
        """What a failure most likely means, in narwhal's words (None: git's own say it)."""
        lowered = stderr.lower()
        credential = self.credential
        refused = ("could not read username" in lowered or "authentication failed" in lowered
                   or "returned error: 401" in lowered or "returned error: 403" in lowered)
        host_key = "host key verification failed" in lowered or "no matching host key" in lowered
        if credential is None:
            if refused or "permission denied (publickey" in lowered:
                return ("the server wants credentials and none is configured for this repository "
                        "(repos: in inventory.yaml, or a forge with fetch: true)")
            if host_key:
                return "the server's host key is not in the known_hosts of the dispatcher's user"
            return None
        if "returned error: 30" in lowered:
            return ("the server answered with a redirect, which a fetch with credentials does not follow; "
                    "configure the repository under the URL it is served at")
        if refused or "permission denied" in lowered:
            return f"the server refused the {credential.describe()}"
        if host_key:
            return f"the server's host key is not in {known_hosts_path(credential)} ({credential.source}.known_hosts)"
        return None
