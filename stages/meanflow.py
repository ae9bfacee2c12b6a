"""`meanflow`: MeanFlow's average-velocity model, one network for 1, 2, 4, ... steps (reflow/meanflow.py).

On `meanflow.coupling: paired` it trains on a pair set of the pipeline (`meanflow.pairs`: a reflow round's pairs
by default, the very pairs `rf@2` trains on, or the teacher's), optionally without the farthest pairs: that is
Re-MeanFlow. On `independent` it is MeanFlow proper, on real latents and fresh noise. It starts from
`meanflow.init_from` (1-RF by default), with the interval input added at zero, so at step 0 it is that model.
Measured like every velocity model on the held-out teacher pairs, by its own interval steps.
"""

from __future__ import annotations

import sys

from reflow.meanflow import MeanFlow
from reflow.rectified import coupling
from reflow.samplers import IntervalEuler
from runtime.context import StageContext
from runtime.main import stage_main
from runtime.velocity import coupling_data, interval_model_spec, teacher_meta, velocity_stage

SPEC = interval_model_spec("meanflow")


def run(ctx: StageContext) -> dict:
    p = ctx.params.meanflow
    meta = teacher_meta(ctx)
    data = coupling_data(ctx, p, meta)
    objective = MeanFlow(coupling=coupling(p.coupling), null_label=meta["null_label"], label_dropout=p.label_dropout,
                         time_distribution=p.time_distribution, time_loc=p.time_loc, time_scale=p.time_scale,
                         interval_fraction=p.interval_fraction, time_eps=p.time_eps,
                         adaptive_power=p.adaptive_power, guidance_scale=p.guidance_scale)
    metrics, copied = velocity_stage(
        ctx, p, meta, data=data, objective=objective, kind="meanflow", sampler=IntervalEuler(), interval=True,
        init_from=ctx.dep("init") / "transformer",
        model_meta={"interval_model": "meanflow", "coupling": p.coupling,
                    "pairs": p.pairs if p.coupling == "paired" else None, "drop_farthest": p.drop_farthest,
                    "init_from": p.init_from})
    return {**metrics, "tensors_from_init": float(copied)}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
