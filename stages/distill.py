"""`distill`: a one-step student, `z0 -> z0 + v(z0, 0)`, from the pairs of the chosen (straightest) model.

The source model (`distill.source`: rf1, rf@k or seqrf) is integrated with Euler (segment by segment
for seqrf) from per-sample noise to make the pairs, kept in the output beside the student. The student
may be smaller than the source (its own depth and width, initialised from the source where shapes
match). With `per_segment` (source seqrf) it takes one step per segment instead, SeqRF's distillation.
It is measured like every velocity model, on the held-out teacher pairs, so its one-step error sits
next to 1-RF's and k-RF's.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from models.dit import load_dit
from models.lpips import LPIPSLoss
from models.vae import load_vae
from reflow.rectified import OneStepDistillObjective, SegmentObjective, velocity_field
from reflow.samplers import euler, time_grid
from reflow.seeds import per_sample_noise, sample_seeds
from reflow.seqrf import segment_endpoints, seqrf_sample, seqrf_sampler
from runtime.context import StageContext
from runtime.devices import generation_device
from runtime.main import stage_main
from runtime.pairs import generate_pairs, segment_rows, segment_schema
from runtime.spec import StageSpec
from runtime.velocity import (
    evaluate_and_save,
    held_out_pairs,
    teacher_meta,
    train_velocity,
    velocity_model_like,
)
from storage.checkpoints import read_meta
from storage.datasets import open_dataset
from training.loader import batch_source

SPEC = StageSpec(
    name="distill",
    params=("compute", "distill"),
    deps={"source": "artifacts/${distill.source}", "teacher_pairs": "artifacts/teacher_pairs",
          "dit": "artifacts/dit", "vae": "artifacts/vae"},
    outs={"model": "artifacts/distill"},
    metrics="metrics/distill.json",
)
LPIPS_SIZE = 224  # decoded images are resized to this before LPIPS, as InstaFlow and SlimFlow do


def make_pairs(ctx: StageContext, meta: dict, source_dir, device: str) -> dict[str, float]:
    """The source model's pairs into the scratch area: (z0, z1), or SeqRF segment endpoints with `per_segment`."""
    p = ctx.params.distill
    shape, null = tuple(meta["latent_shape"]), meta["null_label"]
    source = load_dit(source_dir).to(device).eval()
    boundaries = read_meta(source_dir).get("boundaries")  # a SeqRF source integrates segment by segment
    k = 1 if boundaries is None else len(boundaries) - 1
    per_segment_steps = max(1, p.solver_steps // k)
    segment_times = None if boundaries is None else [
        time_grid(a, b, per_segment_steps) for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)]

    @torch.inference_mode()
    def make_batch(start: int, stop: int) -> dict[str, np.ndarray]:
        seeds = sample_seeds(p.seed, start, stop)
        y = np.arange(start, stop, dtype=np.int64) % meta["num_classes"]
        z0 = per_sample_noise(seeds, shape).to(device)
        def field_for(rows):
            return velocity_field(source, torch.from_numpy(y[rows]).to(device), null_label=null)
        rows = {"label": y, "seed": np.asarray(seeds, dtype=np.int64)}
        if p.per_segment:
            segment = np.arange(start, stop) % k
            x_start, x_end = segment_endpoints(field_for, z0, segment, segment_times)
            return {**rows, **segment_rows(x_start, x_end, segment, boundaries)}
        everyone = np.arange(len(y))
        z1 = (euler(field_for(everyone), z0, p.solver_steps) if boundaries is None else
              seqrf_sample(field_for(everyone), z0, boundaries, steps_per_segment=per_segment_steps))
        return {**rows, "z0": z0.float().cpu().numpy(), "z1": z1.x.float().cpu().numpy()}

    schema = segment_schema(shape) if p.per_segment else {"z0": (shape, "float32"), "z1": (shape, "float32")}
    schema |= {"label": ((), "int64"), "seed": ((), "int64")}
    attrs = {"source": p.source, "solver": "euler", "solver_steps": p.solver_steps, "per_segment": p.per_segment,
             "base_seed": p.seed, **({"boundaries": boundaries} if boundaries else {}), **meta}
    writer, stats = generate_pairs(ctx, n_rows=p.num_samples, shard_rows=min(256, p.num_samples), batch_size=256,
                                   attrs=attrs, make_batch=make_batch, desc="distillation pairs", schema=schema)
    if ctx.is_main:
        writer.finalize(ctx.scratch / "distill_pairs.zarr")
    ctx.barrier()  # every process trains on them
    return stats


