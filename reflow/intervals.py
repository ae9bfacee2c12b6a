"""95% intervals for FID, KID, precision, recall and class accuracy, and for differences between them.

A measure has two sources of sampling noise: the generated samples (N per seed of `eval.seeds`) and the M
reference images. Both are resampled by the delete-one jackknife (docs/evaluation.md has the derivation and
the calibration measured against the bootstrap):

- For each seed s and sample i, the measure is recomputed with sample i of seed s left out; for each
  reference image j, with image j left out. Each is exact for its left-out set (FID and KID from downdated
  moments and kernel sums, precision and recall with the k-NN balls recomputed).
- Var(estimate) = sum_s jk(theta_s(-i)) / S^2 + jk(theta(-j)), with jk(v) = (n - 1)/n sum (v - mean v)^2.
- Replicates are keyed by what was left out, (seed, i) or j, so two models measured from the same per-sample
  noise against the same reference are paired by construction, whichever stage or run measured them: the
  replicates of a difference are the differences of the replicates, and the noise the models share cancels.

An interval is the estimate ± 1.96 standard errors; a difference is resolved when its interval excludes
zero, and "within noise" otherwise. `over_runs` gives the interval over training replicates (runs that
differ only in their training seeds): mean ± t(0.975, R - 1) · sd / sqrt(R), which covers training variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
MEASURES = ("fid", "kid", "precision", "recall", "class_accuracy")
# Where each measure can lie: an interval is cut to it (FID >= 0; KID, unbiased, may be negative).
RANGES = {"fid": (0.0, math.inf), "kid": (-math.inf, math.inf), "precision": (0.0, 1.0), "recall": (0.0, 1.0),
          "class_accuracy": (0.0, 1.0)}


# ---------------------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval [low, high], and how the interval was made."""

    estimate: float
    low: float
    high: float
    method: str  # "jackknife" | "seeds" | "runs" | "none"

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


def normal_interval(estimate: float, variance: float, method: str = "jackknife") -> Interval:
    half = Z95 * math.sqrt(max(variance, 0.0))
    return Interval(float(estimate), estimate - half, estimate + half, method)


