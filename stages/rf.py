"""`rf@k`: round k of reflow, trained on `reflow_pairs@k` from the weights of the model it starts from
(`python -m stages.rf K MODEL`; `reflow_rounds` in params maps each round to that model).

Same objective as 1-RF on a paired coupling, with SlimFlow's annealing and mirrored pairs as options,
and the same held-out teacher pairs for evaluation, so rounds compare number for number.
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffusers import DiTTransformer2DModel

from reflow.rectified import RectifiedFlow, coupling
from runtime.chains import ROUND_KEY, chain_of, parse_round
from runtime.context import StageContext, StageError
from runtime.main import stage_main
from runtime.params import ReflowParams
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


def student_shape(p: ReflowParams, init_dir: Path, name: str) -> dict | None:
    """The round's own shape when `reflow.student_*` sets one (SlimFlow's smaller model of the next round), each
    null filled from the model it starts from; None when neither is set (that model's shape, the teacher's).

    Prints a warning when the round is smaller and `reflow.anneal_warmup_steps` is 0: a smaller model starts
    from few of the larger one's tensors, and SlimFlow anneals its noise for that reason."""
    if p.student_num_layers is None and p.student_attention_head_dim is None:
        return None
    init = DiTTransformer2DModel.load_config(init_dir)
    shape = {"num_layers": p.student_num_layers or init["num_layers"],
             "attention_head_dim": p.student_attention_head_dim or init["attention_head_dim"]}
    smaller = any(shape[key] < init[key] for key in shape)
    if smaller and p.anneal_warmup_steps == 0:
        print(f"warning: {name} is smaller than the model it starts from ({shape} against num_layers="
              f"{init['num_layers']}, attention_head_dim={init['attention_head_dim']}) with reflow.anneal_warmup_steps"
              ": 0; SlimFlow trains a smaller model on annealed noise (annealing reflow), since it cannot start from "
              "the larger model's weights: consider reflow.anneal_warmup_steps > 0", file=sys.stderr)
    return shape


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.reflow, ctx.params.compute
    k = parse_round(ctx.spec.name.split("@")[1])[0]
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
    init_dir = ctx.dep("init") / "transformer"
    metrics, copied = velocity_stage(ctx, p, meta, data=data, objective=objective, kind=f"rf{k}",
                                     init_from=init_dir, student=student_shape(p, init_dir, ctx.spec.name),
                                     model_meta={"round": k, "initialised_from": ctx.spec.deps["init"],
                                                 "chain": chain_of(ctx.spec.name) or "teacher"})
    return {**metrics, "tensors_from_previous_round": float(copied)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or ROUND_KEY.fullmatch(args[0]) is None:
        print("usage: python -m stages.rf K MODEL   (K: the reflow round, 2 or more, K_classic in the classic "
              "chain; MODEL: reflow_rounds[K])", file=sys.stderr)
        return 2
    return stage_main(spec(*args), run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
