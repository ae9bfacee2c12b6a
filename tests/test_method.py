"""The method's building blocks: couplings (with annealing and mirroring), the RectifiedFlow loss and its
random-number order, the reflow step in both directions, and the straightness and error metrics."""

from typing import Any

import numpy as np
import pytest
import torch

from measure.metrics import flow_errors
from reflow.rectified import (
    Annealed,
    Coupling,
    Independent,
    Network,
    Paired,
    RectifiedFlow,
    coupling,
    interpolate,
    inverted_pairs,
    reflow_pairs,
    sample_time,
)
from reflow.samplers import Euler, Field, Heun

EULER = Euler()
SHAPE = (6, 2, 3, 4)  # the last axis (width) is the one flip_pairs mirrors


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Stored pairs: noise `z0`, data `z1` far from it, and labels."""
    g = torch.Generator().manual_seed(seed)
    return {"z0": torch.randn(SHAPE, generator=g), "z1": torch.randn(SHAPE, generator=g) + 3.0,
            "label": torch.arange(SHAPE[0])}


def _draws(seed: int, n: int, shape: tuple[int, ...] = SHAPE) -> list[torch.Tensor]:
    """The first `n` standard Gaussian draws of a generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _objective(pairing: Coupling, network: Network, **kwargs: Any) -> RectifiedFlow:
    """RectifiedFlow for a toy `network(model, x, t, y)`, with null label 99."""
    return RectifiedFlow(coupling=pairing, null_label=99, network=network, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Couplings
# ---------------------------------------------------------------------------------------------------------


def test_independent_coupling_takes_the_fresh_noise_and_ignores_a_stored_z0() -> None:
    batch, fresh = _batch(), torch.randn(SHAPE)
    z0, z1 = Independent()(batch, fresh, torch.Generator(), 0)
    assert z0 is fresh and z1 is batch["z1"]
    without_z0 = {"z1": batch["z1"], "label": batch["label"]}
    assert Independent()(without_z0, fresh, torch.Generator(), 0)[0] is fresh


def test_paired_coupling_returns_the_stored_pair() -> None:
    batch = _batch()
    z0, z1 = Paired()(batch, torch.randn(SHAPE), torch.Generator(), 5)
    assert z0 is batch["z0"] and z1 is batch["z1"]


def test_annealed_coupling_starts_from_its_own_fresh_noise() -> None:
    batch = _batch()
    g = torch.Generator().manual_seed(4)
    fresh = torch.randn(SHAPE, generator=g)
    z0, z1 = Annealed(10)(batch, fresh, g, 0)
    _, second = _draws(4, 2)  # the draw after `fresh` from the same generator
    assert torch.equal(z0, second) and z1 is batch["z1"]
    assert not torch.equal(z0, fresh)


@pytest.mark.parametrize("step", [10, 11, 1000])
def test_annealed_coupling_is_the_stored_pair_after_the_warmup(step: int) -> None:
    batch = _batch()
    z0, z1 = Annealed(10)(batch, torch.randn(SHAPE), torch.Generator().manual_seed(0), step)
    assert torch.equal(z0, batch["z0"]) and z1 is batch["z1"]


def test_annealed_noise_keeps_unit_variance_halfway_through_the_warmup() -> None:
    n = (200_000,)
    stored, fresh = _draws(8, 2, n)
    g = torch.Generator().manual_seed(9)
    z0, _ = Annealed(10)({"z0": stored, "z1": torch.zeros(n)}, fresh, g, 5)  # r = 0.5
    assert abs(z0.var().item() - 1.0) < 0.02
    # Still mostly the stored noise: correlation sqrt(1 - r^2) = 0.866.
    assert torch.corrcoef(torch.stack([z0, stored]))[0, 1].item() == pytest.approx(0.75**0.5, abs=0.01)


def test_coupling_factory() -> None:
    assert isinstance(coupling("independent"), Independent)
    assert isinstance(coupling("paired"), Paired)
    assert isinstance(coupling("paired", anneal_warmup_steps=0), Paired)
    assert coupling("paired", anneal_warmup_steps=500) == Annealed(500)
    with pytest.raises(ValueError, match="unknown coupling 'reversed'"):
        coupling("reversed")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# The RectifiedFlow loss
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_oracle_velocity_has_zero_loss_on_paired_and_mirrored_pairs(flip_prob: float) -> None:
    batch = _batch()
    velocity = batch["z1"] - batch["z0"]
    oracle = velocity.flip(-1) if flip_prob == 1.0 else velocity  # flip(z1) - flip(z0), not z0 - z1
    objective = _objective(Paired(), lambda m, x, t, y: oracle, flip_prob=flip_prob)
    assert objective(None, batch, torch.Generator().manual_seed(0), 0).item() == 0.0
    # Mirroring changes the pairs: the unmirrored velocity is wrong on them.
    wrong = _objective(Paired(), lambda m, x, t, y: velocity.flip(-1) if flip_prob == 0.0 else velocity,
                       flip_prob=flip_prob)
    assert wrong(None, batch, torch.Generator().manual_seed(0), 0).item() > 0.1


def test_mirrored_pairs_keep_their_direction_from_noise_to_data() -> None:
    """With flip_prob = 1 the network sees the mirrored path `interpolate(flip(z0), flip(z1), t)`."""
    batch, seen = _batch(), {}
    objective = _objective(Paired(), lambda m, x, t, y: seen.update(x=x, t=t) or x, flip_prob=1.0)
    objective(None, batch, torch.Generator().manual_seed(0), 0)
    expected = interpolate(batch["z0"].flip(-1), batch["z1"].flip(-1), seen["t"])
    torch.testing.assert_close(seen["x"], expected)


def test_independent_coupling_trains_on_the_first_noise_drawn() -> None:
    batch, seen = _batch(), {}
    objective = _objective(Independent(), lambda m, x, t, y: seen.update(x=x, t=t) or x, label_dropout=0.0)
    objective(None, batch, torch.Generator().manual_seed(3), 0)
    (fresh,) = _draws(3, 1)
    torch.testing.assert_close(seen["x"], interpolate(fresh, batch["z1"], seen["t"]))


def test_every_coupling_draws_the_fresh_noise_so_later_draws_agree() -> None:
    """Independent and Paired see the same training times and dropped labels from the same seed."""
    seen: dict[str, list[torch.Tensor]] = {"t": [], "y": []}

    def network(model: None, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen["t"].append(t)
        seen["y"].append(y)
        return x

    for c in (Independent(), Paired()):
        _objective(c, network, label_dropout=0.5)(None, _batch(), torch.Generator().manual_seed(11), 0)
    assert torch.equal(seen["t"][0], seen["t"][1])
    assert torch.equal(seen["y"][0], seen["y"][1])
    assert (seen["y"][0] == 99).any() and (seen["y"][0] != 99).any()  # labels were really dropped, not all


def test_rectified_flow_refuses_an_unknown_loss_by_name() -> None:
    with pytest.raises(ValueError, match="unknown loss 'l3'"):
        _objective(Paired(), lambda m, x, t, y: x, loss="l3")


# ---------------------------------------------------------------------------------------------------------
# The reflow step, forwards and backwards
# ---------------------------------------------------------------------------------------------------------


def _constant_field(c: torch.Tensor) -> Field:
    return Field(lambda x, t: c.expand_as(x))


def test_reflow_pairs_carry_noise_along_the_flow() -> None:
    z0, c = _draws(1, 2)
    start, end, nfe = reflow_pairs(_constant_field(c), z0, EULER, 4)
    assert start is z0 and nfe == 4
    torch.testing.assert_close(end, z0 + c)
    assert reflow_pairs(_constant_field(c), z0, Heun(), 4)[2] == 7


def test_inverted_pairs_carry_data_back_to_noise() -> None:
    z1, c = _draws(2, 2)
    start, end, nfe = inverted_pairs(_constant_field(c), z1, EULER, 3)
    assert end is z1 and nfe == 3
    torch.testing.assert_close(start, z1 - c)


def test_inverted_pairs_invert_reflow_pairs_on_a_curved_flow() -> None:
    z0 = _draws(3, 1)[0].double()
    field = Field(lambda x, t: -x * (1 + t.view(-1, 1, 1, 1)))  # x(t) = z0 exp(-t - t^2 / 2)
    _, z1, _ = reflow_pairs(field, z0, Heun(), 200)
    back, _, _ = inverted_pairs(field, z1, Heun(), 200)
    torch.testing.assert_close(z1, z0 * torch.exp(torch.tensor(-1.5, dtype=torch.float64)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(back, z0, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Straightness and error metrics
# ---------------------------------------------------------------------------------------------------------

STEPS = (1, 2, 4)


def _shear(x: torch.Tensor) -> torch.Tensor:
    """`(0, 0, x_0)`: a velocity per sample that leaves x_0 fixed, so it is constant along each path."""
    return torch.stack([torch.zeros_like(x[:, 0]), torch.zeros_like(x[:, 0]), x[:, 0]], dim=1)


def _assert_intervals_hold(metrics: dict[str, float]) -> None:
    for name in [*(f"error_{n}_step" for n in STEPS), "straightness"]:
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"], name


def test_a_straight_flow_has_no_error_and_no_straightness_at_any_step_count() -> None:
    (z0,) = _draws(5, 1, (7, 3))
    metrics = flow_errors(Field(lambda x, t: _shear(x)), z0, z0 + _shear(z0), steps=STEPS, straightness_steps=8,
                          batch_size=3)
    for n in STEPS:
        assert metrics[f"error_{n}_step"] == pytest.approx(0.0, abs=1e-10)
        assert metrics[f"nfe_{n}_step"] == n
    assert metrics["straightness"] == pytest.approx(0.0, abs=1e-10)
    _assert_intervals_hold(metrics)


def test_a_curved_flow_has_straightness_and_errors_that_shrink_with_more_steps() -> None:
    (z0,) = _draws(6, 1, (7, 3))
    # v = 2 t c ends at z0 + c; Euler with n steps reaches z0 + (n - 1) / n c, an error of mean(c^2) / n^2.
    c = _shear(z0)
    field = Field(lambda x, t: 2 * t[:, None] * _shear(x))
    metrics = flow_errors(field, z0, z0 + c, steps=STEPS, straightness_steps=8, batch_size=3)
    errors = [metrics[f"error_{n}_step"] for n in STEPS]
    assert errors[0] > errors[1] > errors[2] > 0
    for n, error in zip(STEPS, errors, strict=True):
        assert error == pytest.approx(c.pow(2).mean().item() / n**2, rel=1e-5)
    assert metrics["straightness"] > 0.01
    _assert_intervals_hold(metrics)
    assert metrics["error_1_step_low"] < metrics["error_1_step_high"]  # the samples differ: a real interval


def test_flow_errors_count_the_evaluations_of_the_given_solver() -> None:
    (z0,) = _draws(7, 1, (4, 3))
    metrics = flow_errors(Field(lambda x, t: _shear(x)), z0, z0 + _shear(z0), steps=(2, 4), sampler=Heun())
    assert (metrics["nfe_2_step"], metrics["nfe_4_step"]) == (3, 7)


def test_the_u_shaped_time_density_integrates_to_one_and_its_draws_follow_it():
    from reflow.rectified import u_shaped_density

    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    assert torch.trapezoid(u_shaped_density(grid), grid).item() == pytest.approx(1.0, abs=1e-9)
    t = sample_time(200_000, distribution="u_shaped", eps=0.0, generator=torch.Generator().manual_seed(0))
    assert 0.0 <= t.min() and t.max() <= 1.0
    counts = torch.histc(t.double(), bins=10, min=0, max=1) / len(t)
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = torch.tensor([torch.trapezoid(u_shaped_density(g), g).item()
                             for g in (torch.linspace(a, b, 1001, dtype=torch.float64)
                                       for a, b in zip(edges[:-1], edges[1:], strict=True))], dtype=torch.float64)
    assert torch.allclose(counts, expected, atol=3e-3)  # binomial sd of a bin share is about 1e-3 here
    assert counts[0] > 2 * counts[4]  # heavy at the ends


def test_pair_diagnostics_measure_the_distance_and_tell_the_noise_end():
    from measure.pairs import pair_diagnostics

    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(512, 4, 8, 8, generator=g).numpy()
    z1 = (0.5 * torch.rand(512, 4, 8, 8, generator=g) + 2.0).numpy()  # far from N(0, 1): mean 2.25
    ok = pair_diagnostics(z0, z1)
    expected = np.sqrt(((z1 - z0) ** 2).reshape(512, -1).mean(axis=1)).mean()
    assert ok["pairs_distance_mean"] == pytest.approx(expected, rel=1e-6)
    assert ok["pairs_distance_p50"] <= ok["pairs_distance_p90"] <= ok["pairs_distance_p99"]
    assert ok["pairs_z0_gaussian_gap"] < 0.05 < ok["pairs_z1_gaussian_gap"] and ok["pairs_swapped"] == 0.0
    assert pair_diagnostics(z1, z0)["pairs_swapped"] == 1.0


def test_the_pair_filter_drops_the_farthest_pairs_and_keeps_the_order(tmp_path):
    from runtime.pairs import drop_farthest_pairs
    from storage.datasets import open_dataset, write_dataset

    z0 = np.zeros((10, 2, 2, 2), np.float32)
    z1 = np.zeros_like(z0)
    distance = np.array([3, 9, 1, 7, 5, 0, 8, 2, 6, 4], np.float32)  # rows 1 and 6 are the farthest
    z1[:, 0, 0, 0] = distance
    labels = np.arange(10, dtype=np.int64)
    made_by = {"producer": "test", "params_hash": "0"}
    write_dataset(tmp_path / "pairs.zarr", {"z0": z0, "z1": z1, "label": labels}, kind="pairs",
                  attrs={"base_seed": 7}, **made_by)
    stats = drop_farthest_pairs(tmp_path / "pairs.zarr", 0.2, made_by)
    kept = open_dataset(tmp_path / "pairs.zarr", kind="pairs", verify=True)
    assert kept.load("label").tolist() == [0, 2, 3, 4, 5, 7, 8, 9]
    assert stats == {"pairs": 8.0, "pairs_dropped": 2.0, "distance_threshold": 7.0}
    assert kept.attrs["base_seed"] == 7 and kept.attrs["rows_generated"] == 10 and kept.attrs["dropped_farthest"] == 0.2
