"""The web dashboard's speed: the overview with many runners and jobs, a job page with a big log.

A dispatcher with RUNNERS runners (the bench's real sshd hosts, the rest unreachable, as sick
runners with a reason) over a store pre-filled with JOBS jobs (10 repositories, 3 branches,
2 pipelines), and one failed job whose failing step wrote LOG_MIB MiB. Measured:

* the server alone: ``GET`` of each page (requests, keep-alive), median and p95, and its size;
* headless Chromium (Debian's, through Selenium), cold cache: the navigation's timing
  (response, first contentful paint = the log's first lines visible, DOMContentLoaded, load)
  and the bytes transferred (HTML plus assets; again with a warm cache);
* the job page's whole log: clicking "Load older lines" until every line is on the page.

``screenshots`` (a folder): PNGs of the overview and the job page for the README.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

import testbed
from bench.env import BenchDispatcher, Environment
from narwhal.dispatch.events import EventLog
from narwhal.dispatch.store import Store
from narwhal.job import JobStatus, Origin, StepStatus

BIG_REPO = "https://git.example.com/team/big.git"
TIMING = """
var nav = performance.getEntriesByType('navigation')[0];
var paint = performance.getEntriesByType('paint').filter(function (p) { return p.name === 'first-contentful-paint'; });
var res = performance.getEntriesByType('resource');
var bytes = nav.transferSize + res.reduce(function (a, r) { return a + r.transferSize; }, 0);
return {response_end: nav.responseEnd, first_contentful_paint: paint.length ? paint[0].startTime : null,
        dom_content_loaded: nav.domContentLoadedEventEnd, load: nav.loadEventEnd,
        html_bytes: nav.transferSize, html_decoded_bytes: nav.decodedBodySize, transferred_bytes: bytes,
        resources: res.length, lines_on_page: document.querySelectorAll('#log .ln').length};
