"""Rectified flow (Liu, Gong & Liu 2022): learn the velocity of straight paths from noise to data.

Time runs from noise to data everywhere in this project (docs/method.md, "Conventions"): `t = 0` is
Gaussian noise `z0`, `t = 1` is data `z1`, the path is `x_t = (1 - t) z0 + t z1` and its velocity is
`z1 - z0`. What distinguishes 1-RF, k-RF and SlimFlow's variants is only the coupling, the way a batch's
`(z0, z1)` are paired:

- `Independent`: fresh noise for every data point (classic 1-RF, plain flow matching);
- `Paired`: stored pairs, the noise a sample was generated from and the sample (1-RF on the teacher's
  pairs, and every reflow round);
- `Annealed`: stored pairs whose noise is blended with fresh noise, the fresh share going 1 -> 0 over a
  warm-up (SlimFlow's annealing reflow).

`reflow_pairs` is the reflow step itself: integrate a trained flow from noise and keep (z0, z1) as the
coupling the next round straightens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from models.dit import dit_velocity
from reflow.diffusion import drop_labels
from reflow.losses import distance
from reflow.samplers import Field, Solver, guided

Batch = dict[str, Tensor]
Network = Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]
"""`network(model, x, t, y) -> velocity`, with `t` of shape `[B]` in [0, 1]; `dit_velocity` for a DiT."""


def per_sample(t: Tensor | float, like: Tensor) -> Tensor:
    """`t` (a float or shape `[B]`) shaped `[B, 1, ..., 1]` to broadcast against `like`."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() > 0 else t


def interpolate(z0: Tensor, z1: Tensor, t: Tensor | float) -> Tensor:
    """The straight path `x_t = (1 - t) * z0 + t * z1` (so `x_0 = z0` is noise, `x_1 = z1` is data)."""
    t = per_sample(t, z0)
    return (1 - t) * z0 + t * z1


TimeDistribution = Literal["uniform", "logit_normal", "u_shaped"]
U_SHAPE = 4.0  # 2-RF++'s a: each end is (e^a + 1) / (2 e^(a/2)), about 3.8 times as likely as the middle


def u_shaped_density(t: Tensor, a: float = U_SHAPE) -> Tensor:
    """2-RF++'s time density on [0, 1], `a (exp(a t) + exp(a (1 - t))) / (2 (exp(a) - 1))`: heavy at both ends,
    symmetric about 1/2 (an exponential on [0, 1] and its mirror, half and half)."""
    return a * (torch.exp(a * t) + torch.exp(a * (1 - t))) / (2 * math.expm1(a))


def sample_time(n: int, *, distribution: TimeDistribution, eps: float, generator: torch.Generator | None = None,
                device: torch.device | str | None = None, loc: float = 0.0, scale: float = 1.0) -> Tensor:
    """Training times, shape `[n]`, in `[eps, 1]` (docs/method.md, "Training times").

    `uniform` is uniform on `[eps, 1]`; `logit_normal` is `sigmoid(N(loc, scale^2))` clipped to `[eps, 1]` (it
    weights the middle of the path, where the velocity is hardest to predict); `u_shaped` is 2-RF++'s density
    for reflow rounds (Lee, Lin & Fanti 2024), which weights both ends, where a nearly straight flow's errors
    remain; drawn as `log(1 + u (exp(a) - 1)) / a` (the exponential's inverse CDF), mirrored to `1 - t` for
    half of the samples by a second uniform, clipped to `[eps, 1]`.
    """
    if distribution == "uniform":
        return eps + (1 - eps) * torch.rand(n, generator=generator, device=device)
    if distribution == "logit_normal":
        return torch.sigmoid(loc + scale * torch.randn(n, generator=generator, device=device)).clamp(eps, 1.0)
    if distribution == "u_shaped":
        u = torch.rand(n, generator=generator, device=device)
        mirrored = torch.rand(n, generator=generator, device=device) < 0.5
        t = torch.log1p(u * math.expm1(U_SHAPE)) / U_SHAPE
        return torch.where(mirrored, 1 - t, t).clamp(eps, 1.0)
    raise ValueError(f"unknown time distribution {distribution!r}; expected one of {list(TimeDistribution.__args__)}")


# ---------------------------------------------------------------------------------------------------------
# Couplings: how a batch's noise z0 is paired with its data z1
# ---------------------------------------------------------------------------------------------------------


class Coupling(Protocol):
    def __call__(self, batch: Batch, fresh: Tensor, generator: torch.Generator, step: int) -> tuple[Tensor, Tensor]:
        """`(z0, z1)` for a batch holding `z1` (and `z0` when paired); `fresh` is standard Gaussian noise."""
        ...


class Independent:
    """Classic 1-RF: every data point gets fresh noise, so the flow learns the data, not a given map."""

    def __call__(self, batch: Batch, fresh: Tensor, generator: torch.Generator, step: int) -> tuple[Tensor, Tensor]:
        return fresh, batch["z1"]


class Paired:
    """Stored pairs: the noise each sample was generated from, and the sample."""

    def __call__(self, batch: Batch, fresh: Tensor, generator: torch.Generator, step: int) -> tuple[Tensor, Tensor]:
        return batch["z0"], batch["z1"]


def anneal_noise(z0: Tensor, fresh: Tensor, r: float | Tensor) -> Tensor:
    """`sqrt(1 - r^2) * z0 + r * fresh`: still standard Gaussian for independent Gaussian `z0` and `fresh`.
    With `r = 1` the pair's noise is replaced (the independent coupling); with `r = 0` it is the stored one."""
    r = torch.as_tensor(r, dtype=z0.dtype, device=z0.device)
    return torch.sqrt(1 - r * r) * z0 + r * fresh


