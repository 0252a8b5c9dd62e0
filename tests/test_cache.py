"""Caches without Docker: the key language, config errors, command lines, the reaper's view,
eviction choices, the last-use table and the runner's restore/save flow on a fake engine.

The real path (sshd, dockerd, racing saves) is tests/e2e/test_caches.py.
"""

from __future__ import annotations

import asyncio

import pytest

from narwhal.config.cache import (
    MAX_KEY,
    Branch,
    Hash,
    KeyTemplateError,
    Text,
    bound_key,
    digest,
    parse_key,
    render,
)
from narwhal.config.pipeline import parse_pipeline, parse_pipelines
from narwhal.config.yamlfile import parse_yaml
from narwhal.dispatch import caches as caches_mod
from narwhal.dispatch.store import Store
from narwhal.errors import ConfigError
from narwhal.execution import cache as cache_exec
from narwhal.execution import docker
from narwhal.execution.runner import JobSpec, reap, run_job
from narwhal.execution.transport import Result
from narwhal.job import JobStatus
from tests.test_runner_unit import COMMIT, IMAGE, FakeDocker, RecordingSink

OWNER = "0123456789abcdef0123456789abcdef"
ENTRIES = [("requirements.txt", "100644 blob " + "a" * 40), ("req/x", "100644 blob " + "b" * 40),
           ("req/y", "100644 blob " + "c" * 40)]


def listing(paths):
    return [(p, w) for p, w in ENTRIES if any(p == q or p.startswith(q + "/") for q in paths)]


# --- the key language --------------------------------------------------------------------------


def test_a_key_is_text_and_directives():
    assert parse_key("pip-{{ hash 'requirements.txt' \"req\" }}-{{branch}}") == (
        Text("pip-"), Hash(("requirements.txt", "req")), Text("-"), Branch())
    assert parse_key("plain.key_1") == (Text("plain.key_1"),)


@pytest.mark.parametrize("template, says", [
    ("", "expected a cache key"),
    ("a b", "not ' '"),
    ("pip-$HOME", "not '$'"),
    ("pip-${PY}", "matrix variables are written ${NAME} and must be declared"),
    ("{{ env 'HOME' }}", "unknown directive 'env'"),
    ("{{ hash }}", "needs at least one quoted path"),
    ("{{ hash requirements.txt }}", "takes quoted paths"),
    ("{{ hash '../etc/passwd' }}", "may not leave the workspace"),
    ("{{ hash '/etc/passwd' }}", "absolute path"),
    ("{{ hash 'a\x00b' }}", "control character"),
    ("{{ hash 'a' | sh }}", "takes quoted paths, got '|'"),
    ("{{ branch 'x' }}", "takes no arguments"),
    ("{{ hash 'a'", "unbalanced"),
    ("a }} b", "unbalanced"),
    ("{{ }}", "empty or unknown directive"),
    ("{{ hash 'it''s' }}", "touching quotes"),
    ("{{ hash 'open }}", "unclosed"),
    ("x" * 600, "at most 512 characters"),
    ("{{ " + " ".join(f"'f{i}'" for i in range(17)) + " }}", "unknown directive"),
])
def test_attack_bad_keys_say_what_is_wrong(template, says):
    with pytest.raises(KeyTemplateError) as info:
        parse_key(template)
    assert says in str(info.value)


def test_hash_paths_are_bounded():
    with pytest.raises(KeyTemplateError, match="at most 16 paths"):
        parse_key("{{ hash " + " ".join(f"'f{i}'" for i in range(17)) + " }}")


def test_render_hashes_the_commits_files_and_the_branch():
    asked = []

    def entries(paths):
        asked.append(paths)
        return listing(paths)

    key = render("pip-{{ hash 'requirements.txt' }}-{{ branch }}", branch="feature/x y", entries=entries)
    assert asked == [["requirements.txt"]]
    assert key == f"pip-{digest(['requirements.txt'], ENTRIES)}-feature-x-y"
    assert len(digest(["requirements.txt"], ENTRIES)) == 16
    # No hash: the mirror is not asked; no branch: empty.
    assert render("k-{{ branch }}", branch=None, entries=lambda p: pytest.fail("asked")) == "k-"


def test_a_hash_changes_with_content_and_a_missing_file_is_stable():
    base = digest(["requirements.txt"], ENTRIES)
    changed = [("requirements.txt", "100644 blob " + "d" * 40)]
    assert digest(["requirements.txt"], changed) != base
    assert digest(["nope"], []) == digest(["nope"], [])
    assert digest(["nope"], []) != digest(["other"], [])
    # A directory hashes every file under it; a file beside it does not count.
    assert digest(["req"], ENTRIES) == digest(["req"], listing(["req"]))
    assert digest(["req"], ENTRIES) != digest(["req"], listing(["req"])[:1])
    assert digest(["req"], ENTRIES) == digest(["req"], [*listing(["req"]), ("required", "x")])


