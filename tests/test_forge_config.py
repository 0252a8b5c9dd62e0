"""forges: the Forge model, its URL and secret-name rules, and parse_forges' located problems."""

from __future__ import annotations

import pytest

from narwhal.config.forges import Forge, check_api_url, parse_forges
from narwhal.config.yamlfile import parse_yaml
from narwhal.errors import ConfigError


def forges(text: str) -> list[Forge]:
    document = parse_yaml(text, "inventory.yaml")
    return parse_forges(document.data.get("forges"), "inventory.yaml", document)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        forges(text)
    return [str(p) for p in info.value.problems]


def test_every_kind_with_its_api_base():
    found = forges(
        "forges:\n"
        "  - {name: github, kind: github, url: 'https://api.github.com', token: GITHUB_TOKEN, webhook_secret: GH_HOOK}\n"
        "  - {name: gitea, kind: gitea, url: 'https://gitea.example/', webhook_secret: GITEA_HOOK}\n"
        "  - {name: codeberg, kind: forgejo, url: 'https://codeberg.org', token: _T1, webhook_secret: CB}\n"
        "  - {name: gitlab, kind: gitlab, url: 'https://gitlab.example', token: GL, webhook_secret: GL_HOOK}\n")
    assert [f.kind for f in found] == ["github", "gitea", "forgejo", "gitlab"]
    assert found[0].token == "GITHUB_TOKEN" and found[1].token is None
    assert found[1].url == "https://gitea.example"  # one spelling: no trailing slash
    assert [f.api_base for f in found] == ["https://api.github.com", "https://gitea.example/api/v1",
                                           "https://codeberg.org/api/v1", "https://gitlab.example/api/v4"]


@pytest.mark.parametrize("url, canonical", [
    ("https://api.github.com", "https://api.github.com"),
    ("HTTPS://API.GitHub.com/", "https://api.github.com"),
    ("https://ghe.example/api/v3/", "https://ghe.example/api/v3"),
    ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
    ("https://gitea.example:443", "https://gitea.example"),
    ("http://gitea.example:80/", "http://gitea.example"),
    ("https://example.com/gitea", "https://example.com/gitea"),
    ("http://[::1]:8080", "http://[::1]:8080"),
])
def test_api_url_spelled_once(url, canonical):
    assert check_api_url(url) == canonical


@pytest.mark.parametrize("url", [
    "ftp://gitea.example", "gitea.example", "https://", "https:///path",
    "https://user:pw@gitea.example", "https://token@gitea.example",
    "https://gitea.example/?x=1", "https://gitea.example/#top", "https://gitea.example/?",
    "https://gitea.example/a/../b", "https://gitea.example/./b", "https://gitea.example/%2e%2e",
    "https://gitea.example//x", "https://gitea.example:99999", "https://gitea.example:0",
    "https://gitea .example", "https://gitea.example/\x00", "https://gitéa.example",
    "https://gitea.example\\evil", "https://-bad-.example", "https://" + "a" * 2100 + ".example",
])
def test_api_url_refused(url):
    with pytest.raises(ValueError):
        check_api_url(url)


def test_problem_names_file_line_and_path():
    found = problems(
        "forges:\n"
        "  - name: gh\n"
        "    kind: bitbucket\n"
        "    url: 'https://api.github.com'\n"
        "    webhook_secret: HOOK\n")
    assert len(found) == 1
    assert found[0].startswith("inventory.yaml:3: forges[0].kind: expected one of 'github', 'gitea', 'forgejo', 'gitlab'")


def test_url_with_credentials_is_refused_with_its_line():
    (found,) = problems(
        "forges:\n"
        "  - name: gh\n"
        "    kind: github\n"
        "    url: 'https://x:secret@api.github.com'\n"
        "    webhook_secret: HOOK\n")
    assert found.startswith("inventory.yaml:4: forges[0].url: expected the forge's API base URL")
    assert "no credentials" in found


