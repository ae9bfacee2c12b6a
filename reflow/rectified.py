"""Rectified flow as one small object: the training loss on a coupling, and the one-line sampler view.

`RectifiedFlowObjective` is what `reflow.train.train` calls for 1-RF, k-RF and (with its own targets)
distillation. The coupling decides what the method is: `paired` trains on stored (z0, z1) pairs (the
noise a sample was generated from and the sample), `independent` draws fresh noise for every data point
(classic 1-RF, plain flow matching). SlimFlow's annealing (z0 blended with fresh noise, the fresh share
going 1 -> 0 over a warm-up) and mirrored pairs are options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from models.dit import dit_velocity
from reflow.diffusion import drop_labels
from reflow.flow import anneal_noise, anneal_r, flip_pairs, rf_loss, sample_time
from reflow.losses import mse, pseudo_huber
from reflow.samplers import Field, guided
from reflow.seqrf import segment_train_example


class RectifiedFlowObjective:
    """`loss(model, batch, generator, step)`; batch holds `z1`, `label` and, when paired, `z0`."""

    def __init__(
        self,
        *,
        coupling: Literal["paired", "independent"],
        null_label: int,
        label_dropout: float = 0.1,
        time_distribution: Literal["uniform", "logit_normal"] = "uniform",
        time_eps: float = 1e-3,
        loss: Literal["mse", "pseudo_huber"] = "mse",
        anneal_warmup_steps: int = 0,
        flip_prob: float = 0.0,
    ):
        self.coupling, self.null_label, self.label_dropout = coupling, null_label, label_dropout
        self.time_distribution, self.time_eps, self.loss = time_distribution, time_eps, loss
        self.anneal_warmup_steps, self.flip_prob = anneal_warmup_steps, flip_prob

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int):
        z1 = batch["z1"]
        fresh = torch.randn(z1.shape, generator=generator, device=z1.device, dtype=z1.dtype)
        z0 = fresh if self.coupling == "independent" else batch["z0"]
        if self.coupling == "paired" and self.anneal_warmup_steps:
            fresh2 = torch.randn(z1.shape, generator=generator, device=z1.device, dtype=z1.dtype)
            z0 = anneal_noise(z0, fresh2, anneal_r(step, self.anneal_warmup_steps))
        if self.flip_prob > 0:
            z0, z1, _ = flip_pairs(z0, z1, generator, p=self.flip_prob)
        y = drop_labels(batch["label"], self.label_dropout, self.null_label, generator)
        t = sample_time(len(z1), distribution=self.time_distribution, eps=self.time_eps, generator=generator,
                        device=z1.device)
        return rf_loss(lambda x, tt, yy: dit_velocity(model, x, tt, yy), z0, z1, y, t, loss=self.loss)


class OneStepDistillObjective:
    """A one-step student: `z0 + v(z0, 0)` should land on the source model's `z1` (InstaFlow, SlimFlow).

    `perceptual(prediction, z1)`, when given, is added with `perceptual_weight` (LPIPS on decoded images).
    """

    def __init__(self, *, null_label: int, label_dropout: float = 0.0, loss: Literal["mse", "pseudo_huber"] = "mse",
                 perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 perceptual_weight: float = 1.0):
        self.null_label, self.label_dropout, self.loss = null_label, label_dropout, loss
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int):
        z0, z1 = batch["z0"], batch["z1"]
        y = drop_labels(batch["label"], self.label_dropout, self.null_label, generator)
        prediction = z0 + dit_velocity(model, z0, torch.zeros(len(z0), device=z0.device, dtype=z0.dtype), y)
        value = mse(prediction, z1) if self.loss == "mse" else pseudo_huber(prediction, z1)
        if self.perceptual is not None:
            value = value + self.perceptual_weight * self.perceptual(prediction, z1)
        return value


class SegmentObjective:
    """SeqRF: inside a stored segment `[t_start, t_end]`, regress the chord slope (METHOD.md, seqrf).

    The batch holds `x_start`, `x_end` (the teacher flow carried from one to the other), `t_start`,
    `t_end` and `label`; `u` is drawn from the time distribution and mapped into the segment. With
    `one_step`, `u = 0`: the model learns the single Euler step across the segment from its start
    (SeqRF's per-segment distillation).
    """

    def __init__(self, *, null_label: int, label_dropout: float = 0.1,
                 time_distribution: Literal["uniform", "logit_normal"] = "uniform", time_eps: float = 1e-3,
                 loss: Literal["mse", "pseudo_huber"] = "mse", one_step: bool = False):
        self.null_label, self.label_dropout, self.loss = null_label, label_dropout, loss
        self.time_distribution, self.time_eps, self.one_step = time_distribution, time_eps, one_step

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int):
        x_start, x_end = batch["x_start"], batch["x_end"]
        y = drop_labels(batch["label"], self.label_dropout, self.null_label, generator)
        # u in [0, 1 - eps]: the segment's start point is always seen, its end (the next segment's start) never.
        if self.one_step:
            u = torch.zeros(len(x_start), device=x_start.device)
        else:
            u = 1 - sample_time(len(x_start), distribution=self.time_distribution, eps=self.time_eps,
                                generator=generator, device=x_start.device)
        x_u, t, target = segment_train_example(x_start, x_end, batch["t_start"], batch["t_end"], u)
        velocity = dit_velocity(model, x_u, t.to(x_u.dtype), y)
        return mse(velocity, target) if self.loss == "mse" else pseudo_huber(velocity, target)


def velocity_field(model: nn.Module, y: torch.Tensor, *, null_label: int, guidance: float = 1.0) -> Field:
    """The velocity field of a trained model for labels `y`, with classifier-free guidance when != 1."""
    return guided(lambda x, t, c: dit_velocity(model, x, t, c), y, null_label=null_label, scale=guidance)
