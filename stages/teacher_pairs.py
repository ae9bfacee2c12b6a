"""`teacher_pairs`: the coupling (z0, z1) that 1-RF straightens.

Every sample has its own seed; its noise `z0` is drawn from that seed alone and stored next to the
teacher's deterministic result `z1`, its label and the seed: DDIM for the epsilon teacher, Euler or Heun on the
guided velocity ODE for a flow-matching one (`teacher_pairs.solver`); the pairs' attrs say which, with its
steps, guidance and NFE. Without the stored `z0` the pairs
are just synthetic data, and "reflow" degenerates into plain flow matching (docs/method.md, section 3).
Generation is written shard by shard into the scratch area: an interrupted run resumes at the first
unfinished shard and produces exactly the pairs an uninterrupted run would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from imagedata.grids import save_grid
from models.dit import DIT_SUBFOLDER, load_dit
from models.vae import VAE_SUBFOLDER, decode_latents, load_vae
from reflow.seeds import balanced_labels, per_sample_noise, sample_seeds
from runtime.context import StageContext, StageError
from runtime.devices import generation_device
from runtime.generator import teacher_generator, teacher_objective
from runtime.main import pipeline_stage_main
from runtime.pairs import generate_pairs, pair_schema
from runtime.spec import StageSpec
from storage.checkpoints import read_meta
from storage.datasets import open_dataset

SPEC = StageSpec(
    name="teacher_pairs",
    params=("compute", "teacher_pairs"),
    deps={"dit": "artifacts/dit", "vae": "artifacts/vae"},
    outs={"pairs": "artifacts/teacher_pairs"},
    metrics="metrics/teacher_pairs.json",
)


@torch.inference_mode()
def generate(model, meta: dict, seeds: list[int], labels: np.ndarray, *, steps: int, guidance: float,
             device: str, solver: str = "ddim") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(z0, z1, nfe) for one batch: the teacher's ODE (`solver`) from each sample's own noise, guided on every
    channel."""
    shape = tuple(meta["latent_shape"])
    z0 = per_sample_noise(seeds, shape)
    teacher = teacher_generator(model, meta, Path("artifacts/dit") / DIT_SUBFOLDER, guidance)
    res = teacher.sample(z0.to(device), torch.from_numpy(labels).to(device), steps=steps, solver=solver)
    return z0, res.x.float().cpu(), res.nfe


def nfe_per_sample(solver: str, steps: int, guidance: float) -> int:
    """Network evaluations per pair, counted as `reflow.samplers` counts them: DDIM and Euler one per step, Heun
    `2 steps - 1` (its last step is Euler), a guided call twice."""
    calls = 2 * steps - 1 if solver == "heun" else steps
    return calls * (2 if guidance != 1 else 1)


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.teacher_pairs, ctx.params.compute
    device = generation_device(compute)
    meta = read_meta(ctx.dep("dit") / DIT_SUBFOLDER)
    model = load_dit(ctx.dep("dit") / DIT_SUBFOLDER).to(device).eval()
    # Loaded up front: fail before generating, not after.
    vae = load_vae(ctx.dep("vae") / VAE_SUBFOLDER).to(device).eval()
    shape = tuple(meta["latent_shape"])
    objective = teacher_objective(meta)
    try:  # the params check this against dit.objective; the teacher on disk is what counts
        solver = p.solver_for(objective)
    except ValueError as exc:
        raise StageError(f"{ctx.dep('dit') / DIT_SUBFOLDER}: {exc}") from None
    steps = p.steps_for(solver)
    expected_nfe = nfe_per_sample(solver, steps, p.guidance_scale)
    attrs = {"teacher_objective": objective, "solver": solver, "steps": steps, "nfe_per_sample": expected_nfe,
             "guidance_scale": p.guidance_scale, "base_seed": p.seed, "scale_factor": meta["scale_factor"],
             "num_classes": meta["num_classes"], "null_label": meta["null_label"],
             "time_convention": "t=0 noise z0, t=1 data z1"}
    prompts = meta.get("prompts")
    schema = pair_schema(shape)
    if prompts:
        attrs["prompts"] = prompts
        schema["guidance"] = ((), "float32")
    nfe = {}

    def make_batch(start: int, stop: int) -> dict[str, np.ndarray]:
        seeds = sample_seeds(p.seed, start, stop)
        labels = balanced_labels(start, stop, meta["num_classes"])
        z0, z1, nfe["per_sample"] = generate(model, meta, seeds, labels, steps=steps, solver=solver,
                                             guidance=p.guidance_scale, device=device)
        row = {"z0": z0.numpy(), "z1": z1.numpy(), "label": labels, "seed": np.asarray(seeds, dtype=np.int64)}
        if prompts:  # a text teacher: each row's prompt is line `label` of the table, and its guidance is stored
            row["guidance"] = np.full(len(labels), p.guidance_scale, dtype=np.float32)
        return row

    def grid(folder: Path) -> None:  # labels are i mod K, so a grid K wide shows one class per column
        z1 = torch.from_numpy(open_dataset(folder / "pairs.zarr", kind="pairs").read(
            "z1", 0, min(p.grid_samples, p.num_samples)))
        save_grid(decode_latents(vae, z1, meta["scale_factor"]).numpy(), folder / "grid.png",
                  nrow=meta.get("grid_columns", min(meta["num_classes"], 16)))

    stats = generate_pairs(ctx, n_rows=p.num_samples, shard_rows=p.shard_size, batch_size=p.batch_size, attrs=attrs,
                           make_batch=make_batch, desc="teacher pairs", schema=schema,
                           out=ctx.out("pairs"), also=grid, drop_farthest=p.drop_farthest)
    if not ctx.is_main:
        return stats
    ctx.log_artifact(ctx.out("pairs") / "grid.png", "samples")
    return {**stats, "nfe_per_sample": nfe.get("per_sample", expected_nfe)}


def main(argv: list[str] | None = None) -> int:
    return pipeline_stage_main(SPEC, run, distributed=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
