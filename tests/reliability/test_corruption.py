"""Corrupted artifacts are detected where they are read: the error names the path and what is wrong, the
stage exits non-zero, and nothing it would have written is overwritten. DVC sees the same damage as a
changed output (`dvc status`), and lineage marks what no longer joins up.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storage.hashing import tree_sha256

pytestmark = pytest.mark.e2e


def stage(root: Path, name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root), **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, copy_pipeline):
    return copy_pipeline(tmp_path_factory.mktemp("corrupt") / "pristine")


@pytest.fixture
def repo(tmp_path, pristine):
    return Path(shutil.copytree(pristine, tmp_path / "repo", symlinks=True))


def shard_files(dataset: Path, array: str) -> list[Path]:
    return sorted(p for p in (dataset / array).rglob("*") if p.is_file() and p.name != "zarr.json")


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_refused(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0, res.stdout[-2000:]
    for needle in needles:
        assert needle in res.stderr, f"{needle!r} not in:\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, "a clear message, not a traceback"


def test_flipped_byte_in_a_pairs_chunk(repo):
    pairs = repo / "artifacts/teacher_pairs/pairs.zarr"
    victim = shard_files(pairs, "z1")[0]
    flip_byte(victim)
    before = tree_sha256(repo / "artifacts/rf1")
    assert_refused(stage(repo, "rf1"), str(pairs))
    assert tree_sha256(repo / "artifacts/rf1") == before
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "teacher_pairs"], cwd=repo, capture_output=True,
                            text=True)
    assert "artifacts/teacher_pairs" in status.stdout and "modified" in status.stdout


def test_deleted_chunk_of_the_latents(repo):
    latents = repo / "artifacts/extract/latents.zarr"
    shard_files(latents, "z1")[0].unlink()
    before = tree_sha256(repo / "artifacts/dit")
    assert_refused(stage(repo, "dit"), str(latents), "missing")
    assert tree_sha256(repo / "artifacts/dit") == before


def test_wrong_schema_version(repo):
    pairs = repo / "artifacts/teacher_pairs/pairs.zarr"
    meta = json.loads((pairs / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (pairs / "zarr.json").write_text(json.dumps(meta))
    before = tree_sha256(repo / "artifacts/rf1")
    assert_refused(stage(repo, "rf1"), str(pairs), "schema")
    assert tree_sha256(repo / "artifacts/rf1") == before


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_model_checkpoint(repo, damage):
    weights = repo / "artifacts/dit/transformer/diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        flip_byte(weights, offset=4)  # the safetensors header length: the file no longer parses
    before = tree_sha256(repo / "artifacts/teacher_pairs")
    assert_refused(stage(repo, "teacher_pairs"), str(repo / "artifacts/dit"))
    assert tree_sha256(repo / "artifacts/teacher_pairs") == before


def test_damaged_resume_state_is_refused_not_silently_restarted(repo):
    killed = stage(repo, "rf1", env={"REFLOW_KILL_AT": "train_step@15"})
    assert killed.returncode != 0
    state = next((repo / ".reflow/scratch").glob("rf1-*/train_state.pt"))
    state.write_bytes(state.read_bytes()[:1000])
    before = tree_sha256(repo / "artifacts/rf1")
    assert_refused(stage(repo, "rf1"), str(state), "checksum mismatch")
    assert tree_sha256(repo / "artifacts/rf1") == before


def test_dvc_lock_hash_that_no_longer_matches(repo):
    import yaml

    from flows.lineage import lineage_report

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    # The lock now says the DiT has another hash than the files have (and than teacher_pairs consumed).
    out = next(o for o in lock["stages"]["dit"]["outs"] if o["path"] == "artifacts/dit")
    out["md5"] = "0" * 32 + ".dir"
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "dit"], cwd=repo, capture_output=True, text=True)
    assert "artifacts/dit" in status.stdout and ("modified" in status.stdout or "not in cache" in status.stdout)
    report = lineage_report(repo, "teacher_pairs")
    step = next(s for s in report["steps"] if s["stage"] == "teacher_pairs")
    stale = [i for i in step["inputs"] if i["path"] == "artifacts/dit"]
    assert stale and stale[0]["stale"], "the DiT no longer joins teacher_pairs by hash"


def test_pairs_of_the_wrong_latent_shape(repo):
    """A dataset that is whole and checksummed but made for another model: refused by its shape, not by a
    crash deep in the network."""
    import numpy as np

    from storage.datasets import open_dataset, write_dataset

    pairs = repo / "artifacts/teacher_pairs/pairs.zarr"
    good = open_dataset(pairs, kind="pairs")
    n, (c, h, w) = good.n_rows, good["z0"].shape[1:]
    extra = {k: v for k, v in good.attrs.items()
             if k not in ("kind", "schema_version", "producer", "params_hash", "content_hash", "n_rows")}
    wrong = np.zeros((n, c, 2 * h, 2 * w), np.float32)
    write_dataset(pairs, {"z0": wrong, "z1": wrong, "label": good.load("label"), "seed": good.load("seed")},
                  kind="pairs", producer="teacher_pairs", params_hash="other", attrs=extra)
    before = tree_sha256(repo / "artifacts/rf1")
    assert_refused(stage(repo, "rf1"), str(pairs), f"({c}, {h}, {w})")
    assert tree_sha256(repo / "artifacts/rf1") == before
