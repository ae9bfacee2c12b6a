"""Every ODE integration in the project: Euler, Heun, RK45, DDIM, straightness (per-sample noise: reflow.seeds).

One module, so that every stage counts network evaluations (NFE) the same honest way (docs/method.md,
"Samplers and counting evaluations"): a `Field` counts its own calls, classifier-free guidance counts
twice per call, Euler with N steps is N evaluations, Heun with N steps is 2N - 1 (EDM's Heun: the last
step is plain Euler), and RK45 reports what the adaptive solver actually spent. Time runs from noise
(`t = 0`) to data (`t = 1`).

Solvers are objects, each called as `solver(field, z0, steps)`; `solver(name)` builds the one a params
section names. Every solver also tallies, on the fly and without keeping the trajectory, how curved the path
it integrated was (`PathCurvature`, on its result); inside `recording_curvature()` each call's is collected,
which is how the pair stages record the curvature of the paths that made their pairs.
The samplers run under `torch.no_grad()`: they produce pairs, samples and metrics, never gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torchdiffeq
from diffusers import DDIMScheduler
from torch import Tensor

from reflow.curvature import PathCurvature, PathTally, record

# ---------------------------------------------------------------------------------------------------------
# Fields: a velocity (or epsilon) function of (x, t) that counts its evaluations
# ---------------------------------------------------------------------------------------------------------


def _time_vector(t: Tensor | float, x: Tensor) -> Tensor:
    """`t` as a float tensor of shape `[B]` on `x`'s device (at least float32, float64 kept)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    t = torch.as_tensor(t, dtype=dtype, device=x.device)
    return t.reshape(1).repeat(x.shape[0]) if t.dim() == 0 else t


class Field:
    """A function `fn(x, t) -> velocity` that counts network evaluations in `nfe`.

    `t` may be given as a float or a tensor; `fn` always receives a float tensor of shape `[B]`.
    Each call adds `evals_per_call` to `nfe` (2 for classifier-free guidance, which evaluates the
    conditional and unconditional model on one doubled batch).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], *, evals_per_call: int = 1) -> None:
        self.fn = fn
        self.evals_per_call = evals_per_call
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor | float, **kwargs) -> Tensor:
        """`kwargs` go to `fn` as they are (`interval=h`: the step length of an interval model, IntervalEuler)."""
        self.nfe += self.evals_per_call
        return self.fn(x, _time_vector(t, x), **kwargs)


def guided(
    fn3: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    y: Tensor | None,
    *,
    null_label: int,
    scale: float,
) -> Field:
    """Classifier-free guidance of `fn3(x, t, y)` (a velocity or an epsilon model) as a `Field`.

    With `scale == 1` or no labels it is the plain conditional model (one evaluation per call).
    Otherwise one batched call on `[x, x]` with labels `[y, null_label]` gives
    `uncond + scale * (cond - uncond)`, applied to every output channel (DiT's own sampler guided only
    3 of 4 latent channels), counted as 2 evaluations. `fn3` must return only the prediction (drop a
    learned-variance half before guiding).
    """
    if y is None or scale == 1:
        return Field(lambda x, t, **kwargs: fn3(x, t, y, **kwargs))
    null = torch.full_like(y, null_label)

    def fn(x: Tensor, t: Tensor, **kwargs) -> Tensor:
        kwargs = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        out = fn3(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **kwargs)
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return Field(fn, evals_per_call=2)


# ---------------------------------------------------------------------------------------------------------
# Fixed-grid and adaptive ODE solvers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    """End point `x`, evaluations spent `nfe`, optionally the visited `(t, x)` points, and the curvature of the
    path (`PathCurvature`; None where a result was made by hand)."""

    x: Tensor
    nfe: int
    trajectory: list[tuple[float, Tensor]] | None = None
    curvature: PathCurvature | None = None


def _result(x: Tensor, nfe: int, trajectory: list[tuple[float, Tensor]] | None, path: PathTally) -> SampleResult:
    """The solver's result with its path's curvature, collected when `recording_curvature` is on."""
    return SampleResult(x, nfe, trajectory, record(path.curvature()))


def time_grid(t_start: float, t_end: float, steps: int) -> list[float]:
    """`steps + 1` equally spaced times from `t_start` to `t_end`, both ends exact."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64).tolist()
    grid[0], grid[-1] = float(t_start), float(t_end)
    return grid


