"""Stages in several processes (`compute.num_processes: 2`), through a real `accelerate launch` on this CPU (gloo).

Generation splits its shards between the processes and must write the very bytes one process writes, also
after a process is killed and the stage resumed; training runs data-parallel to the end with one MLflow run;
a failure stops every process, is reported once, and leaves no output and no process behind.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from storage.datasets import open_dataset
from storage.faults import ENV as KILL_AT

pytestmark = pytest.mark.e2e


def stage(root: Path, name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
    if not env or KILL_AT not in env:
        full_env.pop(KILL_AT, None)
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=root, capture_output=True, text=True,
                          env=full_env, timeout=900)


def set_processes(root: Path, n: int) -> None:
    """compute.num_processes: n, and one thread per process (two processes on this machine's two cores)."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["compute"].update(num_processes=n, num_threads=1)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stage_runs(root: Path, stage_name: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("reflow")
    return client.search_runs([experiment.experiment_id], f"tags.`reflow.stage` = '{stage_name}'",
                              order_by=["attributes.start_time DESC"])


def stage_processes(root: Path) -> list[psutil.Process]:
    """Python processes still running a stage module in `root` (launcher or launched)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["cwd"] == str(root) and any(a.startswith("stages.") for a in cmd):
            found.append(proc)
    return found


def gone(procs: list[psutil.Process], within_s: float = 120.0) -> list[psutil.Process]:
    """Those of `procs` still alive after waiting up to `within_s` (a deadline, not a speed requirement)."""
    _, alive = psutil.wait_procs(procs, timeout=within_s)
    return alive


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, copy_pipeline):
    return copy_pipeline(tmp_path_factory.mktemp("multiprocess") / "pristine")


@pytest.fixture
def repo(tmp_path, pristine):
    root = Path(shutil.copytree(pristine, tmp_path / "repo", symlinks=True))
    set_processes(root, 2)
    return root


def test_pairs_from_two_processes_killed_and_resumed_are_bitwise_one_process(repo, pristine):
    """Process 0 is killed after its second shard (process 1 waits at the barrier); the rerun generates only
    the missing shard, and the dataset equals the one-process pipeline's, hash and arrays."""
    shutil.rmtree(repo / "artifacts/teacher_pairs")
    before = len(stage_runs(repo, "teacher_pairs"))

    killed = stage(repo, "teacher_pairs", env={KILL_AT: "shard_written@2"})
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert killed.stderr.count("error: stage 'teacher_pairs' failed") == 1, killed.stderr[-3000:]
    assert "process 0 of 2 was killed by SIGKILL" in killed.stderr
    assert "Traceback" not in killed.stderr, "one message, not the other process's echo of the failure"
    assert not (repo / "artifacts/teacher_pairs").exists()
    assert not stage_processes(repo)
    failed = stage_runs(repo, "teacher_pairs")
    assert len(failed) == before + 1 and failed[0].info.status == "FAILED"

    resumed = stage(repo, "teacher_pairs")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((repo / "metrics/teacher_pairs.json").read_text())
    assert metrics["generated_this_run"] == 16  # 3 shards of 16: the two that were finished are kept

    ours = open_dataset(repo / "artifacts/teacher_pairs/pairs.zarr", kind="pairs", verify=True)
    one = open_dataset(pristine / "artifacts/teacher_pairs/pairs.zarr", kind="pairs")
    assert ours.attrs["content_hash"] == one.attrs["content_hash"]
    for name in one.names:
        assert np.array_equal(ours.load(name), one.load(name)), name

    runs = stage_runs(repo, "teacher_pairs")
    assert len(runs) == before + 1, "the killed attempt's run is continued, not duplicated"
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["reflow.num_processes"] == "2"
    assert runs[0].data.metrics["generated_this_run"] == 16


@pytest.mark.parametrize("name", ["dit", "distill"])
def test_training_in_two_processes(repo, name):
    """Data-parallel training finishes, its loss falls, one MLflow run holds the curve; the main process saves."""
    out = repo / "artifacts" / name
    shutil.rmtree(out)
    before = len(stage_runs(repo, name))

    res = stage(repo, name)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "transformer/config.json").is_file()

    runs = stage_runs(repo, name)
    assert len(runs) == before + 1, "one stage execution, one MLflow run, whatever the number of processes"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["reflow.num_processes"] == "2"
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) >= 2 and all(np.isfinite(loss))
    assert loss[-1] < loss[0], loss
    metrics = json.loads((repo / f"metrics/{name}.json").read_text())
    assert metrics["train_loss"] == pytest.approx(loss[-1])
    assert not stage_processes(repo)


def test_a_user_error_in_every_process_is_reported_once(repo):
    """Both processes find the latents damaged: one clear message, no traceback, no output, a FAILED run."""
    latents = repo / "artifacts/extract/latents.zarr"
    next(p for p in sorted((latents / "z1").rglob("*")) if p.is_file() and p.name != "zarr.json").unlink()
    shutil.rmtree(repo / "artifacts/dit")

    res = stage(repo, "dit")
    assert res.returncode == 1, res.stderr[-3000:]
    assert res.stderr.count("error: stage 'dit' failed") == 1, res.stderr[-3000:]
    assert res.stderr.count(str(latents)) == 1 and "missing" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not (repo / "artifacts/dit").exists()
    assert stage_runs(repo, "dit")[0].info.status == "FAILED"
    assert not stage_processes(repo)


def test_killing_the_launcher_takes_its_processes_along(repo):
    """torchrun puts each process in a session of its own; SIGKILL to the stage must still end them all
    (nothing keeps training, or writes an output, after the stage is gone). Its server binds loopback."""
    shutil.rmtree(repo / "artifacts/dit")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop(KILL_AT, None)
    launcher = subprocess.Popen([sys.executable, "-m", "stages.dit"], cwd=repo, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        me = psutil.Process(launcher.pid)
        deadline = time.monotonic() + 300
        while len(me.children()) < 2 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = me.children()
        assert len(workers) == 2, "the launcher should have started two processes"
        # torch's rendezvous store, served by the launcher, listens on the loopback device only
        listening = [c.laddr.ip for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening and set(listening) == {"127.0.0.1"}, listening
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert not gone(workers), "launched processes outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not (repo / "artifacts/dit").exists()
