"""Rich rendering of plain data: what the REST API returns, turned into tables.

Every function takes plain dicts/lists (exactly what ``/stats``, ``/runner`` and
``/jobs`` answer, or what ``config.loader.summarize`` returns) and returns a rich
renderable, so the CLI's ``--json`` twin prints the very same data. Nothing here does
I/O; every field may be missing or None. Lines marked "soft-wrapped" are meant to be
printed with ``console.print(line, soft_wrap=True)``: a pipe gets them whole.

``plain=True`` drops the box drawing (for pipes and files, where rich also drops colour).

Job-controlled text (reasons, step and runner names, repositories, branches, log lines)
is made inert on the way in: ``printable`` for one-line fields, ``terminal_safe`` plus
``Text.from_ansi`` for log lines (colour kept), and always ``Text``, never markup, so
neither an escape sequence nor ``[link=...]`` in a job's output acts on the terminal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from narwhal.job import FINAL_STATUSES
from narwhal.text import (
    NARWHAL_MARK,
    STEP_MARK,
    log_text_line,
    looks_like_narwhal,
    printable,
    started_step,
    terminal_safe,
)

FINAL = frozenset(s.value for s in FINAL_STATUSES)
STATUS_STYLES = {
    "passed": "green",
    "failed": "red",
    "error": "magenta",
    "cancelled": "dim",
    "running": "yellow",
    "queued": "blue",
    "pending": "dim",
    "skipped": "dim",
    "failed_allowed": "yellow",  # a step that failed with allow_failure: the job could still pass
}
HEALTH_STYLES = {"healthy": "green", "unhealthy": "red", "unknown": "yellow"}
NONE = "-"
NARWHAL_STYLE = "dim cyan"  # narwhal's own log lines; a step line never gets it
NARWHAL_SGR = "\x1b[0;2;36m"  # the same for a raw terminal write, after a reset of the step's colour
RESET = "\x1b[0m"
HEADER_SGR = "\x1b[0;1;36m"
STAMP_SGR = "\x1b[0;2m"  # a log line's time in `narwhal logs -t`: dim  # a step's header in `narwhal logs`: bold cyan, after a reset


# --- small formatters ----------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """Human durations: ``0.4s``, ``12.3s``, ``3m04s``, ``2h05m``; ``-`` for None."""
    if seconds is None:
        return NONE
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return NONE
    if not math.isfinite(seconds):  # NaN or infinite: nothing to say (int() of it would raise)
        return NONE
    if seconds < 0:
        seconds = 0.0
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def percent(value: float | None) -> str:
    """``97%`` (percentages arrive as 0-100); ``-`` while nothing has finished."""
    if value is None:
        return NONE
    try:
        value = float(value)
    except (TypeError, ValueError):
        return NONE
    return f"{value:.0f}%" if value == int(value) or value >= 10 else f"{value:.1f}%"


def ago(timestamp: float | None, now: float | None = None) -> str:
    """How long ago an epoch timestamp was: ``4s ago``; ``never`` for None."""
    if timestamp is None:
        return "never"
    try:
        delta = (time.time() if now is None else now) - float(timestamp)
    except (TypeError, ValueError):
        return NONE
    return f"{duration(max(delta, 0.0))} ago"


def elapsed(item: dict, now: float | None = None) -> float | None:
    """A job's or step's duration; while running, the time since it started."""
    took = item.get("duration")
    if took is None and item.get("status") == "running" and item.get("started_at") is not None:
        try:
            took = (time.time() if now is None else now) - float(item["started_at"])
        except (TypeError, ValueError):
            return None
    return took


def short_commit(commit: str | None) -> str:
    return (commit or NONE)[:10]


def status_text(status: str | None) -> Text:
    """A job or step status, in its colour."""
    status = printable(status or "unknown")
    return Text(status, style=STATUS_STYLES.get(status, ""))


def _str(value: Any) -> str:
    """A field as one inert line (job-controlled text cannot act on the terminal)."""
    return NONE if value is None or value == "" else printable(value)


def _text(value: Any, style: str = "") -> Text:
    """Cell text; a Text, never a str, so '[' in user data is not read as rich markup."""
    return Text(_str(value), style=style)


def _table(title: str, plain: bool, **kw: Any) -> Table:
    if plain:
        return Table(title=title, box=None, title_justify="left", title_style="bold",
                     header_style="bold", pad_edge=False, **kw)
    return Table(title=title, box=box.ROUNDED, title_justify="left", title_style="bold",
                 header_style="bold cyan", **kw)


# --- tables --------------------------------------------------------------------------------


def stats_table(stats: dict | None, *, plain: bool = False) -> Table:
    """Per repository: jobs, passed/failed, % passed, median and p95 duration (``/stats``)."""
    table = _table("Repositories", plain)
    for name, justify in (("repository", "left"), ("jobs", "right"), ("passed", "right"),
                          ("failed", "right"), ("error", "right"), ("queued", "right"),
                          ("running", "right"), ("% passed", "right"), ("median", "right"),
                          ("p95", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    repos = (stats or {}).get("repos") or []
    for r in repos:
        d = r.get("duration") or {}
        table.add_row(
            _text(r.get("repo")), _text(r.get("total")),
            _text(r.get("passed"), "green" if r.get("passed") else ""),
            _text(r.get("failed"), "red" if r.get("failed") else ""),
            _text(r.get("error"), "magenta" if r.get("error") else ""),
            _text(r.get("queued")), _text(r.get("running")),
            _pct_text(r.get("pct_passed")), Text(duration(d.get("median"))), Text(duration(d.get("p95"))),
        )
    if not repos:
        table.add_row(Text("no jobs yet", style="dim"), *[""] * 9)
    return table


def _pct_text(value: float | None) -> Text:
    style = ""
    if value is not None:
        style = "green" if value >= 90 else "yellow" if value >= 50 else "red"
    return Text(percent(value), style=style)


def runners_table(runners: Iterable[dict] | None, *, now: float | None = None, plain: bool = False) -> Table:
    """Runners: health, labels, running/capacity, last check, and why when unhealthy (``/runner``)."""
    table = _table("Runners", plain)
    for name in ("runner", "health", "transport", "host", "labels", "running", "last check", "reason"):
        table.add_column(name, justify="right" if name == "running" else "left")
    rows = list(runners or [])
    for r in rows:
        health = r.get("health") or {}
        if isinstance(health, str):  # /stats runners carry the state only
            health = {"state": health}
        state = printable(health.get("state") or "unknown")
        state_text = Text(state, style=HEALTH_STYLES.get(state, ""))
        if r.get("draining"):
            state_text.append(" draining", style="yellow")
        reasons = []
        if state != "healthy" and health.get("reason"):
            reasons.append(str(health["reason"]))
        if r.get("drain_reason"):
            reasons.append(str(r["drain_reason"]))
        host = r.get("host")
        if host and r.get("transport") != "local" and r.get("port") not in (None, 22):
            host = f"{host}:{r['port']}"
        table.add_row(
            _text(r.get("name")), state_text, _text(r.get("transport")),
            _text(host if r.get("transport") != "local" else "localhost"),
            _text(", ".join(str(x) for x in r.get("labels") or [])),
            Text(f"{_str(r.get('used', r.get('running')))}/{_str(r.get('capacity'))}"),
            Text(ago(health.get("checked_at"), now)), _text("; ".join(reasons)),
        )
    if not rows:
        table.add_row(Text("no runners", style="dim"), *[""] * 7)
    return table


def forges_table(forges: Iterable[dict] | None, *, now: float | None = None, plain: bool = False) -> Table:
    """Forges and their commit statuses (``/forges``): pending, delivered, failed (red), the last
    delivery and the last error (red while it is newer than the last delivery)."""
    table = _table("Forges", plain)
    for name in ("forge", "kind", "url", "pending", "delivered", "failed", "last delivery", "last error"):
        table.add_column(name, justify="right" if name in ("pending", "delivered", "failed") else "left",
                         overflow="fold" if name in ("url", "last error") else "ellipsis")
    rows = list(forges or [])
    for f in rows:
        failed = f.get("failed") or 0
        kind = _text(f.get("kind")) if f.get("kind") else Text("not configured", style="red")
        if f.get("kind") and not f.get("sends_statuses"):
            kind.append(" (no token)", style="dim")
        error, error_at, delivered_at = f.get("last_error"), f.get("last_error_at"), f.get("last_delivered_at")
        error_text = Text()
        if error:
            recovered = _number(delivered_at) > _number(error_at)
            error_text = Text(printable(error), style="dim" if recovered else "red")
            error_text.append(f" ({ago(error_at, now)})", style="dim")
        table.add_row(
            _text(f.get("name")), kind, _text(f.get("url")),
            Text(_str(f.get("pending")), style="yellow" if f.get("pending") else ""),
            _text(f.get("delivered")),
            Text(_str(failed), style="bold red" if failed else ""),
            Text(ago(delivered_at, now)), error_text if error else Text(NONE),
        )
    if not rows:
        table.add_row(Text("no forges", style="dim"), *[""] * 7)
    return table


def nodes_table(nodes: dict | None, *, now: float | None = None, plain: bool = False) -> Table:
    """The dispatchers on the store (``/nodes``): the one that answered marked ``*``, alive ones
    first; shown when more than one is alive."""
    data = nodes if isinstance(nodes, dict) else {}
    table = _table("Dispatchers", plain)
    for name in ("node", "host", "pid", "running", "started", "last beat", "state", "config"):
        table.add_column(name, justify="right" if name in ("pid", "running") else "left")
    rows = sorted(_node_rows(data), key=lambda n: (not n.get("alive"), str(n.get("id"))))
    mine = next((n.get("config") for n in rows if n.get("id") == data.get("self")), None)
    for n in rows:
        node_id = str(n.get("id") or "")
        label = node_id[-8:] + (" *" if node_id == data.get("self") else "")
        state = (Text("alive", style="green") if n.get("alive")
                 else Text("stopped" if n.get("stopped_at") else "silent", style="dim" if n.get("stopped_at") else "red"))
        config = n.get("config")
        # another config than the answering node's (pipelines or runners): red while it runs
        differs = bool(n.get("alive")) and mine is not None and config is not None and config != mine
        table.add_row(_text(label), _text(n.get("host")), _text(n.get("pid")), _text(n.get("running")),
                      Text(ago(n.get("started_at"), now)), Text(ago(n.get("heartbeat_at"), now)), state,
                      _text(str(config)[:8] if config is not None else None, "red" if differs else ""))
    if not rows:
        table.add_row(Text("no dispatchers known", style="dim"), *[""] * 7)
    return table


def _node_rows(nodes: Any) -> list[dict]:
    """The node entries of a ``/nodes`` answer; whatever else it holds (a dispatcher of another
    version, a proxy's page) is left out rather than taking the report down."""
    rows = nodes.get("nodes") if isinstance(nodes, dict) else None
    return [n for n in rows if isinstance(n, dict)] if isinstance(rows, list) else []


def alive_nodes(nodes: dict | None) -> int:
    return sum(1 for n in _node_rows(nodes) if n.get("alive") is True)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("-inf")


def jobs_table(jobs: Iterable[dict] | None, *, title: str = "Recent jobs", now: float | None = None,
               plain: bool = False) -> Table:
    """Jobs: status in colour, pipeline, commit, branch, runner, duration, reason (``/jobs``).

    A running job shows its time so far."""
    table = _table(title, plain)
    for name in ("id", "status", "pipeline", "repository", "commit", "branch", "event", "runner", "duration",
                 "reason"):
        table.add_column(name, justify="right" if name in ("id", "duration") else "left",
                         overflow="fold" if name in ("repository", "reason") else "ellipsis")
    rows = list(jobs or [])
    for j in rows:
        table.add_row(
            _text(j.get("id")), status_text(j.get("status")), _text(j.get("pipeline")),
            _text(j.get("repo")), Text(short_commit(j.get("commit"))), _text(j.get("branch")),
            _text(event_text(j)), _text(j.get("runner")), Text(duration(elapsed(j, now))), _text(j.get("reason")),
        )
    if not rows:
        table.add_row("", Text("no jobs", style="dim"), *[""] * 8)
    return table


def artifacts_table(job_id: object, artifacts: Iterable[dict] | None, *, plain: bool = False) -> Table:
    """A job's artifacts (``/jobs/ID/artifacts``): path, size, sha256 (short), when it expires."""
    table = _table(f"Artifacts of job {_str(job_id)}", plain)
    for name in ("path", "size", "sha256", "expires"):
        table.add_column(name, justify="right" if name == "size" else "left",
                         overflow="fold" if name == "path" else "ellipsis")
    rows = list(artifacts or [])
    for a in rows:
        expires = _text(a.get("expires"))
        if a.get("expired"):
            expires = Text(f"expired {a.get('expires')}", style="dim")
        table.add_row(_text(a.get("path")), Text(size_text(a.get("size"))),
                      Text(str(a.get("sha256") or "")[:12]), expires)
    if not rows:
        table.add_row(Text("no artifacts", style="dim"), "", "", "")
    return table


def size_text(value: object) -> str:
    """Bytes for people: ``12.3 MB``."""
    if not isinstance(value, int) or isinstance(value, bool):
        return "?"
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if value >= factor:
            return f"{value / factor:.1f} {unit}"
    return f"{value} B"


def event_text(job: dict) -> str:
    """What started a job, shortly: ``push``, ``pr #7``, ``tag v1.0``, ``cron``, ``api``."""
    event = job.get("event") or "api"
    if event == "pull_request":
        return f"pr #{job.get('pr')}" if job.get("pr") is not None else "pr"
    if event == "tag" and isinstance(job.get("ref"), str):
        return f"tag {job['ref'].removeprefix('refs/tags/')}"
    return str(event)


def queue_table(jobs_with_waiting: Iterable[dict] | None, *, now: float | None = None,
                plain: bool = False) -> Table:
    """What waits and why: queued jobs (``/jobs/ID`` with ``waiting``) and each runner's reason."""
    table = _table("Queue", plain)
    for name in ("id", "pipeline", "repository", "commit", "queued for", "why it waits"):
        table.add_column(name, justify="right" if name == "id" else "left",
                         overflow="fold" if name in ("repository", "why it waits") else "ellipsis")
    rows = list(jobs_with_waiting or [])
    for j in rows:
        created = j.get("created_at")
        waited = ago(created, now).removesuffix(" ago") if created else NONE
        table.add_row(_text(j.get("id")), _text(j.get("pipeline")), _text(j.get("repo")),
                      Text(short_commit(j.get("commit"))), Text(waited), Text(waiting_text(j.get("waiting"))))
    if not rows:
        table.add_row("", Text("nothing waits", style="dim"), *[""] * 4)
    return table


def waiting_text(waiting: Iterable[dict] | None) -> str:
    """``runner-1: at capacity (1/1); runner-2: unhealthy`` from a job's ``waiting`` list."""
    parts = []
    for w in waiting or []:
        runner, reason = w.get("runner"), w.get("reason") or "?"
        parts.append(printable(f"{runner}: {reason}" if runner else reason))
    return "; ".join(parts) or NONE


def steps_table(steps: Iterable[dict] | None, *, now: float | None = None, plain: bool = False) -> Table:
    """A job's steps; a running step shows its time so far."""
    table = Table(box=None if plain else box.SIMPLE, show_edge=False, pad_edge=False,
                  header_style="bold")
    table.add_column("step")
    table.add_column("status")
    table.add_column("exit", justify="right")
    table.add_column("time", justify="right")
    rows = list(steps or [])
    why = any(s.get("reason") for s in rows)
    if why:
        table.add_column("why")
    for s in rows:
        cells = [_text(s.get("name")), status_text(s.get("status")), _text(s.get("exit_code")),
                 Text(duration(elapsed(s, now)))]
        if why:
            cells.append(Text(printable(s["reason"]), style="dim") if s.get("reason") else Text(""))
        table.add_row(*cells)
    return table


def job_panel(job: dict, *, now: float | None = None, plain: bool = False) -> RenderableType:
    """One job: what it is, where it ran, how it went, and its steps."""
    status = job.get("status")
    head = Text()
    head.append(f"job {_str(job.get('id'))} ", style="bold")
    head.append_text(status_text(status))
    if job.get("reason"):
        head.append(f"  ({printable(job['reason'])})")
    took = elapsed(job, now)
    details = Table.grid(padding=(0, 2))
    details.add_column(style="bold")
    details.add_column()
    for label, value in (
        ("pipeline", job.get("pipeline")), ("repository", job.get("repo")), ("commit", job.get("commit")),
        ("branch", job.get("branch")), ("event", event_text(job)), ("author", job.get("author")),
        ("subject", job.get("subject")), ("source", job.get("source_repo")),
        ("runner", job.get("runner")), ("attempt", job.get("attempt")), ("duration", duration(took)),
    ):
        if value is not None or label in ("branch", "runner"):
            details.add_row(label, _text(value))
    parts: list[RenderableType] = [head, details]
    if job.get("steps"):
        parts.append(steps_table(job["steps"], now=now, plain=plain))
    if job.get("waiting"):
        parts.append(Text("waiting: " + waiting_text(job["waiting"]), style="blue"))
    body = Group(*parts)
    if plain:
        return body
    return Panel(body, border_style=STATUS_STYLES.get(status or "", "white"), box=box.ROUNDED, expand=False)


# --- narwhal report: the whole picture, most important first ----------------------------------

WIDE = 120  # columns from which the report shows its wide tables
SECTION_MIN = 3  # a section shown at all: its title, its header and one row


def short_names(repos: Iterable[str | None]) -> dict[str, str]:
    """Each repository by the shortest ending of its path that tells it from the others shown:
    ``/tmp/pytest-7/test_a0/repo`` is ``repo``, ``https://git.example.com/team/app.git`` is
    ``app`` (or ``team/app`` beside another ``app``). The full name is in ``--json``."""
    def parts(repo: str) -> list[str]:
        rest = repo.split("://", 1)[1] if "://" in repo else repo
        host, _, path = rest.partition("/") if "://" in repo else ("", "", rest)
        segments = [s for s in path.split("/") if s]
        if segments:
            segments[-1] = segments[-1].removesuffix(".git") or segments[-1]
        return ([host] if host else []) + segments or [repo]

    known = sorted({r for r in repos if r})
    split = {r: parts(r) for r in known}
    depth = {r: 1 for r in known}
    while True:
        shown: dict[str, list[str]] = {}
        for r in known:
            shown.setdefault("/".join(split[r][-depth[r]:]), []).append(r)
        clashes = [rs for rs in shown.values() if len(rs) > 1]
        grown = False
        for rs in clashes:
            for r in rs:
                if depth[r] < len(split[r]):
                    depth[r] += 1
                    grown = True
        if not clashes or not grown:
            return {r: printable("/".join(split[r][-depth[r]:])) if depth[r] < len(split[r]) or "://" not in r
                    else printable(r) for r in known}


def when(timestamp: Any, now: float | None = None) -> str:
    """How long ago, shortly: ``12s``, ``4m``, ``3h``, ``2d``; ``-`` when unknown."""
    try:
        delta = max(0.0, (time.time() if now is None else now) - float(timestamp))
    except (TypeError, ValueError):
        return NONE
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{int(delta // size)}{unit}"
    return f"{int(delta)}s"


def job_time(job: dict) -> Any:
    """When a job last moved: its end, else its start, else when it was queued."""
    return job.get("finished_at") or job.get("started_at") or job.get("created_at")


def now_text(job: dict, now: float | None = None) -> Text:
    """What a job is doing or why it ended: ``step test 1m03s``, the reason, ``in 12.0s``."""
    status = job.get("status")
    if status == "running":
        step = next((s for s in job.get("steps") or [] if s.get("status") == "running"), None)
        if step is None:
            return Text("starting", style="yellow")
        return Text(f"step {_str(step.get('name'))} {duration(elapsed(step, now))}", style="yellow")
    if status == "queued":
        return Text(waiting_text(job.get("waiting")) if job.get("waiting") else "waiting for a runner", style="blue")
    if job.get("reason"):
        return Text(printable(job["reason"]), style=STATUS_STYLES.get(str(status), ""))
    if status == "passed" and job.get("duration") is not None:
        return Text(f"in {duration(job.get('duration'))}", style="dim")
    return Text(NONE, style="dim")


def _section(title: str, plain: bool) -> Table:
    """A report table without box lines: a title, a header and one line per row."""
    return Table(title=title, box=None, title_justify="left", title_style="bold",
                 header_style="bold" if plain else "bold cyan", pad_edge=False, show_edge=False)


def _names_column(table: Table, header: str, values: Iterable[str], justify: str = "left") -> None:
    """A column whose values are never cut: its width is its longest value (up to 40)."""
    width = max([len(header), *(cell_len(v) for v in values)])
    table.add_column(header, no_wrap=True, min_width=min(width, 40), justify=justify)  # type: ignore[arg-type]


def _settled(table: Table) -> Table:
    """Every column but the flexible one (``ratio``) as wide as its widest cell (up to 40), so
    on a narrow terminal the flexible one gives way and no name or status is cut."""
    for column in table.columns:
        if column.ratio:  # measured by its words, shown on one line and cut with "…"
            column.no_wrap = False
            for cell in column.cells:
                if isinstance(cell, Text):
                    cell.no_wrap, cell.overflow = True, "ellipsis"
            continue
        widths = [cell_len(str(column.header))]
        widths += [cell.cell_len if isinstance(cell, Text) else cell_len(str(cell)) for cell in column.cells]
        column.min_width = min(max(widths), 40)
    return table


def _more(table: Table, hidden: int, where: str) -> RenderableType:
    """A table cut to fit, with a line under it saying how many rows did not, and where they are."""
    if hidden <= 0:
        return table
    return Group(table, Text(f"… {hidden} more ({where})", style="dim", no_wrap=True, overflow="ellipsis"))


def latest_table(latest: list[dict], names: dict[str, str], *, now: float | None = None, plain: bool = False,
                 wide: bool = False, rows: int | None = None) -> RenderableType:
    """Now: the newest job of each repository, branch and pipeline, with the running step or
    the reason, and how long ago it moved. One repository's rows stay together."""
    table = _section("Now: the latest job of each repository, branch and pipeline", plain)
    ordered = sorted(latest, key=lambda j: (names.get(j.get("repo") or "", ""), j.get("branch") or "",
                                             j.get("pipeline") or ""))
    _names_column(table, "repository", [names.get(j.get("repo") or "", NONE) for j in ordered])
    _names_column(table, "branch", [_str(j.get("branch")) for j in ordered])
    _names_column(table, "pipeline", [_str(j.get("pipeline")) for j in ordered])
    table.add_column("status", no_wrap=True)
    if wide:
        table.add_column("job", justify="right", no_wrap=True)
        table.add_column("commit", no_wrap=True)
    table.add_column("when", justify="right", no_wrap=True)
    table.add_column("now / why", no_wrap=True, overflow="ellipsis", ratio=1)
    shown = ordered if rows is None else ordered[:rows]
    previous = None
    for j in shown:
        repo = names.get(j.get("repo") or "", NONE)
        cells: list[Text] = [Text(repo if repo != previous else "", style="bold"), _text(j.get("branch")),
                             _text(j.get("pipeline")), status_text(j.get("status"))]
        previous = repo
        if wide:
            cells += [_text(j.get("id")), Text(short_commit(j.get("commit")), style="dim")]
        cells += [Text(when(job_time(j), now), style="dim"), now_text(j, now)]
        table.add_row(*cells)
    if not latest:
        table.add_row(Text("no jobs yet", style="dim"), *[""] * (len(table.columns) - 1))
    return _more(_settled(table), len(ordered) - len(shown), "a taller window, or narwhal jobs")


def compact_runners(runners: list[dict], *, now: float | None = None, plain: bool = False, wide: bool = False,
                    rows: int | None = None) -> RenderableType:
    """Runners for the report: health, jobs/capacity and, when not healthy, why."""
    table = _section("Runners", plain)
    _names_column(table, "runner", [_str(r.get("name")) for r in runners])
    table.add_column("health", no_wrap=True)
    table.add_column("jobs", justify="right", no_wrap=True)
    if wide:
        table.add_column("labels", no_wrap=True, overflow="ellipsis", max_width=30)
        table.add_column("checked", justify="right", no_wrap=True)
    table.add_column("why", no_wrap=True, overflow="ellipsis", ratio=1)
    shown = runners if rows is None else runners[:rows]
    for r in shown:
        health = r.get("health") or {}
        if isinstance(health, str):
            health = {"state": health}
        state = printable(health.get("state") or "unknown")
        state_text = Text(state, style=HEALTH_STYLES.get(state, ""))
        if r.get("draining"):
            state_text.append(" draining", style="yellow")
        why = [str(health["reason"])] if state != "healthy" and health.get("reason") else []
        why += [str(r["drain_reason"])] if r.get("drain_reason") else []
        cells = [_text(r.get("name")), state_text, Text(f"{_str(r.get('running'))}/{_str(r.get('capacity'))}")]
        if wide:
            cells += [_text(", ".join(str(x) for x in r.get("labels") or [])),
                      Text(when(health.get("checked_at"), now), style="dim")]
        cells.append(Text(printable("; ".join(why)) or "", style="red" if state != "healthy" else "yellow"))
        table.add_row(*cells)
    if not runners:
        table.add_row(Text("no runners", style="dim"), *[""] * (len(table.columns) - 1))
    return _more(_settled(table), len(runners) - len(shown), "narwhal runners")


def compact_queue(queue: list[dict], names: dict[str, str], *, now: float | None = None, plain: bool = False,
                  rows: int | None = None) -> RenderableType:
    """What waits and why; one dim line when nothing does."""
    if not queue:
        return Text.assemble(("Queue", "bold"), (": nothing waits", "dim"))
    table = _section("Queue", plain)
    table.add_column("job", justify="right", no_wrap=True)
    _names_column(table, "pipeline", [_str(j.get("pipeline")) for j in queue])
    _names_column(table, "repository", [names.get(j.get("repo") or "", NONE) for j in queue])
    table.add_column("waited", justify="right", no_wrap=True)
    table.add_column("why it waits", no_wrap=True, overflow="ellipsis", ratio=1)
    shown = queue if rows is None else queue[:rows]
    for j in shown:
        table.add_row(_text(j.get("id")), _text(j.get("pipeline")), Text(names.get(j.get("repo") or "", NONE)),
                      Text(when(j.get("created_at"), now), style="dim"), Text(waiting_text(j.get("waiting"))))
    return _more(_settled(table), len(queue) - len(shown), "narwhal jobs --status queued")


def compact_jobs(jobs: list[dict], names: dict[str, str], *, now: float | None = None, plain: bool = False,
                 wide: bool = False, rows: int | None = None) -> RenderableType:
    """Recent jobs, newest first."""
    table = _section("Recent jobs", plain)
    table.add_column("job", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    _names_column(table, "pipeline", [_str(j.get("pipeline")) for j in jobs])
    _names_column(table, "repository", [names.get(j.get("repo") or "", NONE) for j in jobs])
    _names_column(table, "branch", [_str(j.get("branch")) for j in jobs])
    if wide:
        table.add_column("commit", no_wrap=True)
        table.add_column("event", no_wrap=True)
        _names_column(table, "runner", [_str(j.get("runner")) for j in jobs])
        table.add_column("took", justify="right", no_wrap=True)
    table.add_column("when", justify="right", no_wrap=True)
    table.add_column("reason", no_wrap=True, overflow="ellipsis", ratio=1)
    shown = jobs if rows is None else jobs[:rows]
    for j in shown:
        cells = [_text(j.get("id")), status_text(j.get("status")), _text(j.get("pipeline")),
                 Text(names.get(j.get("repo") or "", NONE)), _text(j.get("branch"))]
        if wide:
            cells += [Text(short_commit(j.get("commit")), style="dim"), _text(event_text(j)), _text(j.get("runner")),
                      Text(duration(elapsed(j, now)))]
        cells += [Text(when(job_time(j), now), style="dim"), _text(j.get("reason"))]
        table.add_row(*cells)
    if not jobs:
        table.add_row("", Text("no jobs", style="dim"), *[""] * (len(table.columns) - 2))
    return _more(_settled(table), len(jobs) - len(shown), "narwhal jobs")


def compact_stats(stats: dict | None, names: dict[str, str], *, plain: bool = False, wide: bool = False,
                  rows: int | None = None) -> Table:
    """Per repository, over all its jobs: how many, how many passed, how long they take."""
    table = _section("Repositories: all jobs", plain)
    repos = (stats or {}).get("repos") or []
    _names_column(table, "repository", [names.get(r.get("repo") or "", NONE) for r in repos])
    for name in ("jobs", "passed", "failed", *(("error", "queued", "running") if wide else ()), "% passed",
                 "median", "p95"):
        table.add_column(name, justify="right", no_wrap=True)
    shown = repos if rows is None else repos[:rows]
    for r in shown:
        d = r.get("duration") or {}
        cells = [Text(names.get(r.get("repo") or "", NONE)), _text(r.get("total")),
                 _text(r.get("passed"), "green" if r.get("passed") else ""),
                 _text(r.get("failed"), "red" if r.get("failed") else "")]
        if wide:
            cells += [_text(r.get("error"), "magenta" if r.get("error") else ""), _text(r.get("queued")),
                      _text(r.get("running"))]
        cells += [_pct_text(r.get("pct_passed")), Text(duration(d.get("median"))), Text(duration(d.get("p95")))]
        table.add_row(*cells)
    if not repos:
        table.add_row(Text("no jobs yet", style="dim"), *[""] * (len(table.columns) - 1))
    return _settled(table)


def report_header(stats: dict | None, runners: list[dict], forges: Iterable[dict] | None, *,
                  updated_at: float | None, url: str | None, nodes: dict | None = None) -> Text:
    """``narwhal · updated 14:03:05 · queue: 2 · runners: 3/4 healthy · http://...`` (one line)."""
    line = Text(no_wrap=True, overflow="ellipsis", end="\n")
    line.append("narwhal", style="bold")
    if updated_at is not None:
        line.append(f" · updated {time.strftime('%H:%M:%S', time.localtime(updated_at))}")
    length = ((stats or {}).get("queue") or {}).get("length")
    if length is not None:
        line.append(f" · queue: {length}", style="blue" if length else "")
    healthy = sum(1 for r in runners if _health_state(r) == "healthy")
    if runners:
        line.append(f" · runners: {healthy}/{len(runners)} healthy", style="" if healthy == len(runners) else "red")
    if alive_nodes(nodes) > 1:
        line.append(f" · dispatchers: {alive_nodes(nodes)}")
    failed = sum(int(f.get("failed") or 0) for f in forges or [])
    if failed:
        line.append(f" · commit statuses failed: {failed}", style="bold red")
    if url:
        line.append(f" · {printable(url)}", style="dim")
    return line


def _health_state(runner: dict) -> str:
    health = runner.get("health")
    return str(health.get("state") if isinstance(health, dict) else health or "unknown")


def report(stats: dict | None, runners: Iterable[dict] | None, jobs: Iterable[dict] | None,
           queue: Iterable[dict] | None, *, forges: Iterable[dict] | None = None,
           latest: Iterable[dict] | None = None, now: float | None = None, plain: bool = False,
           width: int | None = None, height: int | None = None, updated_at: float | None = None,
           url: str | None = None, nodes: dict | None = None) -> Group:
    """``narwhal report``, most important first: what is green and red now (the latest job of
    each repository, branch and pipeline), the runners, what waits, the forges, recent jobs,
    and totals per repository.

    ``width`` picks narrow (under ``WIDE`` columns) or wide tables; with ``height`` (``--watch``)
    the sections share the screen in that order: a section that does not fit whole shows what
    fits and says how many more, and those after it are left out."""
    runners_, jobs_, queue_ = list(runners or []), list(jobs or []), list(queue or [])
    latest_, forges_ = list(latest or []), list(forges or [])
    repos = [j.get("repo") for j in latest_ + jobs_ + queue_] + [r.get("repo") for r in (stats or {}).get("repos") or []]
    names = short_names(r for r in repos if r)
    wide = width is None or width >= WIDE

    sections: list[tuple[int, Any]] = [  # (rows it has, build(rows) -> renderable)
        (len(latest_) or 1, lambda n: latest_table(latest_, names, now=now, plain=plain, wide=wide, rows=n)),
        (len(runners_) or 1, lambda n: compact_runners(runners_, now=now, plain=plain, wide=wide, rows=n)),
        (len(queue_), lambda n: compact_queue(queue_, names, now=now, plain=plain, rows=n)),
    ]
    if forges_:
        sections.append((len(forges_), lambda n: forges_table(forges_[:n] if n is not None else forges_, now=now,
                                                              plain=True)))
    if alive_nodes(nodes) > 1:  # several dispatchers on one store
        sections.append((len(_node_rows(nodes)), lambda n: nodes_table(nodes, now=now, plain=plain)))
    sections += [
        (len(jobs_) or 1, lambda n: compact_jobs(jobs_, names, now=now, plain=plain, wide=wide, rows=n)),
        (len((stats or {}).get("repos") or []) or 1,
         lambda n: compact_stats(stats, names, plain=plain, wide=wide, rows=n)),
    ]
    parts: list[RenderableType] = [report_header(stats, runners_, forges_, updated_at=updated_at, url=url,
                                                 nodes=nodes)]
    left = None if height is None else height - 2  # the header, and a last line the terminal keeps free
    for rows, build in sections:
        need = 1 + (2 + rows if rows else 1)  # a blank line, the title and header, the rows (an empty queue: 1)
        if left is None or need <= left:
            parts += [Text(""), build(None)]
            left = None if left is None else left - need
            continue
        fit = left - 1 - 3  # the blank line, title, header and "… more"
        if fit >= 1:
            parts += [Text(""), build(fit)]
        break
    return Group(*parts)


def report_view(data: dict, *, plain: bool = False, width: int | None = None, height: int | None = None,
                now: float | None = None) -> Group:
    """``report`` from the one dict ``narwhal report --json`` prints."""
    return report(data.get("stats"), data.get("runners"), data.get("jobs"), data.get("queue"),
                  forges=data.get("forges"), latest=data.get("latest"), plain=plain, width=width, height=height,
                  updated_at=data.get("updated_at"), url=data.get("url"), now=now, nodes=data.get("nodes"))


# --- narwhal check ---------------------------------------------------------------------------


def check_runners(summary: dict) -> Table:
    """The runners of a config summary."""
    runners = Table(title="runners", title_justify="left")
    for column in ("name", "transport", "host", "labels", "capacity"):
        runners.add_column(column)
    for r in summary["runners"]:
        host = "-" if r["transport"] == "local" else r["host"]
        runners.add_row(*map(escape, (r["name"], r["transport"], host, ", ".join(r["labels"]), str(r["capacity"]))))
    return runners


def check_pipelines(summary: dict) -> Table:
    """The pipelines of a config summary, with the runners that can take each."""
    pipelines = Table(title="pipelines", title_justify="left")
    for column in ("name", "repo", "branches", "steps", "services", "runners"):
        pipelines.add_column(column)
    for p in summary["pipelines"]:
        pipelines.add_row(
            escape(p["name"]),
            escape(", ".join(p["repo"])),
            escape(", ".join(p["branches"])) if p["branches"] is not None else "(all)",
            escape(steps_text(p)),
            escape(", ".join(s["name"] for s in p.get("services") or [])) or "-",
            escape(", ".join(p["runners"])) or "[yellow](none)[/]",
        )
    return pipelines


def steps_text(pipeline: dict) -> str:
    """A config summary's steps in one cell: ``a, b`` in order, or with a graph ``lint; test; report
    (after lint, test)``, then how many may run at once, and each step's policy and conditions."""
    parts = []
    for step in pipeline.get("step_details") or [{"name": n} for n in pipeline["steps"]]:
        notes = []
        if step.get("depends_on"):
            notes.append("after " + ", ".join(step["depends_on"]))
        if step.get("when"):
            notes.append("when " + ", ".join(f"{k}: {'/'.join(v)}" for k, v in step["when"].items()))
        if step.get("allow_failure"):
            notes.append("may fail")
        if step.get("retry"):
            notes.append(f"retry {step['retry']}")
        parts.append(step["name"] + (f" ({'; '.join(notes)})" if notes else ""))
    text = ("; " if pipeline.get("graph") else ", ").join(parts)
    if pipeline.get("graph"):
        text += f" [up to {pipeline.get('width', 1)} at once]"
    return text


def secrets_table(secrets: Iterable[dict] | None, *, plain: bool = False) -> Table:
    """Secrets (``/secrets`` or a config summary): name, source, scope and users; no values exist here."""
    table = _table("Secrets", plain)
    for name in ("secret", "source", "repos", "branches", "events", "pipelines", "used by narwhal"):
        table.add_column(name)
    rows = list(secrets or [])

    def listed(value: Any) -> Text:
        return _text(", ".join(str(v) for v in value)) if value is not None else Text("(any)", style="dim")

    for s in rows:
        table.add_row(_text(s.get("name")), _text(s.get("source")), listed(s.get("repos")),
                      listed(s.get("branches")), listed(s.get("events")),
                      listed(s.get("pipelines") or []) if s.get("pipelines") else Text("(none)", style="dim"),
                      _text("; ".join(s.get("used_by") or [])))
    if not rows:
        table.add_row(Text("no secrets", style="dim"), *[""] * 6)
    return table


def check_warning(warning: str) -> Text:
    """One config warning (soft-wrapped)."""
    return Text.assemble(("warning:", "yellow"), " ", warning)


def reloaded_line(answer: dict) -> Text:
    """What ``narwhal reload`` loaded: ``configuration reloaded: 2 runners (a, b), 1 pipeline (ci)``."""
    def counted(key: str, noun: str) -> str:
        names = [printable(n) for n in answer.get(key) or []]
        return f"{len(names)} {noun}{'s' * (len(names) != 1)}" + (f" ({', '.join(names)})" if names else "")
    return Text(f"configuration reloaded: {counted('runners', 'runner')}, {counted('pipelines', 'pipeline')}")


def check_footer(summary: dict) -> Text:
    n_runners, n_pipelines = len(summary["runners"]), len(summary["pipelines"])
    return Text(f"config ok: {n_runners} runner{'s' * (n_runners != 1)}, "
                f"{n_pipelines} pipeline{'s' * (n_pipelines != 1)}")


# --- jobs as they change (submit --wait, demo) ---------------------------------------------


def submitted_line(job: dict, repo: str, commit: str, branch: str | None = None) -> Text:
    """``job 7 ci /src/app 0123456789 on main: queued`` for each job of a submission; one an
    earlier submission made says so: ``... failed (submitted before; narwhal retry 3 runs it again)``."""
    line = Text(f"job {_str(job['id'])} ")
    line.append(printable(job.get("pipeline")), style="bold")
    on = f" on {printable(branch)}" if branch else " (no branch)"
    line.append(f" {printable(repo)} {printable(commit[:10])}{on}: ")
    line.append_text(status_text(job.get("status")))
    if job.get("status") in ("error", "skipped") and job.get("reason"):
        line.append(f" ({printable(job['reason'])})")
    if job.get("created", True) is False:
        if job.get("status") in FINAL:
            line.append(f" (submitted before; narwhal retry {_str(job['id'])} runs it again)", style="dim")
        else:
            line.append(" (submitted before; still under way)", style="dim")
    return line


def nothing_new_line(jobs: list[dict]) -> Text:
    """``--wait`` when every job of the commit had ended before this submission."""
    ids = " ".join(_str(j.get("id")) for j in jobs)
    return Text(f"nothing new to run: this commit's jobs ({ids}) had ended already; "
                "narwhal retry ID runs one again")


def resolving_line(answer: dict) -> Text:
    """A submission whose commit is still being fetched: the jobs come when it is there."""
    return Text(f"{printable(answer.get('detail') or 'fetching the repository')} "
                "(submit again in a moment to see the jobs)")


def result_line(job: dict) -> Text:
    """``job 7 ci failed in 1m05s: exit 1 in step build``."""
    line = Text(f"job {_str(job.get('id'))} ")
    line.append(printable(job.get("pipeline")), style="bold")
    line.append(" ")
    line.append_text(status_text(job.get("status")))
    if job.get("duration") is not None:
        line.append(f" in {duration(job.get('duration'))}")
    if job.get("reason"):
        line.append(f": {printable(job['reason'])}")
    return line


def continues_line(job: dict) -> Text:
    """Ctrl-C while following: ``job 20 continues: narwhal logs 20 -f``."""
    return Text(f"job {_str(job.get('id'))} continues: narwhal logs {_str(job.get('id'))} -f")


def already_finished_line(job: dict) -> Text:
    """``narwhal cancel`` of a job that had ended: nothing changed."""
    line = Text(f"job {_str(job.get('id'))} ")
    line.append(printable(job.get("pipeline")), style="bold")
    line.append(" had already finished: ")
    line.append_text(status_text(job.get("status")))
    if job.get("reason"):
        line.append(f" ({printable(job['reason'])})")
    line.append("; nothing to cancel", style="dim")
    return line


def changed_job_line(job: dict) -> Text:
    """What cancel or retry did: the result line, plus the attempt when a retry queued one."""
    line = result_line(job)
    if job.get("attempt", 1) > 1 and job.get("status") == "queued":
        line.append(f" (attempt {_str(job['attempt'])})")
    return line


class JobEvents:
    """For pipes: one line each time a job or step is seen to change (soft-wrapped)."""

    def __init__(self) -> None:
        self.seen: dict[tuple, str | None] = {}

    def changes(self, job: dict) -> list[Text]:
        """The lines for what changed in ``job`` since the last call with it."""
        out: list[Text] = []
        who = f"job {_str(job.get('id'))} {_str(job.get('pipeline'))}"
        status = job.get("status")
        if status == "running" and self.seen.get(("job", job.get("id"))) != "running":
            out.append(Text(f"{who}: running on {_str(job.get('runner'))}"))
        self.seen[("job", job.get("id"))] = status
        for step in job.get("steps") or []:
            key = ("step", job.get("id"), step.get("idx"), step.get("name"))
            old, new = self.seen.get(key), step.get("status")
            if new == old:
                continue
            self.seen[key] = new
            name = _str(step.get("name"))
            if new == "running":
                out.append(Text(f"{who}: step {name} started"))
            elif new not in (None, "pending"):
                exit_code = step.get("exit_code")
                tail = f" (exit {exit_code})" if exit_code is not None else ""
                if new == "skipped" and step.get("reason"):
                    tail = f": {_str(step['reason'])}"
                out.append(Text(f"{who}: step {name} {_str(new)} in {duration(step.get('duration'))}{tail}"))
        return out


class LiveJobs:
    """The jobs being followed, as panels; rendered afresh on each refresh so running times tick."""

    def __init__(self, jobs: dict[int, dict], ids: list[int], *, plain: bool = False):
        self.jobs, self.ids, self.plain = jobs, ids, plain

    def __rich__(self) -> Group:
        return Group(*(job_panel(self.jobs[i], plain=self.plain) for i in self.ids))


def log_tail(job_id: int, text: str, lines: int = 15) -> tuple[Text, list[Text]] | None:
    """A heading and the last ``lines`` lines of a log (soft-wrapped); None for an empty log.

    ``text`` is the log's plain-text form, narwhal's lines marked ``[narwhal] ``."""
    text = text.rstrip("\n")
    tail = text.split("\n")[-lines:] if text else []  # only "\n" ends a log line (not a bare \r)
    if not tail:
        return None
    heading = Text(f"last {len(tail)} log lines of job {job_id} (narwhal logs {job_id} for all):", style="dim")
    out = []
    for text, kind in log_text_entries("\n".join(tail)):
        step = started_step(text) if kind == "narwhal" else None
        if step is not None:
            out.append(Text("  " + step_header(step), style="bold cyan", end=""))
        elif kind == "narwhal":
            out.append(Text("  " + NARWHAL_MARK + printable(text), style=NARWHAL_STYLE, end=""))
        else:
            out.append(log_line("  " + log_text_line(text, kind)))
    return heading, out


def log_line(line: str) -> Text:
    """One log line for rich: its colour kept as styles, every other control made inert."""
    return Text.from_ansi(terminal_safe(line), end="")


def log_text_entries(text: str) -> list[tuple[str, str]]:
    """(text, kind) per line of a log's plain-text form (``GET /jobs/ID/log``).

    The dispatcher marks every step line that would read as narwhal's with ``[step] ``,
    so a line starting ``[narwhal] `` there is narwhal's own."""
    text = text[:-1] if text.endswith("\n") else text
    if not text:
        return []
    return [(line[len(NARWHAL_MARK):], "narwhal") if line.startswith(NARWHAL_MARK) else (line, "step")
            for line in text.split("\n")]


def step_header(name: str) -> str:
    """``[narwhal] ── step build ──``: where a step's output begins (narwhal's ``step build
    started``). It starts as narwhal's lines do, so no step line can pass for one: a step
    line that would read ``[narwhal]`` is shown ``[step] ...``."""
    return f"{NARWHAL_MARK}── step {printable(name)} ──"


def log_entry(text: str, kind: str, *, style: bool) -> str:
    """One log line for a terminal write (``narwhal logs``), without its newline.

    narwhal's own line reads ``[narwhal] TEXT`` (dim cyan when ``style``), and the one that
    says a step started is that step's header, ``[narwhal] ── step NAME ──`` (bold); a step line
    is its own text, inert but for colour, and ``[step] ``-marked (after a colour reset
    when ``style``) if it would read as narwhal's: no step line can take narwhal's look."""
    if kind == "narwhal":
        step = started_step(text)
        if step is not None:
            header = step_header(step)
            return f"{HEADER_SGR}{header}{RESET}" if style else header
        line = NARWHAL_MARK + printable(text)
        return f"{NARWHAL_SGR}{line}{RESET}" if style else line
    if looks_like_narwhal(text):
        return (RESET if style else "") + STEP_MARK + terminal_safe(text)
    return terminal_safe(text)


def log_stamp(at: float | None) -> str:
    """A log line's time, local, to the millisecond: ``14:03:05.250``; blanks when unknown."""
    if at is None:
        return "--:--:--.---"
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def log_end_line(job_id: int, end: dict) -> str:
    """The line ``narwhal logs -f`` ends with: how the job ended."""
    reason = f" ({printable(end['reason'])})" if end.get("reason") else ""
    return f"narwhal: job {job_id} {_str(end.get('status'))}{reason}"


def removed_line(name: str) -> Text:
    return Text(f"runner {printable(name)} removed")
