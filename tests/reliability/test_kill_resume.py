"""Kill a stage anywhere with SIGKILL and resume: it continues (not restarts), nothing half-written is ever
visible, and the result is bitwise the result of an uninterrupted run.

Each case kills one long stage of the reproduced tiny pipeline at a named crash point
(`storage.faults`: after a training step, inside a checkpoint write, after a shard's data is on disk but
before its progress is recorded, after an evaluation point, between the two renames that put a finished
output in place), then resumes it and compares its output folder with the uninterrupted run's. Most cases
kill `dvc repro -f -s <stage>` (DVC removes the output first, so nothing stale can stand in for it) and
resume with `dvc repro`; the `python -m` cases run outside DVC, where the old output must stay whole
until the new one replaces it; one case resumes through `reflow run` (Prefect).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from storage.datasets import open_dataset
from storage.faults import ENV
from storage.hashing import tree_sha256

pytestmark = pytest.mark.e2e


def run(root: Path, args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    return subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def stage_runs(root: Path, stage: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("reflow")
    return client.search_runs([experiment.experiment_id], f"tags.`reflow.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"])


@pytest.fixture(scope="module")
def repo(tmp_path_factory, copy_pipeline):
    root = copy_pipeline(tmp_path_factory.mktemp("kill") / "repo")
    baseline = {p.name: tree_sha256(p) for p in (root / "artifacts").iterdir() if p.is_dir()}
    return root, baseline


def check_visible_output_is_whole(root: Path, stage: str) -> None:
    """After a kill the output folder is absent, or a complete earlier output: never a partial one."""
    out = root / "artifacts" / stage
    if not out.exists():
        return
    for zarr in out.glob("*.zarr"):
        open_dataset(zarr, verify=True)
    for meta in out.rglob("reflow.json"):
        assert (meta.parent / "config.json").is_file() and json.loads(meta.read_text())


# (stage, crash point, how it is run, what resuming must show in the stage's metrics)
CASES = [
    ("dit", "train_step@25", "dvc", {"resumed_from_step": 20}),
    ("dit", "checkpoint_write@2", "python", {"resumed_from_step": 20}),
    ("teacher_pairs", "shard_written@2", "dvc", {"generated_this_run": 32}),
    ("teacher_pairs", "output_rename", "dvc", {}),
    ("rf1", "train_step@15", "python", {"resumed_from_step": 10}),
    ("reflow_pairs@2", "shard_written@2", "dvc", {"generated_this_run": 16}),
    ("rf@2", "checkpoint_write@2", "dvc", {"resumed_from_step": 10}),
    ("seqrf_pairs", "shard_written@2", "python", {"generated_this_run": 16}),
    ("seqrf", "output_rename", "dvc", {"resumed_from_step": 20}),
    ("distill", "train_step@15", "dvc", {"resumed_from_step": 10}),
    ("meanflow", "train_step@15", "dvc", {"resumed_from_step": 10}),  # its JVP objective, resumed exactly
    ("shortcut", "checkpoint_write@2", "python", {"resumed_from_step": 10}),
    # 10 points: seeds 0, 1 at Euler NFE 1, 2, 4 and RK45, the extra seed 2 at NFE 1, 2; killed after the 4th
    ("evaluate@rf1", "eval_point@4", "dvc", {"points_measured_this_run": 6}),
]


def as_never_run(root: Path, stage: str) -> None:
    """Make DVC see `stage` as never run, as after a first attempt that was killed: without its dvc.lock
    entry and its run-cache record DVC would restore the uninterrupted run's output from its cache
    instead of running the stage, and the resume would go untested."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lock["stages"].pop(stage, None)
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(root / ".dvc" / "cache" / "runs", ignore_errors=True)


def module_args(root: Path, stage: str) -> list[str]:
    from dvc.repo import Repo

    cmd = next(s.cmd for s in Repo(str(root)).index.stages if s.name == stage)
    return cmd.split()[2:]  # "python -m stages.x ..." -> ["stages.x", ...]


@pytest.mark.parametrize(("stage", "point", "how", "resumed"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_killed_stage_resumes_to_the_uninterrupted_result(repo, stage, point, how, resumed):
    root, baseline = repo
    runs_before = len(stage_runs(root, stage))
    args = ["dvc", "repro", "-f", "-s", stage] if how == "dvc" else module_args(root, stage)
    killed = run(root, args, kill_at=point)
    assert killed.returncode != 0, f"{stage} was not killed at {point}:\n{killed.stdout[-2000:]}{killed.stderr[-2000:]}"
    check_visible_output_is_whole(root, stage)
    if how == "python":  # outside DVC the previous output stays in place, whole, until replaced
        assert tree_sha256(root / "artifacts" / stage) == baseline[stage]

    if how == "dvc":
        as_never_run(root, stage)
    resume = ["dvc", "repro", "-s", stage] if how == "dvc" else module_args(root, stage)
    done = run(root, resume)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert tree_sha256(root / "artifacts" / stage) == baseline[stage], "resumed output differs from uninterrupted"
    metrics = json.loads((root / "metrics" / f"{stage}.json").read_text())
    for key, value in resumed.items():
        assert metrics[key] == value, (key, metrics[key])
    runs = stage_runs(root, stage)
    assert len(runs) == runs_before + 1, "the killed attempt's MLflow run is continued, not duplicated"
    assert runs[0].info.status == "FINISHED"
    if resumed.get("resumed_from_step"):
        assert runs[0].data.tags.get("reflow.resumed") == "true"
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
        r = resumed["resumed_from_step"]  # the killed attempt's points and the resumed ones: one curve
        assert any(s <= r for s in steps) and (any(s > r for s in steps) or point == "output_rename"), steps
    assert not [p for p in (root / "artifacts").iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_killed_under_reflow_run_resumes_under_reflow_run(repo):
    root, baseline = repo
    as_never_run(root, "rf@2")
    killed = run(root, ["flows.cli", "run", "rf@2"], kill_at="train_step@15")
    assert killed.returncode != 0 and "rf@2" in killed.stdout + killed.stderr
    as_never_run(root, "rf@2")  # the killed run left no record, as a first attempt would not
    done = run(root, ["flows.cli", "run", "rf@2"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert tree_sha256(root / "artifacts" / "rf@2") == baseline["rf@2"]
    assert json.loads((root / "metrics/rf@2.json").read_text())["resumed_from_step"] == 10