def t_interval(values: Sequence[float], method: str) -> Interval:
    """mean ± t(0.975, n - 1) · sd / sqrt(n) over n independent values (sd with ddof = 1); none from one."""
    from scipy.stats import t as student_t

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, "none")
    half = float(student_t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return Interval(mean, mean - half, mean + half, method)


def seeds_interval(values: Sequence[float]) -> Interval:
    """Over the seeds' values alone (the reference's own noise is not in it)."""
    return t_interval(values, "seeds")


def over_runs(estimates: Sequence[float]) -> Interval:
    """Over training replicates: each run's estimate already averages its own sampling noise."""
    return t_interval(estimates, "runs")


def jk_variance(replicates: np.ndarray) -> float:
    """The delete-one jackknife's variance from the n leave-one-out values of a statistic."""
    n = len(replicates)
    return float((n - 1) / n * np.sum((replicates - replicates.mean()) ** 2)) if n > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------
# A measure over seeds, with its leave-one-out replicates
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Measured:
    """One measure of one set (a model at one NFE, or the floor): its estimate, the mean over seeds of the
    per-seed values, and the leave-one-out replicates that give its interval and pair it with others.

    `left_out[s][i]` is seed s's value with its sample i left out; `reference[j]` the mean over seeds with
    reference image j left out. `pairing` names what makes two sets' replicates comparable (the seeds'
    sample count and the reference's content hash); `draws_overlap` marks the floor's draws, which share
    images, so their per-draw variances are not divided by the number of draws (the conservative bound).
    """

    estimate: float
    per_seed: dict[int, float]
    left_out: dict[int, np.ndarray]
    reference: np.ndarray
    pairing: str = ""
    draws_overlap: bool = False
    measure: str = ""

    @property
    def has_replicates(self) -> bool:
        return bool(self.left_out)

    def interval(self) -> Interval:
        if not self.has_replicates:  # too large to leave out one by one: the spread over seeds alone
            interval = seeds_interval(list(self.per_seed.values()))
        else:
            interval = normal_interval(self.estimate, self._sample_variance() + jk_variance(self.reference))
        low, high = RANGES.get(self.measure, (-math.inf, math.inf))
        return Interval(interval.estimate, max(interval.low, low), min(interval.high, high), interval.method)

    def _weights(self) -> float:
        return 1.0 if self.draws_overlap else 1.0 / len(self.per_seed)

    def _sample_variance(self) -> float:
        w = self._weights()
        if self.draws_overlap:  # Var(mean of dependent draws) <= mean of their variances
            return float(np.mean([jk_variance(v) for v in self.left_out.values()]))
        return sum(w * w * jk_variance(v) for v in self.left_out.values())

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Flat arrays for an `.npz` file (no pickled objects)."""
        seeds = sorted(self.left_out)
        return {f"{prefix}/seeds": np.asarray(seeds, np.int64),
                f"{prefix}/per_seed": np.asarray([self.per_seed[s] for s in seeds], np.float64),
                f"{prefix}/left_out": np.stack([self.left_out[s] for s in seeds]),
                f"{prefix}/reference": self.reference,
                f"{prefix}/estimate": np.asarray(self.estimate, np.float64)}

    @classmethod
    def from_arrays(cls, arrays, prefix: str, pairing: str = "", draws_overlap: bool = False) -> Measured:
        seeds = [int(s) for s in arrays[f"{prefix}/seeds"]]
        per_seed = arrays[f"{prefix}/per_seed"]
        left_out = arrays[f"{prefix}/left_out"]
        return cls(float(arrays[f"{prefix}/estimate"]), {s: float(per_seed[k]) for k, s in enumerate(seeds)},
                   {s: left_out[k] for k, s in enumerate(seeds)}, arrays[f"{prefix}/reference"], pairing,
                   draws_overlap, prefix.rsplit("/", 1)[-1])


def difference(a: Measured, b: Measured) -> Interval:
    """The interval of a - b. Seeds both measured with the same sample count are paired sample by sample,
    and the reference's replicates are paired when both used the same reference; the rest adds up.
    Without replicates (sets too large to leave out one by one): paired over the common seeds."""
    if not (a.has_replicates and b.has_replicates):
        common = sorted(a.per_seed.keys() & b.per_seed.keys())
        t = seeds_interval([a.per_seed[s] - b.per_seed[s] for s in common])
        shift = a.estimate - b.estimate - t.estimate
        return Interval(a.estimate - b.estimate, t.low + shift, t.high + shift, t.method)
    paired = a.pairing == b.pairing and not (a.draws_overlap or b.draws_overlap)
    wa, wb = a._weights(), b._weights()
    variance = 0.0
    for s in a.left_out.keys() | b.left_out.keys():
        if paired and s in a.left_out and s in b.left_out:
            variance += jk_variance(wa * a.left_out[s] - wb * b.left_out[s])
    unpaired_a = [s for s in a.left_out if not (paired and s in b.left_out)]
    unpaired_b = [s for s in b.left_out if not (paired and s in a.left_out)]
    for m, seeds in ((a, unpaired_a), (b, unpaired_b)):
        if m.draws_overlap:
            variance += m._sample_variance()
        else:
            variance += sum(m._weights() ** 2 * jk_variance(m.left_out[s]) for s in seeds)
    same_reference = a.pairing.split("|")[-1] == b.pairing.split("|")[-1] and len(a.reference) == len(b.reference)
    variance += (jk_variance(a.reference - b.reference) if same_reference
                 else jk_variance(a.reference) + jk_variance(b.reference))
    return normal_interval(a.estimate - b.estimate, variance)


# ---------------------------------------------------------------------------------------------------------
# Leave-one-out statistics of one set of samples against the reference
# ---------------------------------------------------------------------------------------------------------
def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof = 1), as torch-fidelity's FID statistics."""
    return x.mean(0), np.cov(x, rowvar=False)


def left_out_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of x with each row left out in turn (rank-one downdates): n x D, n x D x D.

    With S = (n - 1) cov and d = x_i - mean: S without row i is S - n / (n - 1) d d^T, over n - 2."""
    n = len(x)
    mu, cov = moments(x)
    d = x - mu
    mu_out = (n * mu - x) / (n - 1)
    cov_out = ((n - 1) * cov - (n / (n - 1)) * d[:, :, None] * d[:, None, :]) / (n - 2)
    return mu_out, cov_out


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.sqrt(np.clip(values, 0, None))[..., None, :]) @ np.swapaxes(vectors, -1, -2)


def frechet(mu_x, cov_x, mu_y, cov_y, cov_y_sqrt) -> np.ndarray:
    """FID: |mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr sqrt(S_x S_y), broadcast over leading axes.

    tr sqrt(S_x S_y) = tr sqrt(S_y^1/2 S_x S_y^1/2), whose argument is symmetric: batched `eigvalsh`."""
    inner = cov_y_sqrt @ cov_x @ cov_y_sqrt
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum(axis=-1)
    diff = mu_x - mu_y
    return ((diff * diff).sum(-1) + np.trace(cov_x, axis1=-2, axis2=-1) + np.trace(cov_y, axis1=-2, axis2=-1)
            - 2 * tr_covmean)


def poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel, torch-fidelity's default: (x . y / D + 1)^3."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0, None))


def coverage(points: np.ndarray, centres: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Whether each point lies in the k-NN manifold of `centres` (some centre's ball, of radius the distance
    to its k-th nearest other centre): as measured, and with each centre left out in turn (n_centres x
    n_points). Leaving centre c out removes its ball and widens the balls of the centres that had c among
    their k nearest (their radius becomes the distance to their (k+1)-th)."""
    d_cc = _distances(centres, centres)
    order = np.argsort(d_cc, axis=1)  # column 0 is the centre itself
    radius = np.take_along_axis(d_cc, order[:, k : k + 1], axis=1)[:, 0]
    wider = np.take_along_axis(d_cc, order[:, k + 1 : k + 2], axis=1)[:, 0]
    d_pc = _distances(points, centres)
    inside = d_pc <= radius[None, :]
    inside_wider = d_pc <= wider[None, :]
    measured = inside.any(axis=1)
    left_out = np.empty((len(centres), len(points)), dtype=bool)
    for c in range(len(centres)):
        widened = np.flatnonzero((order[:, 1 : k + 1] == c).any(axis=1))
        balls = inside.copy()
        balls[:, widened] = inside_wider[:, widened]
        balls[:, c] = False
        left_out[c] = balls.any(axis=1)
    return measured, left_out


class Reference:
    """The FID reference's features with everything its leave-one-out replicates need, computed once."""

    def __init__(self, features: np.ndarray, *, neighbourhood: int, content_hash: str = ""):
        self.features = np.asarray(features, np.float64)
        self.k, self.content_hash = neighbourhood, content_hash
        m, d = self.features.shape
        if m < neighbourhood + 3:
            raise ValueError(f"the reference has {m} images; precision/recall with k = {neighbourhood} need "
                             f"at least {neighbourhood + 3}")
        self.jackknife = jackknife_fits(1, m, d)  # else every set is measured the large way
        if not self.jackknife:
            return
        self.mu, self.cov = moments(self.features)
        self.cov_sqrt = _psd_sqrt(self.cov)
        self.mu_out, self.cov_out = left_out_moments(self.features)
        self.cov_out_sqrt = _psd_sqrt(self.cov_out)
        self.kernel = poly_kernel(self.features, self.features)


def _kid_parts(k: np.ndarray) -> tuple[float, np.ndarray]:
    """Off-diagonal sum of a square kernel matrix, and that sum with each row/column left out."""
    off_rows = k.sum(1) - np.diag(k)
    total = float(off_rows.sum())
    return total, total - 2 * off_rows


Statistics = dict[str, tuple[float, np.ndarray, np.ndarray]]


def seed_statistics(x: np.ndarray, correct: np.ndarray, ref: Reference) -> Statistics:
    """Each measure of one seed's samples: (value, N values with sample i left out, M values with reference
    image j left out)."""
    x = np.asarray(x, np.float64)
    correct = np.asarray(correct, np.float64)
    n, m = len(x), len(ref.features)
    if n < ref.k + 3:
        raise ValueError(f"{n} samples per seed; precision/recall with k = {ref.k} need at least {ref.k + 3}")
    mu, cov = moments(x)
    mu_out, cov_out = left_out_moments(x)
    fid = float(frechet(mu, cov, ref.mu, ref.cov, ref.cov_sqrt))
    fid_x = frechet(mu_out, cov_out, ref.mu, ref.cov, ref.cov_sqrt)
    fid_y = frechet(mu, cov, ref.mu_out, ref.cov_out, ref.cov_out_sqrt)

    xx, xx_out = _kid_parts(poly_kernel(x, x))
    yy, yy_out = _kid_parts(ref.kernel)
    k_xy = poly_kernel(x, ref.features)
    xy, xy_rows, xy_cols = float(k_xy.sum()), k_xy.sum(1), k_xy.sum(0)
    kid = xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m)
    kid_x = xx_out / ((n - 1) * (n - 2)) + yy / (m * (m - 1)) - 2 * (xy - xy_rows) / ((n - 1) * m)
    kid_y = xx / (n * (n - 1)) + yy_out / ((m - 1) * (m - 2)) - 2 * (xy - xy_cols) / (n * (m - 1))

    precision_in, precision_y = coverage(x, ref.features, ref.k)  # samples in the reference's manifold
    recall_in, recall_x = coverage(ref.features, x, ref.k)  # reference images in the samples' manifold
    precision = float(precision_in.mean())
    recall = float(recall_in.mean())
    accuracy = float(correct.mean())
    return {
        "fid": (fid, fid_x, fid_y),
        "kid": (float(kid), kid_x, kid_y),
        "precision": (precision, (precision_in.sum() - precision_in) / (n - 1), precision_y.mean(1)),
        "recall": (recall, recall_x.mean(1), (recall_in.sum() - recall_in) / (m - 1)),
        "class_accuracy": (accuracy, (correct.sum() - correct) / (n - 1), np.full(m, accuracy)),
    }


