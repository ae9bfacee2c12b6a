"""Where the training loop's batches come from: RAM when the data fits, zarr chunk by chunk when it does not.

Both sources answer one question, `batch(step, global_batch, rank, local_batch)`, as a pure function of
(seed, step, rank). That is what keeps a resumed run bitwise equal to an uninterrupted one: no iterator
state has to be checkpointed, only the step counter.

- `InMemorySource` holds every row on the training device and gathers a batch by index: an epoch is a
  fresh permutation of all rows. This is the fast path and the right one whenever the data fits.
- `ChunkedSource` reads a zarr dataset one inner chunk (~1 MiB of rows, the unit zarr decodes anyway) at
  a time. An epoch visits the chunks in a random order, cut into windows of `cache_chunks` chunks, and
  deals the rows of each window in a random order (a shuffle buffer, as WebDataset-style loaders keep):
  a batch mixes rows of a whole window, every row is still seen once per epoch, and each chunk is decoded
  once per epoch into a cache that holds one window. Chunk-level shuffling alone (a batch from one or two
  chunks) is not enough on class-sorted rows, as `extract` writes them for an ImageFolder: a batch of 256
  would hold a handful of classes.

`batch_source` picks between them by the dataset's size against a RAM budget (half the memory available
when the run starts, unless `compute.ram_budget_gb` says otherwise), and gives the shuffle buffer a quarter of
that budget.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from reflow.seeds import mix_seed

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    """Rows to train on; `batch` is this rank's share of the global batch at `step`, on the training device."""

    n: int

    def to(self, device: torch.device | str) -> BatchSource: ...

    def batch(self, step: int, global_batch: int, rank: int, local_batch: int) -> Batch: ...


def as_tensor(name: str, rows: np.ndarray) -> torch.Tensor:
    """A chunk's rows as a tensor; integer columns (labels, segment indices) become int64 as the models want."""
    t = torch.from_numpy(np.ascontiguousarray(rows))
    return t.long() if not t.is_floating_point() else t


def _columns(names: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """{batch key: array name}; a plain list of names keeps each name as its key."""
    return dict(names) if isinstance(names, Mapping) else {n: n for n in names}


def _permutation(n: int, *seed_parts: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(*seed_parts)))


def _positions(step: int, global_batch: int, rank: int, local_batch: int) -> torch.Tensor:
    """Global sample positions of this rank's share of the batch at `step` (ranks take consecutive slices)."""
    start = step * global_batch + rank * local_batch
    return torch.arange(start, start + local_batch)


