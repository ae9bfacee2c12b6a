"""The orchestration on an up-to-date workspace, and `make demo` on a fresh clone: wall times of whole commands."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import timed


def bench_up_to_date(workspace: Path, repeats: int) -> dict:
    """`dvc repro` and `reflow run` wall time on `workspace` when it is up to date; skipped (None) otherwise."""
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


def bench_demo(repo: Path) -> dict:
    """`make demo` wall time on a fresh clone of `repo` (20+ minutes)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "clone", "-q", str(repo), tmp], check=True)
        t0 = time.perf_counter()
        res = subprocess.run(["make", "demo"], cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    return {"make_demo_s": wall if res.returncode == 0 else None, "make_demo_ok": res.returncode == 0}
