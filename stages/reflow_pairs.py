"""`reflow_pairs@k`: the coupling for round k, made by the round k-1 model (`python -m stages.reflow_pairs K MODEL`;
`reflow_rounds` in params maps each round to that model).

Directions (SlimFlow): `from_z0` integrates the previous flow from per-sample noise to data;
`from_z1` inverts real latents back to noise along the same flow (t from 1 to 0); `random_paired`
pairs real latents with independent noise and uses no model at all. Rows are seeded per sample and
written shard by shard, resumable like the teacher's pairs.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from models.dit import load_dit
from reflow.rectified import inverted_pairs, reflow_pairs, velocity_field
from reflow.samplers import solver
from reflow.seeds import balanced_labels, per_sample_noise, sample_seeds
from runtime.chains import ROUND_KEY, parse_round
from runtime.context import StageContext
from runtime.devices import generation_device
from runtime.main import stage_main
from runtime.pairs import generate_pairs, pair_schema
from runtime.spec import StageSpec
from runtime.velocity import teacher_meta
from storage.datasets import open_dataset


def spec(k: int | str, model: str) -> StageSpec:
    """Round k's pairs, made by the stage `model` (the previous round's, `reflow_rounds[k]`)."""
    return StageSpec(
        name=f"reflow_pairs@{k}",
        params=("compute", "reflow"),
        deps={"model": f"artifacts/{model}", "latents": "artifacts/extract",
              "teacher_pairs": "artifacts/teacher_pairs", "dit": "artifacts/dit"},
        outs={"pairs": f"artifacts/reflow_pairs@{k}"},
        metrics=f"metrics/reflow_pairs@{k}.json",
        note="one stage per reflow round: reflow_pairs@2, @3, ... (params: reflow_rounds)",
    )


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.reflow, ctx.params.compute
    device = generation_device(compute)
    meta = teacher_meta(ctx)
    shape, null = tuple(meta["latent_shape"]), meta["null_label"]
    model = load_dit(ctx.dep("model") / "transformer").to(device).eval()
    latents = open_dataset(ctx.dep("latents") / "latents.zarr", kind="latents")
    real_z1, real_y = latents.load("z1"), latents.load("labels").astype(np.int64)
    solve = solver(p.solver, rtol=p.rtol, atol=p.atol)
    nfe = {"per_sample": 0.0}

    @torch.inference_mode()
    def make_batch(start: int, stop: int) -> dict[str, np.ndarray]:
        seeds = sample_seeds(p.seed, start, stop)
        idx = np.arange(start, stop) % len(real_z1)  # real latents, cycled when more pairs are asked for
        if p.direction == "from_z0":
            y = balanced_labels(start, stop, meta["num_classes"])
            field = velocity_field(model, torch.from_numpy(y).to(device), null_label=null)
            z0, z1, nfe["per_sample"] = reflow_pairs(field, per_sample_noise(seeds, shape).to(device), solve,
                                                     p.solver_steps)
        elif p.direction == "from_z1":
            y = real_y[idx]
            field = velocity_field(model, torch.from_numpy(y).to(device), null_label=null)
            z0, z1, nfe["per_sample"] = inverted_pairs(field, torch.from_numpy(real_z1[idx]).to(device), solve,
                                                       p.solver_steps)
        else:  # random_paired: real latents with independent noise, no model
            y, z1, z0 = real_y[idx], torch.from_numpy(real_z1[idx]), per_sample_noise(seeds, shape)
        return {"z0": z0.float().cpu().numpy(), "z1": z1.float().cpu().numpy(), "label": y,
                "seed": np.asarray(seeds, dtype=np.int64)}

    attrs = {"round": parse_round(ctx.spec.name.split("@")[1])[0], "from_model": str(ctx.spec.deps["model"]),
             "direction": p.direction, "solver": p.solver, "solver_steps": p.solver_steps, "rtol": p.rtol,
             "atol": p.atol, "base_seed": p.seed, **meta}
    stats = generate_pairs(ctx, n_rows=p.num_samples, shard_rows=p.shard_size, batch_size=p.pairs_batch_size,
                           attrs=attrs, make_batch=make_batch, desc=ctx.spec.name, schema=pair_schema(shape),
                           out=ctx.out("pairs"), drop_farthest=p.drop_farthest)
    return {**stats, "nfe_per_sample": float(nfe["per_sample"])}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or ROUND_KEY.fullmatch(args[0]) is None:
        print("usage: python -m stages.reflow_pairs K MODEL   (K: the reflow round, 2 or more, K_classic in the "
              "classic chain; MODEL: reflow_rounds[K])", file=sys.stderr)
        return 2
    return stage_main(spec(*args), run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
