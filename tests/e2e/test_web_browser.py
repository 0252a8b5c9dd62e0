"""The dashboard in a real headless Chromium (Selenium + Debian's chromedriver), against the real
dispatcher (narwhal serve) running jobs on a real sshd runner host and a real dockerd.

What issue 14 accepts: live lines and a live overview, hostile output rendered as text with no
script run and no console error, cancel from the page and a form without its CSRF token
refused, ``#L120`` scrolling to line 120, and no serious or critical axe-core violation on any
page (light and dark, and nothing wider than a phone at phone width).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import testbed
from tests.conftest import need_module, require
from tests.e2e.conftest import DispatcherProcess, simple_pipeline

pytestmark = pytest.mark.slow

AXE = Path(__file__).resolve().parent.parent / "web" / "axe" / "axe.min.js"
TOKEN = "web-test-token"
TICKS = 'i=1; while [ $i -le 6 ]; do echo "tick $i"; i=$((i+1)); sleep 1; done'
HOSTILE = (r"sleep 3; printf '<script>window.pwned=1</script>\n<img src=x onerror=window.pwned=2>\n"
           r"\033[31mred\033[0m \033[1;32mbold green\033[0m\n\033]0;owned-title\007after-osc\n'; sleep 3; exit 3")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need_module("selenium")
    require(testbed.ensure_browser)
    driver = testbed.start_browser()
    yield driver
    driver.quit()


@pytest.fixture
def web(browser: Any) -> Any:
    browser.get("about:blank")  # the last test's page (and its event stream) goes away
    browser.set_window_size(1280, 900)
    browser.delete_all_cookies()
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    browser.get_log("browser")  # forget earlier pages' messages
    return browser


def wait(what: str, condition: Callable[[], Any], timeout: float = 60, d: DispatcherProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - a page between two states: try again
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s" + (f"\n{d.log()}" if d else ""))


def errors(driver: Any) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def status_of(d: DispatcherProcess, job_id: int) -> str:
    return d.get(f"/jobs/{job_id}", headers=d.headers()).json()["status"]


def sign_in(driver: Any, d: DispatcherProcess) -> None:
    from selenium.webdriver.common.by import By

    driver.get(d.url + "/ui/signin")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "form.signin button").click()
    wait("signed in", lambda: "Sign out" in driver.page_source)


# --- live ------------------------------------------------------------------------------------------


def test_the_job_page_shows_lines_as_they_arrive_and_the_overview_changes_live(dispatcher, ssh_host, git_repo, web):
    from selenium.webdriver.common.by import By

    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline([{"name": "ticks", "run": TICKS}])})
    d.wait_for(lambda: d.get("/runner").json()["runners"][0]["health"]["state"] == "healthy", what="runner healthy")
    web.get(d.url + "/ui/")
    wait("live", lambda: web.find_element(By.ID, "live").get_attribute("data-state") == "on", d=d)
    web.execute_script("window.stayed = 1")
    job = d.submit(git_repo.path, git_repo.commit, "main")[0]["id"]
    cell = f'#live-region tr[data-job="{job}"] .st'
    wait("the overview shows the job running, without a reload",
         lambda: "running" in web.find_element(By.CSS_SELECTOR, cell).text, d=d)
    assert web.execute_script("return window.stayed") == 1

    web.get(f"{d.url}/ui/jobs/{job}")
    web.execute_script("window.stayed = 2")
    line = wait("a line that arrives while the job runs",
                lambda: [e for e in web.find_elements(By.CSS_SELECTOR, "#log .ln .t") if e.text == "tick 4"], d=d)
    assert line and status_of(d, job) == "running"  # seen before the job ended
    wait("the job page says passed", lambda: "passed" in web.find_element(By.CSS_SELECTOR, "h1 .st").text, d=d)
    texts = [e.text for e in web.find_elements(By.CSS_SELECTOR, "#log .ln .t")]
    assert [t for t in texts if t.startswith("tick")] == [f"tick {n}" for n in range(1, 7)]
    assert web.execute_script("return window.stayed") == 2  # all of it without a reload

    web.get(d.url + "/ui/")
    wait("the overview says passed", lambda: "passed" in web.find_element(By.CSS_SELECTOR, cell).text, d=d)
    assert errors(web) == []


def test_following_can_be_turned_off(dispatcher, ssh_host, git_repo, web):
    from selenium.webdriver.common.by import By

    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline([{"name": "ticks", "run": TICKS}])})
    job = d.submit(git_repo.path, git_repo.commit, "main")[0]["id"]
    d.wait_for(lambda: status_of(d, job) == "running", what="running")
    web.get(f"{d.url}/ui/jobs/{job}")
    follow = web.find_element(By.ID, "follow")
    assert follow.is_selected()
    follow.click()
    assert not follow.is_selected()
    wait("lines still arrive", lambda: any(e.text == "tick 5" for e in web.find_elements(By.CSS_SELECTOR, "#log .t")))
    assert not follow.is_selected()
    d.wait_job(job)  # no step left running at teardown (the fixture's sweep would race the dispatcher's)


# --- hostile output ----------------------------------------------------------------------------------


def test_hostile_output_is_text_and_nothing_runs(dispatcher, ssh_host, git_repo, web):
    from selenium.webdriver.common.by import By

    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline([{"name": "evil", "run": HOSTILE}])})
    job = d.submit(git_repo.path, git_repo.commit, "main")[0]["id"]
    d.wait_for(lambda: status_of(d, job) == "running", what="running")
    web.get(f"{d.url}/ui/jobs/{job}")  # the hostile lines arrive live, over the log stream
    wait("the hostile lines, live", lambda: "after-osc" in web.find_element(By.ID, "log").text, d=d)
    for how in ("live", "server-rendered"):
        if how == "server-rendered":
            d.wait_job(job)
            web.get(f"{d.url}/ui/jobs/{job}")
        texts = [e.text for e in web.find_elements(By.CSS_SELECTOR, "#log .ln .t")]
        assert "<script>window.pwned=1</script>" in texts, (how, texts)
        assert "<img src=x onerror=window.pwned=2>" in texts, (how, texts)
        assert "after-osc" in texts and not any("owned-title" in t or "\x1b" in t for t in texts), how
        assert web.execute_script("return window.pwned === undefined")
        assert web.find_elements(By.CSS_SELECTOR, "#log img, #log script") == []
        red = web.find_element(By.CSS_SELECTOR, "#log .a-f1")
        assert red.text == "red" and red.get_attribute("style") in (None, "")
        assert web.find_element(By.CSS_SELECTOR, "#log .a-b.a-f2").text == "bold green"
        assert errors(web) == [], how
    # The server's rendering of a line and the script's are the same markup.
    server, script = web.execute_script(
        "var el = document.querySelector('#log .a-f1').closest('.ln');"
        "var made = window.narwhal.lineNode(parseInt(el.id.slice(1), 10), 'step', arguments[0]);"
        "return [el.outerHTML, made.outerHTML];", "\x1b[31mred\x1b[0m \x1b[1;32mbold green\x1b[0m")
    assert server == script


# --- actions --------------------------------------------------------------------------------------------


def test_cancel_from_the_page_and_a_form_without_csrf_is_refused(dispatcher, ssh_host, git_repo, web):
    from selenium.webdriver.common.by import By

    # read_token: the pages, and the event stream behind their live updates, need the session.
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline([{"name": "long", "run": "sleep 120"}])},
                   token=TOKEN, settings={"read_token": True})
    job = d.submit(git_repo.path, git_repo.commit, "main")[0]["id"]
    d.wait_for(lambda: d.get(f"/jobs/{job}", headers=d.headers()).json()["status"] == "running", what="running")
    web.get(f"{d.url}/ui/jobs/{job}")
    assert "/ui/signin" in web.current_url  # not signed in: the sign-in page, no button
    assert web.find_elements(By.XPATH, "//button[text()='Cancel job']") == []
    sign_in(web, d)
    web.get(f"{d.url}/ui/jobs/{job}")
    web.find_element(By.XPATH, "//button[text()='Cancel job']").click()
    d.wait_for(lambda: status_of(d, job) == "cancelled", timeout=60, what="cancelled")
    wait("the page says cancelled", lambda: "cancelled" in web.find_element(By.CSS_SELECTOR, "h1 .st").text, d=d)
    assert web.find_element(By.ID, "live").get_attribute("data-state") == "on"  # /events took the cookie

    # The same form with its CSRF field taken out: refused, and the job stays cancelled.
    web.execute_script("var f = document.querySelector('form[action$=\"/retry\"]');"
                       "f.querySelector('input[name=csrf]').remove(); f.submit();")
    wait("refused", lambda: "Refused" in web.find_element(By.TAG_NAME, "h1").text, d=d)
    assert "CSRF" in web.find_element(By.TAG_NAME, "main").text
    assert status_of(d, job) == "cancelled"
    assert "Refused" in web.title or "403" in web.title


# --- links ------------------------------------------------------------------------------------------------


def test_a_line_link_scrolls_to_its_line(dispatcher, ssh_host, git_repo, web):
    from selenium.webdriver.common.by import By

    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline([{"name": "count", "run": "seq 1 1500"}])})
    job = d.submit(git_repo.path, git_repo.commit, "main")[0]["id"]
    assert d.wait_job(job)["status"] == "passed"
    web.get(f"{d.url}/ui/jobs/{job}")
    assert web.find_elements(By.ID, "L120") == []  # only the tail is on the page at first
    web.get(f"{d.url}/ui/jobs/{job}#L120")
    line = wait("line 120 loaded", lambda: web.find_element(By.ID, "L120"), d=d)
    # Line 1 is narwhal's step header, so line 120 is the step's 119th: `seq` printed 119.
    assert line.text.split() == ["120", "119"]
    in_view = ("var r = document.getElementById('L120').getBoundingClientRect();"
               "return r.top >= 0 && r.bottom <= window.innerHeight;")
    wait("line 120 in view", lambda: web.execute_script(in_view))
    assert web.execute_script("return document.querySelector('.ln.target').id") == "L120"
    assert web.execute_script("return document.activeElement.getAttribute('href')") == "#L120"
    assert errors(web) == []


# --- steps side by side ------------------------------------------------------------------------------------

SIDE_BY_SIDE = [
    {"name": "left", "run": 'for i in 1 2 3 4 5; do echo "left $i"; sleep 1; done', "depends_on": []},
    {"name": "right", "run": 'for i in 1 2 3; do echo "right $i"; sleep 1; done; exit 2', "depends_on": []},
]


def bar_spans(driver: Any) -> dict[str, tuple[float, float]]:
    """Step name -> (left, right) of its timeline bar on the screen, in pixels."""
    return driver.execute_script(
        "var out = {};"
        "document.querySelectorAll('#steps tbody tr').forEach(function (row) {"
        "  var rect = row.querySelector('svg.tl rect'); if (!rect) return;"
        "  var box = rect.getBoundingClientRect();"
        "  out[row.querySelector('a').textContent] = [box.left, box.right]; });"
        "return out;")


def test_steps_side_by_side_overlap_on_the_timeline_and_keep_their_own_lines(dispatcher, ssh_host, git_repo, web):
    from selenium.webdriver.common.by import By

    d = dispatcher([ssh_host.runner_config(capacity=2)], {"ci": simple_pipeline(SIDE_BY_SIDE)})
    job = d.submit(git_repo.path, git_repo.commit, "main")[0]["id"]
    web.get(f"{d.url}/ui/jobs/{job}")

    def overlapping() -> bool:
        spans = bar_spans(web)
        if set(spans) != {"left", "right"}:
            return False
        (l0, l1), (r0, r1) = spans["left"], spans["right"]
        return l0 < r1 and r0 < l1 and l1 - l0 > 2 and r1 - r0 > 2

    wait("two overlapping bars while the job runs", overlapping, d=d)
    assert status_of(d, job) == "running"
    web.execute_script("window.stayed = 1")  # after the reload that shows a started job's plan
    live = "details.sec[data-name='left'] .ln .t"
    wait("left's lines arrive live in its own section", lambda: [
        e for e in web.find_elements(By.CSS_SELECTOR, live) if e.text.startswith("left | left 2")], d=d)
    assert status_of(d, job) == "running"
    assert not [e for e in web.find_elements(By.CSS_SELECTOR, live) if "right" in e.text]
    width = web.execute_script("return document.querySelector('#steps svg.tl rect').getAttribute('width')")
    wait("the bars stretch as the job runs", lambda: web.execute_script(
        "return document.querySelector('#steps svg.tl rect').getAttribute('width')") != width, d=d)
    wait("the job fails", lambda: "failed" in web.find_element(By.CSS_SELECTOR, "h1 .st").text, d=d)
    assert web.execute_script("return window.stayed") == 1  # live, without a reload

    web.get(f"{d.url}/ui/jobs/{job}")
    assert overlapping()
    right = web.find_element(By.CSS_SELECTOR, "details.sec[data-name='right']")
    assert right.get_attribute("open") is not None  # the failing step opens by default
    texts = [e.text for e in right.find_elements(By.CSS_SELECTOR, ".ln .t")]
    step_lines = [t for t in texts if not t.startswith("narwhal:")]
    assert step_lines == ["right | right 1", "right | right 2", "right | right 3"], texts
    web.find_element(By.CSS_SELECTOR, "details.sec[data-name='left'] > summary").click()
    left = web.find_element(By.CSS_SELECTOR, "details.sec[data-name='left']")
    wait("left's lines load", lambda: len([e for e in left.find_elements(By.CSS_SELECTOR, ".ln .t")
                                            if e.text.startswith("left |")]) == 5, d=d)
    assert not [e for e in left.find_elements(By.CSS_SELECTOR, ".ln .t") if "right" in e.text]
    for scheme in ("light", "dark"):
        web.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
        assert [(v["id"], v["help"]) for v in axe_violations(web)] == [], scheme
    assert errors(web) == []


# --- accessibility ------------------------------------------------------------------------------------------


def axe_violations(driver: Any) -> list[dict]:
    driver.execute_script(AXE.read_text())
    result = driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(function (r) { done(r.violations); },"
        " function (e) { done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]); });")
    return [v for v in result if v["impact"] in ("serious", "critical")]


def test_no_serious_accessibility_violation_on_any_page(dispatcher, ssh_host, git_repo, web):
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline([{"name": "evil", "run": HOSTILE}])},
                   token=TOKEN)
    job = d.submit(git_repo.path, git_repo.commit, "main")[0]["id"]
    d.wait_job(job)
    sign_in(web, d)  # the actions' buttons are on the pages too
    pages = ["/ui/", f"/ui/repo?repo={git_repo.path}", f"/ui/jobs/{job}", f"/ui/runners/{ssh_host.name}",
             "/ui/jobs/99999"]
    found = {}
    for scheme in ("light", "dark"):
        web.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
        for page in pages:
            web.get(d.url + page)
            for v in axe_violations(web):
                found[f"{scheme} {page} {v['id']}"] = (v["help"], [n.get("target") for n in v["nodes"]][:5])
    web.delete_all_cookies()
    web.get(d.url + "/ui/signin")
    for v in axe_violations(web):
        found[f"signin {v['id']}"] = (v["help"], [n.get("target") for n in v["nodes"]][:5])
    assert found == {}

    web.set_window_size(375, 800)  # a phone: nothing wider than the screen but the scrolling tables and log
    for page in [*pages, "/ui/signin"]:
        web.get(d.url + page)
        assert web.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1"), page
