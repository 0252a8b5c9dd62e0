"""A config change reaches a running dispatcher without a restart: it watches its directory,
and ``narwhal reload`` loads it now or says, as file:line, why not."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.e2e.cli import LOCAL, run, run_json
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow


def test_the_dispatcher_reloads_a_changed_config_by_itself_and_narwhal_reload_says_why_not(dispatcher, git_repo):
    d = dispatcher([LOCAL], {"ci": simple_pipeline()})
    config = d.config_dir

    # A pipeline added while it runs is picked up without a word from anyone.
    (config / "pipelines" / "extra.yaml").write_text(yaml.safe_dump(simple_pipeline()))
    d.wait_for(lambda: "configuration reloaded (pipelines/extra.yaml added): 1 runner, 2 pipelines" in d.log(),
               what="the watch's reload")
    submitted = run_json("submit", git_repo.path, git_repo.commit, "--url", d.url)
    assert sorted(j["pipeline"] for j in submitted["jobs"]) == ["ci", "extra"]

    # A bad change is refused in the log, with the line; the running config stays.
    good = (config / "inventory.yaml").read_text()
    inventory = yaml.safe_load(good)
    inventory["runners"][0]["capacity"] = "lots"
    bad = yaml.safe_dump(inventory, sort_keys=False)
    line = next(n for n, text in enumerate(bad.splitlines(), 1) if "capacity" in text)
    (config / "inventory.yaml").write_text(bad)
    where = f"inventory.yaml:{line}: runners[0].capacity"
    d.wait_for(lambda: "config change refused (inventory.yaml changed)" in d.log() and where in d.log(),
               what="the refusal in the log")
    assert d.log().count("config change refused") == 1  # said once, not at every look

    refused = run("reload", "--url", d.url)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "invalid configuration" in refused.stderr and where in refused.stderr
    assert [r["name"] for r in run_json("runners", "--url", d.url)["runners"]] == ["local"]

    # Mended, and loaded now rather than at the next look.
    (config / "inventory.yaml").write_text(good)
    done = run("reload", "--url", d.url)
    assert done.returncode == 0, done.stderr
    assert "configuration reloaded: 1 runner (local), 2 pipelines (ci, extra)" in done.stdout
    answer = json.loads(run("reload", "--url", d.url, "--json").stdout)
    assert answer == {"reloaded": True, "runners": ["local"], "pipelines": ["ci", "extra"], "warnings": []}

    # An inventory runner is removed by editing the file, and the message says so.
    removed = run("runner", "remove", "local", "--url", d.url)
    assert removed.returncode == 1 and "reloads by itself" in removed.stderr


def test_no_watch_leaves_the_config_to_sighup_and_narwhal_reload(dispatcher):
    d = dispatcher([LOCAL], {"ci": simple_pipeline()}, args=("--no-watch",))
    (d.config_dir / "pipelines" / "extra.yaml").write_text(yaml.safe_dump(simple_pipeline()))
    # Nothing to wait for when nothing happens: a reload asked for now shows the new file,
    # and the log says it came from the API, not from a watch.
    done = run("reload", "--url", d.url)
    assert done.returncode == 0 and "2 pipelines" in done.stdout
    assert "configuration reloaded (asked over the API)" in d.log()
    assert "pipelines/extra.yaml added" not in d.log()
