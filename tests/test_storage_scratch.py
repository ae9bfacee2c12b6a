"""storage.scratch, plus the small pieces everything else rests on: storage.atomic and storage.hashing."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from storage.atomic import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_text,
    npz_bytes,
)
from storage.hashing import canonical_json, file_sha256, params_hash
from storage.scratch import clear_scratch, scratch_dir

# ---------------------------------------------------------------------------- scratch


def test_scratch_dir_is_keyed_by_stage_and_key(tmp_path: Path) -> None:
    key = {"params": {"lr": 1e-4, "steps": 100}, "inputs": {"artifacts/latents.zarr": "md5abc"}}
    d = scratch_dir(tmp_path, "rf@2", key)
    assert d == tmp_path / ".reflow" / "scratch" / f"rf_2-{params_hash(key)}" and d.is_dir()
    assert json.loads((d / "key.json").read_text()) == {"stage": "rf@2", "key": key}
    (d / "state.pt").write_bytes(b"progress")
    # Same key (in any dict order) -> same dir, contents kept; another key -> another dir.
    same = {"inputs": {"artifacts/latents.zarr": "md5abc"}, "params": {"steps": 100, "lr": 1e-4}}
    assert scratch_dir(tmp_path, "rf@2", same) == d and (d / "state.pt").read_bytes() == b"progress"
    other = scratch_dir(tmp_path, "rf@2", key | {"inputs": {"artifacts/latents.zarr": "md5xyz"}})
    assert other != d and other.is_dir()
    assert scratch_dir(tmp_path, "evaluate/dit", key).name.startswith("evaluate_dit-")


def test_clear_scratch(tmp_path: Path) -> None:
    d = scratch_dir(tmp_path, "dit", {"params": {}})
    (d / "sub").mkdir()
    (d / "sub" / "x").write_text("x")
    clear_scratch(d)
    assert not d.exists()
    clear_scratch(d)  # already gone: fine
    (tmp_path / "keep").mkdir()
    with pytest.raises(ValueError, match="refusing"):
        clear_scratch(tmp_path / "keep")
    assert (tmp_path / "keep").is_dir()


# ---------------------------------------------------------------------------- hashing


def test_canonical_json_and_params_hash() -> None:
    obj = {"b": [1, 2.5, 0.1], "a": {"y": 1e-5, "x": Path("data/x.npz"), "z": np.float32(0.5)}}
    text = canonical_json(obj)
    assert text == '{"a":{"x":"data/x.npz","y":1e-05,"z":0.5},"b":[1,2.5,0.1]}'
    assert canonical_json({"b": [1, 2.5, 0.1], "a": {"z": 0.5, "y": 1e-5, "x": "data/x.npz"}}) == text
    h = params_hash(obj)
    assert h == hashlib.sha256(text.encode()).hexdigest()[:16] and len(h) == 16
    assert params_hash({"lr": 0.1}) != params_hash({"lr": 0.1 + 1e-12})  # repr keeps every digit
    with pytest.raises(TypeError):
        canonical_json({"f": object()})


def test_file_sha256(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10_000  # > 1 read block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_file_writes(tmp_path: Path) -> None:
    f = tmp_path / "out.json"
    atomic_write_json(f, {"b": 1, "a": [1, 2]})
    assert json.loads(f.read_text()) == {"a": [1, 2], "b": 1}
    atomic_write_text(f, "second")
    assert f.read_text() == "second"
    atomic_write_bytes(f, b"\x00\x01")
    assert f.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp files left
    with pytest.raises(TypeError):
        atomic_write_json(f, {"x": object()})
    assert f.read_bytes() == b"\x00\x01"  # a failed write leaves the old file


def test_atomic_dir_replaces_on_success(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-model-") and not final.exists()
        (tmp / "a").write_text("one")
    assert (final / "a").read_text() == "one"
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("two")
        assert (final / "a").read_text() == "one"  # old version visible until the swap
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no .tmp- or .old- left


def test_atomic_dir_leaves_final_untouched_on_error(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("new, half written")
            raise RuntimeError("boom")
    assert (final / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "fresh"):
            raise RuntimeError("boom")
    assert not (tmp_path / "fresh").exists()


def test_atomic_dir_removes_leftovers_of_killed_attempts(tmp_path: Path) -> None:
    (tmp_path / ".tmp-model-0123456789ab").mkdir()  # as left by a SIGKILL mid-write
    (tmp_path / ".old-model-0123456789ab").mkdir()
    (tmp_path / ".tmp-model2-0123456789ab").mkdir()  # belongs to another output: kept
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "a").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-model2-0123456789ab", "model"]


def test_npz_archives_depend_on_their_arrays_only(tmp_path: Path) -> None:
    """numpy.savez stamps the time into every member; ours must hash the same on every run (DVC outputs)."""
    arrays = {"b/x": np.arange(6.0).reshape(2, 3), "a": np.array([True, False])}
    first = npz_bytes(arrays)
    time.sleep(2.1)  # zip dates have a 2 s resolution
    assert npz_bytes(arrays) == first
    atomic_write_npz(tmp_path / "r.npz", arrays)
    with np.load(tmp_path / "r.npz", allow_pickle=False) as loaded:
        assert sorted(loaded.files) == ["a", "b/x"] and np.array_equal(loaded["b/x"], arrays["b/x"])
