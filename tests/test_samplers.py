"""Samplers against analytic fields, honest NFE counts, DDIM golden properties, per-sample noise."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from reflow.samplers import (
    DDIM,
    RK45,
    SOLVERS,
    Euler,
    Field,
    Heun,
    ddim_scheduler,
    guided,
    solver,
    straightness,
)
from reflow.seeds import mix_seed, per_sample_noise, sample_seeds

euler, heun, ddim = Euler(), Heun(), DDIM()


def _z0(shape: tuple[int, ...] = (5, 3), seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


# ---------------------------------------------------------------------------------------------------------
# Fixed-grid solvers
# ---------------------------------------------------------------------------------------------------------


def test_euler_is_exact_for_a_constant_field_and_counts_n_evaluations() -> None:
    z0, c = _z0(), _z0(seed=1)
    field = Field(lambda x, t: c.expand_as(x))
    result = euler(field, z0, 7, return_trajectory=True)
    torch.testing.assert_close(result.x, z0 + c, rtol=0, atol=1e-12)
    assert result.nfe == 7 == field.nfe
    assert result.trajectory is not None and len(result.trajectory) == 8
    assert result.trajectory[0][0] == 0.0 and result.trajectory[-1][0] == 1.0
    assert torch.equal(result.trajectory[0][1], z0)
    # A sub-interval: half the time, half the displacement.
    torch.testing.assert_close(euler(field, z0, 3, t_start=0.25, t_end=0.75).x, z0 + 0.5 * c)


def test_field_passes_time_as_a_float_vector_of_batch_size() -> None:
    seen = []
    field = Field(lambda x, t: seen.append(t) or torch.zeros_like(x))
    euler(field, _z0(dtype=torch.float32), 4)
    assert [t.shape for t in seen] == [(5,)] * 4
    assert all(t.dtype == torch.float32 for t in seen)
    assert [t[0].item() for t in seen] == [0.0, 0.25, 0.5, 0.75]


def test_heun_counts_2n_minus_1_and_is_exact_for_linear_in_t_fields_before_its_euler_step() -> None:
    z0, a, b = _z0(), _z0(seed=1), _z0(seed=2)
    field = Field(lambda x, t: a + b * _per_sample(t, x))  # x(t) = z0 + a t + b t^2 / 2

    def exact(t: float) -> torch.Tensor:
        return z0 + a * t + 0.5 * b * t * t

    steps = 4
    result = heun(field, z0, steps, return_trajectory=True)
    assert result.nfe == 2 * steps - 1 == field.nfe
    assert result.trajectory is not None
    for t, x in result.trajectory[:-1]:
        torch.testing.assert_close(x, exact(t), rtol=0, atol=1e-12)
    # The last step is plain Euler (EDM's Heun), from the exact point at t = 3/4.
    torch.testing.assert_close(result.x, exact(0.75) + 0.25 * (a + 0.75 * b), rtol=0, atol=1e-12)
    assert heun(Field(lambda x, t: a.expand_as(x)), z0, 1).nfe == 1


def test_heun_is_second_order_and_euler_first_order_on_exp() -> None:
    z0 = _z0()
    exact = z0 * math.exp(0.8)

    def error(method, steps: int) -> float:  # noqa: ANN001
        return (method(Field(lambda x, t: 0.8 * x), z0, steps).x - exact).abs().max().item()

    assert 3.5 < error(heun, 16) / error(heun, 32) < 4.5
    assert 1.8 < error(euler, 16) / error(euler, 32) < 2.2


def test_rk45_meets_its_tolerance_and_reports_its_own_count() -> None:
    z0 = _z0()
    field = Field(lambda x, t: 1.3 * x)
    result = RK45(rtol=1e-7, atol=1e-9)(field, z0, None)
    torch.testing.assert_close(result.x, z0 * math.exp(1.3), rtol=1e-6, atol=1e-8)
    assert result.nfe == field.nfe > 6
    loose = RK45(rtol=1e-3, atol=1e-3)(Field(lambda x, t: 1.3 * x), z0, None)
    assert loose.nfe < result.nfe
    # Backwards in time (data to noise) inverts the map.
    back = RK45(rtol=1e-7, atol=1e-9)(Field(lambda x, t: 1.3 * x), result.x, None, t_start=1.0, t_end=0.0)
    torch.testing.assert_close(back.x, z0, rtol=1e-6, atol=1e-8)


def test_solver_factory_builds_the_named_solver_and_validates() -> None:
    z0 = _z0()
    for name, expected_nfe in (("euler", 5), ("heun", 9)):
        field = Field(lambda x, t: -x)
        assert solver(name)(field, z0, 5).nfe == expected_nfe
    assert solver("rk45")(Field(lambda x, t: -x), z0, None).nfe > 0
    assert solver("rk45", rtol=1e-3, atol=1e-4) == RK45(1e-3, 1e-4)
    assert [solver(name).name for name in SOLVERS] == list(SOLVERS)
    with pytest.raises(ValueError, match="steps >= 1"):
        solver("euler")(Field(lambda x, t: -x), z0, 0)
    with pytest.raises(ValueError, match="steps >= 1"):
        solver("heun")(Field(lambda x, t: -x), z0, None)
    with pytest.raises(ValueError, match="steps >= 1"):
        ddim(Field(lambda x, t: -x), z0, None)
    with pytest.raises(ValueError, match="unknown solver 'midpoint'"):
        solver("midpoint")


def test_rk45_ignores_steps() -> None:
    z0 = _z0()
    a, b = RK45()(Field(lambda x, t: -x), z0, 1), RK45()(Field(lambda x, t: -x), z0, 50)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe


# ---------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------------------


def _label_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Output `y + 1` in every channel (null class 10 -> 11), so guidance is easy to predict."""
    return torch.ones_like(x) * _per_sample(y.to(x.dtype) + 1, x)


