"""Sequential Rectified Flow (Yoon et al. 2024): split [0, 1] into K segments and straighten each one.

All of SeqRF is here (docs/method.md, section 6): the boundaries (uniform, or chosen by a dynamic program
over a fine trajectory), the segment endpoints a flow carries, the per-segment objective, and the sampler
(Euler inside each segment). Time runs from noise (`t = 0`) to data (`t = 1`), as everywhere in this
project (SeqRF's own code runs the other way). Boundaries are `t_0 = 0 < t_1 < ... < t_K = 1`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch import Tensor, nn

from models.dit import dit_velocity
from reflow.diffusion import drop_labels
from reflow.losses import distance
from reflow.rectified import TimeDistribution, interpolate, sample_time
from reflow.samplers import Field, SampleResult, euler_on_grid, time_grid
from reflow.segments import steps_problem


def uniform_boundaries(k: int) -> list[float]:
    """`k + 1` equally spaced boundaries `[0, 1/k, ..., 1]`."""
    if k < 1:
        raise ValueError(f"need at least one segment, got k={k}")
    return [i / k for i in range(k + 1)]


def _segment_costs(trajectory_x: Tensor, times: Tensor, min_length: float = 0.0) -> Tensor:
    """`cost[i, j]`: the velocity gap of the segment from grid point `i` to `j`, times its length (inf when
    `j <= i` or the segment is shorter than `min_length`).

    With `u_m = (x_{m+1} - x_m) / (t_{m+1} - t_m)` the flow's velocity on each fine step and `s_ij` the
    segment's chord slope (the Δt-weighted mean of the `u_m` inside it), the cost is
    `sum_m Δt_m mean ||u_m - s_ij||^2 = (t_j - t_i) * (mean velocity gap)` (mean over batch and dimensions):
    zero exactly when the flow moves at constant velocity inside the segment, which one Euler step integrates
    exactly. It expands to `sum_m Δt_m ||u_m||^2 - ||x_j - x_i||^2 / (t_j - t_i)`: prefix sums and a Gram
    matrix `G[p, q] = mean(x_p * x_q)`, in float64.
    """
    n = trajectory_x.shape[0]
    flat = trajectory_x.reshape(n, -1).to(torch.float64)
    t = times.to(torch.float64)
    dt = t[1:] - t[:-1]
    speed_sq = (flat[1:] - flat[:-1]).pow(2).mean(dim=1) / dt  # Δt_m ||u_m||^2
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), speed_sq.cumsum(0)])
    gram = flat @ flat.T / flat.shape[1]
    diag = gram.diagonal()
    length = t[None, :] - t[:, None]  # [i, j]
    chord_sq = diag[:, None] + diag[None, :] - 2 * gram  # ||x_j - x_i||^2
    cost = (prefix[None, :] - prefix[:, None]) - chord_sq / torch.where(length > 0, length, 1.0)
    valid = (length > 0) & (length >= min_length - 1e-12)
    return torch.where(valid, cost.clamp_min(0), torch.inf)


def adaptive_boundaries(trajectory_x: Tensor, times: Tensor, k: int, *, min_length: float = 0.0) -> list[float]:
    """K segment boundaries, chosen among `times`, that minimise the summed cost of `_segment_costs`.

    `trajectory_x` is a fine trajectory `[T + 1, B, ...]` at `times` `[T + 1]` (increasing, from 0 to 1). A
    segment costs its length times its mean velocity gap, SeqRF's criterion: the squared distance between the
    flow's velocity and the segment's chord slope, integrated over the segment. Segments shorter than
    `min_length` are not allowed (a very short segment costs almost nothing, yet spends a whole evaluation).
    An exact dynamic program picks the K segments with the least total cost, O(K T^2).
    """
    n = trajectory_x.shape[0]
    if times.shape != (n,):
        raise ValueError(f"times must have shape [{n}], got {tuple(times.shape)}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] for a trajectory of {n} points, got {k}")
    if k * min_length > 1 + 1e-12:
        raise ValueError(f"{k} segments of at least {min_length} do not fit in [0, 1]")
    cost = _segment_costs(trajectory_x, times, min_length)
    # best[s, j]: least cost covering grid points 0..j with s segments; parent[s, j]: previous boundary.
    best = torch.full((k + 1, n), float("inf"), dtype=torch.float64)
    parent = torch.zeros((k + 1, n), dtype=torch.long)
    best[0, 0] = 0.0
    for s in range(1, k + 1):
        totals = best[s - 1][:, None] + cost  # [i, j]
        best[s], parent[s] = totals.min(dim=0)
    if not torch.isfinite(best[k, n - 1]):
        raise ValueError(f"no {k} segments of at least {min_length} end on this grid of {n - 1} steps")
    indices = [n - 1]
    for s in range(k, 0, -1):
        indices.append(int(parent[s, indices[-1]]))
    return [float(times[i]) for i in reversed(indices)]


def trajectory_boundaries(field: Field, z0: Tensor, grid: Sequence[float], k: int, *,
                          min_length: float = 0.0) -> list[float]:
    """Adaptive boundaries from the flow's own fine Euler trajectory on `grid` from `z0` (a probe batch)."""
    with torch.inference_mode():
        trajectory = euler_on_grid(field, z0, grid, return_trajectory=True).trajectory
    return adaptive_boundaries(torch.stack([x.float().cpu() for _, x in trajectory]),
                               torch.tensor(grid, dtype=torch.float64), k, min_length=min_length)


