"""`rf1`: the first rectified flow, a velocity model from noise to the data the teacher makes.

`coupling: paired` (default) trains on the teacher's stored pairs (z0, z1): the flow learns the
teacher's own noise-to-sample map, which is what makes the following reflow rounds meaningful.
`coupling: independent` is classic 1-RF: real latents with fresh noise every step. Either way the
model is measured on held-out teacher pairs (see runtime/velocity.py).
"""

from __future__ import annotations

import sys

from reflow.rectified import RectifiedFlowObjective
from runtime.context import StageContext
from runtime.main import stage_main
from runtime.spec import StageSpec
from runtime.velocity import (
    evaluate_and_save,
    held_out_pairs,
    teacher_meta,
    train_velocity,
    training_rows,
    velocity_model_like,
)
from storage.datasets import open_dataset
from training.loader import batch_source

SPEC = StageSpec(
    name="rf1",
    params=("compute", "rf1"),
    deps={"pairs": "artifacts/teacher_pairs", "latents": "artifacts/extract", "dit": "artifacts/dit",
          "vae": "artifacts/vae"},
    outs={"model": "artifacts/rf1"},
    metrics="metrics/rf1.json",
)


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.rf1, ctx.params.compute
    meta = teacher_meta(ctx.dep("pairs"), ctx.dep("dit"))
    n_train, eval_pairs = held_out_pairs(ctx.dep("pairs") / "pairs.zarr", meta, p.eval_samples)
    if p.coupling == "paired":
        data = training_rows(ctx.dep("pairs") / "pairs.zarr", meta, compute, rows=n_train)
    else:
        latents = open_dataset(ctx.dep("latents") / "latents.zarr", kind="latents")
        data = batch_source(latents, {"z1": "z1", "label": "labels"}, compute.seed,
                            ram_budget_gb=compute.ram_budget_gb)
    model, copied = velocity_model_like(ctx.dep("dit"), init_from=ctx.dep("dit") if p.init_from_teacher else None,
                                        seed=compute.seed)
    objective = RectifiedFlowObjective(
        coupling=p.coupling, null_label=meta["null_label"], label_dropout=p.label_dropout,
        time_distribution=p.time_distribution, time_eps=p.time_eps, loss=p.loss)
    result = train_velocity(ctx, p, compute, model, data, objective, desc="rf1")
    metrics = evaluate_and_save(ctx, p, result, eval_pairs, vae_dir=ctx.dep("vae"), kind="rf1",
                                meta={**meta, "coupling": p.coupling, "round": 1})
    return {**metrics, "tensors_from_teacher": float(copied), "training_rows": float(data.n)}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
