"""`seqrf`: Sequential Rectified Flow, a velocity model straight inside each of K time segments.

Trained from 1-RF's weights on `seqrf_pairs`: inside a segment `[t_start, t_end]` the target is the
chord slope `(x_end - x_start) / (t_end - t_start)` at `x_u = (1 - u) x_start + u x_end`
(reflow.seqrf.SegmentObjective). It samples with a whole number of Euler steps per segment, so
its n-step numbers (n a multiple of K) use the segment boundaries stored with the pairs, and are
measured on the same held-out teacher pairs as 1-RF and k-RF.
"""

from __future__ import annotations

import sys

from reflow.seqrf import Segmented, SegmentObjective
from runtime.context import StageContext
from runtime.main import stage_main
from runtime.spec import StageSpec
from runtime.velocity import teacher_meta, velocity_stage
from storage.datasets import open_dataset
from training.loader import batch_source

SPEC = StageSpec(
    name="seqrf",
    params=("compute", "seqrf"),
    deps={"pairs": "artifacts/seqrf_pairs", "init": "artifacts/rf1", "teacher_pairs": "artifacts/teacher_pairs",
          "dit": "artifacts/dit", "vae": "artifacts/vae"},
    outs={"model": "artifacts/seqrf"},
    metrics="metrics/seqrf.json",
)


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.seqrf, ctx.params.compute
    meta = teacher_meta(ctx)
    pairs = open_dataset(ctx.dep("pairs") / "pairs.zarr", kind="pairs")
    boundaries = [float(b) for b in pairs.attrs["boundaries"]]
    data = batch_source(pairs, ("x_start", "x_end", "t_start", "t_end", "label"), compute.seed,
                        ram_budget_gb=compute.ram_budget_gb)
    objective = SegmentObjective(null_label=meta["null_label"], label_dropout=p.label_dropout,
                                 time_distribution=p.time_distribution, time_eps=p.time_eps, loss=p.loss)
    metrics, copied = velocity_stage(
        ctx, p, meta, data=data, objective=objective, kind="seqrf", init_from=ctx.dep("init") / "transformer",
        sampler=Segmented(tuple(boundaries)),
        model_meta={"segments": len(boundaries) - 1, "boundaries": boundaries,
                    "boundary_rule": pairs.attrs["boundary_rule"], "start": pairs.attrs["start"]})
    return {**metrics, "segments": float(len(boundaries) - 1), "tensors_from_1rf": float(copied)}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