def lpips_on_decoded(ctx: StageContext, meta: dict, device: str):
    """`(prediction, z1) -> LPIPS` of the VAE decodings, from local weight files (None when not configured)."""
    p = ctx.params.distill
    if p.lpips_backbone is None:
        return None
    lpips = LPIPSLoss(ctx.root / p.lpips_backbone, ctx.root / p.lpips_lin, net=p.lpips_net).to(device)
    vae = load_vae(ctx.dep("vae")).to(device).eval().requires_grad_(False)
    scale = meta["scale_factor"]

    def decode(z: torch.Tensor) -> torch.Tensor:  # LPIPS's networks expect ImageNet-sized inputs
        image = vae.decode(z / scale).sample.clamp(-1, 1)
        return F.interpolate(image, size=(LPIPS_SIZE, LPIPS_SIZE), mode="bilinear", align_corners=False)

    def perceptual(prediction: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = decode(z1)
        return lpips(decode(prediction), target)

    return perceptual


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.distill, ctx.params.compute
    device = generation_device(compute)
    meta = teacher_meta(ctx.dep("teacher_pairs"), ctx.dep("dit"))
    source_dir = ctx.dep("source") / "transformer"
    # The pairs are finished in the scratch area, so a kill during training never regenerates them.
    pairs_path = ctx.scratch / "distill_pairs.zarr"
    stats = {} if pairs_path.exists() else make_pairs(ctx, meta, source_dir, device)
    pairs = open_dataset(pairs_path, kind="pairs")
    data = batch_source(pairs, [name for name in pairs.names if name not in ("seed", "segment")], compute.seed,
                        ram_budget_gb=compute.ram_budget_gb)
    _, eval_pairs = held_out_pairs(ctx.dep("teacher_pairs") / "pairs.zarr", meta, p.eval_samples)
    student, copied = velocity_model_like(
        ctx.dep("dit"), init_from=source_dir if p.init_from_source else None, seed=compute.seed,
        num_layers=p.student_num_layers, attention_head_dim=p.student_attention_head_dim)
    sampler, extra = euler, {}
    if p.per_segment:
        boundaries = [float(b) for b in pairs.attrs["boundaries"]]
        objective = SegmentObjective(null_label=meta["null_label"], label_dropout=p.label_dropout, loss=p.loss,
                                     one_step=True)
        sampler = seqrf_sampler(boundaries)  # the student's own schedule: a whole number of steps per segment
        extra = {"boundaries": boundaries}
    else:
        objective = OneStepDistillObjective(null_label=meta["null_label"], label_dropout=p.label_dropout,
                                            loss=p.loss, perceptual=lpips_on_decoded(ctx, meta, device),
                                            perceptual_weight=p.lpips_weight)
    result = train_velocity(ctx, p, compute, student, data, objective, desc="distill")
    n_params = sum(q.numel() for q in result.ema.parameters())
    metrics = evaluate_and_save(ctx, p, result, eval_pairs, vae_dir=ctx.dep("vae"), kind="distilled",
                                sampler=sampler, move_in={"pairs.zarr": pairs_path},
                                meta={**meta, **extra, "source": p.source, "per_segment": p.per_segment,
                                      "one_step": not p.per_segment, "parameters": n_params})
    return {**metrics, **stats, "student_parameters": float(n_params), "tensors_from_source": float(copied)}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
