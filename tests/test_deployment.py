"""`reflow deploy` and `reflow worker` against a real Prefect server: prefect.yaml deployed on a process work
pool, a flow run picked up by a real process worker and executed in the worker's workspace by DVC."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """The process and everything it started (the worker's flow-run supervisor runs in a group of its own)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    proc.wait(timeout=5)


def api_get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def api_post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


@pytest.fixture
def prefect_server(tmp_path):
    """A real `prefect server start` on loopback, its database in a temp PREFECT_HOME: (api url, env)."""
    port, home = free_port(), tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                api_get(f"{url}/health")
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("prefect server did not come up:\n" + (tmp_path / "server.log").read_text()[-3000:])
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        kill_tree(proc)
        log.close()


def run(args: list[str], cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_deploy_and_worker_run_the_pipeline_in_the_workspace(tmp_path, prefect_server, pipeline_repo):
    url, env = prefect_server
    repo = pipeline_repo(tmp_path / "repo")
    shutil.copy(ROOT / "prefect.yaml", repo / "prefect.yaml")
    subprocess.run(["git", "add", "prefect.yaml"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "deployment"],
                   cwd=repo, check=True)
    deploy = [sys.executable, "-m", "flows.cli", "deploy"]

    first = run(deploy, repo, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "work pool reflow-process: created" in first.stdout
    again = run(deploy, repo, env)  # deploying after an edit updates the deployment, the pool stays
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "work pool reflow-process: exists" in again.stdout

    assert api_get(f"{url}/work_pools/reflow-process")["type"] == "process"
    deployment = api_get(f"{url}/deployments/name/reflow-pipeline/workspace")
    assert deployment["work_pool_name"] == "reflow-process"
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployment["pull_steps"] == [{"flows.deploy.enter_workspace": {}}]
    assert deployment["global_concurrency_limit"]["limit"] == 1  # one pipeline run at a time
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    listed = api_post(f"{url}/deployments/filter", {})
    assert [d["name"] for d in listed] == ["workspace"], "a second deploy updates, it does not duplicate"

    # The command the README gives; the worker below is started from elsewhere, so the stage outputs can
    # only land in the repo if the pull step took the flow run into REFLOW_WORKSPACE.
    submitted = run([PREFECT, "deployment", "run", "reflow-pipeline/workspace", "-p", 'targets=["prepare"]'],
                    repo, env)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", submitted.stdout).group(1)

    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "--run-once"], cwd=repo, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        returncode = worker.wait(timeout=300)  # a guard against a hang, not a speed check
    finally:
        kill_tree(worker)
        log.close()
    worker_log = (tmp_path / "worker.log").read_text()
    assert returncode == 0, worker_log[-4000:]
    assert f"flow runs execute in {repo.resolve()}" in worker_log

    flow_run = api_get(f"{url}/flow_runs/{flow_run_id}")
    assert flow_run["state_type"] == "COMPLETED", (flow_run["state"], worker_log[-4000:])
    assert flow_run["parameters"]["targets"] == ["prepare"]
    tasks = api_post(f"{url}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert {t["name"]: t["state_type"] for t in tasks} == {"validate": "COMPLETED", "prepare": "COMPLETED"}

    assert (repo / "artifacts" / "prepare" / "train.zarr").is_dir()
    assert not (repo / "artifacts" / "vae").exists(), "only the target and its ancestors ran"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"validate", "prepare"}
    status = run([sys.executable, "-m", "dvc", "status", "prepare"], repo, env)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    assert (repo / "mlflow.db").is_file(), "the workspace's own MLflow store holds the run's lineage"


def test_deploy_without_a_server_says_how_to_start_one(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "prefect.yaml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    for command in ("deploy", "worker"):
        res = run([sys.executable, "-m", "flows.cli", command, "--api-url", url], repo, dict(os.environ))
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"no Prefect server answers at {url}" in res.stderr and "reflow ui" in res.stderr


def test_enter_workspace_needs_a_checkout(tmp_path, monkeypatch):
    from flows.deploy import WORKSPACE_ENV, DeployError, enter_workspace

    monkeypatch.chdir(tmp_path)  # restored afterwards: enter_workspace changes directory
    monkeypatch.delenv(WORKSPACE_ENV, raising=False)
    with pytest.raises(DeployError, match=f"{WORKSPACE_ENV} is not set.*reflow worker"):
        enter_workspace()
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path))
    with pytest.raises(DeployError, match=f"no dvc.yaml in {tmp_path}"):
        enter_workspace()
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv(WORKSPACE_ENV, str(tmp_path / "ws"))
    assert enter_workspace() == {"directory": str((tmp_path / "ws").resolve())}
    assert Path.cwd() == (tmp_path / "ws").resolve()


def test_prefect_yaml_is_checked(tmp_path):
    from flows.deploy import DeployError, work_pools

    assert work_pools(ROOT) == ["reflow-process"]
    with pytest.raises(DeployError, match="prefect.yaml: not found"):
        work_pools(tmp_path)
    (tmp_path / "prefect.yaml").write_text("deployments:\n  - name: x\n    entrypoint: flows/pipeline.py:pipeline\n")
    with pytest.raises(DeployError, match=r"deployments\[0\].work_pool.name is missing"):
        work_pools(tmp_path)
