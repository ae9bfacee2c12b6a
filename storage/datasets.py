"""Datasets: zarr v3 groups of named arrays that share their first axis (rows).

Layout, chosen for integrity and for DVC (which is slow with many small files):

* every array is sharded; an inner chunk is a run of whole rows of at least ~1 MiB
  (``ceil(1 MiB / bytes_per_row)`` rows, capped at ``n_rows``), a shard is a multiple of the inner
  chunk aiming at ~64 MiB, so a dataset is at most a few hundred files;
* inner chunks are encoded bytes -> zstd(level 3) -> crc32c and the shard index carries its own
  crc32c, so a flipped byte raises on read instead of returning wrong numbers;
* shards are always written, even when all zeros, and :func:`open_dataset` checks that every shard
  file exists, because zarr silently reads a missing chunk as fill values.

Group attrs: ``kind``, ``schema_version``, ``producer`` (DVC stage), ``params_hash``,
``content_hash`` (sha256 over each array's name, dtype, shape and C-order bytes, sorted by name),
``n_rows`` and any caller-supplied extras. A dataset without ``content_hash`` is unfinished.

:func:`write_dataset` writes a dataset that fits in memory in one go; :class:`ShardedWriter` writes
one shard at a time with resumable progress, for generation runs that do not fit in memory.

Locations: :func:`write_dataset` and :func:`open_dataset` take a local path or an fsspec URL
(``memory://``, ``file://``, ``s3://bucket/key.zarr``, ``gs://``, chained ones like ``simplecache::s3://``),
with the same layout, checks and content hash everywhere. ``file://`` URLs are local paths and keep the
atomic rename; elsewhere (object stores have no rename) the group's ``zarr.json`` carrying ``content_hash``
is written last, in one PUT, so an interrupted write reads as unfinished, never as a finished dataset.
:class:`ShardedWriter` is local-only (it relies on ``os.replace``, ``fsync`` and ``flock``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import posixpath
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from storage.atomic import atomic_dir, atomic_write_json, fsync_dir, fsync_file, fsync_tree, temp_sibling
from storage.faults import crash_point

try:  # advisory lock for progress.json when several processes share one writer; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SCHEMA_VERSION",
    "Dataset",
    "DatasetError",
    "ShardedWriter",
    "compute_content_hash",
    "open_dataset",
    "write_dataset",
]

SCHEMA_VERSION = 1
CHUNK_TARGET_BYTES = 1 << 20  # inner chunks >= 1 MiB: whole-chunk reads are ~50x faster than random rows
SHARD_TARGET_BYTES = 64 << 20  # shards ~64 MiB: few files for DVC, still cheap to rewrite on resume
ZSTD_LEVEL = 3
PROGRESS_FILE = "progress.json"
_LOCK_FILE = "progress.lock"
_REQUIRED_ATTRS = ("kind", "schema_version", "producer", "params_hash", "content_hash", "n_rows")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_NAMES = {"zarr.json", PROGRESS_FILE, _LOCK_FILE}

Schema = Mapping[str, tuple[tuple[int, ...], str | np.dtype[Any]]]


class DatasetError(ValueError):
    """A dataset is missing, malformed, corrupt or not what the caller expected."""


def _err(path: str | Path, msg: str) -> DatasetError:
    return DatasetError(f"dataset {path}: {msg}")


# --------------------------------------------------------------------------- locations (path or fsspec URL)

# `proto://...` or a chained `proto::proto://...` URL; a bare path (or a Path object) is local.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)")
_LOCAL_PROTOCOLS = {"file", "local"}  # fsspec's names for the local filesystem
# Where a protocol's fsspec backend comes from, when it is one this project declares.
_BACKEND_INSTALL = {"s3": "pip install 'reflow[s3]' (or: pip install s3fs)", "s3a": "pip install 'reflow[s3]'"}


@dataclass(frozen=True)
class _Remote:
    """A dataset behind an fsspec URL: the URL as given (for messages), a sync filesystem for listing and
    the path inside it, and the options to open zarr's FsspecStore with."""

    url: str
    fs: Any
    root: str
    storage_options: Mapping[str, Any]

    def store(self, read_only: bool) -> FsspecStore:
        return FsspecStore.from_url(self.url, storage_options=dict(self.storage_options) or None,
                                    read_only=read_only)

    def keys(self) -> set[str]:
        """Every object under the dataset, relative to it (one listing instead of one request per shard)."""
        prefix = self.root.rstrip("/") + "/"
        try:
            found = self.fs.find(self.root)
        except Exception as e:  # network, credentials, permissions: the backends raise many types
            raise _err(self.url, f"cannot list it ({type(e).__name__}: {e}); check the URL, the network "
                                 "and the credentials for this storage") from e
        return {posixpath.relpath(f, prefix) for f in found if f.startswith(prefix)}


