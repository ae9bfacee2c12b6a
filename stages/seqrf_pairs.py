"""`seqrf_pairs`: segment endpoints for Sequential Rectified Flow, carried by the 1-RF flow.

`[0, 1]` is cut into K segments, uniformly or adaptively (a dynamic program over a fine 1-RF
trajectory picks the boundaries that leave each segment straightest, reflow/seqrf.py). Row i belongs
to segment `i mod K` (every shard covers every segment). Its start point `x_start` at `t_start` is
real data noised to that time (`noised_data`, as SeqRF does) or the 1-RF flow's own trajectory from
the row's noise (`teacher_trajectory`); the 1-RF flow then carries it with Euler on the fine grid to
`x_end` at `t_end`. Rows are seeded per sample, sharded and resumable like every coupling.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from models.dit import load_dit
from reflow.rectified import interpolate, velocity_field
from reflow.samplers import time_grid
from reflow.seeds import balanced_labels, mix_seed, per_sample_noise, sample_seeds
from reflow.seqrf import segment_endpoints, snap_to_grid, trajectory_boundaries, uniform_boundaries
from runtime.context import StageContext
from runtime.devices import generation_device
from runtime.main import stage_main
from runtime.pairs import generate_pairs, segment_rows, segment_schema
from runtime.spec import StageSpec
from runtime.velocity import teacher_meta
from storage.datasets import open_dataset

SPEC = StageSpec(
    name="seqrf_pairs",
    params=("compute", "seqrf"),
    deps={"model": "artifacts/rf1", "latents": "artifacts/extract", "teacher_pairs": "artifacts/teacher_pairs",
          "dit": "artifacts/dit"},
    outs={"pairs": "artifacts/seqrf_pairs"},
    metrics="metrics/seqrf_pairs.json",
)

ADAPTIVE_PROBE = 64  # trajectories the boundary search averages over
# The probe's noise is its own per-sample stream, keyed by mix_seed(seqrf.seed, PROBE_STREAM): a base seed no
# pair row of this stage uses, and unlike `seed + 1` not the pair stream of a run whose seed is one higher.
PROBE_STREAM = 1


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.seqrf, ctx.params.compute
    device = generation_device(compute)
    meta = teacher_meta(ctx)
    shape, null, k = tuple(meta["latent_shape"]), meta["null_label"], p.segments
    model = load_dit(ctx.dep("model") / "transformer").to(device).eval()
    latents = open_dataset(ctx.dep("latents") / "latents.zarr", kind="latents")
    real_z1, real_y = latents.load("z1"), latents.load("labels").astype(np.int64)
    grid = time_grid(0.0, 1.0, p.teacher_steps)

    def flow(y: np.ndarray) -> object:
        return velocity_field(model, torch.from_numpy(y).to(device), null_label=null)

    if p.boundaries == "uniform":
        boundaries = uniform_boundaries(k)
    else:  # the fine 1-RF trajectory of a probe batch, from seeds no pair row uses
        y = balanced_labels(0, ADAPTIVE_PROBE, meta["num_classes"])
        z0 = per_sample_noise(sample_seeds(mix_seed(p.seed, PROBE_STREAM), 0, ADAPTIVE_PROBE), shape).to(device)
        boundaries = trajectory_boundaries(flow(y), z0, grid, k, min_length=p.min_segment)
    idx = snap_to_grid(boundaries, p.teacher_steps)
    boundaries = [grid[i] for i in idx]
    if ctx.is_main:
        print(f"seqrf boundaries ({p.boundaries}): {[round(b, 4) for b in boundaries]}")

    segment_times = [grid[i : j + 1] for i, j in zip(idx[:-1], idx[1:], strict=True)]

    @torch.inference_mode()
    def make_batch(start: int, stop: int) -> dict[str, np.ndarray]:
        seeds = sample_seeds(p.seed, start, stop)
        rows = np.arange(start, stop)
        segment = rows % k
        z0 = per_sample_noise(seeds, shape)
        if p.start == "noised_data":  # real latents (and their labels), cycled when more rows are asked for
            y = real_y[rows % len(real_z1)]
            data = torch.from_numpy(real_z1[rows % len(real_z1)])
            t = torch.tensor([boundaries[s] for s in segment], dtype=torch.float32)
            x_start = interpolate(z0, data, t).to(device)
        else:
            y, x_start = balanced_labels(start, stop, meta["num_classes"]), None
        x_start, x_end = segment_endpoints(lambda sel: flow(y[sel]), z0.to(device), segment, segment_times, x_start)
        return {**segment_rows(x_start, x_end, segment, boundaries), "label": y,
                "seed": np.asarray(seeds, dtype=np.int64)}

    attrs = {"from_model": "artifacts/rf1", "segments": k, "boundaries": boundaries, "boundary_rule": p.boundaries,
             "start": p.start, "teacher_steps": p.teacher_steps, "solver": "euler", "base_seed": p.seed, **meta}
    stats = generate_pairs(ctx, n_rows=p.num_samples, shard_rows=p.shard_size, batch_size=p.pairs_batch_size,
                           attrs=attrs, make_batch=make_batch, desc="seqrf_pairs", schema=segment_schema(shape),
                           out=ctx.out("pairs"))
    return {**stats, **{f"boundary_{i}": float(b) for i, b in enumerate(boundaries)}}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
