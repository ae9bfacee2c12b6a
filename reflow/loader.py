"""Where the training loop's batches come from: RAM when the data fits, zarr chunk by chunk when it does not.

Both sources answer one question, `batch(step, global_batch, rank, local_batch)`, as a pure function of
(seed, step, rank). That is what keeps a resumed run bitwise equal to an uninterrupted one: no iterator
state has to be checkpointed, only the step counter.

- `InMemorySource` holds every row on the training device and gathers a batch by index: an epoch is a
  fresh permutation of all rows. This is the fast path and the right one whenever the data fits.
- `ChunkedSource` reads a zarr dataset one inner chunk (~1 MiB of rows, the unit zarr decodes anyway) at
  a time. An epoch visits the chunks in a random order and the rows inside each chunk in a random order
  (chunk-level shuffling, as WebDataset-style loaders do); consecutive positions stay inside one chunk,
  so a batch touches at most two chunks and a small cache of decoded chunks serves every read.

`batch_source` picks between them by the dataset's size against a RAM budget (half the memory available
when the run starts, unless `compute.ram_budget_gb` says otherwise).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (SplitMix64 finaliser over a running combination)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


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

    def batch(self, step: int, global_batch: int, rank: int, local_batch: int) -> Batch:
        idx = self.sampler.indices(step, global_batch, rank, local_batch)
        idx = idx.to(next(iter(self.data.values())).device)
        return {k: v[idx] for k, v in self.data.items()}


class ChunkedSource:
    """Rows `[0, rows)` of a zarr dataset, read one inner chunk at a time with chunk-level shuffling.

    `dataset` is a `storage.datasets.Dataset`; `names` the arrays to train on; `convert` turns a chunk's
    NumPy arrays into tensors (dtype fixes such as labels to int64). At most `cache_chunks` decoded chunks
    are kept, so memory stays flat however large the dataset is.
    """

    def __init__(self, dataset, names: Sequence[str], seed: int, *, rows: int | None = None,
                 device: torch.device | str = "cpu", cache_chunks: int = 4,
                 convert: Callable[[str, np.ndarray], torch.Tensor] | None = None):
        self.dataset, self.names, self.seed = dataset, list(names), seed
        self.n = dataset.n_rows if rows is None else int(rows)
        if not 1 <= self.n <= dataset.n_rows:
            raise ValueError(f"{dataset.path}: training on {self.n} of {dataset.n_rows} rows; expected 1..n_rows")
        # The narrowest chunk grid (the widest rows) is one every array can be read along cheaply.
        self.block = min(dataset.chunk_rows(name) for name in self.names)
        self.n_chunks = -(-self.n // self.block)
        self.sizes = torch.tensor([min(self.block, self.n - c * self.block) for c in range(self.n_chunks)])
        self.device, self.cache_chunks = torch.device(device), cache_chunks
        self.convert = convert or (lambda name, a: torch.from_numpy(a))
        self._cache: OrderedDict[int, Batch] = OrderedDict()
        self._epoch: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._inner: dict[tuple[int, int], torch.Tensor] = {}
        self.chunks_read = 0

    def _order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(chunk visiting order, cumulative rows along it) of one epoch."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = _permutation(self.n_chunks, self.seed, epoch)
            self._epoch = (epoch, order, self.sizes[order].cumsum(0))
            self._inner = {}
        return self._epoch[1], self._epoch[2]

    def _inner_order(self, epoch: int, chunk: int) -> torch.Tensor:
        """The order of the rows inside `chunk` during `epoch`."""
        key = (epoch, chunk)
        if key not in self._inner:
            self._inner[key] = _permutation(int(self.sizes[chunk]), self.seed, epoch, chunk, 1)
        return self._inner[key]

    def _chunk(self, c: int) -> Batch:
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        start, stop = c * self.block, c * self.block + int(self.sizes[c])
        rows = {name: self.convert(name, self.dataset.read(name, start, stop)) for name in self.names}
        self.chunks_read += 1
        self._cache[c] = rows
        while len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return rows

    def rows_at(self, positions: torch.Tensor) -> list[tuple[int, int]]:
        """(chunk, row inside the chunk) of each global position."""
        out = []
        for pos in positions.tolist():
            epoch, q = divmod(pos, self.n)
            order, cum = self._order(epoch)
            slot = int(torch.searchsorted(cum, q, right=True))
            chunk = int(order[slot])
            offset = q - (int(cum[slot - 1]) if slot else 0)
            out.append((chunk, int(self._inner_order(epoch, chunk)[offset])))
        return out

    def batch(self, step: int, global_batch: int, rank: int, local_batch: int) -> Batch:
        where = self.rows_at(_positions(step, global_batch, rank, local_batch))
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        # Group by chunk (a batch spans one or two), keeping the batch's row order.
        runs: list[tuple[int, list[int]]] = []
        for chunk, row in where:
            if runs and runs[-1][0] == chunk:
                runs[-1][1].append(row)
            else:
                runs.append((chunk, [row]))
        for chunk, rows in runs:
            data = self._chunk(chunk)
            index = torch.tensor(rows)
            for name in self.names:
                parts[name].append(data[name][index])
        return {name: torch.cat(p).to(self.device) for name, p in parts.items()}


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


def dataset_bytes(dataset, names: Sequence[str], rows: int) -> int:
    """Decoded size of `rows` rows of the named arrays."""
    total = 0
    for name in names:
        arr = dataset[name]
        total += rows * int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    return total


def batch_source(dataset, names: Sequence[str], seed: int, *, rows: int | None = None,
                 device: torch.device | str = "cpu", ram_budget_bytes: int | None = None,
                 convert: Callable[[str, np.ndarray], torch.Tensor] | None = None):
    """`InMemorySource` when rows `[0, rows)` fit in the RAM budget, else `ChunkedSource`."""
    rows = dataset.n_rows if rows is None else rows
    budget = available_memory_bytes() // 2 if ram_budget_bytes is None else ram_budget_bytes
    convert = convert or (lambda name, a: torch.from_numpy(a))
    if dataset_bytes(dataset, names, rows) <= budget:
        return InMemorySource({n: convert(n, dataset.read(n, 0, rows)) for n in names}, seed, device)
    return ChunkedSource(dataset, names, seed, rows=rows, device=device, convert=convert)
