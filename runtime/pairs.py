"""Generating a coupling shard by shard: the loop shared by every pair stage (`teacher_pairs`, `reflow_pairs@k`,
`seqrf_pairs`, `distill_pairs`).

Rows are produced by `make_batch(start, stop)` from per-sample seeds, so any shard can be regenerated
bit for bit. Finished shards live in the stage's scratch directory; a rerun after a kill regenerates
only the unfinished ones, and the dataset is moved into the output directory once, when complete.
With several processes (`compute.num_processes`), each writes its share of the unfinished shards into
the same scratch dataset and the main process finalizes it: the same bytes as one process would write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from runtime.context import StageContext
from runtime.devices import generation_autocast
from storage.atomic import atomic_dir
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
) -> dict[str, float]:
    """Write every shard of `n_rows` rows into the scratch area, then the dataset into `out/pairs.zarr`.

    In every process of the stage: each generates its share of the unfinished shards, and all wait until
    every shard is on disk. The main process then writes the output in one atomic rename, with whatever
    `also(folder)` adds beside the pairs. Returns the throughput.
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
    for shard in mine:
        start, stop = writer.shard_range(shard)
        parts: dict[str, list[np.ndarray]] = {column: [] for column in schema}
        for b in range(start, stop, batch_size):
            e = min(b + batch_size, stop)
            with generation_autocast(ctx.params.compute):
                batch = make_batch(b, e)
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
            if also is not None:
                also(tmp)
    return stats
