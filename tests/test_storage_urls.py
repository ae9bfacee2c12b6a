"""storage.datasets behind fsspec URLs, on the real zarr FsspecStore and fsspec backends (no network):
memory:// and file:// round trips with the local path's content hash, the same integrity checks, and
errors that name the URL and what to install."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from storage.datasets import open_dataset, write_dataset
from storage.layout import DatasetError

ROOT = Path(__file__).resolve().parents[1]


def _arrays(n: int = 200) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"images": rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).astype(np.int64),
            "zeros": np.zeros((n, 4), np.float32)}  # all-fill shards are still written, and checked


def _write(where, **kw) -> str:
    return write_dataset(where, _arrays(), kind="images", producer="prepare", params_hash="p1", **kw)


@pytest.fixture
def mem_url():
    """A fresh memory:// prefix (the memory filesystem is process-wide), removed afterwards."""
    root = f"/reflow-test-{uuid.uuid4().hex}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_url_round_trip_has_the_local_content_hash(tmp_path, mem_url):
    local_hash = _write(tmp_path / "train.zarr")
    url = f"{mem_url}/train.zarr"
    assert _write(url) == local_hash
    ds = open_dataset(url, kind="images", expect={"images": (3, 8, 8), "labels": ()}, verify=True)
    assert ds.path == url and ds.n_rows == 200 and ds.attrs["content_hash"] == local_hash
    for name, a in _arrays().items():
        assert np.array_equal(ds.load(name), a)
    # Same layout as locally: the same files under the same keys.
    fs = fsspec.filesystem("memory")
    remote_keys = sorted(p.split("/train.zarr/", 1)[1] for p in fs.find(url.removeprefix("memory://")))
    local_keys = sorted(str(p.relative_to(tmp_path / "train.zarr")) for p in (tmp_path / "train.zarr").rglob("*")
                        if p.is_file())
    assert remote_keys == local_keys


def test_file_url_is_the_local_path(tmp_path):
    url = (tmp_path / "ref.zarr").as_uri()
    assert url.startswith("file:///")
    h = _write(url)
    assert h == open_dataset(tmp_path / "ref.zarr", verify=True).attrs["content_hash"]
    assert open_dataset(url, verify=True).verify() == h
    # Written through the local path code (temp sibling + rename): nothing but the dataset is left.
    assert [p.name for p in tmp_path.iterdir()] == ["ref.zarr"]


def test_rewriting_a_url_replaces_the_old_dataset(mem_url):
    url = f"{mem_url}/d.zarr"
    write_dataset(url, {"a": np.ones((50, 3), np.float32), "old": np.zeros(50)},
                  kind="k", producer="p", params_hash="h")
    h = write_dataset(url, {"a": np.full((20, 3), 2, np.float32)}, kind="k", producer="p", params_hash="h2")
    ds = open_dataset(url, verify=True)
    assert ds.names == ["a"] and ds.n_rows == 20 and ds.attrs["content_hash"] == h
    assert np.all(ds.load("a") == 2)


def test_url_integrity_checks_match_the_local_ones(mem_url):
    fs = fsspec.filesystem("memory")
    url = f"{mem_url}/p.zarr"
    root = url.removeprefix("memory://")
    _write(url)
    shard = sorted(p for p in fs.find(root) if "/images/c/" in p)[0]

    # A flipped byte fails crc32c on read, naming the URL and the array.
    blob = bytearray(fs.cat_file(shard))
    blob[len(blob) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(blob))
    with pytest.raises(DatasetError, match=r"memory://.*p\.zarr.*'images'.*corrupt"):
        open_dataset(url, verify=True)

    # A missing shard is an error, not zeros.
    fs.rm(shard)
    with pytest.raises(DatasetError, match=r"memory://.*'images' is incomplete: 1 of"):
        open_dataset(url)

    # An interrupted write (zarr.json without content_hash) is unfinished, not a dataset.
    _write(url)
    meta = json.loads(fs.cat_file(f"{root}/zarr.json"))
    del meta["attributes"]["content_hash"]
    fs.pipe_file(f"{root}/zarr.json", json.dumps(meta).encode())
    with pytest.raises(DatasetError, match=r"missing \['content_hash'\].*interrupted write to a URL"):
        open_dataset(url)


def test_url_errors_name_the_url_and_the_fix(mem_url):
    with pytest.raises(DatasetError, match=r"memory://.*/absent\.zarr: does not exist"):
        open_dataset(f"{mem_url}/absent.zarr")
    fsspec.filesystem("memory").pipe_file(f"{mem_url.removeprefix('memory://')}/notzarr/x.txt", b"hi")
    with pytest.raises(DatasetError, match=r"notzarr: is not a zarr v3 group"):
        open_dataset(f"{mem_url}/notzarr")
    with pytest.raises(DatasetError, match=r"nosuch://x\.zarr: not a usable URL \(Protocol not known: nosuch\)"):
        open_dataset("nosuch://x.zarr")
    with pytest.raises(DatasetError, match=r"storage_options .* local path"):
        open_dataset("artifacts/x.zarr", storage_options={"anon": True})


def test_missing_backend_names_the_url_and_what_to_install(tmp_path):
    # A fresh interpreter in which s3fs cannot be imported, as on an install without the s3 extra.
    code = textwrap.dedent("""
        import sys
        sys.modules["s3fs"] = None  # import s3fs -> ImportError, exactly as when it is not installed
        import numpy as np
        from storage.datasets import open_dataset, write_dataset
        from storage.layout import DatasetError
        for call in (lambda: open_dataset("s3://bucket/train.zarr"),
                     lambda: write_dataset("s3://bucket/train.zarr", {"a": np.zeros(2)}, kind="k",
                                           producer="p", params_hash="h")):
            try:
                call()
            except DatasetError as e:
                print(e)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("dataset s3://bucket/train.zarr: no fsspec backend for s3://")
        assert "s3fs" in line and "pip install 'reflow[s3]'" in line


def test_unreachable_s3_endpoint_names_the_url():
    pytest.importorskip("s3fs")
    # A bound but never listening loopback port: connections are refused at once, nothing leaves the host.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        # One attempt per request: botocore would otherwise retry the refused connection with backoff.
        options = {"anon": True, "endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
        with pytest.raises(DatasetError, match=r"s3://bucket/train\.zarr: cannot list it .*check the URL, the network"):
            open_dataset("s3://bucket/train.zarr", storage_options=options)
        with pytest.raises(DatasetError, match=r"s3://bucket/train\.zarr: writing failed .*no content_hash"):
            _write("s3://bucket/train.zarr", storage_options=options)
