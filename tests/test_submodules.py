"""submodules.py: reading .gitmodules and gitlinks, and which submodule URLs and paths narwhal accepts.

Everything here is what a repository's author wrote: the attacks sit next to the rules.
"""

from __future__ import annotations

import pytest

from narwhal.config.repository import RepositoryError
from narwhal.execution.submodules import (
    MAX_SUBMODULES,
    Submodule,
    parse_gitlinks,
    parse_gitmodules,
    path_problem,
    resolve_url,
    select,
    url_problem,
)

SUPER = "https://git.example.com/org/app.git"
HOSTS = ("git.example.com",)
SHA = "a" * 40


def test_gitmodules_listing_keeps_names_with_dots_and_the_last_value():
    listing = (b"submodule.lib.path\nvendor/lib\0submodule.lib.url\n../lib.git\0"
               b"submodule.a.b.c.path\nx\0submodule.lib.url\n../other.git\0core.bare\nfalse\0"
               b"submodule.nodot\nx\0")
    assert parse_gitmodules(listing) == {"lib": {"path": "vendor/lib", "url": "../other.git"},
                                         "a.b.c": {"path": "x"}}


def test_gitlinks_are_the_160000_entries_only():
    tree = (f"100644 blob {'b' * 40}\tREADME.md\x00160000 commit {SHA}\tvendor/lib\0"
            f"040000 tree {'c' * 40}\tsrc\x00160000 commit nothex\tbad\0").encode()
    assert parse_gitlinks(tree) == {"vendor/lib": SHA}


@pytest.mark.parametrize("path", ["../../x", "/etc", "a/../../b", "./a", "a//b", ".git/hooks", "a/.GIT/x",
                                  "a/.git./x", "a\\..\\b", "a\nb", ""])
def test_paths_that_could_leave_the_workspace_or_touch_git_are_refused(path):
    assert path_problem(path) is not None


@pytest.mark.parametrize("path", ["vendor/lib", "lib", "a/b-c_d.e/f", ".github/x"])
def test_ordinary_paths_pass(path):
    assert path_problem(path) is None


@pytest.mark.parametrize("url, resolved", [
    ("../lib.git", "https://git.example.com/org/lib.git"),
    ("./lib.git", "https://git.example.com/org/app.git/lib.git"),
    ("../../other/lib.git", "https://git.example.com/other/lib.git"),
    ("https://x.example/y.git", "https://x.example/y.git"),
])
def test_relative_urls_resolve_against_the_superproject(url, resolved):
    assert resolve_url(url, SUPER) == resolved


def test_a_relative_url_cannot_climb_over_the_host():
    with pytest.raises(RepositoryError):
        resolve_url("../../../../x.git", SUPER)


@pytest.mark.parametrize("url, why", [
    ("file:///etc", "a path on the dispatcher"),
    ("/srv/git/secret.git", "a path on the dispatcher"),
    ("-uhack", "starts with '-'"),
    ("--upload-pack=touch /tmp/pwned", "starts with '-'"),
    ("ext::sh -c touch% /tmp/pwned", "remote helpers"),
    ("fd::17", "remote helpers"),
    ("ssh://evil.example/x.git", "does not fetch from host 'evil.example'"),
    ("git@evil.example:x.git", "does not fetch from host 'evil.example'"),
    ("https://user:pw@git.example.com/x.git", "credentials"),
    ("https://git.example.com/a/%2e%2e/b.git", "'.' and '..'"),
    ("https://git.example.com/x.git\nhttps://evil", "control characters"),
    ("git://git.example.com/x.git", "unsupported scheme"),
    ("", "no url"),
    ("../../../../x.git", "climbs above"),
])
def test_hostile_urls_are_refused_with_a_reason(url, why):
    canonical, problem = url_problem(url, SUPER, HOSTS)
    assert canonical is None and problem is not None and why in problem, problem


def test_a_relative_url_of_a_local_superproject_is_local_and_refused():
    assert url_problem("../lib.git", "/srv/git/app.git", ["*"]) == (
        None, "url is a path on the dispatcher (local paths and file:// are not fetched for submodules)")


def test_an_allowed_url_comes_back_canonical():
    assert url_problem("HTTPS://GIT.example.com:443/org/lib.git/", SUPER, HOSTS) == (
        "https://git.example.com/org/lib.git", None)
    assert url_problem("git@git.example.com:org/lib.git", SUPER, HOSTS)[0] == "ssh://git@git.example.com/~/org/lib.git"


def test_select_takes_gitlinked_paths_only_and_says_why_for_the_rest():
    gitmodules = {
        "lib": {"path": "vendor/lib", "url": "../lib.git"},
        "twin": {"path": "vendor/lib", "url": "../lib.git"},
        "ghost": {"path": "vendor/ghost", "url": "../ghost.git"},
        "escape": {"path": "../../x", "url": "../lib.git"},
        "nourl": {"path": "vendor/nourl"},
    }
    links = {"vendor/lib": SHA, "vendor/nourl": SHA, "vendor/orphan": SHA}
    chosen, refused = select(gitmodules, links, SUPER, HOSTS)
    assert chosen == [Submodule("lib", "vendor/lib", "https://git.example.com/org/lib.git", SHA)]
    reasons = {r.name: r.why for r in refused}
    assert reasons["twin"].startswith("path 'vendor/lib' is already another submodule's")
    assert reasons["ghost"] == "no gitlink at 'vendor/ghost' in the commit"
    assert "'..'" in reasons["escape"]
    assert reasons["nourl"] == "no url"
    assert reasons["vendor/orphan"].startswith("a gitlink without a .gitmodules entry")


def test_select_ships_at_most_max_submodules():
    gitmodules = {f"m{i}": {"path": f"m{i}", "url": f"../m{i}.git"} for i in range(MAX_SUBMODULES + 3)}
    links = {f"m{i}": SHA for i in range(MAX_SUBMODULES + 3)}
    chosen, refused = select(gitmodules, links, SUPER, HOSTS)
    assert len(chosen) == MAX_SUBMODULES
    assert [r.why for r in refused] == [f"more than {MAX_SUBMODULES} submodules"] * 3


def test_a_note_is_one_inert_line():
    _, refused = select({"\x1b[31mred\nline": {"path": "x", "url": "file:///etc"}}, {"x": SHA}, SUPER, HOSTS)
    note = refused[0].note()
    assert "\n" not in note and "\x1b" not in note
