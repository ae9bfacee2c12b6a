"""The distillation family: RectifiedFlow's k-step students, SlimFlow's flow-guided term and smaller reflow rounds,
2-RF++'s LPIPS-Huber. Known answers on closed-form fields, then the stages on tiny artifacts built here."""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch import Tensor, nn

from models.dit import TIME_AXIS, build_dit, flow_time
from models.lpips import LPIPSLoss
from models.vae import VAE_SUBFOLDER, build_vae
from reflow.distill import GUIDE_T_HIGH, GUIDE_T_LOW, KStepDistill, flow_guided_target
from reflow.losses import RFPP_HUBER, distance, lpips_huber, pseudo_huber_per_sample
from reflow.samplers import Euler, Field
from runtime.context import StageContext
from runtime.generator import load_generator
from runtime.params import DistillParams, Params, ParamsView, ReflowParams
from storage.checkpoints import read_meta, save_model
from storage.datasets import write_dataset

# ---------------------------------------------------------------------------------------------------------
# Closed-form fields on a 2-D toy: pairs z1 = A z0, a linear map, so every velocity below is exact in closed form
# ---------------------------------------------------------------------------------------------------------

A = torch.tensor([[1.5, -0.8], [0.6, 0.7]], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)
K = 4


def straight_velocity(x: Tensor, t: Tensor) -> Tensor:
    """The straight-line field of the coupling z1 = A z0: at `x_t = M_t z0`, `M_t = (1 - t) I + t A`, it is
    `z1 - z0 = (A - I) M_t^{-1} x_t`, exact at every t (so one Euler step or any number lands on z1)."""
    m = (1 - t)[:, None, None] * EYE + t[:, None, None] * A
    z0 = torch.linalg.solve(m, x.unsqueeze(-1)).squeeze(-1)
    return z0 @ (A - EYE).T


def grid_velocity(x: Tensor, t: Tensor) -> Tensor:
    """Exact only at the k grid times: the straight field frozen at the grid time below `t`, but off the
    straight lines' velocity between them (a k-step student, not a flow)."""
    return straight_velocity(x, torch.round(t * K - 0.49999) / K) * (1 + 3 * torch.sin(math.pi * K * t))[:, None]


def one_step_velocity(x: Tensor, t: Tensor) -> Tensor:
    """`(A - I) x` at every t: exact at t = 0 only (one Euler step lands on A z0), curved elsewhere."""
    return x @ (A - EYE).T


class Closed(nn.Module):
    """A closed-form field behind the objective's `network(model, x, t, y)` call."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.seen = fn, []

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.seen.append(t.clone())
        return self.fn(x, t)


def call(m, x, t, y):
    return m(x, t, y)


def toy_batch(n: int = 64, seed: int = 0) -> dict[str, Tensor]:
    z0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {"z0": z0, "z1": z0 @ A.T, "label": torch.zeros(n, dtype=torch.long)}


def test_k_euler_steps_of_a_field_exact_at_the_k_grid_times_land_on_z1() -> None:
    batch = toy_batch()
    euler = Euler()
    landed = euler(Field(grid_velocity), batch["z0"], K).x
    torch.testing.assert_close(landed, batch["z1"], rtol=0, atol=1e-12)
    # The same field off its grid (2k steps) misses, and the one-step field misses in k steps.
    assert (euler(Field(grid_velocity), batch["z0"], 2 * K).x - batch["z1"]).abs().max() > 1e-2
    assert (euler(Field(one_step_velocity), batch["z0"], K).x - batch["z1"]).abs().max() > 0.1
    torch.testing.assert_close(euler(Field(one_step_velocity), batch["z0"], 1).x, batch["z1"], rtol=0, atol=1e-12)


def test_the_k_step_objective_is_zero_for_the_grid_field_and_positive_for_the_one_step_field() -> None:
    batch, g = toy_batch(), torch.Generator().manual_seed(1)
    k_step = KStepDistill(null_label=0, k=K, network=call)
    grid = Closed(grid_velocity)
    assert k_step(grid, batch, g, 0).item() < 1e-24
    seen = grid.seen[-1]
    assert set((seen * K).round().tolist()) == set(range(K))  # every grid time, and only those
    torch.testing.assert_close(seen * K, (seen * K).round(), rtol=0, atol=1e-12)
    assert k_step(Closed(one_step_velocity), batch, g, 0).item() > 0.01
    # At k = 1 it is the one-step objective: the one-step field is exact, the grid field too (its t = 0 is exact).
    one = KStepDistill(null_label=0, network=call)
    assert one(Closed(one_step_velocity), batch, g, 0).item() < 1e-24
    assert one(Closed(grid_velocity), batch, g, 0).item() < 1e-24


class TinyDiT(nn.Module):
    """A linear stand-in with the DiT's call signature, so that `dit_velocity` and its time axis are used."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(4, 4, 1)
        self.time = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, timestep, class_labels):
        return SimpleNamespace(sample=self.mix(x) + self.time * flow_time(timestep).view(-1, 1, 1, 1))


