"""95% intervals for FID, KID, precision, recall and class accuracy, and for differences between them.

A measure has two sources of sampling noise: the generated samples (N per seed of `eval.seeds`) and the M
reference images. Both are estimated from independent replications, never by resampling around the observed
set (docs/evaluation.md has why: a delete-one jackknife overstated FID's spread 2-3x on the demo's features,
whose covariance is nearly singular, and a bootstrap shares the cause):

- samples: the seeds are independent draws of N samples, so the spread of the per-seed values (ddof = 1)
  measures their part exactly: Var_samples = s^2 / S;
- reference: the reference is split K times into two disjoint, class-stratified halves H1, H2. Given the
  samples, theta(H1) and theta(H2) are independent, so E[(theta(H1) - theta(H2))^2] = 2 Var(theta at M/2),
  and Var(theta at M) <= Var(theta at M/2) / 2 (variance falls at least as 1/M): Var_ref = mean_k D_k^2 / 4,
  a mild upper bound;
- the interval is the estimate ± t(0.975, df) · sqrt(Var_samples + Var_ref), df by Welch-Satterthwaite.

The splits are a function of the reference alone, and samples are indexed by seed, so two models measured
from the same noise against the same reference pair up by construction, whichever stage or run measured
them: a difference is taken seed by seed and split by split, and the noise the models share cancels. A set
with fewer than two seeds, or the real-data floor (whose draws share images), gets its sample part from
split halves of its own samples instead. `over_runs` gives the interval over training replicates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

MEASURES = ("fid", "kid", "precision", "recall", "class_accuracy")
# Where each measure can lie: an interval is cut to it (FID >= 0; KID, unbiased, may be negative).
RANGES = {"fid": (0.0, math.inf), "kid": (-math.inf, math.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
          "class_accuracy": (0.0, 1.0)}
DEFAULT_SPLITS = 16


# ---------------------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval [low, high], and how the interval was made."""

    estimate: float
    low: float
    high: float
    method: str  # "seeds+splits" | "splits" | "runs" | "none"

    @property
    def resolved(self) -> bool:
        """Whether zero lies outside the interval (what a difference needs to be a finding)."""
        return self.low > 0.0 or self.high < 0.0

    @property
    def verdict(self) -> str:
        if math.isnan(self.low):
            return "no interval"
        return "resolved" if self.resolved else "within noise"

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "method": self.method}


def _t(df: float) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, df)) if math.isfinite(df) else 1.959963984540054


def combined_interval(estimate: float, parts: list[tuple[float, float]], method: str) -> Interval:
    """estimate ± t(0.975, df) · sqrt(sum of variances), df by Welch-Satterthwaite over (variance, df) parts."""
    total = sum(v for v, _ in parts)
    if total <= 0 or not parts:
        return Interval(float(estimate), float(estimate), float(estimate), method)
    denominator = sum(v * v / df for v, df in parts if v > 0)
    df = total * total / denominator if denominator > 0 else math.inf
    half = _t(df) * math.sqrt(total)
    return Interval(float(estimate), estimate - half, estimate + half, method)


def t_interval(values: Sequence[float], method: str) -> Interval:
    """mean ± t(0.975, n - 1) · sd / sqrt(n) over n independent values (sd with ddof = 1); none from one."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, "none")
    return combined_interval(mean, [(float(values.var(ddof=1)) / len(values), len(values) - 1)], method)


def over_runs(estimates: Sequence[float]) -> Interval:
    """Over training replicates: each run's estimate already averages its own sampling noise."""
    return t_interval(estimates, "runs")


def split_variance(halves: np.ndarray) -> tuple[float, float]:
    """(variance at the full size, its degrees of freedom) from K split-half pairs, a K x 2 array."""
    d = halves[:, 0] - halves[:, 1]
    return float(np.mean(d * d) / 4), float(len(d))


