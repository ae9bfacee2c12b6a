"""`distill_pairs`: the pairs a one-step student learns from, made by the straightest model of the chain.

The source model (`distill.source`: rf1, rf@k or seqrf) is integrated with Euler (segment by segment for
seqrf) from per-sample noise, `distill.solver_steps` steps in all. With `distill.per_segment` the rows are
SeqRF segment endpoints instead, row i in segment `i mod K`. Rows are seeded per sample, sharded and
resumable like every coupling.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from models.dit import load_dit
from reflow.rectified import velocity_field
from reflow.samplers import Euler, time_grid
from reflow.seeds import balanced_labels, per_sample_noise, sample_seeds
from reflow.seqrf import Segmented, segment_endpoints
from runtime.chains import chain_of, source_key, suffix
from runtime.context import StageContext
from runtime.devices import generation_device
from runtime.main import chain_stage_main
from runtime.pairs import generate_pairs, pair_schema, segment_rows, segment_schema
from runtime.spec import StageSpec
from runtime.velocity import teacher_meta
from storage.checkpoints import read_meta


def spec(chain: str = "") -> StageSpec:
    """A chain's student pairs (runtime/chains.py): from `distill.source`, or `distill.classic_source`."""
    name = f"distill_pairs{suffix(chain)}"
    return StageSpec(
        name=name,
        params=("compute", "distill"),
        deps={"source": f"artifacts/${{distill.{source_key(chain)}}}", "teacher_pairs": "artifacts/teacher_pairs",
              "dit": "artifacts/dit"},
        outs={"pairs": f"artifacts/{name}"},
        metrics=f"metrics/{name}.json",
    )


SPEC = spec()


def run(ctx: StageContext) -> dict:
    p = ctx.params.distill
    chain = chain_of(ctx.spec.name)
    source_name = getattr(p, source_key(chain))
    per_segment = p.per_segment and not chain  # SeqRF, the only per-segment source, is the teacher chain's
    device = generation_device(ctx.params.compute)
    meta = teacher_meta(ctx)
    shape, null = tuple(meta["latent_shape"]), meta["null_label"]
    source_dir = ctx.dep("source") / "transformer"
    source = load_dit(source_dir).to(device).eval()
    boundaries = read_meta(source_dir).get("boundaries")  # a SeqRF source integrates segment by segment
    k = 1 if boundaries is None else len(boundaries) - 1
    sampler, steps = (Euler(), p.solver_steps) if boundaries is None else (Segmented(tuple(boundaries)),
                                                                            max(1, p.solver_steps // k) * k)

    @torch.inference_mode()
    def make_batch(start: int, stop: int) -> dict[str, np.ndarray]:
        seeds = sample_seeds(p.seed, start, stop)
        y = balanced_labels(start, stop, meta["num_classes"])
        z0 = per_sample_noise(seeds, shape).to(device)

        def field_for(rows):
            return velocity_field(source, torch.from_numpy(y[rows]).to(device), null_label=null)

        rows = {"label": y, "seed": np.asarray(seeds, dtype=np.int64)}
        if per_segment:
            segment = np.arange(start, stop) % k
            segment_times = [time_grid(a, b, steps // k) for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)]
            x_start, x_end = segment_endpoints(field_for, z0, segment, segment_times)
            return {**rows, **segment_rows(x_start, x_end, segment, boundaries)}
        z1 = sampler(field_for(np.arange(len(y))), z0, steps).x
        return {**rows, "z0": z0.float().cpu().numpy(), "z1": z1.float().cpu().numpy()}

    attrs = {"source": source_name, "solver": "euler", "solver_steps": p.solver_steps, "per_segment": per_segment,
             "base_seed": p.seed, **({"boundaries": boundaries} if boundaries else {}), **meta}
    return generate_pairs(ctx, n_rows=p.num_samples, shard_rows=min(p.shard_size, p.num_samples),
                          batch_size=p.pairs_batch_size, attrs=attrs, make_batch=make_batch, desc=ctx.spec.name,
                          schema=segment_schema(shape) if per_segment else pair_schema(shape), out=ctx.out("pairs"),
                          drop_farthest=p.drop_farthest)


def main(argv: list[str] | None = None) -> int:
    return chain_stage_main("distill_pairs", spec, run, "the classic chain's, from distill.classic_source", argv)


if __name__ == "__main__":
    sys.exit(main())
