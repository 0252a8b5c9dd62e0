"""inventory: runner models, defaults, and the error contract."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from narwhal.config.inventory import (
    DEFAULT_LIMITS,
    Inventory,
    Limits,
    Runner,
    load_inventory,
    parse_inventory,
    validate_runner,
)
from narwhal.config.settings import DEFAULT_SETTINGS, Settings
from narwhal.config.yamlfile import parse_yaml
from narwhal.errors import ConfigError


def inventory(text: str) -> Inventory:
    return parse_inventory(parse_yaml(text, "inventory.yaml"))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        inventory(text)
    return [str(p) for p in info.value.problems]


def test_minimal_runner_gets_every_default():
    (runner,) = inventory("runners:\n  - name: r1\n").runners
    assert runner.host == "localhost" and runner.port == 22 and runner.user == "narwhal"
    assert runner.key is None and runner.capacity == 1 and runner.transport == "ssh"
    assert runner.labels == [] and runner.limits == DEFAULT_LIMITS
    assert DEFAULT_LIMITS == Limits(memory="2g", cpus=2.0, pids=1024)
    assert runner.known_hosts == "~/.ssh/known_hosts"
    assert runner.known_hosts_path == Path(os.path.expanduser("~/.ssh/known_hosts"))


def test_full_runner():
    inv = inventory(
        "runners:\n"
        "  - name: build-1.example\n"
        "    host: 10.0.0.7\n"
        "    port: 2222\n"
        "    user: ci_user\n"
        "    key: ~/keys/id\n"
        "    labels: [linux, docker, arch:x86_64, linux]\n"
        "    capacity: 4\n"
        "    limits: {memory: 4G, cpus: 1.5, pids: 100}\n"
        "  - {name: v6, host: '::1'}\n"
        "  - {name: me, transport: local}\n"
    )
    r = inv.runners[0]
    assert r.key == os.path.expanduser("~/keys/id") and not r.key.startswith("~")
    assert r.labels == ["linux", "docker", "arch:x86_64"]  # repeats dropped
    assert r.limits == Limits(memory="4g", cpus=1.5, pids=100)
    assert inv.runners[1].host == "::1"
    assert inv.runners[2].is_local
    assert inv.runner("me") is inv.runners[2] and inv.runner("nope") is None


def test_carries_labels():
    r = Runner(name="r", labels=["a", "b"])
    assert r.carries([]) and r.carries(["a"]) and r.carries(["b", "a"])
    assert not r.carries(["a", "gpu"])


def test_wrong_type_message_has_file_line_and_path():
    assert problems("runners:\n  - name: r1\n    port: ssh\n") == [
        "inventory.yaml:3: runners[0].port: expected an integer, got 'ssh'"
    ]


def test_unknown_key_lists_allowed_keys():
    (message,) = problems("runners:\n  - name: r1\n    cpus: 4\n")
    assert message == (
        "inventory.yaml:3: runners[0].cpus: unknown key (allowed: name, host, port, user, key, "
        "known_hosts, labels, capacity, transport, limits, network)"
    )
    (message,) = problems("runners:\n  - name: r1\n    limits: {cpu: 4}\n")
    assert message == "inventory.yaml:3: runners[0].limits.cpu: unknown key (allowed: memory, cpus, pids)"
    (message,) = problems("runner:\n  - name: r1\n")
    assert message == "inventory.yaml:1: runner: unknown key (allowed: runners, defaults, settings, secrets, forges, repos)"


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("name", "'-bad'", "runners[0].name: expected a name of letters"),
        ("name", "'a b'", "runners[0].name: expected a name of letters"),
        ("host", "'-oProxyCommand=x'", "runners[0].host: expected a host name or IP address, got '-oProxyCommand=x'"),
        ("host", "'a b'", "runners[0].host: expected a host name or IP address"),
        ("port", "0", "runners[0].port: expected a number >= 1, got 0"),
        ("port", "70000", "runners[0].port: expected a number <= 65535, got 70000"),
        ("port", "'22'", "runners[0].port: expected an integer, got '22'"),
        ("user", "Root", "runners[0].user: expected a user name"),
        ("user", "3", "runners[0].user: expected a string, got 3"),
        ("key", "'-i'", "runners[0].key: expected a file path, got '-i'"),
        ("labels", "linux", "runners[0].labels: expected a list, got 'linux'"),
        ("labels", "[ok, 'b d']", "runners[0].labels[1]: expected a label"),
        ("capacity", "0", "runners[0].capacity: expected a number >= 1, got 0"),
        ("capacity", "1.5", "runners[0].capacity: expected an integer, got 1.5"),
        ("transport", "telnet", "runners[0].transport: expected one of 'ssh', 'local', got 'telnet'"),
        ("limits", "[]", "runners[0].limits: expected a mapping, got a list"),
        ("limits", "{memory: 2t}", "runners[0].limits.memory: expected a size > 0 such as '512m' or '2g', got '2t'"),
        ("limits", "{memory: 0}", "runners[0].limits.memory: expected a size > 0"),
        ("limits", "{cpus: 0}", "runners[0].limits.cpus: expected a number > 0, got 0"),
        ("limits", "{cpus: yes}", "runners[0].limits.cpus: expected a number, got true"),
        ("limits", "{pids: -1}", "runners[0].limits.pids: expected a number > 0, got -1"),
    ],
)
def test_bad_values(field, value, expected):
    text = f"runners:\n  - name: {value}\n" if field == "name" else f"runners:\n  - name: r1\n    {field}: {value}\n"
    (message,) = problems(text)
    assert message.startswith(f"inventory.yaml:{2 if field == 'name' else 3}: {expected}")


def test_structure_errors():
    assert problems("- a\n") == ["inventory.yaml:1: expected a mapping, got a list"]
    assert problems("runners: {name: a}\n") == ["inventory.yaml:1: runners: expected a list, got a mapping"]
    assert problems("runners:\n  - 5\n") == ["inventory.yaml:2: runners[0]: expected a mapping, got 5"]
    assert problems("runners:\n  - host: x\n") == ["inventory.yaml:2: runners[0].name: required"]


def test_empty_inventory_has_no_runners():
    assert inventory("").runners == []
    assert inventory("runners: []\n").runners == []


def test_duplicate_runner_name_is_reported_at_the_duplicate():
    assert problems("runners:\n  - name: a\n  - name: b\n  - name: a\n") == [
        "inventory.yaml:4: runners[2].name: duplicate runner name 'a' (first at line 2)"
    ]


def test_all_problems_at_once_sorted_by_line():
    found = problems(
        "defaults:\n"
        "  bogus: 1\n"
        "runners:\n"
        "  - name: a\n"
        "    port: ssh\n"
        "  - name: a\n"
        "    capacity: none\n"
    )
    assert found == [
        "inventory.yaml:2: defaults.bogus: unknown key (allowed: name, host, port, user, key, known_hosts, labels, capacity, transport, limits, network)",
        "inventory.yaml:5: runners[0].port: expected an integer, got 'ssh'",
        "inventory.yaml:6: runners[1].name: duplicate runner name 'a' (first at line 4)",
        "inventory.yaml:7: runners[1].capacity: expected an integer, got 'none'",
    ]


def test_defaults_merge_under_each_runner():
    inv = inventory(
        "defaults:\n  user: ci\n  labels: [linux]\n  port: 2200\n"
        "runners:\n  - name: a\n  - name: b\n    labels: [gpu]\n    port: 22\n"
    )
    a, b = inv.runners
    assert (a.user, a.labels, a.port) == ("ci", ["linux"], 2200)
    assert (b.user, b.labels, b.port) == ("ci", ["gpu"], 22)  # the runner's own value wins


def test_defaults_are_validated_once_and_cannot_name():
    assert problems("defaults:\n  port: x\nruners: []\n")[0] == "inventory.yaml:2: defaults.port: expected an integer, got 'x'"
    assert problems("defaults:\n  name: x\n") == ["inventory.yaml:2: defaults.name: a runner's name cannot have a default"]
    assert problems("defaults: 3\n") == ["inventory.yaml:1: defaults: expected a mapping, got 3"]
    # a bad default is reported once, not once per runner
    assert problems("defaults:\n  port: x\nrunners:\n  - name: a\n  - name: b\n") == [
        "inventory.yaml:2: defaults.port: expected an integer, got 'x'"
    ]


def test_validate_runner_for_the_api():
    allow_x = replace(DEFAULT_SETTINGS, api_runner_labels=("x",))
    runner = validate_runner({"name": "api-1", "host": "127.0.0.2", "labels": ["x"]}, settings=allow_x)
    assert runner.name == "api-1" and runner.port == 22
    with pytest.raises(ConfigError) as info:
        validate_runner({"name": "api-1", "port": "ssh", "extra": 1})
    assert [str(p) for p in info.value.problems] == [
        "api: runner.port: expected an integer, got 'ssh'",
        "api: runner.extra: unknown key (allowed: name, host, port, user, key, known_hosts, labels, capacity, transport, limits, network)",
    ]
    assert info.value.to_dict()["problems"][0] == {
        "file": "api", "line": None, "path": "runner.port", "message": "expected an integer, got 'ssh'"
    }
    with pytest.raises(ConfigError, match="api: runner: expected a mapping, got a list"):
        validate_runner([1])
    assert validate_runner({"name": "d"}, defaults={"user": "ci"}).user == "ci"


def test_load_inventory_from_a_file(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text("runners:\n  - name: a\n    port: ssh\n")
    with pytest.raises(ConfigError) as info:
        load_inventory(path, "inventory.yaml")
    assert str(info.value) == "inventory.yaml:3: runners[0].port: expected an integer, got 'ssh'"
    path.write_text("runners:\n  - name: a\n")
    assert load_inventory(path).runners[0].name == "a"


def test_shipped_inventory_is_valid():
    root = Path(__file__).resolve().parent.parent
    inv = load_inventory(root / "inventory.yaml")
    (runner,) = inv.runners
    assert (runner.name, runner.transport, runner.labels, runner.capacity) == ("local", "local", ["linux", "docker"], 2)


@pytest.mark.parametrize("network", ["none", "host", "bridge", "ci-net_1"])
def test_runner_network_choices(network):
    assert validate_runner({"name": "r", "network": network}, source="inventory").network == network


@pytest.mark.parametrize("network", ["container:other", "-x", "a b", "", "host;rm"])
def test_runner_network_refuses_other_values(network):
    with pytest.raises(ConfigError, match="network"):
        validate_runner({"name": "r", "network": network}, source="inventory")


def test_runner_network_defaults_to_none():
    assert validate_runner({"name": "r"}).network == "none"


# --- runners added over the API are untrusted (issue "Trust boundaries", findings 2 and 4) ----


def _problems(data: dict, **kw) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        validate_runner(data, "api", **kw)
    return {p.path: p.message for p in info.value.problems}


@pytest.mark.parametrize("field, value", [("transport", "local"), ("network", "host"), ("network", "bridge")])
def test_finding4_api_runner_cannot_choose_local_transport_or_a_network(field, value):
    problems = _problems({"name": "rogue", field: value})
    assert list(problems) == [f"runner.{field}"] and "inventory only" in problems[f"runner.{field}"]


def test_finding4_api_runner_gets_ssh_and_no_network_even_if_the_defaults_say_otherwise():
    runner = validate_runner({"name": "r"}, "api", {"transport": "local", "network": "host", "user": "ci"})
    assert (runner.transport, runner.network, runner.user) == ("ssh", "none", "ci")
    trusted = validate_runner({"name": "r"}, "inventory", {"transport": "local", "network": "host"})
    assert (trusted.transport, trusted.network) == ("local", "host")


@pytest.mark.parametrize("capacity, message", [
    (1000, "at most 4 for a runner added over the API (setting api_runner_max_capacity), got 1000"),
    (1e23, "expected an integer, got 1e+23"),
    (10**23, "expected a number <= 1024"),
    (True, "expected an integer"),
])
def test_finding4_api_runner_capacity_is_bounded(capacity, message):
    assert message in _problems({"name": "r", "capacity": capacity})["runner.capacity"]


def test_capacity_bound_is_a_setting_and_1024_for_everyone():
    assert validate_runner({"name": "r", "capacity": 8}, "api",
                           settings=Settings(api_runner_max_capacity=8)).capacity == 8
    assert validate_runner({"name": "r", "capacity": 1024}, "inventory").capacity == 1024
    with pytest.raises(ConfigError, match="runner.capacity"):
        validate_runner({"name": "r", "capacity": 1025}, "inventory")


@pytest.mark.parametrize("field", ["key", "known_hosts"])
def test_finding2_api_runner_cannot_name_files_without_runner_files_dir(field):
    message = _problems({"name": "r", field: "/etc/shadow"})[f"runner.{field}"]
    assert "cannot name files" in message and "runner_files_dir" in message
    # ...and takes the inventory's defaults instead
    runner = validate_runner({"name": "r"}, "api", {"known_hosts": "/srv/kh", "key": "/srv/key"})
    assert (runner.known_hosts, runner.key) == ("/srv/kh", "/srv/key")


@pytest.mark.parametrize("value", ["/etc/passwd", "../outside", "sub/../../outside", "link", "", "-x", 3])
def test_finding2_api_runner_files_are_confined_to_runner_files_dir(tmp_path, value):
    allowed = tmp_path / "runners"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "link").symlink_to("/etc/passwd")
    settings = Settings(runner_files_dir=str(allowed))
    problems = _problems({"name": "r", "known_hosts": value}, settings=settings)
    assert "inside the directory the setting runner_files_dir names" in problems["runner.known_hosts"]
    assert "root:" not in str(problems)


def test_api_runner_files_inside_runner_files_dir_are_resolved_there(tmp_path):
    settings = Settings(runner_files_dir=str(tmp_path))
    runner = validate_runner({"name": "r", "known_hosts": "kh", "key": str(tmp_path / "sub" / "k")},
                             "api", settings=settings)
    assert (runner.known_hosts, runner.key) == (str(tmp_path / "kh"), str(tmp_path / "sub" / "k"))


def test_every_api_refusal_is_reported_at_once():
    problems = _problems({"name": "r", "transport": "local", "network": "host", "capacity": 1000,
                          "key": "/etc/shadow", "known_hosts": "/etc/passwd"})
    assert sorted(problems) == ["runner.capacity", "runner.key", "runner.known_hosts",
                                "runner.network", "runner.transport"]


def test_finding4_api_runner_takes_the_inventory_limits_and_only_allowed_labels():
    """A token holder's runner cannot lift the step limits, nor claim a label such as
    'secure' to be chosen for the pipelines (and secrets) that ask for it."""
    with pytest.raises(ConfigError) as info:
        validate_runner({"name": "r", "limits": {"memory": "999999g", "cpus": 100000.0, "pids": 999999999}})
    assert [p.path for p in info.value.problems] == ["runner.limits"]
    with pytest.raises(ConfigError, match="api_runner_labels lists \\(none\\); not secure"):
        validate_runner({"name": "r", "labels": ["secure"]})
    allowed = replace(DEFAULT_SETTINGS, api_runner_labels=("gpu",))
    assert validate_runner({"name": "r", "labels": ["gpu"]}, settings=allowed).labels == ["gpu"]
    with pytest.raises(ConfigError, match="not secure"):
        validate_runner({"name": "r", "labels": ["gpu", "secure"]}, settings=allowed)
    limited = validate_runner({"name": "r"}, defaults={"limits": {"memory": "512m"}})
    assert limited.limits.memory == "512m"
    # The inventory's own runners choose freely: the admin wrote them.
    assert validate_runner({"name": "r", "labels": ["secure"], "limits": {"memory": "8g"}},
                           source="inventory").limits.memory == "8g"
