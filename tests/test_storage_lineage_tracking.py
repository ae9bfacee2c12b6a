"""Lineage helpers on a real git + DVC repo, and MLflow stage runs on a real sqlite store."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from storage import tracking
from storage.records import lock_entries
from storage.repo import find_repo_root, git_state, stage_input_hashes, stage_output_hashes


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: python -c \"open('a.txt','w').write('a')\"\n    outs: [a.txt]\n"
        "  use:\n    cmd: python -c \"open('b.txt','w').write('b')\"\n    deps: [a.txt]\n    outs: [b.txt]\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    return tmp_path


def test_hashes_match_what_dvc_lock_records(repo):
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=repo, check=True)
    lock = lock_entries(repo)
    assert stage_output_hashes(repo, "make") == lock["make"]["outs"]
    assert stage_input_hashes(repo, "use") == lock["use"]["deps"] == lock["make"]["outs"]
    assert find_repo_root(repo / ".dvc") == repo
    with pytest.raises(KeyError, match="no stage named 'nope'"):
        stage_input_hashes(repo, "nope")


def test_git_state_sees_commit_and_dirty_tracked_files(repo, tmp_path_factory):
    commit, dirty = git_state(repo)
    assert len(commit) == 40 and not dirty
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text() + "\n")
    assert git_state(repo) == (commit, True)
    assert git_state(tmp_path_factory.mktemp("nogit")) == (None, False)


def test_killed_stage_run_is_continued_not_duplicated(tmp_path):
    tracking.configure(None, "t", tmp_path)
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    kw = {"stage": "dit", "scratch": scratch, "params": {"dit": {"steps": 3}}, "tags": {"params_hash": "h"},
          "inputs": {"artifacts/extract": "abc.dir"}}
    with pytest.raises(RuntimeError), tracking.stage_run(**kw) as run:
        tracking.log_metrics({"loss": 1.0}, step=1)
        raise RuntimeError("killed")
    first = run.info.run_id
    assert mlflow.get_run(first).info.status == "FAILED"
    with tracking.stage_run(**kw) as run:
        tracking.log_metrics({"loss": 0.5}, step=2)
    assert run.info.run_id == first
    finished = mlflow.get_run(first)
    assert finished.info.status == "FINISHED" and finished.data.tags["reflow.resumed"] == "true"
    history = mlflow.MlflowClient().get_metric_history(first, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert finished.data.tags["reflow.input.artifacts/extract"] == "abc.dir"
    assert finished.data.params["dit.steps"] == "3"
    # a finished run is never reopened: the next execution gets its own run
    with tracking.stage_run(**kw) as again:
        pass
    assert again.info.run_id != first


def test_mlflow_tracking_uri_is_honoured_when_tracking_uri_is_null(tmp_path, monkeypatch):
    from storage.tracking import USER_URI_ENV, tracking_uri

    assert tracking_uri(None, tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    # what MLflow exports after set_tracking_uri is not the user's choice, and is not followed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert tracking_uri(None, tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"}
    env.pop(USER_URI_ENV)  # a fresh process that the user started with the variable set
    code = ("from pathlib import Path; from storage.tracking import tracking_uri; "
            "print(tracking_uri(None, Path('.'))); print(tracking_uri('sqlite:///given.db', Path('.')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == ["http://127.0.0.1:5999", "sqlite:///given.db"]  # params win over the variable
