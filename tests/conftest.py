"""Test-wide environment: tools offline and quiet, Prefect's home and results in a temp dir."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows.dvc_yaml import PACKAGES

_PREFECT_HOME = tempfile.mkdtemp(prefix="reflow-prefect-")
for var, value in {
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": os.path.join(_PREFECT_HOME, "results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}.items():
    os.environ[var] = value
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # the tests' stores are their workspaces' own sqlite files

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "data", "text", *PACKAGES)  # text/: the text pipeline's dvc.yaml and prompts


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=root,
                   check=True, capture_output=True)


def make_pipeline_repo(root: Path, params: Path = ROOT / "presets" / "tiny.yaml") -> Path:
    """A fresh git + DVC repo holding this project's pipeline and the given params file."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            # A checkout's own text pipeline outputs (text/artifacts, ...) are not project files.
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "artifacts", "report",
                                                                            "metrics", "dvc.lock", ".gitignore"))
        else:
            shutil.copy(src, root / name)
    shutil.copy(params, root / "params.yaml")
    git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pipeline")
    return root


@pytest.fixture(scope="session")
def reproduced_pipeline(tmp_path_factory, request):
    """The tiny pipeline reproduced once by `dvc repro` for the whole session: (root, DVC's stdout).

    Tests never change it: `copy_pipeline` gives each module its own copy (git, DVC cache, MLflow store
    and scratch included), so the suite pays for one full run. Under pytest-xdist the workers share it:
    the first to arrive builds it under a file lock while the others wait.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if hasattr(request.config, "workerinput") else base
    root, log = shared / "reproduced" / "repo", shared / "reproduced" / "repro.log"
    with FileLock(str(shared / "reproduced.lock")):
        if not log.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a worker that failed half-way
            make_pipeline_repo(root)
            res = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, capture_output=True, text=True)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
            log.write_text(res.stdout)
    return root, log.read_text()


@pytest.fixture(scope="session")
def copy_pipeline(reproduced_pipeline):
    def copy(dst: Path) -> Path:
        shutil.copytree(reproduced_pipeline[0], dst, symlinks=True)
        return dst

    return copy


@pytest.fixture(scope="session")
def pipeline_repo():
    """`make_pipeline_repo` as a fixture (test modules cannot import conftest under importlib mode)."""
    return make_pipeline_repo


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
