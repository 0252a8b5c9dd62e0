"""docker.py: argv builders carry the hardened baseline, and user data stays one argv element."""

from __future__ import annotations

import pytest

from narwhal.config import inventory
from narwhal.execution import docker

HOSTILE = ["$(touch /tmp/pwned)", "; rm -rf /", "a\nb", "--privileged", "`id`", "it's \"quoted\""]


def step_argv(**overrides) -> list[str]:
    kwargs = dict(volume="narwhal-7-2", label_values=docker.labels("owner1", 7, 2, "build"),
                  limits=None, env={"A": "1"}, network="none")
    kwargs.update(overrides)
    return docker.run_step("narwhal-7-2-0", "busybox:latest", "make test", **kwargs)


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def options(argv: list[str]) -> list[str]:
    """The docker options part of a `docker run` argv (before the `--` that precedes the image)."""
    return argv[:argv.index("--")]


def test_step_has_hardened_baseline():
    argv = step_argv()
    opts = options(argv)
    assert flag_values(opts, "--cap-drop") == ["ALL"]
    assert flag_values(opts, "--cap-add") == list(docker.CAPABILITIES)
    assert flag_values(opts, "--security-opt") == ["no-new-privileges"]
    assert flag_values(opts, "--memory") == ["2g"]
    assert flag_values(opts, "--cpus") == ["2"]
    assert flag_values(opts, "--pids-limit") == ["1024"]
    assert flag_values(opts, "--network") == ["none"]
    assert "--privileged" not in argv
    assert "--rm" in opts


def test_capabilities_are_few_and_named_once():
    assert set(docker.CAPABILITIES) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETUID", "SETGID"}
    assert "SYS_ADMIN" not in docker.CAPABILITIES and "NET_RAW" not in docker.CAPABILITIES


def test_limits_come_from_the_runner():
    limits = inventory.Limits(memory="512m", cpus=0.5, pids=64)
    opts = options(step_argv(limits=limits))
    assert flag_values(opts, "--memory") == ["512m"]
    assert flag_values(opts, "--cpus") == ["0.5"]
    assert flag_values(opts, "--pids-limit") == ["64"]
    assert flag_values(options(step_argv(limits={"memory": "1g"})), "--memory") == ["1g"]


@pytest.mark.parametrize("limits", [{"memory": "lots"}, {"memory": "1g; id"}, {"memory": "1g\nx"},
                                    {"memory": "\u0661g"}, {"memory": "0g"}, {"cpus": 0}, {"pids": -1},
                                    {"colour": "red"}])
def test_bad_limits_are_refused(limits):
    with pytest.raises(ValueError):
        docker.limits_of(limits)


def test_limits_are_the_inventory_limits():
    """One Limits class, one memory rule: docker takes the inventory's, normalised."""
    assert docker.Limits is inventory.Limits and docker.DEFAULT_LIMITS is inventory.DEFAULT_LIMITS
    assert docker.limits_of({"memory": " 1G\n"}).memory == "1g"
    runner_limits = inventory.Limits(memory="3g")
    assert docker.limits_of(runner_limits) is runner_limits


def test_labels_and_names():
    argv = step_argv()
    assert argv[argv.index("--name") + 1] == "narwhal-7-2-0"
    assert flag_values(argv, "--label") == ["narwhal=1", "narwhal.owner=owner1", "narwhal.job=7",
                                            "narwhal.attempt=2", "narwhal.step=build"]
    assert docker.container_name("owner1", 7, 2, 0) == "narwhal-owner1-7-2-0"
    assert docker.volume_name("owner1", 7, 2) == "narwhal-owner1-7-2"
    assert flag_values(argv, "--mount") == [
        "type=volume,source=narwhal-7-2,target=/workspace,volume-label=narwhal=1,"
        "volume-label=narwhal.owner=owner1,volume-label=narwhal.job=7,volume-label=narwhal.attempt=2"]
    assert flag_values(argv, "--workdir") == ["/workspace"]


def test_names_differ_between_owners_sharing_an_engine():
    a, b = "e1eb40e49cdf40929764a20a8d3e33e4", "5ddb8df23ee743a981c0d4b2c8d93ab6"
    assert docker.container_name(a, 1, 1, 0) == "narwhal-8d3e33e4-1-1-0"
    assert docker.container_name(a, 1, 1, 0) != docker.container_name(b, 1, 1, 0)
    assert docker.volume_name(a, 1, 1) != docker.volume_name(b, 1, 1)
    assert docker.namespace("Test-ABC/../x") == "testabcx"  # only [a-z0-9] reach a name
    assert docker.namespace("---") == "x"


