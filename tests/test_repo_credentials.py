"""Repository credentials: ``repos:`` and forges' ``fetch:`` (narwhal.config.credentials), the
environment git gets (narwhal.execution.gitauth), and a Mirror fetching from a real git
server on loopback that wants a token (testbed.privategit, ``git http-backend``).

The whole path through ``narwhal serve`` (and a deploy key over a real sshd) is in
tests/e2e/test_repo_credentials.py.
"""

from __future__ import annotations

import base64
import os
import shlex
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from narwhal.config.credentials import GitCredential, credential_for, parse_repos
from narwhal.config.forges import parse_forges
from narwhal.config.loader import load_config
from narwhal.config.secrets import Secret, SecretSpec
from narwhal.config.yamlfile import parse_yaml
from narwhal.errors import ConfigError, SourceError
from narwhal.execution import gitauth
from narwhal.execution.gitauth import GitAuth, authorization, config_env, http_config, ssh_command
from narwhal.execution.source import Mirror
from testbed import PrivateGitServer, every_cmdline, everything_under

TOKEN = "tok-Narwhal-REPO-7f3e9a"
OTHER = "tok-wrong-0000000000"
USER = "oauth2"


def secret(name: str, value: str) -> Secret:
    return Secret(name, SecretSpec(env="X"), value)