def snap_to_grid(boundaries: Sequence[float], teacher_steps: int) -> list[int]:
    """Each boundary as an index into the fine grid `time_grid(0, 1, teacher_steps)`, strictly increasing.

    Uniform boundaries that do not fall on the grid are moved to the nearest grid point, so every
    segment is integrated on whole teacher steps; the recorded boundaries are the snapped ones.
    """
    idx = [round(b * teacher_steps) for b in boundaries]
    if any(b >= a for a, b in zip(idx[1:], idx[:-1], strict=True)):
        raise ValueError(f"boundaries {boundaries} collapse on a grid of {teacher_steps} steps; "
                         "raise seqrf.teacher_steps or lower seqrf.segments")
    return idx


@overload
def segment_of(t: float, boundaries: Sequence[float]) -> int: ...
@overload
def segment_of(t: Tensor, boundaries: Sequence[float]) -> Tensor: ...
def segment_of(t: Tensor | float, boundaries: Sequence[float]) -> Tensor | int:
    """Index `i` of the segment `[t_i, t_{i+1})` holding `t`; `t = 1` belongs to the last segment.

    A tensor `t` is compared with the boundaries rounded to its own dtype, so a float32 time made
    from a boundary (0.7 -> 0.69999999) still falls in the segment that starts there.
    """
    inner = list(boundaries[1:-1])
    if isinstance(t, Tensor):
        dtype = t.dtype if t.dtype.is_floating_point else torch.float64
        return torch.bucketize(t.to(dtype).contiguous(), torch.tensor(inner, dtype=dtype, device=t.device), right=True)
    return int(torch.bucketize(torch.tensor(float(t), dtype=torch.float64), torch.tensor(inner), right=True))