@pytest.mark.parametrize("hostile", HOSTILE)
def test_user_strings_are_single_argv_elements(hostile):
    argv = docker.run_step("narwhal-1-1-0", "img", hostile, volume="v",
                           label_values=docker.labels("o", 1, 1, hostile), env={"X": hostile})
    # the run string is exactly one element, after the image, handed to /bin/sh -e -c
    assert argv[argv.index("--") + 1:] == ["img", *docker.MERGE_WRAPPER, hostile]
    assert docker.MERGE_WRAPPER[2] == 'exec 2>&1; exec /bin/sh -e -c "$1"'  # fixed text, no user data
    assert f"X={hostile}" in flag_values(argv, "--env")
    assert f"narwhal.step={hostile}" in flag_values(argv, "--label")
    # nothing hostile shows up as an option of its own
    assert hostile not in options(argv)


@pytest.mark.parametrize("image", ["-v", "--privileged", "", "a b", "img\n", "img\x00"])
def test_bad_image_names_are_refused(image):
    with pytest.raises(ValueError):
        docker.run_step("n", image, "true", volume="v", label_values={})


@pytest.mark.parametrize("name", ["", "1A", "A B", "A=B", "-e", "A;B", "A\nB", "A\n"])
def test_bad_env_names_are_refused(name):
    with pytest.raises(ValueError, match="environment variable"):
        step_argv(env={name: "x"})


def test_env_always_has_a_value():
    # `-e NAME` without '=' would copy the runner's own environment into the container
    argv = step_argv(env={"EMPTY": "", "A": "x=y"})
    assert flag_values(argv, "--env") == ["EMPTY=", "A=x=y"]


TOKEN = "0123456789abcdef0123456789abcdef"


def test_first_step_checks_out_from_stdin():
    argv = docker.run_step("narwhal-1-1-0", "img", "make", volume="narwhal-1-1",
                           label_values=docker.labels("o", 1, 1), checkout=TOKEN)
    assert "-i" in options(argv)
    # the token comes after the step's command, as $2: the wrapper's text holds no job data
    assert argv[argv.index("--") + 1:] == ["img", *docker.CHECKOUT_WRAPPER, "make", TOKEN]
    assert docker.CHECKOUT_WRAPPER[2].startswith("tar -x -C /workspace ||")
    assert 'echo "$2"; ' in docker.CHECKOUT_WRAPPER[2]
    assert flag_values(options(argv), "--cap-drop") == ["ALL"]
    later = docker.run_step("narwhal-1-1-1", "img", "make", volume="narwhal-1-1",
                            label_values=docker.labels("o", 1, 1))
    assert "-i" not in options(later)


@pytest.mark.parametrize("bad", ["a,b", "a=b", "x y", ""])
def test_mount_refuses_values_that_would_break_its_syntax(bad):
    with pytest.raises(ValueError):
        docker.workspace_mount(bad, {})
    with pytest.raises(ValueError):
        docker.workspace_mount("v", {"narwhal.job": bad})


def test_control_commands():
    assert docker.stop("n", 2.7) == ["docker", "stop", "--time", "2", "--", "n"]
    assert docker.kill("n") == ["docker", "kill", "--", "n"]
    assert docker.remove_containers(["a", "b"]) == ["docker", "rm", "--force", "--volumes", "--", "a", "b"]
    assert docker.remove_volumes(["v"]) == ["docker", "volume", "rm", "--force", "--", "v"]
    assert docker.ps_by_label({"narwhal.owner": "o"})[:6] == [
        "docker", "ps", "--all", "--no-trunc", "--filter", "label=narwhal.owner=o"]
    assert docker.volumes_by_label({"narwhal.job": "3"})[:5] == [
        "docker", "volume", "ls", "--filter", "label=narwhal.job=3"]
    assert docker.ps_by_name("narwhal-1-1-0") == [
        "docker", "ps", "--all", "--filter", r"name=^narwhal\-1\-1\-0$", "--format", "{{.Names}}"]


@pytest.mark.parametrize("token", ["", "abc", "0123456789ABCDEF", "0123456789abcdef; id", "g" * 16])
def test_a_checkout_token_is_hex_only(token):
    with pytest.raises(ValueError, match="checkout token"):
        docker.run_step("n", "img", "true", volume="v", label_values={}, checkout=token)


