"""Repository identity: one canonical spelling per repository, globs over path segments,
local roots, fetch hosts and branches (the "trust boundaries" findings 1, 8 and 9)."""

from __future__ import annotations

import os

import pytest

from narwhal.config.pipeline import parse_pipeline
from narwhal.config.repository import (
    RepositoryError,
    canonical_pattern,
    canonical_repo,
    glob_match,
    host_of,
    pattern_host,
    under_root,
)
from narwhal.config.settings import parse_settings
from narwhal.errors import BadRequest, ConfigError

SPELLINGS = {
    "http://host/org/app.git": [
        "http://host/org/app.git",
        "HTTP://HOST/org/app.git",
        "http://Host:80/org/app.git",
        "http://host/org/app.git/",
        "http://host/org/app.git//",
        "http://host/org/%61pp.git",
        "http://host/%6Frg/app%2Egit",
        "Http://hOst:80/org/%61pp.git/",
    ],
    "https://host/org/app.git": ["https://host:443/org/app.git", "HTTPS://host/org/app.git/"],
    "https://host:8443/org/app.git": ["https://host:8443/org/app.git", "https://HOST:8443/org/app.git"],
    "http://host/org/a%20b.git": ["http://host/org/a b.git", "http://host/org/a%20b.git"],
    "ssh://git@host/srv/app.git": [
        "ssh://git@host/srv/app.git",
        "ssh://git@HOST:22/srv/app.git",
        "git+ssh://git@host/srv/app.git",
        "ssh+git://git@host/srv/app.git/",
        "git@host:/srv/app.git",
    ],
    "ssh://git@host/~/org/app.git": ["git@host:org/app.git", "git@Host:~/org/app.git", "ssh://git@host/~/org/app.git"],
    "ssh://host:2222/app.git": ["ssh://host:2222/app.git"],
    "http://[::1]:8080/app.git": ["http://[::1]:8080/app.git", "http://[::1]:8080/app.git/"],
}


@pytest.mark.parametrize("canonical, spellings", SPELLINGS.items())
def test_finding8_every_spelling_of_one_repository_has_one_canonical_form(canonical, spellings):
    assert {canonical_repo(s) for s in spellings} == {canonical}
    assert canonical_repo(canonical) == canonical  # canonical forms are fixed points


def test_the_git_suffix_is_significant():
    assert canonical_repo("http://h/org/app") != canonical_repo("http://h/org/app.git")
    assert canonical_repo("http://h/org/app/") == "http://h/org/app"


@pytest.mark.parametrize("repo, message", [
    ("http://host/org/app.git/../../attacker/evil.git", "'..' path segments"),
    ("http://host/org/./app.git", "'..' path segments"),
    ("http://host/org/%2e%2e/attacker/evil.git", "'..' path segments"),
    ("http://host/org/%2E%2E/attacker/evil.git", "'..' path segments"),
    ("http://host/org/.%2e/x.git", "'..' path segments"),
    ("http://host/org/%2e/x.git", "'..' path segments"),
    ("http://host/org%2F..%2Fattacker/evil.git", "encoded '/'"),
    ("http://host/org/app%2fx.git", "encoded '/'"),
    ("http://host/org/%252e%252e/x.git", "double percent-encoding"),
    ("http://host/org/%ff.git", "not UTF-8"),
    ("http://host/org/%0a.git", "control characters"),
    ("http://host/org/app.git\n", "control characters"),
    ("http://host/org/app.git?x=1", "queries and fragments"),
    ("http://host/org/app.git#x", "queries and fragments"),
    ("http://host", "no repository path"),
    ("http://host:0x50/app.git", "bad port"),
    ("http://ho_st!/app.git", "bad host name"),
    ("ftp://host/app.git", "unsupported scheme"),
    ("ext::sh -c touch% /tmp/pwned", "remote helpers"),
    ("relative/path", "must be absolute"),
    ("/srv/git/../secret", "'..' path segments"),
    ("file:///srv/git/../secret", "'..' path segments"),
    ("file://otherhost/srv/git/app", "absolute path on this host"),
    (" /srv/git/app", "leading or trailing spaces"),
    ("-uhelp", "must not start with '-'"),
])
def test_finding1_dot_segments_and_encodings_are_refused_not_resolved(repo, message):
    with pytest.raises(RepositoryError, match=message) as info:
        canonical_repo(repo)
    assert isinstance(info.value, BadRequest)  # a 400 for the client