@torch.no_grad()
def euler_on_grid(field: Field, z0: Tensor, times: Sequence[float], *, return_trajectory: bool = False) -> SampleResult:
    """Euler steps through the given times: `x <- x + (t_next - t) * v(x, t)`, one evaluation each."""
    nfe_before, x = field.nfe, z0
    trajectory = [(float(times[0]), x)] if return_trajectory else None
    path = PathTally(times[0], z0)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t) * field(x, t)
        path.visit(t_next, x)
        if trajectory is not None:
            trajectory.append((float(t_next), x))
    return _result(x, field.nfe - nfe_before, trajectory, path)


class Solver(Protocol):
    """`solver(field, z0, steps, t_start=0, t_end=1)`: integrate `field` from `z0` at `t_start` to `t_end`."""

    name: str

    def __call__(self, field: Field, z0: Tensor, steps: int | None, *, t_start: float = 0.0, t_end: float = 1.0,
                 return_trajectory: bool = False) -> SampleResult: ...


class Euler:
    """Euler with `steps` equal steps: `steps` evaluations."""

    name = "euler"

    def __call__(self, field: Field, z0: Tensor, steps: int | None, *, t_start: float = 0.0, t_end: float = 1.0,
                 return_trajectory: bool = False) -> SampleResult:
        return euler_on_grid(field, z0, time_grid(t_start, t_end, _steps(self.name, steps)),
                             return_trajectory=return_trajectory)


class Heun:
    """Heun's second-order method as in EDM: `2 * steps - 1` evaluations.

    Every step but the last averages the slopes at both ends (trapezoid); the last step is Euler, as in
    EDM's sampler, so the NFE matches the count the literature reports.
    """

    name = "heun"

    @torch.no_grad()
    def __call__(self, field: Field, z0: Tensor, steps: int | None, *, t_start: float = 0.0, t_end: float = 1.0,
                 return_trajectory: bool = False) -> SampleResult:
        times = time_grid(t_start, t_end, _steps(self.name, steps))
        nfe_before, x = field.nfe, z0
        trajectory = [(times[0], x)] if return_trajectory else None
        path = PathTally(times[0], z0)
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
            h = t_next - t
            d = field(x, t)
            x_euler = x + h * d
            x = x_euler if i == len(times) - 2 else x + 0.5 * h * (d + field(x_euler, t_next))
            path.visit(t_next, x)
            if trajectory is not None:
                trajectory.append((t_next, x))
        return _result(x, field.nfe - nfe_before, trajectory, path)


@dataclass(frozen=True)
class RK45:
    """Adaptive Dormand-Prince RK45 (torchdiffeq `dopri5`) to relative and absolute tolerances; `steps` is
    ignored. NFE is what the solver spent; a trajectory holds only the two end points, the curvature is that of
    the accepted steps' points."""

    rtol: float = 1e-5
    atol: float = 1e-5
    name = "rk45"

    @torch.no_grad()
    def __call__(self, field: Field, z0: Tensor, steps: int | None = None, *, t_start: float = 0.0,
                 t_end: float = 1.0, return_trajectory: bool = False) -> SampleResult:
        nfe_before = field.nfe
        span = torch.tensor([t_start, t_end], dtype=torch.promote_types(z0.dtype, torch.float32), device=z0.device)
        path = PathTally(t_start, z0)
        x = torchdiffeq.odeint(_AcceptedSteps(field, path), z0, span, rtol=self.rtol, atol=self.atol,
                               method="dopri5")[-1]
        path.visit(t_end, x)  # the last step may overshoot t_end; its end point is interpolated back to it
        trajectory = [(float(t_start), z0), (float(t_end), x)] if return_trajectory else None
        return _result(x, field.nfe - nfe_before, trajectory, path)