# --- services (issue 13) ------------------------------------------------------------------


def service_argv(command=None, **overrides) -> list[str]:
    kwargs = dict(alias="db", network="narwhal-o-7-2", label_values=docker.labels("o", 7, 2),
                  limits=None, env={"POSTGRES_PASSWORD": "x"})
    kwargs.update(overrides)
    return docker.run_service("narwhal-o-7-2-svc-db", "postgres:16", command, **kwargs)


def test_a_service_has_the_steps_baseline_on_the_job_network():
    argv = service_argv()
    opts = options(argv)
    assert opts[:7] == ["docker", "run", "--rm", "--name", "narwhal-o-7-2-svc-db", "--log-driver", "none"]
    assert "-d" not in opts and "-i" not in opts  # attached: the stream's end is the service's end
    assert flag_values(opts, "--cap-drop") == ["ALL"] and flag_values(opts, "--cap-add") == list(docker.CAPABILITIES)
    assert flag_values(opts, "--security-opt") == ["no-new-privileges"]
    assert flag_values(opts, "--memory") == ["2g"] and flag_values(opts, "--pids-limit") == ["1024"]
    assert flag_values(opts, "--network") == ["narwhal-o-7-2"]
    assert flag_values(opts, "--network-alias") == ["db"]
    assert flag_values(opts, "--env") == ["POSTGRES_PASSWORD=x"]
    assert "--mount" not in opts and "--privileged" not in argv  # no workspace
    assert argv[argv.index("--") + 1:] == ["postgres:16"]  # the image's own command


def test_a_service_command_string_is_one_shell_argument_and_a_list_is_arguments():
    hostile = "$(id); --privileged"
    assert service_argv(hostile)[-4:] == ["postgres:16", "/bin/sh", "-c", hostile]
    assert service_argv(["postgres", "-c", "fsync=off"])[-4:] == ["postgres:16", "postgres", "-c", "fsync=off"]
    assert hostile not in options(service_argv(hostile))


@pytest.mark.parametrize("alias", ["DB", "-db", "a b", "db;x", ""])
def test_a_service_alias_is_a_host_name(alias):
    with pytest.raises(ValueError, match="service name"):
        service_argv(alias=alias)


@pytest.mark.parametrize("network", ["a,b", "a b", "--x=y"])
def test_a_network_name_is_plain(network):
    with pytest.raises(ValueError):
        service_argv(network=network)


def test_service_names_and_labels():
    assert docker.service_container_name("owner1", 7, 2, "db") == "narwhal-owner1-7-2-svc-db"
    assert docker.network_name("owner1", 7, 2) == "narwhal-owner1-7-2"
    with pytest.raises(ValueError):
        docker.service_container_name("owner1", 7, 2, "../x")


def test_network_commands():
    labels = docker.labels("o", 7, 2)
    assert docker.create_network("narwhal-o-7-2", labels, internal=True) == [
        "docker", "network", "create", "--driver", "bridge", "--internal", "--label", "narwhal=1",
        "--label", "narwhal.owner=o", "--label", "narwhal.job=7", "--label", "narwhal.attempt=2",
        "--", "narwhal-o-7-2"]
    assert "--internal" not in docker.create_network("n", labels, internal=False)
    assert docker.remove_networks(["a", "b"]) == ["docker", "network", "rm", "--", "a", "b"]
    assert docker.networks_by_label({"narwhal.owner": "o"}) == [
        "docker", "network", "ls", "--filter", "label=narwhal.owner=o", "--format", docker.VOLUME_FORMAT]


def test_readiness_checks_are_fixed_programs():
    hostile = "pg_isready; $(id)"
    assert docker.exec_command("c", hostile) == ["docker", "exec", "--", "c", "/bin/sh", "-c", hostile]
    argv = docker.exec_port_check("c", 5432)
    assert argv == ["docker", "exec", "--", "c", "/bin/sh", "-c", docker.PORT_CHECK, "sh", "1538"]
    assert docker.exec_port_check("c", 80)[-1] == "0050"
    for port in (0, 65536, True, "80"):
        with pytest.raises(ValueError):
            docker.exec_port_check("c", port)
    assert docker.ps_running("narwhal-1") == [
        "docker", "ps", "--filter", r"name=^narwhal\-1$", "--filter", "status=running", "--format", "{{.Names}}"]