@pytest.mark.parametrize("repo", [
    "http://user:hunter2@host/app.git",
    "https://token@host/app.git",
    "https://x-access-token:hunter2@HOST/app.git",
    "ssh://git:hunter2@host/app.git",
])
def test_finding8_credentials_are_refused_and_never_echoed(repo):
    with pytest.raises(RepositoryError, match="are not accepted") as info:
        canonical_repo(repo)
    assert "hunter2" not in str(info.value)


def test_a_refused_spelling_never_echoes_its_userinfo():
    with pytest.raises(RepositoryError, match="bad port") as info:
        canonical_repo("http://hunter2@host:bad/app.git")
    assert "hunter2" not in str(info.value)


def test_an_ssh_user_name_is_kept():
    assert canonical_repo("ssh://deploy@host/app.git") == "ssh://deploy@host/app.git"
    assert host_of("ssh://deploy@host:2222/app.git") == "host:2222"
    assert host_of("/srv/git/app") is None


def test_local_paths_and_file_urls_become_the_realpath(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    expected = os.path.realpath(real)
    spellings = [str(real), str(real) + "/", str(tmp_path / "link"), f"file://{real}", f"file://localhost{real}",
                 f"file://{tmp_path}/link/", f"file://{tmp_path}/%72eal"]
    assert {canonical_repo(s) for s in spellings} == {expected}


def test_local_roots(tmp_path):
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    (tmp_path / "escape").symlink_to("/etc")
    (root / "escape").symlink_to("/etc")
    assert under_root(canonical_repo(str(root / "app")), [str(root)])
    assert under_root(canonical_repo(str(root)), [str(root)])
    assert not under_root(canonical_repo(str(root / "escape")), [str(root)])  # the symlink leads out
    assert not under_root(canonical_repo(str(tmp_path / "rootx")), [str(root)])  # a prefix is not a parent
    assert not under_root(canonical_repo(str(root / "app")), [])  # no roots: nothing local


def test_local_roots_and_fetch_hosts_settings():
    settings = parse_settings({"local_roots": ["/srv/git"], "fetch_hosts": ["GIT.example.com", "*.corp"]})
    assert settings.local_roots == ("/srv/git",)
    assert settings.fetch_hosts == ("git.example.com", "*.corp")
    assert parse_settings(None).local_roots == () and parse_settings(None).fetch_hosts is None
    with pytest.raises(ConfigError, match="absolute directory paths"):
        parse_settings({"local_roots": ["relative"]})
    with pytest.raises(ConfigError, match="host names"):
        parse_settings({"fetch_hosts": ["http://host/x"]})


@pytest.mark.parametrize("pattern, text, expected", [
    ("http://host/org/*", "http://host/org/app.git", True),
    ("http://host/org/*", "http://host/org/a/b", False),
    ("http://host/org/*", "http://host/attacker/evil.git", False),
    ("http://host/org/**", "http://host/org/a/b.git", True),
    ("http://host/**/app.git", "http://host/x/y/app.git", True),
    ("http://host/org/app?.git", "http://host/org/app1.git", True),
    ("http://host/org/app?.git", "http://host/org/app/.git", False),
    ("http://host/org/[ab]pp.git", "http://host/org/app.git", True),
    ("http://host/org/[!ab]pp.git", "http://host/org/app.git", False),
    ("http://host/org/a[/]b", "http://host/org/a/b", False),
    ("/srv/git/*", "/srv/git/app", True),
    ("/srv/git/*", "/srv/git/app/sub", False),
    ("*", "http://anywhere/a/b/c", True),
    ("**", "/any/local/path", True),
    ("http://host/org/a.b", "http://host/org/axb", False),  # '.' is literal
])
def test_glob_match_keeps_star_inside_one_segment(pattern, text, expected):
    assert glob_match(pattern, text) is expected


@pytest.mark.parametrize("pattern, canonical", [
    ("HTTP://Host:80/org/*", "http://host/org/*"),
    ("https://HOST:443/org/*/", "https://host/org/*"),
    ("git@Host:org/*", "ssh://git@host/~/org/*"),
    ("file:///srv/git/*", os.path.realpath("/srv/git") + "/*"),
    ("*", "*"),
])
def test_patterns_are_canonicalised_like_repositories(pattern, canonical):
    assert canonical_pattern(pattern) == canonical


def test_pattern_hosts():
    assert pattern_host("http://127.0.0.1:8080/org/*") == "127.0.0.1:8080"
    assert pattern_host("ssh://git@host/x") == "host"
    assert pattern_host("http://*.example.com/x") is None  # a host glob is allowed only when listed
    assert pattern_host("/srv/git/*") is None and pattern_host("*") is None


def test_a_pattern_with_credentials_is_a_config_error():
    with pytest.raises(ConfigError, match="credentials are not accepted"):
        parse_pipeline({"repo": "https://u:p@host/org/*", "image": "busybox", "steps": [{"name": "s", "run": "x"}]})


def test_finding1_a_pipeline_glob_cannot_be_escaped():
    p = parse_pipeline({"repo": "HTTP://Host:80/org/*", "image": "busybox", "steps": [{"name": "s", "run": "x"}]})
    assert p.repo == ["http://host/org/*"]
    assert p.matches(canonical_repo("http://HOST/org/app.git/"))
    assert not p.matches("http://host/org/app.git/../../attacker/evil.git")  # a spelling that is never canonical
    assert not p.matches(canonical_repo("http://host/org/sub/evil.git"))
    with pytest.raises(RepositoryError):
        canonical_repo("http://host/org/app.git/../../attacker/evil.git")
    assert p.fetch_hosts() == {"host"}


def test_finding9_branches_need_a_known_matching_branch():
    steps = [{"name": "s", "run": "x"}]
    release = parse_pipeline({"repo": "*", "branches": ["release"], "image": "busybox", "steps": steps})
    every = parse_pipeline({"repo": "*", "image": "busybox", "steps": steps})
    assert release.matches("/r", "release")
    assert not release.matches("/r", "main")
    assert not release.matches("/r", None)  # no branch: only pipelines without branches
    assert every.matches("/r", None) and every.matches("/r", "main")


@pytest.mark.parametrize("repo", ["https://github.com/org/app\\..\\evil", "https://github.com/org/app%5C..%5Cevil",
                                  "ssh://-oProxyCommand@h/x", "-oProxyCommand@h:x"])
def test_finding1_backslashes_and_option_like_users_are_refused(repo):
    """A server or proxy that reads '\\' as '/' would serve org/evil for a name the glob
    approved as org/<one segment>; a user that starts with '-' is an ssh option."""
    with pytest.raises(RepositoryError):
        canonical_repo(repo)


def test_finding8_a_repository_under_a_root_cannot_read_one_outside_it(tmp_path):
    """A second attack pass built an outside repository's secrets through a repository under
    the root: a .git file naming the outside git directory, and objects/info/alternates."""
    import subprocess

    from narwhal.cli.gitrepo import make_git_repo
    from narwhal.config.repository import local_repository_problem

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    make_git_repo(str(outside), {"build.sh": "echo SECRET\n"})
    fine, _ = make_git_repo(str(root / "fine"))
    assert local_repository_problem(fine, [str(root)]) is None

    gitfile = root / "gitfile"
    gitfile.mkdir()
    (gitfile / ".git").write_text(f"gitdir: {outside / '.git'}\n")
    assert "outside the allowed local roots" in local_repository_problem(str(gitfile), [str(root)])

    alternates, _ = make_git_repo(str(root / "alternates"))
    (root / "alternates" / ".git" / "objects" / "info" / "alternates").write_text(f"{outside / '.git' / 'objects'}\n")
    assert "alternates" in local_repository_problem(alternates, [str(root)])

    linked, _ = make_git_repo(str(root / "linked"))
    objects = root / "linked" / ".git" / "objects"
    victim = next(p for p in (outside / ".git" / "objects").rglob("*") if p.is_file())
    (objects / "ab").mkdir(exist_ok=True)
    (objects / "ab" / "link").symlink_to(victim)
    assert "symbolic link" in local_repository_problem(linked, [str(root)])

    stalled, _ = make_git_repo(str(root / "stalled"))
    os.mkfifo(root / "stalled" / ".git" / "objects" / "fifo")
    assert "not a regular file" in local_repository_problem(stalled, [str(root)])

    bare = root / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", fine, str(bare)], check=True, capture_output=True)
    assert local_repository_problem(str(bare), [str(root)]) is None
