"""The fixed, class-stratified splits (train, the FID extractor's, the FID reference, the real-data floor) and
class-stratified draws of indices."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["class_grid_indices", "split_dataset", "stratified_sample"]


def split_dataset(labels: np.ndarray, held_out: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified splits of indices: each named split in `held_out` and `"train"`, the rest.

    Each class of n images gives each held-out split, in the order given, round-half-up(fraction * n) of
    them, at least 1 while at least one image is left for training; so every class stays in training, and
    a class too small for every split misses the last ones. Fixed for a seed; every index array sorted int64.
    """
    bad = {name: f for name, f in held_out.items() if not 0.0 < f < 1.0}
    if bad or sum(held_out.values()) >= 1.0:
        raise ValueError(f"held-out fractions must each be in (0, 1) and sum below 1, got {held_out}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in (*held_out, "train")}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n, start = len(members), 0
        for name, fraction in held_out.items():
            room = n - start - 1  # keep one for training
            k = min(max(1, math.floor(fraction * n + 0.5)), room) if room > 0 else 0
            parts[name].append(members[start : start + k])
            start += k
        parts["train"].append(members[start:])
    return {name: np.sort(np.concatenate(chunks)).astype(np.int64) for name, chunks in parts.items()}


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices drawn without replacement, each class in proportion to its share (largest remainders),
    in class-interleaved order: row r of a grid with one column per class shows the r-th draw of each."""
    labels = np.asarray(labels)
    if not 0 < n <= len(labels):
        raise ValueError(f"cannot draw {n} of {len(labels)} images")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(take - quota, kind="stable")[: n - take.sum()]] += 1
    drawn = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take, strict=True)]
    order = sorted(((r, ci) for ci, d in enumerate(drawn) for r in range(len(d))))
    return np.asarray([drawn[ci][r] for r, ci in order], dtype=np.int64)


def class_grid_indices(labels: np.ndarray, rows: int, seed: int, max_classes: int = 16) -> tuple[np.ndarray, int]:
    """Indices for a preview grid with one column per class (the first `max_classes`) and up to `rows`
    images of each, drawn at random: (indices in row-major order, columns). Never the first rows of a
    class-sorted set, which would show one class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)[:max_classes]
    columns = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    rows = min(rows, *(len(col) for col in columns))  # full rows only, so each column stays one class
    return np.asarray([col[r] for r in range(rows) for col in columns], dtype=np.int64), len(classes)
