"""MeanFlow in several processes: its JVP runs on the raw module, past DDP's gradient hooks, so the training loop
averages the gradients itself. Two processes (torchrun, gloo on this CPU) must make the update one process makes
on the whole batch; without the loop's sync they do not (the failure the sync exists to prevent).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from reflow.meanflow import adaptive_loss, meanflow_target, unwrapped
from training.loop import TrainConfig, make_accelerator, train

out, sync = Path(sys.argv[1]), sys.argv[2] == "sync"


def network(model, x, t, y, interval=None):
    return model(torch.cat([x, t[:, None], interval[:, None]], dim=1))


class FixedRows:
    """MeanFlow's loss on rows that carry their own (x_t, t, h, v): no randomness, so any split of a batch
    between processes asks for the same gradient as the whole."""

    manual_gradient_sync = sync

    def __call__(self, model, batch, generator, step):
        u, target = meanflow_target(network, unwrapped(model), batch["x"], batch["t"], batch["h"], batch["v"], None)
        return adaptive_loss(u, target, 1.0)


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 2))
g = torch.Generator().manual_seed(1)
rows = {"x": torch.randn(64, 2, generator=g), "t": torch.rand(64, generator=g) * 0.5,
        "h": torch.rand(64, generator=g) * 0.5, "v": torch.randn(64, 2, generator=g)}
accelerator = make_accelerator("cpu", "no")
world = accelerator.num_processes
cfg = TrainConfig(steps=3, batch_size=32 // world, lr=1e-2, ema_decay=0.9, grad_clip=None, log_every=3,
                  checkpoint_every=3, seed=0)
result = train(model, FixedRows(), rows, cfg, accelerator)
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
          out / f"rank{accelerator.process_index}-of-{world}.safetensors")
'''


def launch(tmp_path: Path, processes: int, sync: bool) -> Path:
    out = tmp_path / f"{processes}-{sync}"
    out.mkdir()
    script = tmp_path / "update.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [str(script), str(out), "sync" if sync else "nosync"]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def test_two_processes_make_the_update_one_process_makes(tmp_path):
    one = load_file(launch(tmp_path, 1, sync=True) / "rank0-of-1.safetensors")
    two = launch(tmp_path, 2, sync=True)
    for rank in (0, 1):
        weights = load_file(two / f"rank{rank}-of-2.safetensors")
        for name, value in one.items():
            assert torch.allclose(weights[name], value, atol=1e-6), (rank, name)


def test_without_the_loops_sync_the_processes_drift_apart(tmp_path):
    two = launch(tmp_path, 2, sync=False)
    rank0, rank1 = (load_file(two / f"rank{r}-of-2.safetensors") for r in (0, 1))
    assert any(not torch.allclose(rank0[k], rank1[k], atol=1e-6) for k in rank0), \
        "the ranks agree without the loop's sync: the JVP no longer bypasses DDP, and this test's premise is gone"


pytestmark = pytest.mark.e2e
