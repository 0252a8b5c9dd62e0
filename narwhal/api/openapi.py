"""The OpenAPI 3 description of narwhal's REST API (checked against the app in tests)."""

from __future__ import annotations

from narwhal import __version__
from narwhal.job import COMMIT_PATTERN, JobStatus, StepStatus

_STATUS = {"type": "string", "enum": [s.value for s in JobStatus]}
_NULLABLE_STR = {"type": ["string", "null"]}
_NUM = {"type": ["number", "null"]}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
    "additionalProperties": True,
}

_STEP = {
    "type": "object",
    "properties": {
        "job_id": {"type": "integer"}, "idx": {"type": "integer"}, "name": {"type": "string"},
        "status": {"type": "string", "enum": [s.value for s in StepStatus]},
        "exit_code": {"type": ["integer", "null"]},
        "started_at": _NUM, "finished_at": _NUM, "duration": _NUM,
        "reason": {"type": ["string", "null"],
                   "description": "why a step was skipped, or how it failed (failed_allowed: "
                                  "allow_failure let the job pass)"},
    },
}

_JOB = {
    "type": "object",
    "required": ["id", "pipeline", "repo", "commit", "status"],
    "properties": {
        "id": {"type": "integer"}, "pipeline": {"type": "string"}, "repo": {"type": "string"},
        "commit": {"type": "string"}, "branch": _NULLABLE_STR, "status": _STATUS,
        "runner": _NULLABLE_STR, "attempt": {"type": "integer"}, "reason": _NULLABLE_STR,
        "created_at": {"type": "number"}, "started_at": _NUM, "finished_at": _NUM, "duration": _NUM,
        "steps": {"type": "array", "items": _STEP},
        "url": {"type": "string"},
        "waiting": {"type": "array", "items": {"type": "object", "properties": {
            "runner": _NULLABLE_STR, "reason": {"type": "string"}}}},
    },
}

_ARTIFACT = {
    "type": "object",
    "required": ["path", "size", "sha256", "expires", "url"],
    "properties": {
        "path": {"type": "string", "description": "where it was in the workspace"},
        "size": {"type": "integer"}, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "expires": {"type": "string", "format": "date-time"}, "expires_at": {"type": "number"},
        "expired": {"type": "boolean"},
        "url": {"type": ["string", "null"], "description": "where to fetch it; null once expired"},
    },
}

_COMMIT_REQUEST = {
    "type": "object",
    "required": ["repo"],
    "anyOf": [{"required": ["commit"]}, {"required": ["branch"]}],
    "additionalProperties": False,
    "properties": {
        "repo": {"type": "string", "minLength": 1, "maxLength": 2048,
                 "description": "git URL (http(s) without credentials, ssh) or absolute path under "
                                "settings.local_roots; answers show its canonical form"},
        "commit": {"type": "string", "pattern": f"^{COMMIT_PATTERN}$",
                   "description": "omitted: build the head of `branch`, the commit it names on the "
                                  "server now (looked up with a fetch); the answer shows it"},
        "branch": {"type": ["string", "null"], "maxLength": 255,
                   "description": "the branch pipelines match on; without `commit`, a branch or tag "
                                  "whose head is built (required then)"},
    },
}

_COMMIT_ANSWER = {
    "type": "object",
    "required": ["commit", "jobs"],
    "properties": {
        "commit": {"type": "object", "properties": {
            "repo": {"type": "string"}, "commit": _NULLABLE_STR, "branch": _NULLABLE_STR}},
        "jobs": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "integer"}, "pipeline": {"type": "string"}, "status": _STATUS,
            "url": {"type": "string"}}}},
        "status": {"type": "string", "enum": ["resolving"]},
        "detail": {"type": "string"},
    },
}

