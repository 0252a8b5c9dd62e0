"""A job names one exact commit: 40 lowercase hex digits, no abbreviations, no case games.

Checked twice: by ``validate_commit`` and on the POST /commit path (``Dispatcher.submit``),
where a malformed id is the client's fault (400) and is refused before any git runs.
"""

from __future__ import annotations

import pytest

from narwhal.config.loader import load_config
from narwhal.dispatch.dispatcher import Dispatcher
from narwhal.errors import BadRequest, SourceError
from narwhal.execution.source import validate_commit
from narwhal.job import COMMIT_RE

FULL = "0123456789abcdef0123456789abcdef01234567"
REFUSED = [
    "abcdef1",  # an abbreviated id: git would resolve it, ambiguously
    FULL[:39],
    FULL + "8",
    FULL.upper(),
    FULL[:-1] + "A",
    " " + FULL[1:],
    FULL[:-1] + "\n",
    FULL + "\n",
    "",
]


def test_a_full_id_is_accepted():
    assert len(FULL) == 40
    assert validate_commit(FULL) == FULL
    assert COMMIT_RE.fullmatch(FULL)


@pytest.mark.parametrize("commit", REFUSED)
def test_the_validator_refuses(commit):
    with pytest.raises(SourceError, match="expected a 40-hex commit id"):
        validate_commit(commit)


@pytest.fixture
def dispatcher(tmp_path):
    config_dir = tmp_path / "config"
    (config_dir / "pipelines").mkdir(parents=True)
    (config_dir / "inventory.yaml").write_text("runners:\n  - name: local\n    transport: local\n"
                                              f"settings:\n  local_roots: [{str(tmp_path)!r}]\n")
    (config_dir / "pipelines" / "build.yaml").write_text(
        'repo: "*"\nimage: narwhal-test/busybox:latest\nsteps:\n  - name: build\n    run: make\n')
    d = Dispatcher(load_config(config_dir), tmp_path / "state")  # never started: no scheduler thread
    yield d
    d.mirror.close()
    d.store.close()


@pytest.mark.parametrize("commit", REFUSED)
def test_submit_refuses_before_fetching(dispatcher, tmp_path, commit):
    with pytest.raises(BadRequest, match="expected a 40-hex commit id"):
        dispatcher.submit(str(tmp_path / "no-such-repo"), commit)
    assert dispatcher.store.list_jobs() == []


def test_submit_takes_a_full_id_to_the_mirror(dispatcher, tmp_path):
    """The control: a well-formed id passes validation and fails only on the missing repo."""
    with pytest.raises(SourceError) as info:
        dispatcher.submit(str(tmp_path / "no-such-repo"), FULL)
    assert not isinstance(info.value, BadRequest) and "40-hex" not in str(info.value)
    assert dispatcher.store.list_jobs() == []
