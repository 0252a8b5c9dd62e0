"""Caches on the real path: `narwhal serve`, sshd runner hosts, dockerd, the busybox image.

A warm cache skips a download (from a busybox httpd service), a failing job saves nothing,
two jobs saving one key at once leave one whole generation, saves and restores racing
straight on the engine never show a half generation, eviction by size and by age, the
reaper leaves caches alone, and a cancel leaves nothing but the cache.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time

import pytest

from narwhal.config.cache import digest
from narwhal.execution import docker
from testbed import TEST_IMAGE
from tests.e2e.conftest import simple_pipeline

pytestmark = pytest.mark.slow

# A service that serves a generated file; the step downloads it into the cache only when
# the cache does not have it yet.
WEB = {"name": "web", "image": TEST_IMAGE,
       "command": "mkdir -p /www && dd if=/dev/urandom of=/www/pkg.bin bs=1024 count=512 2>/dev/null "
                  "&& exec httpd -f -p 8080 -h /www",
       "ready": {"command": "wget -q -O /dev/null http://127.0.0.1:8080/pkg.bin", "timeout": "30s"}}
FETCH = ("mkdir -p .cache/dl; if [ -f .cache/dl/pkg.bin ]; then echo 'from the cache'; "
         "else wget -q -O .cache/dl/pkg.bin http://web:8080/pkg.bin && echo 'downloaded'; fi; "
         "sha256sum .cache/dl/pkg.bin")
KEY = "dl-{{ hash 'requirements.txt' }}"


def owner_of(d) -> str:
    return d.get("/health").json()["owner"]


def log_of(d, job_id: int) -> str:
    return d.get(f"/jobs/{job_id}/log").text


def cache_volumes(docker_engine, d) -> list[dict]:
    labels = [f"narwhal.owner={owner_of(d)}", "narwhal.cache=1"]
    return docker_engine.api.volumes(filters={"label": labels}).get("Volumes") or []


def job_leftovers(docker_engine, d, job_id: int) -> list:
    labels = [f"narwhal.owner={owner_of(d)}", f"narwhal.job={job_id}"]
    return (docker_engine.api.containers(all=True, filters={"label": labels})
            + docker_engine.api.networks(filters={"label": labels})
            + (docker_engine.api.volumes(filters={"label": labels}).get("Volumes") or []))


def in_volume(volume: str, script: str) -> str:
    """Run ``script`` in a throwaway busybox container with ``volume`` at /c (read-only)."""
    out = subprocess.run(["docker", "run", "--rm", "--network", "none", "--mount",
                          f"type=volume,source={volume},target=/c,readonly", TEST_IMAGE, "sh", "-c", script],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def expected_key(repo_path: str, commit: str, prefix: str = "dl-") -> str:
    listing = subprocess.run(["git", "-C", repo_path, "ls-tree", "-r", "-z", "--full-tree", commit, "--",
                              "requirements.txt"], capture_output=True, check=True).stdout
    entries = []
    for record in listing.split(b"\0"):
        what, tab, path = record.partition(b"\t")
        if tab:
            entries.append((path.decode(), what.decode()))
    return prefix + digest(["requirements.txt"], entries)


# --- restore and save through the dispatcher --------------------------------------------------------


def test_a_warm_cache_skips_the_download_and_a_new_key_misses(dispatcher, ssh_host, git_repo, docker_engine):
    git_repo.add_commit({"requirements.txt": "wheel==1\n"})
    pipeline = simple_pipeline([{"name": "fetch", "run": FETCH}], services=[WEB],
                               cache=[{"key": KEY, "paths": [".cache/dl"]}])
    d = dispatcher([ssh_host.runner_config()], {"ci": pipeline})
    key = expected_key(git_repo.path, git_repo.commit)

    cold = d.wait_job(d.submit(git_repo.path, git_repo.commit)[0]["id"])
    text = log_of(d, cold["id"])
    assert cold["status"] == "passed", text
    assert f"[narwhal] cache {key}: miss" in text and "downloaded" in text
    assert re.search(rf"\[narwhal\] cache {key}: saved \([0-9.]+ [KMG]iB in [0-9.]+s\)", text), text
    digest_line = next(line for line in text.splitlines() if line.endswith(".cache/dl/pkg.bin"))

    git_repo.add_commit({"README.md": "# changed, the key is not\n"})
    warm = d.wait_job(d.submit(git_repo.path, git_repo.commit)[0]["id"])
    text = log_of(d, warm["id"])
    assert warm["status"] == "passed", text
    assert re.search(rf"\[narwhal\] cache {key}: restored \([0-9.]+ [KMG]iB in [0-9.]+s\)", text), text
    assert "from the cache" in text and "downloaded" not in text
    assert digest_line in text  # the very bytes the first job downloaded
    assert "saved" not in text  # save: on_miss, and the key was there

    [volume] = cache_volumes(docker_engine, d)
    assert volume["Labels"]["narwhal.cache.key"] == key
    assert volume["Labels"]["narwhal.cache.repo"] == git_repo.path
    assert "narwhal.job" not in volume["Labels"]

    git_repo.add_commit({"requirements.txt": "wheel==2\n"})
    new_key = expected_key(git_repo.path, git_repo.commit)
    assert new_key != key
    fresh = d.wait_job(d.submit(git_repo.path, git_repo.commit)[0]["id"])
    text = log_of(d, fresh["id"])
    assert f"cache {new_key}: miss" in text and "downloaded" in text and f"cache {new_key}: saved" in text
    assert len(cache_volumes(docker_engine, d)) == 2
    for job in (cold, warm, fresh):  # the cleanup runs after the outcome is recorded
        d.wait_for(lambda job=job: not job_leftovers(docker_engine, d, job["id"]), 30, "nothing of the job left")


def test_a_failing_job_saves_nothing(dispatcher, ssh_host, git_repo, docker_engine):
    steps = [{"name": "fill", "run": "mkdir -p .cache/x && echo data > .cache/x/f"},
             {"name": "fail", "run": "exit 3"}]
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(steps, cache=[{"key": "x", "paths": ".cache/x"}])})
    job = d.wait_job(d.submit(git_repo.path, git_repo.commit)[0]["id"])
    text = log_of(d, job["id"])
    assert job["status"] == "failed" and "cache x: miss" in text and "saved" not in text, text
    assert cache_volumes(docker_engine, d) == []
    d.wait_for(lambda: not job_leftovers(docker_engine, d, job["id"]), 30, "nothing of the job left")


def test_a_job_without_its_paths_saves_nothing_and_says_so(dispatcher, ssh_host, git_repo, docker_engine):
    d = dispatcher([ssh_host.runner_config()], {"ci": simple_pipeline(cache=[{"key": "x", "paths": [".cache/x"]}])})
    job = d.wait_job(d.submit(git_repo.path, git_repo.commit)[0]["id"])
    text = log_of(d, job["id"])
    assert job["status"] == "passed"
    assert "cache x: not saved: none of its paths exist (.cache/x)" in text, text
    [volume] = cache_volumes(docker_engine, d)  # created for the save, holding no generation
    assert in_volume(volume["Name"], "ls -A /c") == ""


def test_two_jobs_saving_one_key_at_once_leave_one_whole_generation(dispatcher, ssh_hosts, git_repo, docker_engine):
    # Two runners on one engine, two pipelines with one cache key: both jobs miss and save at once.
    fill = ("mkdir -p .cache/big && i=0; while [ $i -lt 400 ]; do "
            "dd if=/dev/urandom of=.cache/big/f$i bs=4096 count=4 2>/dev/null; i=$((i+1)); done; "
            "echo $NARWHAL_PIPELINE > .cache/big/who; cd .cache/big && cat f* | md5sum > ../sum && mv ../sum sum")
    cache = [{"key": "shared", "paths": [".cache/big"]}]
    hosts = ssh_hosts(2)
    d = dispatcher([h.runner_config() for h in hosts],
                   {"one": simple_pipeline([{"name": "fill", "run": fill}], cache=cache),
                    "two": simple_pipeline([{"name": "fill", "run": fill}], cache=cache)})
    jobs = d.submit(git_repo.path, git_repo.commit)
    done = [d.wait_job(j["id"]) for j in jobs]
    assert [j["status"] for j in done] == ["passed", "passed"]
    assert {j["runner"] for j in done} == {h.name for h in hosts}
    for job in done:
        assert "cache shared: saved (" in log_of(d, job["id"]), log_of(d, job["id"])
    [volume] = cache_volumes(docker_engine, d)
    # `current` names one generation; it is whole (its own checksum holds) and no half one is current.
    check = in_volume(volume["Name"], 'g=$(cat /c/current); cd /c/$g/.cache/big && ls f* | wc -l && cat who '
                                      '&& cat f* | md5sum && cat sum && ls -d /c/tmp-* 2>/dev/null | wc -l')
    count, who, actual, recorded, tmps = check.split("\n")[:5]
    assert int(count) == 400 and who in ("one", "two") and actual == recorded and int(tmps) == 0, check

    # The next commit's jobs both restore it.
    for job in d.submit(git_repo.path, git_repo.add_commit({"x": "y"})):
        assert d.wait_job(job["id"])["status"] == "passed"
        assert "cache shared: restored (" in log_of(d, job["id"]), log_of(d, job["id"])


def test_the_cache_sweep_evicts_by_size_and_by_age_and_the_reaper_does_not(dispatcher, ssh_host, git_repo,
                                                                              docker_engine):
    steps = [{"name": "fill", "run": "mkdir -p .cache/x && dd if=/dev/zero of=.cache/x/f bs=1024 count=200"}]
    pipeline = simple_pipeline(steps, cache=[{"key": "x", "paths": [".cache/x"]}])
    # Generous limits first: with health checks (and the reaper) every 0.5 s, the cache stays.
    d = dispatcher([ssh_host.runner_config()], {"ci": pipeline}, settings={"cache_sweep_interval": "1s"})
    job = d.wait_job(d.submit(git_repo.path, git_repo.commit)[0]["id"])
    assert job["status"] == "passed" and "cache x: saved" in log_of(d, job["id"])
    time.sleep(3)  # six health checks, each followed by the reaper; three sweeps
    [kept] = cache_volumes(docker_engine, d)
    assert "reaped" not in d.log() or kept["Name"] not in d.log()

    # Too big for a 100 KiB total: the sweep removes it.
    small = dispatcher([ssh_host.runner_config()], {"ci": pipeline},
                       settings={"cache_sweep_interval": "1s", "cache_max_total": "100k"})
    job = small.wait_job(small.submit(git_repo.path, git_repo.commit)[0]["id"])
    assert job["status"] == "passed" and "cache x: saved" in log_of(small, job["id"])
    small.wait_for(lambda: not cache_volumes(docker_engine, small), 30, "the cache evicted by size")
    small.wait_for(lambda: "least recently used" in small.log(), 10, "the eviction logged")

    # Unused for 2 s: the sweep removes it.
    old = dispatcher([ssh_host.runner_config()], {"ci": pipeline},
                     settings={"cache_sweep_interval": "1s", "cache_max_age": "2s"})
    job = old.wait_job(old.submit(git_repo.path, git_repo.commit)[0]["id"])
    assert job["status"] == "passed" and "cache x: saved" in log_of(old, job["id"])
    assert cache_volumes(docker_engine, old)
    old.wait_for(lambda: not cache_volumes(docker_engine, old), 30, "the cache evicted by age")
    old.wait_for(lambda: "unused for" in old.log(), 10, "the eviction logged")


def test_a_cancel_leaves_nothing_but_the_cache(dispatcher, ssh_host, git_repo, docker_engine):
    cache = [{"key": "x", "paths": [".cache/x"], "save": "always"}]
    fill = {"name": "fill", "run": "mkdir -p .cache/x && echo $NARWHAL_PIPELINE > .cache/x/f"}
    hang = {"name": "hang", "run": "cat .cache/x/f; echo hanging; sleep 120"}
    # One runner, one job at a time: a-warm fills the cache, then b-hang restores it and hangs.
    d = dispatcher([ssh_host.runner_config()], {"a-warm": simple_pipeline([fill], cache=cache),
                                               "b-hang": simple_pipeline([fill, hang], cache=cache)})
    warm, hung = d.submit(git_repo.path, git_repo.commit)
    assert d.wait_job(warm["id"])["status"] == "passed"
    job_id = hung["id"]
    d.wait_for(lambda: "hanging" in log_of(d, job_id), 60, "the hanging step")
    assert "cache x: restored (" in log_of(d, job_id)
    assert d.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = d.wait_job(job_id)
    assert job["status"] == "cancelled"
    d.wait_for(lambda: not job_leftovers(docker_engine, d, job_id), 30, "nothing of the job left")
    [volume] = cache_volumes(docker_engine, d)  # the cache alone, as a-warm saved it
    assert in_volume(volume["Name"], "cat /c/$(cat /c/current)/.cache/x/f").strip() == "a-warm"


# --- the scripts straight on the engine: races and interrupted saves --------------------------------


def _docker(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)


def test_saves_and_restores_racing_never_see_a_half_generation(docker_engine, test_image):
    owner = "race" + secrets.token_hex(6)
    labels = docker.labels(owner, 1, 1)
    cache = docker.cache_volume_name(owner, "/repo", "k")
    made: list[str] = [cache]
    try:
        assert _docker(docker.create_cache_volume(cache, docker.cache_labels(owner, "/repo", "k"))).returncode == 0
        workspaces = []
        for n in range(3):  # each workspace holds 300 files of its own content, and their checksum
            ws = f"narwhal-{docker.namespace(owner)}-{n}-1"
            made.append(ws)
            fill = (f"mkdir -p /workspace/c && cd /workspace/c && i=0; while [ $i -lt 300 ]; do "
                    f"echo {n}-$i > f$i; i=$((i+1)); done; cat f* | md5sum > /workspace/sum && mv /workspace/sum sum")
            out = _docker(["docker", "run", "--rm", "--network", "none", "--mount",
                           docker.workspace_mount(ws, labels), test_image, "sh", "-c", fill])
            assert out.returncode == 0, out.stderr
            workspaces.append(ws)
        token = secrets.token_hex(16)
        for round_ in range(2):
            procs = []
            for n, ws in enumerate(workspaces):  # three saves of one key at once...
                argv = docker.save_caches(f"narwhal-{docker.namespace(owner)}-save-{round_}-{n}", test_image, token,
                                          f"{round_}-{n}-{secrets.token_hex(2)}", [(cache, ["c"])], owner=owner,
                                          volume=ws, label_values=labels, max_kib=100000, stale=1)
                procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
            readers = []
            for r in range(3):  # ...and three restores reading it meanwhile
                ws = f"narwhal-{docker.namespace(owner)}-r{round_}{r}-1"
                made.append(ws)
                argv = docker.restore_caches(f"{ws}-restore", test_image, token, [(cache, ["c"])], owner=owner,
                                             volume=ws, label_values=labels)
                readers.append((ws, subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)))
            answers = [p.communicate(timeout=300)[0] for p in procs]
            assert all(f"{token} 0 saved " in a for a in answers), answers
            for ws, proc in readers:
                said = proc.communicate(timeout=300)[0]
                assert f"{token} 0 " in said, said
                if f"{token} 0 hit " in said:  # a restore that found a generation found a whole one
                    out = _docker(["docker", "run", "--rm", "--mount", f"type=volume,source={ws},target=/w",
                                   test_image, "sh", "-c", "cd /w/c && ls f* | wc -l && cat f* | md5sum && cat sum"])
                    count, actual, recorded = out.stdout.split("\n")[:3]
                    assert int(count) == 300 and actual == recorded, out.stdout
        # Old generations go `stale` (1 s; times are whole seconds) after they were retired. A
        # generation overtaken before it was ever current is retired by the first save that
        # finds it `stale` old; so two more saves, each past `stale`, leave the current one and
        # the one it replaced (a restore may still read that).
        for extra in ("extra-1", "extra-2"):
            time.sleep(2.1)
            argv = docker.save_caches(f"narwhal-{docker.namespace(owner)}-{extra}", test_image, token, extra,
                                      [(cache, ["c"])], owner=owner, volume=workspaces[0], label_values=labels,
                                      max_kib=100000, stale=1)
            assert f"{token} 0 saved" in _docker(argv).stdout
        listing = in_volume(cache, "ls -A /c").split()
        assert sorted(x for x in listing if x.startswith(("gen-", "tmp-"))) == ["gen-extra-1", "gen-extra-2"], listing
        assert in_volume(cache, "cat /c/current").strip() == "gen-extra-2"

        # A save stopped mid-copy (killed, its runner lost) leaves tmp-ID and ID.born, as here;
        # a later save drops them once they are `stale`, and `current` never named them.
        out = _docker(["docker", "run", "--rm", "--mount", f"type=volume,source={cache},target=/c", test_image, "sh",
                       "-c", "mkdir -p /c/tmp-killed-1/c && echo half > /c/tmp-killed-1/c/f0 && "
                             "date +%s > /c/killed-1.born"])
        assert out.returncode == 0, out.stderr
        name = f"narwhal-{docker.namespace(owner)}-killed"
        time.sleep(2.1)
        argv = docker.save_caches(f"{name}-after", test_image, token, "after-1", [(cache, ["c"])], owner=owner,
                                  volume=workspaces[0], label_values=labels, max_kib=100000, stale=1)
        assert f"{token} 0 saved" in _docker(argv).stdout
        listing = in_volume(cache, "ls -A /c")
        assert "tmp-killed-1" not in listing and "killed-1.born" not in listing, listing
        assert in_volume(cache, "cat /c/current").strip() == "gen-after-1"
    finally:
        _docker(["docker", "rm", "--force", *[c for c in _docker(
            ["docker", "ps", "-aq", "--filter", f"label=narwhal.owner={owner}"]).stdout.split()]])
        _docker(["docker", "volume", "rm", "--force", *made])


def test_a_bad_save_keeps_the_old_generation(docker_engine, test_image):
    owner = "toobig" + secrets.token_hex(6)
    labels = docker.labels(owner, 1, 1)
    cache = docker.cache_volume_name(owner, "/repo", "k")
    ws = f"narwhal-{docker.namespace(owner)}-1-1"
    try:
        _docker(docker.create_cache_volume(cache, docker.cache_labels(owner, "/repo", "k")))
        _docker(["docker", "run", "--rm", "--mount", docker.workspace_mount(ws, labels), test_image, "sh", "-c",
                 "mkdir -p /workspace/c && echo small > /workspace/c/f"])
        token = secrets.token_hex(16)
        save = docker.save_caches("narwhal-tb-1", test_image, token, "one", [(cache, ["c"])], owner=owner,
                                  volume=ws, label_values=labels, max_kib=1000, stale=1)
        assert f"{token} 0 saved" in _docker(save).stdout
        _docker(["docker", "run", "--rm", "--mount", docker.workspace_mount(ws, labels), test_image, "sh", "-c",
                 "dd if=/dev/zero of=/workspace/c/g bs=1024 count=2000 2>/dev/null"])
        save = docker.save_caches("narwhal-tb-2", test_image, token, "two", [(cache, ["c"])], owner=owner,
                                  volume=ws, label_values=labels, max_kib=1000, stale=1)
        assert re.search(rf"{token} 0 toobig \d+", _docker(save).stdout)
        assert in_volume(cache, "cat /c/current; ls -A /c").split() == ["gen-one", "current", "gen-one", "one.born"]
    finally:
        _docker(["docker", "volume", "rm", "--force", cache, ws])
