"""Two runs on one workspace, and a full disk: the second run waits or refuses with a clear message, a
write that runs out of space fails cleanly, and nothing that was already written is lost."""

import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from storage import atomic
from storage.atomic import atomic_dir, atomic_write_bytes
from storage.checkpoints import load_state, save_state
from storage.datasets import open_dataset
from storage.hashing import tree_sha256
from storage.sharded import ShardedWriter


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------------------------------------------------
# Two runs at once (real DVC, real stages)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_second_run_on_a_busy_workspace_refuses_clearly_and_nothing_is_corrupted(tmp_path, copy_pipeline):
    root = copy_pipeline(tmp_path / "repo")
    baseline = tree_sha256(root / "artifacts/dit")
    env = {**os.environ, "PYTHONPATH": str(root)}
    dvc = [sys.executable, "-m", "dvc"]
    first = subprocess.Popen([*dvc, "repro", "-f", "-s", "dit"], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((root / ".reflow/scratch").glob("dit-*/mlflow_run_id")) and time.monotonic() < deadline:
            time.sleep(0.1)  # the stage has started: DVC holds its inputs and outputs
        assert first.poll() is None, "the first run ended before the second could start"
        second = subprocess.run([*dvc, "repro", "-s", "teacher_pairs"], cwd=root, env=env, capture_output=True,
                                text=True)
        out = second.stdout + second.stderr
        assert second.returncode != 0
        # DVC names what is held and by which process
        assert "is busy, it is being blocked by" in out and f"PID {first.pid}" in out, out[-2000:]
        assert first.wait(timeout=300) == 0, first.stdout.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        first.stdout.close()
    assert tree_sha256(root / "artifacts/dit") == baseline
    status = subprocess.run([*dvc, "status", "dvc.yaml"], cwd=root, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout


def test_reflow_run_retries_while_another_run_holds_the_workspace():
    from tasks.dvc_stage import TRANSIENT, TransientStageFailure, dvc_stage

    busy = "ERROR: 'artifacts/dit' is busy, it is being blocked by:\n  (PID 4242): dvc repro"
    assert any(t in busy for t in TRANSIENT)
    assert issubclass(TransientStageFailure, Exception)
    assert dvc_stage.retries >= 3 and sum(dvc_stage.retry_delay_seconds) >= 300


# ---------------------------------------------------------------------------------------------------------
# Disk full during a write (simulated: the write raises ENOSPC)
# ---------------------------------------------------------------------------------------------------------
def test_file_write_out_of_space_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b"previous")
    monkeypatch.setattr(atomic.os, "fsync", enospc)
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, b"new" * 1000)
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "no temporary file left behind"


def test_output_dir_out_of_space_keeps_the_previous_output(tmp_path):
    out = tmp_path / "artifacts" / "rf1"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_bytes(b"good")
    with pytest.raises(OSError), atomic_dir(out) as tmp:
        (tmp / "weights").write_bytes(b"half")
        enospc()
    assert (out / "weights").read_bytes() == b"good"
    assert [p.name for p in out.parent.iterdir()] == ["rf1"]


def test_checkpoint_out_of_space_keeps_the_last_good_state(tmp_path, monkeypatch):
    import torch

    from storage import checkpoints

    path = tmp_path / "train_state.pt"
    save_state(path, {"step": 10, "w": torch.ones(3)})
    monkeypatch.setattr(checkpoints.torch, "save", enospc)
    with pytest.raises(OSError):
        save_state(path, {"step": 20, "w": torch.zeros(3)})
    assert load_state(path)["step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt", "train_state.pt.sha256"]


def test_shard_out_of_space_is_redone_after_space_is_freed(tmp_path, monkeypatch):
    width = 1 << 16  # 256 KiB rows: 4-row chunks, so 16 rows make a shard of their own
    schema = {"z": ((width,), "float32")}
    rows = np.random.default_rng(0).standard_normal((32, width), dtype=np.float32)
    kwargs = dict(n_rows=32, shard_rows=16, schema=schema, kind="pairs", producer="test", params_hash="p")
    writer = ShardedWriter(tmp_path / "scratch.zarr", **kwargs)
    writer.write_shard(0, {"z": rows[:16]})
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError):
        writer.write_shard(1, {"z": rows[16:]})
    monkeypatch.undo()
    writer = ShardedWriter(tmp_path / "scratch.zarr", **kwargs)  # the rerun, with space again
    assert writer.pending() == [1], "the finished shard is kept, the failed one redone"
    writer.write_shard(1, {"z": rows[16:]})
    writer.finalize(tmp_path / "pairs.zarr")
    assert np.array_equal(open_dataset(tmp_path / "pairs.zarr", kind="pairs", verify=True).load("z"), rows)


@pytest.mark.e2e
def test_stage_out_of_space_says_so_without_a_traceback(tmp_path, copy_pipeline):
    """A whole stage hitting ENOSPC: a site hook makes every file write under artifacts/ fail."""
    root = copy_pipeline(tmp_path / "repo")
    before = tree_sha256(root / "artifacts/fid_features")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import builtins, errno, os\n"
        "_open = builtins.open\n"
        "def _full(file, mode='r', *a, **k):\n"
        "    if 'w' in mode and '.tmp-' in os.fspath(file) and 'artifacts' in os.fspath(file):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', os.fspath(file))\n"
        "    return _open(file, mode, *a, **k)\n"
        "builtins.open = _full\n")
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{root}"}
    res = subprocess.run([sys.executable, "-m", "stages.fid_features"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "no space left on the device" in res.stderr and "Traceback" not in res.stderr
    assert tree_sha256(root / "artifacts/fid_features") == before
