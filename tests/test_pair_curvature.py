"""The curvature of the paths that make a pair set (`reflow.curvature.PathCurvature`, `pairs_curvature`).

Curvature is the time-mean `||dx/dt - chord||^2` over `||chord||^2`: 0 for a straight path at constant speed, and
for a rotation by the angle w at constant angular speed `(w / 2)^2 / sin^2(w / 2) - 1` (speed `w r` against a
chord `2 r sin(w / 2)`). Every solver tallies it on the fly; the pair stages record it in their metrics.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.dit import build_dit
from models.vae import VAE_SUBFOLDER, build_vae
from reflow.curvature import recording_curvature
from reflow.samplers import DDIM, RK45, Euler, Field, Heun, ddim_scheduler, straightness
from reflow.seqrf import Segmented
from runtime.context import StageContext
from runtime.params import DiTParams, Params, ParamsView
from storage.checkpoints import save_model
from storage.datasets import write_dataset

SOLVERS = {"euler": (Euler(), 8), "heun": (Heun(), 8), "rk45": (RK45(1e-6, 1e-6), None),
           "segmented": (Segmented((0.0, 0.3, 1.0)), 4)}
W = math.pi / 2  # the rotation's angle over t in [0, 1]
ROTATION_CURVATURE = (W / 2) ** 2 / math.sin(W / 2) ** 2 - 1  # 0.2337


def constant_field(c: torch.Tensor) -> Field:
    return Field(lambda x, t: c)


def rotation_field() -> Field:
    """`dx/dt = W J x`: circles about the origin at angular speed W."""
    j = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    return Field(lambda x, t: W * x @ j.T)


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("backwards", [False, True])
def test_a_constant_velocity_has_zero_curvature_for_every_solver(name: str, backwards: bool) -> None:
    solve, steps = SOLVERS[name]
    g = torch.Generator().manual_seed(0)
    z0, c = torch.randn(32, 4, 4, 4, generator=g), torch.randn(32, 4, 4, 4, generator=g)
    ends = {"t_start": 1.0, "t_end": 0.0} if backwards and name != "segmented" else {}
    result = solve(constant_field(c), z0, steps, **ends)
    assert result.curvature.value() < 1e-6  # float32 rounding of the states; 0 in exact arithmetic
    assert result.curvature.chord.mean().item() == pytest.approx(c.pow(2).mean().item(), rel=1e-5)


def test_ddim_of_a_teacher_with_fixed_predictions_draws_a_straight_line() -> None:
    """A teacher whose data and noise predictions never change along the way: DDIM is Euler in flow coordinates
    (state / (sqrt(a) + sqrt(1 - a)) at time sqrt(a) / (sqrt(a) + sqrt(1 - a))), so its path is straight there."""
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(32, 4, 4, 4, generator=g), torch.randn(32, 4, 4, 4, generator=g)
    alpha_bar = ddim_scheduler(10).alphas_cumprod

    def eps(x, timestep):
        a = alpha_bar[timestep.long()].view(-1, 1, 1, 1)
        return (x - a.sqrt() * z1) / (1 - a).sqrt()  # the noise that puts the clean prediction at z1

    result = DDIM()(Field(eps), z0, 10)
    assert torch.allclose(result.x, z1, atol=1e-5)
    assert result.curvature.value() < 1e-6


@pytest.mark.parametrize(("name", "steps", "rel"), [("euler", 400, 1e-3), ("heun", 200, 1e-3), ("rk45", None, 1e-2)])
def test_a_rotation_has_the_closed_form_curvature_either_way_round(name: str, steps: int | None, rel: float) -> None:
    solve = {"euler": Euler(), "heun": Heun(), "rk45": RK45(1e-8, 1e-8)}[name]
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    forward = solve(rotation_field(), x0, steps)
    # RK45's few accepted steps cut the arc short by their chords (measured 0.2325 at 1e-8), hence its tolerance.
    assert forward.curvature.value() == pytest.approx(ROTATION_CURVATURE, rel=rel)
    back = solve(rotation_field(), forward.x, steps, t_start=1.0, t_end=0.0)
    assert back.curvature.value() == pytest.approx(forward.curvature.value(), rel=rel)


def test_an_euler_paths_deviation_is_its_straightness() -> None:
    """On an Euler path each step's slope is the velocity there and the chord over [0, 1] is X1 - X0: the deviation is
    `reflow.samplers.straightness`, measured another way."""
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    deviation = Euler()(rotation_field(), x0, 16).curvature.deviation
    assert torch.allclose(deviation, straightness(rotation_field(), x0, steps=16).double(), rtol=1e-5)


def test_recording_collects_each_solver_call_and_changes_no_result() -> None:
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    plain = Heun()(rotation_field(), x0, 4).x
    with recording_curvature() as recorded:
        Euler()(rotation_field(), x0, 4)
        inside = Heun()(rotation_field(), x0, 4)
    Euler()(rotation_field(), x0, 4)  # after the block: not collected
    assert len(recorded) == 2 and recorded[1] is inside.curvature
    assert torch.equal(inside.x, plain)


# ---------------------------------------------------------------------------------------------------------
# The pair stages record it: teacher_pairs (DDIM), reflow_pairs@2 (Euler), distill_pairs (Euler), in process
# ---------------------------------------------------------------------------------------------------------

SHAPE = (4, 4, 4)


def tiny_dit(seed: int):
    """A one-block DiT with random weights everywhere (adaLN-Zero would start it at velocity 0: no path at all)."""
    model = build_dit(sample_size=4, in_channels=4, num_classes=10, patch_size=2, num_layers=1,
                      num_attention_heads=2, attention_head_dim=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(0.2 * torch.randn(q.shape, generator=g))
    return model


def context(root: Path, spec, params: Params) -> StageContext:
    return StageContext(spec=spec, root=root, params=ParamsView(params, spec.params), scratch=root / "scratch" /
                        spec.name, inputs={}, params_hash="test", tracked=False)


def test_every_pair_stage_records_the_curvature_of_its_paths(tmp_path: Path) -> None:
    from stages import distill_pairs, reflow_pairs, teacher_pairs
    from stages.dit import save_teacher

    art = tmp_path / "artifacts"
    save_teacher(tiny_dit(0), art / "dit/transformer", DiTParams(objective="ddpm_eps"), attrs={}, num_classes=10,
                 latent_shape=list(SHAPE), scale_factor=1.0)
    save_model(tiny_dit(1), art / "rf1/transformer",
               meta={"kind": "rf1", "objective": "rectified_flow_velocity", "num_classes": 10, "null_label": 10,
                     "latent_shape": list(SHAPE), "scale_factor": 1.0})
    build_vae(latent_channels=4, block_out_channels=[8, 8], layers_per_block=1,
              norm_num_groups=8).save_pretrained(art / "vae" / VAE_SUBFOLDER)
    write_dataset(art / "extract/latents.zarr", {"z1": np.zeros((12, *SHAPE), np.float32),
                                                 "labels": np.arange(12) % 10}, kind="latents", producer="test",
                  params_hash="test")
    rows = {"num_samples": 12, "shard_size": 8}
    params = Params(compute={"device": "cpu"},
                    teacher_pairs={**rows, "batch_size": 5, "ddim_steps": 4, "grid_samples": 4},
                    reflow={**rows, "pairs_batch_size": 5, "solver_steps": 4},
                    distill={**rows, "pairs_batch_size": 5, "solver_steps": 4, "source": "rf1"})
    metrics = {"teacher_pairs": teacher_pairs.run(context(tmp_path, teacher_pairs.SPEC, params)),
               "reflow_pairs@2": reflow_pairs.run(context(tmp_path, reflow_pairs.spec("2", "rf1"), params)),
               "distill_pairs": distill_pairs.run(context(tmp_path, distill_pairs.SPEC, params))}
    for stage, m in metrics.items():
        assert m["pairs_curvature_paths"] == 12, stage  # one path per pair, every batch counted
        assert 0 < m["pairs_curvature"] < 10, stage  # an untrained network's path: curved, but not wildly
    # Re-MeanFlow's filter on the student's pairs: the curvature still counts every path that was integrated.
    params = Params(compute={"device": "cpu"}, distill={**rows, "pairs_batch_size": 5, "solver_steps": 4,
                                                        "source": "rf1", "drop_farthest": 0.25})
    filtered = distill_pairs.run(context(tmp_path, distill_pairs.SPEC, params))
    assert (filtered["pairs"], filtered["pairs_dropped"], filtered["pairs_curvature_paths"]) == (9, 3, 12)
    # random_paired integrates nothing: no path, no curvature (rather than a made-up 0).
    params = Params(compute={"device": "cpu"}, reflow={**rows, "pairs_batch_size": 5, "direction": "random_paired"})
    assert "pairs_curvature" not in reflow_pairs.run(context(tmp_path, reflow_pairs.spec("2", "rf1"), params))
