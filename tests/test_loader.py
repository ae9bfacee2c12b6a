"""Training batches from RAM or chunk by chunk from a real zarr dataset (training.loader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.datasets import open_dataset, write_dataset
from storage.resume import FileResume
from training.loader import ChunkedSource, EpochSampler, InMemorySource, StackedViews, batch_source, dataset_bytes
from training.loop import TrainConfig, make_accelerator, train

ROW_SHAPE = (4, 16, 16)  # 4 KiB of float32 per row: 256 rows per ~1 MiB inner chunk


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A real pairs dataset of several inner chunks whose rows carry their own index."""
    n = 1100  # 4 full chunks of 256 rows and a partial one of 76
    index = np.arange(n, dtype=np.int64)
    z0 = np.broadcast_to(index[:, None, None, None], (n, *ROW_SHAPE)).astype(np.float32)
    path = tmp_path_factory.mktemp("loader") / "pairs.zarr"
    write_dataset(path, {"z0": z0, "z1": -z0, "label": index % 10, "index": index}, kind="pairs",
                  producer="test", params_hash="0")
    ds = open_dataset(path, kind="pairs")
    assert ds.chunk_rows("z0") == 256 and ds.n_rows == n
    return ds


def epoch_rows(source, n: int, batch: int = 50) -> list[int]:
    rows: list[int] = []
    for step in range(-(-n // batch)):
        rows += source.batch(step, batch, 0, batch)["index"].tolist()
    return rows[:n]


def test_chunked_epoch_visits_every_row_once_and_decodes_each_chunk_once(pairs):
    source = ChunkedSource(pairs, ["z0", "z1", "index"], seed=3, cache_chunks=3)
    rows = epoch_rows(source, pairs.n_rows)
    assert sorted(rows) == list(range(pairs.n_rows))  # a permutation: every row exactly once per epoch
    assert rows != sorted(rows)  # shuffled
    # 5 chunks in windows of at most 3: a window of 2 chunks, then one of 3, each dealt as one shuffled pile...
    chunks = [r // 256 for r in rows]
    first = set(chunks[:100])
    cut = sum(int(source.sizes[c]) for c in first)
    assert len(first) == 2 and set(chunks[:cut]) == first and len(set(chunks[cut:]) - first) == 3
    assert sum(a != b for a, b in zip(chunks[:cut], chunks[1:cut], strict=False)) > cut // 4  # mixed, not walked
    # ... not in storage order, and each chunk decoded once with a cache of one window.
    assert sorted(first) != [0, 1]
    assert source.chunks_read == source.n_chunks and len(source._cache) <= 3


def test_class_coverage_per_batch(tmp_path):
    """On class-sorted rows (what `extract` writes for an ImageFolder: its train split keeps the sorted class folders'
    order), a chunked batch holds nearly as many classes as an i.i.d. batch, and reads each chunk once an epoch.

    10,000 rows of 10 classes, 256-row chunks, batch 256 (measured: i.i.d. 10.0 classes a batch; one or two chunks a
    batch, the loader before windows, 2.3; a window of 16 chunks 9.2)."""
    n, classes, batch = 10_000, 10, 256
    label = np.repeat(np.arange(classes), n // classes)
    write_dataset(tmp_path / "sorted.zarr", {"z1": np.zeros((n, *ROW_SHAPE), np.float32), "label": label},
                  kind="latents", producer="test", params_hash="0")
    ds = open_dataset(tmp_path / "sorted.zarr", kind="latents")
    assert ds.chunk_rows("z1") == 256
    steps = n // batch

    def classes_per_batch(source) -> float:
        return float(np.mean([len(source.batch(s, batch, 0, batch)["label"].unique()) for s in range(steps)]))

    iid = classes_per_batch(InMemorySource({"label": torch.from_numpy(label)}, seed=0))
    windowed = ChunkedSource(ds, ["z1", "label"], seed=0)  # the default window, MIN_WINDOW_CHUNKS chunks
    one_chunk = ChunkedSource(ds, ["z1", "label"], seed=0, cache_chunks=1)  # a batch from one or two chunks
    assert iid > 9.5
    assert classes_per_batch(windowed) >= 0.8 * iid
    assert classes_per_batch(one_chunk) <= 0.3 * iid  # what the bound guards against
    assert windowed.chunks_read == one_chunk.chunks_read == windowed.n_chunks  # no more reads for the mixing


def test_chunked_rows_follow_their_arrays(pairs):
    source = ChunkedSource(pairs, ["z0", "z1", "label", "index"], seed=0)
    b = source.batch(7, 64, 0, 64)
    idx = b["index"]
    assert torch.equal(b["z0"][:, 0, 0, 0], idx.float()) and torch.equal(b["z1"], -b["z0"])
    assert torch.equal(b["label"], idx % 10)


def test_chunked_is_a_pure_function_of_seed_and_step(pairs):
    a = ChunkedSource(pairs, ["index"], seed=11)
    b = ChunkedSource(pairs, ["index"], seed=11)
    late_first = b.batch(40, 64, 0, 64)["index"]  # another epoch first: no iterator state matters
    for step in range(45):
        got = a.batch(step, 64, 0, 64)["index"]
        if step == 40:
            assert torch.equal(got, late_first)
    other = ChunkedSource(pairs, ["index"], seed=12)
    assert not torch.equal(other.batch(0, 64, 0, 64)["index"], a.batch(0, 64, 0, 64)["index"])
    # A new epoch visits the rows in a new order.
    n = pairs.n_rows
    first, second = epoch_rows(a, n), [a.batch(s, 1, 0, 1)["index"].item() for s in range(n, n + 50)]
    assert second != first[:50]


def test_chunked_held_out_rows_are_never_trained_on(pairs):
    rows = 900  # the last 200 rows are an evaluation split
    source = ChunkedSource(pairs, ["index"], seed=1, rows=rows)
    seen = torch.cat([source.batch(s, 64, 0, 64)["index"] for s in range(60)])  # > 4 epochs
    assert int(seen.max()) < rows and len(seen.unique()) == rows


def test_ranks_take_disjoint_slices_of_one_global_batch(pairs):
    for source in (ChunkedSource(pairs, ["index"], seed=5),
                   InMemorySource({"index": torch.from_numpy(pairs.load("index"))}, seed=5)):
        whole = source.batch(3, 64, 0, 64)["index"]
        halves = torch.cat([source.batch(3, 64, r, 32)["index"] for r in (0, 1)])
        assert torch.equal(whole, halves)


def test_memory_stays_flat_in_chunks(pairs):
    source = ChunkedSource(pairs, ["z0", "z1"], seed=2, cache_chunks=2)
    for step in range(80):
        source.batch(step, 64, 0, 64)
        assert len(source._cache) <= 2


def test_in_memory_source_is_the_epoch_permutation():
    data = {"x": torch.arange(100)}
    source = InMemorySource(data, seed=9)
    sampler = EpochSampler(100, 9)
    for step in (0, 1, 5, 17):
        assert torch.equal(source.batch(step, 32, 0, 32)["x"], sampler.indices(step, 32, 0, 32))


def test_batch_source_picks_by_ram_budget(pairs):
    names = ["z0", "z1", "label"]
    size = dataset_bytes(pairs, names, 1000)
    assert size == 1000 * (2 * 4 * 16 * 16 * 4 + 8)
    big = batch_source(pairs, names, seed=0, rows=1000, ram_budget_gb=size / 2**30)
    small = batch_source(pairs, names, seed=0, rows=1000, ram_budget_gb=(size - 1) / 2**30)
    assert isinstance(big, InMemorySource) and isinstance(small, ChunkedSource)
    a, b = big.batch(0, 16, 0, 16), small.batch(0, 16, 0, 16)
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}


def test_bad_row_count_names_the_dataset(pairs):
    with pytest.raises(ValueError, match="pairs.zarr.*2000 of 1100"):
        ChunkedSource(pairs, ["z0"], seed=0, rows=2000)


def test_stacked_views_are_one_longer_array(pairs):
    views = StackedViews(pairs, {"z": ["z0", "z1"], "index": ["index", "index"]})
    assert views.n_rows == 2 * pairs.n_rows
    whole = views.read("z", 0, views.n_rows)
    assert np.array_equal(whole, np.concatenate([pairs.load("z0"), pairs.load("z1")]))
    # A read across the seam between the views (1100 is not a multiple of the 256-row chunk).
    assert np.array_equal(views.read("index", 1090, 1110), np.r_[1090:1100, 0:10])
    source = ChunkedSource(views, ["z", "index"], seed=4)
    seen = torch.cat([source.batch(s, 100, 0, 100)["z"][:, 0, 0, 0] for s in range(22)])
    assert sorted(seen.tolist()) == sorted(list(range(1100)) + [-i for i in range(1100)])


def test_training_on_chunks_learns_and_resumes_bitwise(tmp_path):
    """training.loop.train on a ChunkedSource: the loss falls, and a resumed run equals an uninterrupted one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 256, generator=g)  # 1 KiB rows: 1024-row chunks, three of them
    w = torch.randn(256, 1, generator=g) / 16
    write_dataset(tmp_path / "rows.zarr", {"x": x.numpy(), "y": (x @ w).numpy()}, kind="pairs",
                  producer="test", params_hash="0")
    ds = open_dataset(tmp_path / "rows.zarr", kind="pairs")

    def objective(model, batch, generator, step):
        return (model(batch["x"]) - batch["y"]).pow(2).mean()

    def run(steps, resume=None, log=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(256, 1)
        cfg = TrainConfig(steps=steps, batch_size=64, lr=1e-2, ema_decay=0.9, log_every=10, checkpoint_every=10,
                          seed=3)
        source = ChunkedSource(ds, ["x", "y"], seed=cfg.seed)
        return train(model, objective, source, cfg, make_accelerator("cpu", "no"), resume=resume, log=log)

    logged = []
    straight = run(100, log=lambda m, step: logged.append(m["loss"]))  # > 2 epochs over the chunks
    assert logged[-1] < 0.1 * logged[0]
    resume = FileResume(tmp_path / "state.pt")
    run(50, resume=resume)
    resumed = run(100, resume=resume)
    assert resumed.resumed_from == 50
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
