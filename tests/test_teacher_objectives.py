"""The DiT teacher's two objectives (`dit.objective`): DDPM epsilon, or jax-flow's flow matching.

A flow-matching teacher is the rectified-flow regression on the independent coupling; on Gaussian data its optimum
is known in closed form, so the objective is checked against it. Saved by the `dit` stage's code, it is a velocity
model that every sampler and every stage initialised from it reads as one, guided at its pairs' scale.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from models.dit import build_dit, flow_time
from reflow.rectified import Independent, RectifiedFlow, velocity_field
from reflow.samplers import Euler, Heun
from reflow.seeds import per_sample_noise, sample_seeds
from runtime.generator import GeneratorError, load_generator, teacher_objective
from runtime.params import DiTParams, EvalParams, ParamsError, TeacherPairsParams, parse_params
from stages.dit import save_teacher
from stages.dit import teacher_objective as objective_of
from stages.teacher_pairs import generate, nfe_per_sample

MU, S = 0.7, 0.5  # the data: z1 ~ N(MU, S^2 I), independent of the noise z0 ~ N(0, I)


def optimal_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[z1 - z0 | x_t = x] for Gaussian data, by Gaussian conditioning of the jointly Gaussian (z1 - z0, x_t):
    mean MU, Cov(z1 - z0, x_t) = t S^2 - (1 - t), Var(x_t) = (1 - t)^2 + t^2 S^2, E[x_t] = t MU."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return MU + (t * S**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * S**2) * (x - t * MU)


def conditional_variance(t: torch.Tensor) -> torch.Tensor:
    """Var(z1 - z0 | x_t) per dimension: the flow-matching loss no velocity can go below."""
    return (S**2 + 1) - (t * S**2 - (1 - t)) ** 2 / ((1 - t) ** 2 + t**2 * S**2)


class GaussianOracle(nn.Module):
    """A stand-in DiT (same call and config) predicting `optimal_velocity + offset + slope * x`, reading flow time back
    from the teacher's timestep axis; it records the times it saw."""

    config = SimpleNamespace(in_channels=4, out_channels=4, num_embeds_ada_norm=10)

    def __init__(self, offset: float = 0.0, slope: float = 0.0) -> None:
        super().__init__()
        self.offset, self.slope, self.seen = offset, slope, []

    def forward(self, x, timestep, class_labels):
        t = flow_time(timestep)
        self.seen.append(t)
        return SimpleNamespace(sample=optimal_velocity(x, t) + self.offset + self.slope * x)


