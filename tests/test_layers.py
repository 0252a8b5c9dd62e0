"""The module map in docs/design.md holds: each layer imports only the layers below it.

Layers, bottom to top: the core records (``errors``, ``job``), ``config``, ``execution``,
``forge``, ``dispatch``, ``api``, ``web`` (the dashboard, mounted into the API's app by the
command line), ``cli``. An import the other way (the store reaching into the CLI,
a runner into the scheduler) is a design change and must show up here first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import narwhal
from tests.conftest import parse_python

PACKAGE = Path(narwhal.__file__).parent
LAYERS = ["core", "config", "execution", "forge", "dispatch", "api", "web", "cli"]
CORE = {"errors", "job", "text", "masking", "jsonnesting", "deadline", "__init__"}
ENTRY = "__main__"  # `python -m narwhal` is the command line


def layer_of(module: str) -> str:
    """'narwhal.dispatch.store' -> 'dispatch'; the top-level modules are the core."""
    parts = module.split(".")
    if len(parts) == 2 and parts[1] == ENTRY:
        return "cli"
    if len(parts) < 2 or parts[1] in CORE:
        return "core"
    return parts[1]


def imports_of(path: Path) -> set[str]:
    tree = parse_python(path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "narwhal" or name.startswith("narwhal.")}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def test_every_subpackage_is_a_known_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS) - {"core"}


def test_layers_import_only_downwards():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        rank = LAYERS.index(layer_of(source))
        for target in sorted(imports_of(path)):
            if target in ("narwhal", "narwhal.__version__"):
                continue
            if LAYERS.index(layer_of(target)) > rank:
                wrong.append(f"{source} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_forge_stands_on_core_and_config_only():
    """The forge building blocks are pure: they need no runner, transport or store."""
    wrong = []
    for path in sorted((PACKAGE / "forge").rglob("*.py")):
        for target in sorted(imports_of(path)):
            if target not in ("narwhal", "narwhal.__version__") and layer_of(target) not in ("core", "config"):
                wrong.append(f"{module_name(path)} imports {target}")
    assert not wrong, "\n".join(wrong)
