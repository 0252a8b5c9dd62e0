"""The pipeline and inventory reference (docs/pipelines.md, docs/inventory.md) and the JSON
Schemas of ``narwhal schema`` come from the models: a key a model gains without a description
fails here, by name; the schemas accept what the models accept and refuse what they refuse."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic.fields import FieldInfo

from narwhal.config import reference
from narwhal.config.inventory import parse_inventory
from narwhal.config.loader import load_config
from narwhal.config.pipeline import Pipeline, PipelineStep, parse_pipeline
from narwhal.config.settings import Settings
from tests.conftest import need_module

ROOT = Path(__file__).resolve().parent.parent
jsonschema = need_module("jsonschema")


def validator(kind: str):
    schema = reference.schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_ok(kind: str, data: object) -> bool:
    return validator(kind).is_valid(data)


def model_ok(kind: str, data: object) -> bool:
    from narwhal.config.settings import parse_settings
    from narwhal.errors import ConfigError

    try:
        if kind == "pipeline":
            parse_pipeline(copy.deepcopy(data), "p.yaml")
        else:
            inventory = parse_inventory(copy.deepcopy(data), "inventory.yaml")
            parse_settings(inventory.settings)
            from narwhal.config.forges import parse_forges
            from narwhal.config.secrets import SecretSpec

            for spec in (inventory.secrets or {}).values():
                SecretSpec.model_validate(spec)
            parse_forges(inventory.forges, "inventory.yaml")
    except (ConfigError, ValueError):
        return False
    return True


# --- every key described, the docs generated ---------------------------------------------------


@pytest.mark.parametrize("kind", reference.KINDS)
def test_every_model_key_is_described(kind):
    assert reference.missing(kind) == [], "\n".join(reference.missing(kind))


def test_no_description_of_a_key_that_is_gone():
    assert reference.stale() == []


def test_a_new_key_fails_by_name(monkeypatch):
    """What another change to the models meets: its key named, with what to add."""
    monkeypatch.setitem(PipelineStep.model_fields, "services", FieldInfo(annotation=list[str], default=[]))
    monkeypatch.setitem(Pipeline.model_fields, "deadline", FieldInfo(annotation=float, default=1.0))
    found = reference.missing("pipeline")
    assert any(line.startswith("pipeline: steps[].services (PipelineStep.services): no description")
               for line in found), found
    assert any("deadline (Pipeline.deadline)" in line for line in found), found
    text = reference.reference("pipeline")
    assert "#### `services`" in text and "(not described yet)" in text


@pytest.mark.parametrize("kind", reference.KINDS)
def test_docs_hold_the_generated_reference(kind):
    text = (ROOT / reference.DOCS[kind]).read_text()
    start, end = text.index(reference.BEGIN), text.index(reference.END) + len(reference.END)
    assert text[start:end] == reference.reference(kind), "run: python -m narwhal.config.reference"
    for field in reference.walk(reference.ROOTS[kind]):
        assert f"#### `{field.name}`" in text, field.path


def test_the_inventory_reference_lists_every_setting():
    text = (ROOT / "docs" / "inventory.md").read_text()
    for name, _, _ in Settings.describe():
        assert f"| `{name}` |" in text, name


def test_the_narwhal_variables_the_docs_name_are_the_ones_steps_get():
    named = set(re.findall(r"NARWHAL_[A-Z_]+", reference.KEYS["Pipeline.env"].help))
    source = (ROOT / "narwhal" / "execution" / "variables.py").read_text()
    assert named and all(f'"{name}"' in source for name in named), named


# --- the schemas accept what the models accept ----------------------------------------------


def intro_blocks(doc: str) -> list[str]:
    """The YAML blocks of a reference page's hand-written part (before "## Reference")."""
    return re.findall(r"```yaml\n(.*?)```", (ROOT / doc).read_text().split("## Reference")[0], re.S)


def test_the_shipped_config_and_the_worked_examples_pass_both():
    assert schema_ok("inventory", yaml.safe_load((ROOT / "inventory.yaml").read_text()))
    for path in (ROOT / "pipelines").glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        assert schema_ok("pipeline", data) and model_ok("pipeline", data), path
    worked, secret = map(yaml.safe_load, intro_blocks("docs/pipelines.md"))
    inventories = list(map(yaml.safe_load, intro_blocks("docs/inventory.md")))
    assert schema_ok("pipeline", worked) and model_ok("pipeline", worked)
    for data in [secret, *inventories]:
        assert schema_ok("inventory", data), data
        assert model_ok("inventory", data), data


def test_the_worked_example_loads_as_a_config(tmp_path):
    """README and docs only: the example pipeline with its secret is a config that loads."""
    blocks = intro_blocks("docs/pipelines.md")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "app.yaml").write_text(blocks[0])
    secret = tmp_path / "pypi"
    secret.write_text("pypi-token-value-1234\n")
    secret.chmod(0o600)
    inventory = yaml.safe_load(blocks[1])
    inventory["secrets"]["PYPI_TOKEN"]["file"] = str(secret)
    inventory["runners"] = [{"name": "local", "transport": "local", "labels": ["linux"]}]
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(inventory))
    config = load_config(tmp_path)
    assert [p.name for p in config.pipelines] == ["app"] and config.warnings == []


