"""The text pipeline (text/dvc.yaml) end to end with the real DVC, zarr and diffusers, on the tiny preset.

One module-scoped repo runs `dvc repro text/dvc.yaml`; the tests then check what it made, that a prompt steers
the sample, that a killed pair stage resumes bitwise, that bad prompt files and broken Stable Diffusion folders
stop with the file, line or component named, and that a Stable Diffusion folder by path is a teacher.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from storage.datasets import open_dataset
from storage.hashing import tree_sha256

pytestmark = pytest.mark.e2e
TEXT_STAGES = ["text_prepare", "text_vae", "text_extract", "text_teacher", "text_teacher_pairs", "text_rf1",
               "text_fid_features", "text_fid_reference", "text_distill_pairs", "text_distill",
               "text_evaluate@teacher", "text_evaluate@rf1", "text_evaluate@distill", "text_report"]


def run(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def edit_params(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def text_repo(tmp_path_factory, pipeline_repo):
    root = pipeline_repo(tmp_path_factory.mktemp("text") / "repo")
    res = run(root, "-m", "dvc", "repro", "text/dvc.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in TEXT_STAGES:
        assert f"Running stage 'text/dvc.yaml:{stage}'" in res.stdout
    return root


@pytest.fixture
def repo_copy(text_repo, tmp_path):
    return Path(shutil.copytree(text_repo, tmp_path / "repo", symlinks=True))


def test_the_text_pipeline_makes_every_artifact_apart_from_the_class_pipeline(text_repo):
    root = text_repo
    prompts = [line for line in (root / "text/prompts.txt").read_text().splitlines() if line.strip()]
    assert (root / "text/artifacts/prepare/prompts.txt").read_text() == (root / "text/prompts.txt").read_text()
    train = open_dataset(root / "text/artifacts/prepare/train.zarr", kind="images", verify=True)
    assert train.attrs["class_names"] == prompts and set(train.load("labels").tolist()) == set(range(len(prompts)))
    meta = json.loads((root / "text/artifacts/teacher/transformer/reflow.json").read_text())
    assert meta["kind"] == "text_teacher" and meta["prompts"] == prompts and meta["null_label"] == len(prompts)
    pairs = open_dataset(root / "text/artifacts/teacher_pairs/pairs.zarr", kind="pairs", verify=True)
    assert set(pairs.names) == {"z0", "z1", "label", "seed", "guidance"}
    assert pairs.attrs["prompts"] == prompts and pairs.attrs["solver"] == "ddim"
    assert np.all(pairs.load("guidance") == pairs.attrs["guidance_scale"])
    assert pairs.load("label").tolist() == [i % len(prompts) for i in range(pairs.n_rows)]
    for model in ("rf1", "distill"):
        folder = root / "text/artifacts" / model / "transformer"
        assert {p.name for p in folder.iterdir()} >= {"unet", "text_encoder", "tokenizer", "config.json"}
        assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
        assert "timestep = (1 - t) * 999" in json.loads((folder / "reflow.json").read_text())["time_convention"]
    results = json.loads((root / "text/artifacts/evaluate@distill/results.json").read_text())
    assert [p["nfe"] for p in results["points"]] == [1, 2, 4]
    assert all(0 <= p["class_accuracy"] <= 1 for p in results["points"])
    page = (root / "text/report/index.html").read_text()
    assert "One step against the teacher" in page and prompts[0] in page and page.count("data:image/png") >= 5
    assert (root / "text/dvc.lock").is_file() and not (root / "artifacts").exists(), "the class pipeline untouched"


def test_the_prompt_steers_the_sample_and_reflow_sample_takes_one(text_repo, tmp_path):
    from runtime.generator import GeneratorError, sample_grid

    made = {}
    for prompt in ("a red seven", "a blue two"):
        out = tmp_path / f"{prompt}.png"
        info = sample_grid(text_repo, "text_distill", steps=1, n=4, out=out, prompt=prompt)
        assert info["nfe"] == 1 and info["prompt"] == prompt
        made[prompt] = out.read_bytes()
    assert made["a red seven"] != made["a blue two"]
    with pytest.raises(GeneratorError, match="tokens"):
        sample_grid(text_repo, "text_distill", steps=1, n=1, out=tmp_path / "x.png", prompt="seven " * 40)
    with pytest.raises(GeneratorError, match="--class"):
        sample_grid(text_repo, "text_distill", steps=1, n=1, out=tmp_path / "x.png", prompt="a red one", label=3)


def test_teacher_pairs_killed_mid_way_resume_to_identical_pairs(repo_copy):
    out = repo_copy / "text/artifacts/teacher_pairs/pairs.zarr"
    expected = {k: v for k, v in ((k, open_dataset(out, kind="pairs").load(k)) for k in
                                  open_dataset(out, kind="pairs").names)}
    killed = run(repo_copy, "-m", "stages.teacher_pairs", "text", env={"REFLOW_KILL_AT": "shard_written@2"})
    assert killed.returncode != 0
    res = run(repo_copy, "-m", "stages.teacher_pairs", "text")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((repo_copy / "text/metrics/teacher_pairs.json").read_text())
    assert 0 < metrics["generated_this_run"] < metrics["pairs"], "resumed at the first unfinished shard"
    resumed = open_dataset(out, kind="pairs", verify=True)
    for name, array in expected.items():
        assert np.array_equal(resumed.load(name), array), name


@pytest.mark.parametrize(("content", "expected"), [
    (b"\n  \n", r"text/prompts.txt: no prompts"),
    (b"a red zero\na green zero\nbad \xff byte\n", r"text/prompts.txt, line 3: not UTF-8"),
    (b"a red zero\n" + b"seven " * 80 + b"\n", r"text/prompts.txt, line 2: the prompt is \d+ tokens"),
    (b"a red zero\na red zero\n", r"two lines"),
])
def test_a_malformed_prompts_file_stops_text_prepare_with_file_and_line(repo_copy, content, expected):
    before = tree_sha256(repo_copy / "text/artifacts/prepare")
    (repo_copy / "text/prompts.txt").write_bytes(content)
    res = run(repo_copy, "-m", "stages.text_prepare")
    assert res.returncode == 1
    import re

    assert re.search(expected, res.stderr), res.stderr
    assert tree_sha256(repo_copy / "text/artifacts/prepare") == before, "nothing written"


def test_a_stable_diffusion_folder_by_path_is_the_teacher_and_a_missing_component_is_named(repo_copy, tmp_path):
    from models.dit import load_dit
    from models.sd import load_sd, tiny_sd_folder

    sd = tiny_sd_folder(tmp_path / "sd")
    edit_params(repo_copy, "text_teacher", "pretrained", str(sd))
    res = run(repo_copy, "-m", "stages.text_teacher")
    assert res.returncode == 0, res.stderr
    teacher = load_dit(repo_copy / "text/artifacts/teacher/transformer")
    source = load_sd(sd).unet.state_dict()
    assert all(np.array_equal(v.numpy(), source[k].numpy()) for k, v in teacher.unet.state_dict().items())
    meta = json.loads((repo_copy / "text/artifacts/teacher/transformer/reflow.json").read_text())
    assert meta["ddpm"]["beta_schedule"] == "scaled_linear" and meta["pretrained"] == str(sd)

    shutil.rmtree(sd / "text_encoder")
    res = run(repo_copy, "-m", "stages.text_teacher")
    assert res.returncode == 1 and "text_encoder" in res.stderr and str(sd) in res.stderr, res.stderr


def test_the_documented_diffusers_snippet_samples_the_one_step_model(text_repo):
    """docs/text.md's few lines (diffusers and transformers alone) give the pipeline's own one-step sample."""
    doc = (Path(__file__).resolve().parents[1] / "docs/text.md").read_text()
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    check = snippet.replace("z0 = torch.randn(", "torch.manual_seed(0)\nz0 = torch.randn(") + (
        "from runtime.generator import load_generator, with_prompt\n"
        "gen = with_prompt(load_generator('text/artifacts/distill'), 'a red seven')\n"
        "ours = gen.sample(z0, torch.zeros(1, dtype=torch.long), steps=1, solver='euler').x\n"
        "assert torch.equal(ours, z1), (ours - z1).abs().max()\n"
        "assert image.shape[-3:] == (3, 16, 16)\n"
        "print('same')\n")
    res = run(text_repo, "-c", check, env={"PYTHONPATH": str(text_repo)})
    assert res.returncode == 0 and "same" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
