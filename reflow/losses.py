"""Distances between a prediction and its target: MSE and pseudo-Huber (LPIPS lives in `models/lpips.py`),
and 2-RF++'s LPIPS-Huber, which combines a time-weighted pseudo-Huber with LPIPS.

These and `LPIPSLoss` return a scalar averaged over the batch. Their scales differ: `mse` averages over
every dimension (docs/method.md, "Loss scale": SeqRF summed over pixels, which changes what a learning
rate means),
`pseudo_huber` works on the per-sample Euclidean norm as in the consistency-model literature, and
`LPIPSLoss` compares decoded images through a frozen feature network.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Pointwise losses
# ---------------------------------------------------------------------------------------------------------


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error averaged over the batch and every dimension."""
    return (a - b).pow(2).mean()


def default_huber_c(a: Tensor) -> float:
    """`0.00054 * sqrt(d)` with `d` the per-sample dimension (Song & Dhariwal's improved CT)."""
    return 0.00054 * math.sqrt(a[0].numel())


def pseudo_huber_per_sample(a: Tensor, b: Tensor, c: float) -> Tensor:
    """`sqrt(||a - b||^2 + c^2) - c` for each sample, shape `[B]`, computed as `n / (sqrt(n + c^2) + c)` with
    `n = ||a - b||^2`: the same value without the cancellation that rounds small residuals to zero."""
    squared_norm = (a - b).pow(2).flatten(1).sum(dim=1)
    return squared_norm / (torch.sqrt(squared_norm + c * c) + c)


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Pseudo-Huber loss `sqrt(||a - b||^2 + c^2) - c` per sample, then the batch mean.

    The norm runs over all dimensions of a sample, so the loss grows like `sqrt(d)`, not like the
    per-dimension mean of `mse`. `c` defaults to `default_huber_c(a)`.
    """
    c = default_huber_c(a) if c is None else c
    return pseudo_huber_per_sample(a, b, c).mean()


RFPP_HUBER = 0.00054  # 2-RF++'s constant, multiplied by d (not sqrt(d) as in iCT)


def lpips_huber(velocity: Tensor, target: Tensor, t: Tensor, perceptual_value: Tensor) -> Tensor:
    """2-RF++'s LPIPS-Huber premetric (Lee, Lin & Fanti 2024, "Improving the Training of Rectified Flows"):
    `(1 - tau) * Huber(v, z1 - z0) + LPIPS(x1_hat, z1)`, batch mean.

    Their time `tau` runs from data (0) to noise (1), so their `1 - tau` is this project's `t`: the Huber term
    on the velocity counts fully near the data and vanishes at the noise end, where LPIPS of the predicted
    endpoint `x1_hat = x_t + (1 - t) v` carries the loss (a one-step student, `t = 0`, is trained by LPIPS
    alone). The Huber term is as in the authors' code (github.com/sangyun884/rfpp, `train.py`, loss
    `lpips-huber`): `(sqrt(||v - target||^2 + c^2) - c) / d` with `c = 0.00054 d`, per sample. `t` has shape
    `[B]`; `perceptual_value` is the batch mean of LPIPS (`models.lpips.LPIPSLoss`), computed by the caller
    on decoded images.
    """
    d = velocity[0].numel()
    huber = pseudo_huber_per_sample(velocity, target, RFPP_HUBER * d) / d
    return (t.to(huber.dtype) * huber).mean() + perceptual_value


Distance = Callable[[Tensor, Tensor], Tensor]
LOSSES: dict[str, Distance] = {"mse": mse, "pseudo_huber": pseudo_huber}


def distance(name: str) -> Distance:
    """The loss called `name` in params (`mse` or `pseudo_huber`); any other name is an error, never a fallback."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]
