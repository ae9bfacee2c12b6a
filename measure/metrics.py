"""How straight and how faithful a velocity model is, measured against the teacher's own samples.

`z1_teacher` are the teacher's many-step results from the same noise `z0`, so the error of an N-step
sample is the distance from where the teacher would have gone: the number distillation and reflow
are meant to shrink. Straightness is docs/method.md's (section 9) E ∫ ||(X1 - X0) - v(X_t, t)||^2 dt along the model's
own Euler path (0 for a perfectly straight flow).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from measure.intervals import t_interval
from reflow.samplers import Euler, Field, Solver, straightness

EULER = Euler()


@torch.inference_mode()
def flow_errors(
    field: Field, z0: torch.Tensor, z1_teacher: torch.Tensor, *, steps: Sequence[int] = (1, 2, 4),
    straightness_steps: int = 16, batch_size: int = 256, sampler: Solver = EULER,
) -> dict[str, float]:
    """{'error_<n>_step': mean squared error per dimension, 'nfe_<n>_step': evaluations, 'straightness'},
    each mean with its 95% interval over the pairs (`<name>_low`, `<name>_high`; the pairs are independent).

    `sampler(field, z0, n)` makes the n-step sample: Euler with n equal steps unless the model has its
    own schedule (SeqRF: one or more steps per segment).
    """
    out: dict[str, float] = {}

    def with_interval(name: str, per_sample: torch.Tensor) -> None:
        interval = t_interval(per_sample.double().numpy(), "pairs")
        out.update({name: interval.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high})

    for n in steps:
        errors, nfe = [], 0
        for i in range(0, len(z0), batch_size):
            res = sampler(field, z0[i : i + batch_size], n)
            errors.append((res.x.float() - z1_teacher[i : i + batch_size].float()).pow(2).flatten(1).mean(1))
            nfe = res.nfe  # per sample: the same for every batch
        with_interval(f"error_{n}_step", torch.cat(errors))
        out[f"nfe_{n}_step"] = float(nfe)
    with_interval("straightness", torch.cat([straightness(field, z0[i : i + batch_size], steps=straightness_steps)
                                             for i in range(0, len(z0), batch_size)]))
    return out
