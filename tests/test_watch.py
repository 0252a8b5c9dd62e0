"""narwhal.config.watch: what ``narwhal serve`` looks at to reload by itself."""

from __future__ import annotations

import os

from narwhal.config.watch import changes, snapshot


def test_snapshot_sees_pipelines_come_change_and_go(tmp_path):
    (tmp_path / "inventory.yaml").write_text("runners: []\n")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "ci.yaml").write_text("a: 1\n")
    (tmp_path / "pipelines" / ".ci.yaml.swp").write_text("editor\n")  # load_pipelines skips dot-files
    (tmp_path / "pipelines" / "notes.txt").write_text("not a pipeline\n")
    first = snapshot(tmp_path)
    assert sorted(first) == ["inventory.yaml", "pipelines/ci.yaml"]
    assert snapshot(tmp_path) == first

    (tmp_path / "pipelines" / "extra.yml").write_text("b: 2\n")
    (tmp_path / "pipelines" / "ci.yaml").write_text("a: 2\n")
    (tmp_path / "inventory.yaml").unlink()
    second = snapshot(tmp_path)
    assert changes(first, second) == "pipelines/extra.yml added, pipelines/ci.yaml changed, inventory.yaml removed"
    assert changes(second, second) == ""


def test_a_rewritten_secret_file_counts_with_the_same_size(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("aaaaaaaaaaaa")
    before = snapshot(tmp_path, [secret, tmp_path / "missing"])
    assert list(before) == ["token"]
    replacement = tmp_path / "token.new"
    replacement.write_text("bbbbbbbbbbbb")
    os.replace(replacement, secret)  # how a rotation is written: a new file, renamed over the old one
    assert changes(before, snapshot(tmp_path, [secret])) == "token changed"


def test_files_outside_the_directory_keep_their_path(tmp_path):
    inside, outside = tmp_path / "config", tmp_path / "secrets"
    inside.mkdir()
    outside.mkdir()
    (outside / "key").write_text("x" * 10)
    assert list(snapshot(inside, [outside / "key"])) == [str(outside / "key")]