"""


def prefill(store: Store, jobs: int, runners: list[str], seed: int = 14) -> None:
    rng = random.Random(seed)
    base = time.time() - jobs * 30 - 3600
    statuses = ["passed"] * 85 + ["failed"] * 10 + ["error"] * 2 + ["cancelled"] * 3

    def rows():
        for i in range(jobs):
            created = base + i * 30
            started = created + rng.uniform(0.1, 20)
            yield {"pipeline": ("ci", "lint")[i % 2], "repo": f"https://git.example.com/team/service-{i % 10}.git",
                   "commit": f"{i:040x}", "branch": ("main", "dev", f"feature-{i % 7}")[i % 3],
                   "status": statuses[i % 100], "runner": runners[i % len(runners)], "created_at": created,
                   "queued_at": created, "started_at": started, "finished_at": started + rng.uniform(5, 400)}

    store.bulk_insert_jobs(rows())


def big_job(store: Store, log_mib: int) -> tuple[int, int]:
    """A job whose second step failed after writing LOG_MIB MiB; (job id, lines). It ran a
    minute ago, its steps taking what their notes say (the job page's timeline shows them)."""
    moment = [time.time() - 70.0]
    real_clock, store.clock = store.clock, lambda: moment[0]
    try:
        (job, _), = store.create_jobs(BIG_REPO, "b" * 40, "main", ["ci"], Origin(
            event="push", key="push", ref="refs/heads/main", author="Ada Lovelace <ada@example.com>",
            subject="Make the engine print its tables faster"))
        store.start_job(job.id, "runner-1", 1)
        store.plan_steps(job.id, 1, ["build", "test"])
        moment[0] += 0.4
        store.start_step(job.id, 1, 0, "build")
        store.append_log(job.id, 1, [f"\x1b[1mcompiling\x1b[0m module {n}" for n in range(50)])
        store.append_log(job.id, 1, ["step build: exit 0 (4.2s)"], "narwhal")
        moment[0] += 4.2
        store.finish_step(job.id, 1, 0, StepStatus.PASSED, 0)
        store.start_step(job.id, 1, 1, "test")
        line = "test_engine.py::test_case_{:06d} \x1b[32mPASSED\x1b[0m " + "." * 50
        lines = log_mib * 1024 * 1024 // (len(line) + 1)
        chunk = 2000
        for start in range(0, lines, chunk):
            store.append_log(job.id, 1, [line.format(n) for n in range(start, min(lines, start + chunk))])
        store.append_log(job.id, 1, ["\x1b[31mFAILED\x1b[0m test_engine.py::test_tables - assert 41 == 42",
                                     "\x1b[31;1m1 failed\x1b[0m, " + f"{lines - 1} passed in 61.20s"])
        store.append_log(job.id, 1, ["step test: exit 1 (61.9s)"], "narwhal")
        moment[0] += 61.9
        store.finish_step(job.id, 1, 1, StepStatus.FAILED, 1)
        moment[0] += 0.3
        store.finish_job(job.id, 1, JobStatus.FAILED, "exit 1 in step test")
    finally:
        store.clock = real_clock
    return job.id, lines + 50 + 4


def _latencies(session: requests.Session, url: str, n: int) -> dict:
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        r = session.get(url, timeout=60)
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
        size = len(r.content)
    times.sort()
    return {"median": statistics.median(times), "p95": times[min(len(times) - 1, int(0.95 * len(times)))],
            "bytes": size, "n": n}


def _browser_load(driver: Any, url: str, cold: bool) -> dict:
    if cold:
        driver.execute_cdp_cmd("Network.clearBrowserCache", {})
    driver.get("about:blank")
    driver.get(url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # load and paint entries land just after get() returns
        timing = driver.execute_script(TIMING)
        if timing["load"] and timing["first_contentful_paint"] is not None:
            return timing
        time.sleep(0.05)
    return timing


def _load_everything(driver: Any) -> dict:
    """Click "Load older lines" on the open step until every line is there."""
    from selenium.webdriver.common.by import By

    t0 = time.perf_counter()
    clicks = 0
    while True:
        button = driver.find_element(By.CSS_SELECTOR, "details[open] button.older")
        if not button.is_displayed():
            break
        lo = driver.execute_script("return document.querySelector('details[open]').dataset.lo")
        driver.execute_script("arguments[0].click()", button)
        clicks += 1
        deadline = time.monotonic() + 60
        while driver.execute_script("return document.querySelector('details[open]').dataset.lo") == lo:
            if time.monotonic() > deadline:
                raise RuntimeError("older lines did not load within 60 s")
            time.sleep(0.01)
    return {"seconds": time.perf_counter() - t0, "clicks": clicks,
            "lines_on_page": driver.execute_script("return document.querySelectorAll('#log .ln').length")}


def scenario(env: Environment, jobs: int, runners: int, log_mib: int, narwhal_src: str | None,
             log: Callable[[str], None], screenshots: str | None = None, requests_n: int = 20) -> dict:
    hosts = env.hosts
    real = [h.runner_config(capacity=2) for h in hosts]
    template = hosts[0].runner_config(capacity=2)
    sick = [{**template, "name": f"sick-{i:02d}", "port": 1} for i in range(max(0, runners - len(real)))]
    all_runners = (real + sick)[:runners]
    pipelines = {name: {"repo": ["https://git.example.com/team/*"], "image": "narwhal-test/busybox:latest",
                        "steps": [{"name": "build", "run": "true"}, {"name": "test", "run": "true"}]}
                 for name in ("ci", "lint")}
    d = BenchDispatcher(env.workdir, "web", all_runners, pipelines, {}, narwhal_src)
    env.stack.callback(d.stop)
    d.state_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = Store(str(d.state_dir / "narwhal.db"))
    try:
        prefill(store, jobs, [r["name"] for r in all_runners])
        EventLog(store)  # the step marks of the big job: the store writes them with each step change
        job_id, lines = big_job(store, log_mib)
    finally:
        store.close()
    log(f"  pre-filled {jobs} jobs and a {log_mib} MiB log ({lines} lines) in {time.perf_counter() - t0:.1f} s")
    d.start()
    result: dict[str, Any] = {"jobs": jobs, "runners": runners, "log_mib": log_mib, "log_lines": lines}
    try:
        pages = {"overview": "/ui/", "job": f"/ui/jobs/{job_id}",
                 "repository": f"/ui/repo?repo={BIG_REPO.replace('big', 'service-3')}"}
        session = requests.Session()
        result["server"] = {name: _latencies(session, d.url + path, requests_n) for name, path in pages.items()}
        for name, got in result["server"].items():
            log(f"  GET {name}: median {got['median'] * 1000:.0f} ms, p95 {got['p95'] * 1000:.0f} ms, "
                f"{got['bytes'] / 1024:.0f} KiB")
        testbed.ensure_browser()
        driver = testbed.start_browser()
        try:
            browser: dict[str, Any] = {}
            for name, path in pages.items():
                cold = _browser_load(driver, d.url + path, cold=True)
                warm = _browser_load(driver, d.url + path, cold=False)
                browser[name] = {"cold": cold, "warm": warm}
                log(f"  Chromium {name}: first paint {cold['first_contentful_paint']:.0f} ms, load "
                    f"{cold['load']:.0f} ms, {cold['transferred_bytes'] / 1024:.0f} KiB cold / "
                    f"{warm['transferred_bytes'] / 1024:.0f} KiB warm")
            if screenshots:
                folder = Path(screenshots)
                folder.mkdir(parents=True, exist_ok=True)
                driver.set_window_size(1280, 1300)
                for name in ("overview", "job"):
                    driver.get(d.url + pages[name])
                    time.sleep(0.5)
                    driver.save_screenshot(str(folder / f"dashboard-{name}.png"))
                driver.set_window_size(1280, 900)
            driver.get(d.url + pages["job"])
            browser["job_all_lines"] = _load_everything(driver)
            log(f"  Chromium job page, every line: {browser['job_all_lines']['seconds']:.1f} s "
                f"({browser['job_all_lines']['clicks']} clicks, {browser['job_all_lines']['lines_on_page']} lines)")
        finally:
            driver.quit()
        result["browser"] = browser
    finally:
        d.stop()
    return result
