"""What a pair set looks like, recorded by every pair stage beside its throughput (`metrics/<stage>.json`).

- The endpoint distance `||z1 - z0|| / sqrt(d)` (mean and quantiles): how far the coupling transports, the
  quantity Re-MeanFlow's filter cuts at its top end.
- A check that the noise end is the noise: `z0` should be standard Gaussian (mean 0, std 1, kurtosis 3) and
  `z1` further from it. A pair set written the wrong way round fails this, and the stage says so.
- `pairs_curvature`: how far the paths that made the pairs were from straight lines at constant speed, the
  time-mean `||dx/dt - chord||^2` over the mean `||chord||^2` (`reflow.curvature.PathCurvature`; 0 for a straight
  path, RectifiedFlow's straightness made scale-free). Recorded as the rows are generated, over every path the
  stage's main process integrated in this run (`pairs_curvature_paths` of them): one per pair from `z0` to
  `z1`, one per integrated segment for SeqRF's rows (the segments a trajectory start was carried through
  included). Absent when no path made the pairs (`random_paired`, or every shard already on disk) or none
  moved (a network that outputs 0).

The rest is measured on the first `SAMPLE_ROWS` rows, which the pair stages fill class-balanced (labels i mod K).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from reflow.curvature import PathCurvature

SAMPLE_ROWS = 4096


def gaussian_gap(x: np.ndarray) -> float:
    """How far `x`'s values are from a standard Gaussian's moments: |mean| + |std - 1| + |kurtosis - 3| / 3."""
    x = x.astype(np.float64).ravel()
    mean, std = x.mean(), x.std()
    kurtosis = float(((x - mean) ** 4).mean() / max(std**4, 1e-30))
    return float(abs(mean) + abs(std - 1) + abs(kurtosis - 3) / 3)


def pair_diagnostics(z0: np.ndarray, z1: np.ndarray) -> dict[str, float]:
    """`pairs_distance_{mean,p50,p90,p99}`, each end's Gaussian gap, and `pairs_swapped` (1.0 when `z1` looks
    more like the noise than `z0` does)."""
    d = z0[0].size
    distance = np.linalg.norm((z1 - z0).reshape(len(z0), -1).astype(np.float64), axis=1) / np.sqrt(d)
    gap0, gap1 = gaussian_gap(z0), gaussian_gap(z1)
    return {"pairs_distance_mean": float(distance.mean()),
            **{f"pairs_distance_p{q}": float(np.quantile(distance, q / 100)) for q in (50, 90, 99)},
            "pairs_z0_gaussian_gap": gap0, "pairs_z1_gaussian_gap": gap1, "pairs_swapped": float(gap1 < gap0)}


class CurvatureTally:
    """`pairs_curvature` summed batch by batch: the paths' summed deviation over their summed squared chord."""

    def __init__(self) -> None:
        self.deviation, self.chord, self.paths = 0.0, 0.0, 0

    def add(self, curvatures: Iterable[PathCurvature]) -> None:
        for c in curvatures:
            self.deviation += float(c.deviation.sum())
            self.chord += float(c.chord.sum())
            self.paths += len(c.deviation)

    def stats(self) -> dict[str, float]:
        if not self.chord:  # no path, or none that moved: the ratio is undefined, not 0
            return {}
        return {"pairs_curvature": self.deviation / self.chord, "pairs_curvature_paths": float(self.paths)}
