"""schedule: the schedule: model and its ticks, on a fixed clock (pure, no I/O, no sleeping)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from narwhal.config.pipeline import check_branch
from narwhal.config.schedule import MAX_CRON, Schedule, check_ref, due_ticks, next_tick
from narwhal.config.yamlfile import parse_yaml, validation_problems

NOW = datetime(2025, 3, 10, 12, 7, 30, tzinfo=UTC)  # a Monday
MINUTE = timedelta(minutes=1)


def at(text: str) -> datetime:
    """'2025-03-10 12:15' in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def schedule(cron: str, branch: str = "main") -> Schedule:
    return Schedule(cron=cron, branch=branch)


def refused(**data: object) -> str:
    with pytest.raises(ValidationError) as info:
        Schedule.model_validate(data)
    return str(info.value)


def problems(text: str, filename: str = "pipelines/nightly.yaml") -> list[str]:
    """schedule:'s problems as the loader will show them: file:line: schedule.key: what."""
    document = parse_yaml(text, filename)
    with pytest.raises(ValidationError) as info:
        Schedule.model_validate(document.data["schedule"])
    return [str(p) for p in validation_problems(info.value, Schedule, filename, document, base=("schedule",))]


# --- the model ---------------------------------------------------------------------


def test_a_schedule():
    s = schedule("30 2 * * 1-5", "release/1.x")
    assert (s.cron, s.branch) == ("30 2 * * 1-5", "release/1.x")


def test_both_fields_are_required_and_nothing_else_is_taken():
    assert "cron\n  Field required" in refused(branch="main")
    assert "branch\n  Field required" in refused(cron="@daily")
    assert "Extra inputs are not permitted" in refused(cron="@daily", branch="main", timezone="Europe/Riga")
    assert Schedule.model_config["extra"] == "forbid" and Schedule.model_config["strict"] is True


@pytest.mark.parametrize("data", [
    {"cron": 5, "branch": "main"}, {"cron": ["0", "0", "*", "*", "*"], "branch": "main"},
    {"cron": "@daily", "branch": 1}, {"cron": "@daily", "branch": ["main"]}, {"cron": None, "branch": "main"},
])
def test_types_are_strict(data):
    refused(**data)


def test_problems_carry_file_line_and_path():
    text = ("name: nightly\n"
            "schedule:\n"
            "  cron: '0 0 * * * *'\n"
            "  branch: 'release/*'\n")
    assert problems(text) == [
        "pipelines/nightly.yaml:3: schedule.cron: invalid cron expression '0 0 * * * *': a seconds field is not "
        "supported: schedules fire at most once a minute (use five fields: minute hour day-of-month month "
        "day-of-week)",
        "pipelines/nightly.yaml:4: schedule.branch: expected a branch or tag name without spaces or glob characters "
        "(not starting with '-'), got 'release/*'",
    ]


@pytest.mark.parametrize("cron", [
    "* * * * *", "*/5 * * * *", "0 3 * * *", "30 2 * * 1-5", "0 0 1 */3 *", "0 12 * * MON,FRI", "0 0 1 JAN *",
    "0 0 L * *", "0 0 LW * *", "0 0 * * MON#2", "0 0 * * 5L", "0 0 29 2 *", "0 0 30 2,4 *", "15 10 * * sun",
    "@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually", "@DAILY", "  0 3 * * *  ",
    "0,15,30,45 0-23/2 1-31 1-12 0-7",
])
def test_good_expressions(cron):
    assert schedule(cron).cron == cron


@pytest.mark.parametrize("cron, why", [
    ("0 0 * * * *", "a seconds field is not supported: schedules fire at most once a minute"),
    ("*/10 * * * * *", "a seconds field is not supported"),
    ("* * * *", "expected five fields (minute hour day-of-month month day-of-week), got 4"),
    ("* * * * * * *", "got 7"),
    ("", "got 0"),
    ("   ", "got 0"),
    ("60 * * * *", "Bad minute"),
    ("-1 * * * *", "Bad minute"),
    ("0 24 * * *", "Bad hour"),
    ("0 0 32 * *", "Bad day-of-month"),
    ("0 0 0 * *", "Bad day-of-month"),
    ("0 0 31 2 *", "Bad day-of-month"),       # February never has a 31st: it would never fire
    ("0 0 30 2 *", "Bad day-of-month"),
    ("0 0 5-1 * *", "Bad day-of-month"),      # backwards range
    ("0 0 * 13 *", "Bad month"),
    ("0 0 * * 8", "Bad day-of-week"),
    ("0 0 * * MON#6", "Bad day-of-week"),
    ("*/0 * * * *", "Bad minute"),
    ("a b c d e", "Bad minute"),
    ("0 0 * * MONDAY", "Bad day-of-week"),
    ("0 0 LW * */7", "it never fires"),       # the last weekday of a month is never a Sunday
    ("@reboot", "unknown alias (known: @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)"),
    ("@every 5m", "unknown alias"),
    ("0\t3 * * *", "only printable ASCII characters and spaces are allowed"),
    ("0 3 * * *\n0 4 * * *", "only printable ASCII"),
    ("0 3 * * *\x00", "only printable ASCII"),
    ("0 \u0663 * * *", "only printable ASCII"),   # an Arabic-Indic digit three
    ("0 0 \u00b9 * *", "only printable ASCII"),  # a superscript one
    ("1," * 100 + "2 * * * *", f"longer than {MAX_CRON} characters"),
])
def test_bad_expressions_are_refused_with_the_reason(cron, why):
    message = refused(cron=cron, branch="main")
    assert "invalid cron expression " in message and why in message


