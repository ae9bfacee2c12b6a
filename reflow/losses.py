"""Distances between a prediction and its target: MSE and pseudo-Huber (LPIPS lives in `models/lpips.py`).

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


def pseudo_huber(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """Pseudo-Huber loss `sqrt(||a - b||^2 + c^2) - c` per sample, then the batch mean.

    The norm runs over all dimensions of a sample, so the loss grows like `sqrt(d)`, not like the
    per-dimension mean of `mse`. `c` defaults to `default_huber_c(a)`. Computed as
    `n / (sqrt(n + c^2) + c)` with `n = ||a - b||^2`, the same value without the cancellation that
    rounds small residuals to zero.
    """
    c = default_huber_c(a) if c is None else c
    squared_norm = (a - b).pow(2).flatten(1).sum(dim=1)
    return (squared_norm / (torch.sqrt(squared_norm + c * c) + c)).mean()


Distance = Callable[[Tensor, Tensor], Tensor]
LOSSES: dict[str, Distance] = {"mse": mse, "pseudo_huber": pseudo_huber}


def distance(name: str) -> Distance:
    """The loss called `name` in params (`mse` or `pseudo_huber`); any other name is an error, never a fallback."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]