class EpochSampler:
    """Indices of the batch at a given step: consecutive slices of a fresh permutation per epoch."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"cannot sample batches from {n} rows; expected at least one")
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: _permutation(self.n, self.seed, epoch)}
        return self._perms[epoch]

    def indices(self, step: int, global_batch: int, rank: int, local_batch: int) -> torch.Tensor:
        positions = _positions(step, global_batch, rank, local_batch)
        out = torch.empty(local_batch, dtype=torch.long)
        epochs = positions.div(self.n, rounding_mode="floor")
        for epoch in epochs.unique().tolist():
            sel = epochs == epoch
            out[sel] = self._perm(epoch)[positions[sel] % self.n]
        return out


class InMemorySource:
    """Every row in RAM (on the training device); a batch is a gather."""

    def __init__(self, data: Batch, seed: int, device: torch.device | str = "cpu"):
        sizes = {k: len(v) for k, v in data.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"training arrays disagree on the number of rows: {sizes}")
        self.data = {k: v.to(device) for k, v in data.items()}
        self.n = next(iter(sizes.values()))
        self.sampler = EpochSampler(self.n, seed)

    def to(self, device: torch.device | str) -> InMemorySource:
        self.data = {k: v.to(device) for k, v in self.data.items()}
        return self

    def batch(self, step: int, global_batch: int, rank: int, local_batch: int) -> Batch:
        idx = self.sampler.indices(step, global_batch, rank, local_batch)
        idx = idx.to(next(iter(self.data.values())).device)
        return {k: v[idx] for k, v in self.data.items()}


# The smallest shuffle buffer: on 10 class-sorted classes of ~4 chunks each, 16 chunks give a batch 0.92 of the
# classes an i.i.d. batch holds (tests/test_loader.py asks for 0.8; 4 chunks gave 0.49); a window of the whole set
# is i.i.d. Memory: this many decoded chunks of ~1 MiB per array.
MIN_WINDOW_CHUNKS = 16


class ChunkedSource:
    """Rows `[0, rows)` of a zarr dataset, read one inner chunk at a time and mixed in windows of chunks.

    `dataset` is a `storage.datasets.Dataset` (or `StackedViews` of one); `names` the arrays to train on, or
    {batch key: array name}; `convert` turns a chunk's NumPy rows into a tensor. An epoch visits the chunks in
    a random order, split into windows of at most `cache_chunks` chunks (near-equal counts), and deals the rows
    of each window in a random order: a batch draws from every chunk of its window, as an i.i.d. batch would
    from the whole set when a window spans its classes. At most `cache_chunks` decoded chunks are kept (one
    window), so memory stays flat however large the dataset is, and `chunks_read` grows by the number of chunks
    per epoch.
    """

    def __init__(self, dataset, names: Sequence[str] | Mapping[str, str], seed: int, *, rows: int | None = None,
                 device: torch.device | str = "cpu", cache_chunks: int = MIN_WINDOW_CHUNKS,
                 convert: Callable[[str, np.ndarray], torch.Tensor] = as_tensor):
        self.dataset, self.columns, self.seed = dataset, _columns(names), seed
        self.n = dataset.n_rows if rows is None else int(rows)
        if not 1 <= self.n <= dataset.n_rows:
            raise ValueError(f"{dataset.path}: training on {self.n} of {dataset.n_rows} rows; expected 1..n_rows")
        if cache_chunks < 1:
            raise ValueError(f"{dataset.path}: cache_chunks={cache_chunks}; expected at least one chunk")
        # The narrowest chunk grid (the widest rows) is one every array can be read along cheaply.
        self.block = min(dataset.chunk_rows(name) for name in self.columns.values())
        self.n_chunks = -(-self.n // self.block)
        self.sizes = torch.tensor([min(self.block, self.n - c * self.block) for c in range(self.n_chunks)])
        self.device, self.cache_chunks = torch.device(device), cache_chunks
        # Windows split the chunk order into near-equal counts, so the last one is not a lone leftover chunk.
        n_windows = -(-self.n_chunks // cache_chunks)
        self.window_edges = [w * self.n_chunks // n_windows for w in range(n_windows + 1)]
        self.convert = convert
        self._cache: OrderedDict[int, Batch] = OrderedDict()
        self._epoch: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._deals: dict[tuple[int, int], torch.Tensor] = {}
        self.chunks_read = 0

    def _order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chunk visiting order, cumulative rows along it) of one epoch."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = _permutation(self.n_chunks, self.seed, epoch)
            self._epoch = (epoch, order, self.sizes[order].cumsum(0))
            self._deals = {}
        return self._epoch[1], self._epoch[2]

    def _deal(self, epoch: int, window: int, rows: int) -> torch.Tensor:
        """The order in which `window`'s rows (counted along the visiting order) are dealt during `epoch`."""
        if (epoch, window) not in self._deals:
            self._deals[(epoch, window)] = _permutation(rows, self.seed, epoch, window, 2)
        return self._deals[(epoch, window)]

    def _chunk(self, c: int) -> Batch:
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        start, stop = c * self.block, c * self.block + int(self.sizes[c])
        rows = {key: self.convert(key, self.dataset.read(name, start, stop)) for key, name in self.columns.items()}
        self.chunks_read += 1
        self._cache[c] = rows
        while len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return rows

    def to(self, device: torch.device | str) -> ChunkedSource:
        self.device = torch.device(device)
        return self

    def rows_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chunk, row inside that chunk, place in the visiting order counted over epochs) of each global
        position, vectorised per epoch and window."""
        chunks, rows, visits = (torch.empty_like(positions) for _ in range(3))
        epochs = positions.div(self.n, rounding_mode="floor")
        edges = torch.tensor(self.window_edges)
        for epoch in epochs.unique().tolist():
            in_epoch = epochs == epoch
            q = positions[in_epoch] - epoch * self.n
            order, cum = self._order(epoch)
            starts = torch.cat([cum.new_zeros(1), cum])  # rows before each slot of the visiting order
            window_rows = starts[edges]  # rows before each window
            window = torch.searchsorted(window_rows[1:], q, right=True)
            dealt = torch.empty_like(q)  # the row's index along the visiting order (0..n-1)
            for w in window.unique().tolist():
                mine = window == w
                first, size = int(window_rows[w]), int(window_rows[w + 1] - window_rows[w])
                dealt[mine] = first + self._deal(epoch, w, size)[q[mine] - first]
            slot = torch.searchsorted(cum, dealt, right=True)
            chunks[in_epoch], rows[in_epoch] = order[slot], dealt - starts[slot]
            visits[in_epoch] = epoch * self.n_chunks + slot
        return chunks, rows, visits

    def batch(self, step: int, global_batch: int, rank: int, local_batch: int) -> Batch:
        chunks, rows, visits = self.rows_at(_positions(step, global_batch, rank, local_batch))
        # Chunks in visiting order: a batch that crosses into the next window finishes the old window's chunks
        # before it decodes the new one's, so a cache of one window decodes each chunk once per epoch.
        by_visit = visits.argsort(stable=True)
        counts = torch.unique_consecutive(visits[by_visit], return_counts=True)[1].tolist()
        parts: dict[str, list[torch.Tensor]] = {key: [] for key in self.columns}
        for mine in by_visit.split(counts):
            data = self._chunk(int(chunks[mine[0]]))
            for key in self.columns:
                parts[key].append(data[key][rows[mine]])
        back = by_visit.argsort()  # back to the batch's own (dealt) order
        return {key: torch.cat(p)[back].to(self.device) for key, p in parts.items()}


def available_memory_bytes() -> int:
    """Memory the OS can give us now (MemAvailable), falling back to the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def dataset_bytes(dataset, names: Sequence[str] | Mapping[str, str], rows: int) -> int:
    """Decoded size of `rows` rows of the named arrays."""
    total = 0
    for name in _columns(names).values():
        arr = dataset[name]
        total += rows * int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    return total