@pytest.mark.parametrize("kind", reference.KINDS)
def test_every_example_fits_its_key(kind):
    schema = reference.schema(kind)
    defs = schema["$defs"]
    for field in reference.walk(reference.ROOTS[kind]):
        key = reference.KEYS[field.id]
        value = reference.example_value(key, field.name)
        assert value is not None, f"{field.id}: the example does not set {field.name}"
        holder = schema if field.model is reference.ROOTS[kind] else defs[field.model.__name__]
        prop = holder["properties"][field.name]
        jsonschema.Draft202012Validator({**prop, "$defs": defs}).validate(value)
        assert prop["description"] and prop["examples"] == [value]


PIPELINE = {"repo": "*", "image": "busybox", "steps": [{"name": "a", "run": "true"}]}
RUNNER = {"name": "r1"}


@pytest.mark.parametrize("change, ok", [
    ({}, True),
    ({"repo": "https://git.example.com/x.git"}, True),
    ({"timeout": "1h30m"}, True),
    ({"timeout": 90}, True),
    ({"timeout": "soon"}, False),
    ({"branches": "main"}, True),
    ({"secrets": "TOKEN"}, True),
    ({"secrets": [{"name": "TOKEN", "optional": True}]}, True),
    ({"secrets": [{"name": "TOKEN", "maybe": True}]}, False),
    ({"env": {"A": 1, "B": True}}, True),
    ({"when": {"event": "push"}}, True),
    ({"when": {"event": ["push", "sometimes"]}}, False),
    ({"when": {"on": "push"}}, False),
    ({"schedule": {"cron": "0 3 * * *", "branch": "main"}}, True),
    ({"schedule": {"cron": "0 3 * * *"}}, False),
    ({"steps": []}, False),
    ({"steps": [{"name": "a"}]}, False),
    ({"steps": [{"name": "a", "run": "true", "timeout": "5m", "privileged": True}]}, False),
    ({"privileged": True}, False),
    ({"labels": "linux"}, False),
])
def test_pipeline_schema_and_model_agree(change, ok):
    data = {**PIPELINE, **change}
    assert schema_ok("pipeline", data) is ok, data
    assert model_ok("pipeline", data) is ok, data


@pytest.mark.parametrize("inventory, ok", [
    ({"runners": [RUNNER]}, True),
    ({"runners": [{**RUNNER, "port": "ssh"}]}, False),
    ({"runners": [{**RUNNER, "capacity": 0}]}, False),
    ({"runners": [{**RUNNER, "transport": "ftp"}]}, False),
    ({"runners": [{**RUNNER, "limits": {"memory": "4g", "cpus": 1}}]}, True),
    ({"runners": [{**RUNNER, "limits": {"swap": "1g"}}]}, False),
    ({"runners": [{**RUNNER, "colour": "red"}]}, False),
    ({"defaults": {"user": "ci"}, "runners": [RUNNER]}, True),
    ({"defaults": {"usr": "ci"}}, False),
    ({"settings": {"health_interval": "10s", "log_cap": "8m", "read_token": True}}, True),
    ({"settings": {"health_interval": "often"}}, False),
    ({"settings": {"no_such_setting": 1}}, False),
    ({"secrets": {"TOKEN": {"env": "X", "events": "push"}}}, True),
    ({"secrets": {"TOKEN": {"value": "hunter2"}}}, False),
    ({"forges": [{"name": "gh", "kind": "github", "url": "https://api.github.com", "webhook_secret": "H"}]}, True),
    ({"forges": [{"name": "gh", "kind": "svn", "url": "https://x.example", "webhook_secret": "H"}]}, False),
    ({"runnerz": []}, False),
])
def test_inventory_schema_and_model_agree(inventory, ok):
    assert schema_ok("inventory", inventory) is ok, inventory
    assert model_ok("inventory", inventory) is ok, inventory


def test_readme_says_how_to_use_the_schema_in_vs_code():
    text = (ROOT / "README.md").read_text()
    assert '"yaml.schemas"' in text and "narwhal schema pipeline" in text and "docs/pipelines.md" in text


# --- narwhal schema, as a subprocess -----------------------------------------------------------


def test_narwhal_schema_prints_and_writes_the_schema(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "narwhal", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=60)
    printed = run("schema", "pipeline")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == reference.schema("pipeline")
    written = run("schema", "inventory", "-o", str(tmp_path / "inv.json"))
    assert written.returncode == 0 and str(tmp_path / "inv.json") in written.stdout
    assert json.loads((tmp_path / "inv.json").read_text()) == reference.schema("inventory")
    bad = run("schema", "pipelines")
    assert bad.returncode == 2 and "pipeline" in bad.stderr and "Traceback" not in bad.stderr
    unwritable = run("schema", "pipeline", "-o", str(tmp_path / "missing" / "x.json"))
    assert unwritable.returncode == 2 and "cannot write" in unwritable.stderr