def test_one_step_distillation_is_the_old_objective_bit_for_bit_value_and_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    z0, z1 = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 4, 4, 4, generator=g)
    batch = {"z0": z0, "z1": z1, "label": torch.zeros(8, dtype=torch.long)}
    ours, old = TinyDiT(), TinyDiT()
    old.load_state_dict(ours.state_dict())
    for loss in ("mse", "pseudo_huber"):
        value = KStepDistill(null_label=10, loss=loss)(ours, batch, torch.Generator().manual_seed(5), 0)
        # What the one-step objective computed before k existed: d(z0 + v(z0, 0), z1).
        v = old(z0, timestep=torch.full((8,), 999.0), class_labels=batch["label"]).sample
        reference = distance(loss)(z0 + v, z1)
        assert torch.equal(value, reference), loss
        ours.zero_grad(), old.zero_grad()
        value.backward(), reference.backward()
        for (name, a), b in zip(ours.named_parameters(), old.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), (loss, name)


# ---------------------------------------------------------------------------------------------------------
# SlimFlow's flow-guided term
# ---------------------------------------------------------------------------------------------------------


def test_the_flow_guided_target_of_a_straight_guide_is_its_one_step_result() -> None:
    """Two Euler steps along a straight flow are one: the target is the guide's own one step, whatever t."""
    z = toy_batch(seed=4)["z0"]
    for t in (0.2, 0.5, 0.8):
        target = flow_guided_target(Closed(straight_velocity), z, one_step_velocity(z, torch.zeros(len(z))),
                                    torch.full((len(z),), t, dtype=torch.float64), None, network=call)
        torch.testing.assert_close(target, z @ A.T, rtol=0, atol=1e-12)


def test_the_flow_guided_term_is_zero_for_a_student_equal_to_a_straight_guide_and_weighted_otherwise() -> None:
    batch = toy_batch(seed=5)
    guide = Closed(straight_velocity)
    plain = KStepDistill(null_label=0, network=call)
    guided = KStepDistill(null_label=0, guide=guide, guide_weight=0.5, network=call)
    assert guided(Closed(straight_velocity), batch, torch.Generator().manual_seed(6), 0).item() < 1e-24
    # Its fresh noise comes from the step's generator: the guide saw other points than the pairs', reproducibly.
    fresh_seen = guide.seen[-1]
    assert ((fresh_seen >= GUIDE_T_LOW) & (fresh_seen <= GUIDE_T_HIGH)).all()
    first = guided(Closed(straight_velocity), batch, torch.Generator().manual_seed(6), 0)
    assert torch.equal(first, guided(Closed(straight_velocity), batch, torch.Generator().manual_seed(6), 0))

    # Constant fields, the student off the guide by delta: its one step z + c + delta against the target
    # z + t (c + delta) + (1 - t) c, a residual of (1 - t) delta with t in [0.2, 0.8].
    c, delta = torch.tensor([0.7, -0.2], dtype=torch.float64), 0.3
    guided = KStepDistill(null_label=0, guide=Closed(lambda x, t: c.expand_as(x)), guide_weight=0.5, network=call)
    off = Closed(lambda x, t: (c + delta).expand_as(x))
    with_term = guided(off, batch, torch.Generator().manual_seed(7), 0).item()
    without = plain(off, batch, torch.Generator().manual_seed(7), 0).item()
    term = (with_term - without) / 0.5
    assert (1 - GUIDE_T_HIGH) ** 2 * delta**2 < term < (1 - GUIDE_T_LOW) ** 2 * delta**2


def test_the_flow_guided_term_sends_no_gradient_to_the_guide_and_refuses_k_step_students() -> None:
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(4, 4, 4, 4, generator=g)
    batch = {"z0": z0, "z1": z0 + 1, "label": torch.zeros(4, dtype=torch.long)}
    student, guide = TinyDiT(), TinyDiT()
    KStepDistill(null_label=10, guide=guide, guide_weight=1.0)(student, batch, g, 0).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in guide.parameters())
    with pytest.raises(ValueError, match="one-step student"):
        KStepDistill(null_label=10, k=2, guide=guide, guide_weight=1.0)
    with pytest.raises(ValueError, match="needs a guide model"):
        KStepDistill(null_label=10, guide_weight=1.0)


# ---------------------------------------------------------------------------------------------------------
# 2-RF++'s LPIPS-Huber
# ---------------------------------------------------------------------------------------------------------


