"""Generating a coupling shard by shard: the loop shared by every pair stage (`teacher_pairs`, `reflow_pairs@k`,
`seqrf_pairs`, `distill_pairs`).

Rows are produced by `make_batch(start, stop)` from per-sample seeds, so any shard can be regenerated
bit for bit. Finished shards live in the stage's scratch directory; a rerun after a kill regenerates
only the unfinished ones, and the dataset is moved into the output directory once, when complete.
With several processes (`compute.num_processes`), each writes its share of the unfinished shards into
the same scratch dataset and the main process finalizes it: the same bytes as one process would write.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from measure.pairs import SAMPLE_ROWS, CurvatureTally, pair_diagnostics
from reflow.curvature import recording_curvature
from runtime.context import StageContext
from runtime.devices import generation_autocast
from storage.atomic import atomic_dir
from storage.datasets import REQUIRED_ATTRS, open_dataset, write_dataset
from storage.sharded import ShardedWriter

Schema = dict[str, tuple[tuple[int, ...], str]]
BatchFn = Callable[[int, int], dict[str, np.ndarray]]


def pair_schema(shape: tuple[int, ...]) -> Schema:
    """The columns of a coupling: noise, its end point, the label and the row's seed."""
    return {"z0": (shape, "float32"), "z1": (shape, "float32"), "label": ((), "int64"), "seed": ((), "int64")}


def segment_schema(shape: tuple[int, ...]) -> Schema:
    """The columns of a SeqRF segment coupling (`seqrf_pairs`, per-segment `distill_pairs`) with label and seed."""
    return {"x_start": (shape, "float32"), "x_end": (shape, "float32"), "t_start": ((), "float32"),
            "t_end": ((), "float32"), "segment": ((), "int64"), "label": ((), "int64"), "seed": ((), "int64")}


def segment_rows(x_start, x_end, segment: np.ndarray, boundaries: list[float]) -> dict[str, np.ndarray]:
    """Rows of `segment_schema` from endpoint tensors and each row's segment index."""
    b = np.asarray(boundaries, dtype=np.float32)
    return {"x_start": x_start.float().cpu().numpy(), "x_end": x_end.float().cpu().numpy(),
            "t_start": b[segment], "t_end": b[segment + 1], "segment": segment.astype(np.int64)}


def generate_pairs(
    ctx: StageContext, *, n_rows: int, shard_rows: int, batch_size: int, schema: Schema, attrs: dict,
    make_batch: BatchFn, desc: str, out: Path, also: Callable[[Path], None] | None = None,
    drop_farthest: float = 0.0,
) -> dict[str, float]:
    """Write every shard of `n_rows` rows into the scratch area, then the dataset into `out/pairs.zarr`.

    In every process of the stage: each generates its share of the unfinished shards, and all wait until
    every shard is on disk. The main process then writes the output in one atomic rename, with whatever
    `also(folder)` adds beside the pairs, keeping all rows but the `drop_farthest` fraction with the largest
    `||z1 - z0||` when it is above 0 (Re-MeanFlow's filter). Returns the throughput, and from the main process
    the pair set's diagnostics (`diagnose`) and the curvature of the paths its solvers integrated while making
    its rows (`measure.pairs.CurvatureTally`, the dropped rows' included).
    """
    writer = ShardedWriter(ctx.scratch / "pairs.zarr", n_rows=n_rows, shard_rows=shard_rows, schema=schema,
                           kind="pairs", attrs=attrs, **ctx.attrs())
    pending = writer.pending()
    ctx.barrier()  # every process splits the same list: all have read it before any writes a shard
    mine = pending[ctx.rank :: ctx.world]

    def rows(shards: list[int]) -> int:
        return sum(writer.shard_range(i)[1] - writer.shard_range(i)[0] for i in shards)

    todo = rows(pending)
    bar = tqdm(total=n_rows - todo + rows(mine), initial=n_rows - todo, desc=desc, unit="pair", mininterval=1.0,
               disable=not ctx.is_main)
    t0 = time.perf_counter()
    curvature = CurvatureTally()
    for shard in mine:
        start, stop = writer.shard_range(shard)
        parts: dict[str, list[np.ndarray]] = {column: [] for column in schema}
        for b in range(start, stop, batch_size):
            e = min(b + batch_size, stop)
            with generation_autocast(ctx.params.compute), recording_curvature() as paths:
                batch = make_batch(b, e)
            curvature.add(paths)
            for column, value in batch.items():
                parts[column].append(value)
            bar.update(e - b)
        writer.write_shard(shard, {k: np.concatenate(v) for k, v in parts.items()})
    bar.close()
    ctx.barrier()  # the dataset is complete only when every process's shards are
    elapsed = time.perf_counter() - t0
    stats = {"pairs": float(n_rows), "generated_this_run": float(todo)}
    if todo:
        stats["pairs_per_s"] = todo / elapsed
    if ctx.is_main:  # the other processes wrote their shards; the main one writes the output
        with atomic_dir(out) as tmp:
            writer.finalize(tmp / "pairs.zarr")
            if drop_farthest > 0:
                stats |= drop_farthest_pairs(tmp / "pairs.zarr", drop_farthest, ctx.attrs())
            if also is not None:
                also(tmp)
        stats |= diagnose(out / "pairs.zarr") | curvature.stats()
    return stats