def _location(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> Path | _Remote:
    """A local Path (plain paths and file:// URLs, which keep atomic renames) or a :class:`_Remote`."""
    if isinstance(path, Path) or not _URL_RE.match(str(path)):
        if storage_options:
            raise _err(path, f"storage_options {sorted(storage_options)} given for a local path; "
                             "expected them only with an fsspec URL")
        return Path(path)
    url = str(path)
    protocol = re.split(r"://|::", url, maxsplit=1)[0].lower()
    if protocol in _LOCAL_PROTOCOLS and "::" not in url.split("://", 1)[0]:
        from fsspec.implementations.local import LocalFileSystem

        return Path(LocalFileSystem._strip_protocol(url))
    import fsspec.core

    try:
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as e:  # fsspec's message names the package ("Install s3fs to access S3")
        how = _BACKEND_INSTALL.get(protocol, "install the fsspec backend package for it")
        raise _err(url, f"no fsspec backend for {protocol}:// here ({e}); {how}") from e
    except ValueError as e:
        raise _err(url, f"not a usable URL ({e}); expected a local path or an fsspec URL such as "
                        "memory://, file:// or s3://bucket/key.zarr") from e
    except Exception as e:  # a backend that connects while being built (bad endpoint, credentials)
        raise _err(url, f"cannot reach it ({type(e).__name__}: {e}); check the URL, the network and "
                        "the credentials for this storage") from e
    return _Remote(url=url, fs=fs, root=str(root), storage_options=dict(storage_options or {}))


# --------------------------------------------------------------------------- layout helpers


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
    """Effective shard rows and per-array inner chunk rows for :class:`ShardedWriter`.

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


def _hash_header(h: Any, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
    h.update(f"{name}\0{dtype.str}\0{json.dumps(list(shape))}\0".encode())


def compute_content_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over each array's name, dtype, shape and raw C-order bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.ascontiguousarray(a, dtype=_little(a.dtype))
        _hash_header(h, name, a.dtype, a.shape)
        h.update(a.data)
    return h.hexdigest()


def _stream_content_hash(path: Path, arrays: Mapping[str, zarr.Array], block_rows: int | None = None) -> str:
    """Content hash read block by block (one shard of one array in memory at a time)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = arrays[name]
        n = int(arr.shape[0])
        dtype = _little(np.dtype(arr.dtype))
        _hash_header(h, name, dtype, tuple(arr.shape))
        step = block_rows or _shard_rows_of(arr)
        for start in range(0, n, step):
            block = _read_rows(path, name, arr, start, min(n, start + step))
            h.update(np.ascontiguousarray(block, dtype=dtype).data)
    return h.hexdigest()


def _read_rows(path: Path | str, name: str, arr: zarr.Array, start: int | None, stop: int | None) -> np.ndarray:
    """Read rows, turning checksum/decoding failures into a DatasetError naming path and array."""
    try:
        return np.asarray(arr[slice(start, stop)])
    except DatasetError:
        raise
    except Exception as e:  # zarr raises ValueError (crc32c), zstd/IO errors: all mean a corrupt store
        remote = "" if isinstance(path, Path) else ", or the storage could not be read (network, credentials)"
        raise _err(
            path,
            f"reading array {name!r} rows [{start}:{stop}] failed ({type(e).__name__}: {e}); "
            f"the data is corrupt or truncated{remote}. Re-run the producing stage.",
        ) from e


def _open_store_group(path: Path | _Remote, mode: str) -> zarr.Group:
    where = path.url if isinstance(path, _Remote) else path
    try:
        store = path.store(mode == "r") if isinstance(path, _Remote) else LocalStore(path, read_only=(mode == "r"))
        return zarr.open_group(store=store, mode=mode, zarr_format=3)  # type: ignore[arg-type]
    except Exception as e:
        raise _err(where, f"not a zarr v3 group ({type(e).__name__}: {e}); expected a dataset directory") from e


def _jsonable_attrs(path: Path, attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    attrs = dict(attrs or {})
    try:
        return json.loads(json.dumps(attrs))
    except (TypeError, ValueError) as e:
        raise _err(path, f"extra attrs are not JSON-serialisable ({e})") from e


def _base_attrs(
    path: Path, *, kind: str, producer: str, params_hash: str, n_rows: int, attrs: Mapping[str, Any] | None
) -> dict[str, Any]:
    extra = _jsonable_attrs(path, attrs)
    clash = sorted(set(extra) & set(_REQUIRED_ATTRS))
    if clash:
        raise _err(path, f"extra attrs may not override the standard attrs {clash}")
    return {
        **extra,
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "producer": producer,
        "params_hash": params_hash,
        "n_rows": n_rows,
    }


# --------------------------------------------------------------------------- one-shot write


def write_dataset(
    path: str | Path,
    arrays: Mapping[str, np.ndarray],
    *,
    kind: str,
    producer: str,
    params_hash: str,
    attrs: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``arrays`` as a dataset at ``path`` (replacing it); return the content hash.

    ``path`` is a local path (written in a temp sibling, then renamed: atomic) or an fsspec URL, with
    ``storage_options`` for its filesystem (e.g. ``{"endpoint_url": ...}`` for s3://). At a URL the old
    dataset is deleted first and the group attrs with ``content_hash`` are written last, so a reader sees
    either the finished dataset or one that :func:`open_dataset` refuses as unfinished.
    """
    loc = _location(path, storage_options)
    path = loc.url if isinstance(loc, _Remote) else loc
    if not arrays:
        raise _err(path, "no arrays given; expected at least one")
    canon: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        _check_name(path, name)
        a = np.asarray(a)
        if a.ndim == 0:
            raise _err(path, f"array {name!r} is 0-d; expected at least one (row) dimension")
        canon[name] = np.ascontiguousarray(a, dtype=_canon_dtype(path, name, a.dtype))
    rows = {name: a.shape[0] for name, a in canon.items()}
    if len(set(rows.values())) != 1:
        raise _err(path, f"arrays disagree on the number of rows (first dimension): {rows}; expected one value")
    n_rows = next(iter(rows.values()))
    content_hash = compute_content_hash(canon)
    group_attrs = _base_attrs(path, kind=kind, producer=producer, params_hash=params_hash, n_rows=n_rows, attrs=attrs)
    group_attrs["content_hash"] = content_hash

    def fill(group: zarr.Group) -> None:
        for name, a in canon.items():
            chunk, shard = _auto_layout(n_rows, _row_bytes(a.shape[1:], a.dtype))
            arr = _create_array(group, name, n_rows, a.shape[1:], a.dtype, chunk, shard)
            if n_rows:
                arr[...] = a
        group.attrs.update(group_attrs)

    if isinstance(loc, Path):
        with atomic_dir(loc) as tmp:
            fill(zarr.open_group(store=LocalStore(tmp), mode="w", zarr_format=3))
        return content_hash
    try:
        # mode="w" deletes whatever is at the URL and writes zarr.json without content_hash; `fill`
        # rewrites it with the hash at the very end: that last PUT is what makes the dataset finished.
        fill(zarr.open_group(store=loc.store(read_only=False), mode="w", zarr_format=3))
    except DatasetError:
        raise
    except Exception as e:  # network, credentials, permissions, a full disk: the backends raise many types
        raise _err(loc.url, f"writing failed ({type(e).__name__}: {e}); nothing finished is there now "
                            "(no content_hash). Check the URL, the network and the credentials, then retry.") from e
    return content_hash


# --------------------------------------------------------------------------- reading


class Dataset:
    """A validated, read-only dataset. Index it by array name to get the zarr array."""

    def __init__(self, path: Path | str, attrs: dict[str, Any], arrays: dict[str, zarr.Array]) -> None:
        self.path = path
        self.attrs = attrs
        self._arrays = arrays
        self.n_rows = int(attrs["n_rows"])

    @property
    def names(self) -> list[str]:
        """Array names, sorted."""
        return sorted(self._arrays)

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    def __getitem__(self, name: str) -> zarr.Array:
        try:
            return self._arrays[name]
        except KeyError:
            raise _err(self.path, f"no array {name!r}; it has {self.names}") from None

    def __repr__(self) -> str:
        kind = self.attrs.get("kind")
        return f"Dataset({str(self.path)!r}, kind={kind!r}, n_rows={self.n_rows}, names={self.names})"

    def load(self, name: str) -> np.ndarray:
        """The whole array in memory (checksums verified by zarr while decoding)."""
        return _read_rows(self.path, name, self[name], None, None)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of one array."""
        return _read_rows(self.path, name, self[name], start, stop)

    def chunk_rows(self, name: str) -> int:
        """Rows per inner chunk: the efficient unit for shuffled reading."""
        return int(self[name].chunks[0])

    def iter_chunks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, rows)`` for each inner chunk of ``name``, in order."""
        step = self.chunk_rows(name)
        for start in range(0, self.n_rows, step):
            yield start, self.read(name, start, min(self.n_rows, start + step))

    def verify(self) -> str:
        """Recompute the content hash (reading shard by shard) and compare with the attrs."""
        found = _stream_content_hash(self.path, self._arrays)
        if found != self.attrs["content_hash"]:
            raise _err(
                self.path,
                f"content hash mismatch: recomputed {found}, attrs say {self.attrs['content_hash']}; "
                "the data was altered after writing. Re-run the producing stage.",
            )
        return found


def _row_shape_matches(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(found) == len(expected) and all(e == -1 or f == e for f, e in zip(found, expected, strict=True))


def open_dataset(
    path: str | Path,
    *,
    kind: str | None = None,
    expect: Mapping[str, tuple[int, ...]] | None = None,
    verify: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Dataset:
    """Open and validate a dataset; every problem raises :class:`DatasetError` naming ``path``.

    ``path`` is a local path or an fsspec URL (``storage_options`` go to its filesystem). Checks attrs
    and schema version, ``kind``, expected arrays and row shapes (``expect`` maps name -> row shape,
    ``-1`` matches any size), that all arrays share ``n_rows`` and that every shard file exists.
    ``verify=True`` also re-reads everything and checks the content hash (every chunk's crc32c is
    checked on the way).
    """
    loc = _location(path, storage_options)
    has_key: Callable[[str], bool] | None = None
    if isinstance(loc, _Remote):
        path, keys = loc.url, loc.keys()
        has_key = keys.__contains__
        if not keys:
            raise _err(path, "does not exist (nothing at that URL); expected a zarr dataset written there")
        if "zarr.json" not in keys:
            raise _err(path, "is not a zarr v3 group (no zarr.json); expected a dataset written there")
    else:
        path = loc
        if not path.exists():
            raise _err(path, "does not exist; expected a zarr dataset directory (has its stage run?)")
        if not path.is_dir() or not (path / "zarr.json").is_file():
            raise _err(path, "is not a zarr v3 group (no zarr.json); expected a dataset directory")
    group = _open_store_group(loc, "r")
    attrs = dict(group.attrs)
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    if missing:
        hint = (" (an unfinished ShardedWriter output, or an interrupted write to a URL, has no content_hash)"
                if "content_hash" in missing else "")
        raise _err(path, f"group attrs missing {missing}; expected all of {list(_REQUIRED_ATTRS)}{hint}")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise _err(
            path,
            f"schema_version {attrs['schema_version']!r} found, expected {SCHEMA_VERSION}; "
            "re-run the producing stage with this code version",
        )
    if kind is not None and attrs["kind"] != kind:
        raise _err(path, f"kind {attrs['kind']!r} found, expected {kind!r}")
    try:
        arrays = dict(group.arrays())
    except Exception as e:  # a URL's storage failing mid-way; locally, damaged array metadata
        raise _err(path, f"cannot open its arrays ({type(e).__name__}: {e})") from e
    if not arrays:
        raise _err(path, "contains no arrays; expected at least one")
    rows = {name: int(a.shape[0]) if a.ndim else None for name, a in arrays.items()}
    if any(r is None for r in rows.values()) or len(set(rows.values())) != 1:
        raise _err(path, f"arrays disagree on n_rows (first dimension): {rows}; expected one common value")
    if next(iter(rows.values())) != attrs["n_rows"]:
        raise _err(path, f"arrays have {next(iter(rows.values()))} rows but attrs n_rows is {attrs['n_rows']}")
    for name, row_shape in (expect or {}).items():
        if name not in arrays:
            raise _err(path, f"expected array {name!r} missing; it has {sorted(arrays)}")
        found = tuple(int(d) for d in arrays[name].shape[1:])
        if not _row_shape_matches(found, tuple(row_shape)):
            raise _err(path, f"array {name!r} row shape {found} found, expected {tuple(row_shape)} (-1 = any size)")
    for name, arr in arrays.items():
        _check_complete(path, name, arr, has_key)
    ds = Dataset(path, attrs, arrays)
    if verify:
        ds.verify()
    return ds


# --------------------------------------------------------------------------- resumable writer


class ShardedWriter:
    """Resumable, shard-by-shard writer for datasets too large for memory.

    Shard ``i`` covers rows ``shard_range(i)``; its arrays are written with :meth:`write_shard`
    (idempotent: a rewrite replaces whatever a killed attempt left), then recorded in
    ``progress.json`` inside the group. Reopening the same ``path`` with the same ``n_rows``,
    ``shard_rows``, ``schema``, ``kind`` and ``params_hash`` resumes; :meth:`pending` lists the
    shards still to do. Several processes may write disjoint shards of one writer at once.
    :meth:`finalize` hashes the content, writes the full attrs and moves the group to its final
    path (same filesystem, via ``os.replace``).

    ``shard_rows`` is rounded up to a multiple of the inner chunk of the widest-row array
    (``ceil(1 MiB / bytes_per_row)`` rows) unless it is smaller than that chunk; :attr:`shard_rows`
    is the effective value. Aim for shards of ~64 MiB.

    Local paths only: resuming and finishing rely on ``flock``, ``fsync`` and an atomic ``os.replace``,
    which object stores lack. To put a large generated dataset behind a URL, finish it locally and push
    it with DVC (``dvc push`` to an S3 remote), or copy it and check it with ``open_dataset(url, verify=True)``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_rows: int,
        shard_rows: int,
        schema: Schema,
        kind: str,
        producer: str,
        params_hash: str,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        if n_rows < 0 or shard_rows < 1:
            raise _err(self.path, f"n_rows={n_rows}, shard_rows={shard_rows}; expected n_rows >= 0, shard_rows >= 1")
        if not schema:
            raise _err(self.path, "empty schema; expected at least one array")
        self.schema: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
        for name, (row_shape, dtype) in schema.items():
            _check_name(self.path, name)
            self.schema[name] = (tuple(int(d) for d in row_shape), _canon_dtype(self.path, name, dtype))
        self.n_rows = n_rows
        self.requested_shard_rows = shard_rows
        self.shard_rows, self._chunk_rows = _writer_layout(self.schema, shard_rows)
        self.n_shards = math.ceil(n_rows / self.shard_rows)
        self.kind, self.producer, self.params_hash = kind, producer, params_hash
        self._attrs = _base_attrs(
            self.path, kind=kind, producer=producer, params_hash=params_hash, n_rows=n_rows, attrs=attrs
        )
        self._finalized = False
        if not self.path.exists():
            self._create()
        self._arrays = self._open_existing()

    # -- setup

    def _create(self) -> None:
        """Build the empty group in a temp sibling, then rename it in (losing a creation race is fine)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(self.path)
        os.mkdir(tmp, 0o777)
        try:
            group = zarr.open_group(store=LocalStore(tmp), mode="w", zarr_format=3)
            for name, (row_shape, dtype) in self.schema.items():
                _create_array(group, name, self.n_rows, row_shape, dtype, self._chunk_rows[name], self.shard_rows)
            group.attrs.update(self._attrs)
            atomic_write_json(tmp / PROGRESS_FILE, {"done": [], "n_shards": self.n_shards})
            fsync_tree(tmp)
            try:
                os.rename(tmp, self.path)
            except OSError:
                if not self.path.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process created it first: resume that
            else:
                fsync_dir(self.path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _mismatch(self, field: str, existing: Any, requested: Any) -> DatasetError:
        return _err(
            self.path,
            f"cannot resume: {field} differs (existing {existing!r}, requested {requested!r}); "
            "this directory belongs to another run configuration. Delete it to start over.",
        )

    def _open_existing(self) -> dict[str, zarr.Array]:
        """Open the group at ``path`` and check it was made for the same configuration."""
        if not (self.path / "zarr.json").is_file():
            raise _err(self.path, "exists but is not a zarr group; expected a ShardedWriter directory")
        store = LocalStore(self.path)
        group = _open_store_group(self.path, "r+")
        attrs = dict(group.attrs)
        for field, requested in (
            ("schema_version", SCHEMA_VERSION),
            ("kind", self.kind),
            ("n_rows", self.n_rows),
            ("params_hash", self.params_hash),
        ):
            if attrs.get(field) != requested:
                raise self._mismatch(field, attrs.get(field), requested)
        # Arrays are found by directory, not group listing: zarr warns about progress.json there.
        on_disk = sorted(p.name for p in self.path.iterdir() if (p / "zarr.json").is_file())
        if on_disk != sorted(self.schema):
            raise self._mismatch("schema (array names)", on_disk, sorted(self.schema))
        arrays: dict[str, zarr.Array] = {}
        for name, (row_shape, dtype) in self.schema.items():
            arr = zarr.open_array(store=store, path=name, mode="r+", zarr_format=3)
            # Runtime config is not stored in the metadata: re-enable writing all-zero shards.
            arr = arr.with_config({"write_empty_chunks": True})
            found = (tuple(int(d) for d in arr.shape[1:]), np.dtype(arr.dtype).str)
            if found != (row_shape, dtype.str):
                raise self._mismatch(f"schema of {name!r} (row shape, dtype)", found, (row_shape, dtype.str))
            if _shard_rows_of(arr) != self.shard_rows:
                rounded = self.shard_rows != self.requested_shard_rows
                raise _err(
                    self.path,
                    f"cannot resume: shard_rows differs (existing {_shard_rows_of(arr)}, requested "
                    f"{self.shard_rows}{f' rounded up from {self.requested_shard_rows}' if rounded else ''}); "
                    "this directory belongs to another run configuration. Delete it to start over.",
                )
            arrays[name] = arr
        if not (self.path / PROGRESS_FILE).is_file() and "content_hash" not in attrs:
            raise _err(
                self.path,
                f"has no {PROGRESS_FILE} and no content_hash; its state is unknown. Delete it to start over.",
            )
        return arrays

    # -- progress

    @contextlib.contextmanager
    def _progress_lock(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _done(self) -> set[int]:
        progress = self.path / PROGRESS_FILE
        if not progress.is_file():
            return set(range(self.n_shards))  # finalized in place (content_hash present)
        try:
            return {int(i) for i in json.loads(progress.read_text())["done"]}
        except (ValueError, KeyError, TypeError) as e:
            raise _err(self.path, f"{PROGRESS_FILE} is unreadable ({e}); delete the directory to start over") from e

    def shard_range(self, i: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of shard ``i``."""
        if not 0 <= i < self.n_shards:
            raise _err(self.path, f"shard index {i} out of range; expected 0 <= i < {self.n_shards}")
        start = i * self.shard_rows
        return start, min(self.n_rows, start + self.shard_rows)

    def pending(self) -> list[int]:
        """Unfinished shard indices, ascending (re-read from disk: other processes may write too)."""
        done = self._done()
        return [i for i in range(self.n_shards) if i not in done]

    # -- writing

    def _check_open(self) -> None:
        if self._finalized:
            raise _err(self.path, "writer already finalized; open the final dataset with open_dataset")

    def write_shard(self, i: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write all arrays of shard ``i`` (replacing any partial earlier attempt), then record it."""
        self._check_open()
        start, stop = self.shard_range(i)
        if not (self.path / PROGRESS_FILE).is_file():
            raise _err(self.path, "all shards are done and the content hash written; cannot rewrite a shard")
        if set(arrays) != set(self.schema):
            raise _err(self.path, f"shard {i}: arrays {sorted(arrays)} given, expected exactly {sorted(self.schema)}")
        data: dict[str, np.ndarray] = {}
        for name, a in arrays.items():
            a = np.asarray(a)
            row_shape, dtype = self.schema[name]
            if a.dtype.kind not in "biufc" or _little(a.dtype) != dtype:
                raise _err(self.path, f"shard {i}: array {name!r} has dtype {a.dtype}, expected {dtype}")
            if a.shape != (stop - start, *row_shape):
                raise _err(
                    self.path,
                    f"shard {i}: array {name!r} has shape {a.shape}, expected {(stop - start, *row_shape)} "
                    f"(rows {start}:{stop}, row shape {row_shape})",
                )
            data[name] = np.ascontiguousarray(a, dtype=dtype)
        written: list[Path] = []
        for name, a in data.items():
            arr = self._arrays[name]
            files = [self.path / name / k for k in _shard_keys(arr, i)]
            # A killed attempt may have left a truncated shard; zarr would try to merge into it.
            for f in files:
                f.unlink(missing_ok=True)
            arr[start:stop] = a
            written += [f for f in files if f.is_file()]
        for f in written:  # data must be durable before progress says it is there
            fsync_file(f)
        crash_point("shard_written")
        with self._progress_lock():
            done = self._done() | {i}
            atomic_write_json(self.path / PROGRESS_FILE, {"done": sorted(done), "n_shards": self.n_shards})

    def _expected_files(self) -> set[Path]:
        files = {self.path / "zarr.json"}
        for name, arr in self._arrays.items():
            files.add(self.path / name / "zarr.json")
            files.update(self.path / name / k for k in _shard_keys(arr))
        return files

    def finalize(self, final_path: str | Path) -> str:
        """Hash the content, write the full attrs and move the group to ``final_path``.

        Requires every shard done; ``final_path`` must not exist and its parent must.
        Stray files (zarr ``.partial`` temp files, the lock) are removed so that the output holds
        exactly the dataset. Returns the content hash.
        """
        self._check_open()
        final_path = Path(final_path)
        left = self.pending()
        if left:
            raise _err(
                self.path,
                f"cannot finalize: {len(left)} of {self.n_shards} shards unfinished (first {left[:5]})",
            )
        if final_path.exists():
            raise _err(self.path, f"cannot finalize: target {final_path} already exists; expected a free path")
        if not final_path.parent.is_dir():
            raise _err(self.path, f"cannot finalize: parent directory of {final_path} does not exist")
        for name, arr in self._arrays.items():
            _check_complete(self.path, name, arr)
        content_hash = _stream_content_hash(self.path, self._arrays, block_rows=self.shard_rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr warns about progress.json while opening the group
            group = _open_store_group(self.path, "r+")
            group.attrs.update({**self._attrs, "content_hash": content_hash})
        keep = self._expected_files() | {self.path / PROGRESS_FILE}
        for dirpath, _dirs, filenames in os.walk(self.path):
            for fname in filenames:
                if (f := Path(dirpath) / fname) not in keep:
                    f.unlink()
        fsync_tree(self.path)
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)
        fsync_dir(self.path)
        os.replace(self.path, final_path)
        fsync_dir(final_path.parent)
        if final_path.parent.resolve() != self.path.parent.resolve():
            fsync_dir(self.path.parent)
        self._finalized = True
        return content_hash