def test_rendered_keys_are_bounded_and_safe():
    long = bound_key("a" * 500)
    assert len(long) == MAX_KEY and long != bound_key("a" * 499)
    assert bound_key("") == "-"
    assert bound_key("a\nb") == "a-b"


# --- config errors ------------------------------------------------------------------------------

PIPE = """\
repo: "*"
image: narwhal-test/busybox:latest
steps:
  - {name: build, run: make}
cache:
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_pipeline(parse_yaml(PIPE + text, "pipelines/p.yaml"))
    return [str(p) for p in info.value.problems]


def test_a_cache_entry_is_strict_and_located():
    assert problems("  - {key: k, paths: [a], bogus: 1}\n") == [
        "pipelines/p.yaml:6: cache[0].bogus: unknown key (allowed: key, paths, save)"]
    assert problems("  - key: \"{{ nope }}\"\n    paths: [a]\n") == [
        "pipelines/p.yaml:6: cache[0].key: unknown directive 'nope': a cache key knows "
        "{{ hash 'PATH' ... }} and {{ branch }}"]
    said = problems("  - key: k\n    paths: [../up, /abs, ok, ok/in]\n    save: sometimes\n")
    assert said[0].startswith("pipelines/p.yaml:7: cache[0].paths[3]: 'ok/in' overlaps 'ok' of this cache")
    assert any(s.startswith("pipelines/p.yaml:7: cache[0].paths[0]: a path may not leave the workspace") for s in said)
    assert any(s.startswith("pipelines/p.yaml:7: cache[0].paths[1]: expected a path relative") for s in said)
    assert any("cache[0].save" in s and "on_miss" in s for s in said)


def test_two_caches_may_not_share_a_key_or_a_path():
    said = problems("  - {key: k, paths: [a]}\n  - {key: k, paths: [a/b]}\n")
    assert "pipelines/p.yaml:7: cache[1].key: the same key as cache 1: one cache per key" in said
    assert "pipelines/p.yaml:7: cache[1].paths[0]: 'a/b' overlaps 'a' of cache 1" in said


def test_a_good_cache_and_its_defaults():
    pipe = parse_pipeline(parse_yaml(PIPE + "  - {key: \"pip-{{ hash 'r.txt' }}\", paths: .cache/pip/}\n", "p.yaml"))
    [cache] = pipe.cache
    assert (cache.paths, cache.save) == ([".cache/pip"], "on_miss")


def test_matrix_variables_reach_the_key():
    text = PIPE.replace("cache:\n", "matrix: {PY: ['3.11', '3.12']}\ncache:\n") + "  - {key: 'pip-${PY}', paths: [c]}\n"
    keys = [p.cache[0].key for p in parse_pipelines(parse_yaml(text, "p.yaml"))]
    assert keys == ["pip-3.11", "pip-3.12"]


def test_attack_an_undeclared_variable_is_not_the_shells():
    said = problems("  - {key: 'pip-${HOME}', paths: [c]}\n")
    assert "must be declared in matrix" in said[0]


def test_pull_requests_restore_but_never_save():
    pipe = parse_pipeline(parse_yaml(PIPE + "  - {key: k, paths: [c], save: always}\n", "p.yaml"))
    assert [c.save for c in cache_exec.keys_for(pipe, branch="main", event="push", entries=listing)] == ["always"]
    assert [c.save for c in cache_exec.keys_for(pipe, branch="main", event="pull_request",
                                                 entries=listing)] == ["never"]


# --- command lines ------------------------------------------------------------------------------


def test_a_cache_volume_is_named_by_a_hash_in_the_owners_namespace():
    name = docker.cache_volume_name(OWNER, "https://git.example.com/a.git", "pip-1")
    assert name.startswith(f"narwhal-{docker.namespace(OWNER)}-cache-") and len(name) == len(name.strip())
    assert name != docker.cache_volume_name(OWNER, "https://git.example.com/b.git", "pip-1")
    assert name != docker.cache_volume_name("another-owner-id", "https://git.example.com/a.git", "pip-1")
    assert "example" not in name and "pip" not in name


def test_attack_cache_labels_refuse_what_could_break_a_line():
    with pytest.raises(ValueError):
        docker.cache_labels(OWNER, "/repo", "k\nnarwhal.job=1")
    with pytest.raises(ValueError):
        docker.cache_labels(OWNER, "/repo", "x" * 2000)
    labels = docker.cache_labels(OWNER, "/repo", "k")
    argv = docker.create_cache_volume("narwhal-x-cache-1", labels)
    assert argv[:3] == ["docker", "volume", "create"] and argv[-2:] == ["--", "narwhal-x-cache-1"]
    assert "narwhal.cache.key=k" in argv and "narwhal.cache=1" in argv


HOSTILE = "$(touch /tmp/pwned);`id`'\"\\ --privileged"


def test_restore_and_save_are_hardened_and_take_paths_as_arguments():
    labels = docker.labels(OWNER, 5, 1)
    token = "ab" * 16
    restore = docker.restore_caches("narwhal-x-5-1-cache-restore", IMAGE, token, [("narwhal-x-cache-1", [HOSTILE])],
                                    owner=OWNER, volume="narwhal-x-5-1", label_values=labels)
    save = docker.save_caches("narwhal-x-5-1-cache-save", IMAGE, token, "5-1-abcd", [("narwhal-x-cache-1", [HOSTILE])],
                              owner=OWNER, volume="narwhal-x-5-1", label_values=labels, max_kib=100, stale=1260)
    for argv, script in ((restore, docker.CACHE_RESTORE), (save, docker.CACHE_SAVE)):
        assert argv[argv.index("--network") + 1] == "none"
        assert "--cap-drop" in argv and "no-new-privileges" in argv and "--privileged" not in argv[:argv.index("--")]
        tail = argv[argv.index("--") + 1:]
        assert tail[:4] == [IMAGE, "/bin/sh", "-c", script]
        assert tail[-1] == HOSTILE and HOSTILE not in script  # one positional argument, never the script
    mounts = [restore[i + 1] for i, a in enumerate(restore) if a == "--mount"]
    assert mounts[1].startswith("type=volume,source=narwhal-x-cache-1,target=/narwhal-cache/0,volume-nocopy,readonly")
    assert "readonly" not in mounts[0]  # the workspace it fills
    mounts = [save[i + 1] for i, a in enumerate(save) if a == "--mount"]
    assert mounts[0].endswith(",readonly") and "readonly" not in mounts[1]  # reads the workspace, writes the cache
    assert "narwhal.cache=1" in mounts[1] and f"volume-label=narwhal.owner={OWNER}" in mounts[1]


@pytest.mark.parametrize("bad", ["", "/abs", "../up", "a/../b", "-flag", "a\x00b"])
def test_attack_bad_paths_never_reach_a_helper(bad):
    with pytest.raises(ValueError):
        docker.restore_caches("n", IMAGE, "ab" * 16, [("v", [bad])], owner=OWNER, volume="w", label_values={})


@pytest.mark.parametrize("generation", ["", "A", "x/y", "-x", "x y", "x" * 80])
def test_attack_bad_generations_and_tokens_are_refused(generation):
    with pytest.raises(ValueError):
        docker.save_caches("n", IMAGE, "ab" * 16, generation, [("v", ["p"])], owner=OWNER, volume="w",
                           label_values={}, max_kib=1, stale=1)
    with pytest.raises(ValueError):
        docker.restore_caches("n", IMAGE, "not-hex", [("v", ["p"])], owner=OWNER, volume="w", label_values={})


# --- the reaper and the sweep -----------------------------------------------------------------


class Engine:
    """Volumes with labels; answers the reaper's and the sweep's listings."""

    name = "engine"

    def __init__(self, volumes: dict[str, dict[str, str]], sizes: dict[str, str] | None = None,
                 busy: set[str] | None = None):
        self.volumes = volumes
        self.sizes = sizes or {}
        self.busy = busy or set()
        self.commands: list[list[str]] = []

    async def run(self, argv, *, input=None, timeout=None) -> Result:
        self.commands.append(argv)
        filters = dict(argv[i + 1][len("label="):].split("=", 1) for i, a in enumerate(argv) if a == "--filter")
        out = b""
        if argv[1:3] == ["volume", "ls"]:
            lines = []
            for name, labels in self.volumes.items():
                if filters.items() <= labels.items():
                    lines.append(name if "\t" not in argv[-1] else "\t".join(
                        [name, labels.get("narwhal.job", ""), labels.get("narwhal.attempt", ""),
                         labels.get("narwhal.cache", "")]))
            out = "".join(line + "\n" for line in lines).encode()
        elif argv[1:3] == ["volume", "rm"]:
            gone = [n for n in argv[argv.index("--") + 1:] if n not in self.busy]
            for name in gone:
                self.volumes.pop(name, None)
            out = "".join(n + "\n" for n in gone).encode()
            return Result(argv, 1 if len(gone) < len(argv[argv.index("--") + 1:]) else 0, out, b"in use")
        elif argv[1:3] == ["system", "df"]:
            import json
            out = json.dumps([{"Name": n, "Size": s} for n, s in self.sizes.items()]).encode()
        elif argv[1:3] == ["ps", "--all"] or argv[1:3] == ["network", "ls"]:
            out = b""
        return Result(argv, 0, out, b"")


def test_the_reaper_leaves_cache_volumes_alone():
    cache = docker.cache_volume_name(OWNER, "/repo", "k")
    stale = docker.volume_name(OWNER, 1, 1)
    engine = Engine({cache: docker.cache_labels(OWNER, "/repo", "k"), stale: docker.labels(OWNER, 1, 1)})
    removed = asyncio.run(reap(engine, OWNER, set()))  # type: ignore[arg-type]
    assert removed == [stale] and set(engine.volumes) == {cache}


def test_eviction_by_age_then_least_recently_used():
    sizes = {"a": 100, "b": 100, "c": 100, "d": 100}
    used = {"a": 0.0, "b": 50.0, "c": 80.0, "d": 90.0}
    chosen = caches_mod.choose(sizes, used, now=100.0, max_age=60.0, max_total=150)
    assert [name for name, _ in chosen] == ["a", "b", "c"]
    assert chosen[0][1].startswith("unused for") and chosen[1][1].startswith("least recently used")
    assert caches_mod.choose(sizes, used, now=100.0, max_age=1000.0, max_total=0) == []


@pytest.mark.parametrize("text, size", [("31B", 31), ("1.5kB", 1500), ("2MB", 2_000_000), ("1.1GB", 1_100_000_000),
                                        ("N/A", 0), ("", 0), ("-1B", 0)])
def test_dockers_sizes(text, size):
    assert caches_mod.parse_size(text) == size


def test_the_last_use_table(store_spec):
    store = store_spec.open()
    uses = caches_mod.CacheUses(store)
    uses.touch([("v1", "/repo", "k1")], 100.0)
    uses.touch([("v1", "/repo", "k1")], 50.0)  # never moves back
    assert uses.last_used(["v1", "v2"], first_seen=200.0) == {"v1": 100.0, "v2": 200.0}
    assert uses.last_used(["v2"], first_seen=300.0) == {"v2": 200.0}  # first seen once
    uses.forget(["v1"])
    assert [row["volume"] for row in caches_mod.CacheUses(store).all()] == ["v2"]
    store.close()


def test_the_sweep_removes_what_it_chose_and_keeps_a_busy_one(tmp_path):
    uses = caches_mod.CacheUses(Store(str(tmp_path / "s.db")))
    mine = {n: docker.cache_labels(OWNER, "/repo", n) for n in ("old", "busy", "new")}
    other = {"theirs": docker.cache_labels("someone-else", "/repo", "x")}
    engine = Engine({**mine, **other}, sizes={"old": "1kB", "busy": "1kB", "new": "1kB", "theirs": "9GB"},
                    busy={"busy"})
    uses.touch([("old", "/repo", "old"), ("busy", "/repo", "busy")], 0.0)
    uses.touch([("new", "/repo", "new")], 1000.0)
    removed = asyncio.run(caches_mod.sweep(engine, OWNER, uses, now=1000.0, max_age=500.0,  # type: ignore[arg-type]
                                           max_total=0))
    assert [name for name, _ in removed] == ["old"]
    assert set(engine.volumes) == {"busy", "new", "theirs"}
    assert {row["volume"] for row in uses.all()} == {"busy", "new"}  # a busy one is tried again next time


# --- the runner's flow on a fake engine ---------------------------------------------------------


class CacheDocker(FakeDocker):
    """FakeDocker whose cache helpers answer: ``answer`` maps restore/save to a word per cache."""

    def __init__(self, answers: dict[str, list[str]], **kw):
        super().__init__(**kw)
        self.answers = answers

    async def run(self, argv, *, input=None, timeout=None) -> Result:
        if argv[1:3] == ["volume", "inspect"]:
            self.commands.append(argv)
            names = [n for n in argv[argv.index("--") + 1:] if n in self.volumes]
            return Result(argv, 0, "".join(n + "\n" for n in names).encode(), b"")
        return await super().run(argv, input=input, timeout=timeout)

    async def stream(self, argv, *, stdin=None, on_line=None, on_lines=None, timeout=None, masker=None,
                     pace=None) -> int:
        name = argv[argv.index("--name") + 1]
        for what in ("restore", "save"):
            if name.endswith(f"cache-{what}"):
                self.commands.append(argv)
                token = argv[argv.index("sh", argv.index("--")) + 1]
                lines = [f"{token} {i} {word}" for i, word in enumerate(self.answers.get(what, []))]
                (on_lines or (lambda batch: [on_line(x) for x in batch]))(["cp: noise", *lines])
                return 0
        return await super().stream(argv, stdin=stdin, on_line=on_line, on_lines=on_lines, timeout=timeout,
                                    masker=masker, pace=pace)


def job(caches, steps=None, event="push") -> JobSpec:
    from narwhal.config.inventory import Limits
    text = PIPE + "".join(f"  - {{key: {c}, paths: [p{i}]}}\n" for i, c in enumerate(caches))
    if steps is not None:
        text = text.replace("  - {name: build, run: make}\n", steps)
    pipe = parse_pipeline(parse_yaml(text, "p.yaml"))
    keys = cache_exec.keys_for(pipe, branch="main", event=event, entries=listing)
    return JobSpec(job_id=7, attempt=1, pipeline=pipe, repo="/repo", commit=COMMIT, branch="main", limits=Limits(),
                   log_cap=1 << 20, grace=1, network="none", caches=keys)


async def _archive():
    yield b""


def run(engine, spec) -> RecordingSink:
    sink = RecordingSink()
    asyncio.run(run_job(engine, spec, _archive, sink, asyncio.Event(), OWNER))
    return sink


def test_a_cold_job_misses_without_a_container_and_saves():
    engine = CacheDocker({"save": ["saved 2048"]})
    sink = run(engine, job(["k"]))
    assert sink.outcome.status is JobStatus.PASSED
    notes = sink.notes()
    assert "cache k: miss" in notes
    assert any(n.startswith("cache k: saved (2.0 MiB in ") for n in notes)
    assert not [a for a in engine.commands if "--name" in a and a[a.index("--name") + 1].endswith("cache-restore")]
    volume = docker.cache_volume_name(OWNER, "/repo", "k")
    assert engine.volumes[volume]["narwhal.cache.key"] == "k"
    saves = [a for a in engine.commands if "--name" in a and a[a.index("--name") + 1].endswith("cache-save")]
    assert len(saves) == 1 and saves[0][saves[0].index("--label") + 1].startswith("narwhal=")


def test_a_warm_job_restores_and_does_not_save_again():
    engine = CacheDocker({"restore": ["hit 12"]})
    engine.volumes[docker.cache_volume_name(OWNER, "/repo", "k")] = docker.cache_labels(OWNER, "/repo", "k")
    sink = run(engine, job(["k"]))
    assert sink.outcome.status is JobStatus.PASSED
    assert any(n.startswith("cache k: restored (12 KiB in ") for n in sink.notes())
    assert not any("saved" in n for n in sink.notes())
    assert "cp: noise" not in sink.lines  # a helper's own lines are not the job's log


def test_a_failing_job_saves_nothing():
    engine = CacheDocker({"save": ["saved 1"]}, script={"0": (["boom"], 3)})
    sink = run(engine, job(["k"]))
    assert sink.outcome.status is JobStatus.FAILED
    assert not any(a for a in engine.commands if a[1:3] == ["volume", "create"])
    assert not any("saved" in n for n in sink.notes())


@pytest.mark.parametrize("word, note", [
    ("empty", "cache k: not saved: none of its paths exist (p0)"),
    ("toobig 4194304", "cache k: not saved: 4.00 GiB is more than cache_max_size (2.00 GiB)"),
    ("failed", "cache k: save failed (exit 0): cp: noise"),
])
def test_a_save_that_does_not_happen_is_a_note_and_the_job_passes(word, note):
    sink = run(CacheDocker({"save": [word]}), job(["k"]))
    assert sink.outcome.status is JobStatus.PASSED and note in sink.notes()


def test_several_caches_are_one_helper_each_way():
    engine = CacheDocker({"save": ["saved 1", "saved 2"]})
    sink = run(engine, job(["a", "b"]))
    assert sink.outcome.status is JobStatus.PASSED
    helpers = [a for a in engine.commands if "--name" in a and "cache-" in a[a.index("--name") + 1]]
    assert len(helpers) == 1
    assert [n for n in sink.notes() if n.startswith("cache")][:2] == ["cache a: miss", "cache b: miss"]
