"""End to end with the real DVC, Prefect, MLflow and zarr on the tiny preset, in a temporary repo.

One module-scoped repo is taken through the life of a project: `dvc repro` from scratch, the Prefect
flow finding everything up to date, a params change that reruns exactly one stage under a pipeline
run, a bad params file that touches nothing, and a generation stage killed mid-way and resumed.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from storage.datasets import open_dataset
from storage.tracking import path_tag, tag_path

pytestmark = pytest.mark.e2e
# Stages with an MLflow run; `validate` runs before them.
STAGES = ["prepare", "fid_features", "vae", "extract", "dit", "teacher_pairs", "rf1", "reflow_pairs@2", "seqrf_pairs",
          "rf@2", "seqrf", "distill"]


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def mlflow_runs(root: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("reflow")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def edit_params(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, pipeline_repo):
    root = pipeline_repo(tmp_path_factory.mktemp("pipeline"))
    res = dvc(root, "repro")
    assert res.returncode == 0, res.stdout + res.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in res.stdout
    return root


def test_dvc_repro_produces_every_artifact(repo):
    images = open_dataset(repo / "artifacts/prepare/train.zarr", kind="images", verify=True)
    assert images["images"].dtype == np.uint8 and images.attrs["producer"] == "prepare"
    latents = open_dataset(repo / "artifacts/extract/latents.zarr", kind="latents", verify=True)
    assert latents.n_rows == images.n_rows and latents.attrs["scale_factor"] > 0
    pairs = open_dataset(repo / "artifacts/teacher_pairs/pairs.zarr", kind="pairs", verify=True)
    assert set(pairs.names) == {"z0", "z1", "label", "seed"} and pairs.n_rows == 48
    assert len(set(pairs.load("seed").tolist())) == 48
    assert (repo / "artifacts/teacher_pairs/grid.png").stat().st_size > 0
    assert (repo / "artifacts/dit/config.json").is_file()
    segments = open_dataset(repo / "artifacts/seqrf_pairs/pairs.zarr", kind="pairs", verify=True)
    assert segments.attrs["boundaries"] == [0.0, 0.5, 1.0] and segments.attrs["from_model"] == "artifacts/rf1"
    assert segments.load("segment").tolist() == [i % 2 for i in range(segments.n_rows)]
    assert np.array_equal(segments.load("t_start"), np.where(segments.load("segment") == 0, 0.0, 0.5))
    extractor = json.loads((repo / "artifacts/fid_features/reflow.json").read_text())
    assert extractor["kind"] == "fid_features" and 0.0 <= extractor["held_out_accuracy"] <= 1.0
    assert (repo / "artifacts/fid_features/diffusion_pytorch_model.safetensors").is_file()
    for model in ("rf1", "rf@2", "seqrf", "distill"):
        assert (repo / f"artifacts/{model}/transformer/config.json").is_file()
        assert (repo / f"artifacts/{model}/grid.png").stat().st_size > 0
    assert not list((repo / ".reflow" / "scratch").iterdir()), "scratch is cleared after success"
    status = dvc(repo, "status")
    assert "up to date" in status.stdout


def test_mlflow_lineage_joins_up_through_dvc_hashes(repo):
    from storage.lineage import lock_entries

    runs = {r.data.tags["reflow.stage"]: r for r in mlflow_runs(repo) if "reflow.stage" in r.data.tags}
    assert sorted(runs) == sorted(STAGES)
    lock = lock_entries(repo)
    producers = {path: stage for stage, e in lock.items() for path in e["outs"]}
    for stage, run in runs.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert "mlflow.parentRunId" not in tags, "plain dvc repro makes top-level runs"
        assert len(tags["reflow.git_commit"]) == 40 and tags["reflow.git_dirty"] in ("true", "false")
        inputs = {tag_path(k, "input"): v for k, v in tags.items() if tag_path(k, "input")}
        outputs = {tag_path(k, "output"): v for k, v in tags.items() if tag_path(k, "output")}
        assert outputs == lock[stage]["outs"]
        assert {p: h for p, h in inputs.items()} == {p: h for p, h in lock[stage]["deps"].items()}
        for path, digest in inputs.items():
            if path in producers and producers[path] != "validate":  # a marker; validate logs no run
                producer_tags = runs[producers[path]].data.tags
                assert producer_tags[path_tag("output", path)] == digest
        datasets = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert {p: h[:36] for p, h in inputs.items()} == datasets
    assert "loss" in runs["dit"].data.metrics and "images_per_s" in runs["dit"].data.metrics


def test_prefect_flow_skips_everything_then_reruns_only_what_changed(repo, prefect_harness, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.chdir(repo)
    outcomes = pipeline(root=str(repo))
    assert [o["stage"] for o in outcomes] == ["validate", *STAGES]
    assert {o["status"] for o in outcomes} == {"skipped_up_to_date"}

    edit_params(repo, "distill", "seed", 99)
    outcomes = pipeline(root=str(repo))
    status = {o["stage"]: o["status"] for o in outcomes}
    rerun = ["validate", "distill"]  # the changed stage (and its downstream: none)
    assert [s for s in status if status[s] == "executed"] == rerun
    assert {status[s] for s in status if s not in rerun} == {"skipped_up_to_date"}

    runs = mlflow_runs(repo)
    child = next(r for r in runs if r.data.tags.get("reflow.stage") == "distill"
                 and "mlflow.parentRunId" in r.data.tags)
    parent = next(r for r in runs if r.info.run_id == child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["reflow.kind"] == "pipeline"
    assert child.data.tags["reflow.pipeline_run_id"] == parent.data.tags["reflow.pipeline_run_id"]
    assert parent.data.tags["reflow.executed"] == ",".join(rerun)
    pairs = open_dataset(repo / "artifacts/distill/pairs.zarr", kind="pairs")
    assert pairs.attrs["base_seed"] == 99 and pairs.attrs["source"] == "rf@2"


def test_bad_params_touch_no_output(repo):
    before = {s: tree_digest(repo / "artifacts" / s) for s in STAGES}
    lock_before = (repo / "dvc.lock").read_text()
    metrics_before = {p.name: p.read_bytes() for p in (repo / "metrics").iterdir()}
    original = (repo / "params.yaml").read_text()
    try:
        edit_params(repo, "dit", "steps", -3)
        edit_params(repo, "data", "resolution", 30)
        res = dvc(repo, "repro")
        assert res.returncode != 0
        err = res.stdout + res.stderr
        assert "dit.steps: got -3" in err and "data.resolution" in err
        assert "no output was touched" in err
    finally:
        (repo / "params.yaml").write_text(original)
    assert {s: tree_digest(repo / "artifacts" / s) for s in STAGES} == before
    assert (repo / "dvc.lock").read_text() == lock_before
    assert {p.name: p.read_bytes() for p in (repo / "metrics").iterdir()} == metrics_before


def test_reflow_run_command_on_an_up_to_date_repo(repo):
    """The CLI a user types: ephemeral Prefect, every stage skipped, then the summary of what exists."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    res = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "artifacts/teacher_pairs/" in out and "picture: artifacts/teacher_pairs/grid.png" in out
    assert "MLflow store: sqlite:///" in out
    assert "DVC found it up to date" in out


