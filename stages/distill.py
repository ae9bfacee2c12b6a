"""`distill`: a one-step student, `z0 -> z0 + v(z0, 0)`, from the pairs of the chosen (straightest) model.

The source model (`distill.source`: rf1, rf@k or seqrf) is integrated with Euler (segment by segment
for seqrf) from per-sample noise to make the pairs, kept in the output beside the student. The student
may be smaller than the source (its own depth and width, initialised from the source where shapes
match). It is measured like every velocity
model, on the held-out teacher pairs, so its one-step error sits next to 1-RF's and k-RF's.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from reflow.models import load_dit
from reflow.rectified import OneStepDistillObjective, velocity_field
from reflow.samplers import euler, per_sample_noise, sample_seeds
from reflow.seqrf import seqrf_sample
from stages.common import StageContext, StageSpec, stage_main
from stages.pairs import generate_pairs
from stages.velocity import evaluate_and_save, load_pairs, split_eval, teacher_meta, train_velocity, velocity_model_like
from storage.checkpoints import read_meta

SPEC = StageSpec(
    name="distill",
    params=("compute", "distill"),
    deps={"source": "artifacts/${distill.source}", "teacher_pairs": "artifacts/teacher_pairs",
          "dit": "artifacts/dit", "vae": "artifacts/vae"},
    outs={"model": "artifacts/distill"},
    metrics="metrics/distill.json",
)


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.distill, ctx.params.compute
    device = "cuda" if compute.device != "cpu" and torch.cuda.is_available() else "cpu"
    meta = teacher_meta(ctx.dep("teacher_pairs"), ctx.dep("dit"))
    shape, null = tuple(meta["latent_shape"]), meta["null_label"]
    source_dir = ctx.dep("source") / "transformer"

    # The pairs are finished in the scratch area, so a kill during training never regenerates them.
    pairs_path = ctx.scratch / "distill_pairs.zarr"
    stats: dict[str, float] = {}
    if not pairs_path.exists():
        source = load_dit(source_dir).to(device).eval()
        # A SeqRF source integrates segment by segment (solver_steps spread over its K segments).
        boundaries = read_meta(source_dir).get("boundaries")

        def integrate(field, z0):
            if boundaries is None:
                return euler(field, z0, p.solver_steps)
            per_segment = max(1, p.solver_steps // (len(boundaries) - 1))
            return seqrf_sample(field, z0, boundaries, steps_per_segment=per_segment)

        @torch.inference_mode()
        def make_batch(start: int, stop: int) -> dict[str, np.ndarray]:
            seeds = sample_seeds(p.seed, start, stop)
            y = np.arange(start, stop, dtype=np.int64) % meta["num_classes"]
            z0 = per_sample_noise(seeds, shape)
            res = integrate(velocity_field(source, torch.from_numpy(y).to(device), null_label=null), z0.to(device))
            return {"z0": z0.numpy(), "z1": res.x.float().cpu().numpy(), "label": y,
                    "seed": np.asarray(seeds, dtype=np.int64)}

        stats = generate_pairs(
            ctx, final=pairs_path, n_rows=p.num_samples, shard_rows=min(256, p.num_samples), batch_size=256,
            attrs={"source": p.source, "solver": "euler", "solver_steps": p.solver_steps, "base_seed": p.seed, **meta},
            make_batch=make_batch, desc="distillation pairs",
            schema={"z0": (shape, "float32"), "z1": (shape, "float32"), "label": ((), "int64"),
                    "seed": ((), "int64")})

    _, eval_pairs = split_eval(load_pairs(ctx.dep("teacher_pairs") / "pairs.zarr"), p.eval_samples)
    student, copied = velocity_model_like(
        ctx.dep("dit"), init_from=source_dir if p.init_from_source else None, seed=compute.seed,
        num_layers=p.student_num_layers, attention_head_dim=p.student_attention_head_dim)
    objective = OneStepDistillObjective(null_label=null, label_dropout=p.label_dropout, loss=p.loss)
    result = train_velocity(ctx, p, compute, student, load_pairs(pairs_path), objective, desc="distill")
    n_params = sum(q.numel() for q in result.ema.parameters())
    metrics = evaluate_and_save(ctx, p, result, eval_pairs, vae_dir=ctx.dep("vae"), kind="distilled",
                                meta={**meta, "source": p.source, "one_step": True, "parameters": n_params},
                                move_in={"pairs.zarr": pairs_path})
    return {**metrics, **stats, "student_parameters": float(n_params),
            "tensors_from_source": float(copied)}


def main() -> int:
    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