class _AcceptedSteps:
    """`field` as torchdiffeq's `func(t, x)`, telling `path` where each accepted step starts (torchdiffeq's
    `callback_accept_step`, given the step's true time also when integrating backwards); the steps are the
    solver's own, unchanged by listening."""

    def __init__(self, field: Field, path: PathTally) -> None:
        self.field, self.path = field, path

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        return self.field(x, t)

    def callback_accept_step(self, t0: Tensor, x0: Tensor, dt: Tensor) -> None:
        self.path.visit(float(t0), x0)


class IntervalEuler:
    """Steps of an interval model (MeanFlow, shortcut; models/interval.py): `x <- x + h * f(x, t, h)` on `steps`
    equal steps of length `h = 1 / steps`, `steps` evaluations. Each step is the average velocity over its own
    interval, not the velocity at its start, so one step is the model's whole map from noise to data."""

    name = "euler"

    @torch.no_grad()
    def __call__(self, field: Field, z0: Tensor, steps: int | None, *, t_start: float = 0.0, t_end: float = 1.0,
                 return_trajectory: bool = False) -> SampleResult:
        times = time_grid(t_start, t_end, _steps("interval euler", steps))
        nfe_before, x = field.nfe, z0
        trajectory = [(times[0], x)] if return_trajectory else None
        path = PathTally(times[0], z0)
        for t, t_next in zip(times[:-1], times[1:], strict=True):
            h = torch.full((x.shape[0],), t_next - t, dtype=torch.promote_types(x.dtype, torch.float32),
                           device=x.device)
            x = x + (t_next - t) * field(x, t, interval=h)
            path.visit(t_next, x)
            if trajectory is not None:
                trajectory.append((t_next, x))
        return _result(x, field.nfe - nfe_before, trajectory, path)


def _steps(name: str, steps: int | None) -> int:
    if steps is None or steps < 1:
        raise ValueError(f"solver {name!r} needs steps >= 1, got {steps}")
    return steps


SOLVERS = ("euler", "heun", "rk45")


def solver(name: str, *, rtol: float = 1e-5, atol: float = 1e-5) -> Solver:
    """The ODE solver a params section names; `rtol`, `atol` are RK45's. Any other name is an error."""
    if name == "euler":
        return Euler()
    if name == "heun":
        return Heun()
    if name == "rk45":
        return RK45(rtol, atol)
    raise ValueError(f"unknown solver {name!r}; expected one of {list(SOLVERS)}")


# ---------------------------------------------------------------------------------------------------------
# DDIM for the epsilon-prediction teacher
# ---------------------------------------------------------------------------------------------------------


def ddim_scheduler(
    steps: int,
    *,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> DDIMScheduler:
    """diffusers' DDIM scheduler with the settings docs/method.md (section 3) fixes for latents, timesteps set.

    `timestep_spacing="trailing"` starts at t = 999 (pure noise; "leading" starts at 981 and never sees
    the noise level `z0` has). `clip_sample=False`: latents are not in [-1, 1].
    `set_alpha_to_one=True`: with trailing spacing the last step goes from t = T/N - 1 to t = -1, which
    is the clean data (alpha_bar = 1); `False` would stop at alpha_bar_0 = 1 - beta_0 and leave
    `sqrt(beta_0)` of predicted noise in every teacher sample. ("False" is right only for leading
    spacing with an offset, whose last step lands on t = 0 anyway.)
    """
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
    )
    scheduler.set_timesteps(steps)
    return scheduler


