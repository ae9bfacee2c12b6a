"""Rectified-flow interpolation, training time, loss, and SlimFlow's pair augmentations.

Convention (METHOD.md, fixed for the whole project): time runs from noise to data. `t = 0` is Gaussian
noise `z0`, `t = 1` is data `z1`, `x_t = (1 - t) * z0 + t * z1`, and the velocity target is `z1 - z0`.
SeqRF and diffusers' flow-matching scheduler run the other way; convert at their boundary, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from reflow.losses import mse, pseudo_huber

VelocityModel = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""`fn(x, t, y) -> velocity` with `t` of shape `[B]` in [0, 1] and `y` class labels `[B]` or None."""


def _per_sample(t: Tensor | float, like: Tensor) -> Tensor:
    """`t` (a float or shape `[B]`) shaped `[B, 1, ..., 1]` to broadcast against `like`."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() > 0 else t


def interpolate(z0: Tensor, z1: Tensor, t: Tensor | float) -> Tensor:
    """The straight path `x_t = (1 - t) * z0 + t * z1` (so `x_0 = z0` is noise, `x_1 = z1` is data)."""
    t = _per_sample(t, z0)
    return (1 - t) * z0 + t * z1


def velocity_target(z0: Tensor, z1: Tensor) -> Tensor:
    """`d x_t / dt = z1 - z0`, the regression target of rectified flow."""
    return z1 - z0


def sample_time(
    n: int,
    *,
    distribution: Literal["uniform", "logit_normal"],
    eps: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    loc: float = 0.0,
    scale: float = 1.0,
) -> Tensor:
    """Training times, shape `[n]`, in `[eps, 1]`.

    `uniform` is uniform on `[eps, 1]`; `logit_normal` is `sigmoid(N(loc, scale^2))` clipped to
    `[eps, 1]` (it weights the middle of the path, where the velocity is hardest to predict).
    """
    if distribution == "uniform":
        u = torch.rand(n, generator=generator, device=device)
        return eps + (1 - eps) * u
    if distribution == "logit_normal":
        normal = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(loc + scale * normal).clamp(eps, 1.0)
    raise ValueError(f"unknown time distribution {distribution!r}; expected 'uniform' or 'logit_normal'")


def rf_loss(
    model_fn: VelocityModel,
    z0: Tensor,
    z1: Tensor,
    y: Tensor | None,
    t: Tensor,
    *,
    loss: str = "mse",
    huber_c: float | None = None,
) -> Tensor:
    """Rectified-flow regression loss of `model_fn(x_t, t, y)` against `z1 - z0`, a scalar.

    `mse` averages over every dimension (not summed: METHOD.md); `pseudo_huber` uses the per-sample
    norm with `huber_c` defaulting to `0.00054 * sqrt(d)`.
    """
    velocity = model_fn(interpolate(z0, z1, t), t, y)
    target = velocity_target(z0, z1)
    if loss == "mse":
        return mse(velocity, target)
    if loss == "pseudo_huber":
        return pseudo_huber(velocity, target, huber_c)
    raise ValueError(f"unknown loss {loss!r}; expected 'mse' or 'pseudo_huber'")


# ---------------------------------------------------------------------------------------------------------
# SlimFlow's extras for reflow on stored pairs
# ---------------------------------------------------------------------------------------------------------


def anneal_noise(z0: Tensor, fresh: Tensor, r: float | Tensor) -> Tensor:
    """Annealing reflow: `sqrt(1 - r^2) * z0 + r * fresh`.

    Still standard Gaussian for independent Gaussian `z0` and `fresh`. With `r = 1` the pair's noise is
    replaced (independent coupling, like 1-RF); with `r = 0` it is the stored coupling.
    """
    r = torch.as_tensor(r, dtype=z0.dtype, device=z0.device)
    return torch.sqrt(1 - r * r) * z0 + r * fresh


def anneal_r(step: int, warmup_steps: int) -> float:
    """Annealing strength: linear from 1 at step 0 to 0 at `warmup_steps`, then 0 (0 when no warm-up)."""
    if warmup_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / warmup_steps)


def flip_pairs(
    z0: Tensor, z1: Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """Mirror `z0` and `z1` together (last axis, i.e. width) per sample with probability `p`.

    This is SlimFlow's `h_flip` augmentation: the noise and its data are mirrored *jointly*, so the
    coupling is kept. A flipped pair `(flip(z0), flip(z1))` is used exactly like any other pair: it still
    runs from noise at `t = 0` to data at `t = 1`, and its target is `flip(z1) - flip(z0) = flip(z1 - z0)`.
    It is a valid pair because Gaussian noise is mirror-invariant and a (near) mirror-equivariant teacher
    maps `flip(z0)` to about `flip(z1)`.

    It does NOT swap `z0` and `z1`: a swapped pair would ask for velocity `z0 - z1` at the point
    `(1 - t) z1 + t z0`, i.e. the reverse flow written in forward time, and the regression would average
    the forward and reverse velocities wherever the two overlap.

    Returns the (possibly mirrored) `z0`, `z1` and the boolean mask `[B]` of mirrored samples.
    """
    mask = torch.rand(z0.shape[0], generator=generator, device=z0.device) < p
    m = mask.reshape(-1, *([1] * (z0.dim() - 1)))
    return torch.where(m, z0.flip(-1), z0), torch.where(m, z1.flip(-1), z1), mask