# ---------------------------------------------------------------------------------------------------------
# A measure over seeds, with what its interval and pairings need
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Measured:
    """One measure of one set (a model at one NFE, or the floor): the estimate is the mean of the per-seed
    values; `reference_halves[s]` is seed s's value against each half of each reference split (K x 2),
    `sample_halves[s]` the value of each half of its own samples (K x 2). `pairing` names what two sets must
    share to pair seed by seed (sample count and reference); `draws_overlap` marks the floor's draws."""

    estimate: float
    per_seed: dict[int, float]
    reference_halves: dict[int, np.ndarray]
    sample_halves: dict[int, np.ndarray]
    pairing: str = ""
    draws_overlap: bool = False
    measure: str = ""

    @property
    def seeds(self) -> list[int]:
        return sorted(self.per_seed)

    def _independent_seeds(self) -> bool:
        return len(self.per_seed) >= 2 and not self.draws_overlap

    def sample_part(self, seeds: Sequence[int] | None = None) -> tuple[float, float]:
        """(variance of the mean over `seeds` due to the samples, df)."""
        seeds = self.seeds if seeds is None else list(seeds)
        if self._independent_seeds() and len(seeds) >= 2:
            values = np.asarray([self.per_seed[s] for s in seeds])
            return float(values.var(ddof=1)) / len(seeds), len(seeds) - 1
        # one seed, or overlapping draws: split halves of the samples, not shrunk by the number of draws
        parts = [split_variance(self.sample_halves[s]) for s in seeds]
        return float(np.mean([v for v, _ in parts])), float(sum(df for _, df in parts) / len(parts))

    def reference_part(self, seeds: Sequence[int] | None = None) -> tuple[float, float]:
        seeds = self.seeds if seeds is None else list(seeds)
        return split_variance(np.mean([self.reference_halves[s] for s in seeds], axis=0))

    def interval(self) -> Interval:
        interval = combined_interval(self.estimate, [self.sample_part(), self.reference_part()], "seeds+splits")
        low, high = RANGES.get(self.measure, (-math.inf, math.inf))
        return Interval(interval.estimate, max(interval.low, low), min(interval.high, high), interval.method)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Flat arrays for an `.npz` file (no pickled objects)."""
        seeds = self.seeds
        return {f"{prefix}/seeds": np.asarray(seeds, np.int64),
                f"{prefix}/per_seed": np.asarray([self.per_seed[s] for s in seeds], np.float64),
                f"{prefix}/reference_halves": np.stack([self.reference_halves[s] for s in seeds]),
                f"{prefix}/sample_halves": np.stack([self.sample_halves[s] for s in seeds])}

    @classmethod
    def from_arrays(cls, arrays, prefix: str, pairing: str = "", draws_overlap: bool = False) -> Measured:
        seeds = [int(s) for s in arrays[f"{prefix}/seeds"]]
        per_seed = arrays[f"{prefix}/per_seed"]
        ref, own = arrays[f"{prefix}/reference_halves"], arrays[f"{prefix}/sample_halves"]
        return cls(float(np.mean(per_seed)), {s: float(per_seed[k]) for k, s in enumerate(seeds)},
                   {s: ref[k] for k, s in enumerate(seeds)}, {s: own[k] for k, s in enumerate(seeds)}, pairing,
                   draws_overlap, prefix.rsplit("/", 1)[-1])


def difference(a: Measured, b: Measured) -> Interval:
    """The interval of a - b. Measured from the same noise (same pairing, common seeds): seed by seed and
    split by split, so what the two share cancels; otherwise the two sets' variances add up, and only the
    reference splits pair (when both used the same reference)."""
    common = sorted(a.per_seed.keys() & b.per_seed.keys())
    if a.pairing == b.pairing and a._independent_seeds() and b._independent_seeds() and len(common) >= 2:
        d = np.asarray([a.per_seed[s] - b.per_seed[s] for s in common])
        halves = np.mean([a.reference_halves[s] - b.reference_halves[s] for s in common], axis=0)
        parts = [(float(d.var(ddof=1)) / len(common), len(common) - 1), split_variance(halves)]
        return combined_interval(float(d.mean()), parts, "seeds+splits")
    parts = [a.sample_part(), b.sample_part()]
    same_reference = a.pairing.split("|")[-1] == b.pairing.split("|")[-1]
    if same_reference:
        halves = (np.mean([a.reference_halves[s] for s in a.seeds], axis=0)
                  - np.mean([b.reference_halves[s] for s in b.seeds], axis=0))
        parts.append(split_variance(halves))
    else:
        parts += [a.reference_part(), b.reference_part()]
    return combined_interval(a.estimate - b.estimate, parts, "seeds+splits")


# ---------------------------------------------------------------------------------------------------------
# The measures of one set of features against a reference set
# ---------------------------------------------------------------------------------------------------------
def poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel, torch-fidelity's default: (x . y / D + 1)^3."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0, None))


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof = 1), FID's statistics."""
    mu = x.mean(0)
    c = x - mu
    return mu, c.T @ c / (len(x) - 1)