_RUNNER_REQUEST = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"}, "host": {"type": "string"}, "port": {"type": "integer"},
        "user": {"type": "string"}, "key": {"type": ["string", "null"]}, "known_hosts": {"type": "string"},
        "labels": {"type": "array", "items": {"type": "string"}}, "capacity": {"type": "integer", "minimum": 1},
        "transport": {"type": "string", "enum": ["ssh", "local"]},
        "network": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"},
        "limits": {"type": "object", "additionalProperties": False, "properties": {
            "memory": {"type": "string"}, "cpus": {"type": "number"}, "pids": {"type": "integer"}}},
    },
}

_RUNNER = {
    "type": "object",
    "required": ["name", "source", "labels", "capacity", "running", "health"],
    "properties": {
        "name": {"type": "string"}, "source": {"type": "string", "enum": ["inventory", "api"]},
        "transport": {"type": "string"}, "host": {"type": "string"}, "port": {"type": "integer"},
        "user": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
        "capacity": {"type": "integer"}, "running": {"type": "integer"},
        "used": {"type": "integer", "description": "capacity the running jobs hold: a job running steps "
                                                   "side by side holds up to that many"},
        "jobs": {"type": "array", "items": {"type": "integer"}}, "draining": {"type": "boolean"},
        "drain_reason": _NULLABLE_STR,
        "health": {"type": "object", "properties": {
            "state": {"type": "string", "enum": ["healthy", "unhealthy", "unknown"]},
            "checked_at": _NUM, "reason": _NULLABLE_STR, "docker_version": _NULLABLE_STR,
            "load": _NUM, "free_disk": {"type": ["integer", "null"]}}},
    },
}

_PCTL = {"type": "object", "properties": {"median": _NUM, "p95": _NUM}}

_STATS = {
    "type": "object",
    "required": ["repos", "runners", "queue"],
    "properties": {
        "repos": {"type": "array", "items": {"type": "object", "properties": {
            "repo": {"type": "string"}, "total": {"type": "integer"},
            **{s: {"type": "integer"} for s in _STATUS["enum"]},
            "pct_passed": _NUM, "pct_failed": _NUM, "duration": _PCTL, "wait": _PCTL}}},
        "runners": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "jobs": {"type": "integer"}, "passed": {"type": "integer"},
            "failed": {"type": "integer"}, "pct_passed": _NUM, "busy_seconds": {"type": "number"},
            "utilisation": _NUM, "running": {"type": "integer"}}}},
        "queue": {"type": "object", "properties": {"length": {"type": "integer"}}},
    },
}


_FORGE = {
    "type": "object",
    "required": ["name", "kind", "url", "sends_statuses", "pending", "delivered", "failed"],
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": ["string", "null"], "enum": ["github", "gitea", "forgejo", "gitlab", None],
                 "description": "null: a forge no longer in inventory.yaml that the outbox still names"},
        "url": _NULLABLE_STR, "sends_statuses": {"type": "boolean"},
        "pending": {"type": "integer"}, "delivered": {"type": "integer"}, "failed": {"type": "integer"},
        "last_delivered_at": _NUM, "last_error": _NULLABLE_STR, "last_error_at": _NUM,
    },
}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {400: "Bad input", 401: "Missing or wrong token", 404: "Not found", 409: "Conflict",
            403: "Sent cross-site (a foreign Origin or Sec-Fetch-Site: cross-site)",
            410: "Expired: it was kept until its expiry and is gone",
            413: "Body too large", 415: "Body not sent as application/json", 416: "Range not within the file",
            421: "Host is not a name of this dispatcher (settings.public_names)", 422: "Cannot be processed",
            503: "Every fetch slot is taken (max_fetches, max_fetches_per_host): try again shortly"}
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}


def _param(name: str, where: str, schema: dict, required: bool = False, description: str = "") -> dict:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


_JOB_ID = _param("job_id", "path", {"type": "integer", "minimum": 1}, True)
_RUNNER_NAME = _param("name", "path", {"type": "string"}, True)
_LIMIT = _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000})
_REPO = _param("repo", "query", {"type": "string", "maxLength": 2048})


