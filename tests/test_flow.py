"""Rectified-flow conventions (direction, target, loss scale), SlimFlow's extras and the losses."""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from models.lpips import LPIPSLoss
from reflow.losses import default_huber_c, mse, pseudo_huber
from reflow.rectified import (
    Paired,
    RectifiedFlow,
    anneal_noise,
    anneal_r,
    flip_pairs,
    interpolate,
    sample_time,
)
from reflow.samplers import Euler, Field

EULER = Euler()


VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def rf_objective(fn: VelocityFn, **kwargs: Any) -> RectifiedFlow:
    """The rectified-flow loss on stored pairs for a toy `fn(x, t, y)` (no model, no label dropout)."""
    return RectifiedFlow(coupling=Paired(), null_label=10, label_dropout=0.0,
                         network=lambda model, x, t, y: fn(x, t, y), **kwargs)


def _batch(z0: torch.Tensor, z1: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"z0": z0, "z1": z1, "label": torch.arange(len(z0))}


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g) + 3.0


# ---------------------------------------------------------------------------------------------------------
# Direction: t = 0 is noise z0, t = 1 is data z1
# ---------------------------------------------------------------------------------------------------------


def test_interpolation_runs_from_noise_to_data() -> None:
    z0, z1 = _pair()
    assert torch.equal(interpolate(z0, z1, torch.zeros(4)), z0)
    assert torch.equal(interpolate(z0, z1, torch.ones(4)), z1)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = interpolate(z0, z1, t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(x_t[i], (1 - ti) * z0[i] + ti * z1[i])


def test_velocity_target_points_from_noise_to_data() -> None:
    z0, z1 = _pair()
    v = z1 - z0
    # Moving along +v from x_t for dt lands on x_{t + dt}.
    t = torch.full((4,), 0.3)
    torch.testing.assert_close(interpolate(z0, z1, t) + 0.2 * v, interpolate(z0, z1, t + 0.2))


def test_true_velocity_has_zero_loss_and_carries_z0_to_z1_in_one_step() -> None:
    z0, z1 = _pair()
    batch, g = _batch(z0, z1), torch.Generator()

    def oracle(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return z1 - z0

    assert rf_objective(oracle)(None, batch, g.manual_seed(1), 0).item() == 0.0
    assert rf_objective(oracle, loss="pseudo_huber")(None, batch, g.manual_seed(1), 0).abs().item() < 1e-7
    one_step = EULER(Field(lambda x, t: oracle(x, t, None)), z0, 1)
    torch.testing.assert_close(one_step.x, z1, rtol=0, atol=1e-6)
    assert one_step.nfe == 1
    # The reversed convention (velocity z0 - z1) would move away from the data and have a large loss.
    assert not torch.allclose(EULER(Field(lambda x, t: z0 - z1), z0, 1).x, z1)
    assert rf_objective(lambda x, t, y: z0 - z1)(None, batch, g.manual_seed(1), 0).item() > 1.0


def test_rectified_flow_loss_is_a_mean_over_dimensions_and_rejects_unknown_losses() -> None:
    z0, z1 = _pair()
    loss = rf_objective(lambda x, t, y: torch.zeros_like(x))(None, _batch(z0, z1), torch.Generator(), 0)
    torch.testing.assert_close(loss, (z1 - z0).pow(2).mean())
    with pytest.raises(ValueError, match="unknown loss 'l3'"):
        rf_objective(lambda x, t, y: x, loss="l3")


def test_rectified_flow_regresses_z1_minus_z0_at_the_interpolated_point() -> None:
    z0, z1 = _pair()
    seen = {}

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        seen.update(x=x, t=t)
        return x

    loss = rf_objective(model)(None, _batch(z0, z1), torch.Generator().manual_seed(0), 0)
    torch.testing.assert_close(seen["x"], interpolate(z0, z1, seen["t"]))
    torch.testing.assert_close(loss, (seen["x"] - (z1 - z0)).pow(2).mean())


def test_model_receives_time_of_shape_b_in_unit_interval() -> None:
    z0, z1 = _pair()
    seen = {}

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        seen["t"] = t
        return x

    rf_objective(model, time_distribution="logit_normal")(None, _batch(z0, z1), torch.Generator().manual_seed(0), 0)
    assert seen["t"].shape == (4,) and seen["t"].dtype == torch.float32
    assert ((seen["t"] >= 1e-3) & (seen["t"] <= 1.0)).all()


# ---------------------------------------------------------------------------------------------------------
# Training time
# ---------------------------------------------------------------------------------------------------------


def test_sample_time_ranges_and_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    uniform = sample_time(20_000, distribution="uniform", eps=0.1, generator=g)
    assert uniform.shape == (20_000,)
    assert uniform.min() >= 0.1 and uniform.max() <= 1.0
    assert abs(uniform.mean().item() - 0.55) < 0.01
    logit = sample_time(20_000, distribution="logit_normal", eps=0.05, generator=g, loc=1.0, scale=0.5)
    assert logit.min() >= 0.05 and logit.max() <= 1.0
    # Median of sigmoid(N(1, .5)) is sigmoid(1).
    assert abs(logit.median().item() - 1 / (1 + math.exp(-1))) < 0.01
    with pytest.raises(ValueError, match="unknown time distribution"):
        sample_time(3, distribution="beta", eps=0.0)  # type: ignore[arg-type]


def test_sample_time_is_reproducible_from_its_generator() -> None:
    a = sample_time(8, distribution="uniform", eps=0.0, generator=torch.Generator().manual_seed(5))
    b = sample_time(8, distribution="uniform", eps=0.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# SlimFlow's extras
# ---------------------------------------------------------------------------------------------------------


def test_anneal_schedule_and_noise() -> None:
    assert [anneal_r(s, 10) for s in (0, 5, 10, 50)] == [1.0, 0.5, 0.0, 0.0]
    assert anneal_r(3, 0) == 0.0
    z0, fresh = _pair()
    assert torch.equal(anneal_noise(z0, fresh, 0.0), z0)
    torch.testing.assert_close(anneal_noise(z0, fresh, 1.0), fresh)
    # Variance is preserved for independent standard Gaussians.
    g = torch.Generator().manual_seed(0)
    mixed = anneal_noise(torch.randn(200_000, generator=g), torch.randn(200_000, generator=g), 0.6)
    assert abs(mixed.var().item() - 1.0) < 0.02


def test_flip_pairs_mirrors_noise_and_data_together() -> None:
    z0, z1 = _pair()
    g = torch.Generator().manual_seed(3)
    f0, f1, mask = flip_pairs(z0, z1, g, p=0.5)
    assert mask.dtype == torch.bool and mask.shape == (4,)
    for i in range(4):
        expect0, expect1 = (z0[i].flip(-1), z1[i].flip(-1)) if mask[i] else (z0[i], z1[i])
        assert torch.equal(f0[i], expect0) and torch.equal(f1[i], expect1)
    # The coupling survives: the target of a flipped pair is the mirrored target, noise stays at t = 0.
    torch.testing.assert_close((f1 - f0)[mask], (z1 - z0)[mask].flip(-1))
    _, _, all_flipped = flip_pairs(z0, z1, g, p=1.0)
    _, _, none_flipped = flip_pairs(z0, z1, g, p=0.0)
    assert all_flipped.all() and not none_flipped.any()


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def test_mse_and_pseudo_huber_values() -> None:
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert mse(a, b).item() == 1.0
    d = 48
    assert default_huber_c(a) == pytest.approx(0.00054 * math.sqrt(d))
    # ||a - b|| = sqrt(48) per sample.
    assert pseudo_huber(a, b, c=1.0).item() == pytest.approx(math.sqrt(48 + 1) - 1, rel=1e-6)
    assert pseudo_huber(a, a).item() == 0.0
    # Small residuals are quadratic, large ones linear.
    small, large = torch.full((1, 48), 1e-6), torch.full((1, 48), 10.0)
    c = 0.1
    assert pseudo_huber(small, 0 * small, c).item() == pytest.approx(48e-12 / (2 * c), rel=1e-3)
    assert pseudo_huber(large, 0 * large, c).item() == pytest.approx(math.sqrt(4800) - c, rel=1e-4)


def test_lpips_from_local_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backbone"):
        LPIPSLoss(tmp_path / "missing.pth", tmp_path / "lin.pth", net="alex")
    backbone = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in backbone.items()}, tmp_path / "alex.pth")
    with pytest.raises(ValueError, match="linear"):
        LPIPSLoss(tmp_path / "alex.pth", tmp_path / "lin.pth", net="alex")
    g = torch.Generator().manual_seed(0)
    lins = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate((64, 192, 384, 256, 256))
    }
    torch.save(lins, tmp_path / "lin.pth")
    lpips = LPIPSLoss(tmp_path / "alex.pth", tmp_path / "lin.pth", net="alex")
    a = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    b = (a + 0.5 * torch.randn(2, 3, 64, 64, generator=g)).clamp(-1, 1)
    assert lpips(a, a).item() == 0.0
    b.requires_grad_(True)
    distance = lpips(a, b)
    assert distance.item() > 0.0
    distance.backward()
    assert b.grad is not None and all(not p.requires_grad for p in lpips.parameters())
