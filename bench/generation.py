"""Generation benchmarks: teacher pairs and sampling speed, and the peak memory of a streamed pair generation."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import device_of, latent_shape, make_dit, timed
from runtime.params import Params

# The memory probe runs in a child process of the entry point (its `--child-pairs`): peak RSS is per process.
ENTRY_POINT = Path(__file__).resolve().with_name("run.py")


@torch.inference_mode()
def bench_generation(params: Params, n: int, repeats: int) -> dict:
    from models.vae import build_vae, decode_latents
    from reflow.rectified import velocity_field
    from reflow.samplers import Euler
    from reflow.seeds import per_sample_noise, sample_seeds
    from stages.teacher_pairs import generate

    device = device_of(params)
    teacher = make_dit(params).to(device).eval()
    meta = {"latent_shape": list(latent_shape(params)), "null_label": 10,
            "ddpm": {"num_train_timesteps": params.dit.num_train_timesteps, "beta_start": params.dit.beta_start,
                     "beta_end": params.dit.beta_end}}
    steps, guidance = params.teacher_pairs.ddim_steps, params.teacher_pairs.guidance_scale
    labels = np.arange(n) % 10
    seeds = sample_seeds(0, 0, n)
    out: dict = {}

    def pairs() -> float:
        t0 = time.perf_counter()
        for i in range(0, n, params.teacher_pairs.batch_size):
            generate(teacher, meta, seeds[i : i + params.teacher_pairs.batch_size],
                     labels[i : i + params.teacher_pairs.batch_size], steps=steps, guidance=guidance, device=device)
        return n / (time.perf_counter() - t0)

    out["teacher_pairs_per_s"] = timed(pairs, repeats)
    vae = build_vae(latent_channels=params.vae.latent_channels, block_out_channels=params.vae.block_out_channels,
                    layers_per_block=params.vae.layers_per_block,
                    norm_num_groups=params.vae.norm_num_groups).to(device).eval()
    z0 = per_sample_noise(seeds, latent_shape(params)).to(device)
    y = torch.from_numpy(labels).to(device)
    velocity = make_dit(params, learn_sigma=False).to(device).eval()
    models = {"velocity": velocity}
    if params.distill.student_num_layers or params.distill.student_attention_head_dim:
        models["student"] = make_dit(params, learn_sigma=False,
                                     num_layers=params.distill.student_num_layers or params.dit.num_layers,
                                     attention_head_dim=params.distill.student_attention_head_dim
                                     or params.dit.attention_head_dim).to(device).eval()
    for name, model in models.items():
        for nfe in sorted({1, steps}):
            def sample(model=model, nfe=nfe) -> float:
                t0 = time.perf_counter()
                x = Euler()(velocity_field(model, y, null_label=10), z0, nfe).x
                decode_latents(vae, x, 1.0)
                return n / (time.perf_counter() - t0)

            out[f"sample_{name}_nfe{nfe}_images_per_s"] = timed(sample, repeats)
    return out


def pair_memory_child(params: Params, n: int, out: Path) -> None:
    """One pair generation streamed shard by shard to zarr, as `teacher_pairs` does (2 DDIM steps: memory
    does not depend on the step count)."""
    from reflow.seeds import sample_seeds
    from stages.teacher_pairs import generate
    from storage.sharded import ShardedWriter

    teacher = make_dit(params).eval()
    shape = latent_shape(params)
    meta = {"latent_shape": list(shape), "null_label": 10, "ddpm": {"num_train_timesteps": 1000}}
    writer = ShardedWriter(out / "pairs.zarr", n_rows=n, shard_rows=256, kind="pairs", producer="bench",
                           params_hash="bench", schema={"z0": (shape, "float32"), "z1": (shape, "float32"),
                                                        "label": ((), "int64"), "seed": ((), "int64")})
    for i in writer.pending():
        start, stop = writer.shard_range(i)
        seeds, labels = sample_seeds(0, start, stop), np.arange(start, stop) % 10
        z0, z1, _ = generate(teacher, meta, seeds, labels, steps=2, guidance=2.0, device="cpu")
        writer.write_shard(i, {"z0": z0.numpy(), "z1": z1.numpy(), "label": labels,
                               "seed": np.asarray(seeds, dtype=np.int64)})
    writer.finalize(out / "final.zarr")


def bench_pair_memory(params_file: str, n: int, overrides: list[str]) -> dict:
    """Peak resident memory (MiB) of a pair generation of N and of 10N pairs, each in its own process."""
    peaks = {}
    for rows in (n, 10 * n):
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([sys.executable, str(ENTRY_POINT), "--params", params_file, "--child-pairs", str(rows),
                                  "--child-out", tmp, *(f"--set={o}" for o in overrides)],
                                 capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(res.stderr[-2000:])
            peaks[rows] = float(res.stdout.split()[-1])
    return {"pair_generation_peak_mib": {"n": n, "at_n": peaks[n], "at_10n": peaks[10 * n],
                                         "ratio_10n_vs_n": peaks[10 * n] / peaks[n]}}