def batch_source(dataset, names: Sequence[str] | Mapping[str, str], seed: int, *, rows: int | None = None,
                 device: torch.device | str = "cpu", ram_budget_gb: float | None = None,
                 convert: Callable[[str, np.ndarray], torch.Tensor] = as_tensor) -> BatchSource:
    """`InMemorySource` when rows `[0, rows)` fit in the RAM budget (half the available memory when
    `ram_budget_gb` is None), else `ChunkedSource` with a quarter of the budget as its shuffle buffer (at least
    `MIN_WINDOW_CHUNKS` chunks). `names`: arrays, or {batch key: array name}."""
    rows = dataset.n_rows if rows is None else rows
    budget = available_memory_bytes() // 2 if ram_budget_gb is None else int(ram_budget_gb * 2**30)
    columns = _columns(names)
    if dataset_bytes(dataset, columns, rows) <= budget:
        return InMemorySource({key: convert(key, dataset.read(name, 0, rows)) for key, name in columns.items()},
                              seed, device)
    block = min(dataset.chunk_rows(name) for name in columns.values())
    window = max(MIN_WINDOW_CHUNKS, budget // 4 // max(1, dataset_bytes(dataset, columns, block)))
    return ChunkedSource(dataset, columns, seed, rows=rows, device=device, cache_chunks=window, convert=convert)


class StackedViews:
    """Same-shaped arrays of one dataset read as one array `len(views)` times longer, view after view.

    The DiT trains on latents and their mirror images (`z1`, `z1_flip`) as rows of one epoch; this gives
    `ChunkedSource` that epoch without writing the stack anywhere. `views` maps a name to its arrays, one
    per view (the same array twice for columns shared by the views, such as labels).
    """

    def __init__(self, dataset, views: Mapping[str, Sequence[str]]):
        counts = {len(v) for v in views.values()}
        if len(counts) != 1:
            raise ValueError(f"{dataset.path}: every column needs one array per view, got {dict(views)}")
        self.dataset, self.views, self.path = dataset, {k: list(v) for k, v in views.items()}, dataset.path
        self.n_views, self.rows_per_view = counts.pop(), dataset.n_rows
        self.n_rows = self.n_views * self.rows_per_view

    def __getitem__(self, name: str):
        return self.dataset[self.views[name][0]]

    def chunk_rows(self, name: str) -> int:
        return min(self.dataset.chunk_rows(a) for a in self.views[name])

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        parts, n = [], self.rows_per_view
        for view, array in enumerate(self.views[name]):
            lo, hi = max(start, view * n), min(stop, (view + 1) * n)
            if lo < hi:
                parts.append(self.dataset.read(array, lo - view * n, hi - view * n))
        return np.concatenate(parts)
