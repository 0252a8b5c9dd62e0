"""Templates and the small pieces they show: ages, durations, statuses, the chart, the badge.

Jinja2 with autoescaping on for every template (``.html`` and ``.svg``): a job-controlled
string (branch, subject, step name, reason, log text) reaches the page only escaped.
Nothing here marks a string safe.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2

from narwhal.job import Job, JobStatus
from narwhal.web import ansi, timeline

PREFIX = "/ui"
STATIC = f"{PREFIX}/static"

# What each status looks like besides its colour: a symbol and a word (colour is never the only signal).
SYMBOLS = {"queued": "○", "running": "◐", "passed": "✓", "failed": "✗", "error": "!", "cancelled": "⊘",
           "skipped": "–", "pending": "·", "unknown": "?", "healthy": "✓", "unhealthy": "✗"}


def _files(folder: str) -> dict[str, bytes]:
    root = resources.files("narwhal.web").joinpath(folder)
    return {item.name: item.read_bytes() for item in root.iterdir() if item.is_file()}


STATIC_FILES = _files("static")
# Changes with the assets, so browsers may cache them for a long time (?v=...).
ASSET_VERSION = hashlib.sha256(b"".join(STATIC_FILES[k] for k in sorted(STATIC_FILES))).hexdigest()[:12]


def age(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "–"
    seconds = max(0.0, (now if now is not None else time.time()) - ts)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h ago"
    return f"{seconds // 86400:.0f} d ago"


def filesize(n: int | None) -> str:
    """Bytes for people: ``12.3 MB``."""
    if n is None:
        return "–"
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def offset(seconds: float | None) -> str:
    """A step's start after the job's: ``+0.0s``, ``+1m 05s``."""
    return "–" if seconds is None else "+" + duration(seconds)


def running_for(job: Job, now: float | None = None) -> float | None:
    if job.started_at is None:
        return None
    end = job.finished_at if job.finished_at is not None else (now if now is not None else time.time())
    return end - job.started_at


def iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def short(commit: str | None) -> str:
    return (commit or "")[:10]


def repo_url(repo: str, **filters: Any) -> str:
    query = {"repo": repo, **{k: v for k, v in filters.items() if v not in (None, "")}}
    return f"{PREFIX}/repo?{urlencode(query)}"


def runner_url(name: str) -> str:
    return f"{PREFIX}/runners/{quote(name, safe='')}"


def job_url(job_id: int) -> str:
    return f"{PREFIX}/jobs/{job_id}"


def commit_link(repo: str, commit: str, kind: str | None) -> str | None:
    """The commit's page on its forge: only for an http(s) repository of a configured forge."""
    parts = urlsplit(repo)
    if kind is None or parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    base = repo.removesuffix(".git")
    return f"{base}/-/commit/{commit}" if kind == "gitlab" else f"{base}/commit/{commit}"


def origin_text(job: Job) -> str:
    """What started the job, in a few words (as ``narwhal report`` says it)."""
    if job.event == "pull_request" and job.pr is not None:
        return f"pull request #{job.pr}"
    if job.event == "tag" and job.ref:
        return f"tag {job.ref.removeprefix('refs/tags/')}"
    return {"push": "push", "cron": "schedule", "manual": "manual", "api": "API"}.get(job.event, job.event)


# --- the chart -------------------------------------------------------------------------------


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    job: Job
    up: bool  # passed above the axis, everything else below: position tells, not only colour


@dataclass
class Chart:
    width: int
    height: int
    axis: float
    bars: list[Bar]
    longest: float
    passed: int
    total: int
    median: float | None

    @property
    def pass_rate(self) -> int | None:
        return round(100 * self.passed / self.total) if self.total else None


def chart(jobs: list[Job], width: int = 600, height: int = 160) -> Chart:
    """Bars of the durations of ``jobs`` (oldest first): passed ones up from the middle line,
    the rest down; the height is the duration over the longest one."""
    durations = [j.duration or 0.0 for j in jobs]
    longest = max(durations, default=0.0) or 1.0
    axis = height / 2
    slot = width / max(1, len(jobs))
    bars = []
    for i, (job, took) in enumerate(zip(jobs, durations, strict=True)):
        size = max(1.0, (axis - 4) * took / longest)
        up = job.status is JobStatus.PASSED
        bars.append(Bar(x=round(i * slot + slot * 0.1, 2), y=round(axis - size if up else axis, 2),
                        width=round(max(1.0, slot * 0.8), 2), height=round(size, 2), job=job, up=up))
    ordered = sorted(durations)
    median = ordered[len(ordered) // 2] if ordered else None
    passed = sum(1 for j in jobs if j.status is JobStatus.PASSED)
    return Chart(width, height, axis, bars, longest if jobs else 0.0, passed, len(jobs), median)


# --- the badge -------------------------------------------------------------------------------


def text_width(text: str) -> int:
    """Roughly how wide ``text`` is in 11px Verdana (badges are sized by the server)."""
    return math.ceil(sum(7.5 if c.isupper() or c in "mw" else 6.2 for c in text)) + 10


# --- templates ---------------------------------------------------------------------------------


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("narwhal.web", "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(prefix=PREFIX, static=STATIC, asset_version=ASSET_VERSION, symbols=SYMBOLS,
                       repo_url=repo_url, runner_url=runner_url, job_url=job_url, commit_link=commit_link,
                       origin_text=origin_text, runs=ansi.runs, running_for=running_for,
                       timeline=timeline.timeline)
    env.filters.update(age=age, duration=duration, iso=iso, short=short, filesize=filesize, offset=offset)
    return env


ENV = environment()


def page(template: str, **context: Any) -> str:
    return ENV.get_template(template).render(**context)
