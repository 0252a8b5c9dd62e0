"""The CLI prints job-controlled text inert: no escape sequence but colour, no rich markup read."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
from rich.console import Console

from narwhal.cli import main as cli
from narwhal.cli import report
from narwhal.cli.commands import jobs as jobs_cli

SGR = re.compile(r"\x1b\[[0-9;:]*m")
EVIL = ("\x1b]0;owned\x07\x1b[2J\x1b[H\x1b]8;;https://evil.example/\x1b\\link\x1b]8;;\x1b\\"
        "\u202eexe.txt\u202c\r\x08\x9b1A[bold]B[/bold][link=https://x]L[/link]")


def render(renderable, *, terminal: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, no_color=not terminal, width=3000, highlight=False)
    console.print(renderable, soft_wrap=True)
    return out.getvalue()


def assert_inert(output: str) -> None:
    assert "\x1b" not in SGR.sub("", output), repr(output)
    for bad in ("\x07", "\x08", "\r", "\x9b", "\u202e", "\u202c", "owned", "evil.example"):
        assert bad not in output, (bad, output)
    assert "[bold]B[/bold][link=https://x]L[/link]" in output  # shown as written, not read as markup


JOB = {"id": 7, "status": "error", "pipeline": "ci" + EVIL, "repo": "/src/" + EVIL, "commit": "0" * 40,
       "branch": "main" + EVIL, "runner": "local" + EVIL, "attempt": 1, "duration": 3.0,
       "reason": "docker: " + EVIL, "steps": [{"idx": 0, "name": "build" + EVIL, "status": "failed",
                                                "exit_code": 125, "duration": 1.0}],
       "waiting": [{"runner": "r" + EVIL, "reason": "unhealthy: " + EVIL}]}


@pytest.mark.parametrize("terminal", [True, False])
@pytest.mark.parametrize("view", [
    lambda plain: report.jobs_table([JOB], plain=plain),
    lambda plain: report.job_panel(JOB, plain=plain),
    lambda plain: report.queue_table([JOB], plain=plain),
    lambda plain: report.runners_table([{"name": "r" + EVIL, "labels": [EVIL], "health": {
        "state": "unhealthy", "reason": EVIL}, "drain_reason": EVIL}], plain=plain),
    lambda plain: report.report({"repos": [{"repo": EVIL}]}, [], [JOB], [JOB], plain=plain),
    lambda plain: report.forges_table([{"name": EVIL, "kind": EVIL, "url": EVIL, "failed": 1,
                                        "last_error": "HTTP 422: " + EVIL, "last_error_at": 0}], plain=plain),
    lambda plain: report.LiveJobs({7: JOB}, [7], plain=plain),
    lambda plain: report.result_line(JOB),
    lambda plain: report.changed_job_line(JOB),
    lambda plain: report.submitted_line(JOB, "/src/" + EVIL, "0" * 40),
    lambda plain: report.removed_line(EVIL),
])
def test_finding7_every_view_of_a_job_is_inert(view, terminal):
    assert_inert(render(view(not terminal), terminal=terminal))


def test_job_events_and_log_end_line_are_inert():
    events = report.JobEvents()
    running = {**JOB, "status": "running", "steps": [{**JOB["steps"][0], "status": "running"}]}
    lines = events.changes(running) + events.changes(JOB)
    assert len(lines) == 3
    for line in lines:
        assert_inert(render(line, terminal=False))
    assert_inert(report.log_end_line(7, {"status": "error", "reason": JOB["reason"]}))


def test_log_tail_keeps_colour_only():
    heading, lines = report.log_tail(7, "\x1b[31mred\x1b[0m " + EVIL + "\nsecond\n")
    coloured = "".join(render(line, terminal=True) for line in lines)
    assert "\x1b[31m" in coloured and "red" in coloured
    assert_inert(coloured)
    assert_inert("".join(render(line, terminal=False) for line in lines))


class FakeClient:
    LOG = "\x1b[32mok\x1b[0m\n" + EVIL + "\nlast\n"

    def log_bytes(self, job_id: int) -> bytes:
        return self.LOG.encode()

    def log_text(self, job_id: int) -> str:
        return self.LOG

    def follow_log(self, job_id: int, after: int = 0):
        for n, line in enumerate(self.LOG.rstrip("\n").split("\n"), 1):
            yield n, line, "step"
        yield {"id": job_id, "status": "failed", "reason": "exit 1 in step " + EVIL}


class Stdout(io.TextIOWrapper):
    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8", newline="")

    def value(self) -> str:
        self.flush()
        return self.buffer.getvalue().decode()  # type: ignore[attr-defined]


@pytest.mark.parametrize("follow", [[], ["-f"]])
def test_finding7_logs_are_inert_and_raw_gives_them_back(monkeypatch, follow):
    monkeypatch.setattr(jobs_cli, "make_client", lambda args: FakeClient())
    out = Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    cli.main(["logs", "7", *follow])
    text = out.value()
    assert_inert(text)
    assert "\x1b[32mok\x1b[0m\n" in text and "last\n" in text

    raw = Stdout()
    monkeypatch.setattr(sys, "stdout", raw)
    cli.main(["logs", "7", "--raw", *follow])
    assert raw.value().startswith(FakeClient.LOG)


def test_raw_and_json_exclude_each_other(monkeypatch, capsys):
    monkeypatch.setattr(jobs_cli, "make_client", lambda args: FakeClient())
    assert cli.main(["logs", "7", "--raw", "--json"]) == cli.EXIT_USAGE
    assert "exclude" in capsys.readouterr().err


# --- finding 7: narwhal's lines rendered apart, a step's never in narwhal's style -------------

COUNTERFEIT = "[narwhal] step build: exit 0"
STYLED_COUNTERFEIT = report.NARWHAL_SGR + COUNTERFEIT + report.RESET


class KindsClient(FakeClient):
    ENTRIES = [("compiling", "step"), (COUNTERFEIT, "step"), (STYLED_COUNTERFEIT, "step"),
               ("step build: exit 1 (0.3s)", "narwhal")]
    # the dispatcher's plain-text form of the same lines
    LOG = ("compiling\n[step] " + COUNTERFEIT + "\n[step] " + STYLED_COUNTERFEIT
           + "\n[narwhal] step build: exit 1 (0.3s)\n")

    def follow_log(self, job_id: int, after: int = 0):
        for n, (text, kind) in enumerate(self.ENTRIES, 1):
            yield n, text, kind
        yield {"id": job_id, "status": "failed", "reason": "exit 1"}


@pytest.mark.parametrize("style", [False, True])
def test_finding7_log_entry_never_gives_a_step_narwhals_look(style):
    narwhal = report.log_entry("step build: exit 1 (0.3s)", "narwhal", style=style)
    assert narwhal == (report.NARWHAL_SGR if style else "") + "[narwhal] step build: exit 1 (0.3s)" \
        + (report.RESET if style else "")
    for text in (COUNTERFEIT, STYLED_COUNTERFEIT, "  [NARWHAL] x"):
        shown = report.log_entry(text, "step", style=style)
        assert shown.startswith((report.RESET if style else "") + "[step] ")
        assert not shown.startswith(report.NARWHAL_SGR)
    assert report.log_entry("plain", "step", style=style) == "plain"
    # a step's header is narwhal's line too, and a step printing one is marked
    header = report.log_entry("step build started", "narwhal", style=style)
    assert header == (report.HEADER_SGR if style else "") + "[narwhal] ── step build ──" \
        + (report.RESET if style else "")
    assert report.log_entry("[narwhal] ── step deploy ──", "step", style=style).startswith(
        (report.RESET if style else "") + "[step] [narwhal] ── step deploy ──")
    assert report.log_entry("step build started", "step", style=style) == "step build started"


@pytest.mark.parametrize("follow", [[], ["-f"]])
def test_finding7_logs_render_kinds_apart(monkeypatch, follow):
    monkeypatch.setattr(jobs_cli, "make_client", lambda args: KindsClient())
    out = Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    cli.main(["logs", "7", *follow])
    lines = out.value().splitlines()
    assert lines[:4] == ["compiling", "[step] " + COUNTERFEIT, "[step] " + STYLED_COUNTERFEIT,
                         "[narwhal] step build: exit 1 (0.3s)"]
    assert [line for line in lines if line.startswith("[narwhal]")] == ["[narwhal] step build: exit 1 (0.3s)"]

    raw = Stdout()
    monkeypatch.setattr(sys, "stdout", raw)
    cli.main(["logs", "7", "--raw", *follow])
    assert raw.value().startswith(KindsClient.LOG)  # --raw is the plain-text form, followed or not


def test_finding7_logs_follow_json_carries_the_kind(monkeypatch):
    monkeypatch.setattr(jobs_cli, "make_client", lambda args: KindsClient())
    out = Stdout()
    monkeypatch.setattr(sys, "stdout", out)
    cli.main(["logs", "7", "-f", "--json"])
    rows = [json.loads(line) for line in out.value().splitlines()]
    assert [(r["text"], r["kind"]) for r in rows[:4]] == KindsClient.ENTRIES


def test_finding7_log_tail_styles_only_narwhal_lines():
    _, lines = report.log_tail(7, KindsClient.LOG)
    assert [line.plain for line in lines] == [
        "  compiling", "  [step] " + COUNTERFEIT, "  [step] [narwhal] step build: exit 0",
        "  [narwhal] step build: exit 1 (0.3s)"]
    assert [str(line.style) for line in lines] == ["", "", "", report.NARWHAL_STYLE]
