"""The params sections of the interval models (models/interval.py): MeanFlow and shortcut, each a velocity model
with the step's length as a second input. Defaults are the embedded CPU demo's values (runtime/params.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from runtime.params_common import NFE, Decay
from runtime.params_stages import VelocityTrainParams


class IntervalModelParams(VelocityTrainParams):
    """A velocity network with a second time input, the step's length (models/interval.py): MeanFlow, shortcut."""

    coupling: Literal["paired", "independent"] = Field(
        "paired", description="paired: the pair set `pairs` names; independent: real latents + fresh noise")
    pairs: str = Field("reflow_pairs@2", description=(
        "the pair stage it trains on when paired: teacher_pairs or reflow_pairs@k (the pairs rf@k trains on)"))
    drop_farthest: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "train without this fraction of pairs with the largest ||z1 - z0|| (Re-MeanFlow's filter)"))
    init_from: str = Field("rf1", description="the model whose weights it starts from: dit, rf1, rf@k")
    eval_steps: list[NFE] = Field(default_factory=lambda: [1, 2, 4], min_length=1)


class MeanFlowParams(IntervalModelParams):
    """MeanFlow: the average velocity u(x_t, t, h) over [t, t + h] (reflow/meanflow.py); on pairs, Re-MeanFlow."""

    time_distribution: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="of both interval ends: logit_normal (time_loc, time_scale; the paper's) | uniform")
    loss: Literal["adaptive_l2"] = Field(
        "adaptive_l2", description="the paper's adaptively weighted squared error (adaptive_power)")
    time_loc: float = Field(0.4, description=(
        "logit-normal mean of the interval ends (the paper's -0.4, with its noise at t = 1, is +0.4 here)"))
    time_scale: PositiveFloat = 1.0
    interval_fraction: float = Field(0.25, ge=0.0, le=1.0, description=(
        "the share of samples with h > 0 (the paper's ratio of r != t: 25%); the rest is flow matching"))
    adaptive_power: float = Field(1.0, ge=0.0, description="p of the adaptive weight 1 / (||error||^2 + c)^p")
    guidance_scale: float = Field(1.0, ge=1.0, description=(
        "folded into the target (one-NFE sampling); 1: none, right on a guided teacher's pairs, which carry it"))
    label_dropout: Decay = 0.1
    steps: PositiveInt = 400
    lr: PositiveFloat = 2e-4

    @model_validator(mode="after")
    def _guidance_needs_dropped_labels(self) -> MeanFlowParams:
        if self.guidance_scale != 1 and self.label_dropout == 0:
            raise ValueError(f"meanflow.guidance_scale={self.guidance_scale} folds the unconditional velocity into "
                             "the target, which the network learns only from dropped labels: set "
                             "meanflow.label_dropout > 0, or guidance_scale: 1")
        return self


class ShortcutParams(IntervalModelParams):
    """A shortcut model: s(x_t, t, d) for steps of size d, flow matching plus self-consistency (reflow/shortcut.py)."""

    max_log2_steps: int = Field(3, ge=1, le=10, description=(
        "K: trained for 1, 2, ..., 2^K steps (the paper's 128 is K = 7)"))
    consistency_fraction: float = Field(0.25, ge=0.0, le=1.0, description=(
        "the share of each batch on self-consistency targets (the paper's 1/4)"))
    steps: PositiveInt = 400
    lr: PositiveFloat = 2e-4

    @model_validator(mode="after")
    def _steps_are_trained(self) -> ShortcutParams:
        too_many = [n for n in self.eval_steps if n & (n - 1) or n > 2**self.max_log2_steps]
        if too_many:
            raise ValueError(f"shortcut.eval_steps {too_many}: a shortcut model samples at powers of two up to "
                             f"2^max_log2_steps = {2**self.max_log2_steps}")
        return self
