"""`make bench`: how fast the pipeline's loops are and how much memory they hold, in one JSON file.

Every figure is the median of `--repeats` runs (after a warm-up), measured on the models that the given
params file describes (built here at random initialisation: speed does not depend on the weights):

- DiT training images/s of our loop (`training.loop.train`: accelerate, EMA, clipping, logging) and of a plain
  PyTorch loop over the same model, objective, batch and EMA; their ratio is our loop's overhead;
- teacher pair generation pairs/s (guided DDIM at `teacher_pairs.ddim_steps`, as the stage does it);
- sampling images/s (decoded) of a velocity model at NFE 1 and at the teacher's NFE, of the DDIM teacher,
  and of the distilled student when it is smaller;
- the loader's samples/s (in RAM, and chunk by chunk from zarr) against what the trainer consumes;
- `dvc repro` and `reflow run` on an up-to-date workspace (`--workspace`, when it has been run);
- peak memory of pair generation at N and 10N pairs (a child process each, streaming shards to zarr);
- `make demo` wall time of a fresh clone (`--demo`; 20+ minutes, so off by default);
- the GPU path of the DiT training step, each knob against its alternative: bf16 autocast vs fp32, TF32 (CUDA),
  SDPA vs math attention, fused vs foreach AdamW, `torch.compile` (compile seconds and steady-state speedup), and
  model FLOP utilisation from FLOPs counted on the DiT's config against the device's dense bf16 peak.

`--preset presets/<file>.yaml` measures a GPU preset's models (e.g. DiT-B/2 at 256 px): the model figures and the
GPU path, without the CPU demo workspace's figures (pair memory, up-to-date runs). `--set dit.num_layers=2`
(repeatable) changes one key first, e.g. to check a preset at tiny size on a CPU.

Results go to `bench/results/bench.json` (with the machine, torch version and params hash) and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the loops' progress bars would drown the table

import numpy as np  # noqa: E402
import torch  # noqa: E402

from runtime.params import Params, load_params, parse_params  # noqa: E402


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: a child's ru_maxrss can carry the RSS of the
    parent it was forked from, VmHWM starts afresh with the new address space at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: KiB on Linux, bytes on macOS


def timed(fn: Callable[[], float], repeats: int, warmup: bool = True) -> dict:
    """`fn()` returns a rate; median and every run, after one unrecorded warm-up run."""
    if warmup:
        fn()
    runs = [fn() for _ in range(repeats)]
    return {"median": statistics.median(runs), "runs": runs}


def load_with_overrides(path: str, overrides: list[str]) -> Params:
    """The params file with `section.key=value` overrides (values read as YAML), validated like the file."""
    if not overrides:
        return load_params(path)
    from ruamel.yaml import YAML

    load_params(path)  # the file itself must be valid first
    yaml = YAML(typ="safe", pure=True)
    raw = yaml.load(Path(path).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in raw or not isinstance(raw[section], dict):
            raise SystemExit(f"--set {item!r}: expected section.key=value with a section of {path}")
        raw[section][name] = yaml.load(value)
    return parse_params(raw, Path(f"{path} with --set {' '.join(overrides)}"))


def device_of(params: Params) -> str:
    return "cuda" if params.compute.device != "cpu" and torch.cuda.is_available() else "cpu"


def latent_shape(params: Params) -> tuple[int, int, int]:
    down = 2 ** (len(params.vae.block_out_channels) - 1)
    size = params.data.resolution // down
    return params.vae.latent_channels, size, size


def make_dit(params: Params, num_classes: int = 10, **overrides):
    from models.dit import build_dit

    c, size, _ = latent_shape(params)
    p = params.dit
    kw = dict(sample_size=size, in_channels=c, num_classes=num_classes, patch_size=p.patch_size,
              num_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
              attention_head_dim=p.attention_head_dim, learn_sigma=p.learn_sigma)
    return build_dit(**(kw | overrides))


# ---------------------------------------------------------------------------------------------------------
# Training: our loop against a plain one
# ---------------------------------------------------------------------------------------------------------
def bench_training(params: Params, steps: int, repeats: int) -> dict:
    from models.dit import null_label
    from reflow.diffusion import DDPMObjective, make_ddpm_scheduler
    from training.loop import TrainConfig, make_accelerator, train

    p, device = params.dit, device_of(params)
    n = 1438
    data = {"z1": torch.randn(n, *latent_shape(params)), "label": torch.randint(0, 10, (n,))}
    scheduler = make_ddpm_scheduler(p.num_train_timesteps, p.beta_start, p.beta_end)

    def objective(model):
        return DDPMObjective(scheduler, null_label=null_label(model), label_dropout=p.label_dropout,
                             learn_sigma=p.learn_sigma)

    def ours() -> float:
        model = make_dit(params)
        cfg = TrainConfig(steps=steps, batch_size=p.batch_size, lr=p.lr, ema_decay=p.ema_decay,
                          grad_clip=p.grad_clip, log_every=max(1, steps // 4), checkpoint_every=10**9)
        accelerator = make_accelerator(params.compute.device, params.compute.mixed_precision)
        t0 = time.perf_counter()
        train(model, objective(model), data, cfg, accelerator, desc="bench: our loop")
        if device == "cuda":
            torch.cuda.synchronize()
        return steps * p.batch_size / (time.perf_counter() - t0)

    def plain() -> float:
        """The loop anyone would write: the same model, objective, AdamW, clipping and EMA, nothing else."""
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


# ---------------------------------------------------------------------------------------------------------
# Generation and sampling
# ---------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def bench_generation(params: Params, n: int, repeats: int) -> dict:
    from models.vae import build_vae, decode_latents
    from reflow.rectified import velocity_field
    from reflow.samplers import solve
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
                x = solve(velocity_field(model, y, null_label=10), z0, solver="euler", steps=nfe).x
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
            res = subprocess.run([sys.executable, __file__, "--params", params_file, "--child-pairs", str(rows),
                                  "--child-out", tmp, *(f"--set={o}" for o in overrides)],
                                 capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(res.stderr[-2000:])
            peaks[rows] = float(res.stdout.split()[-1])
    return {"pair_generation_peak_mib": {"n": n, "at_n": peaks[n], "at_10n": peaks[10 * n],
                                         "ratio_10n_vs_n": peaks[10 * n] / peaks[n]}}


# ---------------------------------------------------------------------------------------------------------
# The GPU path: each knob of the DiT training step against its alternative, and model FLOP utilisation
# ---------------------------------------------------------------------------------------------------------
# Dense bf16 tensor-core peak in TFLOP/s (NVIDIA datasheets, without sparsity), first match in the device name.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0),
                    ("L40S", 362.1))


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda":
        return None  # a CPU's peak depends on its vector units and clocks: pass --peak-tflops
    name = torch.cuda.get_device_name(0)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def dit_flops_per_image(config) -> dict:
    """Multiply-adds of one DiT forward and FLOPs of one trained image, counted from a diffusers DiT config.

    Per block: QKV and output projections 4 N D^2, the attention matrices 2 N^2 D, the MLP 8 N D^2 (ratio 4), and
    per image diffusers' per-block timestep MLP (256 -> D -> D) and adaLN modulation (D -> 6D); plus the patch
    embedding and the output layers. This gives the DiT paper's 23.0 G (B/2) and 118.6 G (XL/2) at 256 px, which
    count multiply-adds. Training is 3 forwards (the backward pass costs two) at 2 FLOP per multiply-add.
    """
    p, d, layers = config.patch_size, config.num_attention_heads * config.attention_head_dim, config.num_layers
    n = (config.sample_size // p) ** 2
    c_in, c_out = config.in_channels, config.out_channels or config.in_channels
    per_block = 12 * n * d * d + 2 * n * n * d + 7 * d * d + 256 * d
    macs = layers * per_block + n * p * p * c_in * d + 2 * d * d + n * d * p * p * c_out
    return {"tokens": n, "hidden": d, "forward_gmac": macs / 1e9, "train_gflop_per_image": 6 * macs / 1e9}


KNOBS = {  # name -> (precision, attention, adamw, tf32, compile); the first is the GPU recipe, eager
    "bf16_sdpa_fused": ("bf16", "sdpa", "fused", True, False),
    "fp32": ("fp32", "sdpa", "fused", False, False),
    "fp32_tf32": ("fp32", "sdpa", "fused", True, False),
    "bf16_math_attention": ("bf16", "math", "fused", True, False),
    "bf16_foreach_adamw": ("bf16", "sdpa", "foreach", True, False),
    "bf16_compiled": ("bf16", "sdpa", "fused", True, True),
}


def bench_gpu_path(params: Params, steps: int, repeats: int, peak: float | None, compile_model: bool) -> dict:
    """Images/s of one plain DiT training step (as `bench_training`'s plain loop) under each set of knobs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.dit import null_label
    from reflow.diffusion import DDPMObjective, make_ddpm_scheduler

    p, device = params.dit, device_of(params)
    n = 1438
    z1, label = torch.randn(n, *latent_shape(params), device=device), torch.randint(0, 10, (n,), device=device)
    scheduler = make_ddpm_scheduler(p.num_train_timesteps, p.beta_start, p.beta_end)
    knobs = {k: v for k, v in KNOBS.items() if (device == "cuda" or k != "fp32_tf32") and (compile_model or not v[4])}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def make_step(precision: str, attention: str, adamw: str, tf32: bool, compiled: bool) -> Callable[[int], None]:
        torch.manual_seed(0)
        model = make_dit(params).to(device).train()
        loss_fn = DDPMObjective(scheduler, null_label=null_label(model), label_dropout=p.label_dropout,
                                learn_sigma=p.learn_sigma)
        forward = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=p.lr, fused=adamw == "fused", foreach=adamw == "foreach")
        gen = torch.Generator(device=device).manual_seed(0)

        def step(i: int) -> None:
            if device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            idx = torch.randint(0, n, (p.batch_size,), device=device)
            attn = sdpa_kernel(SDPBackend.MATH) if attention == "math" else contextlib.nullcontext()
            with attn, torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = loss_fn(forward, {"z1": z1[idx], "label": label[idx]}, gen, i)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    # A cold compile, as a stage's first run pays it: inductor's on-disk cache would otherwise turn a repeat
    # benchmark's 70 s into 2 s (the cache lives in /tmp/torchinductor_<user> between processes).
    cache = tempfile.TemporaryDirectory(prefix="bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    steps_fns, first_s = {}, {}
    for name, knob in knobs.items():
        try:
            steps_fns[name] = make_step(*knob)
            t0 = time.perf_counter()
            steps_fns[name](0)  # the first step: compiling, kernel selection, allocator warm-up
            sync()
            first_s[name] = time.perf_counter() - t0
        except Exception as exc:  # e.g. a torch build without fused AdamW for this device: report, go on
            steps_fns.pop(name, None)
            first_s[name] = f"unavailable: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"

    def rate(step: Callable[[int], None]) -> float:
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        sync()
        return steps * p.batch_size / (time.perf_counter() - t0)

    cache.cleanup()
    for step in steps_fns.values():  # one unrecorded run each
        rate(step)
    runs: dict[str, list[float]] = {name: [] for name in steps_fns}
    for _ in range(repeats):  # interleaved, so drift of the machine's speed hits every variant alike
        for name, step in steps_fns.items():
            runs[name].append(rate(step))
    images_per_s = {name: {"median": statistics.median(r), "runs": r} for name, r in runs.items()}
    med = {name: v["median"] for name, v in images_per_s.items()}

    def ratio(a: str, b: str) -> float | None:
        return med[a] / med[b] if a in med and b in med else None

    flops = dit_flops_per_image(make_dit(params).config)
    out = {"knobs": {k: dict(zip(("precision", "attention", "adamw", "tf32", "compile"), v, strict=True))
                     for k, v in knobs.items()},
           "images_per_s": images_per_s, "first_step_s": first_s,
           "bf16_vs_fp32": ratio("bf16_sdpa_fused", "fp32"), "tf32_vs_fp32": ratio("fp32_tf32", "fp32"),
           "sdpa_vs_math_attention": ratio("bf16_sdpa_fused", "bf16_math_attention"),
           "fused_vs_foreach_adamw": ratio("bf16_sdpa_fused", "bf16_foreach_adamw"),
           "compile_vs_eager": ratio("bf16_compiled", "bf16_sdpa_fused"),
           "flops": flops, "peak_tflops": peak, "batch_size": p.batch_size, "steps": steps}
    if "bf16_compiled" in med and isinstance(first_s.get("bf16_compiled"), float):
        # Compile time: the compiled first step beyond what a steady-state step takes.
        out["compile_s"] = first_s["bf16_compiled"] - p.batch_size / med["bf16_compiled"]
        # Steps of training after which compiling has paid for itself (None when it does not pay).
        saved = p.batch_size / med["bf16_sdpa_fused"] - p.batch_size / med["bf16_compiled"]
        out["compile_break_even_steps"] = out["compile_s"] / saved if saved > 0 else None
    if peak:
        out["mfu"] = {name: r * flops["train_gflop_per_image"] * 1e9 / (peak * 1e12) for name, r in med.items()}
    return out


@torch.inference_mode()
def bench_generation_precision(params: Params, repeats: int) -> dict:
    """DiT forwards/s at the teacher's guided batch (cond + uncond rows) in fp32 (how pair generation and sampling
    run today), TF32 (CUDA) and bf16 autocast; pairs/s follow from the teacher's forwards per pair."""
    device, tp = device_of(params), params.teacher_pairs
    model = make_dit(params).to(device).eval()
    b = tp.batch_size * (2 if tp.guidance_scale != 1 else 1)
    x = torch.randn(b, *latent_shape(params), device=device)
    t, y = torch.full((b,), 500.0, device=device), torch.arange(b, device=device) % 10
    forwards_per_pair = tp.ddim_steps * (2 if tp.guidance_scale != 1 else 1)
    out: dict = {"batch": b, "forwards_per_pair": forwards_per_pair}
    for name, bf16, tf32 in (("fp32", False, False), ("fp32_tf32", False, True), ("bf16", True, True)):
        if name == "fp32_tf32" and device != "cuda":
            continue

        def rate(bf16=bf16, tf32=tf32) -> float:
            if device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
                torch.cuda.synchronize()
            t0, calls = time.perf_counter(), 3
            for _ in range(calls):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    model(x, timestep=t, class_labels=y)
            if device == "cuda":
                torch.cuda.synchronize()
            return calls * b / (time.perf_counter() - t0)

        out[f"{name}_forwards_per_s"] = timed(rate, repeats)
        out[f"{name}_pairs_per_s"] = out[f"{name}_forwards_per_s"]["median"] / forwards_per_pair
    out["bf16_vs_fp32"] = out["bf16_forwards_per_s"]["median"] / out["fp32_forwards_per_s"]["median"]
    return out


# ---------------------------------------------------------------------------------------------------------
# The orchestration on an up-to-date workspace
# ---------------------------------------------------------------------------------------------------------
def bench_up_to_date(workspace: Path, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(workspace)}
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=workspace, env=env, capture_output=True,
                            text=True)
    if "up to date" not in status.stdout:
        return {"dvc_repro_up_to_date_s": None, "reflow_run_up_to_date_s": None,
                "up_to_date_note": f"{workspace}: not up to date (run `make demo` first); skipped"}

    def wall(cmd: list[str]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            res = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
            return time.perf_counter() - t0
        return run

    return {"dvc_repro_up_to_date_s": timed(wall([sys.executable, "-m", "dvc", "repro"]), repeats),
            "reflow_run_up_to_date_s": timed(wall([sys.executable, "-m", "flows.cli", "run"]), repeats, warmup=False)}


def bench_demo() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "clone", "-q", str(ROOT), tmp], check=True)
        t0 = time.perf_counter()
        res = subprocess.run(["make", "demo"], cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    return {"make_demo_s": wall if res.returncode == 0 else None, "make_demo_ok": res.returncode == 0}


# ---------------------------------------------------------------------------------------------------------
TARGETS = {"our_loop_vs_plain": ">= 0.95", "loader_vs_trainer": ">= 20",
           "loader_chunked_vs_trainer": ">= 20", "dvc_repro_up_to_date_s": "<= 2 s",
           "reflow_run_up_to_date_s": "<= 15 s", "pair_generation_peak_mib": "10N within 10 % of N",
           "make_demo_s": "<= 1200 s with install", "dit_train_mfu": ">= 0.45 on H100/H200 (DiT-B/2, bf16)"}


def table(results: dict) -> str:
    rows = []
    for key, value in results["figures"].items():
        if key == "gpu_path":
            continue
        if isinstance(value, dict) and "median" in value:
            shown = f"{value['median']:.4g}"
        elif isinstance(value, float):
            shown = f"{value:.4g}"
        elif isinstance(value, dict) and "ratio_10n_vs_n" in value:
            shown = f"{value['at_n']:.0f} MiB at N={value['n']}, {value['at_10n']:.0f} MiB at 10N " \
                    f"(x{value['ratio_10n_vs_n']:.3f})"
        else:
            shown = str(value)
        rows.append((key, shown, TARGETS.get(key, "")))
    gpu = results["figures"].get("gpu_path")
    if gpu:
        def show(v) -> str:
            return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

        f = gpu["flops"]
        rows.append(("gpu_path: DiT", f"{f['tokens']} tokens x {f['hidden']} hidden, {f['forward_gmac']:.4g} GMAC "
                     f"forward, {f['train_gflop_per_image']:.4g} GFLOP per trained image, batch {gpu['batch_size']}",
                     ""))
        for name, v in gpu["images_per_s"].items():
            mfu = gpu.get("mfu", {}).get(name)
            rows.append((f"gpu_path: {name} images/s", f"{v['median']:.4g}"
                         + (f" (MFU {100 * mfu:.1f} % of {gpu['peak_tflops']:g} TFLOP/s)" if mfu else ""),
                         ">= 45 % MFU on H100/H200" if name == "bf16_sdpa_fused" and mfu else ""))
        for name, v in gpu["first_step_s"].items():
            if isinstance(v, str):
                rows.append((f"gpu_path: {name}", v, ""))
        for key in ("bf16_vs_fp32", "tf32_vs_fp32", "sdpa_vs_math_attention", "fused_vs_foreach_adamw",
                    "compile_vs_eager", "compile_s", "compile_break_even_steps"):
            if key in gpu:
                rows.append((f"gpu_path: {key}", show(gpu[key]), ""))
        g = gpu["generation"]
        for name in ("fp32", "fp32_tf32", "bf16"):
            if f"{name}_pairs_per_s" in g:
                rows.append((f"gpu_path: teacher pairs/s, {name}", f"{g[f'{name}_pairs_per_s']:.4g} "
                             f"({g[f'{name}_forwards_per_s']['median']:.4g} forwards/s at batch {g['batch']})", ""))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}  {('target ' + t) if t else ''}".rstrip() for k, v, t in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file describing the models")
    parser.add_argument("--preset", help="a GPU preset (presets/<file>.yaml): its models and the GPU path only")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key of the params (repeatable), e.g. to shrink a preset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--gpu-steps", type=int, default=10, help="training steps per GPU-path measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (25-80 s of compiling on CPU)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for model FLOP utilisation "
                        "(default: the table of H100/H200/A100/L40S on CUDA, none on CPU)")
    parser.add_argument("--pairs", type=int, default=256, help="N for generation speed and memory")
    parser.add_argument("--workspace", default=str(ROOT), help="an up-to-date pipeline for the dvc/reflow timings")
    parser.add_argument("--demo", action="store_true", help="also time `make demo` on a fresh clone (20+ min)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench.json"))
    parser.add_argument("--child-pairs", type=int, help=argparse.SUPPRESS)  # the memory probe's own process
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    params_file = args.preset or args.params
    params = load_with_overrides(params_file, args.set)
    if args.child_pairs:
        pair_memory_child(params, args.child_pairs, Path(args.child_out))
        print(peak_rss_mib())
        return 0
    torch.manual_seed(0)
    device = device_of(params)
    peak = peak_tflops(device, args.peak_tflops)
    figures: dict = {}
    figures |= bench_training(params, args.train_steps, args.repeats)
    flops = dit_flops_per_image(make_dit(params).config)
    figures["dit_train_gflop_per_image"] = flops["train_gflop_per_image"]
    figures["dit_train_mfu"] = (figures["dit_train_images_per_s"]["median"] * flops["train_gflop_per_image"] * 1e9
                                / (peak * 1e12) if peak else None)
    figures |= bench_loader(params, args.repeats)
    figures["loader_vs_trainer"] = (figures["loader_samples_per_s"]["median"]
                                    / figures["dit_train_images_per_s"]["median"])
    figures["loader_chunked_vs_trainer"] = (figures["loader_chunked_samples_per_s"]["median"]
                                            / figures["dit_train_images_per_s"]["median"])
    figures |= bench_generation(params, min(args.pairs, 256), args.repeats)
    if not args.preset:  # the CPU demo's own figures: a preset's workspace is not this one
        figures |= bench_pair_memory(params_file, args.pairs, args.set)
        figures |= bench_up_to_date(Path(args.workspace), args.repeats)
    if args.demo:
        figures |= bench_demo()
    figures["gpu_path"] = bench_gpu_path(params, args.gpu_steps, args.repeats, peak, not args.no_compile)
    figures["gpu_path"]["generation"] = bench_generation_precision(params, args.repeats)
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"},
        "params": params_file, "overrides": args.set, "repeats": args.repeats, "figures": figures,
        "peak_rss_mib": peak_rss_mib(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