def test_guidance_mixes_every_channel_and_doubles_nfe() -> None:
    x = _z0((3, 4, 2, 2))
    y = torch.tensor([0, 1, 2])
    field = guided(_label_model, y, null_label=10, scale=4.0)
    out = field(x, 0.5)
    expected = 11 + 4.0 * (y.double() + 1 - 11)
    torch.testing.assert_close(out, expected.view(3, 1, 1, 1).expand_as(x))
    assert field.nfe == 2 and field.evals_per_call == 2
    assert euler(field, x, 5).nfe == 10
    assert heun(guided(_label_model, y, null_label=10, scale=4.0), x, 5).nfe == 18


def test_guidance_scale_one_is_the_plain_conditional_model() -> None:
    x = _z0((3, 4, 2, 2))
    y = torch.tensor([0, 1, 2])
    field = guided(_label_model, y, null_label=10, scale=1.0)
    torch.testing.assert_close(field(x, 0.5), _label_model(x, torch.zeros(3), y))
    assert field.nfe == 1
    assert guided(lambda x, t, y: x, None, null_label=10, scale=3.0).evals_per_call == 1


# ---------------------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------------------


def _gaussian_oracle(mu: torch.Tensor, s: float, steps: int) -> Field:
    """Exact epsilon-prediction for data N(mu, s^2 I): E[eps | x_t] under the DDPM forward process."""
    alpha_bar = ddim_scheduler(steps).alphas_cumprod.to(torch.float64)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _per_sample(alpha_bar[t.long()], x).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    return Field(eps)


@pytest.mark.parametrize("steps", [1, 7, 16, 50])
def test_ddim_recovers_a_point_mass_exactly_for_any_step_count(steps: int) -> None:
    mu, z0 = _z0((2, 4, 3, 3), seed=1), _z0((2, 4, 3, 3), seed=2)
    field = _gaussian_oracle(mu, 0.0, steps)
    result = ddim(field, z0, steps)
    torch.testing.assert_close(result.x, mu, rtol=0, atol=1e-10)
    assert result.nfe == steps == field.nfe


def test_ddim_sees_trailing_timesteps_from_999() -> None:
    seen = []
    ddim(Field(lambda x, t: seen.append(t) or torch.zeros_like(x)), _z0((2, 3)), 4)
    assert [t[0].item() for t in seen] == [999.0, 749.0, 499.0, 249.0]
    assert all(t.shape == (2,) and t.dtype.is_floating_point for t in seen)


def test_ddim_converges_to_the_gaussian_probability_flow_map() -> None:
    mu, z0, s = _z0((2, 4, 3, 3), seed=1), _z0((2, 4, 3, 3), seed=2), 0.5
    a_T = ddim_scheduler(1).alphas_cumprod[999].double()
    # The probability-flow ODE keeps (x - sqrt(a) mu) / sqrt(a s^2 + 1 - a) constant.
    exact = mu + s * (z0 - a_T.sqrt() * mu) / (a_T * s * s + 1 - a_T).sqrt()
    errors = [(ddim(_gaussian_oracle(mu, s, n), z0, n).x - exact).abs().max().item() for n in (25, 100, 400)]
    assert errors[2] < 0.02
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3


