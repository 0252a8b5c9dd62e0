"""report.py renders plain API data; these render to text and look at what a person reads."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from narwhal.cli import report

NOW = 1_700_000_000.0

STATS = {
    "repos": [
        {"repo": "/src/app", "total": 12, "queued": 1, "running": 1, "passed": 8, "failed": 2, "error": 0,
         "cancelled": 0, "pct_passed": 80.0, "pct_failed": 20.0,
         "duration": {"median": 4.2, "p95": 184.0}, "wait": {"median": 0.3, "p95": 1.0}},
        {"repo": "/src/new", "total": 1, "queued": 1, "running": 0, "passed": 0, "failed": 0, "error": 0,
         "cancelled": 0, "pct_passed": None, "pct_failed": None,
         "duration": {"median": None, "p95": None}, "wait": {"median": None, "p95": None}},
    ],
    "runners": [],
    "queue": {"length": 2},
}

RUNNERS = [
    {"name": "runner-1", "transport": "ssh", "host": "127.0.0.20", "port": 22, "labels": ["linux", "big"],
     "capacity": 2, "running": 1, "draining": False,
     "health": {"state": "healthy", "checked_at": NOW - 3, "reason": None}},
    {"name": "sick-box", "transport": "ssh", "host": "10.0.0.9", "port": 2222, "labels": [],
     "capacity": 1, "running": 0, "draining": True, "drain_reason": "3 errors in a row",
     "health": {"state": "unhealthy", "checked_at": NOW - 200, "reason": "docker unavailable"}},
    {"name": "fresh", "transport": "local", "capacity": 1, "running": 0, "health": None},
]

JOBS = [
    {"id": 7, "status": "failed", "pipeline": "ci", "repo": "/src/app", "commit": "a" * 40, "branch": "main",
     "runner": "runner-1", "duration": 65.0, "reason": "exit 1 in step build"},
    {"id": 8, "status": "queued", "pipeline": "lint", "repo": "/src/app", "commit": "b" * 40, "branch": None,
     "runner": None, "duration": None, "reason": None},
]


def render(renderable, color: bool = False, width: int = 200) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=color, color_system="truecolor" if color else None)
    console.print(renderable)
    return out.getvalue()


@pytest.mark.parametrize("seconds, text", [
    (None, "-"), (0, "0.0s"), (1.23, "1.2s"), (59.9, "59.9s"), (184, "3m04s"), (3599.6, "1h00m"),
    (7500, "2h05m"), (-1, "0.0s"), ("junk", "-"),
])
def test_duration(seconds, text):
    assert report.duration(seconds) == text


def test_percent_and_ago():
    assert report.percent(None) == "-"
    assert report.percent(80.0) == "80%"
    assert report.percent(2.5) == "2.5%"
    assert report.ago(None) == "never"
    assert report.ago(NOW - 3, NOW) == "3.0s ago"
    assert report.ago(NOW + 5, NOW) == "0.0s ago"  # clock skew never shows negative time


def test_stats_table_names_repos_and_handles_nothing_finished():
    text = render(report.stats_table(STATS))
    assert "Repositories" in text
    assert "/src/app" in text and "80%" in text and "4.2s" in text and "3m04s" in text
    new_line = next(line for line in text.splitlines() if "/src/new" in line)
    assert "-" in new_line
    assert "no jobs yet" in render(report.stats_table({"repos": []}))
    assert "no jobs yet" in render(report.stats_table(None))


def test_runners_table_shows_health_capacity_and_reasons():
    text = render(report.runners_table(RUNNERS, now=NOW))
    assert "runner-1" in text and "healthy" in text and "linux, big" in text and "1/2" in text
    assert "3.0s ago" in text
    sick = next(line for line in text.splitlines() if "sick-box" in line)
    assert "unhealthy" in sick and "draining" in sick and "docker unavailable" in sick
    assert "10.0.0.9:2222" in sick
    fresh = next(line for line in text.splitlines() if "fresh" in line)
    assert "never" in fresh and "unknown" in fresh
    # a healthy runner shows no reason even if one is present
    healthy = [{"name": "r", "health": {"state": "healthy", "reason": "stale"}}]
    assert "stale" not in render(report.runners_table(healthy))


def test_runners_table_accepts_stats_runners():
    text = render(report.runners_table([{"name": "r9", "health": "healthy", "capacity": 3, "running": 0}]))
    assert "r9" in text and "0/3" in text


def test_jobs_table_colours_status():
    plain = render(report.jobs_table(JOBS))
    assert "failed" in plain and "queued" in plain and "exit 1 in step build" in plain
    assert "aaaaaaaaaa" in plain and "a" * 11 not in plain
    assert "1m05s" in plain
    coloured = render(report.jobs_table(JOBS), color=True)
    assert "\x1b[" in coloured
    red = "\x1b[31m"
    assert red + "failed" in coloured or "\x1b[38;2;128;0;0mfailed" in coloured or "31mfailed" in coloured


def test_status_styles():
    assert report.status_text("passed").style == "green"
    assert report.status_text("failed").style == "red"
    assert report.status_text("error").style == "magenta"
    assert report.status_text("cancelled").style == "dim"
    assert report.status_text("running").style == "yellow"
    assert report.status_text("queued").style == "blue"
    assert str(report.status_text(None)) == "unknown"


def test_queue_table_says_why():
    queued = [{"id": 8, "pipeline": "lint", "repo": "/src/app", "commit": "b" * 40, "created_at": NOW - 65,
               "waiting": [{"runner": "runner-1", "reason": "at capacity (2/2)"},
                           {"runner": "sick-box", "reason": "unhealthy: docker unavailable"}]}]
    text = render(report.queue_table(queued, now=NOW))
    assert "Queue" in text and "1m05s" in text
    assert "runner-1: at capacity (2/2)" in text and "sick-box: unhealthy" in text
    assert "nothing waits" in render(report.queue_table([]))
    assert report.waiting_text([{"runner": None, "reason": "no runners"}]) == "no runners"
    assert report.waiting_text(None) == "-"


def test_job_panel_lists_steps():
    job = {**JOBS[0], "attempt": 2, "started_at": NOW - 70, "steps": [
        {"name": "checkout", "status": "passed", "exit_code": 0, "duration": 0.5},
        {"name": "build", "status": "failed", "exit_code": 1, "duration": 64.0},
        {"name": "test", "status": "skipped", "exit_code": None, "duration": None},
    ]}
    text = render(report.job_panel(job, now=NOW))
    for word in ("job 7", "failed", "exit 1 in step build", "ci", "runner-1", "checkout", "build", "skipped",
                 "1m04s", "attempt"):
        assert word in text
    running = {"id": 9, "status": "running", "started_at": NOW - 10,
               "steps": [{"name": "s", "status": "running", "started_at": NOW - 4, "duration": None}]}
    text = render(report.job_panel(running, now=NOW))
    assert "10.0s" in text and "4.0s" in text
    assert "job 1" in render(report.job_panel({"id": 1}))  # nothing else known: still renders


def test_report_puts_what_matters_first_and_draws_no_boxes():
    group = report.report(STATS, RUNNERS, JOBS, [], latest=JOBS, now=NOW, updated_at=NOW, url="http://ci:8080")
    text = render(group)
    titles = ("Now: the latest job", "Runners", "Queue: nothing waits", "Recent jobs", "Repositories")
    assert [text.index(t) for t in titles] == sorted(text.index(t) for t in titles), text
    assert text.splitlines()[0].startswith("narwhal · updated ") and "queue: 2" in text and "http://ci:8080" in text
    for mode in (False, True):
        shown = render(report.report(STATS, RUNNERS, JOBS, [], now=NOW, plain=mode), color=not mode)
        assert not any(ch in shown for ch in "╭╮╰╯│┃━┏"), shown
    assert "\x1b" not in render(report.report(STATS, RUNNERS, JOBS, [], now=NOW, plain=True))


@pytest.mark.parametrize("repos, names", [
    (["/tmp/pytest-of-root/pytest-7/test_a0/repo"], ["repo"]),
    (["/src/a/app", "/src/b/app", "/src/tools"], ["a/app", "b/app", "tools"]),
    (["https://git.example.com/team/app.git", "/srv/app"], ["team/app", "srv/app"]),
    (["https://a.example/x.git", "https://b.example/x.git"], ["https://a.example/x.git", "https://b.example/x.git"]),
    (["/", "relative"], ["/", "relative"]),
])
def test_short_names_tell_repositories_apart(repos, names):
    assert [report.short_names(repos)[r] for r in repos] == names


def test_now_says_what_runs_and_why_it_ended():
    running = {"status": "running", "steps": [{"name": "build", "status": "passed"},
                                               {"name": "test", "status": "running", "started_at": NOW - 63}]}
    assert str(report.now_text(running, NOW)) == "step test 1m03s"
    assert str(report.now_text({"status": "running"}, NOW)) == "starting"
    assert str(report.now_text({"status": "failed", "reason": "exit 1 in step test"})) == "exit 1 in step test"
    assert str(report.now_text({"status": "passed", "duration": 12})) == "in 12.0s"
    assert str(report.now_text({"status": "queued", "waiting": [{"runner": "r", "reason": "busy"}]})) == "r: busy"
    assert [report.when(NOW - s, NOW) for s in (5, 125, 7300, 90000, -3)] == ["5s", "2m", "2h", "1d", "0s"]


def many_jobs(n: int) -> list[dict]:
    return [{**JOBS[0], "id": 100 + i, "branch": f"topic-{i}", "finished_at": NOW - i} for i in range(n)]


@pytest.mark.parametrize("width, height", [(80, 24), (160, 50)])
def test_the_report_fits_the_screen_most_important_first(width, height):
    latest = many_jobs(60)
    text = render(report.report(STATS, RUNNERS, many_jobs(20), [], latest=latest, now=NOW, updated_at=NOW,
                                width=width, height=height), width=width)
    lines = text.splitlines()
    assert len(lines) <= height - 1, text
    assert all(len(line) <= width for line in lines), text
    assert "more (a taller window, or narwhal jobs)" in text and "Runners" not in text  # Now fills the screen
    few = render(report.report(STATS, RUNNERS, many_jobs(20), [], latest=latest[:3], now=NOW, width=width,
                               height=height), width=width)
    assert "Runners" in few and "sick-box" in few and "docker unavailable" in few
    assert len(few.splitlines()) <= height - 1


def test_narrow_and_wide_tables():
    narrow = render(report.report(STATS, RUNNERS, JOBS, [], latest=JOBS, now=NOW, width=80), width=80)
    wide = render(report.report(STATS, RUNNERS, JOBS, [], latest=JOBS, now=NOW, width=160), width=160)
    assert "commit" not in narrow and "aaaaaaaaaa" in wide and "labels" in wide
    for text in (narrow, wide):
        assert "runner-1" in text and "sick-box" in text  # runner names whole
        assert all(len(line) <= (80 if text is narrow else 160) for line in text.splitlines())


FORGES = [
    {"name": "lab", "kind": "gitlab", "url": "https://gitlab.example", "sends_statuses": True, "pending": 2,
     "delivered": 40, "failed": 3, "last_delivered_at": NOW - 100, "last_error": "HTTP 401: 401 Unauthorized",
     "last_error_at": NOW - 5},
    {"name": "hub", "kind": "github", "url": "https://api.github.com", "sends_statuses": True, "pending": 0,
     "delivered": 7, "failed": 0, "last_delivered_at": NOW - 1, "last_error": "could not connect",
     "last_error_at": NOW - 60},
    {"name": "quiet", "kind": "gitea", "url": "https://gitea.example", "sends_statuses": False, "pending": 0,
     "delivered": 0, "failed": 0, "last_delivered_at": None, "last_error": None, "last_error_at": None},
    {"name": "old", "kind": None, "url": None, "sends_statuses": False, "pending": 1, "delivered": 0,
     "failed": 0, "last_delivered_at": None, "last_error": None, "last_error_at": None},
]


def test_forges_table_shows_failed_statuses_in_red():
    text = render(report.forges_table(FORGES, now=NOW))
    lab = next(line for line in text.splitlines() if "lab" in line)
    assert "gitlab" in lab and "40" in lab and "1m40s ago" in lab and "HTTP 401: 401 Unauthorized (5.0s ago)" in lab
    assert "never" in next(line for line in text.splitlines() if "quiet" in line)
    assert "(no token)" in text and "not configured" in text
    coloured = render(report.forges_table(FORGES, now=NOW), color=True)
    assert re.search(r"\x1b\[1;31m *3\x1b\[0m", coloured)  # the failed count, bold red
    assert "\x1b[31mHTTP 401: 401 Unauthorized" in coloured  # newer than the last delivery: red
    assert "\x1b[2mcould not connect" in coloured  # delivered since: dim
    assert "no forges" in render(report.forges_table([]))


def test_report_shows_forges_only_when_there_are_some():
    text = render(report.report(STATS, RUNNERS, JOBS, [], forges=FORGES, now=NOW))
    assert "Forges" in text and "commit statuses failed: 3" in text
    assert text.index("Runners") < text.index("Forges") < text.index("Recent jobs")
    assert "Forges" not in render(report.report(STATS, RUNNERS, JOBS, [], now=NOW))
    view = report.report_view({"stats": STATS, "runners": RUNNERS, "jobs": JOBS, "queue": [], "forges": FORGES})
    assert "Forges" in render(view)


def test_everything_missing_renders():
    text = render(report.report(None, None, None, None))
    assert "no runners" in text and "no jobs" in text and "nothing waits" in text
    render(report.jobs_table([{}]))
    render(report.runners_table([{}]))
    render(report.queue_table([{}]))
    render(report.stats_table({"repos": [{}]}))
    render(report.forges_table([{}]))


def test_user_data_is_never_read_as_markup():
    job = {"id": 1, "status": "failed", "pipeline": "[bold]p[/]", "repo": "/src/[/oops]", "branch": "[red]b",
           "reason": "exit 1 in step [x]", "steps": [{"name": "[/]", "status": "failed"}]}
    text = render(report.report({"repos": [{"repo": "[/]"}]}, [{"name": "[red]r", "labels": ["[/x]"]}],
                                [job], [{**job, "waiting": [{"runner": "[r]", "reason": "[/]"}]}]))
    for literal in ("[bold]p[/]", "oops]", "[red]b", "[red]r", "[r]: [/]"):  # repositories by short name
        assert literal in text
    assert "/src/[/oops]" in render(report.jobs_table([job])) and "[/x]" in render(report.runners_table(
        [{"name": "[red]r", "labels": ["[/x]"]}]))
    assert "[/]" in render(report.job_panel(job))


def test_running_job_shows_time_so_far():
    job = {"id": 3, "status": "running", "started_at": NOW - 125, "duration": None}
    assert "2m05s" in render(report.jobs_table([job], now=NOW))
    assert report.elapsed({"status": "running", "started_at": "junk"}) is None
    assert report.elapsed({"status": "queued", "started_at": NOW}) is None


# --- what moved here from the CLI: check, follow and result lines ---------------------------

SUMMARY = {
    "runners": [{"name": "local", "transport": "local", "host": "localhost", "labels": ["linux"], "capacity": 2},
                {"name": "b[1]", "transport": "ssh", "host": "10.0.0.2", "labels": [], "capacity": 1}],
    "pipelines": [{"name": "ci", "repo": ["*"], "branches": None, "steps": ["build"], "runners": []}],
    "warnings": ["pipeline ci: no runner has labels [gpu] \\"],
}


def test_check_tables_warnings_and_footer():
    text = render(report.check_runners(SUMMARY)) + render(report.check_pipelines(SUMMARY))
    assert "b[1]" in text and "10.0.0.2" in text and "(all)" in text and "(none)" in text
    local = next(line for line in text.splitlines() if "local" in line)
    assert "-" in local and "localhost" not in local
    assert render(report.check_warning(SUMMARY["warnings"][0])) == \
        "warning: pipeline ci: no runner has labels [gpu] \\\n"  # user text is not markup
    assert str(report.check_footer(SUMMARY)) == "config ok: 2 runners, 1 pipeline"


def test_job_events_say_each_change_once():
    events = report.JobEvents()
    job = {"id": 3, "pipeline": "ci", "status": "queued", "steps": []}
    assert events.changes(job) == []
    job = {**job, "status": "running", "runner": "r1",
           "steps": [{"idx": 0, "name": "a", "status": "running"}, {"idx": 1, "name": "b", "status": "pending"}]}
    assert [str(t) for t in events.changes(job)] == ["job 3 ci: running on r1", "job 3 ci: step a started"]
    assert events.changes(job) == []
    job["steps"] = [{"idx": 0, "name": "a", "status": "failed", "duration": 65, "exit_code": 2},
                    {"idx": 1, "name": "b", "status": "skipped"}]
    assert [str(t) for t in events.changes(job)] == ["job 3 ci: step a failed in 1m05s (exit 2)",
                                                     "job 3 ci: step b skipped in -"]


def test_result_lines():
    job = {"id": 7, "pipeline": "ci", "status": "failed", "duration": 65.0, "reason": "exit 1 in step build",
           "attempt": 2}
    assert str(report.result_line(job)) == "job 7 ci failed in 1m05s: exit 1 in step build"
    assert str(report.changed_job_line(job)) == str(report.result_line(job))
    assert str(report.changed_job_line({"id": 7, "pipeline": "ci", "status": "queued", "attempt": 2})) == \
        "job 7 ci queued (attempt 2)"
    assert str(report.submitted_line({"id": 1, "pipeline": "ci", "status": "queued"}, "/src/app", "a" * 40)) == \
        "job 1 ci /src/app aaaaaaaaaa (no branch): queued"
    assert str(report.submitted_line({"id": 1, "pipeline": "ci", "status": "queued", "created": True},
                                     "/src/app", "a" * 40, "main")) == "job 1 ci /src/app aaaaaaaaaa on main: queued"
    assert str(report.submitted_line({"id": 3, "pipeline": "ci", "status": "failed", "created": False},
                                     "/src/app", "a" * 40, "main")) == \
        "job 3 ci /src/app aaaaaaaaaa on main: failed (submitted before; narwhal retry 3 runs it again)"
    assert str(report.submitted_line({"id": 4, "pipeline": "ci", "status": "running", "created": False},
                                     "/src/app", "a" * 40)).endswith("running (submitted before; still under way)")
    assert str(report.submitted_line({"id": 5, "pipeline": "docs", "status": "skipped", "created": True,
                                      "reason": "event api is not in when.event [push]"}, "/a", "a" * 40)) \
        .endswith("skipped (event api is not in when.event [push])")
    assert report.log_end_line(4, {"status": "error", "reason": "runner lost"}) == \
        "narwhal: job 4 error (runner lost)"
    assert report.log_end_line(4, {"status": "passed", "reason": None}) == "narwhal: job 4 passed"
    assert str(report.removed_line("b1")) == "runner b1 removed"


def test_log_tail_and_live_jobs():
    assert report.log_tail(5, "") is None
    heading, lines = report.log_tail(5, "".join(f"l{i}\n" for i in range(20)), lines=3)
    assert str(heading) == "last 3 log lines of job 5 (narwhal logs 5 for all):"
    assert [str(t) for t in lines] == ["  l17", "  l18", "  l19"]
    jobs = {1: {"id": 1, "status": "queued"}}
    view = report.LiveJobs(jobs, [1], plain=True)
    assert "queued" in render(view)
    jobs[1] = {"id": 1, "status": "passed"}  # the view shows the dict as it is now
    assert "passed" in render(view)


def test_steps_say_why_they_were_skipped_or_allowed_to_fail():
    steps = [{"name": "lint", "status": "failed_allowed", "exit_code": 1, "duration": 2.0,
              "reason": "exit 1 in step lint"},
             {"name": "deploy", "status": "skipped", "exit_code": None, "duration": None,
              "reason": "branch dev is not in when.branch [main]"},
             {"name": "test", "status": "passed", "exit_code": 0, "duration": 3.0, "reason": None}]
    text = render(report.steps_table(steps))
    assert "why" in text and "failed_allowed" in text and "branch dev is not in when.branch [main]" in text
    assert "yellow" == report.STATUS_STYLES["failed_allowed"]
    assert "why" not in render(report.steps_table([steps[2]]))  # no column when nothing needs one
    events = report.JobEvents()
    job = {"id": 3, "pipeline": "ci", "status": "running", "runner": "r1", "steps": steps}
    assert "job 3 ci: step deploy skipped in -: branch dev is not in when.branch [main]" in [
        str(t) for t in events.changes(job)]


def test_runners_show_the_capacity_their_jobs_hold():
    runner = {**RUNNERS[0], "running": 1, "used": 2, "capacity": 2}
    assert "2/2" in render(report.runners_table([runner], now=NOW))


def test_check_shows_graphs_and_services():
    summary = {"pipelines": [{"name": "ci", "repo": ["*"], "branches": None, "runners": ["a"], "steps": ["a", "b"],
                              "graph": True, "width": 2, "services": [{"name": "db"}],
                              "step_details": [{"name": "a", "depends_on": [], "when": {}, "retry": 2},
                                               {"name": "b", "depends_on": ["a"], "allow_failure": True,
                                                "when": {"status": ["failure"]}}]}]}
    text = render(report.check_pipelines(summary))
    assert "a (retry 2); b (after a; when status: failure; may fail) [up to 2 at once]" in text
    assert "db" in text


NODES = {"self": "a" * 24 + "11111111", "nodes": [
    {"id": "a" * 24 + "11111111", "host": "ci-1", "pid": 101, "started_at": NOW - 3600, "heartbeat_at": NOW - 2,
     "stopped_at": None, "alive": True, "running": 3},
    {"id": "b" * 24 + "22222222", "host": "ci-2", "pid": 202, "started_at": NOW - 600, "heartbeat_at": NOW - 1,
     "stopped_at": None, "alive": True, "running": 1},
    {"id": "c" * 24 + "33333333", "host": "[red]ci-3", "pid": 303, "started_at": NOW - 900, "heartbeat_at": NOW - 90,
     "stopped_at": None, "alive": False, "running": 2},
]}


def test_the_report_shows_the_dispatchers_when_several_share_the_store():
    text = render(report.report(STATS, RUNNERS, JOBS, [], now=NOW, nodes=NODES))
    assert "Dispatchers" in text and "dispatchers: 2" in text
    lines = text.splitlines()
    me = next(line for line in lines if "11111111" in line)
    assert "11111111 *" in me and "ci-1" in me and "alive" in me
    assert "silent" in next(line for line in lines if "33333333" in line)
    assert "[red]ci-3" in text  # a host name is text, never markup
    one = {"self": NODES["self"], "nodes": NODES["nodes"][:1]}
    assert "Dispatchers" not in render(report.report(STATS, RUNNERS, JOBS, [], now=NOW, nodes=one))
    assert "Dispatchers" in render(report.report_view({"stats": STATS, "runners": RUNNERS, "jobs": JOBS,
                                                       "queue": [], "nodes": NODES}))
    assert "no dispatchers known" in render(report.nodes_table(None))
    render(report.nodes_table({"nodes": [{}]}))


@pytest.mark.parametrize("nodes", [
    {"nodes": ["x", None, 5]}, {"nodes": "abc"}, {"nodes": {"a": 1}}, "not a mapping", ["x"],
    {"self": 7, "nodes": [{"id": 5, "host": "\x1b[2Jci", "alive": "yes", "started_at": float("nan"),
                           "heartbeat_at": float("inf"), "pid": "x"}]},
])
def test_a_malformed_nodes_answer_does_not_take_the_report_down(nodes):
    """``/nodes`` from a dispatcher of another version, or a proxy in between: the report shows
    what it can (the dispatchers' table, when its entries are entries) instead of a traceback."""
    text = render(report.nodes_table(nodes, now=NOW))
    assert "Dispatchers" in text and "\x1b[2J" not in text
    render(report.report(STATS, RUNNERS, JOBS, [], now=NOW, nodes=nodes))  # type: ignore[arg-type]
    assert report.alive_nodes(nodes) == 0  # type: ignore[arg-type]


def test_durations_that_are_not_finite_are_shown_as_unknown():
    assert report.duration(float("nan")) == report.duration(float("inf")) == report.duration(None)
    assert report.ago(float("nan"), now=NOW) == report.ago(float("-inf"), now=NOW)


def test_a_node_with_another_config_stands_out_in_the_dispatchers_table():
    nodes = {"self": NODES["self"], "nodes": [{**n, "config": "abcdef0123456789"} for n in NODES["nodes"]]}
    nodes["nodes"][1]["config"] = "9999999999999999"
    text = render(report.nodes_table(nodes, now=NOW), color=True)
    assert "abcdef01" in text and "\x1b[31m99999999" in text  # the alive node with another config: red
    assert "\x1b[31mabcdef01" not in text