def test_a_long_expression_is_not_echoed_whole():
    assert "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1" not in refused(cron="1," * 300 + "1 * * * *",
                                                                                         branch="main")


@pytest.mark.parametrize("branch", ["main", "release/1.x", "v1.2.3", "feature/ü", "a" * 255, "refs-heads", "x.y_z"])
def test_good_branches(branch):
    assert schedule("@daily", branch).branch == branch


@pytest.mark.parametrize("branch", ["", "-main", "--upload-pack=x", "a b", "a\tb", "a\nb", "a\x00b", "a\x1bb",
                                    "a" * 256, "release/*", "v1.?", "[ab]", "*", "**"])
def test_bad_branches(branch):
    assert "expected a branch or tag name without spaces or glob characters" in refused(cron="@daily", branch=branch)


@pytest.mark.parametrize("value", ["", "-x", "a b", "a\u3000b", "a\x01b", "x" * 256, "a\rb"])
def test_ref_rules_include_check_branch(value):
    """check_ref refuses everything narwhal.config.pipeline.check_branch refuses, and globs too."""
    with pytest.raises(ValueError):
        check_branch(value)
    with pytest.raises(ValueError):
        check_ref(value)


def test_ref_rules_differ_from_check_branch_only_by_globs():
    for value in ("release/*", "v?", "[abc]"):
        assert check_branch(value) == value
        with pytest.raises(ValueError):
            check_ref(value)


# --- next_tick ---------------------------------------------------------------------


@pytest.mark.parametrize("cron, after, expected", [
    ("*/15 * * * *", "2025-03-10 12:07:30", "2025-03-10 12:15"),
    ("*/15 * * * *", "2025-03-10 12:15:00", "2025-03-10 12:30"),      # strictly after
    ("*/15 * * * *", "2025-03-10 12:14:59.999999", "2025-03-10 12:15"),
    ("*/15 * * * *", "2025-03-10 12:15:00.000001", "2025-03-10 12:30"),
    ("* * * * *", "2025-03-10 12:07:00", "2025-03-10 12:08"),
    ("0 3 * * *", "2025-03-10 12:07:30", "2025-03-11 03:00"),
    ("@daily", "2025-12-31 23:59:59", "2026-01-01 00:00"),
    ("0 9 * * MON", "2025-03-10 12:07:30", "2025-03-17 09:00"),
    ("0 0 L * *", "2025-02-01 00:00", "2025-02-28 00:00"),
    ("0 0 29 2 *", "2025-03-10 12:07:30", "2028-02-29 00:00"),
    ("0 0 * * MON#2", "2025-03-10 12:07:30", "2025-04-14 00:00"),
    ("0 0 1 * MON", "2025-03-10 12:07:30", "2025-03-17 00:00"),  # Debian cron: either day field
])
def test_next_tick(cron, after, expected):
    tick = next_tick(schedule(cron), at(after))
    assert tick == at(expected) and tick.tzinfo is UTC


def test_next_tick_is_in_utc_whatever_the_zone_given():
    riga = timezone(timedelta(hours=2))
    tick = next_tick(schedule("0 3 * * *"), datetime(2025, 3, 10, 4, 30, tzinfo=riga))  # 02:30 UTC
    assert tick == at("2025-03-10 03:00") and tick.utcoffset() == timedelta(0)


def test_naive_times_are_refused():
    with pytest.raises(ValueError, match="after must be timezone-aware"):
        next_tick(schedule("@daily"), datetime(2025, 3, 10))
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        due_ticks(schedule("@daily"), NOW, datetime(2025, 3, 10))
    with pytest.raises(ValueError, match="last_run must be timezone-aware"):
        due_ticks(schedule("@daily"), datetime(2025, 3, 10), NOW)