def _body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


PATHS: dict[str, dict] = {
    "/commit": {
        "post": {"summary": "Queue one job per pipeline matching a commit, or the head of a branch or tag "
                            "(idempotent)",
                 "requestBody": _body(_COMMIT_REQUEST),
                 "responses": {"200": _json(_COMMIT_ANSWER, "Every job existed already"),
                               "202": _json(_COMMIT_ANSWER, "Jobs queued, or 'resolving': a fetch is "
                                            "running and the jobs follow when it ends (commit null "
                                            "while a head is looked up)"),
                               **_errors(400, 401, 413, 415, 422, 503)}},
        "get": {"summary": "Recent commits with their jobs", "parameters": [_REPO, _LIMIT],
                "responses": {"200": _json({"type": "object", "properties": {
                    "commits": {"type": "array", "items": {"type": "object"}}}}), **_errors(400)}},
    },
    "/jobs": {
        "get": {"summary": "List jobs, newest first; with latest=1, the newest job of each (repository, "
                           "branch, pipeline) among the 5000 newest", "parameters": [
            _param("status", "query", _STATUS), _REPO, _LIMIT,
            _param("latest", "query", {"type": "string", "enum": ["1", "true", "0", "false"]},
                   description="the newest job of each (repository, branch, pipeline); not with status")],
            "responses": {"200": _json({"type": "object", "properties": {
                "jobs": {"type": "array", "items": _JOB}}}), **_errors(400)}},
    },
    "/jobs/{job_id}": {
        "get": {"summary": "One job with its steps (and, while queued, why it waits)",
                "parameters": [_JOB_ID], "responses": {"200": _json(_JOB), **_errors(404)}},
    },
    "/jobs/{job_id}/cancel": {
        "post": {"summary": "Cancel a job (idempotent)", "parameters": [_JOB_ID],
                 "responses": {"200": _json(_JOB), **_errors(401, 404)}},
    },
    "/jobs/{job_id}/retry": {
        "post": {"summary": "Run a finished job again as a new attempt", "parameters": [_JOB_ID],
                 "responses": {"202": _json(_JOB), **_errors(401, 404, 409)}},
    },
    "/jobs/{job_id}/log": {
        "get": {"summary": "The job's log; as Server-Sent Events with Accept: text/event-stream or follow=1",
                "parameters": [_JOB_ID, _param("follow", "query", {"type": "string", "enum": ["0", "1"]}),
                               _param("Last-Event-ID", "header", {"type": "integer", "minimum": 0})],
                "responses": {"200": {"description": (
                    "Log text (narwhal's lines as '[narwhal] TEXT', a step line that looks like one as "
                    "'[step] LINE') or event stream (narwhal's lines as 'event: narwhal')"), "content": {
                    "text/plain": {"schema": {"type": "string"}},
                    "text/event-stream": {"schema": {"type": "string"}}}}, **_errors(400, 404)}},
    },
    "/events": {
        "get": {"summary": "Every job and runner change as Server-Sent Events, resumable with Last-Event-ID",
                "description": (
                    "Each event: 'id: N', 'event: KIND', 'data: JSON'. Kinds: job.queued, job.started, "
                    "job.finished (data: id pipeline repo branch commit event status reason runner attempt "
                    "created_at started_at finished_at), job.step (id attempt idx name status exit_code line: "
                    "the job's next log line number then), runner.health (name state reason load draining "
                    "drain_reason running capacity). The stream opens with 'event: ready' (data {\"last\": N}); "
                    "resuming (Last-Event-ID or after=N) sends every event after N, or 'event: reset' first "
                    "when N is no longer kept (reload your view). With settings.read_token it needs the "
                    "token or a signed-in browser's session cookie."),
                "parameters": [_param("after", "query", {"type": "integer", "minimum": 0}),
                               _param("Last-Event-ID", "header", {"type": "integer", "minimum": 0})],
                "responses": {"200": {"description": "The event stream", "content": {
                    "text/event-stream": {"schema": {"type": "string"}}}}, **_errors(400)}},
    },
    "/jobs/{job_id}/log/times": {
        "get": {"summary": "When the log's lines were written: one entry per run of lines written together "
                           "(first line number, how many, epoch seconds; null for lines of older versions)",
                "parameters": [_JOB_ID, _param("after", "query", {"type": "integer", "minimum": 0},
                                                description="only lines numbered above this")],
                "responses": {"200": _json({"type": "object", "properties": {"times": {"type": "array", "items": {
                    "type": "object", "properties": {"first": {"type": "integer"}, "lines": {"type": "integer"},
                                                     "at": {"type": ["number", "null"]}}}}}}),
                              **_errors(400, 404)}},
    },
    "/jobs/{job_id}/artifacts": {
        "get": {"summary": "The files the job kept (its pipeline's artifacts:), by path",
                "parameters": [_JOB_ID],
                "responses": {"200": _json({"type": "object", "properties": {
                    "job_id": {"type": "integer"},
                    "artifacts": {"type": "array", "items": _ARTIFACT}}}), **_errors(404)}},
    },
    "/jobs/{job_id}/artifacts/{path}": {
        "get": {"summary": "One artifact's bytes, as a download (Range, If-None-Match and HEAD work)",
                "description": ("PATH is the artifact's path as listed (slashes included, each segment "
                                "percent-encoded as needed). It is looked up in the job's list, never "
                                "on a disk. The answer's ETag and X-Checksum-SHA256 carry its sha256; "
                                "Content-Disposition: attachment, with the file's name."),
                "parameters": [_JOB_ID, _param("path", "path", {"type": "string", "maxLength": 4096}, True),
                               _param("Range", "header", {"type": "string"})],
                "responses": {"200": {"description": "The file", "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                    "206": {"description": "The part of the file Range asked for"},
                    "304": {"description": "Not modified (If-None-Match)"},
                    **_errors(404, 410, 416),
                    "503": _json({"$ref": "#/components/schemas/Error"},
                                 "Not in this node's artifacts_dir: the nodes of a cluster need one shared "
                                 "artifacts_dir")}},
    },
    "/runner": {
        "get": {"summary": "Every runner with its health and load",
                "responses": {"200": _json({"type": "object", "properties": {
                    "runners": {"type": "array", "items": _RUNNER}}})}},
        "post": {"summary": "Register a runner at run time", "requestBody": _body(_RUNNER_REQUEST),
                 "responses": {"201": _json(_RUNNER), **_errors(400, 401, 409, 413, 415, 422)}},
    },
    "/runner/{name}": {
        "delete": {"summary": "Remove a runner registered over the API", "parameters": [_RUNNER_NAME],
                   "responses": {"200": _json({"type": "object"}), **_errors(401, 404, 409)}},
    },
    "/runner/{name}/drain": {
        "post": {"summary": "Stop giving the runner new jobs", "parameters": [_RUNNER_NAME],
                 "responses": {"200": _json(_RUNNER), **_errors(401, 404)}},
    },
    "/runner/{name}/resume": {
        "post": {"summary": "Give the runner jobs again", "parameters": [_RUNNER_NAME],
                 "responses": {"200": _json(_RUNNER), **_errors(401, 404)}},
    },
    "/stats": {
        "get": {"summary": "Counts, pass rates and durations per repository and runner",
                "responses": {"200": _json(_STATS)}},
    },
    "/hooks/{forge}": {
        "post": {"summary": "A forge's webhook delivery (GitHub, Gitea/Forgejo, GitLab): the signature or token "
                            "is checked on the raw body before anything is parsed; the answer comes after the "
                            "jobs are committed; a redelivery creates nothing",
                 "parameters": [_param("forge", "path", {"type": "string"}, True, "the forge's name in inventory.yaml")],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                 "responses": {"200": _json({"type": "object"}, "Ping, ignored (with why), or the jobs"),
                               "202": _json({"type": "object"}, "The commit is being fetched; jobs follow"),
                               **_errors(400, 401, 404, 413, 415, 422)}},
    },
    "/secrets": {
        "get": {"summary": "Secrets: names, sources, scopes and the pipelines using them, never values "
                           "(needs the token whenever the dispatcher has one)",
                "responses": {"200": _json({"type": "object", "properties": {"secrets": {"type": "array", "items": {
                    "type": "object", "properties": {
                        "name": {"type": "string"}, "source": {"type": "string"},
                        "repos": {"type": ["array", "null"], "items": {"type": "string"}},
                        "branches": {"type": ["array", "null"], "items": {"type": "string"}},
                        "events": {"type": "array", "items": {"type": "string"}},
                        "pipelines": {"type": "array", "items": {"type": "string"}}}}}}}),
                              **_errors(401)}},
    },
    "/forges": {
        "get": {"summary": "Forges with their commit statuses: pending, delivered and failed counts, the last "
                           "error and delivery (never a token)",
                "responses": {"200": _json({"type": "object", "properties": {
                    "forges": {"type": "array", "items": _FORGE}}})}},
    },
    "/health": {
        "get": {"summary": "The dispatcher's own health, never behind the token (a load balancer's probe): 200, "
                           "or 503 while its store does not answer. `node`: which dispatcher answered and whether "
                           "it holds the database. With settings.read_token, a client without the token gets "
                           "`{\"status\"}` alone", "responses": {"200": _json({"type": "object"})}},
    },
    "/nodes": {
        "get": {"summary": "The dispatchers on this store (every `narwhal serve` is a node with a heartbeat), "
                           "`self` being the one that answered",
                "responses": {"200": _json({"type": "object", "properties": {
                    "self": {"type": "string"},
                    "nodes": {"type": "array", "items": {"type": "object", "properties": {
                        "id": {"type": "string"}, "host": {"type": "string"}, "pid": {"type": "integer"},
                        "started_at": {"type": "number"}, "heartbeat_at": {"type": "number"},
                        "stopped_at": {"type": ["number", "null"]}, "alive": {"type": "boolean"},
                        "running": {"type": "integer"},
                        "config": {"type": ["string", "null"]}}}}}})}},
    },
    "/reload": {
        "post": {"summary": "Reload inventory.yaml, pipelines/ and secret files now (a bad config is refused "
                            "with every problem; the dispatcher also reloads by itself when they change)",
                 "responses": {"200": _json({"type": "object", "properties": {
                     "reloaded": {"type": "boolean"}, "runners": {"type": "array", "items": {"type": "string"}},
                     "pipelines": {"type": "array", "items": {"type": "string"}},
                     "warnings": {"type": "array", "items": {"type": "string"}}}}),
                     **_errors(401, 404, 422)}},
    },
    "/openapi.json": {
        "get": {"summary": "This document", "responses": {"200": _json({"type": "object"})}},
    },
}


def _add_boundary_errors(paths: dict[str, dict]) -> None:
    """The boundary (``narwhal.api.app.check_boundary``) stands before every operation: a foreign
    Host is a 421 anywhere; a change sent cross-site is a 403 and a non-JSON body a 415; with
    ``settings.read_token`` reads (not /health) need the token."""
    for path, operations in paths.items():
        for method, operation in operations.items():
            codes = [421] + ([403, 415] if method != "get" else [] if path == "/health" else [401])
            for code in codes:
                operation["responses"].setdefault(str(code), _errors(code)[str(code)])


_add_boundary_errors(PATHS)


def document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "narwhal", "version": __version__,
                 "description": "Agentless CI: submit commits, follow jobs, manage runners."},
        "paths": PATHS,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
