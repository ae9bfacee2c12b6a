"""End to end with the real DVC, Prefect, MLflow and zarr on the tiny preset, in a temporary repo.

One module-scoped repo is taken through the life of a project: `dvc repro` from scratch, the Prefect
flow finding everything up to date, a params change that reruns exactly one stage under a pipeline
run, a bad params file that touches nothing, and a generation stage killed mid-way and resumed.
"""

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
from storage.hashing import tree_sha256
from storage.tracking import path_tag, tag_path

pytestmark = pytest.mark.e2e
# Stages with an MLflow run; `validate` runs before them.
STAGES = ["prepare", "fid_features", "vae", "extract", "fid_reference", "dit", "teacher_pairs", "evaluate@dit", "rf1",
          "rf1_classic", "evaluate@rf1", "evaluate@rf1_classic", "reflow_pairs@2", "reflow_pairs@2_classic",
          "seqrf_pairs", "meanflow", "rf@2", "rf@2_classic", "seqrf", "shortcut", "distill_pairs",
          "distill_pairs_classic", "evaluate@meanflow", "evaluate@rf2", "evaluate@rf2_classic", "evaluate@seqrf",
          "evaluate@shortcut", "distill", "distill_classic", "evaluate@distill", "evaluate@distill_classic", "report"]
EVALUATED = {"dit": "dit", "rf1": "rf1", "rf2": "rf@2", "seqrf": "seqrf", "distill": "distill",
             "rf1_classic": "rf1_classic", "rf2_classic": "rf@2_classic", "distill_classic": "distill_classic",
             "meanflow": "meanflow", "shortcut": "shortcut"}


