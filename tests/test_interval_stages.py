"""The `meanflow` and `shortcut` stages in the reproduced tiny pipeline: saved like every velocity model, sampled
by `reflow sample --steps N`, measured by `evaluate@<model>` and on the report, refused where they cannot go.
(Kill and resume of both stages: tests/reliability/test_kill_resume.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from models.dit import dit_velocity, load_dit
from models.interval import INTERVAL_FILE, IntervalDiT
from runtime.generator import GeneratorError, load_generator

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory, copy_pipeline):
    return copy_pipeline(tmp_path_factory.mktemp("interval") / "repo")


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)


@pytest.mark.parametrize("stage", ["meanflow", "shortcut"])
def test_the_model_is_saved_with_its_interval_embedding_and_measured(repo, stage):
    folder = repo / "artifacts" / stage / "transformer"
    assert (folder / INTERVAL_FILE).is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    meta = json.loads((folder / "reflow.json").read_text())
    assert meta["interval_model"] == stage and meta["init_from"] == "rf1" and meta["pairs"] == "reflow_pairs@2"
    assert "timestep = (1 - t) * 999" in meta["time_convention"]
    model = load_dit(folder)
    assert isinstance(model, IntervalDiT)
    results = json.loads((repo / f"artifacts/evaluate@{stage}/results.json").read_text())
    assert {p["nfe"] for p in results["points"]} >= {1, 2} and all(p["fid"] > 0 for p in results["points"])
    assert all(p["solver"] == "euler" for p in results["points"])
    page = (repo / "reports/index.html").read_text()
    assert f"evaluate@{stage}" in page or f"{stage} (" in page


def test_the_interval_input_changes_the_step_and_h_zero_is_the_velocity(repo):
    model = load_dit(repo / "artifacts/meanflow/transformer").eval()
    g = torch.Generator().manual_seed(0)
    shape = (4, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    x, t, y = torch.randn(shape, generator=g), torch.zeros(4), torch.arange(4)
    with torch.no_grad():
        instantaneous = dit_velocity(model, x, t, y)
        at_zero = dit_velocity(model, x, t, y, interval=torch.zeros(4))
        one_step = dit_velocity(model, x, t, y, interval=torch.ones(4))
    assert torch.equal(instantaneous, at_zero)
    assert not torch.allclose(one_step, at_zero), "training moved the interval embedding off zero"


def test_an_interval_model_starts_as_the_model_it_copies(repo):
    rf1 = load_dit(repo / "artifacts/rf1/transformer").eval()
    wrapped = IntervalDiT(load_dit(repo / "artifacts/rf1/transformer")).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, rf1.config.in_channels, rf1.config.sample_size, rf1.config.sample_size, generator=g)
    t, y = torch.rand(3, generator=g), torch.arange(3)
    with torch.no_grad():
        assert torch.equal(dit_velocity(wrapped, x, t, y, interval=torch.rand(3, generator=g)),
                           dit_velocity(rf1, x, t, y))


def test_reflow_sample_takes_any_step_count_of_meanflow_and_the_trained_ones_of_shortcut(repo, tmp_path):
    ok = cli(repo, "sample", "--model", "meanflow", "--steps", "3", "--out", str(tmp_path / "mf.png"))
    assert ok.returncode == 0 and (tmp_path / "mf.png").is_file(), ok.stdout + ok.stderr
    ok = cli(repo, "sample", "--model", "shortcut", "--steps", "2", "--out", str(tmp_path / "sc.png"))
    assert ok.returncode == 0 and (tmp_path / "sc.png").is_file(), ok.stdout + ok.stderr
    refused = cli(repo, "sample", "--model", "shortcut", "--steps", "3", "--out", str(tmp_path / "bad.png"))
    assert refused.returncode != 0 and "[1, 2, 4]" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "bad.png").exists()
    gen = load_generator(repo / "artifacts/meanflow")
    with pytest.raises(GeneratorError, match="steps of its own"):
        gen.sample(torch.randn(2, *gen.meta["latent_shape"]), torch.arange(2), steps=4, solver="heun")


@pytest.mark.parametrize(("key", "value", "named"), [
    ("interval_fraction", 1.5, "meanflow.interval_fraction"),
    ("interval_fraction", -0.1, "meanflow.interval_fraction"),
    ("pairs", "rf1", "meanflow.pairs"),
    ("guidance_scale", 2.0, "meanflow.label_dropout"),
])
def test_a_bad_meanflow_setting_is_a_params_error_naming_the_key(repo, tmp_path, key, value, named):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["meanflow"][key] = value
    if key == "guidance_scale":
        params["meanflow"]["label_dropout"] = 0.0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    res = cli(repo, "validate", str(path))
    assert res.returncode != 0 and named in res.stdout + res.stderr, res.stdout + res.stderr


def test_a_params_file_without_the_interpolated_keys_is_refused_naming_them(repo, tmp_path):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    del params["shortcut"]["pairs"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    res = cli(repo, "validate", str(path))
    assert res.returncode != 0 and "shortcut.pairs: missing" in res.stdout + res.stderr