@dataclass(frozen=True)
class DDIM:
    """Deterministic DDIM (eta = 0) from noise `z0 = x_T` to a clean sample, `steps` evaluations, on the
    teacher's DDPM schedule (the fields below).

    `eps_field(x, timesteps)` gets the scheduler's integer timesteps (0..999) as a float tensor `[B]`.
    The schedule (timesteps, alpha_bar) is diffusers' `DDIMScheduler`; the update is DDIM's eq. (12)
    written here because `DDIMScheduler.step` computes the previous timestep as
    `t - num_train_timesteps // steps`, which disagrees with trailing spacing whenever `steps` does not
    divide `num_train_timesteps` (e.g. 16 steps: the last step would end at t = 0, not at the data).
    Here the previous timestep is the next entry of the schedule, and -1 (alpha_bar = 1) after the last.

    The curvature is measured on the path in flow coordinates: the state `x = sqrt(a) x0 + sqrt(1 - a) eps` at
    `alpha_bar = a`, divided by `sqrt(a) + sqrt(1 - a)`, is `(1 - t) eps + t x0` at flow time
    `t = sqrt(a) / (sqrt(a) + sqrt(1 - a))`, the straight interpolation 1-RF regresses on. In these coordinates
    DDIM is exactly Euler on the flow's ODE, so a teacher whose predictions stay fixed along the way draws a
    straight line (curvature 0). (The network's timestep axis, `models.dit.flow_time`, is a linear relabelling of
    the timestep, not a noise level; on it even that straight path would look curved.)
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    name = "ddim"

    @torch.no_grad()
    def __call__(self, eps_field: Field, z0: Tensor, steps: int | None, **_) -> SampleResult:
        scheduler = ddim_scheduler(_steps(self.name, steps), num_train_timesteps=self.num_train_timesteps,
                                   beta_schedule=self.beta_schedule, beta_start=self.beta_start,
                                   beta_end=self.beta_end)
        alpha_bar = scheduler.alphas_cumprod.to(torch.float64)
        timesteps = scheduler.timesteps.tolist()
        nfe_before, x = eps_field.nfe, z0
        a_start = alpha_bar[timesteps[0]].item()
        path = PathTally(_ddim_flow_time(a_start), z0 / _ddim_flow_scale(a_start))
        for i, t in enumerate(timesteps):
            a_t = alpha_bar[t].item()
            a_prev = alpha_bar[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
            eps = eps_field(x, float(t))
            x0_pred = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
            x = a_prev**0.5 * x0_pred + (1 - a_prev) ** 0.5 * eps
            path.visit(_ddim_flow_time(a_prev), x / _ddim_flow_scale(a_prev))
        return _result(x, eps_field.nfe - nfe_before, None, path)


def _ddim_flow_scale(alpha_bar: float) -> float:
    """`sqrt(a) + sqrt(1 - a)`: what divides a DDPM state at `alpha_bar = a` into flow coordinates."""
    return alpha_bar**0.5 + (1 - alpha_bar) ** 0.5


def _ddim_flow_time(alpha_bar: float) -> float:
    """The flow time of a DDPM state at `alpha_bar = a`: the weight `sqrt(a) / (sqrt(a) + sqrt(1 - a))` on data."""
    return alpha_bar**0.5 / _ddim_flow_scale(alpha_bar)


# ---------------------------------------------------------------------------------------------------------
# Straightness
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def straightness(field: Field, z0: Tensor, *, steps: int) -> Tensor:
    """Per-sample straightness `E ∫ ||(X1 - X0) - v(X_t, t)||^2 dt` along the field's own path, `[B]`.

    The path is Euler with `steps` equal steps from 0 to 1; the integral is the mean over the grid
    points `t_k` of `||(X1 - X0) - v(X_{t_k}, t_k)||^2`, averaged over dimensions. It is 0 exactly when
    the velocity is constant along the path (a straight line travelled at constant speed).
    """
    times = time_grid(0.0, 1.0, steps)
    x, velocities = z0, []
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        v = field(x, t)
        velocities.append(v)
        x = x + (t_next - t) * v
    displacement = x - z0
    errors = [(displacement - v).pow(2).flatten(1).mean(dim=1) for v in velocities]
    return torch.stack(errors).mean(dim=0)
