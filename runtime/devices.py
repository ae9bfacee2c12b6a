"""Where and at what precision a stage computes: CUDA or the CPU, autocast, threads."""

from __future__ import annotations

import os
from typing import Any

from runtime.params import ParamsView
from training.loop import enable_tf32

ENV_LAUNCH_DIR = "REFLOW_LAUNCH_DIR"  # set in launched processes: where they find their context and leave results


def uses_cuda(device: str) -> bool:
    """Whether `compute.device` means CUDA here: asked for (or `auto`) and present."""
    import torch

    return device != "cpu" and torch.cuda.is_available()


def generation_device(compute: Any) -> str:
    """Where sampling and pair generation run: CUDA when asked for (or `auto`) and present, else the CPU.

    In a launched process that is its own GPU (`cuda:<local rank>`), so N processes use N devices.
    """
    if not uses_cuda(compute.device):
        return "cpu"
    if os.environ.get(ENV_LAUNCH_DIR):
        from accelerate import PartialState

        return str(PartialState().device)
    return "cuda"


def generation_autocast(compute: Any):
    """The precision of sampling and pair generation: `compute.mixed_precision` as autocast (bf16/fp16 matmuls,
    the ODE state stays fp32), and TF32 for what stays fp32 on CUDA, as the training loops have it. With
    `mixed_precision: "no"` (the CPU default) it changes nothing, so pairs stay bitwise reproducible."""
    import contextlib

    import torch

    device = generation_device(compute)
    if device.startswith("cuda"):
        enable_tf32()
    if compute.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if compute.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.split(":")[0], dtype=dtype)


def cores() -> int:
    """The cores this stage may use: its share when the pipeline flow splits them between concurrent stages
    (`scheduler.cpu_threads: split`, flows/schedule.py), else every core of the machine."""
    return int(os.environ.get("REFLOW_CORES") or 0) or os.cpu_count() or 1


def set_threads(params: ParamsView, processes: int = 1) -> None:
    """`compute.num_threads`, or the stage's cores shared out among its processes."""
    import torch

    n = params.compute.num_threads if "compute" in params._sections else None
    torch.set_num_threads(n or max(1, cores() // processes))