def test_lpips_huber_weights_the_huber_term_by_t_and_adds_lpips() -> None:
    v, target = torch.zeros(3, 4, 2, 2), torch.full((3, 4, 2, 2), 0.5)  # d = 16, ||v - target||^2 = 4
    d, c = 16, RFPP_HUBER * 16
    huber = (math.sqrt(4 + c * c) - c) / d
    t = torch.tensor([0.0, 0.5, 1.0])
    assert lpips_huber(v, target, t, torch.tensor(0.25)).item() == pytest.approx(huber * 1.5 / 3 + 0.25)
    assert lpips_huber(v, target, torch.zeros(3), torch.tensor(0.25)).item() == pytest.approx(0.25)  # LPIPS alone
    torch.testing.assert_close(pseudo_huber_per_sample(v, target, c), torch.full((3,), huber * d))


def write_alex_lpips(folder: Path) -> None:
    """LPIPS from local files, built here: an untrained AlexNet backbone (`alex.pth`) and random heads (`lin.pth`)."""
    backbone = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in backbone.items()}, folder / "alex.pth")
    g = torch.Generator().manual_seed(0)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
                for k, c in enumerate((64, 192, 384, 256, 256))}, folder / "lin.pth")


def test_the_lpips_huber_objective_on_a_tiny_lpips_from_local_files(tmp_path: Path) -> None:
    write_alex_lpips(tmp_path)
    lpips = LPIPSLoss(tmp_path / "alex.pth", tmp_path / "lin.pth", net="alex")
    g = torch.Generator().manual_seed(0)

    def perceptual(x: Tensor, y: Tensor) -> Tensor:  # "decoding": latents [B, 4, 4, 4] -> images [B, 3, 64, 64]
        def image(z):
            return torch.nn.functional.interpolate(z[:, :3].tanh(), size=64, mode="bilinear")
        return lpips(image(x), image(y))

    with pytest.raises(ValueError, match="lpips_huber"):
        KStepDistill(null_label=10, loss="lpips_huber")
    z0 = torch.randn(4, 4, 4, 4, generator=g)
    model = TinyDiT()
    with torch.no_grad():
        model.mix.weight.zero_(), model.mix.bias.fill_(0.5), model.time.zero_()  # v = 0.5 everywhere
    exact = {"z0": z0, "z1": z0 + 0.5, "label": torch.zeros(4, dtype=torch.long)}
    objective = KStepDistill(null_label=10, k=2, loss="lpips_huber", perceptual=perceptual, perceptual_weight=2.0)
    assert objective(model, exact, g, 0).item() < 1e-6
    off = {**exact, "z1": z0 + 1.0}  # velocity residual -0.5 everywhere, d = 64
    value = objective(model, off, torch.Generator().manual_seed(1), 0)
    g1 = torch.Generator().manual_seed(1)
    t = torch.randint(0, 2, (4,), generator=g1).double() / 2  # the grid times the objective drew
    c = RFPP_HUBER * 64
    huber = (math.sqrt(64 * 0.25 + c * c) - c) / 64
    x_t = z0 + t.view(-1, 1, 1, 1).float() * 1.0
    end = x_t + (1 - t.view(-1, 1, 1, 1).float()) * 0.5
    expected = (t * huber).mean().item() + 2.0 * perceptual(end, z0 + 1.0).item()
    assert value.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "message"), [
    ({"k_steps": 4}, "must include distill.k_steps=4"),
    ({"k_steps": 2, "eval_steps": [2], "per_segment": True, "source": "seqrf"}, "k_steps=2 and distill.per_segment"),
    ({"loss": "lpips_huber"}, "needs local LPIPS weights: set distill.lpips_backbone"),
    ({"guide_weight": 0.5, "k_steps": 2, "eval_steps": [2]}, "needs distill.k_steps: 1"),
    ({"guide_weight": 0.5, "source": "seqrf"}, "a source other than seqrf"),
])
def test_distill_params_refuse_inconsistent_students(section: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DistillParams(**section)


def test_the_new_options_default_to_todays_student_and_round() -> None:
    p, r = DistillParams(), ReflowParams()
    assert (p.k_steps, p.guide_weight, p.loss) == (1, 0.0, "mse")
    assert (r.student_num_layers, r.student_attention_head_dim) == (None, None)
    DistillParams(k_steps=4, eval_steps=[1, 4])  # accepted


# ---------------------------------------------------------------------------------------------------------
# Stages on tiny artifacts: a smaller round, then a student from it with the guided term, then sampling it
# ---------------------------------------------------------------------------------------------------------

SHAPE = (4, 4, 4)


def tiny_dit(num_layers: int = 2, seed: int = 0):
    return build_dit(sample_size=4, in_channels=4, num_classes=10, patch_size=2, num_layers=num_layers,
                     num_attention_heads=2, attention_head_dim=8, seed=seed)


def write_pairs(path: Path, n: int, seed: int, **attrs) -> None:
    rng = np.random.default_rng(seed)
    z0 = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    arrays = {"z0": z0, "z1": (0.5 * z0 + 0.3).astype(np.float32), "label": (np.arange(n) % 10).astype(np.int64)}
    write_dataset(path, arrays, kind="pairs", producer="test", params_hash="test", attrs=attrs)


@pytest.fixture
def tiny_chain(tmp_path: Path) -> Path:
    """The artifacts rf@2 and distill read: teacher, VAE, teacher pairs, 1-RF, the round's and the student's pairs."""
    art = tmp_path / "artifacts"
    teacher = {"null_label": 10, "num_classes": 10, "latent_shape": list(SHAPE), "scale_factor": 1.0}
    save_model(tiny_dit(), art / "dit/transformer", meta={**teacher, "kind": "dit"})
    save_model(tiny_dit(seed=1), art / "rf1/transformer",
               meta={**teacher, "kind": "rf1", "objective": "rectified_flow_velocity", "time_convention": TIME_AXIS})
    build_vae(latent_channels=4, block_out_channels=[8, 8], layers_per_block=1,
              norm_num_groups=8).save_pretrained(art / "vae" / VAE_SUBFOLDER)
    write_pairs(art / "teacher_pairs/pairs.zarr", 24, 0, guidance_scale=1.0)
    write_pairs(art / "reflow_pairs@2/pairs.zarr", 32, 1)
    write_pairs(art / "distill_pairs/pairs.zarr", 32, 2)
    return tmp_path


def context(root: Path, spec, params: Params) -> StageContext:
    return StageContext(spec=spec, root=root, params=ParamsView(params, spec.params), scratch=root / "scratch" /
                        spec.name, inputs={}, params_hash="test", tracked=False)


TRAIN = {"steps": 4, "batch_size": 8, "eval_samples": 8, "log_every": 2, "checkpoint_every": 2}


def test_a_smaller_reflow_round_trains_and_the_stages_after_it_load_it(tiny_chain: Path, capsys) -> None:
    from stages import distill, rf

    params = Params(compute={"device": "cpu"}, reflow={**TRAIN, "eval_steps": [1], "student_num_layers": 1},
                    distill={**TRAIN, "guide_weight": 0.5, "eval_steps": [1]})
    metrics = rf.run(context(tiny_chain, rf.spec("2", "rf1"), params))
    assert "smaller than the model it starts from" in capsys.readouterr().err  # no annealing: a warning
    full = sum(q.numel() for q in tiny_dit().parameters())
    small = sum(q.numel() for q in tiny_dit(num_layers=1).parameters())
    assert metrics["student_parameters"] == small < full
    folder = tiny_chain / "artifacts/rf@2/transformer"
    assert read_meta(folder)["parameters"] == small and math.isfinite(metrics["error_1_step"])
    assert 0 < metrics["tensors_from_previous_round"]

    # The student of the smaller round: null size = the source's own, every tensor copied; the guide is rf@2.
    out = distill.run(context(tiny_chain, distill.SPEC, params))
    assert out["student_parameters"] == small
    assert out["tensors_from_source"] == len(tiny_dit(num_layers=1).state_dict())
    assert math.isfinite(out["train_loss"]) and read_meta(tiny_chain / "artifacts/distill/transformer")["k_steps"] == 1

    # Sampling (evaluate, `reflow sample`) reads the smaller round's folder.
    generator = load_generator(tiny_chain / "artifacts/rf@2")
    z0 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    assert generator.sample(z0, torch.arange(3), steps=2, solver="euler").x.shape == z0.shape


def test_a_k_step_student_with_lpips_huber_trains_and_is_measured_at_its_k_steps(tiny_chain: Path) -> None:
    from stages import distill

    write_alex_lpips(tiny_chain)
    params = Params(compute={"device": "cpu"}, distill={
        **TRAIN, "source": "rf1", "k_steps": 2, "eval_steps": [1, 2], "loss": "lpips_huber",
        "lpips_backbone": "alex.pth", "lpips_lin": "lin.pth", "lpips_net": "alex"})
    out = distill.run(context(tiny_chain, distill.SPEC, params))
    assert math.isfinite(out["train_loss"]) and out["nfe_2_step"] == 2 and math.isfinite(out["error_2_step"])
    meta = read_meta(tiny_chain / "artifacts/distill/transformer")
    assert meta["k_steps"] == 2 and meta["one_step"] is False
