"""Scheduled pipelines: the ``schedule:`` mapping (a cron expression and a branch) and its ticks.

Cron expressions are read by cronsim, which follows Debian's cron: five fields (minute,
hour, day of month, month, day of week), names such as ``MON`` and ``JAN``, ``L``, ``LW``
and ``MON#2``; when neither day field starts with ``*``, a day matching either one fires.
``@hourly``, ``@daily``/``@midnight``, ``@weekly``, ``@monthly`` and ``@yearly``/``@annually``
stand for their usual expressions. A sixth (seconds) field is refused: a schedule fires at
most once a minute. Every time here is UTC, and so is the expression: ``0 3 * * *`` is
03:00 UTC whatever the dispatcher's local time zone.

Catching up (:func:`due_ticks`): after downtime, a schedule whose ticks were missed runs
once, for the most recent one, not once per missed tick. A schedule that has never run
(no ``last_run``) is not due: its ticks count from the time the dispatcher first saw it,
which the caller records as the first ``last_run``, so a new schedule or a restored
database never fires at once for a tick from before narwhal knew of it.

Both functions cost the same whatever the downtime: cronsim steps field by field (to the
next matching month, day, hour, minute), never tick by tick, in either direction.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from cronsim import CronSim, CronSimError
from pydantic import AfterValidator, BaseModel, ConfigDict

from narwhal.config.yamlfile import show_value

MAX_CRON = 200  # characters in a cron expression
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
GLOB_CHARS = "*?["
_PRINTABLE_ASCII = re.compile(r"[ -~]*")
# Where validation asks cronsim whether an expression ever fires (it looks 50 years ahead;
# the calendar repeats every 28 years until 2100).
_PROBE = datetime(2000, 1, 1, tzinfo=UTC)


def _expression(cron: str) -> str:
    """The five-field expression for ``cron`` (an alias stands for its expression)."""
    return ALIASES.get(cron.strip().lower(), cron)


def check_cron(value: str) -> str:
    """A cron expression cronsim reads, of five fields, that fires at some time."""
    def invalid(why: str) -> ValueError:
        return ValueError(f"invalid cron expression {show_value(value)}: {why}")

    if len(value) > MAX_CRON:
        raise invalid(f"longer than {MAX_CRON} characters")
    if not _PRINTABLE_ASCII.fullmatch(value):
        raise invalid("only printable ASCII characters and spaces are allowed")
    expression = _expression(value)
    if expression.startswith("@"):
        raise invalid(f"unknown alias (known: {', '.join(ALIASES)})")
    fields = expression.split()
    if len(fields) == 6:
        raise invalid("a seconds field is not supported: schedules fire at most once a minute "
                      "(use five fields: minute hour day-of-month month day-of-week)")
    if len(fields) != 5:
        raise invalid(f"expected five fields (minute hour day-of-month month day-of-week), got {len(fields)}")
    try:
        ticks = CronSim(expression, _PROBE)
    except CronSimError as e:
        raise invalid(str(e)) from None
    if _first(ticks) is None:
        raise invalid("it never fires")
    return value


def check_ref(value: str) -> str:
    """A branch or tag name to build: ``check_branch``'s rules in narwhal.config.pipeline, and no globs."""
    if (not value or value.startswith("-") or any(c.isspace() or ord(c) < 32 for c in value) or len(value) > 255
            or any(c in GLOB_CHARS for c in value)):
        raise ValueError("expected a branch or tag name without spaces or glob characters "
                         f"(not starting with '-'), got {show_value(value)}")
    return value


class Schedule(BaseModel):
    """A pipeline's ``schedule:``: build the head of ``branch`` at every tick of ``cron`` (UTC)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cron: Annotated[str, AfterValidator(check_cron)]
    branch: Annotated[str, AfterValidator(check_ref)]


def _utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {moment.isoformat()}")
    return moment.astimezone(UTC)


def _first(ticks: CronSim) -> datetime | None:
    """The first tick, or None when cronsim finds none within 50 years (or runs off the calendar)."""
    try:
        return next(ticks)
    except (StopIteration, OverflowError):
        return None


def next_tick(schedule: Schedule, after: datetime) -> datetime:
    """The first tick strictly after ``after`` (timezone-aware), in UTC.

    ValueError if there is none within cronsim's 50-year horizon (validation has made
    sure the expression fires at all; near the end of the calendar it can still run out).
    """
    start = _utc(after, "after")
    tick = _first(CronSim(_expression(schedule.cron), start))
    if tick is None:
        raise ValueError(f"cron expression {schedule.cron!r} does not fire within 50 years after {start.isoformat()}")
    return tick


def due_ticks(schedule: Schedule, last_run: datetime | None, now: datetime) -> datetime | None:
    """The most recent tick in (``last_run``, ``now``], in UTC, or None when no tick is due.

    Missed ticks run once: only the latest one is returned, however many fell in the
    interval. No ``last_run`` (the schedule never ran) means nothing is due: see the
    module's docstring. Both times must be timezone-aware.
    """
    if last_run is None:
        return None
    last, current = _utc(last_run, "last_run"), _utc(now, "now")
    if current <= last:
        return None
    # Ticks fall on whole minutes: the latest one at or before ``now`` is the first one
    # found going backwards from just after ``now``'s whole second (cronsim 2.7 and later
    # step back by the second; 2.6 stepped by the minute, hence setup.cfg's range).
    try:
        start = current.replace(microsecond=0) + timedelta(seconds=1)
    except OverflowError:  # the calendar's last second, which no tick (second 0) falls on
        start = current.replace(microsecond=0)
    tick = _first(CronSim(_expression(schedule.cron), start, reverse=True))
    return tick if tick is not None and tick > last else None