def test_token_and_secret_are_names_not_values():
    found = problems(
        "forges:\n"
        "  - name: gh\n"
        "    kind: github\n"
        "    url: 'https://api.github.com'\n"
        "    token: 'ghp_abc-123 456'\n"
        "    webhook_secret: 1BAD\n")
    assert [p.split(": ")[1] for p in found] == ["forges[0].token", "forges[0].webhook_secret"]
    assert found[0].startswith("inventory.yaml:5:") and found[1].startswith("inventory.yaml:6:")
    assert all("a secret name" in p for p in found)


def test_webhook_secret_is_required_and_unknown_keys_are_refused():
    found = problems(
        "forges:\n"
        "  - name: gh\n"
        "    kind: github\n"
        "    url: 'https://api.github.com'\n"
        "    repos: ['*']\n")
    assert "inventory.yaml:2: forges[0].webhook_secret: required" in found
    unknown = [p for p in found if "forges[0].repos" in p]
    assert unknown and unknown[0].startswith("inventory.yaml:5:")
    assert "allowed: name, kind, url, token, webhook_secret" in unknown[0]


def test_strict_types():
    found = problems(
        "forges:\n"
        "  - {name: gh, kind: github, url: 'https://api.github.com', webhook_secret: 12}\n"
        "  - not-a-mapping\n")
    assert any("forges[0].webhook_secret: expected a string, got 12" in p for p in found)
    assert any(p.startswith("inventory.yaml:3: forges[1]: expected a mapping") for p in found)


def test_duplicate_names_refused_with_first_line():
    found = problems(
        "forges:\n"
        "  - {name: main, kind: github, url: 'https://api.github.com', webhook_secret: A}\n"
        "  - {name: other, kind: gitea, url: 'https://gitea.example', webhook_secret: B}\n"
        "  - {name: main, kind: gitlab, url: 'https://gitlab.example', webhook_secret: C}\n")
    assert found == ["inventory.yaml:4: forges[2].name: duplicate forge name 'main' (first at line 2)"]


def test_bad_name_uses_the_house_name_rule():
    (found,) = problems("forges:\n  - {name: 'my forge', kind: github, url: 'https://api.github.com', webhook_secret: A}\n")
    assert found.startswith("inventory.yaml:2: forges[0].name: expected a name of letters, digits")


def test_none_is_no_forges_and_a_non_list_is_one_problem():
    assert parse_forges(None, "inventory.yaml") == []
    assert forges("forges: []\n") == []
    assert problems("forges: {name: gh}\n") == ["inventory.yaml:1: forges: expected a list of forges, got a mapping"]


def test_without_a_document_problems_have_no_line():
    raw = [{"name": "a", "kind": "github", "url": "https://api.github.com", "webhook_secret": "S"},
           {"name": "a", "kind": "gitlab", "url": "ftp://x", "webhook_secret": "S"}]
    with pytest.raises(ConfigError) as info:
        parse_forges(raw, "api")
    shown = [str(p) for p in info.value.problems]
    assert "api: forges[1].name: duplicate forge name 'a'" in shown
    assert any(p.startswith("api: forges[1].url: expected the forge's API base URL") for p in shown)


def test_another_top_level_key_names_the_paths():
    document = parse_yaml("hooks:\n  - {name: x, kind: nope, url: 'https://a.example', webhook_secret: S}\n",
                          "narwhal.yaml")
    with pytest.raises(ConfigError) as info:
        parse_forges(document.data["hooks"], "narwhal.yaml", document, section="hooks")
    assert str(info.value.problems[0]).startswith("narwhal.yaml:2: hooks[0].kind: expected one of")


def test_forge_is_frozen_and_strict():
    forge = Forge(name="gh", kind="github", url="https://api.github.com/", webhook_secret="S")
    assert forge.url == "https://api.github.com"
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        forge.url = "https://evil.example"
    with pytest.raises(ValueError):
        Forge(name="gh", kind="github", url="https://api.github.com", webhook_secret="S", token=5)
