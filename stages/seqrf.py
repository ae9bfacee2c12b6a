"""`seqrf`: Sequential Rectified Flow, a velocity model straight inside each of K time segments.

Trained from 1-RF's weights on `seqrf_pairs`: inside a segment `[t_start, t_end]` the target is the
chord slope `(x_end - x_start) / (t_end - t_start)` at `x_u = (1 - u) x_start + u x_end`
(reflow.rectified.SegmentObjective). It samples with a whole number of Euler steps per segment, so
its n-step numbers (n a multiple of K) use the segment boundaries stored with the pairs, and are
measured on the same held-out teacher pairs as 1-RF and k-RF.
"""

from __future__ import annotations

import sys

from reflow.rectified import SegmentObjective
from reflow.seqrf import seqrf_sampler
from runtime.context import StageContext
from runtime.main import stage_main
from runtime.spec import StageSpec
from runtime.velocity import (
    evaluate_and_save,
    held_out_pairs,
    teacher_meta,
    train_velocity,
    velocity_model_like,
)
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
    meta = teacher_meta(ctx.dep("teacher_pairs"), ctx.dep("dit"))
    pairs = open_dataset(ctx.dep("pairs") / "pairs.zarr", kind="pairs")
    boundaries = [float(b) for b in pairs.attrs["boundaries"]]
    data = batch_source(pairs, ("x_start", "x_end", "t_start", "t_end", "label"), compute.seed,
                        ram_budget_gb=compute.ram_budget_gb)
    _, eval_pairs = held_out_pairs(ctx.dep("teacher_pairs") / "pairs.zarr", meta, p.eval_samples)
    model, copied = velocity_model_like(ctx.dep("dit"), init_from=ctx.dep("init") / "transformer", seed=compute.seed)
    objective = SegmentObjective(null_label=meta["null_label"], label_dropout=p.label_dropout,
                                 time_distribution=p.time_distribution, time_eps=p.time_eps, loss=p.loss)
    result = train_velocity(ctx, p, compute, model, data, objective, desc="seqrf")
    meta = {**meta, "segments": len(boundaries) - 1, "boundaries": boundaries,
            "boundary_rule": pairs.attrs["boundary_rule"], "start": pairs.attrs["start"]}
    metrics = evaluate_and_save(ctx, p, result, eval_pairs, vae_dir=ctx.dep("vae"), kind="seqrf",
                                sampler=seqrf_sampler(boundaries), meta=meta)
    return {**metrics, "segments": float(len(boundaries) - 1), "tensors_from_1rf": float(copied)}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
