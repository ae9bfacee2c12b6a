"""The curvature of an integrated path, tallied on the fly while a solver runs (`reflow.samplers`).

A pair stage's `pairs_curvature` (`measure.pairs`) is the ratio of these tallies over every path it integrated:
0 for straight lines travelled at constant speed, RectifiedFlow's straightness made scale-free.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PathCurvature:
    """How far each sample's integrated path is from a straight line travelled at constant speed.

    For a path `(t_k, x_k)`, k = 0..N, over the span `T = |t_N - t_0|`, with chord slope
    `c = (x_N - x_0) / (t_N - t_0)` and step slopes `s_k = (x_{k+1} - x_k) / (t_{k+1} - t_k)`:
    `deviation = sum_k |t_{k+1} - t_k| ||s_k - c||^2 / (T d)`, the time-mean squared gap between the path's
    velocity and its chord: RectifiedFlow's straightness `S(Z) = ∫ E ||(Z_1 - Z_0) - dZ_t/dt||^2 dt` (Liu et al.
    2022, "Flow Straight and Fast") on the discrete path, its own span rescaled to one. `chord = ||c||^2 / d`.
    Their ratio is dimensionless: 0 exactly for a straight path at constant speed, whatever the latents' scale.
    """

    deviation: Tensor  # [B] float64
    chord: Tensor  # [B] float64

    def value(self) -> float:
        """The batch's curvature: summed deviation over summed chord (a ratio of means over the samples)."""
        return float(self.deviation.sum() / self.chord.sum())


class PathTally:
    """The running sum `sum_k ||x_{k+1} - x_k||^2 / |t_{k+1} - t_k|` of a path, one point at a time.

    `deviation * T = that sum - ||x_N - x_0||^2 / T` (expand `||s_k - c||^2` and use `sum_k Δt_k s_k = x_N - x_0`),
    so the path is never stored: only its first and latest points (as in `reflow.seqrf._segment_costs`).
    """

    def __init__(self, t0: float, x0: Tensor) -> None:
        self.t0, self.x0, self.t, self.x = float(t0), x0, float(t0), x0
        self.energy = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)

    def visit(self, t: float, x: Tensor) -> None:
        t = float(t)
        if t != self.t:  # an adaptive solver may report its start point again
            self.energy += _mean_square(x - self.x) / abs(t - self.t)
            self.t, self.x = t, x

    def curvature(self) -> PathCurvature:
        span = abs(self.t - self.t0)
        chord = _mean_square(self.x - self.x0) / span**2
        return PathCurvature((self.energy / span - chord).clamp_min(0), chord)


def _mean_square(x: Tensor) -> Tensor:
    """Per-sample mean of `x**2` over every dimension but the first, in float64."""
    return x.flatten(1).double().pow(2).mean(dim=1)


# The list `recording_curvature` collects into; None outside it, where nothing is collected.
_RECORDED: ContextVar[list[PathCurvature] | None] = ContextVar("reflow_recorded_curvature", default=None)


@contextmanager
def recording_curvature() -> Iterator[list[PathCurvature]]:
    """Collect the `PathCurvature` of every solver call made inside the block, one entry per call.

    The pair stages make their rows through helpers that return only end points (`reflow.rectified.reflow_pairs`,
    `reflow.seqrf.segment_endpoints`, the teacher's `Generator`); this lets `runtime.pairs` see the paths
    without threading them through every helper. Recording reads the paths and never changes a result.
    """
    token = _RECORDED.set([])
    try:
        yield _RECORDED.get()
    finally:
        _RECORDED.reset(token)




def record(curvature: PathCurvature) -> PathCurvature:
    """Hand a solver call's curvature to the enclosing `recording_curvature` block, if any; returns it."""
    recorded = _RECORDED.get()
    if recorded is not None:
        recorded.append(curvature)
    return curvature