def test_ddim_matches_diffusers_step_and_is_deterministic() -> None:
    mu, z0, s, steps = _z0((2, 4, 3, 3), seed=1), _z0((2, 4, 3, 3), seed=2, dtype=torch.float32), 0.5, 50
    field = _gaussian_oracle(mu.float(), s, steps)
    ours = ddim(field, z0, steps).x
    assert torch.equal(ours, ddim(field, z0, steps).x)
    scheduler = DDIMScheduler(
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon"
    )
    scheduler.set_timesteps(steps)
    x = z0
    for t in scheduler.timesteps:
        x = scheduler.step(field(x, float(t)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Straightness
# ---------------------------------------------------------------------------------------------------------


def test_straightness_is_zero_for_straight_paths_and_the_velocity_variance_otherwise() -> None:
    z0, c = _z0(), _z0(seed=1)
    assert straightness(Field(lambda x, t: c.expand_as(x)), z0, steps=8).abs().max().item() < 1e-24
    # v = 2 t c: on the grid t_k = k/8 the velocities are 2 t_k c and X1 - X0 is their mean.
    field = Field(lambda x, t: 2 * _per_sample(t, x) * c)
    result = straightness(field, z0, steps=8)
    speeds = 2 * torch.arange(8, dtype=torch.float64) / 8
    expected = (speeds - speeds.mean()).pow(2).mean() * c.pow(2).mean(dim=1)
    torch.testing.assert_close(result, expected)
    assert result.shape == (5,) and field.nfe == 8


# ---------------------------------------------------------------------------------------------------------
# Seeds (reflow.seeds) and per-sample noise
# ---------------------------------------------------------------------------------------------------------


def test_mix_seed_is_stable() -> None:
    """Every training loop's batch order and per-step noise come from these values (reflow.seeds)."""
    assert mix_seed(0, 0, 0, 1) == 6367421831371649418
    assert mix_seed(7, 3) == 3372149508506556760
    assert mix_seed() == 2177342782468422677
    assert mix_seed(-1) == mix_seed(2**64 - 1) and 0 <= mix_seed(-1) < 2**63


def test_sample_seeds_are_stable_distinct_and_fit_int64() -> None:
    assert sample_seeds(0, 0, 3) == [1517046713075839355, 7960286522194355700, 7036458801432265024]
    assert sample_seeds(1234, 10, 12) == [757065483745681689, 7349009974438277269]
    seeds = sample_seeds(7, 0, 5000)
    assert len(set(seeds)) == 5000 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seeds(7, 100, 200) == seeds[100:200]
    assert set(sample_seeds(8, 0, 100)).isdisjoint(seeds)


def test_per_sample_noise_regenerates_any_shard_bit_for_bit() -> None:
    seeds = sample_seeds(3, 0, 10)
    whole = per_sample_noise(seeds, (2, 4, 4))
    assert whole.shape == (10, 2, 4, 4) and whole.dtype == torch.float32
    shards = torch.cat([per_sample_noise(seeds[i : i + 3], (2, 4, 4)) for i in range(0, 10, 3)])
    assert torch.equal(whole, shards)
    assert torch.equal(whole, per_sample_noise(torch.tensor(seeds), (2, 4, 4)))
    assert torch.equal(whole[4], per_sample_noise([seeds[4]], (2, 4, 4))[0])
    assert not torch.equal(whole[0], whole[1])
    assert abs(per_sample_noise(sample_seeds(0, 0, 2000), (8,)).std().item() - 1.0) < 0.02


def test_generation_precision_follows_compute_mixed_precision():
    """Pair generation and sampling follow compute.mixed_precision: fp32 untouched by "no", bf16 matmuls by "bf16"."""
    import types

    from models.dit import build_dit
    from runtime.devices import generation_autocast

    model = build_dit(sample_size=8, in_channels=4, num_classes=10, patch_size=2, num_layers=1,
                      num_attention_heads=2, attention_head_dim=16, learn_sigma=False, seed=0).eval()
    with torch.no_grad():  # adaLN-zero starts the output at exactly 0: give it something to compute
        for q in model.parameters():
            q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())))
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 500), torch.arange(4)
    with torch.inference_mode():
        reference = model(x, timestep=t, class_labels=y).sample
        outputs = {}
        for precision in ("no", "bf16"):
            with generation_autocast(types.SimpleNamespace(device="cpu", mixed_precision=precision)):
                outputs[precision] = model(x, timestep=t, class_labels=y).sample
    assert outputs["no"].dtype == torch.float32 and torch.equal(outputs["no"], reference)
    assert outputs["bf16"].dtype == torch.bfloat16
    assert 0 < (outputs["bf16"].float() - reference).abs().max() < 0.1
