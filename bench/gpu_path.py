"""The GPU path of `make bench`: each knob of the DiT training step against its alternative (bf16 vs fp32, TF32,
SDPA vs math attention, fused vs foreach AdamW, `torch.compile`), model FLOP utilisation, and the teacher's
forwards in fp32 / TF32 / bf16."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import device_of, latent_shape, make_dit, timed
from runtime.params import Params

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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _variants(device: str, compile_model: bool) -> dict[str, tuple]:
    """The knobs this device can measure: TF32 only on CUDA, `torch.compile` unless it is skipped."""
    return {k: v for k, v in KNOBS.items() if (device == "cuda" or k != "fp32_tf32") and (compile_model or not v[4])}


def _make_train_step(params: Params, z1: torch.Tensor, label: torch.Tensor, scheduler, precision: str,
                     attention: str, adamw: str, tf32: bool, compiled: bool) -> Callable[[int], None]:
    """One plain DiT training step (as `bench_training`'s plain loop, without the EMA) on a fresh model."""
    from models.dit import null_label
    from reflow.diffusion import DDPMObjective

    p, device, n = params.dit, device_of(params), len(label)
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


def _first_steps(
    knobs: dict[str, tuple], make_step: Callable[..., Callable[[int], None]], device: str
) -> tuple[dict[str, Callable[[int], None]], dict[str, float | str]]:
    """Each variant's step function and the seconds of its first step (compiling, kernel selection, allocator
    warm-up), or why it is unavailable."""
    steps_fns, first_s = {}, {}
    for name, knob in knobs.items():
        try:
            steps_fns[name] = make_step(*knob)
            t0 = time.perf_counter()
            steps_fns[name](0)  # the first step: compiling, kernel selection, allocator warm-up
            _sync(device)
            first_s[name] = time.perf_counter() - t0
        except Exception as exc:  # e.g. a torch build without fused AdamW for this device: report, go on
            steps_fns.pop(name, None)
            first_s[name] = f"unavailable: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
    return steps_fns, first_s


def _interleaved_rates(steps_fns: dict[str, Callable[[int], None]], steps: int, batch_size: int, repeats: int,
                       device: str) -> dict[str, dict]:
    """Images/s of every variant: the median and every run, after one unrecorded run each."""

    def rate(step: Callable[[int], None]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        _sync(device)
        return steps * batch_size / (time.perf_counter() - t0)

    for step in steps_fns.values():  # one unrecorded run each
        rate(step)
    runs: dict[str, list[float]] = {name: [] for name in steps_fns}
    for _ in range(repeats):  # interleaved, so drift of the machine's speed hits every variant alike
        for name, step in steps_fns.items():
            runs[name].append(rate(step))
    return {name: {"median": statistics.median(r), "runs": r} for name, r in runs.items()}


def _gpu_summary(knobs: dict[str, tuple], images_per_s: dict[str, dict], first_s: dict[str, float | str],
                 flops: dict, peak: float | None, batch_size: int, steps: int) -> dict:
    """Every variant's figures, each knob's speedup against its alternative, compile cost and MFU."""
    med = {name: v["median"] for name, v in images_per_s.items()}

    def ratio(a: str, b: str) -> float | None:
        return med[a] / med[b] if a in med and b in med else None

    out = {"knobs": {k: dict(zip(("precision", "attention", "adamw", "tf32", "compile"), v, strict=True))
                     for k, v in knobs.items()},
           "images_per_s": images_per_s, "first_step_s": first_s,
           "bf16_vs_fp32": ratio("bf16_sdpa_fused", "fp32"), "tf32_vs_fp32": ratio("fp32_tf32", "fp32"),
           "sdpa_vs_math_attention": ratio("bf16_sdpa_fused", "bf16_math_attention"),
           "fused_vs_foreach_adamw": ratio("bf16_sdpa_fused", "bf16_foreach_adamw"),
           "compile_vs_eager": ratio("bf16_compiled", "bf16_sdpa_fused"),
           "flops": flops, "peak_tflops": peak, "batch_size": batch_size, "steps": steps}
    if "bf16_compiled" in med and isinstance(first_s.get("bf16_compiled"), float):
        # Compile time: the compiled first step beyond what a steady-state step takes.
        out["compile_s"] = first_s["bf16_compiled"] - batch_size / med["bf16_compiled"]
        # Steps of training after which compiling has paid for itself (None when it does not pay).
        saved = batch_size / med["bf16_sdpa_fused"] - batch_size / med["bf16_compiled"]
        out["compile_break_even_steps"] = out["compile_s"] / saved if saved > 0 else None
    if peak:
        out["mfu"] = {name: r * flops["train_gflop_per_image"] * 1e9 / (peak * 1e12) for name, r in med.items()}
    return out


def bench_gpu_path(params: Params, steps: int, repeats: int, peak: float | None, compile_model: bool) -> dict:
    """Images/s of one plain DiT training step (as `bench_training`'s plain loop) under each set of knobs."""
    from reflow.diffusion import make_ddpm_scheduler

    p, device = params.dit, device_of(params)
    n = 1438
    z1, label = torch.randn(n, *latent_shape(params), device=device), torch.randint(0, 10, (n,), device=device)
    scheduler = make_ddpm_scheduler(p.num_train_timesteps, p.beta_start, p.beta_end)
    knobs = _variants(device, compile_model)

    def make_step(*knob) -> Callable[[int], None]:
        return _make_train_step(params, z1, label, scheduler, *knob)

    # A cold compile, as a stage's first run pays it: inductor's on-disk cache would otherwise turn a repeat
    # benchmark's 70 s into 2 s (the cache lives in /tmp/torchinductor_<user> between processes).
    cache = tempfile.TemporaryDirectory(prefix="bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    steps_fns, first_s = _first_steps(knobs, make_step, device)
    cache.cleanup()
    images_per_s = _interleaved_rates(steps_fns, steps, p.batch_size, repeats, device)
    flops = dit_flops_per_image(make_dit(params).config)
    return _gpu_summary(knobs, images_per_s, first_s, flops, peak, p.batch_size, steps)


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

