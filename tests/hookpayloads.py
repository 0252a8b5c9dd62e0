"""Webhook deliveries for tests: the forges' documented payloads (tests/forges/payloads),
pointed at a test repository and commit, and signed as each forge signs them."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

PAYLOADS = Path(__file__).parent / "forges" / "payloads"
EVENT_HEADER = {"github": "X-GitHub-Event", "gitea": "X-Gitea-Event", "forgejo": "X-Forgejo-Event",
                "gitlab": "X-Gitlab-Event"}
DELIVERY_HEADER = {"github": "X-GitHub-Delivery", "gitea": "X-Gitea-Delivery", "forgejo": "X-Forgejo-Delivery",
                   "gitlab": "X-Gitlab-Event-UUID"}


def payload(name: str) -> dict:
    return json.loads((PAYLOADS / name).read_text())


def fixture_kind(kind: str) -> str:
    return "gitea" if kind == "forgejo" else kind


def push(kind: str, repo_url: str, commit: str, branch: str = "main") -> tuple[str, dict]:
    """(event header value, payload) of a push of COMMIT to BRANCH of REPO_URL."""
    data = copy.deepcopy(payload(f"{fixture_kind(kind)}_push.json"))
    data["ref"] = f"refs/heads/{branch}"
    data["after"] = commit
    data["commits"] = []  # the changed files are then unknown: no path filter applies
    if kind == "gitlab":
        data["checkout_sha"] = commit
        data["total_commits_count"] = 0
        data["project"]["git_http_url"] = repo_url
        data.get("repository", {})["git_http_url"] = repo_url
        return "Push Hook", data
    data["deleted"] = False
    if isinstance(data.get("head_commit"), dict):
        data["head_commit"]["id"] = commit
    data["repository"]["clone_url"] = repo_url
    return "push", data


def delete_branch(kind: str, repo_url: str, branch: str = "main") -> tuple[str, dict]:
    event, data = push(kind, repo_url, "0" * 40, branch)
    if kind == "github":
        data["deleted"] = True
    return event, data


def pull_request(kind: str, repo_url: str, commit: str, number: int, base: str = "main",
                 action: str = "opened") -> tuple[str, dict]:
    """(event header value, payload) of pull request NUMBER with head COMMIT into BASE."""
    if kind == "gitlab":
        data = copy.deepcopy(payload("gitlab_merge_request.json"))
        attrs = data["object_attributes"]
        attrs.update({"iid": number, "target_branch": base, "action": {"opened": "open"}.get(action, action)})
        attrs["last_commit"]["id"] = commit
        attrs.pop("oldrev", None)
        attrs["target"]["git_http_url"] = repo_url
        attrs["source"]["git_http_url"] = repo_url
        data["project"]["git_http_url"] = repo_url
        return "Merge Request Hook", data
    data = copy.deepcopy(payload(f"{fixture_kind(kind)}_pull_request.json"))
    data["action"] = action
    data["number"] = number
    pr = data["pull_request"]
    pr["number"] = number
    pr["head"]["sha"] = commit
    pr["base"]["ref"] = base
    for side in ("base", "head"):
        if isinstance(pr[side].get("repo"), dict):
            pr[side]["repo"]["clone_url"] = repo_url
    data["repository"]["clone_url"] = repo_url
    return "pull_request", data


def signed(kind: str, secret: str, event: str, data: Any, delivery: str | None = None,
           body: bytes | None = None) -> tuple[dict[str, str], bytes]:
    """Headers and body as the forge sends them (a fresh delivery id unless given)."""
    raw = body if body is not None else json.dumps(data).encode()
    headers = {"Content-Type": "application/json", EVENT_HEADER[kind]: event,
               DELIVERY_HEADER[kind]: delivery or str(uuid.uuid4())}
    digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    if kind == "github":
        headers["X-Hub-Signature-256"] = f"sha256={digest}"
    elif kind == "gitlab":
        headers["X-Gitlab-Token"] = secret
    else:
        headers[f"X-{kind.capitalize()}-Signature"] = digest
    return headers, raw