def test_dvc_exp_run_lands_in_the_workspace_mlflow_store(repo):
    """`dvc exp run --temp -S` runs the stages in a throwaway copy of the repo and rewrites params.yaml with
    DVC's YAML writer; the run must still validate and its MLflow run must land in the workspace's store."""
    for args in (["add", "-A"], ["commit", "-qm", "reproduced"]):
        subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=repo,
                       check=True, capture_output=True)
    res = dvc(repo, "exp", "run", "--temp", "-n", "seed7", "-S", "distill.seed=7", "distill")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Running stage 'distill'" in res.stdout and "Running stage 'rf1'" not in res.stdout
    runs = [r for r in mlflow_runs(repo) if r.data.tags.get("reflow.dvc_exp_name") == "seed7"]
    assert [r.data.tags["reflow.stage"] for r in runs] == ["distill"]
    assert runs[0].data.params["distill.seed"] == "7" and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["reflow.dvc_exp_baseline"] == subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def test_teacher_pairs_killed_mid_way_resume_to_identical_pairs(repo):
    edit_params(repo, "teacher_pairs", "ddim_steps", 100)  # slow enough to be killed between shards
    edit_params(repo, "teacher_pairs", "num_samples", 80)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "stages.teacher_pairs"]
    out = repo / "artifacts/teacher_pairs/pairs.zarr"

    assert subprocess.run(cmd, cwd=repo, env=env, capture_output=True).returncode == 0
    reference = open_dataset(out, kind="pairs")
    expected = {k: reference.load(k) for k in reference.names}

    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    scratch = repo / ".reflow" / "scratch"
    deadline = time.monotonic() + 120
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        progress = list(scratch.glob("teacher_pairs-*/pairs.zarr/progress.json"))
        if progress and yaml.safe_load(progress[0].read_text() or "{}").get("done"):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait()
    assert killed, "the stage finished before it could be interrupted"
    # Run outside DVC the old output stays until the new one replaces it whole: never half-written.
    assert open_dataset(out, kind="pairs", verify=True).n_rows == 80

    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    metrics = yaml.safe_load((repo / "metrics/teacher_pairs.json").read_text())
    assert 0 < metrics["generated_this_run"] < 80, "resumed at the first unfinished shard"
    resumed = open_dataset(out, kind="pairs", verify=True)
    for name, array in expected.items():
        assert np.array_equal(resumed.load(name), array), name
