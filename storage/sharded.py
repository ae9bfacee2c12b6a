"""A resumable writer for datasets too large for memory: one shard at a time, several processes at once.

It writes the same datasets as :func:`storage.datasets.write_dataset` (same layout, attrs and content hash)
and is local-only: it relies on ``os.replace``, ``fsync`` and ``flock``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from storage.atomic import atomic_write_json, fsync_dir, fsync_file, fsync_tree, temp_sibling
from storage.datasets import SCHEMA_VERSION, _base_attrs, _stream_content_hash
from storage.faults import crash_point
from storage.layout import (
    _LOCK_FILE,
    PROGRESS_FILE,
    DatasetError,
    _canon_dtype,
    _check_complete,
    _check_name,
    _create_array,
    _err,
    _little,
    _shard_keys,
    _shard_rows_of,
    _writer_layout,
)
from storage.locations import _open_store_group

try:  # advisory lock for progress.json when several processes share one writer; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["ShardedWriter"]

Schema = Mapping[str, tuple[tuple[int, ...], str | np.dtype[Any]]]


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