def segment_train_example(
    x_ti: Tensor, x_tj: Tensor, t_i: Tensor | float, t_j: Tensor | float, u: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    """One SeqRF regression example inside the segment `[t_i, t_j]`, at fraction `u` of it.

    Returns `x_u = (1 - u) x_ti + u x_tj`, the absolute time `t_i + u (t_j - t_i)` the network sees,
    and the target velocity `(x_tj - x_ti) / (t_j - t_i)` (the segment's chord, in absolute time).
    """
    time_dtype = torch.promote_types(x_ti.dtype, torch.float32)  # times stay at least float32
    t_i, t_j, u = (torch.as_tensor(v, dtype=time_dtype, device=x_ti.device) for v in (t_i, t_j, u))
    width = (t_j - t_i).to(x_ti.dtype)
    if width.dim() > 0:
        width = width.reshape(-1, *([1] * (x_ti.dim() - 1)))
    return interpolate(x_ti, x_tj, u), t_i + u * (t_j - t_i), (x_tj - x_ti) / width


@dataclass(frozen=True)
class Segmented:
    """The SeqRF sampler, a solver like the others: `steps / K` equal Euler steps inside each segment, so
    `steps` (a multiple of K) evaluations."""

    boundaries: tuple[float, ...]
    name = "euler"

    def __call__(self, field: Field, z0: Tensor, steps: int | None, *, return_trajectory: bool = False,
                 **_) -> SampleResult:
        k = len(self.boundaries) - 1
        problem = steps_problem(steps or 0, k)
        if problem:
            raise ValueError(problem)
        times = [float(self.boundaries[0])]
        for t_i, t_j in zip(self.boundaries[:-1], self.boundaries[1:], strict=True):
            times += time_grid(t_i, t_j, steps // k)[1:]
        return euler_on_grid(field, z0, times, return_trajectory=return_trajectory)


def segment_endpoints(
    field_for: Callable[[np.ndarray], Field],
    z0: Tensor,
    segment: np.ndarray,
    segment_times: Sequence[Sequence[float]],
    x_start: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`(x_start, x_end)` of each row's segment, carried by a flow with Euler on `segment_times`.

    `segment_times[s]` are the Euler times through segment `s` (from `t_s` to `t_{s+1}`); `field_for(rows)`
    is the flow for those rows (their labels). Row r's start is `x_start[r]` when given (real data noised
    to `t_s`), otherwise the flow's own trajectory from `z0[r]` through the segments before its own.
    Rows of one segment are integrated together.
    """
    starts = torch.empty_like(z0) if x_start is None else x_start.clone()
    ends = torch.empty_like(z0)
    for s in np.unique(segment):
        rows = np.flatnonzero(segment == s)
        field = field_for(rows)
        x = z0[rows] if x_start is None else x_start[rows]
        if x_start is None:
            for earlier in range(int(s)):
                x = euler_on_grid(field, x, segment_times[earlier]).x
            starts[rows] = x.to(starts.dtype)
        ends[rows] = euler_on_grid(field, x, segment_times[int(s)]).x.to(ends.dtype)
    return starts, ends


class SegmentObjective:
    """Inside a stored segment `[t_start, t_end]`, regress the chord slope (the segment's straight line).

    The batch holds `x_start`, `x_end` (a flow carried from one to the other), `t_start`, `t_end` and
    `label`; `u` is drawn from the time distribution and mapped into the segment. With `one_step`, `u = 0`:
    the model learns the single Euler step across the segment from its start (SeqRF's distillation).
    """

    def __init__(self, *, null_label: int, label_dropout: float = 0.1,
                 time_distribution: TimeDistribution = "uniform", time_eps: float = 1e-3,
                 loss: str = "mse", one_step: bool = False):
        self.null_label, self.label_dropout, self.distance = null_label, label_dropout, distance(loss)
        self.time_distribution, self.time_eps, self.one_step = time_distribution, time_eps, one_step

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator, step: int) -> Tensor:
        x_start, x_end = batch["x_start"], batch["x_end"]
        y = drop_labels(batch["label"], self.label_dropout, self.null_label, generator)
        # u in [0, 1 - eps]: the segment's start point is always seen, its end (the next segment's start) never.
        if self.one_step:
            u = torch.zeros(len(x_start), device=x_start.device)
        else:
            u = 1 - sample_time(len(x_start), distribution=self.time_distribution, eps=self.time_eps,
                                generator=generator, device=x_start.device)
        x_u, t, target = segment_train_example(x_start, x_end, batch["t_start"], batch["t_end"], u)
        return self.distance(dit_velocity(model, x_u, t.to(x_u.dtype), y), target)
