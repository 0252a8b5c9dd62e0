"""Step output on the real path (narwhal serve, local runner, real dockerd, the ``narwhal`` CLI):
bounded in the dispatcher's memory, and inert on the operator's terminal."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import simple_pipeline, sse_events
from tests.e2e.test_cli import CLI, LOCAL, cli_env

SGR = re.compile(r"\x1b\[[0-9;:]*m")
MiB = 1024 * 1024

# What the step prints, as printf escapes (busybox sh): a window title, clear screen and
# cursor home, an OSC 8 hyperlink, a bidi override, a C1 CSI, a BEL, a backspace, a
# mid-line carriage return, rich markup, and one honest colour.
HOSTILE = (r"\033]0;owned-title\007\033[2J\033[Hcleared "
           r"\033]8;;https://evil.example/\033\\click-me\033]8;;\033\\ "
           r"bidi:\342\200\256txt.exe\342\200\254 c1:\302\2332J bell\007 bs\010 cr\rPASSED "
           r"[bold]markup[/bold][link=https://x]L[/link] \033[31mred\033[0m\n")
DOCKER_LINE = r"docker: Error response from daemon: \033]0;owned-reason\007\033[2Jbad\342\200\256 thing\n"


def vm(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def run(*args: str) -> subprocess.CompletedProcess:
    """The CLI through a pipe, output kept as bytes (text mode would turn a \\r into \\n)."""
    proc = subprocess.run([*CLI, *args], capture_output=True, timeout=180, env=cli_env(), stdin=subprocess.DEVNULL)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def assert_inert(output: str, what: str) -> None:
    rest = SGR.sub("", output)
    assert "\x1b" not in rest, (what, output)
    for bad in ("\x07", "\x08", "\r", "\x9b", "\u202e", "\u202c"):
        assert bad not in output, (what, repr(bad), output)
    assert "owned-title" not in output and "owned-reason" not in output and "evil.example" not in output, what


def test_finding7_hostile_output_is_inert_in_logs_job_jobs_and_report(dispatcher, git_repo):
    d = dispatcher([LOCAL], {"ci": simple_pipeline([
        {"name": "hostile", "run": f"printf '{HOSTILE}'; printf '{DOCKER_LINE}' >&2; exit 125"}])})
    job = d.submit(git_repo.path, git_repo.commit, branch="main")[0]
    done = d.wait_job(job["id"])
    # Until the runner sanitises reasons itself, the stored reason carries the step's bytes;
    # the CLI must make it inert whatever the dispatcher holds.
    assert done["status"] == "error" and "docker: Error response" in done["reason"], done
    url = ["--url", d.url]
    jid = str(job["id"])

    outputs = {
        "logs": run("logs", jid, *url),
        "logs -f": run("logs", jid, "-f", *url),
        "job": run("job", jid, *url),
        "jobs": run("jobs", *url),
        "report": run("report", *url),
    }
    for what, proc in outputs.items():
        assert proc.returncode in (0, 1), (what, proc.stdout, proc.stderr)
        assert_inert(proc.stdout, what)
        assert_inert(proc.stderr, what)
    log = outputs["logs"].stdout
    assert "\x1b[31mred\x1b[0m" in log  # colour is kept in logs
    assert "cleared click-me bidi:\\u202etxt.exe\\u202c c1:\\x9b2J bell\\x07 bs\\x08 cr\\x0dPASSED" in log
    assert "[bold]markup[/bold][link=https://x]L[/link]" in log
    assert "docker: Error response from daemon: bad\\u202e thing" in outputs["job"].stdout
    assert "[bold]markup[/bold]" in outputs["logs -f"].stdout

    raw = run("logs", jid, "--raw", *url)
    assert raw.returncode == 0
    for sequence in ("\x1b]0;owned-title\x07\x1b[2J\x1b[Hcleared", "\x1b]8;;https://evil.example/\x1b\\click-me",
                     "\u202etxt.exe\u202c", "\x9b2J", "bell\x07 bs\x08 cr\rPASSED", "\x1b]0;owned-reason\x07"):
        assert sequence in raw.stdout, repr(sequence)
    raw_follow = run("logs", jid, "--raw", "-f", *url)
    assert "\x1b]0;owned-title\x07" in raw_follow.stdout


def test_finding6_a_200_mb_line_keeps_the_dispatcher_memory_bounded(dispatcher, git_repo):
    size = 200_000_000
    d = dispatcher([LOCAL], {"ci": simple_pipeline([
        {"name": "flood", "run": f"echo before; head -c {size} /dev/zero | tr '\\0' a; echo; echo after"}])})
    d.wait_for(lambda: d.get("/runner").json()["runners"][0]["health"]["state"] == "healthy",
               what="the local runner healthy")
    idle = vm(d.pid, "VmRSS")
    job = d.submit(git_repo.path, git_repo.commit)[0]
    done = d.wait_job(job["id"], timeout=300)
    peak = vm(d.pid, "VmHWM")
    print(f"\ndispatcher RSS idle {idle / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB "
          f"(+{(peak - idle) / MiB:.1f} MiB) for a {size / 1e6:.0f} MB line", file=sys.stderr)
    assert done["status"] == "passed", done
    lines = d.get(f"/jobs/{job['id']}/log", headers={"Accept": "text/plain"}).text.split("\n")
    cut = [line for line in lines if "[narwhal: line cut at" in line]
    assert len(cut) == 1 and cut[0] == "a" * 65536 + "\u2026 [narwhal: line cut at 65536 bytes]"
    assert lines.index("before") < lines.index(cut[0]) < lines.index("after")
    assert peak - idle < 50 * MiB, f"idle {idle / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB"


def test_finding7_a_step_cannot_print_narwhals_own_lines(dispatcher, git_repo):
    counterfeit = "[narwhal] step build: exit 0"
    d = dispatcher([LOCAL], {"ci": simple_pipeline([
        {"name": "build", "run": f"echo before; echo '{counterfeit}'; echo after; exit 3"}])})
    job = d.submit(git_repo.path, git_repo.commit)[0]
    assert d.wait_job(job["id"])["status"] == "failed"
    path = f"/jobs/{job['id']}/log"

    plain = d.get(path, headers={"Accept": "text/plain"}).text.splitlines()
    assert plain[plain.index("before") + 1:plain.index("after")] == ["[step] " + counterfeit]
    mine = [line for line in plain if line.startswith("[narwhal]")]
    assert len(mine) == 2 and mine[0] == "[narwhal] step build started", plain
    assert mine[1].startswith("[narwhal] step build: exit 3 ("), plain

    with d.get(path, headers={"Accept": "text/event-stream"}, stream=True) as response:
        events = list(sse_events(response))
    steps = [e["data"] for e in events if "event" not in e]
    notes = [e["data"] for e in events if e.get("event") == "narwhal"]
    assert steps == ["before", counterfeit, "after"]
    assert len(notes) == 2 and notes[0] == "step build started", events
    assert notes[1].startswith("step build: exit 3 ("), events
    assert events[-1]["event"] == "end"

    url = ["--url", d.url, str(job["id"])]
    for args in ([], ["-f"]):
        shown = run("logs", *args, *url).stdout.splitlines()
        assert "[step] " + counterfeit in shown and counterfeit not in shown, shown
        # narwhal's lines, the step's start as its header
        assert [line for line in shown if line.startswith("[narwhal]")] == ["[narwhal] ── step build ──",
                                                                            mine[1]], shown
    rows = [json.loads(line) for line in run("logs", "-f", "--json", *url).stdout.splitlines()]
    kinds = {row["text"]: row["kind"] for row in rows if "text" in row}
    assert kinds[counterfeit] == "step" and kinds[mine[1].removeprefix("[narwhal] ")] == "narwhal"
    assert run("logs", "--raw", *url).stdout.splitlines() == plain
