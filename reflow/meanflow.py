"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025): learn the average velocity, so that one step is the whole map.

In this project's time (`t = 0` noise, `t = 1` data, docs/method.md section 1) the average velocity over
`[t, t + h]` along the flow is

    u(x_t, t, h) = (1 / h) * ∫_t^{t+h} v(x_s, s) ds,        so that   x_{t+h} = x_t + h * u(x_t, t, h).

Differentiating `h * u = ∫_t^{t+h} v` in `t` with the interval's end `t + h` held fixed gives the MeanFlow
identity, the training target:

    u(x_t, t, h) = v(x_t, t) + h * d/dt u(x_t, t, h),     d/dt u = v · ∂_x u + ∂_t u - ∂_h u

(the paper writes it with noise at time 1 as `u = v - (t - r) du/dt`). The total derivative is one Jacobian-
vector product of the network, `torch.func.jvp` with tangent `(v, 1, -1)` on `(x_t, t, h)`; the target is
held constant (stop-gradient), so the network is regressed on a target built from its own derivative. At
`h = 0` the identity is flow matching, `u = v`.

- **Times.** `(t, t + h)` are two logit-normal draws, sorted; for all but `interval_fraction` of the samples
  the end is set to the start (`h = 0`, flow matching), the paper's "ratio of r != t" (25% was its best).
- **Weighting.** The paper's adaptive loss: the per-sample squared error `||Δ||^2` (summed over dimensions) is
  divided by `stop_gradient((||Δ||^2 + c)^p)`, `c = 1e-3`, `p` = `adaptive_power` (1 was its best).
- **Coupling.** `v = z1 - z0` of a coupling (reflow.rectified): independent noise is MeanFlow proper; stored
  pairs (the teacher's, or a reflow round's) are Re-MeanFlow, whose regression has one target per `x_t`.
- **Guidance**, folded into the target so that sampling stays one evaluation (the paper's eq. 19): for labelled
  samples `v` becomes `ω v + (1 - ω) u(x_t, t, 0 | ∅)`, the network's own unconditional velocity, held
  constant. Pairs of a guided teacher already carry its guidance, so on pairs `ω = 1` (the default) is right.
- **Attention.** Fused attention kernels have no forward-mode derivative; the JVP runs with PyTorch's math
  attention, which has.
- **Several processes.** `torch.func.jvp` cannot run through a DDP wrapper, so the objective calls the raw
  module and the training loop all-reduces the gradients itself (`manual_gradient_sync`, training/loop.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.dit import dit_velocity
from reflow.diffusion import drop_labels
from reflow.rectified import Coupling, Network, TimeDistribution, interpolate, per_sample, sample_time

ADAPTIVE_C = 1e-3  # the paper's c in the adaptive weight (||Δ||^2 + c)^p


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself when there is none)."""
    return getattr(model, "module", model)


def sample_intervals(n: int, *, loc: float, scale: float, interval_fraction: float, eps: float,
                     distribution: TimeDistribution = "logit_normal", generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """`(t, h)`, each `[n]`: intervals `[t, t + h]` inside `[eps, 1]`, from two sorted draws of `distribution`
    (logit-normal with `loc`, `scale`, or uniform); `h = 0` for all but `interval_fraction` of them."""
    a, b = (sample_time(n, distribution=distribution, eps=eps, generator=generator, device=device, loc=loc,
                        scale=scale) for _ in range(2))
    start, end = torch.minimum(a, b), torch.maximum(a, b)
    spans = torch.rand(n, generator=generator, device=device) < interval_fraction
    return start, torch.where(spans, end - start, torch.zeros_like(start))


def meanflow_target(network: Network, model: nn.Module, x_t: Tensor, t: Tensor, h: Tensor, v: Tensor,
                    y: Tensor | None) -> tuple[Tensor, Tensor]:
    """`(u, target)`: the network's average velocity `u(x_t, t, h)` (with its graph, to regress) and the
    MeanFlow target `v + h * du/dt` (detached), the total derivative from one JVP with tangent `(v, 1, -1)`."""

    def u(x: Tensor, time: Tensor, interval: Tensor) -> Tensor:
        return network(model, x, time, y, interval=interval)

    with sdpa_kernel(SDPBackend.MATH):
        prediction, du_dt = torch.func.jvp(u, (x_t, t, h), (v, torch.ones_like(t), -torch.ones_like(h)))
    return prediction, (v + per_sample(h, v) * du_dt).detach()


def adaptive_loss(prediction: Tensor, target: Tensor, power: float) -> Tensor:
    """The paper's adaptively weighted squared error: `||Δ||^2 / sg((||Δ||^2 + c)^p)`, averaged over the batch
    (`power = 0` is plain squared error summed over dimensions)."""
    squared = (prediction - target).pow(2).flatten(1).sum(dim=1)
    return (squared / (squared.detach() + ADAPTIVE_C).pow(power)).mean()


class MeanFlow:
    """The MeanFlow objective on a coupling, the training loop's `loss(model, batch, generator, step)`."""

    manual_gradient_sync = True  # the JVP runs on the raw module, past DDP's gradient hooks

    def __init__(self, *, coupling: Coupling, null_label: int, label_dropout: float = 0.1,
                 time_distribution: TimeDistribution = "logit_normal", time_loc: float = 0.4,
                 time_scale: float = 1.0, interval_fraction: float = 0.25,
                 time_eps: float = 1e-3, adaptive_power: float = 1.0, guidance_scale: float = 1.0,
                 network: Network = dit_velocity):
        if not 0 <= interval_fraction <= 1:
            raise ValueError(f"interval_fraction={interval_fraction} must be a fraction in [0, 1]")
        self.coupling, self.null_label, self.label_dropout = coupling, null_label, label_dropout
        self.time_distribution, self.time_loc, self.time_scale = time_distribution, time_loc, time_scale
        self.interval_fraction = interval_fraction
        self.time_eps, self.adaptive_power, self.guidance_scale = time_eps, adaptive_power, guidance_scale
        self.network = network

    def guided_velocity(self, model: nn.Module, x_t: Tensor, t: Tensor, v: Tensor, y: Tensor) -> Tensor:
        """`v` with guidance folded in for labelled samples: `ω v + (1 - ω) u(x_t, t, 0 | ∅)`, held constant."""
        if self.guidance_scale == 1:
            return v
        null = torch.full_like(y, self.null_label)
        with torch.no_grad():
            unconditional = self.network(model, x_t, t, null, interval=torch.zeros_like(t))
        guided = self.guidance_scale * v + (1 - self.guidance_scale) * unconditional
        labelled = (y != self.null_label).reshape(-1, *([1] * (v.dim() - 1)))
        return torch.where(labelled, guided, v)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator, step: int) -> Tensor:
        z1 = batch["z1"]
        fresh = torch.randn(z1.shape, generator=generator, device=z1.device, dtype=z1.dtype)
        z0, z1 = self.coupling(batch, fresh, generator, step)
        y = drop_labels(batch["label"], self.label_dropout, self.null_label, generator)
        t, h = sample_intervals(len(z1), loc=self.time_loc, scale=self.time_scale,
                                interval_fraction=self.interval_fraction, eps=self.time_eps,
                                distribution=self.time_distribution, generator=generator, device=z1.device)
        t, h = t.to(z1.dtype), h.to(z1.dtype)
        net = unwrapped(model)
        x_t = interpolate(z0, z1, t)
        v = self.guided_velocity(net, x_t, t, z1 - z0, y)
        prediction, target = meanflow_target(self.network, net, x_t, t, h, v, y)
        return adaptive_loss(prediction, target, self.adaptive_power)