# Above this many floats in the leave-one-out covariances (n x D x D), or this many distances (n x m), a set is
# measured by torch-fidelity's own functions instead, and its interval comes from the spread over seeds.
JACKKNIFE_MAX_FLOATS = 5e7


def jackknife_fits(n: int, m: int, d: int) -> bool:
    return max(n, m) * d * d <= JACKKNIFE_MAX_FLOATS and n * m * max(n, m) <= 20 * JACKKNIFE_MAX_FLOATS


def large_set_values(x: np.ndarray, ref: Reference) -> dict[str, float]:
    """FID, KID and precision/recall of a set too large to leave out one by one, by torch-fidelity's metric
    functions (KID over 100 subsets of min(n, m, 1000); the recorded protocol says so)."""
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    tx, ty = torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(ref.features)
    fid = fid_statistics_to_metric(fid_features_to_statistics(tx), fid_features_to_statistics(ty), False)
    kid = kid_features_to_metric(tx, ty, kid_subsets=100, kid_subset_size=min(len(x), len(ref.features), 1000),
                                 verbose=False, rng_seed=0, kid_kernel="poly", kid_kernel_poly_degree=3,
                                 kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    prc = prc_features_to_metric(tx, ty, prc_neighborhood=ref.k, prc_batch_size=10000, save_cpu_ram=True,
                                 verbose=False)
    return {"fid": float(fid["frechet_inception_distance"]), "kid": float(kid["kernel_inception_distance_mean"]),
            "precision": float(prc["precision"]), "recall": float(prc["recall"])}


@dataclass
class SeedSet:
    """One seed's N samples: their features and whether the class judge agreed with each sample's label."""

    seed: int
    features: np.ndarray
    correct: np.ndarray = field(repr=False)


def measure_sets(sets: Sequence[SeedSet], ref: Reference, *, draws_overlap: bool = False) -> dict[str, Measured]:
    """Every measure of a set over its seeds (or the floor over its draws), with its replicates; a set too
    large for the jackknife gets per-seed values only (its intervals then come from the seeds)."""
    sizes = {len(s.features) for s in sets}
    pairing = f"n={','.join(map(str, sorted(sizes)))}|{ref.content_hash}"
    if not ref.jackknife or not jackknife_fits(max(sizes), len(ref.features), ref.features.shape[1]):
        values = {s.seed: large_set_values(s.features, ref) | {"class_accuracy": float(np.mean(s.correct))}
                  for s in sets}
        return {name: Measured(float(np.mean([v[name] for v in values.values()])),
                               {seed: v[name] for seed, v in values.items()}, {}, np.zeros(0), pairing,
                               draws_overlap, name) for name in MEASURES}
    per_seed = {s.seed: seed_statistics(s.features, s.correct, ref) for s in sets}
    out = {}
    for name in MEASURES:
        values = {seed: stats[name][0] for seed, stats in per_seed.items()}
        reference = np.mean([stats[name][2] for stats in per_seed.values()], axis=0)
        out[name] = Measured(float(np.mean(list(values.values()))), values,
                             {seed: stats[name][1] for seed, stats in per_seed.items()}, reference, pairing,
                             draws_overlap, name)
    return out
