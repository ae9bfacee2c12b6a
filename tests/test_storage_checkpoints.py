"""storage.checkpoints: diffusers-format models and atomic, checksummed training resume state."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers: never reach for the hub in tests

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel

from storage.checkpoints import CheckpointError, load_state, read_meta, save_model, save_state
from storage.hashing import file_sha256


def _tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=10,
    )


def _state() -> dict:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    return {
        "model": model.state_dict(),
        "ema": ema,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": 123,
        "loss": 0.25,
        "stage": "rf@2",
        "history": [1.0, 0.5],
        "rng": {"torch": torch.get_rng_state()},
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_state_round_trip(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "resume" / "state.pt"
    save_state(path, state)
    assert (tmp_path / "resume" / "state.pt.sha256").read_text().split()[0] == file_sha256(path)
    loaded = load_state(path)
    _assert_same(state, loaded)
    # The restored RNG state reproduces the same draws.
    torch.set_rng_state(loaded["rng"]["torch"])
    a = torch.rand(5)
    torch.set_rng_state(state["rng"]["torch"])
    assert torch.equal(a, torch.rand(5))
    # The optimizer state loads back into a fresh optimizer.
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model.load_state_dict(loaded["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["optimizer"])
    assert opt.state_dict()["state"][0]["step"] == 1
    # Overwriting leaves exactly the state and its sidecar.
    save_state(path, state | {"step": 124})
    assert load_state(path)["step"] == 124
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt", "state.pt.sha256"]


def test_truncated_altered_or_missing_state_raises(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    save_state(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"state\.pt: checksum mismatch"):
        load_state(path)
    altered = bytearray(data)
    altered[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(altered))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_state(path)
    path.write_bytes(data)
    assert load_state(path)["step"] == 123
    (tmp_path / "state.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="sidecar"):
        load_state(path)
    with pytest.raises(CheckpointError, match=r"other\.pt: file missing"):
        load_state(tmp_path / "other.pt")


def test_truncated_state_with_matching_checksum_raises(tmp_path: Path) -> None:
    """Even if the sidecar agrees (e.g. written by hand), an unreadable file is a CheckpointError."""
    path = tmp_path / "state.pt"
    save_state(path, _state())
    path.write_bytes(path.read_bytes()[:100])
    (tmp_path / "state.pt.sha256").write_text(file_sha256(path) + "\n")
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot be loaded"):
        load_state(path)


class _Arbitrary:
    """Not an allowed type for weights_only loading: unpickling it could run code."""


def test_load_is_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"obj": _Arbitrary()}, path)
    (tmp_path / "state.pt.sha256").write_text(file_sha256(path) + "\n")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_state(path)


def test_save_model_round_trip(tmp_path: Path) -> None:
    model = _tiny_dit()
    path = tmp_path / "models" / "dit"
    meta = {"stage": "dit", "params_hash": "abc", "ema": True}
    save_model(model, path, meta=meta)
    assert {"config.json", "diffusion_pytorch_model.safetensors", "reflow.json"} <= {p.name for p in path.iterdir()}
    assert read_meta(path) == meta
    loaded = DiTTransformer2DModel.from_pretrained(path)
    _assert_same(model.state_dict(), loaded.state_dict())
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10.0, 500.0])
    y = torch.tensor([1, 2])
    model.eval()  # train mode drops class labels at random; from_pretrained returns eval mode
    with torch.no_grad():
        out, out2 = (m(x, timestep=t, class_labels=y).sample for m in (model, loaded))
    assert torch.equal(out, out2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["dit"]  # no temp or old dirs left


class _FailingModel:
    def save_pretrained(self, path: Path, safe_serialization: bool = True) -> None:
        (Path(path) / "config.json").write_text("{}")
        raise RuntimeError("disk full")


def test_failed_save_model_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "dit"
    save_model(_tiny_dit(), path, meta={"v": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(_FailingModel(), path, meta={"v": 2})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]


def test_read_meta_errors_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"ckpt: reflow\.json missing"):
        read_meta(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "reflow.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"ckpt: reflow\.json is not valid JSON"):
        read_meta(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "reflow.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        read_meta(tmp_path / "ckpt")