def nearest_rows(z0: np.ndarray, z1: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the rows kept, in row order; every row's `||z1 - z0||`): all but the `fraction` of pairs farthest
    apart (Re-MeanFlow's filter; ties kept in row order)."""
    distance = np.linalg.norm((z1 - z0).reshape(len(z0), -1).astype(np.float64), axis=1)
    n_keep = len(z0) - int(round(fraction * len(z0)))
    return np.sort(np.argsort(distance, kind="stable")[:n_keep]), distance


def drop_farthest_pairs(path: Path, fraction: float, made_by: dict[str, str]) -> dict[str, float]:
    """Rewrite the pairs at `path` without the `fraction` of rows whose `||z1 - z0||` is largest (ties kept in
    row order); the kept rows keep their order, the attrs say what was dropped. Loads the set into RAM."""
    pairs = open_dataset(path, kind="pairs")
    arrays = {name: pairs.load(name) for name in pairs.names}
    keep, distance = nearest_rows(arrays["z0"], arrays["z1"], fraction)
    n_keep = len(keep)
    threshold = float(distance[keep].max())
    attrs = {k: v for k, v in pairs.attrs.items() if k not in REQUIRED_ATTRS}
    attrs |= {"dropped_farthest": fraction, "distance_threshold": threshold, "rows_generated": pairs.n_rows}
    write_dataset(path, {name: a[keep] for name, a in arrays.items()}, kind="pairs", attrs=attrs, **made_by)
    return {"pairs": float(n_keep), "pairs_dropped": float(pairs.n_rows - n_keep), "distance_threshold": threshold}


def diagnose(path: Path) -> dict[str, float]:
    """The pair set's diagnostics (`measure.pairs`) on its first rows, with a warning when its ends look swapped
    (a warning, not a refusal: inverted real latents, `reflow.direction: from_z1`, are only close to Gaussian)."""
    pairs = open_dataset(path, kind="pairs")
    start, end = ("z0", "z1") if "z0" in pairs.names else ("x_start", "x_end")
    n = min(SAMPLE_ROWS, pairs.n_rows)
    stats = pair_diagnostics(pairs.read(start, 0, n), pairs.read(end, 0, n))
    if start == "x_start":  # segment endpoints: neither end is the noise, only the distances mean anything
        stats = {k: v for k, v in stats.items() if k.startswith("pairs_distance")}
    elif stats["pairs_swapped"]:
        print(f"warning: {path}: z1 looks more like standard Gaussian noise than z0 does (Gaussian gap "
              f"{stats['pairs_z1_gaussian_gap']:.3f} against {stats['pairs_z0_gaussian_gap']:.3f}): are the pairs "
              "written the wrong way round?", file=sys.stderr)
    return stats