def output_dir(root: Path, stage: str) -> Path:
    return root / "reports" if stage == "report" else root / "artifacts" / stage


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def mlflow_runs(root: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("reflow")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def edit_params(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, reproduced_pipeline, copy_pipeline):
    for stage in STAGES:
        assert f"Running stage '{stage}'" in reproduced_pipeline[1]
    return copy_pipeline(tmp_path_factory.mktemp("pipeline") / "repo")


def test_dvc_repro_produces_every_artifact(repo):
    images = open_dataset(repo / "artifacts/prepare/train.zarr", kind="images", verify=True)
    assert images["images"].dtype == np.uint8 and images.attrs["producer"] == "prepare"
    latents = open_dataset(repo / "artifacts/extract/latents.zarr", kind="latents", verify=True)
    assert latents.n_rows == images.n_rows and latents.attrs["scale_factor"] > 0
    pairs = open_dataset(repo / "artifacts/teacher_pairs/pairs.zarr", kind="pairs", verify=True)
    assert set(pairs.names) == {"z0", "z1", "label", "seed"} and pairs.n_rows == 48
    assert len(set(pairs.load("seed").tolist())) == 48
    assert (repo / "artifacts/teacher_pairs/grid.png").stat().st_size > 0
    # The default teacher is flow matching: its pairs are an Euler solve of its ODE, and their paths are measured.
    assert pairs.attrs["teacher_objective"] == "flow_matching" and pairs.attrs["solver"] == "euler"
    metrics = json.loads((repo / "metrics/teacher_pairs.json").read_text())
    assert metrics["pairs_curvature_paths"] == metrics["generated_this_run"] and metrics["pairs_curvature"] >= 0
    assert (repo / "artifacts/dit/transformer/config.json").is_file()
    segments = open_dataset(repo / "artifacts/seqrf_pairs/pairs.zarr", kind="pairs", verify=True)
    assert segments.attrs["boundaries"] == [0.0, 0.5, 1.0] and segments.attrs["from_model"] == "artifacts/rf1"
    assert segments.load("segment").tolist() == [i % 2 for i in range(segments.n_rows)]
    assert np.array_equal(segments.load("t_start"), np.where(segments.load("segment") == 0, 0.0, 0.5))
    extractor = json.loads((repo / "artifacts/fid_features/classifier/reflow.json").read_text())
    assert extractor["kind"] == "fid_features" and 0.0 <= extractor["held_out_accuracy"] <= 1.0
    assert (repo / "artifacts/fid_features/classifier/diffusion_pytorch_model.safetensors").is_file()
    for model in ("rf1", "rf@2", "seqrf", "distill"):
        assert (repo / f"artifacts/{model}/transformer/config.json").is_file()
        assert (repo / f"artifacts/{model}/grid.png").stat().st_size > 0
    assert not list((repo / ".reflow" / "scratch").iterdir()), "scratch is cleared after success"
    status = dvc(repo, "status", "dvc.yaml")  # the class pipeline (text/dvc.yaml never ran here)
    assert "up to date" in status.stdout


def test_every_model_is_measured_on_one_protocol(repo):
    from storage.hashing import file_sha256

    reference_hash = open_dataset(repo / "artifacts/prepare/reference.zarr", kind="images").attrs["content_hash"]
    extractor_hash = file_sha256(repo / "artifacts/fid_features/classifier/diffusion_pytorch_model.safetensors")
    for key, model in EVALUATED.items():
        results = json.loads((repo / f"artifacts/evaluate@{key}/results.json").read_text())
        protocol = results["protocol"]
        assert protocol["model"] == f"artifacts/{model}" and protocol["seeds"] == [0, 1]
        assert protocol["reference"]["content_hash"] == reference_hash
        assert protocol["extractor"]["sha256"] == extractor_hash
        for point in results["points"]:
            cheap = point["nfe"] <= protocol["extra_seeds_max_nfe"]  # the tiny preset adds seed 2 there
            assert [s["seed"] for s in point["per_seed"]] == ([0, 1, 2] if cheap else [0, 1])
            assert point["fid_std"] >= 0
            for name in ("fid", "kid", "precision", "recall", "class_accuracy"):
                assert point[f"{name}_low"] <= point[name] <= point[f"{name}_high"], name
            # NFE as spent: the teacher is guided (2 evaluations a step), velocity models are not; RK45 picks its own
            if point["solver"] == "rk45":
                assert point["steps"] == 0 and point["nfe"] >= 6 and key != "seqrf"
            else:
                assert point["nfe"] == point["steps"] * (2 if key == "dit" else 1)
        metrics = json.loads((repo / f"metrics/evaluate@{key}.json").read_text())
        assert metrics["best_fid"] == min(p["fid"] for p in results["points"])
        assert "straightness" in metrics  # the flow-matching teacher is a velocity model like the others
        assert (repo / f"artifacts/evaluate@{key}/replicates.npz").is_file()
    seqrf = json.loads((repo / "artifacts/evaluate@seqrf/results.json").read_text())
    assert [p["steps"] for p in seqrf["points"]] == [2, 4] and seqrf["skipped"][0]["steps"] == 1
    assert "Euler inside each segment" in seqrf["skipped"][-1]["reason"]  # RK45 does not cross segment kinks


def test_generators_extractor_and_reference_never_share_an_image(repo):
    """Checked on what the run stored: the split manifest, the extractor's record of what it was fitted on,
    the latents' record of their images, and the evaluation protocol's reference."""
    splits = json.loads((repo / "artifacts/prepare/splits.json").read_text())["splits"]
    rows = {name: open_dataset(repo / f"artifacts/prepare/{name}.zarr", kind="images").load("source_index")
            for name in splits}
    names = sorted(rows)
    for i, a in enumerate(names):
        assert open_dataset(repo / f"artifacts/prepare/{a}.zarr").attrs["content_hash"] == splits[a]["content_hash"]
        for b in names[i + 1 :]:
            assert not set(rows[a].tolist()) & set(rows[b].tolist()), (a, b)
    extractor = json.loads((repo / "artifacts/fid_features/classifier/reflow.json").read_text())
    assert extractor["fit_split"]["content_hash"] == splits["features"]["content_hash"]
    assert extractor["held_out_split"]["content_hash"] == splits["floor"]["content_hash"]
    latents = open_dataset(repo / "artifacts/extract/latents.zarr", kind="latents")
    assert latents.attrs["images"]["content_hash"] == splits["train"]["content_hash"]
    protocol = json.loads((repo / "artifacts/fid_reference/protocol.json").read_text())
    assert protocol["reference"]["content_hash"] == splits["reference"]["content_hash"]
    assert protocol["splits"] == splits and protocol["floor"]["split"] == "floor"
    floor = json.loads((repo / "artifacts/fid_reference/floor.json").read_text())
    assert len(floor["fid"]["per_draw"]) == protocol["floor"]["draws"] and floor["fid"]["low"] <= floor["fid"]["high"]


def test_stored_fid_equals_scipy_on_regenerated_samples(repo):
    """Regenerate one measured point (rf@2, seed 0, one Euler step) and compute its FID independently."""
    from measure.evaluation import generate_images
    from measure.fid import FeatureNet, extract_features, frechet_distance
    from models.vae import load_vae
    from reflow.seeds import per_sample_noise, sample_seeds
    from runtime.generator import load_generator

    results = json.loads((repo / "artifacts/evaluate@rf2/results.json").read_text())
    stored = next(p for p in results["points"] if p["steps"] == 1)["per_seed"][0]
    gen = load_generator(repo / "artifacts/rf@2")
    n = results["protocol"]["samples_per_seed"]
    z0 = per_sample_noise(sample_seeds(0, 0, n), tuple(gen.meta["latent_shape"]))
    images, nfe = generate_images(gen, load_vae(repo / "artifacts/vae/vae").eval(), z0, np.arange(n) % 10, steps=1,
                                  solver="euler", guidance=None, batch_size=7, device="cpu", tolerance=1e-3)
    net = FeatureNet.from_pretrained(repo / "artifacts/fid_features/classifier").eval()
    reference = open_dataset(repo / "artifacts/prepare/reference.zarr", kind="images").load("images")
    expected = frechet_distance(extract_features(net, images), extract_features(net, reference))
    assert nfe == 1 and stored["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_report_renders_offline_and_the_cli_shows_results_and_samples(repo, tmp_path):
    from html.parser import HTMLParser

    class Parser(HTMLParser):
        urls: list = []

        def handle_starttag(self, tag, attrs):
            self.urls += [(tag, v) for k, v in attrs if k in ("src", "href")]

    page = (repo / "reports/index.html").read_text()
    parser = Parser()
    parser.feed(page)
    images = [v for tag, v in parser.urls if tag == "img"]
    assert len(images) == 1 + len(EVALUATED), "the FID-vs-NFE plot and one grid per model"
    assert all(v.startswith("data:image/png;base64,") for _, v in parser.urls), "nothing fetched from a network"
    assert "teacher_pairs" in page and "evaluate@rf2" in page  # lineage tables

    env = {**os.environ, "PYTHONPATH": str(repo)}
    cli = [sys.executable, "-m", "flows.cli"]
    res = subprocess.run([*cli, "results"], cwd=repo, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "rf2 (rf@2)" in res.stdout and "real images" in res.stdout, res.stderr
    out = tmp_path / "grid.png"
    res = subprocess.run([*cli, "sample", "--model", "rf@2", "--steps", "2", "--class", "3", "--n", "9", "--out",
                          str(out), "--guidance", "1.5"], cwd=repo, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "NFE 4 per sample" in res.stdout and out.stat().st_size > 0
    res = subprocess.run([*cli, "sample", "--model", "seqrf", "--steps", "3", "--out", str(out)], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "multiple of 2 steps" in res.stderr


def test_mlflow_lineage_joins_up_through_dvc_hashes(repo):
    from storage.records import lock_entries

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
    # The changed stages and what is downstream of them: both chains' students read the distill section.
    rerun = ["validate", "distill_pairs", "distill_pairs_classic", "distill", "distill_classic", "evaluate@distill",
             "evaluate@distill_classic", "report"]
    assert [s for s in status if status[s] == "executed"] == rerun
    assert {status[s] for s in status if s not in rerun} == {"skipped_up_to_date"}

    runs = mlflow_runs(repo)
    child = next(r for r in runs if r.data.tags.get("reflow.stage") == "distill"
                 and "mlflow.parentRunId" in r.data.tags)
    parent = next(r for r in runs if r.info.run_id == child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["reflow.kind"] == "pipeline"
    assert child.data.tags["reflow.pipeline_run_id"] == parent.data.tags["reflow.pipeline_run_id"]
    assert parent.data.tags["reflow.executed"] == ",".join(rerun)
    pairs = open_dataset(repo / "artifacts/distill_pairs/pairs.zarr", kind="pairs")
    assert pairs.attrs["base_seed"] == 99 and pairs.attrs["source"] == "rf@2"


def test_bad_params_touch_no_output(repo):
    before = {s: tree_sha256(output_dir(repo, s)) for s in STAGES}
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
    assert {s: tree_sha256(output_dir(repo, s)) for s in STAGES} == before
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
    # distill.seed keys the pairs' noise: distill_pairs makes new ones, and distill trains on them.
    assert sorted(r.data.tags["reflow.stage"] for r in runs) == ["distill", "distill_pairs"]
    pairs_run = next(r for r in runs if r.data.tags["reflow.stage"] == "distill_pairs")
    runs = [r for r in runs if r.data.tags["reflow.stage"] == "distill"]
    assert runs[0].data.params["distill.seed"] == "7" and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["reflow.dvc_exp_baseline"] == subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()

    # `reflow compare` of the committed run against the experiment names exactly the stage and the param.
    env = {**os.environ, "PYTHONPATH": str(repo)}
    res = subprocess.run([sys.executable, "-m", "flows.cli", "compare", "HEAD", "seed7", "--json"], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["b"]["kind"] == "dvc experiment" and report["first_divergent"] == ["distill_pairs"]
    first = next(d for d in report["stages"] if d["stage"] == "distill_pairs")
    assert [p[0] for p in first["params"]] == ["distill.seed"] and first["params"][0][2] == "7"
    assert report["mlflow"]["distill_pairs"]["run_ids"][1] == pairs_run.info.run_id


def test_teacher_pairs_killed_mid_way_resume_to_identical_pairs(repo):
    edit_params(repo, "teacher_pairs", "solver_steps", 100)  # slow enough to be killed between shards
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


def test_compare_and_results_runs_say_whether_a_training_seed_moved_fid_beyond_noise(copy_pipeline, tmp_path):
    """The README's recipe: commit the run, `dvc exp run -S distill.seed=7`, then `reflow compare HEAD <exp>` pairs
    evaluate@distill's points across the two runs, and `reflow results --runs` takes intervals over them."""
    repo = copy_pipeline(tmp_path / "repo")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@l", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@l", "commit", "-qm", "run"], cwd=repo, check=True)
    res = dvc(repo, "exp", "run", "-n", "seed7", "-S", "distill.seed=7")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    cli = [sys.executable, "-m", "flows.cli"]
    res = subprocess.run([*cli, "compare", "HEAD", "seed7", "--json"], cwd=repo, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    rows = [e for e in json.loads(res.stdout)["evaluations"] if e["stage"] == "evaluate@distill"]
    assert rows and all(e["verdict"] in ("resolved", "within noise") and e["low"] <= e["b_minus_a"] <= e["high"]
                        for e in rows), rows
    shown = subprocess.run([*cli, "compare", "HEAD", "seed7"], cwd=repo, env=env, capture_output=True, text=True)
    assert "B - A with its 95% interval" in shown.stdout
    res = subprocess.run([*cli, "results", "--runs", "HEAD", "seed7"], cwd=repo, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert "over 2 training replicates" in res.stdout and "evaluate@distill" in res.stdout
    assert "differ in more than seeds" not in res.stdout
