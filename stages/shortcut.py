"""`shortcut`: a shortcut model, the step size as an input, for any power-of-two step count (reflow/shortcut.py).

Flow matching at step size 0 on a coupling (`shortcut.coupling`, `shortcut.pairs`, as meanflow's), plus the
self-consistency target that one step of 2d lands where two of d do, for 2d down to `2^-(K-1)`. It starts from
`shortcut.init_from` (1-RF by default) with the step-size input added at zero. Measured like every velocity
model on the held-out teacher pairs, at 1, 2, 4, ... steps of its own.
"""

from __future__ import annotations

import sys

from reflow.rectified import coupling
from reflow.samplers import IntervalEuler
from reflow.shortcut import Shortcut, allowed_steps
from runtime.context import StageContext
from runtime.main import stage_main
from runtime.velocity import coupling_data, interval_model_spec, teacher_meta, velocity_stage

SPEC = interval_model_spec("shortcut")


def run(ctx: StageContext) -> dict:
    p = ctx.params.shortcut
    meta = teacher_meta(ctx)
    data = coupling_data(ctx, p, meta)
    objective = Shortcut(coupling=coupling(p.coupling), null_label=meta["null_label"], label_dropout=p.label_dropout,
                         max_log2_steps=p.max_log2_steps, consistency_fraction=p.consistency_fraction,
                         time_distribution=p.time_distribution, time_eps=p.time_eps, loss=p.loss)
    metrics, copied = velocity_stage(
        ctx, p, meta, data=data, objective=objective, kind="shortcut", sampler=IntervalEuler(), interval=True,
        init_from=ctx.dep("init") / "transformer",
        model_meta={"interval_model": "shortcut", "step_counts": allowed_steps(p.max_log2_steps),
                    "coupling": p.coupling, "pairs": p.pairs if p.coupling == "paired" else None,
                    "drop_farthest": p.drop_farthest, "init_from": p.init_from})
    return {**metrics, "tensors_from_init": float(copied)}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
