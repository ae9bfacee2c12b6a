"""The training loop: loss falls, resume is bitwise identical, NaN stops with the step."""

import pytest
import torch
from torch import nn

from storage.resume import FileResume
from training.loader import EpochSampler
from training.loop import NonFiniteLossError, TrainConfig, make_accelerator, train


def regression_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return {"x": x, "y": x @ w + 0.01 * torch.randn(256, 1, generator=g)}


def objective(model, batch, generator, step):
    noise = 0.01 * torch.randn(batch["x"].shape, generator=generator)
    return (model(batch["x"] + noise) - batch["y"]).pow(2).mean()


def fresh_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def run(steps, resume=None, log=None, lr=1e-2):
    cfg = TrainConfig(steps=steps, batch_size=32, lr=lr, ema_decay=0.9, log_every=5, checkpoint_every=5, seed=3)
    return train(fresh_model(), objective, regression_problem(), cfg, make_accelerator("cpu", "no"),
                 resume=resume, log=log)


def test_loss_falls_and_is_logged():
    logged = []
    run(60, log=lambda m, step: logged.append((step, m["loss"])))
    assert [s for s, _ in logged] == list(range(5, 61, 5))
    assert logged[-1][1] < 0.2 * logged[0][1]


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    straight = run(20)
    resume = FileResume(tmp_path / "state.pt")
    run(10, resume=resume)  # "killed" after its checkpoint at step 10
    cfg = TrainConfig(steps=20, batch_size=32, lr=1e-2, ema_decay=0.9, log_every=5, checkpoint_every=5, seed=3)
    resumed = train(fresh_model(), objective, regression_problem(), cfg, make_accelerator("cpu", "no"),
                    resume=resume)
    assert resumed.resumed_from == 10
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    def exploding(model, batch, generator, step):
        return objective(model, batch, generator, step) * (float("nan") if step >= 7 else 1.0)

    cfg = TrainConfig(steps=20, batch_size=32, lr=1e-2, log_every=5, checkpoint_every=5, seed=3)
    resume = FileResume(tmp_path / "state.pt")
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        train(fresh_model(), exploding, regression_problem(), cfg, make_accelerator("cpu", "no"), resume=resume)
    assert resume.load()["step"] == 5


def test_crash_hook_fires_after_every_step_before_that_step_s_checkpoint(tmp_path):
    """`train_step` is reached once per step, after the update and before the step's checkpoint: a kill at
    its 10th visit (REFLOW_KILL_AT=train_step@10 with storage.faults.crash_point) leaves step 5's checkpoint."""
    class Killed(Exception):
        pass

    reached = []

    def crash_point(name):
        reached.append(name)
        if len(reached) == 10:
            raise Killed

    cfg = TrainConfig(steps=20, batch_size=32, lr=1e-2, log_every=5, checkpoint_every=5, seed=3)
    resume = FileResume(tmp_path / "state.pt")
    with pytest.raises(Killed):
        train(fresh_model(), objective, regression_problem(), cfg, make_accelerator("cpu", "no"), resume=resume,
              crash_point=crash_point)
    assert reached == ["train_step"] * 10
    assert resume.load()["step"] == 5


def test_epoch_sampler_visits_every_row_once_per_epoch():
    sampler = EpochSampler(10, seed=1)
    seen = torch.cat([sampler.indices(step, 4, 0, 4) for step in range(5)])  # two epochs of 10
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:20].tolist()) == list(range(10))
    # ranks split the global batch without overlap
    both = torch.cat([sampler.indices(0, 4, r, 2) for r in range(2)])
    assert torch.equal(both, sampler.indices(0, 4, 0, 4))
