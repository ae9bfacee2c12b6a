"""Test-wide environment: tools offline and quiet, Prefect's home and results in a temp dir."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "data", "reflow", "stages", "storage", "tasks", "flows")


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=root,
                   check=True, capture_output=True)


def make_pipeline_repo(root: Path, params: Path = ROOT / "presets" / "tiny.yaml") -> Path:
    """A fresh git + DVC repo holding this project's pipeline and the given params file."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root / name)
    shutil.copy(params, root / "params.yaml")
    git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pipeline")
    return root


@pytest.fixture(scope="session")
def pipeline_repo():
    """`make_pipeline_repo` as a fixture (test modules cannot import conftest under importlib mode)."""
    return make_pipeline_repo


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
