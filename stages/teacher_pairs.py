"""`teacher_pairs`: the coupling (z0, z1) that 1-RF straightens.

Every sample has its own seed; its noise `z0` is drawn from that seed alone and stored next to the
teacher's deterministic DDIM result `z1`, its label and the seed. Without the stored `z0` the pairs
are just synthetic data, and "reflow" degenerates into plain flow matching (METHOD.md).
Generation is written shard by shard into the scratch area: an interrupted run resumes at the first
unfinished shard and produces exactly the pairs an uninterrupted run would.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from reflow.data import save_grid
from reflow.models import decode_latents, dit_epsilon, load_dit, load_vae
from reflow.samplers import ddim, guided, per_sample_noise, sample_seeds
from stages.common import StageContext, StageSpec, stage_main
from storage.atomic import atomic_dir
from storage.checkpoints import read_meta
from storage.datasets import ShardedWriter, open_dataset

SPEC = StageSpec(
    name="teacher_pairs",
    params=("compute", "teacher_pairs"),
    deps={"dit": "artifacts/dit", "vae": "artifacts/vae"},
    outs={"pairs": "artifacts/teacher_pairs"},
    metrics="metrics/teacher_pairs.json",
)


def balanced_labels(start: int, stop: int, num_classes: int) -> np.ndarray:
    """Sample i gets class i mod K: every shard is class-balanced and labels need no RNG."""
    return np.arange(start, stop, dtype=np.int64) % num_classes


@torch.inference_mode()
def generate(model, meta: dict, seeds: list[int], labels: np.ndarray, *, steps: int, guidance: float,
             device: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(z0, z1, nfe) for one batch: DDIM from each sample's own noise, guided on every channel."""
    shape = tuple(meta["latent_shape"])
    z0 = per_sample_noise(seeds, shape)
    y = torch.from_numpy(labels).to(device)
    field = guided(lambda x, t, c: dit_epsilon(model, x, t, c), y, null_label=meta["null_label"],
                   scale=guidance)
    res = ddim(field, z0.to(device), steps=steps, **meta["ddpm"])
    return z0, res.x.float().cpu(), res.nfe


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.teacher_pairs, ctx.params.compute
    device = "cuda" if compute.device != "cpu" and torch.cuda.is_available() else "cpu"
    meta = read_meta(ctx.dep("dit"))
    model = load_dit(ctx.dep("dit")).to(device).eval()
    vae = load_vae(ctx.dep("vae")).to(device).eval()  # loaded up front: fail before generating, not after
    shape = tuple(meta["latent_shape"])
    attrs = {"teacher": "ddim", "ddim_steps": p.ddim_steps, "guidance_scale": p.guidance_scale,
             "base_seed": p.seed, "scale_factor": meta["scale_factor"], "num_classes": meta["num_classes"],
             "null_label": meta["null_label"], "time_convention": "t=0 noise z0, t=1 data z1"}
    writer = ShardedWriter(
        ctx.scratch / "pairs.zarr", n_rows=p.num_samples, shard_rows=p.shard_size,
        schema={"z0": (shape, "float32"), "z1": (shape, "float32"), "label": ((), "int64"),
                "seed": ((), "int64")},
        kind="pairs", attrs=attrs, **ctx.attrs())
    pending = writer.pending()
    nfe_per_sample, t0, generated = 0, time.perf_counter(), 0
    bar = tqdm(total=p.num_samples, initial=p.num_samples - sum(
        writer.shard_range(i)[1] - writer.shard_range(i)[0] for i in pending), desc="teacher pairs",
        unit="pair", mininterval=1.0)
    for shard in pending:
        start, stop = writer.shard_range(shard)
        parts: dict[str, list[np.ndarray]] = {"z0": [], "z1": [], "label": [], "seed": []}
        for b in range(start, stop, p.batch_size):
            e = min(b + p.batch_size, stop)
            seeds = sample_seeds(p.seed, b, e)
            labels = balanced_labels(b, e, meta["num_classes"])
            z0, z1, nfe = generate(model, meta, seeds, labels, steps=p.ddim_steps,
                                   guidance=p.guidance_scale, device=device)
            nfe_per_sample = nfe
            for k, v in (("z0", z0.numpy()), ("z1", z1.numpy()), ("label", labels),
                         ("seed", np.asarray(seeds, dtype=np.int64))):
                parts[k].append(v)
            bar.update(e - b)
            generated += e - b
        writer.write_shard(shard, {k: np.concatenate(v) for k, v in parts.items()})
    bar.close()
    elapsed = time.perf_counter() - t0
    out = ctx.out("pairs")
    with atomic_dir(out) as tmp:
        writer.finalize(tmp / "pairs.zarr")
        # Labels are i mod K, so a grid K wide shows one class per column.
        n_grid = min(p.grid_samples, p.num_samples)
        z1 = torch.from_numpy(open_dataset(tmp / "pairs.zarr", kind="pairs").read("z1", 0, n_grid))
        save_grid(decode_latents(vae, z1, meta["scale_factor"]).numpy(), tmp / "grid.png",
                  nrow=min(meta["num_classes"], 16))
    ctx.log_artifact(out / "grid.png", "samples")
    metrics = {"pairs": p.num_samples, "nfe_per_sample": nfe_per_sample,
               "generated_this_run": generated}
    if generated:
        metrics["pairs_per_s"] = generated / elapsed
    return metrics


def main() -> int:
    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