def test_next_tick_at_the_end_of_the_calendar_says_so():
    with pytest.raises(ValueError, match="does not fire within 50 years"):
        next_tick(schedule("0 0 1 1 *"), datetime(9999, 6, 1, tzinfo=UTC))


# --- due_ticks ---------------------------------------------------------------------


def test_never_run_is_not_due():
    """The first tick counts from when the dispatcher first saw the schedule, recorded as last_run."""
    assert due_ticks(schedule("* * * * *"), None, NOW) is None


@pytest.mark.parametrize("cron, last_run, now, expected", [
    ("*/15 * * * *", "2025-03-10 12:00", "2025-03-10 12:14:59", None),
    ("*/15 * * * *", "2025-03-10 12:00", "2025-03-10 12:15", "2025-03-10 12:15"),   # now is inclusive
    ("*/15 * * * *", "2025-03-10 12:00", "2025-03-10 12:15:00.5", "2025-03-10 12:15"),
    ("*/15 * * * *", "2025-03-10 12:15", "2025-03-10 12:15:30", None),              # last_run is exclusive
    ("*/15 * * * *", "2025-03-10 12:14:59.999", "2025-03-10 12:15", "2025-03-10 12:15"),
    ("*/15 * * * *", "2025-03-10 12:00", "2025-03-10 13:07:30", "2025-03-10 13:00"),  # the latest, once
    ("0 3 * * *", "2025-03-01 03:00", "2025-03-10 12:07:30", "2025-03-10 03:00"),
    ("0 3 * * *", "2025-03-10 03:00", "2025-03-10 12:07:30", None),
    ("0 0 29 2 *", "2021-01-01 00:00", "2025-03-10 12:07:30", "2024-02-29 00:00"),
    ("0 0 29 2 *", "2024-02-29 00:00", "2025-03-10 12:07:30", None),
])
def test_due_ticks(cron, last_run, now, expected):
    tick = due_ticks(schedule(cron), at(last_run), at(now))
    assert tick == (at(expected) if expected else None)
    if tick is not None:
        assert tick.tzinfo is UTC


def test_a_clock_that_went_back_is_not_due():
    assert due_ticks(schedule("* * * * *"), NOW, NOW - timedelta(hours=1)) is None
    assert due_ticks(schedule("* * * * *"), NOW, NOW) is None


def test_a_run_loop_on_a_fixed_clock_runs_each_tick_once():
    """What the dispatcher will do: ask every 20 seconds, record each run as the new last_run."""
    s = schedule("*/5 * * * *")
    last_run, clock, runs = at("2025-03-10 12:00"), at("2025-03-10 12:00"), []
    while clock < at("2025-03-10 12:31"):
        clock += timedelta(seconds=20)
        tick = due_ticks(s, last_run, clock)
        if tick is not None:
            runs.append(tick)
            last_run = tick
    assert runs == [at(f"2025-03-10 12:{m:02d}") for m in (5, 10, 15, 20, 25, 30)]


def test_downtime_runs_a_missed_schedule_once():
    s = schedule("*/5 * * * *")
    last_run = at("2025-03-10 12:00")
    restarted = at("2025-03-10 18:42:10")  # 76 ticks were missed
    tick = due_ticks(s, last_run, restarted)
    assert tick == at("2025-03-10 18:40")
    assert due_ticks(s, tick, restarted + timedelta(minutes=2)) is None
    assert due_ticks(s, tick, at("2025-03-10 18:45")) == at("2025-03-10 18:45")


@pytest.mark.parametrize("cron", ["* * * * *", "*/7 * * * *", "0 0 29 2 *", "0 0 * 2 MON#5", "0 0 LW * SAT",
                                  "59 23 31 12 *"])
def test_long_downtime_costs_no_more_than_a_short_one(cron):
    """A year (and a decade) of downtime: the library jumps field by field, no tick-by-tick walk."""
    s = schedule(cron)
    started = time.monotonic()
    for years in (1, 10, 40):
        tick = due_ticks(s, NOW - timedelta(days=365 * years), NOW)
        assert tick is None or NOW - timedelta(days=365 * years) < tick <= NOW
    assert due_ticks(schedule("* * * * *"), NOW - timedelta(days=365), NOW) == at("2025-03-10 12:07")
    assert time.monotonic() - started < 2.0


def test_the_ends_of_the_calendar():
    s = schedule("0 0 29 2 *")
    assert due_ticks(s, datetime(1, 1, 1, tzinfo=UTC), datetime.max.replace(tzinfo=UTC)) == at("9996-02-29 00:00")
    assert due_ticks(schedule("59 23 31 12 *"), at("9990-01-01 00:00"),
                     datetime.max.replace(tzinfo=UTC)) == at("9999-12-31 23:59")
    assert due_ticks(s, datetime.min.replace(tzinfo=UTC), at("0002-01-01 00:00")) is None
