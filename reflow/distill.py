"""Distillation (RectifiedFlow, InstaFlow, SlimFlow): a student whose k Euler steps land where the flow does.

The pairs are a straight flow's own (z0, z1), integrated from noise (docs/method.md, section 7). RectifiedFlow's
k-step distillation (Liu, Gong & Liu 2022, "Flow Straight and Fast", its distillation step) trains the student
only at the k grid times `t_i = i / k` of its sampler, on the straight line between the pair's ends:
`x_{t_i} = (1 - t_i) z0 + t_i z1`, target `z1 - z0`. A field exact there walks each pair's line from z0 to z1 in
k Euler steps; k = 1 is the one-step student `z0 + v(z0, 0) -> z1`. Options: a perceptual distance on decoded
images, 2-RF++'s LPIPS-Huber (`reflow.losses.lpips_huber`), and SlimFlow's flow-guided term (`flow_guided_target`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.dit import dit_velocity
from reflow.diffusion import drop_labels
from reflow.losses import distance, lpips_huber
from reflow.rectified import Network, interpolate, per_sample

# SlimFlow's code draws the guide's intermediate time from [0.2, 0.8] (a uniform draw on (0, 1) is commented out there).
GUIDE_T_LOW, GUIDE_T_HIGH = 0.2, 0.8


def grid_times(n: int, k: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """`n` times drawn uniformly from the k-step grid `{0, 1/k, ..., (k-1)/k}`, shape `[n]`. With k = 1 every time
    is 0 and nothing is drawn, so the one-step objective's random stream is what it was before k existed."""
    if k == 1:
        return torch.zeros(n, device=like.device, dtype=like.dtype)
    i = torch.randint(0, k, (n,), generator=generator, device=like.device)
    return i.to(like.dtype) / k


@torch.no_grad()
def flow_guided_target(guide: nn.Module, z0: Tensor, student_velocity: Tensor, t: Tensor, y: Tensor, *,
                       network: Network = dit_velocity) -> Tensor:
    """SlimFlow's flow-guided target (Zhu, Liu & Liu, ECCV 2024, "Flow-Guided Distillation"): the student's one
    step stopped at `t`, `x_t = z0 + t v_S(z0, 0)`, finished by one Euler step of the guide (the 2-RF),
    `x_t + (1 - t) v_G(x_t, t)`. No gradient flows through it.

    The intermediate point is the student's own (detached), as in the authors' code (github.com/yuanzhi-zhu/
    SlimFlow, `reflow/reflow.py`, `teacher_loss_new`, the one `train_step` calls; an unused `teacher_loss` starts
    from the guide's own step instead). Along a straight guide flow the target is the guide's one-step result,
    so a student that equals a straight guide has nothing to learn from it.
    """
    s = per_sample(t, z0)
    x_t = z0 + s * student_velocity
    return x_t + (1 - s) * network(guide, x_t, t, y)


class KStepDistill:
    """`E || v(x_{t_i}, t_i, y) - (z1 - z0) ||` on the k-step grid, plus a perceptual and a flow-guided term.

    Every term compares the student's endpoint `x1_hat = x_t + (1 - t) v` (where one Euler step to t = 1 lands)
    with its target: the velocity residual is `(x1_hat - z1) / (1 - t)`, which at k = 1 is `z0 + v(z0, 0) - z1`
    bit for bit (the one-step objective this class generalises). `loss` is `mse`, `pseudo_huber` or
    `lpips_huber` (2-RF++; needs `perceptual`, an LPIPS on decoded endpoints, `(x1_hat, z1) -> batch mean`);
    with `mse` or `pseudo_huber`, `perceptual` (when given) is added with `perceptual_weight`.

    `guide` (with `guide_weight` > 0): SlimFlow's regulariser on fresh noise `z` drawn from the step's generator,
    `guide_weight * d(z + v(z, 0), flow_guided_target(...))` with `t` uniform on [0.2, 0.8]; one-step students
    only (k = 1). The fresh noise rides in the same batched call as the pairs.
    """

    def __init__(self, *, null_label: int, k: int = 1, label_dropout: float = 0.0, loss: str = "mse",
                 perceptual: Callable[[Tensor, Tensor], Tensor] | None = None, perceptual_weight: float = 1.0,
                 guide: nn.Module | None = None, guide_weight: float = 0.0, network: Network = dit_velocity):
        if k < 1:
            raise ValueError(f"k-step distillation needs k >= 1 steps, got k={k}")
        if loss == "lpips_huber" and perceptual is None:
            raise ValueError("loss 'lpips_huber' is 2-RF++'s LPIPS-Huber: it needs an LPIPS distance (local weights), "
                             "and none was given")
        if guide_weight > 0 and (guide is None or k != 1):
            raise ValueError(f"the flow-guided term (guide_weight={guide_weight}) needs a guide model and a one-step "
                             f"student (k=1), got guide={'none' if guide is None else 'a model'}, k={k}")
        self.null_label, self.k, self.label_dropout = null_label, k, label_dropout
        self.distance = None if loss == "lpips_huber" else distance(loss)
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.guide, self.guide_weight, self.network = guide, guide_weight, network

    def endpoint_loss(self, end: Tensor, target: Tensor, t: Tensor) -> Tensor:
        """The distance between the student's endpoints `end` (reached from time `t`, shape `[B]`) and `target`."""
        remaining = per_sample(1 - t, end)
        residual_end, residual_target = end / remaining, target / remaining  # their difference: velocity residual
        if self.distance is None:
            return lpips_huber(residual_end, residual_target, t, self.perceptual_weight * self.perceptual(end, target))
        value = self.distance(residual_end, residual_target)
        if self.perceptual is not None:
            value = value + self.perceptual_weight * self.perceptual(end, target)
        return value

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator, step: int) -> Tensor:
        z0, z1 = batch["z0"], batch["z1"]
        n = len(z0)
        y = drop_labels(batch["label"], self.label_dropout, self.null_label, generator)
        t = grid_times(n, self.k, generator, z0)
        x_t = interpolate(z0, z1, t)
        if self.guide_weight <= 0:
            velocity = self.network(model, x_t, t, y)
            return self.endpoint_loss(x_t + per_sample(1 - t, x_t) * velocity, z1, t)
        fresh = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        velocity = self.network(model, torch.cat([x_t, fresh]), torch.cat([t, t]), torch.cat([y, y]))  # t is 0
        v_pairs, v_fresh = velocity[:n], velocity[n:]
        t_guide = GUIDE_T_LOW + (GUIDE_T_HIGH - GUIDE_T_LOW) * torch.rand(n, generator=generator, device=z0.device,
                                                                          dtype=z0.dtype)
        target = flow_guided_target(self.guide, fresh, v_fresh.detach(), t_guide, y, network=self.network)
        return (self.endpoint_loss(x_t + per_sample(1 - t, x_t) * v_pairs, z1, t)
                + self.guide_weight * self.endpoint_loss(fresh + v_fresh, target, t))


OneStepDistill = KStepDistill  # k = 1 is the default: the one-step student's name where it is used as such