def frechet(x: np.ndarray | tuple, y: np.ndarray | tuple) -> float:
    """FID as torch-fidelity computes it: |mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr sqrt(S_x S_y), from two
    feature sets or their `moments`."""
    (mu_x, s_x), (mu_y, s_y) = (v if isinstance(v, tuple) else moments(v) for v in (x, y))
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(s_x @ s_y).astype(np.complex128)).real)
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * tr_covmean)


# Above this many entries in a kernel or distance matrix, a set is measured by torch-fidelity's batched functions.
# Precision and recall use k-NN balls (Kynkäänniemi et al.) and KID the unbiased MMD^2 over all of both sets;
# the k-th neighbour is column k of a partitioned distance row (column 0 is the point itself).
SMALL_SET_MAX = 2.5e7


def large_set_values(x: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    """FID, KID and precision/recall of a large set by torch-fidelity's metric functions (KID over 100 subsets
    of min(n, m, 1000))."""
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    tx, ty = torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(y, np.float64))
    fid = fid_statistics_to_metric(fid_features_to_statistics(tx), fid_features_to_statistics(ty), False)
    kid_ = kid_features_to_metric(tx, ty, kid_subsets=100, kid_subset_size=min(len(x), len(y), 1000),
                                  verbose=False, rng_seed=0, kid_kernel="poly", kid_kernel_poly_degree=3,
                                  kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    prc = prc_features_to_metric(tx, ty, prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=True,
                                 verbose=False)
    return {"fid": float(fid["frechet_inception_distance"]), "kid": float(kid_["kernel_inception_distance_mean"]),
            "precision": float(prc["precision"]), "recall": float(prc["recall"])}


class _SmallSets:
    """Every measure of any subset of the samples against any subset of the reference, from the kernel and
    distance matrices computed once (the split halves are index masks into them)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, k: int):
        self.x, self.y, self.k = x, y, k
        self.k_xx, self.k_yy, self.k_xy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)
        self.d_xx, self.d_yy, self.d_xy = _distances(x, x), _distances(y, y), _distances(x, y)
        self._moments: dict[tuple[int, bytes], tuple] = {}

    def _moments_of(self, side: int, mask: np.ndarray) -> tuple:
        key = (side, np.packbits(mask).tobytes())
        if key not in self._moments:  # each half is met twice (against the whole other set, and itself)
            self._moments[key] = moments((self.x, self.y)[side][mask])
        return self._moments[key]

    @staticmethod
    def _off_diagonal(k: np.ndarray, w: np.ndarray) -> float:
        return float(w @ k @ w - w @ np.diag(k))

    def values(self, mx: np.ndarray, my: np.ndarray) -> dict[str, float]:
        wx, wy = mx.astype(np.float64), my.astype(np.float64)
        n, m = wx.sum(), wy.sum()
        kid_ = (self._off_diagonal(self.k_xx, wx) / (n * (n - 1)) + self._off_diagonal(self.k_yy, wy) / (m * (m - 1))
                - 2 * float(wx @ self.k_xy @ wy) / (n * m))
        d_xy = self.d_xy[np.ix_(mx, my)]
        r_y = np.partition(self.d_yy[np.ix_(my, my)], self.k, axis=1)[:, self.k]
        r_x = np.partition(self.d_xx[np.ix_(mx, mx)], self.k, axis=1)[:, self.k]
        return {"fid": frechet(self._moments_of(0, mx), self._moments_of(1, my)), "kid": kid_,
                "precision": float((d_xy <= r_y[None, :]).any(axis=1).mean()),
                "recall": float((d_xy.T <= r_x[None, :]).any(axis=1).mean())}


def set_values(x: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    """FID, KID, precision and recall of features `x` against `y`, with k-NN balls of k neighbours."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return _values_function(x, y, k)(np.ones(len(x), bool), np.ones(len(y), bool))


def _values_function(x: np.ndarray, y: np.ndarray, k: int):
    """values(mask_x, mask_y) of x against y: from precomputed matrices when they fit, else torch-fidelity's."""
    if max(len(x), len(y)) ** 2 <= SMALL_SET_MAX:
        return _SmallSets(x, y, k).values
    return lambda mx, my: large_set_values(x[mx], y[my], k)


def stratified_halves(labels: np.ndarray, splits: int, key: int) -> list[np.ndarray]:
    """`splits` random halvings of range(len(labels)), each class split evenly: boolean masks of half 1."""
    rng = np.random.default_rng([key, len(labels), splits])
    masks = []
    for _ in range(splits):
        mask = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            mask[members[: len(members) // 2]] = True
        masks.append(mask)
    return masks


class Reference:
    """The FID reference: its features and the fixed split halves every set is measured against."""

    def __init__(self, features: np.ndarray, labels: np.ndarray | None = None, *, neighbourhood: int,
                 content_hash: str = "", splits: int = DEFAULT_SPLITS):
        self.features = np.asarray(features, np.float64)
        self.k, self.content_hash = neighbourhood, content_hash
        m = len(self.features)
        if m // 2 < neighbourhood + 2:
            raise ValueError(f"the reference has {m} images; precision/recall with k = {neighbourhood} on its "
                             f"halves need at least {2 * (neighbourhood + 2)}")
        labels = np.zeros(m, np.int64) if labels is None else np.asarray(labels)
        # Keyed by the reference alone, so every set measured against it meets the same halves.
        key = int.from_bytes(content_hash.encode()[:8].ljust(8, b"\0"), "little") if content_hash else 0
        self.halves = stratified_halves(labels, splits, key)


@dataclass
class SeedSet:
    """One seed's N samples: their features and whether the class judge agreed with each sample's label."""

    seed: int
    features: np.ndarray
    correct: np.ndarray = field(repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)  # to split the samples evenly by class


def seed_values(s: SeedSet, ref: Reference) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One seed's measures: (values, K x 2 values against the reference halves, K x 2 of its own halves)."""
    x = np.asarray(s.features, np.float64)
    correct = np.asarray(s.correct, np.float64)
    if len(x) // 2 < ref.k + 2:
        raise ValueError(f"{len(x)} samples per seed; precision/recall with k = {ref.k} on halves need at least "
                         f"{2 * (ref.k + 2)}")
    values_of = _values_function(x, ref.features, ref.k)
    all_x, all_y = np.ones(len(x), bool), np.ones(len(ref.features), bool)
    values = values_of(all_x, all_y) | {"class_accuracy": float(correct.mean())}
    against = {name: np.zeros((len(ref.halves), 2)) for name in MEASURES}
    own = {name: np.zeros((len(ref.halves), 2)) for name in MEASURES}
    labels = np.zeros(len(x), np.int64) if s.labels is None else s.labels
    own_halves = stratified_halves(labels, len(ref.halves), s.seed)
    for k, (mask, own_mask) in enumerate(zip(ref.halves, own_halves, strict=True)):
        for j, (my, mx) in enumerate(((mask, own_mask), (~mask, ~own_mask))):
            a = values_of(all_x, my)
            o = values_of(mx, all_y)
            for name in MEASURES[:4]:
                against[name][k, j], own[name][k, j] = a[name], o[name]
            against["class_accuracy"][k, j] = values["class_accuracy"]
            own["class_accuracy"][k, j] = float(correct[mx].mean())
    return values, against, own


def measure_sets(sets: Sequence[SeedSet], ref: Reference, *, draws_overlap: bool = False) -> dict[str, Measured]:
    """Every measure of a set over its seeds (or the floor over its draws), with what its interval needs."""
    from threadpoolctl import threadpool_limits

    sizes = {len(s.features) for s in sets}
    pairing = f"n={','.join(map(str, sorted(sizes)))}|{ref.content_hash}"
    # Hundreds of small matrix products: one BLAS thread is 10x faster than two that spin against each other.
    with threadpool_limits(limits=1, user_api="blas"):
        per_seed = {s.seed: seed_values(s, ref) for s in sets}
    return {name: Measured(float(np.mean([v[0][name] for v in per_seed.values()])),
                           {seed: v[0][name] for seed, v in per_seed.items()},
                           {seed: v[1][name] for seed, v in per_seed.items()},
                           {seed: v[2][name] for seed, v in per_seed.items()}, pairing, draws_overlap, name)
            for name in MEASURES}
