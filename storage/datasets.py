"""Datasets: zarr v3 groups of named arrays that share their first axis (rows).

How they sit in zarr (sharded, zstd + crc32c, every shard file present) is ``storage.layout``; where they
live (a local path or an fsspec URL) is ``storage.locations``; this module writes and opens them.

Group attrs: ``kind``, ``schema_version``, ``producer`` (DVC stage), ``params_hash``,
``content_hash`` (sha256 over each array's name, dtype, shape and C-order bytes, sorted by name),
``n_rows`` and any caller-supplied extras. A dataset without ``content_hash`` is unfinished.

:func:`write_dataset` writes a dataset that fits in memory in one go; :class:`storage.sharded.ShardedWriter`
writes one shard at a time with resumable progress, for generation runs that do not fit in memory.
:func:`open_dataset` checks all of it (attrs, schema version, kind, row shapes, every shard file) and with
``verify=True`` the content hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from storage.atomic import atomic_dir
from storage.layout import (
    DatasetError,
    _auto_layout,
    _canon_dtype,
    _check_complete,
    _check_name,
    _create_array,
    _err,
    _little,
    _row_bytes,
    _shard_rows_of,
)
from storage.locations import _location, _open_store_group, _Remote

__all__ = [
    "SCHEMA_VERSION",
    "Dataset",
    "compute_content_hash",
    "open_dataset",
    "write_dataset",
]

SCHEMA_VERSION = 1
REQUIRED_ATTRS = ("kind", "schema_version", "producer", "params_hash", "content_hash", "n_rows")
HasKey = Callable[[str], bool]  # whether a remote store holds a key


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
    clash = sorted(set(extra) & set(REQUIRED_ATTRS))
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


def _locate(
    path: str | Path, storage_options: Mapping[str, Any] | None
) -> tuple[Path | _Remote, str | Path, HasKey | None]:
    """(location, the path errors name, a key-existence test for remote stores) after checking that a zarr v3
    group is there. Locally `has_key` is None: shard files are checked on the filesystem instead."""
    loc = _location(path, storage_options)
    if isinstance(loc, _Remote):
        keys = loc.keys()
        if not keys:
            raise _err(loc.url, "does not exist (nothing at that URL); expected a zarr dataset written there")
        if "zarr.json" not in keys:
            raise _err(loc.url, "is not a zarr v3 group (no zarr.json); expected a dataset written there")
        return loc, loc.url, keys.__contains__
    if not loc.exists():
        raise _err(loc, "does not exist; expected a zarr dataset directory (has its stage run?)")
    if not loc.is_dir() or not (loc / "zarr.json").is_file():
        raise _err(loc, "is not a zarr v3 group (no zarr.json); expected a dataset directory")
    return loc, loc, None


def _check_attrs(path: str | Path, attrs: Mapping[str, Any], kind: str | None) -> None:
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        hint = (" (an unfinished ShardedWriter output, or an interrupted write to a URL, has no content_hash)"
                if "content_hash" in missing else "")
        raise _err(path, f"group attrs missing {missing}; expected all of {list(REQUIRED_ATTRS)}{hint}")
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise _err(
            path,
            f"schema_version {attrs['schema_version']!r} found, expected {SCHEMA_VERSION}; "
            "re-run the producing stage with this code version",
        )
    if kind is not None and attrs["kind"] != kind:
        raise _err(path, f"kind {attrs['kind']!r} found, expected {kind!r}")


def _open_arrays(path: str | Path, group: zarr.Group) -> dict[str, zarr.Array]:
    try:
        arrays = dict(group.arrays())
    except Exception as e:  # a URL's storage failing mid-way; locally, damaged array metadata
        raise _err(path, f"cannot open its arrays ({type(e).__name__}: {e})") from e
    if not arrays:
        raise _err(path, "contains no arrays; expected at least one")
    return arrays


def _check_shapes(
    path: str | Path, arrays: Mapping[str, zarr.Array], n_rows: Any, expect: Mapping[str, tuple[int, ...]] | None
) -> None:
    """Every array has `n_rows` rows, and each array named in `expect` is there with its row shape."""
    rows = {name: int(a.shape[0]) if a.ndim else None for name, a in arrays.items()}
    if any(r is None for r in rows.values()) or len(set(rows.values())) != 1:
        raise _err(path, f"arrays disagree on n_rows (first dimension): {rows}; expected one common value")
    if next(iter(rows.values())) != n_rows:
        raise _err(path, f"arrays have {next(iter(rows.values()))} rows but attrs n_rows is {n_rows}")
    for name, row_shape in (expect or {}).items():
        if name not in arrays:
            raise _err(path, f"expected array {name!r} missing; it has {sorted(arrays)}")
        found = tuple(int(d) for d in arrays[name].shape[1:])
        if not _row_shape_matches(found, tuple(row_shape)):
            raise _err(path, f"array {name!r} row shape {found} found, expected {tuple(row_shape)} (-1 = any size)")


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
    loc, path, has_key = _locate(path, storage_options)
    group = _open_store_group(loc, "r")
    attrs = dict(group.attrs)
    _check_attrs(path, attrs, kind)
    arrays = _open_arrays(path, group)
    _check_shapes(path, arrays, attrs["n_rows"], expect)
    for name, arr in arrays.items():
        _check_complete(path, name, arr, has_key)
    ds = Dataset(path, attrs, arrays)
    if verify:
        ds.verify()
    return ds
