"""The example config narwhal ships is the one the README names, and it loads."""

from __future__ import annotations

from pathlib import Path

from narwhal.cli import demo, starter
from narwhal.config.loader import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_the_readmes_example_pipeline(tmp_path):
    assert (ROOT / "pipelines" / "example.yaml").read_text() == starter.EXAMPLE_PIPELINE
    assert "pipelines/example.yaml" in (ROOT / "README.md").read_text()
    config = demo.write_config(tmp_path)
    assert (config / "pipelines" / "example.yaml").read_text() == starter.EXAMPLE_PIPELINE
    loaded = load_config(config)
    assert [p.name for p in loaded.pipelines] == ["example"]
    assert loaded.runners_for(loaded.pipelines[0])[0].name == "local"  # it carries the example's label
    assert loaded.settings.local_roots == (str(tmp_path.resolve()),)
    assert loaded.warnings == []


def test_another_image_replaces_the_test_image(tmp_path):
    text = starter.example_pipeline("registry.example.com/busybox:1")
    assert "image: registry.example.com/busybox:1\n" in text and starter.EXAMPLE_IMAGE not in text
