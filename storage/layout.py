"""How a dataset sits in zarr v3: names, dtypes, inner chunks, shards, codecs, and which files must exist.

Chosen for integrity and for DVC (which is slow with many small files):

* every array is sharded; an inner chunk is a run of whole rows of at least ~1 MiB
  (``ceil(1 MiB / bytes_per_row)`` rows, capped at ``n_rows``), a shard is a multiple of the inner
  chunk aiming at ~64 MiB, so a dataset is at most a few hundred files;
* inner chunks are encoded bytes -> zstd(level 3) -> crc32c and the shard index carries its own
  crc32c, so a flipped byte raises on read instead of returning wrong numbers;
* shards are always written, even when all zeros, and every shard file is checked to exist
  (:func:`_check_complete`), because zarr silently reads a missing chunk as fill values.

:class:`DatasetError` is what every dataset module raises (``storage.locations``, ``storage.datasets``,
``storage.sharded``).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

CHUNK_TARGET_BYTES = 1 << 20  # inner chunks >= 1 MiB: whole-chunk reads are ~50x faster than random rows
SHARD_TARGET_BYTES = 64 << 20  # shards ~64 MiB: few files for DVC, still cheap to rewrite on resume
ZSTD_LEVEL = 3
PROGRESS_FILE = "progress.json"  # a ShardedWriter's progress, inside the group while it is unfinished
_LOCK_FILE = "progress.lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_NAMES = {"zarr.json", PROGRESS_FILE, _LOCK_FILE}


class DatasetError(ValueError):
    """A dataset is missing, malformed, corrupt or not what the caller expected."""


def _err(path: str | Path, msg: str) -> DatasetError:
    return DatasetError(f"dataset {path}: {msg}")


def _little(dt: np.dtype[Any]) -> np.dtype[Any]:
    """Little-endian form of a dtype: the one byte order hashes and stored files use."""
    return dt.newbyteorder("<") if dt.byteorder in "<>=" else dt


def _canon_dtype(path: Path, name: str, dtype: Any) -> np.dtype[Any]:
    """Numeric/bool dtypes only, little-endian (what zarr's bytes codec stores)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise _err(path, f"array {name!r}: invalid dtype {dtype!r} ({e})") from e
    if dt.kind not in "biufc":
        raise _err(path, f"array {name!r}: dtype {dt} unsupported; expected a bool/int/uint/float/complex dtype")
    return _little(dt)


def _check_name(path: Path, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED_NAMES:
        raise _err(
            path,
            f"invalid array name {name!r}; expected letters, digits, '_', '.', '-' "
            f"(not starting with '_', '.' or '-', and not one of {sorted(_RESERVED_NAMES)})",
        )


def _row_bytes(row_shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    return int(math.prod(row_shape)) * dtype.itemsize


def _min_chunk_rows(row_bytes: int) -> int:
    """Fewest whole rows that reach the ~1 MiB inner-chunk target."""
    return max(1, math.ceil(CHUNK_TARGET_BYTES / row_bytes)) if row_bytes > 0 else 1 << 30


def _auto_layout(n_rows: int, row_bytes: int) -> tuple[int, int]:
    """(inner chunk rows, shard rows) for a one-shot write of ``n_rows`` rows."""
    chunk = max(1, min(_min_chunk_rows(row_bytes), n_rows))
    per_shard = max(1, SHARD_TARGET_BYTES // max(1, chunk * row_bytes))
    shard = chunk * min(per_shard, max(1, math.ceil(n_rows / chunk)))
    return chunk, shard

def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _writer_layout(
    schema: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]], shard_rows: int
) -> tuple[int, dict[str, int]]:
    """Effective shard rows and per-array inner chunk rows for :class:`storage.sharded.ShardedWriter`.

    All arrays share the shard row count (a shard index means the same rows everywhere). The
    array with the widest rows sets the base chunk ``c = ceil(1 MiB / bytes_per_row)``; the
    requested ``shard_rows`` is rounded up to a multiple of ``c`` (or left alone if it is below
    ``c``, in which case one inner chunk is the whole shard). Every other array gets the smallest
    divisor of the shard rows that reaches 1 MiB (or the whole shard).
    """
    base = min(_min_chunk_rows(_row_bytes(rs, dt)) for rs, dt in schema.values())
    eff = shard_rows if base >= shard_rows else math.ceil(shard_rows / base) * base
    divs = _divisors(eff)
    chunks = {}
    for name, (rs, dt) in schema.items():
        want = min(_min_chunk_rows(_row_bytes(rs, dt)), eff)
        chunks[name] = next(d for d in divs if d >= want)
    return eff, chunks


def _create_array(
    group: zarr.Group,
    name: str,
    n_rows: int,
    row_shape: tuple[int, ...],
    dtype: np.dtype[Any],
    chunk_rows: int,
    shard_rows: int,
) -> zarr.Array:
    row_chunk = tuple(max(1, d) for d in row_shape)  # zarr needs chunk dims >= 1, even for empty dims
    return group.create_array(
        name,
        shape=(n_rows, *row_shape),
        dtype=dtype,
        chunks=(chunk_rows, *row_chunk),
        shards=(shard_rows, *row_chunk),
        serializer=BytesCodec(),
        compressors=[ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()],
        fill_value=0,
        # Always write shards, even all-zero ones, so that "file missing" always means damage.
        config={"write_empty_chunks": True},
    )


def _shard_rows_of(arr: zarr.Array) -> int:
    return int((arr.shards or arr.chunks)[0])


def _shard_keys(arr: zarr.Array, row_shard: int | None = None) -> list[str]:
    """Store keys (relative to the array dir) of every shard file, or of one row-shard."""
    shard_shape = arr.shards or arr.chunks
    grid = [math.ceil(s / c) for s, c in zip(arr.shape, shard_shape, strict=True)]
    if any(g == 0 for g in grid):
        return []
    axes: list[range | list[int]] = [range(g) for g in grid]
    if row_shard is not None:
        axes[0] = [row_shard]
    enc = arr.metadata.chunk_key_encoding
    return [enc.encode_chunk_key(tuple(c)) for c in itertools.product(*axes)]


def _check_complete(
    path: Path | str, name: str, arr: zarr.Array, has_key: Callable[[str], bool] | None = None
) -> None:
    """Every shard file implied by shape and shard size must exist (zarr reads gaps as zeros).

    ``has_key`` answers for a key relative to the dataset (a URL's listing); default: a local file test.
    """
    if has_key is None:
        local = Path(path)
        has_key = lambda key: (local / key).is_file()  # noqa: E731
    missing = [k for k in _shard_keys(arr) if not has_key(f"{name}/{k}")]
    if missing:
        shown = ", ".join(f"{name}/{k}" for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise _err(
            path,
            f"array {name!r} is incomplete: {len(missing)} of {len(_shard_keys(arr))} shard files "
            f"missing ({shown}{more}); expected all shards of shape {tuple(arr.shape)} in shards of "
            f"{tuple(arr.shards or arr.chunks)}. Re-run the producing stage.",
        )

