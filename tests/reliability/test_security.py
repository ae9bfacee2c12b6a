"""Servers on loopback, nothing unpickled, outputs only inside the workspace, no secrets in MLflow."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.dvc_yaml import PACKAGES
from runtime.params import ParamsError, parse_params

ROOT = Path(__file__).resolve().parents[2]
CODE = sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py"))


def code_lines():
    for path in CODE:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            yield path.relative_to(ROOT), n, line


def test_nothing_handed_to_us_is_unpickled():
    unsafe = re.compile(r"\bpickle\.loads?\(|\bjoblib\.load\(|\bdill\.|allow_pickle\s*=\s*True|\bcloudpickle\b")
    found = [f"{p}:{n}: {line.strip()}" for p, n, line in code_lines() if unsafe.search(line)]
    found += [f"{p}:{n}: {line.strip()}" for p, n, line in code_lines()
              if "torch.load(" in line and "weights_only=True" not in line]
    assert not found, "unpickling code:\n" + "\n".join(found)


def test_servers_bind_loopback_unless_told_otherwise():
    from flows.cli import build_parser

    any_interface = ".".join("0" * 4)  # spelled out, this line would match itself
    assert not [f"{p}:{n}" for p, n, line in code_lines() if any_interface in line]
    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"


def test_every_output_is_inside_the_workspace_output_folders():
    from dvc.repo import Repo

    allowed = [(ROOT / d).resolve() for d in ("artifacts", "metrics", "reports", "text/artifacts", "text/metrics",
                                              "text/report")]
    for stage in Repo(str(ROOT)).index.stages:
        for out in stage.outs:
            path = (ROOT / str(out.def_path)).resolve()
            assert any(path.is_relative_to(a) for a in allowed), f"{stage.name} writes {path}"


@pytest.mark.parametrize(("edit", "expected"), [
    ({"evaluate_models": {"../../etc": "rf1"}}, "names the stage"),
    ({"evaluate_models": {"x": "../../etc"}}, "is not a model of this pipeline"),
    ({"distill": {"source": "../../etc"}}, "is not a model of this pipeline"),
    ({"reflow_rounds": {"2": "../rf1"}}, "reflow_rounds must be consecutive"),
])
def test_params_cannot_point_an_output_outside_the_workspace(edit, expected):
    """The only params that reach an output path (dvc.yaml's ${...}) are names checked against the stages."""
    with pytest.raises(ParamsError, match=re.escape(expected)):
        parse_params(edit)


@pytest.mark.e2e
def test_secrets_in_the_environment_never_reach_mlflow(tmp_path, copy_pipeline):
    root = copy_pipeline(tmp_path / "repo")
    secrets = {"AWS_SECRET_ACCESS_KEY": "sekrit-aws-4f1c", "MLFLOW_TRACKING_PASSWORD": "sekrit-mlflow-77ab",
               "HF_TOKEN": "hf_sekrit_9d2e", "DATABASE_URL": "postgres://u:sekrit-db-1a@host/db"}
    env = {**os.environ, **secrets, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=root, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    stores = [root / "mlflow.db", *[p for p in root.rglob("mlruns/**/*") if p.is_file()]]
    for store in stores:
        data = store.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in data, f"{name} leaked into {store}"
