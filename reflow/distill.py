"""One-step distillation (InstaFlow, SlimFlow): a student whose single Euler step lands where the flow does.

The pairs are a straight flow's own (z0, z1), integrated from noise (docs/method.md, section 7). The
student `z0 + v(z0, 0)` regresses `z1`, optionally with a perceptual distance on decoded images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.dit import dit_velocity
from reflow.diffusion import drop_labels
from reflow.losses import distance


class OneStepDistill:
    """`|| z0 + v(z0, 0, y) - z1 ||`, plus `perceptual_weight * perceptual(prediction, z1)` when given."""

    def __init__(self, *, null_label: int, label_dropout: float = 0.0, loss: str = "mse",
                 perceptual: Callable[[Tensor, Tensor], Tensor] | None = None, perceptual_weight: float = 1.0):
        self.null_label, self.label_dropout, self.distance = null_label, label_dropout, distance(loss)
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator, step: int) -> Tensor:
        z0, z1 = batch["z0"], batch["z1"]
        y = drop_labels(batch["label"], self.label_dropout, self.null_label, generator)
        prediction = z0 + dit_velocity(model, z0, torch.zeros(len(z0), device=z0.device, dtype=z0.dtype), y)
        value = self.distance(prediction, z1)
        if self.perceptual is not None:
            value = value + self.perceptual_weight * self.perceptual(prediction, z1)
        return value
