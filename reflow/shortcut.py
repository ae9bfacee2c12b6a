"""Shortcut models (Frans, Hafner, Levine & Abbeel 2024): a velocity network told the size of the step it takes.

The network `s(x_t, t, d)` is the step from `x_t` to `x_{t+d}`: `x_{t+d} = x_t + d * s(x_t, t, d)`, the same
network as MeanFlow's (models/interval.py, `h = d`). It is trained on two targets in every batch:

- **flow matching** at `d = 0`: `s(x_t, t, 0) = z1 - z0` on the coupling's straight path (most of the batch);
- **self-consistency**: one step of `2d` lands where two steps of `d` do,

      s(x_t, t, 2d) = sg( (s(x_t, t, d) + s(x'_{t+d}, t + d, d)) / 2 ),   x'_{t+d} = x_t + d * s(x_t, t, d),

  for `2d` in `{1, 1/2, ..., 2^-(K-1)}` and `t` on the grid of `2d`'s multiples (`consistency_fraction` of the
  batch; the paper's 1/4). The smallest step `2^-K` is bootstrapped from flow matching's `d = 0`.

The targets come from the network being trained, without gradient, as in the paper. It samples at any
power-of-two step count up to `2^K` (`IntervalEuler`), one evaluation a step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.dit import dit_velocity
from reflow.diffusion import drop_labels
from reflow.losses import distance
from reflow.rectified import Coupling, Network, TimeDistribution, interpolate, per_sample, sample_time


def consistency_steps(n: int, max_log2_steps: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """`(t, d)`, each `[n]`: half-steps `d = 2^-(j + 1)` with `j` uniform in `{0, ..., K - 1}`, and `t` uniform on
    the grid `{0, 2d, 4d, ..., 1 - 2d}`, so that the double step `[t, t + 2d]` ends inside `[0, 1]`."""
    j = torch.randint(0, max_log2_steps, (n,), generator=generator, device=device)
    double_steps = torch.pow(2.0, j.float())  # how many double steps of 2d fill [0, 1]
    i = torch.floor(torch.rand(n, generator=generator, device=device) * double_steps)
    return i / double_steps, 0.5 / double_steps


def allowed_steps(max_log2_steps: int) -> list[int]:
    """The step counts a shortcut model trained up to `2^K` steps samples at: 1, 2, 4, ..., 2^K."""
    return [2**k for k in range(max_log2_steps + 1)]


class Shortcut:
    """Flow matching at `d = 0` plus self-consistency, the training loop's `loss(model, batch, generator, step)`."""

    def __init__(self, *, coupling: Coupling, null_label: int, label_dropout: float = 0.1, max_log2_steps: int = 7,
                 consistency_fraction: float = 0.25, time_distribution: TimeDistribution = "uniform",
                 time_eps: float = 1e-3, loss: str = "mse", network: Network = dit_velocity):
        if not 0 <= consistency_fraction <= 1:
            raise ValueError(f"consistency_fraction={consistency_fraction} must be a fraction in [0, 1]")
        if max_log2_steps < 1:
            raise ValueError(f"max_log2_steps={max_log2_steps} must be >= 1 (at least one- and two-step targets)")
        self.coupling, self.null_label, self.label_dropout = coupling, null_label, label_dropout
        self.max_log2_steps, self.consistency_fraction = max_log2_steps, consistency_fraction
        self.time_distribution, self.time_eps = time_distribution, time_eps
        self.distance, self.network = distance(loss), network

    @torch.no_grad()
    def consistency_target(self, model: nn.Module, x_t: Tensor, t: Tensor, d: Tensor, y: Tensor) -> Tensor:
        """The average of two steps of `d` from `x_t`: the target of one step of `2d`."""
        first = self.network(model, x_t, t, y, interval=d)
        x_mid = x_t + per_sample(d, x_t) * first
        second = self.network(model, x_mid, t + d, y, interval=d)
        return (first + second) / 2

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator, step: int) -> Tensor:
        z1 = batch["z1"]
        fresh = torch.randn(z1.shape, generator=generator, device=z1.device, dtype=z1.dtype)
        z0, z1 = self.coupling(batch, fresh, generator, step)
        y = drop_labels(batch["label"], self.label_dropout, self.null_label, generator)
        n = len(z1)
        k = int(round(n * self.consistency_fraction))  # rows [0, k): self-consistency; [k, n): flow matching
        t_flow = sample_time(n - k, distribution=self.time_distribution, eps=self.time_eps, generator=generator,
                             device=z1.device)
        t_self, d = consistency_steps(k, self.max_log2_steps, generator, z1.device)
        t = torch.cat([t_self, t_flow]).to(z1.dtype)
        interval = torch.cat([2 * d, torch.zeros_like(t_flow)]).to(z1.dtype)
        x_t = interpolate(z0, z1, t)
        target = z1 - z0
        if k:
            self_target = self.consistency_target(model, x_t[:k], t[:k], d.to(z1.dtype), y[:k])
            target = torch.cat([self_target, target[k:]])
        return self.distance(self.network(model, x_t, t, y, interval=interval), target)
