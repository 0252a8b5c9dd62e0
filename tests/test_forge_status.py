"""status: commit-status requests as each forge documents them, and real round trips against
the stand-in forge (testbed.StandInForge): accepted, refused (401, 422), and retried (down, 5xx)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from narwhal import __version__
from narwhal.config.forges import Forge
from narwhal.forge.status import (
    ACCEPTED_STATES,
    FORGE_STATES,
    MAX_DESCRIPTION,
    StatusError,
    StatusRequest,
    forge_state,
    repo_path,
    send,
    status_request,
)
from narwhal.job import JobStatus
from testbed import RecordedStatus, StandInForge

TOKEN = "ghp_Sup3rS3cretT0ken"
SHA = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
STATES = [s.value for s in JobStatus]


def forge(kind: str, url: str = "https://forge.example") -> Forge:
    if kind == "github" and url == "https://forge.example":
        url = "https://api.github.com"
    return Forge(name=kind, kind=kind, url=url, token="FORGE_TOKEN", webhook_secret="HOOK")


def request(kind: str, repo: str = "https://forge.example/owner/repo.git", state: str = "passed", url: str = "https://forge.example",
            description: str = "build passed", target_url: str | None = "https://ci.example/jobs/12", token: str = TOKEN,
            context: str = "narwhal/build") -> StatusRequest:
    return status_request(forge(kind, url), repo, SHA, state, context, description, target_url, token)


# --- states -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["github", "gitea", "forgejo", "gitlab"])
def test_every_job_state_has_a_state_the_forge_accepts(kind):
    assert set(FORGE_STATES[kind]) == set(STATES)
    for state in STATES:
        assert forge_state(kind, state) in ACCEPTED_STATES[kind]
        assert forge_state(kind, JobStatus(state)) == forge_state(kind, state)


def test_state_names_per_forge():
    assert [forge_state("github", s) for s in STATES] == ["pending", "pending", "success", "failure", "error", "error",
                                                           "success"]
    assert [forge_state("gitea", s) for s in STATES] == ["pending", "pending", "success", "failure", "error", "warning",
                                                          "success"]
    assert [forge_state("gitlab", s) for s in STATES] == ["pending", "running", "success", "failed", "failed", "canceled",
                                                           "skipped"]


@pytest.mark.parametrize("state", ["success", "PASSED", "", None, 3, "canceled"])
def test_unknown_job_states_are_refused(state):
    with pytest.raises(StatusError, match="unknown job state"):
        forge_state("github", state)


# --- requests -----------------------------------------------------------------------


def test_github_request_as_documented():
    req = request("github", repo="https://github.com/Codertocat/Hello-World.git", url="https://api.github.com")
    assert req.method == "POST"
    assert req.url == f"https://api.github.com/repos/Codertocat/Hello-World/statuses/{SHA}"
    assert req.headers == {"Authorization": f"Bearer {TOKEN}", "Accept": "application/vnd.github+json",
                           "X-GitHub-Api-Version": "2022-11-28", "User-Agent": f"narwhal/{__version__}"}
    assert req.json == {"state": "success", "context": "narwhal/build", "description": "build passed",
                        "target_url": "https://ci.example/jobs/12"}


def test_github_enterprise_api_base():
    req = request("github", repo="git@ghe.example:team/app.git", url="https://ghe.example/api/v3")
    assert req.url == f"https://ghe.example/api/v3/repos/team/app/statuses/{SHA}"


@pytest.mark.parametrize("kind", ["gitea", "forgejo"])
def test_gitea_and_forgejo_request_as_documented(kind):
    req = request(kind, state="cancelled", repo="ssh://git@forge.example:2222/owner/repo.git")
    assert req.url == f"https://forge.example/api/v1/repos/owner/repo/statuses/{SHA}"
    assert req.headers["Authorization"] == f"token {TOKEN}" and req.headers["Accept"] == "application/json"
    assert "PRIVATE-TOKEN" not in req.headers
    assert req.json == {"state": "warning", "context": "narwhal/build", "description": "build passed",
                        "target_url": "https://ci.example/jobs/12"}


def test_gitlab_request_as_documented():
    req = request("gitlab", state="running", repo="https://forge.example/group/sub group/project.git".replace(" ", "-"))
    assert req.url == f"https://forge.example/api/v4/projects/group%2Fsub-group%2Fproject/statuses/{SHA}"
    assert req.headers["PRIVATE-TOKEN"] == TOKEN and "Authorization" not in req.headers
    assert req.json == {"state": "running", "name": "narwhal/build", "description": "build passed",
                        "target_url": "https://ci.example/jobs/12"}


def test_optional_fields_are_left_out_and_the_commit_is_lowercased():
    req = status_request(forge("github"), "https://github.com/o/r", SHA.upper(), "queued", "ci", "", None, TOKEN)
    assert req.json == {"state": "pending", "context": "ci"}
    assert req.url.endswith(f"/statuses/{SHA}")


def test_description_is_cut_to_140_and_made_inert():
    req = request("github", description="\x1b[31mred\x1b[0m line\nnext " + "x" * 300)
    text = req.json["description"]
    assert len(text) == MAX_DESCRIPTION and text.endswith("…")
    assert "\x1b" not in text and "\n" not in text


@pytest.mark.parametrize("repo, kind, expected", [
    ("https://github.com/Codertocat/Hello-World.git", "github", ["Codertocat", "Hello-World"]),
    ("https://github.com/Codertocat/Hello-World", "github", ["Codertocat", "Hello-World"]),
    ("https://github.com/Codertocat/Hello-World/", "github", ["Codertocat", "Hello-World"]),
    ("git@github.com:Codertocat/Hello-World.git", "github", ["Codertocat", "Hello-World"]),
    ("ssh://git@github.com/owner/.github.git", "github", ["owner", ".github"]),
    ("git://github.com/o/r.git", "github", ["o", "r"]),
    ("http://localhost:3000/gitea/webhooks.git", "gitea", ["gitea", "webhooks"]),
    ("https://forge.example/sub/owner/repo.git", "gitea", ["owner", "repo"]),  # forge served under /sub
    ("ssh://gitea@localhost:2222/gitea/webhooks.git", "forgejo", ["gitea", "webhooks"]),
    ("https://gitlab.example/a/b/c/d.git", "gitlab", ["a", "b", "c", "d"]),
    ("git@gitlab.example:group/project.git", "gitlab", ["group", "project"]),
])
def test_repository_paths(repo, kind, expected):
    url = "https://forge.example/sub" if "forge.example/sub" in repo else "https://forge.example"
    assert repo_path(forge(kind, url), repo) == expected


@pytest.mark.parametrize("repo, kind", [
    ("https://github.com/o/r/tree/main", "github"),
    ("https://github.com/o", "github"),
    ("https://github.com/o/../r", "github"),
    ("https://github.com/o/./r", "github"),
    ("https://github.com/o/%2e%2e/r", "github"),
    ("https://github.com/o%2Fr/x", "github"),
    ("https://github.com/o//r", "github"),
    ("https://github.com//o/r", "github"),
    ("https://github.com/o/r?x=1", "github"),
    ("https://github.com/o/r#frag", "github"),
    ("https://user:pw@github.com/o/r", "github"),
    ("https://token@github.com/o/r", "github"),
    ("https://github.com/o/r b", "github"),
    ("https://github.com/o/r\n", "github"),
    ("https://github.com/o\\r/x", "github"),
    ("https://github.com/ö/r", "github"),
    ("/srv/git/o/r", "github"),
    ("file:///srv/o/r", "github"),
    ("ext::sh -c touch /tmp/x", "github"),
    ("ftp://github.com/o/r", "github"),
    ("https://github.com:99999/o/r", "github"),
    ("", "github"),
    ("https://gitlab.example/project", "gitlab"),
    ("https://gitlab.example/" + "/".join(["g"] * 22), "gitlab"),
    ("https://gitlab.example/g/../p", "gitlab"),
    ("https://forge.example/a/b/c", "gitea"),
])
def test_repository_paths_refused(repo, kind):
    with pytest.raises(StatusError):
        repo_path(forge(kind), repo)


@pytest.mark.parametrize("field, value, match", [
    ("sha", "xyz", "40 hex"), ("sha", SHA[:-1], "40 hex"), ("sha", None, "40 hex"),
    ("context", "", "context"), ("context", "a\nb", "context"), ("context", "x" * 256, "context"), ("context", 5, "context"),
    ("target_url", "javascript:alert(1)", "target_url"), ("target_url", "https://x/ y", "target_url"),
    ("target_url", "https://x/\x00", "target_url"),
])
def test_bad_arguments(field, value, match):
    args = {"forge": forge("github"), "repo_url": "https://github.com/o/r", "sha": SHA, "state": "passed",
            "context": "ci", "description": "", "target_url": None, "token": TOKEN, field: value}
    with pytest.raises(StatusError, match=match):
        status_request(**args)


@pytest.mark.parametrize("token", ["", "ab cd", "abc\r\nX-Injected: 1", "tök", "abc\x00", None])
def test_a_token_that_cannot_be_a_header_is_refused_without_being_shown(token):
    with pytest.raises(StatusError) as info:
        request("github", token=token)
    assert "token" in str(info.value)
    if token:
        assert token not in str(info.value)


def test_the_token_is_in_no_repr():
    for kind in ("github", "gitea", "gitlab"):
        req = request(kind)
        assert TOKEN not in repr(req) and TOKEN not in str(req)
        assert "***" in repr(req) and req.url in repr(req)


# --- round trips with the stand-in forge --------------------------------------------


@pytest.fixture
def stand_in() -> Iterator[StandInForge]:
    with StandInForge(TOKEN) as server:
        yield server


def live(server: StandInForge, kind: str, **kwargs) -> StatusRequest:
    repo = kwargs.pop("repo", "https://forge.example/group/sub/project.git" if kind == "gitlab"
                      else "https://forge.example/owner/repo.git")
    return request(kind, repo=repo, url=server.url, **kwargs)


@pytest.mark.parametrize("kind", ["github", "gitea", "forgejo", "gitlab"])
def test_a_status_round_trip(stand_in, kind):
    result = send(live(stand_in, kind, state="failed"), timeout=5)
    assert result.ok and result.status_code == 201 and not result.retryable and result.error is None
    (recorded,) = stand_in.statuses
    assert isinstance(recorded, RecordedStatus)
    expected_kind = "gitea" if kind == "forgejo" else kind  # one /api/v1 for both: the stand-in says gitea
    assert (recorded.kind, recorded.sha, recorded.state, recorded.context, recorded.description, recorded.target_url) == (
        expected_kind, SHA, forge_state(kind, "failed"), "narwhal/build", "build passed", "https://ci.example/jobs/12")
    assert recorded.time == pytest.approx(time.time(), abs=30)
    if kind == "gitlab":
        assert recorded.path == f"/api/v4/projects/group%2Fsub%2Fproject/statuses/{SHA}"


def test_a_forgejo_only_stand_in_records_forgejo():
    with StandInForge(TOKEN, kinds="forgejo") as server:
        assert send(live(server, "forgejo"), timeout=5).ok
        assert server.statuses[0].kind == "forgejo"
        assert send(live(server, "github"), timeout=5).status_code == 404  # not a GitHub


def test_a_job_told_in_order(stand_in):
    for state in ("queued", "running", "passed"):
        assert send(live(stand_in, "gitlab", state=state), timeout=5).ok
    assert [s.state for s in stand_in.statuses] == ["pending", "running", "success"]
    assert [s.context for s in stand_in.statuses] == ["narwhal/build"] * 3


@pytest.mark.parametrize("kind", ["github", "gitea", "gitlab"])
def test_a_wrong_token_is_401_and_not_retried(stand_in, kind):
    result = send(live(stand_in, kind, token="not-the-token"), timeout=5)
    assert not result.ok and result.status_code == 401 and not result.retryable
    assert result.error.startswith("HTTP 401") and "not-the-token" not in result.error
    assert stand_in.statuses == [] and stand_in.seen[-1].status == 401


def test_the_stand_in_checks_the_auth_scheme(stand_in):
    req = live(stand_in, "github")
    swapped = StatusRequest(req.method, req.url, {**req.headers, "Authorization": f"token {TOKEN}"}, req.json)
    assert send(swapped, timeout=5).status_code == 401  # GitHub's request carries Bearer
    gitea = live(stand_in, "gitea")
    bearer = StatusRequest(gitea.method, gitea.url, {**gitea.headers, "Authorization": f"Bearer {TOKEN}"}, gitea.json)
    assert send(bearer, timeout=5).status_code == 401  # Gitea's carries token


def test_github_wants_a_user_agent(stand_in):
    req = live(stand_in, "github")
    body = json.dumps(req.json).encode()
    connection = http.client.HTTPConnection("127.0.0.1", stand_in.port, timeout=5)
    try:  # http.client adds no User-Agent of its own (requests and urllib3 do)
        connection.request("POST", req.url.removeprefix(stand_in.url), body,
                           {k: v for k, v in req.headers.items() if k != "User-Agent"})
        assert connection.getresponse().status == 403
    finally:
        connection.close()
    assert stand_in.statuses == []


@pytest.mark.parametrize("kind, body", [
    ("github", {"state": "canceled", "context": "ci"}),  # GitLab's word
    ("github", {"state": "success", "description": "x" * 141}),
    ("github", {"state": "success", "name": "ci"}),  # GitLab's field
    ("gitea", {"state": "running"}),
    ("gitea", {"state": "success", "context": 5}),
    ("gitlab", {"state": "failure"}),  # GitHub's word
    ("gitlab", {"state": "success", "coverage": "high"}),
    ("gitlab", {}),
])
def test_the_stand_in_refuses_what_the_forge_would(stand_in, kind, body):
    req = live(stand_in, kind)
    result = send(StatusRequest(req.method, req.url, req.headers, body), timeout=5)
    assert result.status_code == 422 and not result.retryable and "Validation Failed" in result.error
    assert stand_in.statuses == []


def test_the_stand_in_takes_a_numeric_gitlab_project_and_refuses_a_bad_commit(stand_in):
    req = live(stand_in, "gitlab")
    numeric = StatusRequest(req.method, f"{stand_in.url}/api/v4/projects/42/statuses/{SHA}", req.headers, req.json)
    assert send(numeric, timeout=5).status_code == 201
    bad = StatusRequest(req.method, f"{stand_in.url}/api/v4/projects/42/statuses/nothex", req.headers, req.json)
    assert send(bad, timeout=5).status_code == 422


def test_down_refuses_connections_and_is_retryable(stand_in):
    url = stand_in.url
    stand_in.down()
    result = send(live(stand_in, "github"), timeout=5)
    assert not result.ok and result.status_code is None and result.retryable and result.error == "could not connect"
    stand_in.up()
    assert stand_in.url == url  # same port
    assert send(live(stand_in, "github"), timeout=5).ok
    assert len(stand_in.statuses) == 1


def test_down_answering_503_is_retryable(stand_in):
    stand_in.down(refuse=False)
    result = send(live(stand_in, "gitea"), timeout=5)
    assert result.status_code == 503 and result.retryable and not result.ok
    stand_in.up()
    assert send(live(stand_in, "gitea"), timeout=5).ok


@pytest.mark.parametrize("code, retryable", [(429, True), (500, True), (502, True), (404, False), (400, False),
                                             (403, False), (422, False)])
def test_retryable_answers(stand_in, code, retryable):
    stand_in.answer_next(code)
    result = send(live(stand_in, "github"), timeout=5)
    assert (result.ok, result.status_code, result.retryable) == (False, code, retryable)
    assert result.error.startswith(f"HTTP {code}")
    assert send(live(stand_in, "github"), timeout=5).ok  # only the next one


def test_a_redirect_is_not_followed(stand_in):
    stand_in.answer_next(301)
    result = send(live(stand_in, "gitlab"), timeout=5)
    assert result.status_code == 301 and not result.retryable and "not followed" in result.error


def test_a_silent_server_times_out_and_is_retryable():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # connections wait in the backlog; nothing ever answers
        port = listener.getsockname()[1]
        req = request("github", url=f"http://127.0.0.1:{port}")
        started = time.monotonic()
        result = send(req, timeout=0.5)
        assert time.monotonic() - started < 5
    assert not result.ok and result.retryable and result.status_code is None and result.error == "timed out"


class _Hostile(BaseHTTPRequestHandler):
    """Answers 400 quoting the request's credentials back, then a long body."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        echoed = self.headers.get("Authorization") or self.headers.get("PRIVATE-TOKEN")
        head = json.dumps({"message": f"bad token {echoed}\x1b[2J"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(head)
        try:
            for _ in range(200):  # 12.8 MB more, if anyone keeps reading
                self.wfile.write(b" " * 65536)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", ["github", "gitlab"])
def test_an_answer_quoting_the_token_is_masked_and_read_only_so_far(hostile, kind):
    started = time.monotonic()
    result = send(request(kind, url=hostile), timeout=5)
    assert time.monotonic() - started < 3  # stopped reading after MAX_RESPONSE bytes
    assert result.status_code == 400 and not result.retryable
    assert TOKEN not in result.error and "***" in result.error and "\x1b" not in result.error
    assert len(result.error) < 300


@pytest.mark.parametrize("url", ["http://[::1", "ftp://127.0.0.1/x", "http://", "not a url"])
def test_send_never_raises(url):
    req = StatusRequest("POST", url, {"Authorization": f"Bearer {TOKEN}"}, {"state": "success"})
    result = send(req, timeout=1)
    assert not result.ok and result.status_code is None and not result.retryable
    assert result.error.startswith("request failed") and TOKEN not in result.error


def test_stand_in_repr_hides_the_token_and_refuses_unknown_kinds():
    server = StandInForge(TOKEN, kinds=("github",))
    assert TOKEN not in repr(server)
    with pytest.raises(ValueError):
        StandInForge(TOKEN, kinds=("bitbucket",))
    with pytest.raises(TimeoutError):
        server.wait_for(1, timeout=0.05)


def test_tls_failure_is_said_and_retryable(stand_in):
    req = live(stand_in, "github")
    tls = StatusRequest(req.method, req.url.replace("http://", "https://"), req.headers, req.json)
    result = send(tls, timeout=5)  # TLS spoken to a plain-HTTP server
    assert (result.ok, result.status_code, result.retryable) == (False, None, True)
    assert result.error.startswith("TLS failed")


# --- attack pass: a forge that says the token back in its own way ----------------------------


def _echoing(message: str) -> type[BaseHTTPRequestHandler]:
    """A forge answering 401 with MESSAGE, where {token} is the token alone (no scheme)."""

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            sent = self.headers.get("Authorization") or self.headers.get("PRIVATE-TOKEN") or ""
            token = sent.split(" ")[-1]
            body = json.dumps({"message": message.format(token=token)}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Echo


@pytest.mark.parametrize("kind", ["github", "gitea", "gitlab"])
@pytest.mark.parametrize("message", [
    "Bad credentials: {token}",  # the token alone, without the 'Bearer '/'token ' the header had
    "x" * 180 + " token {token} is not valid",  # cut at 200 characters in the middle of the token
])
def test_attack_a_forge_echoing_the_bare_token_does_not_get_it_into_the_error(kind, message):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _echoing(message))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = send(request(kind, url=f"http://127.0.0.1:{server.server_address[1]}"), timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert result.status_code == 401 and result.error is not None
    assert TOKEN[:8] not in result.error, result.error  # GET /forges shows it, and the store keeps it
