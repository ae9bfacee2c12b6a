"""`rf@k`: round k of reflow, trained on `reflow_pairs@k` from round k-1's weights (`python -m stages.rf k`).

Same objective as 1-RF on a paired coupling, with SlimFlow's annealing and mirrored pairs as options,
and the same held-out teacher pairs for evaluation, so rounds compare number for number.
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
from stages.reflow_pairs import previous_model


def spec(k: int | str, model: str | None = None) -> StageSpec:
    """Round k's stage; `model` (default: `previous_model(k)`) is the stage it starts from."""
    return StageSpec(
        name=f"rf@{k}",
        params=("compute", "reflow"),
        deps={"pairs": f"artifacts/reflow_pairs@{k}", "init": f"artifacts/{model or previous_model(k)}",
              "teacher_pairs": "artifacts/teacher_pairs", "dit": "artifacts/dit", "vae": "artifacts/vae"},
        outs={"model": f"artifacts/rf@{k}"},
        metrics=f"metrics/rf@{k}.json",
        note="round k trained from round k-1: rf@2, rf@3, ...",
    )


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.reflow, ctx.params.compute
    k = int(ctx.spec.name.split("@")[1])
    meta = teacher_meta(ctx.dep("teacher_pairs"), ctx.dep("dit"))
    _, eval_pairs = held_out_pairs(ctx.dep("teacher_pairs") / "pairs.zarr", meta, p.eval_samples)
    data = training_rows(ctx.dep("pairs") / "pairs.zarr", meta, compute)
    model, copied = velocity_model_like(ctx.dep("dit"), init_from=ctx.dep("init") / "transformer", seed=compute.seed)
    objective = RectifiedFlowObjective(
        coupling="paired", null_label=meta["null_label"], label_dropout=p.label_dropout,
        time_distribution=p.time_distribution, time_eps=p.time_eps, loss=p.loss,
        anneal_warmup_steps=p.anneal_warmup_steps, flip_prob=p.flip_prob)
    result = train_velocity(ctx, p, compute, model, data, objective, desc=ctx.spec.name)
    metrics = evaluate_and_save(ctx, p, result, eval_pairs, vae_dir=ctx.dep("vae"), kind=f"rf{k}",
                                meta={**meta, "round": k, "initialised_from": ctx.spec.deps["init"]})
    return {**metrics, "tensors_from_previous_round": float(copied)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m stages.rf K   (K: the reflow round, 2 or more)", file=sys.stderr)
        return 2
    return stage_main(spec(args[0]), run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
