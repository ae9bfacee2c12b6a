"""storage.datasets against the real zarr 3 on temp dirs: layout, integrity checks, resumable writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage.datasets import SCHEMA_VERSION, compute_content_hash, open_dataset, write_dataset
from storage.layout import DatasetError
from storage.sharded import ShardedWriter

MiB = 1 << 20


def _arrays(n: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
        "labels": rng.integers(0, 10, n).astype(np.int64),
        "z": rng.standard_normal((n, 4, 2, 2)).astype(np.float32),
        "zeros": np.zeros((n, 5), np.float32),  # all-fill shards must still be written
        "flag": rng.random(n) < 0.5,
    }


def _write(path: Path, arrays: dict[str, np.ndarray] | None = None, **kw) -> str:
    args = {"kind": "images", "producer": "prepare", "params_hash": "p123"} | kw
    return write_dataset(path, arrays if arrays is not None else _arrays(), **args)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _shard_files(root: Path, name: str) -> list[Path]:
    return sorted(p for p in (root / name / "c").rglob("*") if p.is_file())


def test_round_trip_arrays_and_attrs(tmp_path: Path) -> None:
    arrays = _arrays()
    path = tmp_path / "train.zarr"
    h = _write(path, arrays, attrs={"source": "digits", "scale": 0.18215})
    ds = open_dataset(path, kind="images", expect={"images": (3, -1, 8), "labels": ()}, verify=True)
    assert ds.path == path and ds.n_rows == 300 and ds.names == sorted(arrays)
    for name, a in arrays.items():
        got = ds.load(name)
        assert got.dtype == a.dtype and np.array_equal(got, a)
    assert np.array_equal(ds.read("z", 17, 42), arrays["z"][17:42])
    assert ds.attrs == {
        "kind": "images",
        "schema_version": SCHEMA_VERSION,
        "producer": "prepare",
        "params_hash": "p123",
        "content_hash": h,
        "n_rows": 300,
        "source": "digits",
        "scale": 0.18215,
    }
    assert h == compute_content_hash(arrays)
    assert ds["images"].shape == (300, 3, 8, 8)
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_content_hash_sees_names_dtypes_shapes_and_bytes(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.int32).reshape(4, 3)
    base = compute_content_hash({"a": a})
    assert compute_content_hash({"b": a}) != base
    assert compute_content_hash({"a": a.astype(np.int64)}) != base
    assert compute_content_hash({"a": a.reshape(4, 3, 1)}) != base
    b = a.copy()
    b[3, 2] += 1
    assert compute_content_hash({"a": b}) != base
    assert compute_content_hash({"a": np.asfortranarray(a)}) == base  # C-order bytes, not memory order


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    _write(path, _arrays(seed=1))
    h2 = _write(path, _arrays(n=50, seed=2))
    ds = open_dataset(path, verify=True)
    assert ds.n_rows == 50 and ds.attrs["content_hash"] == h2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr"]


def test_large_dataset_has_big_chunks_and_few_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 20 * 1024
    arrays = {"x": rng.integers(0, 256, (n, 1024), dtype=np.uint8), "y": np.arange(n, dtype=np.int64)}
    path = tmp_path / "big.zarr"
    _write(path, arrays)
    ds = open_dataset(path)
    x, y = ds["x"], ds["y"]
    assert x.chunks[0] * 1024 >= MiB and x.chunks[1:] == (1024,)  # inner chunk: whole rows, >= 1 MiB
    assert x.shards[0] % x.chunks[0] == 0
    assert y.chunks[0] == n  # 160 KiB in all: one chunk capped at n_rows
    assert len(_files(path)) <= 6  # 3 zarr.json + a shard or so per array, not thousands of chunks
    codecs = json.loads((path / "x" / "zarr.json").read_text())["codecs"][0]["configuration"]
    assert [c["name"] for c in codecs["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert np.array_equal(ds.read("x", n - 3, n), arrays["x"][-3:])


def _flip_byte(f: Path, offset: int) -> None:
    data = bytearray(f.read_bytes())
    data[offset] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data", "index"])
def test_flipped_byte_raises(tmp_path: Path, where: str) -> None:
    path = tmp_path / "d.zarr"
    _write(path)
    (shard,) = _shard_files(path, "z")
    size = shard.stat().st_size
    _flip_byte(shard, size // 3 if where == "data" else size - 6)
    ds = open_dataset(path)  # structure is intact; the damage shows when the bytes are decoded
    with pytest.raises(DatasetError, match=r"d\.zarr.*'z'"):
        ds.load("z")
    with pytest.raises(DatasetError, match=r"d\.zarr"):
        open_dataset(path, verify=True)
    assert np.array_equal(ds.load("labels"), _arrays()["labels"])  # other arrays unaffected


def test_altered_content_fails_verify(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    _write(path)
    zarr.open_array(str(path / "labels"), mode="r+")[0] = 99  # valid chunks, different data
    open_dataset(path)
    with pytest.raises(DatasetError, match="content hash mismatch"):
        open_dataset(path, verify=True)


def _sharded(tmp_path: Path, n: int = 100, shard_rows: int = 16) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = _arrays(n)
    w = ShardedWriter(
        tmp_path / "scratch" / "pairs.zarr",
        n_rows=n,
        shard_rows=shard_rows,
        schema={k: (v.shape[1:], v.dtype.str) for k, v in arrays.items()},
        kind="pairs",
        producer="teacher_pairs",
        params_hash="ph",
    )
    for i in w.pending():
        s, e = w.shard_range(i)
        w.write_shard(i, {k: v[s:e] for k, v in arrays.items()})
    final = tmp_path / "pairs.zarr"
    w.finalize(final)
    return final, arrays


def test_deleted_shard_file_is_detected(tmp_path: Path) -> None:
    path, _ = _sharded(tmp_path)
    shards = _shard_files(path, "images")
    assert len(shards) == 7
    shards[3].unlink()
    with pytest.raises(DatasetError) as err:
        open_dataset(path)
    msg = str(err.value)
    assert str(path) in msg and "images/c/3" in msg and "1 of 7 shard files missing" in msg


def test_deleted_only_shard_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    _write(path)
    (_shard_files(path, "zeros")[0]).unlink()
    with pytest.raises(DatasetError, match=r"d\.zarr.*'zeros' is incomplete"):
        open_dataset(path)


def _set_attr(path: Path, key: str, value) -> None:
    zarr.open_group(str(path), mode="r+").attrs[key] = value


def test_wrong_schema_version_kind_and_row_shape(tmp_path: Path) -> None:
    path = tmp_path / "d.zarr"
    _write(path)
    with pytest.raises(DatasetError, match=r"d\.zarr: kind 'images' found, expected 'latents'"):
        open_dataset(path, kind="latents")
    with pytest.raises(DatasetError, match=r"'images' row shape \(3, 8, 8\) found, expected \(3, 16, 16\)"):
        open_dataset(path, expect={"images": (3, 16, 16)})
    with pytest.raises(DatasetError, match=r"row shape \(3, 8, 8\) found, expected \(8, -1\)"):
        open_dataset(path, expect={"images": (8, -1)})
    with pytest.raises(DatasetError, match="expected array 'latents' missing"):
        open_dataset(path, expect={"latents": (4, 2, 2)})
    _set_attr(path, "schema_version", SCHEMA_VERSION + 1)
    with pytest.raises(DatasetError, match=f"schema_version {SCHEMA_VERSION + 1} found, expected {SCHEMA_VERSION}"):
        open_dataset(path)


def test_missing_or_invalid_paths(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match="not a zarr v3 group"):
        open_dataset(tmp_path / "plain")
    g = zarr.open_group(str(tmp_path / "bare.zarr"), mode="w")
    g.attrs["kind"] = "images"
    with pytest.raises(DatasetError, match=r"attrs missing .*content_hash"):
        open_dataset(tmp_path / "bare.zarr")


def test_write_validates_rows_and_dtypes(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"bad\.zarr: arrays disagree on the number of rows"):
        _write(tmp_path / "bad.zarr", {"a": np.zeros((3, 2)), "b": np.zeros(4)})
    with pytest.raises(DatasetError, match="unsupported"):
        _write(tmp_path / "bad.zarr", {"a": np.array(["x", "y"])})
    with pytest.raises(DatasetError, match="may not override"):
        _write(tmp_path / "bad.zarr", {"a": np.zeros(2)}, attrs={"n_rows": 5})
    assert not (tmp_path / "bad.zarr").exists()


def test_sharded_writer_resume_equals_one_shot(tmp_path: Path) -> None:
    n = 100
    arrays = _arrays(n)
    schema = {k: (v.shape[1:], v.dtype.str) for k, v in arrays.items()}
    scratch = tmp_path / "scratch" / "pairs.zarr"

    def writer(**kw) -> ShardedWriter:
        args = dict(n_rows=n, shard_rows=16, schema=schema, kind="pairs", producer="teacher_pairs", params_hash="ph")
        return ShardedWriter(scratch, **(args | kw))

    w = writer()
    assert (w.n_shards, w.shard_rows, w.shard_range(6)) == (7, 16, (96, 100))
    assert w.pending() == list(range(7))
    for i in (0, 2, 5):
        s, e = w.shard_range(i)
        w.write_shard(i, {k: v[s:e] for k, v in arrays.items()})
    with pytest.raises(DatasetError, match="4 of 7 shards unfinished"):
        w.finalize(tmp_path / "early.zarr")
    with pytest.raises(DatasetError, match="content_hash"):
        open_dataset(scratch)  # an unfinished writer dir is never mistaken for a dataset
    del w

    # A killed attempt at shard 1 left a truncated shard file behind.
    torn = scratch / "images" / "c" / "1" / "0" / "0" / "0"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"\x00garbage")
    w = writer(attrs={"note": "resumed"})
    assert w.pending() == [1, 3, 4, 6]
    for i in w.pending():
        s, e = w.shard_range(i)
        w.write_shard(i, {k: v[s:e] for k, v in arrays.items()})
    assert w.pending() == []
    final = tmp_path / "pairs.zarr"
    h = w.finalize(final)
    assert not scratch.exists()
    assert not (final / "progress.json").exists() and not (final / "progress.lock").exists()

    ds = open_dataset(final, kind="pairs", verify=True)
    assert (
        h
        == ds.attrs["content_hash"]
        == write_dataset(tmp_path / "oneshot.zarr", arrays, kind="pairs", producer="x", params_hash="ph")
    )
    assert ds.attrs["note"] == "resumed" and ds.attrs["producer"] == "teacher_pairs" and ds.n_rows == n
    for name, a in arrays.items():
        assert np.array_equal(ds.load(name), a)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n_rows": 101}, "n_rows"),
        ({"shard_rows": 20}, "shard_rows"),
        ({"params_hash": "other"}, "params_hash"),
        ({"kind": "latents"}, "kind"),
        ({"schema": {"x": ((3,), "float32")}}, r"schema \(array names\)"),
        ({"schema": {"x": ((4,), "float32"), "y": ((), "int64")}}, r"schema of 'x'"),
        ({"schema": {"x": ((3,), "float64"), "y": ((), "int64")}}, r"schema of 'x'"),
    ],
)
def test_sharded_writer_mismatched_reopen(tmp_path: Path, change: dict, field: str) -> None:
    args = dict(
        n_rows=100,
        shard_rows=10,
        schema={"x": ((3,), "float32"), "y": ((), "int64")},
        kind="pairs",
        producer="p",
        params_hash="ph",
    )
    ShardedWriter(tmp_path / "w.zarr", **args)
    with pytest.raises(DatasetError, match=rf"w\.zarr: cannot resume: {field}[^;]* differs"):
        ShardedWriter(tmp_path / "w.zarr", **(args | change))


def test_write_shard_validates(tmp_path: Path) -> None:
    w = ShardedWriter(
        tmp_path / "w.zarr",
        n_rows=25,
        shard_rows=10,
        schema={"x": ((3,), "float32"), "y": ((), "int64")},
        kind="pairs",
        producer="p",
        params_hash="ph",
    )
    ok = {"x": np.zeros((10, 3), np.float32), "y": np.zeros(10, np.int64)}
    with pytest.raises(DatasetError, match=r"shape \(9, 3\), expected \(10, 3\)"):
        w.write_shard(0, ok | {"x": np.zeros((9, 3), np.float32)})
    with pytest.raises(DatasetError, match="dtype float64, expected float32"):
        w.write_shard(0, ok | {"x": np.zeros((10, 3))})
    with pytest.raises(DatasetError, match="expected exactly"):
        w.write_shard(0, {"x": ok["x"]})
    with pytest.raises(DatasetError, match="out of range"):
        w.write_shard(3, ok)
    w.write_shard(2, {"x": np.ones((5, 3), np.float32), "y": np.ones(5, np.int64)})  # short last shard
    assert w.pending() == [0, 1]


def test_sharded_writer_rounds_shard_rows_to_whole_chunks(tmp_path: Path) -> None:
    w = ShardedWriter(
        tmp_path / "w.zarr",
        n_rows=10_000,
        shard_rows=1000,
        schema={"img": ((3, 32, 32), "uint8"), "label": ((), "int64")},
        kind="images",
        producer="p",
        params_hash="ph",
    )
    img = zarr.open_array(str(tmp_path / "w.zarr" / "img"), mode="r")
    assert img.chunks[0] == 342 and w.shard_rows == 1026 and img.shards[0] == 1026  # 342 rows = 1 MiB
    assert w.n_shards == 10 and w.shard_range(9) == (9234, 10_000)


def test_sharded_writer_processes_share_progress(tmp_path: Path) -> None:
    """Two processes writing disjoint shards of one writer must not lose each other's progress."""
    code = textwrap.dedent(
        """
        import sys, numpy as np
        from storage.sharded import ShardedWriter
        w = ShardedWriter(sys.argv[1], n_rows=400, shard_rows=10, schema={"x": ((2,), "int32")},
                          kind="k", producer="p", params_hash="h")
        for i in range(int(sys.argv[2]), w.n_shards, 2):
            s, e = w.shard_range(i)
            w.write_shard(i, {"x": np.arange(2 * s, 2 * e, dtype=np.int32).reshape(-1, 2)})
        """
    )
    path = tmp_path / "w.zarr"
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(k)], env=env) for k in (0, 1)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    w = ShardedWriter(
        path, n_rows=400, shard_rows=10, schema={"x": ((2,), "int32")}, kind="k", producer="p", params_hash="h"
    )
    assert w.pending() == []
    w.finalize(tmp_path / "final.zarr")
    got = open_dataset(tmp_path / "final.zarr", verify=True).load("x")
    assert np.array_equal(got, np.arange(800, dtype=np.int32).reshape(400, 2))


def test_zero_rows(tmp_path: Path) -> None:
    h = _write(tmp_path / "e.zarr", {"a": np.zeros((0, 3), np.float32)})
    ds = open_dataset(tmp_path / "e.zarr", verify=True)
    assert ds.n_rows == 0 and ds.load("a").shape == (0, 3) and h == ds.attrs["content_hash"]