def gaussian_batch(n: int = 100_000) -> dict[str, torch.Tensor]:
    z1 = MU + S * torch.randn(n, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    return {"z1": z1, "label": torch.zeros(n, dtype=torch.long)}


def teacher_loss(model: nn.Module, batch: dict) -> float:
    """The flow-matching teacher's own objective (as the dit stage builds it), on one fixed draw of noise and times."""
    objective = objective_of(DiTParams(objective="flow_matching", label_dropout=0.0), model)
    return objective(model, batch, torch.Generator().manual_seed(1), 0).item()


def test_the_flow_matching_teachers_loss_is_least_at_the_known_optimum_of_gaussian_data() -> None:
    batch = gaussian_batch()
    oracle = GaussianOracle()
    best = teacher_loss(oracle, batch)
    t = oracle.seen[-1]
    # At the optimum the loss is the irreducible conditional variance, averaged over the times drawn.
    assert best == pytest.approx(conditional_variance(t).mean().item(), rel=0.01)
    # The times are logit-normal (dit.time_distribution's default): logit(t) ~ N(0, 1).
    logit = torch.logit(t.double())
    assert abs(logit.mean().item()) < 0.02 and logit.std().item() == pytest.approx(1.0, abs=0.02)
    # Any other velocity costs exactly its squared distance from the optimum (the cross term vanishes: the optimum is
    # the conditional mean): a constant offset d adds d^2.
    for d in (0.3, -0.3):
        assert teacher_loss(GaussianOracle(offset=d), batch) - best == pytest.approx(d**2, rel=0.05)
    # Along v* + c x_t the loss is a parabola in c; its vertex sits at c = 0.
    c = 0.2
    up, down = teacher_loss(GaussianOracle(slope=c), batch), teacher_loss(GaussianOracle(slope=-c), batch)
    vertex = c * (down - up) / (2 * (up + down - 2 * best))
    assert abs(vertex) < 0.01


def test_the_flow_matching_teacher_is_rectified_flow_on_the_independent_coupling() -> None:
    p = DiTParams(objective="flow_matching", time_distribution="uniform")
    objective = objective_of(p, GaussianOracle())
    assert isinstance(objective, RectifiedFlow) and isinstance(objective.coupling, Independent)
    assert objective.time_distribution == "uniform" and objective.label_dropout == p.label_dropout
    assert objective.null_label == 10


def test_flow_matching_refuses_learned_variance_and_pairs_refuse_a_solver_of_the_other_objective() -> None:
    with pytest.raises(ParamsError, match=r"dit.learn_sigma: true .*\(dit.objective: flow_matching\)"):
        parse_params({"dit": {"objective": "flow_matching", "learn_sigma": True}})
    wrong = r"teacher_pairs.solver: ddim .* dit.objective: flow_matching.*'euler', 'heun'"
    with pytest.raises(ParamsError, match=wrong):
        parse_params({"dit": {"objective": "flow_matching"}, "teacher_pairs": {"solver": "ddim"}})
    with pytest.raises(ParamsError, match=r"teacher_pairs.solver: euler .* dit.objective: ddpm_eps.*\['ddim'\]"):
        parse_params({"dit": {"objective": "ddpm_eps"}, "teacher_pairs": {"solver": "euler"}})
    # Unset, the solver is the teacher's own, with its own step count; the default teacher is flow matching.
    assert parse_params({}).teacher_pairs.solver_for("ddpm_eps") == "ddim"
    assert parse_params({}).dit.objective == "flow_matching"
    fm = parse_params({"dit": {"objective": "flow_matching"}, "teacher_pairs": {"solver_steps": 8}})
    solver = fm.teacher_pairs.solver_for(fm.dit.objective)
    assert (solver, fm.teacher_pairs.steps_for(solver)) == ("euler", 8)
    assert TeacherPairsParams(solver="heun").solver_for("flow_matching") == "heun"


def test_teacher_pairs_count_heun_as_2n_minus_1_and_guidance_twice() -> None:
    assert nfe_per_sample("ddim", 50, 2.0) == 100 and nfe_per_sample("euler", 50, 2.0) == 100
    assert nfe_per_sample("heun", 50, 2.0) == 198 and nfe_per_sample("heun", 50, 1.0) == 99


def tiny_teacher(tmp_path, objective: str):
    """A tiny DiT saved by the dit stage's own saving code, as `artifacts/dit/transformer`."""
    model = build_dit(sample_size=8, in_channels=4, num_classes=10, patch_size=2, num_layers=1,
                      num_attention_heads=2, attention_head_dim=8, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adaLN-Zero starts a DiT at 0 and blind to its label: give it a field that depends on both
        for q in model.parameters():
            if not q.any():
                q.normal_(0, 0.1, generator=g)
    folder = tmp_path / "artifacts" / "dit" / "transformer"
    save_teacher(model.eval(), folder, DiTParams(objective=objective), attrs={"producer": "test"}, num_classes=10,
                 latent_shape=[4, 8, 8], scale_factor=1.0)
    return model.eval(), folder


def test_a_flow_matching_teacher_saved_by_the_dit_stage_samples_guided_with_euler_and_heun(tmp_path) -> None:
    model, folder = tiny_teacher(tmp_path, "flow_matching")
    gen = load_generator(folder.parent, teacher_guidance=2.0)
    assert gen.kind == "velocity" and gen.default_guidance == 2.0 and teacher_objective(gen.meta) == "flow_matching"
    assert gen.meta["teacher_objective"] == "flow_matching" and "ddpm" not in gen.meta
    z0 = per_sample_noise(sample_seeds(0, 0, 6), (4, 8, 8))
    y = torch.arange(6) % 10
    euler = gen.sample(z0, y, steps=3, solver="euler")
    expected = Euler()(velocity_field(model, y, null_label=10, guidance=2.0), z0, 3).x
    torch.testing.assert_close(euler.x, expected)
    assert euler.nfe == nfe_per_sample("euler", 3, 2.0) == 6
    assert not torch.allclose(euler.x, gen.sample(z0, y, steps=3, solver="euler", guidance=1.0).x)  # guided
    heun = gen.sample(z0, y, steps=3, solver="heun")
    torch.testing.assert_close(heun.x, Heun()(velocity_field(model, y, null_label=10, guidance=2.0), z0, 3).x)
    assert heun.nfe == nfe_per_sample("heun", 3, 2.0) == 10
    with pytest.raises(GeneratorError, match="not 'ddim'"):
        gen.sample(z0, y, steps=3, solver="ddim")
    # The teacher's pairs come from the same guided ODE, through the stage's `generate`.
    pz0, pz1, nfe = generate(model, gen.meta, sample_seeds(0, 0, 6), np.arange(6) % 10, steps=3, guidance=2.0,
                             device="cpu", solver="euler")
    torch.testing.assert_close(pz0, z0)
    torch.testing.assert_close(pz1, euler.x)
    assert nfe == 6


def test_a_flow_matching_teacher_is_evaluated_with_the_velocity_solvers_and_straightness(tmp_path) -> None:
    from measure.evaluation import plan_points

    _, folder = tiny_teacher(tmp_path, "flow_matching")
    gen = load_generator(folder, teacher_guidance=2.0)
    plan, skipped = plan_points(gen, EvalParams(steps=[1, 2], solvers=["euler", "heun"]))
    assert plan == [("euler", 1), ("euler", 2), ("heun", 1), ("heun", 2)] and not skipped
    z0 = per_sample_noise(sample_seeds(0, 0, 4), (4, 8, 8))
    assert gen.straightness(z0, torch.arange(4), steps=4).shape == (4,)
    # The DDPM teacher, saved by the same code, keeps DDIM and no straightness.
    _, eps_folder = tiny_teacher(tmp_path / "eps", "ddpm_eps")
    eps = load_generator(eps_folder, teacher_guidance=2.0)
    assert eps.kind == "epsilon" and teacher_objective(eps.meta) == "ddpm_eps"
    assert plan_points(eps, EvalParams(steps=[1, 2], solvers=["euler", "heun"]))[0] == [("ddim", 1), ("ddim", 2)]
    assert eps.straightness(z0, torch.arange(4), steps=4) is None


def test_velocity_models_start_from_a_flow_matching_teacher_whole(tmp_path) -> None:
    from runtime.velocity import velocity_model_like

    teacher, folder = tiny_teacher(tmp_path, "flow_matching")
    model, copied = velocity_model_like(folder, init_from=folder)
    assert copied == len(model.state_dict())  # the velocity head too: the teacher already is a velocity model
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.7]), torch.tensor([1, 10])
    torch.testing.assert_close(velocity_field(model.eval(), y, null_label=10)(x, t),
                               velocity_field(teacher, y, null_label=10)(x, t))


def test_reflow_sample_draws_a_flow_matching_teacher_with_euler_at_its_guidance(tmp_path) -> None:
    from models.vae import VAE_SUBFOLDER, build_vae
    from runtime.generator import sample_grid

    tiny_teacher(tmp_path, "flow_matching")
    build_vae(latent_channels=4, block_out_channels=[16, 16, 16], layers_per_block=1,
              norm_num_groups=8).save_pretrained(tmp_path / "artifacts" / "vae" / VAE_SUBFOLDER)
    made = sample_grid(tmp_path, "dit", steps=2, n=10, out=tmp_path / "grid.png", guidance=2.0)
    assert (made["kind"], made["solver"], made["nfe"], made["guidance"]) == ("velocity", "euler", 4, 2.0)
    assert (tmp_path / "grid.png").stat().st_size > 0
