"""Bad input against the real dispatcher: always a 4xx with a JSON {"error": ...} body."""

from __future__ import annotations

import os
import re

import pytest
import requests

from narwhal.api.openapi import PATHS
from tests.conftest import need_module
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow

INJECTIONS = ["$(touch /tmp/pwned-api)", "`touch /tmp/pwned-api`", "a;touch /tmp/pwned-api", "a\ntouch",
              "--upload-pack=touch /tmp/pwned-api", "-x", "a b", "../../etc/passwd"]


@pytest.fixture
def served(dispatcher, git_repo):
    runner = {"name": "local", "transport": "local", "capacity": 1}
    return dispatcher([runner], {"ci": simple_pipeline()}), git_repo


def _is_json_error(r: requests.Response, status: int | tuple) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body


def test_malformed_and_wrong_types(served):
    d, repo = served
    url = d.url + "/commit"
    json_type = {"Content-Type": "application/json"}
    _is_json_error(requests.post(url, data=b"{not json", headers=json_type, timeout=10), 400)
    _is_json_error(requests.post(url, data=b"{not json", timeout=10), 415)  # a body needs the JSON type
    _is_json_error(requests.post(url, data=b"", timeout=10), 400)
    _is_json_error(requests.post(url, json=[1, 2], timeout=10), 400)
    _is_json_error(requests.post(url, json={"repo": 5, "commit": repo.commit}, timeout=10), 400)
    _is_json_error(requests.post(url, json={"repo": repo.path, "commit": 12}, timeout=10), 400)
    _is_json_error(requests.post(url, json={"repo": repo.path}, timeout=10), 400)
    _is_json_error(requests.post(url, json={"repo": repo.path, "commit": repo.commit, "x": 1}, timeout=10), 400)
    _is_json_error(requests.post(url, json={"repo": repo.path, "commit": "abc"}, timeout=10), 400)
    _is_json_error(requests.post(url, data=b"\xff\xfe", headers=json_type, timeout=10), 400)


def test_huge_body_is_refused(served):
    d, repo = served
    r = requests.post(d.url + "/commit", data=b"{" + b" " * (3 * 1024 * 1024) + b"}",
                      headers={"Content-Type": "application/json"}, timeout=30)
    _is_json_error(r, 413)


def test_unknown_routes_and_methods(served):
    d, _ = served
    _is_json_error(requests.get(d.url + "/nope", timeout=10), 404)
    _is_json_error(requests.get(d.url + "/jobs/999999", timeout=10), 404)
    _is_json_error(requests.get(d.url + "/jobs/abc", timeout=10), 404)
    _is_json_error(requests.delete(d.url + "/commit", timeout=10), 405)
    _is_json_error(requests.get(d.url + "/jobs?limit=0", timeout=10), 400)
    _is_json_error(requests.get(d.url + "/jobs?limit=x", timeout=10), 400)
    _is_json_error(requests.get(d.url + "/jobs?status=weird", timeout=10), 400)
    _is_json_error(requests.delete(d.url + "/runner/nobody", timeout=10), 404)
    _is_json_error(requests.delete(d.url + "/runner/local", timeout=10), 409)  # inventory runner
    _is_json_error(requests.post(d.url + "/runner", json={"name": "x", "port": "ssh"}, timeout=10), (400, 422))
    _is_json_error(requests.post(d.url + "/jobs/1/retry", timeout=10), 404)


def test_semantic_errors_are_422(served, tmp_path):
    d, repo = served
    r = requests.post(d.url + "/commit", json={"repo": repo.path, "commit": "0" * 40}, timeout=30)
    _is_json_error(r, 422)
    r = requests.post(d.url + "/commit", json={"repo": str(tmp_path / "missing"), "commit": "0" * 40}, timeout=30)
    _is_json_error(r, 422)


def test_injection_strings_are_refused_and_inert(served):
    d, repo = served
    canary = "/tmp/pwned-api"
    if os.path.exists(canary):
        os.unlink(canary)
    for evil in INJECTIONS:
        for body in ({"repo": evil, "commit": repo.commit}, {"repo": repo.path, "commit": evil},
                     {"repo": repo.path, "commit": repo.commit, "branch": evil}):
            r = requests.post(d.url + "/commit", json=body, timeout=30)
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            assert "error" in r.json()
    assert not os.path.exists(canary)


def test_token_guards_mutations(dispatcher, git_repo):
    d = dispatcher([{"name": "local", "transport": "local"}], {"ci": simple_pipeline()}, token="s3cret")
    body = {"repo": git_repo.path, "commit": git_repo.commit}
    _is_json_error(requests.post(d.url + "/commit", json=body, timeout=10), 401)
    _is_json_error(requests.post(d.url + "/commit", json=body, headers={"Authorization": "Bearer nope"},
                                 timeout=10), 401)
    _is_json_error(requests.post(d.url + "/runner", json={"name": "r9", "transport": "local"}, timeout=10), 401)
    assert requests.get(d.url + "/jobs", timeout=10).json()["jobs"] == []  # nothing changed
    assert [r["name"] for r in requests.get(d.url + "/runner", timeout=10).json()["runners"]] == ["local"]
    r = requests.post(d.url + "/commit", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert r.status_code == 202


def test_openapi_describes_every_route(served):
    d, _ = served
    doc = requests.get(d.url + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.")
    from narwhal.api.app import make_app

    app = make_app(object())
    routes = {(r.method.lower(), re.sub(r"<(\w+)(?::\w+)?>", r"{\1}", r.rule)) for r in app.routes}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    assert doc["paths"] == PATHS


def test_fuzz_from_openapi_finds_no_5xx(served):
    """Requests generated from /openapi.json (schemathesis): no 5xx, errors always JSON."""
    schemathesis = need_module("schemathesis")
    from hypothesis import HealthCheck, given, settings

    d, _ = served
    schema = schemathesis.openapi.from_url(d.url + "/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in ("/reload", "/events"):
            continue  # /events never ends (tests/e2e/test_events.py, tests/test_api.py check its errors)

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(base_url=d.url, timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                f"{response.text[:200]}")
            elif response.status_code >= 400:
                assert "error" in response.json(), response.text

        check()
    assert not failures, "\n".join(failures[:10])
