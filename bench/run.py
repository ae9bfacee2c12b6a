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

This file is the entry point (`make bench`); the benchmarks live beside it by family: bench/loops.py (training
and the loader), bench/generation.py (pairs, sampling, pair memory), bench/gpu_path.py, bench/workspace.py (whole
commands), with bench/common.py (timing, params, models) and bench/report.py (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the loops' progress bars would drown the table

import torch  # noqa: E402

from bench.common import device_of, load_with_overrides, make_dit, peak_rss_mib  # noqa: E402
from bench.generation import bench_generation, bench_pair_memory, pair_memory_child  # noqa: E402
from bench.gpu_path import bench_generation_precision, bench_gpu_path, dit_flops_per_image, peak_tflops  # noqa: E402
from bench.loops import bench_loader, bench_training  # noqa: E402
from bench.report import table  # noqa: E402
from bench.workspace import bench_demo, bench_up_to_date  # noqa: E402
from runtime.params import Params  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def measure(args: argparse.Namespace, params: Params, params_file: str, peak: float | None) -> dict:
    """Every figure, in the order the table shows them."""
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
        figures |= bench_demo(ROOT)
    figures["gpu_path"] = bench_gpu_path(params, args.gpu_steps, args.repeats, peak, not args.no_compile)
    figures["gpu_path"]["generation"] = bench_generation_precision(params, args.repeats)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params_file = args.preset or args.params
    params = load_with_overrides(params_file, args.set)
    if args.child_pairs:
        pair_memory_child(params, args.child_pairs, Path(args.child_out))
        print(peak_rss_mib())
        return 0
    torch.manual_seed(0)
    device = device_of(params)
    figures = measure(args, params, params_file, peak_tflops(device, args.peak_tflops))
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
