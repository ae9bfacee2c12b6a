"""Which stages run at once, and on what: the pipeline flow's scheduler.

A stage starts as soon as every one of its upstream stages has finished, while fewer than
`scheduler.concurrency` stages run. Each running stage holds a *slot*, the devices it may use:

- CUDA: `compute.num_processes` GPUs of its own, through `CUDA_VISIBLE_DEVICES`; there are as many
  slots as whole groups of GPUs, so a stage never shares a GPU.
- CPU, `cpu_threads: shared`: every stage keeps its usual threads (`compute.num_threads`, or every core)
  and threads that wait sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`). Two stages then share the
  cores without the spin-wait thrash of two OpenMP pools (measured here: 0.3 training steps/s each
  instead of 15.8 alone; with passive waiting 8.6 + 8.2), and every number is bitwise what a serial run
  gives, because a stage's thread count never depends on what else runs (torch's CPU kernels change their
  summation order with the thread count).
- CPU, `cpu_threads: split`: each stage gets cores / concurrency threads (`REFLOW_CORES`), which runs
  parallel branches faster (1 thread each: 14.4 + 14.0 steps/s against 15.8 for one stage on 2) but makes
  results depend on the concurrency.

`run_dag` is independent of Prefect: `submit(stage, slot, upstream)` starts a stage and returns a future.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

ENV_CORES = "REFLOW_CORES"  # the cores a stage may use (runtime.devices.cores); unset: all of them


@dataclass(frozen=True)
class Slot:
    """What one running stage may use: the variables its process gets."""

    name: str
    env: dict[str, str] = field(default_factory=dict)


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out: `CUDA_VISIBLE_DEVICES`, else what `nvidia-smi -L` lists (no torch or
    CUDA initialisation in the flow's process)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def stage_slots(scheduler: Any, compute: Any, gpus: list[str] | None = None,
                cpu_count: int | None = None) -> list[Slot]:
    """The slots for `scheduler.concurrency` stages at once on this machine (at least one)."""
    gpus = visible_gpus() if gpus is None and compute.device != "cpu" else (gpus or [])
    if gpus:
        per = compute.num_processes
        if len(gpus) < per:
            raise ValueError(f"compute.num_processes is {per} but only {len(gpus)} GPU(s) are visible "
                             f"({','.join(gpus)}); lower compute.num_processes or set compute.device: cpu")
        groups = [gpus[i:i + per] for i in range(0, len(gpus) - per + 1, per)]
        return [Slot(f"cuda:{','.join(g)}", {"CUDA_VISIBLE_DEVICES": ",".join(g)})
                for g in groups[:scheduler.concurrency]]
    n = scheduler.concurrency
    if scheduler.cpu_threads == "split":
        cores = max(1, (cpu_count or os.cpu_count() or 1) // n)
        return [Slot(f"cpu{i}", {ENV_CORES: str(cores), "OMP_WAIT_POLICY": "PASSIVE"}) for i in range(n)]
    return [Slot(f"cpu{i}", {"OMP_WAIT_POLICY": "PASSIVE"}) for i in range(n)]


class StagesFailed(RuntimeError):
    def __init__(self, failures: dict[str, BaseException]):
        self.failures = failures
        first = next(iter(failures.values()))
        super().__init__(str(first) if len(failures) == 1 else
                         f"{len(failures)} stages failed ({', '.join(failures)}); the first: {first}")


def run_dag(order: list[str], graph: dict[str, list[str]], slots: list[Slot],
            submit: Callable[[str, Slot, list[Any]], Any], wait_first: Callable[[Iterable[Any]], Any],
            on_start: Callable[[str, Slot], None] | None = None) -> dict[str, Any]:
    """Run the stages of `order` (a topological order of `graph`: stage -> upstream stages), each when its
    upstream stages have finished and a slot is free, in `order`'s order among the ready ones.

    `submit(stage, slot, upstream results)` returns a future (`.result()` raises the stage's failure);
    `wait_first(futures)` returns one that has finished. After a failure no new stage starts; the ones
    running finish (their work is kept by DVC), then `StagesFailed` is raised. Returns {stage: result}."""
    results: dict[str, Any] = {}
    running: dict[Any, tuple[str, Slot]] = {}
    free = list(slots)
    pending = list(order)
    failures: dict[str, BaseException] = {}
    while pending or running:
        if not failures:
            for stage in [s for s in pending if all(u in results for u in graph[s])]:
                if not free:
                    break
                slot = free.pop(0)
                pending.remove(stage)
                if on_start:
                    on_start(stage, slot)
                running[submit(stage, slot, [results[u] for u in graph[stage]])] = (stage, slot)
        if not running:
            break  # a failure stopped the rest, or `order` was not topological
        done = wait_first(list(running))
        stage, slot = running.pop(done)
        free = sorted([*free, slot], key=lambda s: slots.index(s))  # lowest slot first: runs are repeatable
        try:
            results[stage] = done.result()
        except BaseException as exc:  # noqa: BLE001 - every stage's failure is reported, the first re-raised
            failures[stage] = exc
    if failures:
        raise StagesFailed(failures)
    missing = [s for s in pending if s not in results]
    if missing:
        raise ValueError(f"stages {missing} never became ready: their upstream stages are not in the order")
    return results
