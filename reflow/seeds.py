"""Every seed the pipeline derives, in one place: every batch order and every noise draw depends on these.

Two functions, because they answer two different questions:

- `mix_seed(*parts)` combines several integers (seed, epoch, step, rank, a tag) into one 63-bit seed. The
  training loop seeds its per-step generator with it and the batch sources their per-epoch permutations
  (`training/`), so that all training randomness is a pure function of (seed, step, rank) and a resumed
  run equals an uninterrupted one. It folds a variable number of parts; its output for a tuple of parts
  is all that matters, not any order between tuples.
- `sample_seeds(base_seed, start, stop)` is a stream indexed by sample: seed `i` of one base seed depends
  only on `(base_seed, i)`, distinct for every `i`, so any shard, batch size or number of processes
  regenerates sample `i`'s noise bit for bit (EDM's per-sample seeding; `per_sample_noise` draws it). This
  is part of the method's reproducibility: pairs, students' inputs and evaluation noise all come from it.

Neither may change its outputs: every artifact (datasets, weights, evaluations) depends on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Several integers -> one seed
# ---------------------------------------------------------------------------------------------------------


def mix_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (SplitMix64 finaliser over a running combination)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------------------------------------
# Per-sample seeds and noise
# ---------------------------------------------------------------------------------------------------------

_MASK63 = (1 << 63) - 1
_GAMMA = 0x9E3779B97F4A7C15 & _MASK63  # SplitMix64's odd increment (golden ratio), on 63 bits


def _mix63(z: int) -> int:
    """SplitMix64's finaliser on 63 bits: a bijection of [0, 2^63) (xor-shifts, odd multipliers)."""
    z &= _MASK63
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK63
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK63
    return z ^ (z >> 31)


def sample_seeds(base_seed: int, start: int, stop: int) -> list[int]:
    """Seeds of samples `start .. stop - 1`: a SplitMix stream on 63 bits keyed by `base_seed`.

    `seed_i = mix(mix(base_seed) + (i + 1) * GAMMA mod 2^63)` with `mix` SplitMix64's finaliser. Stable
    (pure integer arithmetic, no RNG state), distinct for every index of one base seed (`GAMMA` is odd
    and `mix` a bijection), unrelated across base seeds, and in [0, 2^63) so they fit an int64 column.
    """
    key = _mix63(base_seed)
    return [_mix63(key + (i + 1) * _GAMMA) for i in range(start, stop)]


def per_sample_noise(
    seeds: Sequence[int] | Tensor, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard Gaussian noise `[len(seeds), *shape]` on the CPU, row `i` from its own generator.

    Row `i` depends only on `seeds[i]`, so any shard or batch size regenerates it bit for bit (EDM's
    per-sample seeding). Move it to the device afterwards.
    """
    seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    return torch.stack(rows) if rows else torch.empty((0, *shape), dtype=dtype)


def balanced_labels(start: int, stop: int, num_classes: int) -> np.ndarray:
    """Sample i gets class i mod K: every shard is class-balanced and labels need no RNG."""
    return np.arange(start, stop, dtype=np.int64) % num_classes