@pytest.fixture(scope="module")
def private_key(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "deploy"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deploy", "-f", str(path)], check=True)
    return path.read_text()


@pytest.fixture(scope="module")
def encrypted_key(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a-passphrase", "-f", str(path)], check=True)
    return path.read_text()


def repos(text: str, secrets: dict[str, Secret] | None = None):
    document = parse_yaml(text, "inventory.yaml")
    return parse_repos(document.data.get("repos"), "inventory.yaml", document, secrets)


def problems(text: str, secrets: dict[str, Secret] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        repos(text, secrets)
    return [str(p) for p in info.value.problems]


SECRETS = {"GIT_TOKEN": secret("GIT_TOKEN", TOKEN)}


# --- config -------------------------------------------------------------------------------


def test_entries_are_read_in_the_canonical_spelling(private_key):
    found = repos('repos:\n'
                  '  - {url: "HTTPS://Git.Example.com:443/team/*", token: GIT_TOKEN, username: oauth2}\n'
                  '  - {url: "git@git.example.com:team/app.git", ssh_key: DEPLOY_KEY, known_hosts: /etc/kh}\n'
                  '  - {url: "https://bb.example/**", token: GIT_TOKEN, auth: bearer}\n',
                  {**SECRETS, "DEPLOY_KEY": secret("DEPLOY_KEY", private_key)})
    assert [e.url for e in found] == ["https://git.example.com/team/*", "ssh://git@git.example.com/~/team/app.git",
                                      "https://bb.example/**"]
    assert found[0].username == "oauth2" and found[1].known_hosts == "/etc/kh" and found[2].auth == "bearer"


@pytest.mark.parametrize("entry, message", [
    ('{url: "https://h.example/a/*", token: GIT_TOKEN, ssh_key: GIT_TOKEN}', "exactly one of token"),
    ('{url: "https://h.example/a/*"}', "exactly one of token"),
    ('{url: "ssh://git@h.example/a.git", token: GIT_TOKEN}', "an ssh:// one takes ssh_key"),
    ('{url: "https://h.example/a.git", ssh_key: GIT_TOKEN}', "an https:// one takes a token"),
    ('{url: "http://h.example/a.git", token: GIT_TOKEN}', "only over https://"),
    ('{url: "https://*.example/a/*", token: GIT_TOKEN}', "without globs"),
    ('{url: "https://h.example:*/a/*", token: GIT_TOKEN}', "without globs"),
    ('{url: "**", token: GIT_TOKEN}', "https:// or ssh://"),
    ('{url: "/srv/git/*", token: GIT_TOKEN}', "https:// or ssh://"),
    ('{url: "https://h.example", token: GIT_TOKEN}', "a repository path"),
    ('{url: "https://h.example/a/*", token: GIT_TOKEN, username: "a:b"}', "no ':'"),
    ('{url: "https://h.example/a/*", token: GIT_TOKEN, known_hosts: /k}', "known_hosts goes with ssh_key"),
    ('{url: "ssh://git@h.example/a.git", ssh_key: GIT_TOKEN, known_hosts: "/etc/known hosts"}', "without spaces"),
    ('{url: "https://h.example/a/*", token: GIT_TOKEN, auth: bearer, username: u}', "leave out username"),
    ('{url: "https://h.example/a/*", token: GIT_TOKEN, auth: digest}', "expected one of"),
    ('{url: "https://h.example/a/*", token: GIT_TOKEN, password: x}', "unknown key"),
    ('{url: "https://h.example/a/*", token: "lower case!"}', "secret name"),
    ('{url: "https://h.example/a/*", token: NOT_DECLARED}', "unknown secret 'NOT_DECLARED'"),
])
def test_finding11_a_bad_entry_is_a_located_problem(entry, message):
    found = problems(f"runners: []\nrepos:\n  - {entry}\n", SECRETS)
    assert len(found) == 1 and found[0].startswith("inventory.yaml:3: repos[0]"), found
    assert message in found[0], found


def test_finding11_credentials_in_the_url_are_refused_and_not_echoed():
    [found] = problems('repos:\n  - {url: "https://me:hunter2-pw@h.example/a/*", token: GIT_TOKEN}\n', SECRETS)
    assert "credentials are not accepted" in found and "hunter2" not in found


def test_repos_must_be_a_list():
    assert problems("repos: {url: x}\n") == ["inventory.yaml:1: repos: expected a list of repository credentials, "
                                             "got a mapping"]


def test_finding11_a_secret_that_cannot_be_what_it_is_used_as_is_refused_without_its_value(private_key,
                                                                                           encrypted_key):
    values = {"SPACED": "two words-xxxxxxx", "NEWLINE": "tok-abcdefgh\r\nX-Evil: 1", "KEY": private_key,
              "LOCKED": encrypted_key, "NOTAKEY": "just-a-token-value"}
    secrets = {name: secret(name, value) for name, value in values.items()}
    found = problems("repos:\n"
                     "  - {url: 'https://h.example/a/*', token: SPACED}\n"
                     "  - {url: 'https://h.example/b/*', token: NEWLINE}\n"
                     "  - {url: 'https://h.example/c/*', token: KEY}\n"
                     "  - {url: 'ssh://git@h.example/d.git', ssh_key: LOCKED}\n"
                     "  - {url: 'ssh://git@h.example/e.git', ssh_key: NOTAKEY}\n", secrets)
    assert [p.split(": ", 2)[:2] for p in found] == [
        ["inventory.yaml:2", "repos[0].token"], ["inventory.yaml:3", "repos[1].token"],
        ["inventory.yaml:4", "repos[2].token"], ["inventory.yaml:5", "repos[3].ssh_key"],
        ["inventory.yaml:6", "repos[4].ssh_key"]]
    assert "one word" in found[0] and "encrypted" in found[3] and "does not hold a private key" in found[4]
    text = "\n".join(found)
    assert not any(v.strip()[:40] in text for v in values.values())
    repos("repos:\n  - {url: 'ssh://git@h.example/d.git', ssh_key: KEY}\n", secrets)  # a real key is fine


def forges(text: str):
    document = parse_yaml(text, "inventory.yaml")
    return parse_forges(document.data.get("forges"), "inventory.yaml", document)


def test_finding11_a_forge_lends_its_token_only_when_asked_and_only_to_https_repositories_it_serves():
    [gitea, github, quiet] = forges(
        "forges:\n"
        "  - {name: gitea, kind: gitea, url: 'https://gitea.example', token: GITEA, webhook_secret: H, fetch: true}\n"
        "  - {name: gh, kind: github, url: 'https://api.github.com', token: GH, webhook_secret: H, fetch: true}\n"
        "  - {name: lab, kind: gitlab, url: 'https://lab.example', token: LAB, webhook_secret: H}\n")
    secrets = {n: secret(n, f"{n.lower()}-token-value") for n in ("GITEA", "GH", "LAB")}
    got = credential_for("https://gitea.example/team/app.git", [], [gitea, github, quiet], secrets)
    assert got == GitCredential("token", "GITEA", "", "forge gitea", username="x-access-token")
    assert got is not None and got.value == "gitea-token-value"
    assert credential_for("https://github.com/org/x", [], [gitea, github, quiet], secrets).secret == "GH"
    assert credential_for("https://lab.example/org/x", [], [gitea, github, quiet], secrets) is None  # no fetch:
    assert credential_for("http://gitea.example/team/app.git", [], [gitea], secrets) is None  # no TLS
    assert credential_for("ssh://git@gitea.example/team/app.git", [], [gitea], secrets) is None
    with pytest.raises(ConfigError, match=r"forges\[0\]: fetch: true lends the forge's token to git"):
        forges("forges:\n  - {name: g, kind: gitea, url: 'https://g.example', webhook_secret: H, fetch: true}\n")


def test_the_first_matching_entry_wins_then_forges(private_key):
    secrets = {"A": secret("A", "token-a-aaaaaaaa"), "B": secret("B", "token-b-bbbbbbbb"),
               "F": secret("F", "token-f-ffffffff"), "KEY": secret("KEY", private_key)}
    entries = repos("repos:\n"
                    "  - {url: 'https://h.example/team/app.git', token: A, username: first}\n"
                    "  - {url: 'https://h.example/team/*', token: B}\n"
                    "  - {url: 'ssh://git@h.example/team/*', ssh_key: KEY}\n", secrets)
    [forge] = forges("forges:\n  - {name: h, kind: gitlab, url: 'https://h.example', token: F, "
                     "webhook_secret: F, fetch: true}\n")

    def pick(repo: str) -> tuple | None:
        c = credential_for(repo, entries, [forge], secrets)
        return None if c is None else (c.kind, c.secret, c.source, c.username, c.known_hosts)

    assert pick("https://h.example/team/app.git") == ("token", "A", "repos[0]", "first", None)
    assert pick("https://h.example/team/lib.git") == ("token", "B", "repos[1]", "x-access-token", None)
    assert pick("ssh://git@h.example/team/lib.git") == ("ssh_key", "KEY", "repos[2]", None, "~/.ssh/known_hosts")
    assert pick("https://h.example/team/sub/deep.git") == ("token", "F", "forge h", "oauth2", None)  # * stays in a segment
    assert pick("https://other.example/team/app.git") is None
    assert pick("/srv/git/app") is None


def test_a_loopback_http_repository_may_carry_a_token():
    [entry] = repos("repos:\n  - {url: 'http://127.0.0.1:8080/a/*', token: GIT_TOKEN, auth: bearer}\n", SECRETS)
    got = credential_for("http://127.0.0.1:8080/a/b.git", [entry], [], SECRETS)
    assert got is not None and got.bearer and got.kind == "token"


def test_config_loads_repos_and_says_which_secret_is_missing(tmp_path):
    root = tmp_path / "config"
    root.mkdir()
    (root / "token").write_text(TOKEN + "\n")
    (root / "token").chmod(0o600)
    (root / "inventory.yaml").write_text(
        "runners: []\n"
        "secrets:\n  GIT_TOKEN: {file: token, repos: []}\n"
        "repos:\n"
        "  - {url: 'https://git.example/team/*', token: GIT_TOKEN}\n")
    config = load_config(root)
    got = config.git_credential("https://git.example/team/app")
    assert got is not None and got.value == TOKEN and got.source == "repos[0]"
    assert TOKEN not in repr(got) and TOKEN not in repr(config.repos)
    assert config.git_credential("https://git.example/other/app") is None
    (root / "inventory.yaml").write_text(
        "runners: []\nrepos:\n  - {url: 'https://git.example/team/*', token: GIT_TOKEN}\n")
    with pytest.raises(ConfigError, match=r"inventory.yaml:3: repos\[0\].token: unknown secret 'GIT_TOKEN'"):
        load_config(root)


# --- what git is given ---------------------------------------------------------------------


def token(username: str | None = USER, value: str = TOKEN) -> GitCredential:
    return GitCredential("token", "GIT_TOKEN", value, "repos[0]", username=username)


def test_the_header_is_basic_or_bearer():
    assert authorization(token()) == "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
    assert authorization(token(None)) == f"Bearer {TOKEN}"


def test_finding11_a_token_goes_through_the_environment_and_redirects_are_not_followed():
    base = {"PATH": "/usr/bin", "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.x", "GIT_CONFIG_VALUE_0": "y"}
    with GitAuth(token(), "https://h.example/a.git") as auth:
        env = auth.env(base)
    assert base["GIT_CONFIG_COUNT"] == "1"  # not changed in place
    assert env["GIT_CONFIG_KEY_0"] == "core.x" and env["GIT_CONFIG_COUNT"] == "5"
    pairs = [(env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"]) for i in range(1, 5)]
    assert pairs == [("http.extraHeader", ""), ("http.extraHeader", f"Authorization: {authorization(token())}"),
                     ("http.followRedirects", "false"), ("http.https://h.example/a.git.followRedirects", "false")]
    assert pairs == http_config(token(), "https://h.example/a.git")
    assert env["GIT_TRACE_REDACT"] == "1"
    assert config_env([("a.b", "c")], {"GIT_CONFIG_COUNT": "junk"}) == {
        "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "a.b", "GIT_CONFIG_VALUE_0": "c"}


def test_no_credential_adds_nothing():
    with GitAuth(None, "https://h.example/a.git") as auth:
        assert auth.env({"A": "1"}) == {"A": "1"}
        assert auth.mask("nothing to hide") == "nothing to hide"


def test_finding11_git_output_is_masked_in_every_spelling_git_could_print():
    auth = GitAuth(token(), "https://h.example/a.git")
    header = authorization(token())
    text = (f"fatal: remote error: you sent {header}\nAuthorization: {header.split()[1]}\n"
            f"token={TOKEN} url-encoded={TOKEN.replace('-', '%2D')}")
    masked = auth.mask(text)
    assert TOKEN not in masked and header.split()[1] not in masked
    assert masked.count("[masked:GIT_TOKEN]") >= 3
    assert TOKEN not in repr(auth)


def test_finding11_a_deploy_key_lives_in_a_private_file_for_one_command_only(private_key, tmp_path):
    credential = GitCredential("ssh_key", "DEPLOY_KEY", private_key.rstrip("\n"), "repos[1]",
                               known_hosts=str(tmp_path / "known_hosts"))
    with GitAuth(credential, "ssh://git@h.example/a.git") as auth:
        env = auth.env({"GIT_SSH": "plink", "PATH": "/usr/bin"})
        key = auth.key_file
        assert key is not None and Path(key).read_text() == private_key  # the last newline restored
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(key)).st_mode) == 0o700
        assert os.path.dirname(os.path.dirname(key)) == gitauth.key_dir_base()
        argv = shlex.split(env["GIT_SSH_COMMAND"])
        assert "GIT_SSH" not in env and private_key.split("\n")[1] not in env["GIT_SSH_COMMAND"]
    assert argv[:5] == ["ssh", "-F", "/dev/null", "-i", key]
    for option in ("IdentitiesOnly=yes", "IdentityAgent=none", "BatchMode=yes", "StrictHostKeyChecking=yes",
                   f"UserKnownHostsFile={tmp_path / 'known_hosts'}", "GlobalKnownHostsFile=/dev/null"):
        assert option in argv
    assert not os.path.exists(os.path.dirname(key))
    assert shlex.split(ssh_command("/k", "/kh")) == [
        "ssh", "-F", "/dev/null", "-i", "/k", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/kh",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no", "-o", "ConnectTimeout=30"]


def test_key_directories_of_dead_processes_are_swept(tmp_path, private_key):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{gitauth.KEY_DIR_PREFIX}{dead.pid}-abc"
    stale.mkdir(mode=0o700)
    (stale / "key").write_text(private_key)
    mine = gitauth.write_key(private_key, str(tmp_path))
    other = tmp_path / "unrelated"
    other.mkdir()
    assert gitauth.sweep_key_dirs(str(tmp_path)) == [str(stale)]
    assert os.path.exists(mine) and other.exists()
    gitauth.remove_key(mine)
    assert not os.path.exists(os.path.dirname(mine))


@pytest.mark.parametrize("stderr, credential, expect", [
    ("fatal: could not read Username for 'https://h': terminal prompts disabled", None, "none is configured"),
    ("fatal: unable to access 'https://h/a/': The requested URL returned error: 403", token(),
     "refused the token GIT_TOKEN (repos[0])"),
    ("fatal: unable to access 'https://h/a/': The requested URL returned error: 302", token(), "redirect"),
    ("Host key verification failed.\nfatal: Could not read from remote repository.",
     GitCredential("ssh_key", "K", "v" * 8, "repos[2]", known_hosts="/etc/kh"), "not in /etc/kh (repos[2].known_hosts)"),
    ("fatal: repository 'https://h/a/' not found", token(), None),
])
def test_a_failure_says_what_it_most_likely_means(stderr, credential, expect):
    hint = GitAuth(credential, "https://h/a").hint(stderr)
    assert (hint is None) if expect is None else (expect in hint), hint


def test_a_failure_is_one_masked_line_with_ssh_s_reason_and_without_git_s_advice():
    stderr = (b"Permission denied (publickey).\r\nfatal: Could not read from remote repository.\n\n"
              b"Please make sure you have the correct access rights\nand the repository exists.\n")
    key = GitCredential("ssh_key", "DEPLOY_KEY", "v" * 8, "repos[1]")
    assert GitAuth(key, "ssh://git@h/a.git").failure(stderr, 128) == (
        "Permission denied (publickey). (Could not read from remote repository) "
        "(the server refused the ssh key DEPLOY_KEY (repos[1]))")
    assert GitAuth(None, "/x").failure(b"", 128) == "git exited 128"
    two_lines = GitCredential("ssh_key", "K", "line-one-aaaa\nline-two-bbbb", "repos[0]")
    said = GitAuth(two_lines, "/x").failure(b"x line-one-aaaa\nline-two-bbbb\n", 1)  # masked before the split
    assert said == "x [masked:K]"
    assert "[masked:GIT_TOKEN]" in GitAuth(token(), "/x").failure(f"fatal: bad {TOKEN}".encode(), 1)


# --- a real git server that wants a token ------------------------------------------------------


@pytest.fixture
def served(git_repo, tmp_path) -> Iterator[tuple[PrivateGitServer, str]]:
    """The git_repo as team/app.git on a loopback smart-HTTP server that wants Basic oauth2:TOKEN."""
    root = tmp_path / "served"
    (root / "team").mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--bare", git_repo.path, str(root / "team" / "app.git")], check=True)
    server = PrivateGitServer(str(root), authorization(token())).start()
    yield server, server.repo_url("team/app.git")
    server.stop()


def mirror_with(tmp_path: Path, credential: GitCredential | None, timeout: float = 60) -> Mirror:
    return Mirror(tmp_path / "mirrors", timeout=timeout, credentials=lambda repo: credential)


def spellings() -> list[bytes]:
    header = authorization(token()).split()[1]
    return [TOKEN.encode(), header.encode(), base64.b64encode(TOKEN.encode())]


def test_finding11_without_a_credential_the_fetch_fails_clearly_and_with_one_it_works(served, git_repo, tmp_path):
    server, url = served
    with pytest.raises(SourceError, match="the server wants credentials and none is configured"):
        mirror_with(tmp_path / "none", None).resolve(url, git_repo.commit)
    mirror = mirror_with(tmp_path, token())
    assert mirror.resolve(url, git_repo.commit) == git_repo.commit
    newer = git_repo.add_commit({"new.txt": "new\n"})
    subprocess.run(["git", "-C", git_repo.path, "push", "-q", f"{server.root}/team/app.git", "main"], check=True)
    assert mirror.resolve(url, newer) == newer  # the fetch carries it too
    assert all(s.authorization == f"{authorization(token())}" for s in server.seen if s.status == 200)
    config = (mirror.path_for(url) / "config").read_text()
    assert "remote \"origin\"" in config and url in config and "extraheader" not in config.lower()
    assert not any(s in everything_under(tmp_path / "mirrors") for s in spellings())


def test_finding11_a_wrong_token_is_refused_and_named_not_shown(served, git_repo, tmp_path):
    _, url = served
    with pytest.raises(SourceError) as info:
        mirror_with(tmp_path, token(value=OTHER)).resolve(url, git_repo.commit)
    assert "the server refused the token GIT_TOKEN (repos[0])" in str(info.value)
    assert OTHER not in str(info.value)


def test_finding11_a_redirect_to_another_host_gets_no_token(served, git_repo, tmp_path):
    """git 2.39 with http.followRedirects=initial (its default) sends the header to the
    redirect's host on every request after the first; narwhal follows no redirect at all."""
    server, url = served
    elsewhere = PrivateGitServer(server.root, None, host="127.0.0.2").start()
    try:
        server.redirect_to(elsewhere.url)
        with pytest.raises(SourceError, match="does not follow"):
            mirror_with(tmp_path, token()).resolve(url, git_repo.commit)
        assert elsewhere.seen == []
        assert [s.status for s in server.seen] == [302]
    finally:
        elsewhere.stop()


def test_finding11_a_server_echoing_the_credential_is_masked(served, git_repo, tmp_path):
    server, url = served
    server.remote_error(lambda headers: f"bad credentials {headers.get('Authorization')} for {TOKEN}")
    with pytest.raises(SourceError) as info:
        mirror_with(tmp_path, token()).resolve(url, git_repo.commit)
    message = str(info.value)
    assert "remote error: bad credentials [masked:GIT_TOKEN] for [masked:GIT_TOKEN]" in message  # the header whole
    assert not any(s.decode() in message for s in spellings())


def test_finding11_the_token_is_on_no_command_line_while_git_waits(served, git_repo, tmp_path):
    server, url = served
    server.hold()
    mirror = mirror_with(tmp_path, token())
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(mirror.resolve(url, git_repo.commit)), daemon=True)
    thread.start()
    try:
        assert server.holding.wait(30), "git never reached the server"
        seen = every_cmdline()
        assert b"git-remote-http" in seen or b"remote-http" in seen  # git is there, mid-request
        assert not any(s in seen for s in spellings())
    finally:
        server.release()
        thread.join(60)
    assert outcome == [git_repo.commit]


@pytest.fixture
def tarpit() -> Iterator[int]:
    """A TCP port that accepts and never says a word (an ssh server that hangs)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for s in held:
        s.close()


def key_dirs() -> set[str]:
    base = gitauth.key_dir_base()
    return {name for name in os.listdir(base) if name.startswith(f"{gitauth.KEY_DIR_PREFIX}{os.getpid()}-")}


def test_finding11_a_deploy_key_is_removed_when_git_is_stopped_for_its_timeout(tarpit, private_key, tmp_path):
    credential = GitCredential("ssh_key", "DEPLOY_KEY", private_key, "repos[0]",
                               known_hosts=str(tmp_path / "known_hosts"))
    before = key_dirs()
    mirror = mirror_with(tmp_path, credential, timeout=2)
    found: list[set[str]] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            mirror.resolve(f"ssh://git@127.0.0.1:{tarpit}/team/app.git", "a" * 40)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and not found:
        if now := key_dirs() - before:
            found.append(now)
        time.sleep(0.02)
    thread.join(30)
    assert found, "no key file while git ran"
    assert len(errors) == 1 and "did not finish within 2s" in str(errors[0])
    assert key_dirs() - before == set()


def test_finding11_a_forge_with_fetch_true_fetches_with_its_token(git_repo, tmp_path):
    """The whole config path: inventory.yaml's forge lends its token; the server wants exactly it."""
    root = tmp_path / "served"
    subprocess.run(["git", "clone", "-q", "--bare", git_repo.path, str(root / "team" / "app.git")], check=True)
    forge_token = GitCredential("token", "FORGE_TOKEN", TOKEN, "", username="x-access-token")
    server = PrivateGitServer(str(root), authorization(forge_token)).start()
    try:
        config_root = tmp_path / "config"
        config_root.mkdir()
        for name, value in (("token", TOKEN), ("hook", "hook-secret-value")):
            (config_root / name).write_text(value)
            (config_root / name).chmod(0o600)
        (config_root / "inventory.yaml").write_text(
            "runners: []\n"
            "secrets:\n  FORGE_TOKEN: {file: token}\n  HOOK: {file: hook}\n"
            f"forges:\n  - {{name: here, kind: gitea, url: '{server.url}', token: FORGE_TOKEN, "
            "webhook_secret: HOOK, fetch: true}\n")
        config = load_config(config_root)
        url = server.repo_url("team/app.git")
        assert Mirror(tmp_path / "mirrors", credentials=config.git_credential).resolve(url, git_repo.commit)
        assert {s.authorization for s in server.seen} == {authorization(forge_token)}
    finally:
        server.stop()
