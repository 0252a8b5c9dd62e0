"""The boundary between the product and its test rig.

``narwhal`` is what users install; ``testbed`` (sshd hosts, runner users, network
namespaces) is the test environment and is not shipped. The one place the product
changes the machine is the demo's announced engine set-up, ``narwhal/cli/engine.py``.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import parse_python

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("narwhal", "setup.cfg", "pyproject.toml", "README.md")
ENGINE_SETUP = ROOT / "narwhal" / "cli" / "engine.py"
MACHINE_CHANGING = re.compile(r"\b(apt-get|useradd|usermod|groupadd)\b|\bip\s+netns\b")


def test_only_narwhal_is_packaged():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["options.packages.find"]["include"].split(", ") == ["narwhal", "narwhal.*"]


def test_a_real_install_ships_narwhal_without_the_test_rig(tmp_path):
    source = tmp_path / "src"  # a copy, so that no stale build/ of the checkout can leak in
    source.mkdir()
    for name in (*SHIPPED, "testbed", "tests"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")))
    assert top == ["bin", "narwhal"]  # bin/: the console script
    assert (target / "bin" / "narwhal").exists()
    for data in ("templates/base.html", "templates/badge.svg", "static/app.js", "static/app.css"):
        assert (target / "narwhal" / "web" / data).is_file(), data  # the dashboard's package data

    def run_python(code: str) -> subprocess.CompletedProcess:
        # -S: no site-packages, so neither an editable install of the checkout nor anything else is seen
        return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path, env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(target)})

    found = run_python("import narwhal; print(narwhal.__file__)")
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip().startswith(str(target))
    for module in ("narwhal.testbed", "testbed"):
        result = run_python(f"import {module}")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (module, result.stderr)


def _commands_in(path: Path) -> list[tuple[int, str]]:
    """(line, text) for every string literal and argv list in PATH's code that changes the machine.

    Docstrings and comments are prose, not commands; an argv list is read joined with spaces
    so that ["ip", "netns", "add", ...] counts like "ip netns add".
    """
    tree = parse_python(path)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        elif isinstance(node, (ast.List, ast.Tuple)):
            text = " ".join(e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
        else:
            continue
        if MACHINE_CHANGING.search(text):
            found.setdefault(node.lineno, text)  # a list and its own strings count once
    return sorted(found.items())


def test_only_the_demo_engine_setup_changes_the_machine():
    offenders = []
    for path in sorted((ROOT / "narwhal").rglob("*.py")):
        if path != ENGINE_SETUP:
            offenders += [f"{path.relative_to(ROOT)}:{line}: {text!r}" for line, text in _commands_in(path)]
    assert offenders == [], "the product may install packages or change users and networks only in " \
                            "narwhal/cli/engine.py (announced):\n" + "\n".join(offenders)


def test_the_scan_sees_commands_in_every_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Docs may say apt-get."""\n'
                      'A = ["apt-get", "install", "-y", "x"]\n'
                      'B = ("ip", "netns", "add", name)\n'
                      'C = f"useradd -m {user}"\n'
                      'D = "usermod -p * x"\n'
                      '# a comment about groupadd\n'
                      'E = ["ip", "link", "set", "up"]\n')
    assert [line for line, _ in _commands_in(sample)] == [2, 3, 4, 5]
    assert _commands_in(ENGINE_SETUP)  # the engine set-up does use apt-get: the scan finds it


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Run the whole test suite", 1)[1]
    command = section.split("```sh\n", 1)[1].split("\n```", 1)[0].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci
    assert "export CI=true" in ci
