"""The training objectives of the velocity stages: what the network sees and what it is asked for."""

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models.dit import flow_time
from reflow.distill import OneStepDistill
from reflow.losses import mse
from reflow.rectified import RectifiedFlow, coupling
from reflow.seqrf import SegmentObjective


class ConstantVelocity(nn.Module):
    """A stand-in DiT (same call signature) that predicts a fixed velocity and records the times it saw."""

    def __init__(self, velocity: torch.Tensor) -> None:
        super().__init__()
        self.velocity, self.seen = velocity, []

    def forward(self, x, timestep, class_labels):
        self.seen.append(timestep.clone())
        return SimpleNamespace(sample=self.velocity.expand_as(x))


def segment_batch(velocity: torch.Tensor, n: int = 8) -> dict[str, torch.Tensor]:
    """Segments travelled at constant `velocity`: x_end = x_start + (t_end - t_start) * velocity."""
    g = torch.Generator().manual_seed(0)
    t_start = torch.tensor([0.0, 0.25, 0.5, 0.75]).repeat(n // 4)
    t_end = t_start + 0.25
    x_start = torch.randn(n, *velocity.shape[1:], generator=g)
    x_end = x_start + (t_end - t_start).view(-1, 1, 1, 1) * velocity
    return {"x_start": x_start, "x_end": x_end, "t_start": t_start, "t_end": t_end,
            "label": torch.zeros(n, dtype=torch.long)}


def test_segment_objective_is_zero_at_the_chord_slope_and_sees_times_inside_the_segment() -> None:
    velocity = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = segment_batch(velocity)
    model = ConstantVelocity(velocity)
    objective = SegmentObjective(null_label=10, label_dropout=0.0)
    assert objective(model, batch, torch.Generator().manual_seed(2), 0).item() < 1e-10
    t = flow_time(model.seen[-1])
    assert ((t >= batch["t_start"] - 1e-6) & (t < batch["t_end"])).all()
    assert not torch.allclose(t, batch["t_start"])  # u is drawn, not pinned to the start
    # A wrong velocity is penalised.
    assert objective(ConstantVelocity(-velocity), batch, torch.Generator().manual_seed(2), 0).item() > 0.1


def test_per_segment_distillation_steps_from_the_segment_start() -> None:
    velocity = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = segment_batch(velocity)
    model = ConstantVelocity(velocity)
    objective = SegmentObjective(null_label=10, label_dropout=0.0, one_step=True)
    assert objective(model, batch, torch.Generator().manual_seed(2), 0).item() < 1e-10
    torch.testing.assert_close(flow_time(model.seen[-1]), batch["t_start"])


def test_one_step_distillation_is_zero_when_one_step_lands_on_z1_and_adds_the_perceptual_term() -> None:
    g = torch.Generator().manual_seed(3)
    z0, velocity = torch.randn(8, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    batch = {"z0": z0, "z1": z0 + velocity, "label": torch.zeros(8, dtype=torch.long)}
    model = ConstantVelocity(velocity)
    assert OneStepDistill(null_label=10)(model, batch, g, 0).item() < 1e-10
    assert (flow_time(model.seen[-1]) == 0).all()  # the student is asked at t = 0 only
    shifted = ConstantVelocity(velocity + 0.5)
    plain = OneStepDistill(null_label=10)(shifted, batch, g, 0)
    calls = []

    def perceptual(prediction, z1):
        calls.append(prediction.shape)
        return 3 * mse(prediction, z1)

    objective = OneStepDistill(null_label=10, perceptual=perceptual, perceptual_weight=0.5)
    with_term = objective(shifted, batch, g, 0)
    assert calls == [z0.shape]
    torch.testing.assert_close(with_term, plain * 2.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda loss: RectifiedFlow(coupling=coupling("paired"), null_label=10, loss=loss),
        lambda loss: OneStepDistill(null_label=10, loss=loss),
        lambda loss: SegmentObjective(null_label=10, loss=loss),
    ],
    ids=["rectified_flow", "one_step_distill", "segment"],
)
def test_every_objective_refuses_an_unknown_loss_by_name(make: Callable[[str], object]) -> None:
    with pytest.raises(ValueError, match="unknown loss 'l3'"):
        make("l3")
    make("pseudo_huber")  # the known ones are accepted


def test_one_step_distillation_uses_the_named_loss() -> None:
    g = torch.Generator().manual_seed(3)
    z0, velocity = torch.randn(8, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    batch = {"z0": z0, "z1": z0 + velocity, "label": torch.zeros(8, dtype=torch.long)}
    shifted = ConstantVelocity(velocity + 0.5)  # every residual is 0.5: mse 0.25, huber ~ 0.5 * sqrt(64)
    assert OneStepDistill(null_label=10)(shifted, batch, g, 0).item() == pytest.approx(0.25)
    huber = OneStepDistill(null_label=10, loss="pseudo_huber")(shifted, batch, g, 0).item()
    assert huber == pytest.approx(4.0, rel=1e-2)