def anneal_r(step: int, warmup_steps: int) -> float:
    """Annealing strength: linear from 1 at step 0 to 0 at `warmup_steps`, then 0 (0 when no warm-up)."""
    return max(0.0, 1.0 - step / warmup_steps) if warmup_steps > 0 else 0.0


@dataclass(frozen=True)
class Annealed:
    """SlimFlow's annealing reflow: the stored noise blended with noise of its own, fading out over a warm-up."""

    warmup_steps: int

    def __call__(self, batch: Batch, fresh: Tensor, generator: torch.Generator, step: int) -> tuple[Tensor, Tensor]:
        z1 = batch["z1"]
        blend = torch.randn(z1.shape, generator=generator, device=z1.device, dtype=z1.dtype)
        return anneal_noise(batch["z0"], blend, anneal_r(step, self.warmup_steps)), z1


def coupling(name: Literal["paired", "independent"], *, anneal_warmup_steps: int = 0) -> Coupling:
    """The coupling a params section names (`coupling`, `anneal_warmup_steps`)."""
    if name == "independent":
        return Independent()
    if name == "paired":
        return Annealed(anneal_warmup_steps) if anneal_warmup_steps else Paired()
    raise ValueError(f"unknown coupling {name!r}; expected 'paired' or 'independent'")


def flip_pairs(z0: Tensor, z1: Tensor, generator: torch.Generator | None = None,
               p: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Mirror `z0` and `z1` together (last axis, the width) per sample with probability `p`.

    SlimFlow's `h_flip`: noise and data are mirrored jointly, so the coupling is kept, and the pair still
    runs from noise at `t = 0` to data at `t = 1`. It does NOT swap `z0` and `z1`: a swapped pair would ask
    for the reverse velocity, and the regression would average the two. Returns the (possibly mirrored)
    `z0`, `z1` and the boolean mask `[B]` of mirrored samples.
    """
    mask = torch.rand(z0.shape[0], generator=generator, device=z0.device) < p
    m = mask.reshape(-1, *([1] * (z0.dim() - 1)))
    return torch.where(m, z0.flip(-1), z0), torch.where(m, z1.flip(-1), z1), mask


# ---------------------------------------------------------------------------------------------------------
# The loss, and the reflow step
# ---------------------------------------------------------------------------------------------------------


class RectifiedFlow:
    """The rectified-flow regression `E || v(x_t, t, y) - (z1 - z0) ||^2` on a coupling.

    Called as `loss(model, batch, generator, step)`, the training loop's objective interface. Labels are
    dropped to `null_label` with probability `label_dropout` (for classifier-free guidance).
    """

    def __init__(self, *, coupling: Coupling, null_label: int, label_dropout: float = 0.1,
                 time_distribution: TimeDistribution = "uniform", time_eps: float = 1e-3,
                 loss: str = "mse", flip_prob: float = 0.0, network: Network = dit_velocity):
        self.coupling, self.null_label, self.label_dropout = coupling, null_label, label_dropout
        self.time_distribution, self.time_eps, self.distance = time_distribution, time_eps, distance(loss)
        self.flip_prob, self.network = flip_prob, network

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator, step: int) -> Tensor:
        z1 = batch["z1"]
        # Drawn whatever the coupling, so that paired and independent runs of one seed draw the same labels and times.
        fresh = torch.randn(z1.shape, generator=generator, device=z1.device, dtype=z1.dtype)
        z0, z1 = self.coupling(batch, fresh, generator, step)
        if self.flip_prob > 0:
            z0, z1, _ = flip_pairs(z0, z1, generator, p=self.flip_prob)
        y = drop_labels(batch["label"], self.label_dropout, self.null_label, generator)
        t = sample_time(len(z1), distribution=self.time_distribution, eps=self.time_eps, generator=generator,
                        device=z1.device)
        s = per_sample(t, z0)  # [B, 1, 1, 1]
        x_t = (1 - s) * z0 + s * z1
        velocity = self.network(model, x_t, t, y)
        return self.distance(velocity, z1 - z0)


def velocity_field(model: nn.Module, y: Tensor, *, null_label: int, guidance: float = 1.0) -> Field:
    """The velocity field of a trained model for labels `y`, with classifier-free guidance when != 1."""
    return guided(lambda x, t, c, **kwargs: dit_velocity(model, x, t, c, **kwargs), y, null_label=null_label,
                  scale=guidance)


@torch.no_grad()
def reflow_pairs(field: Field, z0: Tensor, solver: Solver, steps: int | None) -> tuple[Tensor, Tensor, int]:
    """Reflow (Liu et al. 2022, Algorithm 1): carry each noise `z0` along the trained flow to its end `z1`.

    The pairs `(z0, z1)` are the coupling the next round trains on; straightening a flow this way never
    raises its transport cost. Returns `(z0, z1, nfe)`, the evaluations spent per sample.
    """
    result = solver(field, z0, steps)
    return z0, result.x, result.nfe


@torch.no_grad()
def inverted_pairs(field: Field, z1: Tensor, solver: Solver, steps: int | None) -> tuple[Tensor, Tensor, int]:
    """SlimFlow's `from_z1` direction: real data carried back to noise along the same flow (t from 1 to 0)."""
    result = solver(field, z1, steps, t_start=1.0, t_end=0.0)
    return result.x, z1, result.nfe
