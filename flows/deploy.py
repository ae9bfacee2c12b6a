"""`reflow deploy` and `reflow worker`: the pipeline as a Prefect deployment, run by process workers.

Prefect does the work: `prefect work-pool create`, `prefect deploy` from `prefect.yaml`, `prefect worker
start`. These commands only find the workspace and the server, and start the worker so that its flow runs
execute in this checkout (`enter_workspace`, the deployment's pull step, reads REFLOW_WORKSPACE).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

WORKSPACE_ENV = "REFLOW_WORKSPACE"
DEFAULT_API_URL = "http://127.0.0.1:4200/api"  # where `reflow ui` serves Prefect
PREFECT_FILE = "prefect.yaml"


class DeployError(RuntimeError):
    pass


def enter_workspace() -> dict[str, str]:
    """Pull step of `prefect.yaml`: enter the worker's checkout before the flow is loaded from it.

    Runs in the flow run's process, on the worker's machine, so each worker runs its own workspace.
    """
    value = os.environ.get(WORKSPACE_ENV)
    if not value:
        raise DeployError(
            f"{WORKSPACE_ENV} is not set in the worker's environment, so this flow run has no workspace: "
            f"start the worker with `reflow worker` inside a checkout of the project, or export "
            f"{WORKSPACE_ENV}=/path/to/checkout before `prefect worker start`")
    root = Path(value).expanduser().resolve()
    if not (root / "dvc.yaml").is_file():
        raise DeployError(f"{WORKSPACE_ENV}={value}: no dvc.yaml in {root}; expected a checkout of the "
                          f"project (git clone, then `dvc pull` for the artifacts already made elsewhere)")
    os.chdir(root)
    return {"directory": str(root)}


def work_pools(root: Path) -> list[str]:
    """The work pools the deployments of `root/prefect.yaml` run on (first deployment's first)."""
    import yaml

    path = root / PREFECT_FILE
    if not path.is_file():
        raise DeployError(f"{path}: not found; the deployment is declared there (see the project's own)")
    with open(path) as fh:
        spec = yaml.safe_load(fh) or {}
    pools: list[str] = []
    for i, dep in enumerate(spec.get("deployments") or []):
        name = ((dep or {}).get("work_pool") or {}).get("name")
        if not isinstance(name, str) or not name:
            raise DeployError(f"{path}: deployments[{i}].work_pool.name is missing; expected a pool name")
        if name not in pools:
            pools.append(name)
    if not pools:
        raise DeployError(f"{path}: no deployments; expected a `deployments:` list")
    return pools


def api_url(explicit: str | None) -> str:
    """--api-url, else PREFECT_API_URL (environment or Prefect profile), else `reflow ui`'s server."""
    if explicit:
        return explicit.rstrip("/")
    from prefect.settings import get_current_settings

    return (get_current_settings().api.url or DEFAULT_API_URL).rstrip("/")


def require_server(url: str) -> None:
    """Fail with the way out when no Prefect server answers: an ephemeral one would forget the deployment."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10):
            return
    except OSError as exc:
        raise DeployError(f"no Prefect server answers at {url} ({exc}): start one with `reflow ui` "
                          f"(or `prefect server start`), or set PREFECT_API_URL / --api-url to yours") from exc


def _prefect(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def _env(url: str, root: Path) -> dict[str, str]:
    """The Prefect processes' environment. PYTHONPATH: the pull step and the flow import this checkout's code,
    not whichever checkout the venv was installed from (two clones on one machine may share one venv)."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PREFECT_API_URL": url, WORKSPACE_ENV: str(root), "PYTHONPATH": path}


def ensure_pool(name: str, root: Path, env: dict[str, str]) -> bool:
    """Create the `process` work pool `name` unless it exists; True when it was created."""
    if _prefect("work-pool", "inspect", name, cwd=root, env=env).returncode == 0:
        return False
    res = _prefect("work-pool", "create", name, "--type", "process", cwd=root, env=env)
    if res.returncode != 0:
        raise DeployError(f"prefect work-pool create {name} --type process failed:\n{res.stdout}{res.stderr}")
    return True


def cmd_deploy(args: argparse.Namespace) -> int:
    from storage.repo import find_repo_root

    try:
        root = find_repo_root()
        pools = work_pools(root)
        url = api_url(args.api_url)
        require_server(url)
        env = _env(url, root)
        for pool in pools:
            print(f"work pool {pool}: {'created' if ensure_pool(pool, root, env) else 'exists'}", flush=True)
    except (DeployError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res = _prefect("deploy", "--all", "--prefect-file", str(root / PREFECT_FILE), "--no-prompt", cwd=root, env=env)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        print(f"error: prefect deploy failed ({res.returncode})", file=sys.stderr)
        return 1
    print(f"deployed to {url.removesuffix('/api')}; start a worker in each workspace with `reflow worker`, then "
          "`prefect deployment run reflow-pipeline/workspace` (add -p 'targets=[\"rf1\"]' for part of it)")
    return 0


def worker_command(root: Path, pool: str, queues: list[str], name: str | None, run_once: bool) -> list[str]:
    # --limit 1: a worker is one workspace, and DVC runs one pipeline at a time in a workspace.
    cmd = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
           "--limit", "1", "--name", name or f"{socket.gethostname()}:{root.name}"]
    for queue in queues:
        cmd += ["--work-queue", queue]
    return cmd + (["--run-once"] if run_once else [])


def cmd_worker(args: argparse.Namespace) -> int:
    from storage.repo import find_repo_root

    try:
        root = find_repo_root()
        pool = args.pool or work_pools(root)[0]
        url = api_url(args.api_url)
        require_server(url)
    except (DeployError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"reflow worker: pool {pool} at {url}; flow runs execute in {root}"
          + (f" with CUDA_VISIBLE_DEVICES={gpus}" if gpus is not None else ""), flush=True)
    cmd = worker_command(root, pool, args.work_queue or [], args.name, args.run_once)
    # exec: the worker gets our signals directly (Ctrl-C shuts it down the way Prefect intends).
    os.execve(cmd[0], cmd, _env(url, root))
    return 0  # not reached


def add_commands(subparsers) -> None:
    """Register `deploy` and `worker` on the `reflow` command's subparsers."""
    p = subparsers.add_parser("deploy", help="create the process work pool if missing and deploy prefect.yaml")
    p.add_argument("--api-url", help=f"Prefect API (default: PREFECT_API_URL, else {DEFAULT_API_URL})")
    p.set_defaults(func=cmd_deploy)

    p = subparsers.add_parser("worker", help="a Prefect process worker whose flow runs execute in this checkout")
    p.add_argument("--pool", help="work pool (default: the one in prefect.yaml)")
    p.add_argument("--work-queue", action="append", help="only these work queues of the pool (repeatable)")
    p.add_argument("--name", help="worker name shown in the Prefect UI (default: host:workspace folder name)")
    p.add_argument("--run-once", action="store_true", help="take the runs waiting now, finish them, and exit")
    p.add_argument("--api-url", help=f"Prefect API (default: PREFECT_API_URL, else {DEFAULT_API_URL})")
    p.set_defaults(func=cmd_worker)
