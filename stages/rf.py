"""`rf@k`: round k of reflow, trained on `reflow_pairs@k` from the weights of the model it starts from
(`python -m stages.rf K MODEL`; `reflow_rounds` in params maps each round to that model).

Same objective as 1-RF on a paired coupling, with SlimFlow's annealing and mirrored pairs as options,
and the same held-out teacher pairs for evaluation, so rounds compare number for number.
"""

from __future__ import annotations

import sys

from reflow.rectified import RectifiedFlow, coupling
from runtime.context import StageContext, StageError
from runtime.main import stage_main
from runtime.spec import StageSpec
from runtime.velocity import teacher_meta, training_rows, velocity_stage
from storage.datasets import open_dataset


def spec(k: int | str, model: str) -> StageSpec:
    """Round k's stage, starting from the stage `model` (the previous round's, `reflow_rounds[k]`)."""
    return StageSpec(
        name=f"rf@{k}",
        params=("compute", "reflow"),
        deps={"pairs": f"artifacts/reflow_pairs@{k}", "init": f"artifacts/{model}", "latents": "artifacts/extract",
              "teacher_pairs": "artifacts/teacher_pairs", "dit": "artifacts/dit", "vae": "artifacts/vae"},
        outs={"model": f"artifacts/rf@{k}"},
        metrics=f"metrics/rf@{k}.json",
        note="round k trained from round k-1: rf@2, rf@3, ...",
    )


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.reflow, ctx.params.compute
    k = int(ctx.spec.name.split("@")[1])
    meta = teacher_meta(ctx)
    if p.flip_prob > 0:  # pairs are mirrored in latent space: only as good as the VAE is flip-equivariant
        latents = open_dataset(ctx.dep("latents") / "latents.zarr", kind="latents")
        error = latents.attrs.get("flip_equivariance_error", float("inf"))
        if error > p.max_flip_error:
            raise StageError(f"reflow.flip_prob={p.flip_prob}: the VAE's flip-equivariance error is {error:.4f} "
                             f"(artifacts/extract), above reflow.max_flip_error={p.max_flip_error}: a mirrored "
                             "latent is not the latent of the mirrored image; set reflow.flip_prob: 0")
    data = training_rows(ctx.dep("pairs") / "pairs.zarr", meta, compute)
    objective = RectifiedFlow(coupling=coupling("paired", anneal_warmup_steps=p.anneal_warmup_steps),
                              null_label=meta["null_label"], label_dropout=p.label_dropout,
                              time_distribution=p.time_distribution, time_eps=p.time_eps, loss=p.loss,
                              flip_prob=p.flip_prob)
    metrics, copied = velocity_stage(ctx, p, meta, data=data, objective=objective, kind=f"rf{k}",
                                     init_from=ctx.dep("init") / "transformer",
                                     model_meta={"round": k, "initialised_from": ctx.spec.deps["init"]})
    return {**metrics, "tensors_from_previous_round": float(copied)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].isdigit():
        print("usage: python -m stages.rf K MODEL   (K: the reflow round, 2 or more; MODEL: reflow_rounds[K])",
              file=sys.stderr)
        return 2
    return stage_main(spec(*args), run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
