"""Training benchmarks: our loop against a plain PyTorch one on the same DiT, and the loader that feeds them."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import device_of, latent_shape, make_dit, timed
from runtime.params import Params

LossFactory = Callable[[torch.nn.Module], Callable]  # model -> its DDPM objective


def _our_loop_rate(params: Params, data: dict, objective: LossFactory, steps: int) -> float:
    """Images/s of `training.loop.train` (accelerate, EMA, clipping, logging) on a fresh DiT."""
    from training.loop import TrainConfig, make_accelerator, train

    p, device = params.dit, device_of(params)
    model = make_dit(params)
    cfg = TrainConfig(steps=steps, batch_size=p.batch_size, lr=p.lr, ema_decay=p.ema_decay,
                      grad_clip=p.grad_clip, log_every=max(1, steps // 4), checkpoint_every=10**9)
    accelerator = make_accelerator(params.compute.device, params.compute.mixed_precision)
    t0 = time.perf_counter()
    train(model, objective(model), data, cfg, accelerator, desc="bench: our loop")
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * p.batch_size / (time.perf_counter() - t0)


def _plain_loop_rate(params: Params, data: dict, objective: LossFactory, steps: int) -> float:
    """The loop anyone would write: the same model, objective, AdamW, clipping and EMA, nothing else."""
    p, device = params.dit, device_of(params)
    n = len(data["label"])
    model = make_dit(params).to(device).train()
    ema = [q.detach().clone() for q in model.parameters()]
    loss_fn = objective(model)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, fused=device == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    z1, label = data["z1"].to(device), data["label"].to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=params.compute.mixed_precision == "bf16")
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (p.batch_size,), device=device)
        with autocast:
            loss = loss_fn(model, {"z1": z1[idx], "label": label[idx]}, gen, step)
        loss.backward()
        if p.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [q.detach() for q in model.parameters()], 1 - p.ema_decay)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * p.batch_size / (time.perf_counter() - t0)


def bench_training(params: Params, steps: int, repeats: int) -> dict:
    """Images/s of our loop and of the plain one on the same data, interleaved run by run, and their ratio."""
    from models.dit import null_label
    from reflow.diffusion import DDPMObjective, make_ddpm_scheduler

    p = params.dit
    n = 1438
    data = {"z1": torch.randn(n, *latent_shape(params)), "label": torch.randint(0, 10, (n,))}
    scheduler = make_ddpm_scheduler(p.num_train_timesteps, p.beta_start, p.beta_end)

    def objective(model):
        return DDPMObjective(scheduler, null_label=null_label(model), label_dropout=p.label_dropout,
                             learn_sigma=p.learn_sigma)

    def ours() -> float:
        return _our_loop_rate(params, data, objective, steps)

    def plain() -> float:
        return _plain_loop_rate(params, data, objective, steps)

    # Interleaved, so drift of the machine's speed hits both loops alike.
    ours(), plain()
    runs_ours, runs_plain = [], []
    for _ in range(repeats):
        runs_ours.append(ours())
        runs_plain.append(plain())
    ratio = [a / b for a, b in zip(runs_ours, runs_plain, strict=True)]
    return {"dit_train_images_per_s": {"median": statistics.median(runs_ours), "runs": runs_ours},
            "plain_loop_images_per_s": {"median": statistics.median(runs_plain), "runs": runs_plain},
            "our_loop_vs_plain": {"median": statistics.median(ratio), "runs": ratio}}


def bench_loader(params: Params, repeats: int) -> dict:
    """Batches exactly as the trainer takes them (`training.loader`): from RAM (epoch-permuted gathers), and from a
    zarr dataset on disk chunk by chunk (`ChunkedSource`, what a dataset over `compute.ram_budget_gb` gets), 64k rows
    of the DiT's latents so that an epoch walks many chunks."""
    from storage.datasets import open_dataset, write_dataset
    from training.loader import ChunkedSource, InMemorySource

    b, shape = params.dit.batch_size, latent_shape(params)
    n = 1438
    in_ram = InMemorySource({"z1": torch.randn(n, *shape), "label": torch.randint(0, 10, (n,))}, 0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = 65536
        write_dataset(Path(tmp) / "latents.zarr", {"z1": np.random.default_rng(0).standard_normal(
            (rows, *shape), dtype=np.float32), "label": np.arange(rows) % 10}, kind="latents", producer="bench",
            params_hash="0")
        chunked = ChunkedSource(open_dataset(Path(tmp) / "latents.zarr", kind="latents"), ["z1", "label"], 0)

        def rate(source) -> Callable[[], float]:
            def run() -> float:
                t0, steps = time.perf_counter(), 2000
                for step in range(steps):
                    source.batch(step, b, 0, b)
                return steps * b / (time.perf_counter() - t0)
            return run

        return {"loader_samples_per_s": timed(rate(in_ram), repeats),
                "loader_chunked_samples_per_s": timed(rate(chunked), repeats)}
