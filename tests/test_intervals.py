"""The intervals: torch-fidelity's numbers, split halves recomputed exactly, and coverage on synthetic data."""

import math

import numpy as np
import pytest
import torch

import measure.intervals as intervals
from measure.intervals import (
    MEASURES,
    Interval,
    Measured,
    Reference,
    SeedSet,
    difference,
    measure_sets,
    over_runs,
    seed_values,
    set_values,
)

D, N, M = 8, 60, 70


def gaussian(rng, n, shift=0.0, scale=1.0):
    return rng.normal(size=(n, D)) * scale + shift


def test_values_are_torch_fidelitys_numbers():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(0)
    x, y = gaussian(rng, 64), gaussian(rng, 64, 0.3, 1.2)
    ours = set_values(x, y, 3)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    fid = fid_statistics_to_metric(fid_features_to_statistics(tx), fid_features_to_statistics(ty), False)
    assert ours["fid"] == pytest.approx(fid["frechet_inception_distance"], rel=1e-9)
    # one "subset" of all 64 rows is a permutation of them: torch-fidelity's KID is then the full estimator
    kid = kid_features_to_metric(tx, ty, kid_subsets=1, kid_subset_size=64, verbose=False, rng_seed=0,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1)
    assert ours["kid"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-9)
    prc = prc_features_to_metric(tx, ty, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False,
                                 verbose=False)
    assert ours["precision"] == pytest.approx(prc["precision"]) and ours["recall"] == pytest.approx(prc["recall"])


def test_split_halves_are_the_measures_recomputed_on_each_half():
    rng = np.random.default_rng(1)
    labels = np.arange(M) % 5
    ref = Reference(gaussian(rng, M, 0.5), labels, neighbourhood=2, content_hash="r", splits=3)
    s = SeedSet(4, gaussian(rng, N), rng.random(N) < 0.7, np.arange(N) % 5)
    values, against, own = seed_values(s, ref)
    for k in (0, 2):
        mask = ref.halves[k]
        assert np.bincount(labels[mask]).tolist() == np.bincount(labels[~mask]).tolist()  # stratified
        for j, half in enumerate((mask, ~mask)):
            direct = set_values(s.features, ref.features[half], 2)
            for name in ("fid", "kid", "precision", "recall"):
                assert against[name][k, j] == pytest.approx(direct[name], rel=1e-9, abs=1e-12), (name, k, j)
    assert values["class_accuracy"] == pytest.approx(s.correct.mean())
    again = Reference(ref.features, labels, neighbourhood=2, content_hash="r", splits=3)
    assert all(np.array_equal(a, b) for a, b in zip(ref.halves, again.halves, strict=True)), "keyed by the reference"


def _repeat(shift: float, repeats: int, seed: int, seeds: int = 3) -> tuple[dict, dict]:
    """Over repeats: how often b (drawn with `shift`) differs from a, resolved; and how often a's interval
    covers the mean of a's estimates."""
    rng = np.random.default_rng(seed)
    resolved = dict.fromkeys(MEASURES, 0)
    estimates, found = {m: [] for m in MEASURES}, {m: [] for m in MEASURES}
    for r in range(repeats):
        ref = Reference(gaussian(rng, M, 0.3, 1.15), np.arange(M) % 4, neighbourhood=3, content_hash=str(r),
                        splits=8)
        a = measure_sets([SeedSet(s, gaussian(rng, N), rng.random(N) < 0.8) for s in range(seeds)], ref)
        # away from the reference (centred at +0.3), with a worse class judge
        b = measure_sets([SeedSet(s, gaussian(rng, N, -shift), rng.random(N) < 0.8 - shift / 2)
                          for s in range(seeds)], ref)
        for name in MEASURES:
            resolved[name] += difference(a[name], b[name]).resolved
            estimates[name].append(a[name].estimate)
            found[name].append(a[name].interval())
    covered = {m: np.mean([i.low <= np.mean(estimates[m]) <= i.high for i in found[m]]) for m in MEASURES}
    return {name: k / repeats for name, k in resolved.items()}, covered


def test_two_sets_from_one_distribution_are_within_noise_about_95_percent_of_the_time():
    resolved, covered = _repeat(0.0, repeats=200, seed=3)
    for name in MEASURES:
        assert 0.90 <= 1 - resolved[name] <= 0.995, (name, resolved[name])
        assert 0.90 <= covered[name] <= 1.0, (name, covered[name])


def test_a_shifted_set_is_resolved():
    resolved, _ = _repeat(0.6, repeats=30, seed=4)
    assert resolved["fid"] >= 0.9 and resolved["kid"] >= 0.9 and resolved["class_accuracy"] >= 0.9


def test_pairing_removes_the_noise_two_models_share():
    """Two models measured from the same noise (b is a slightly moved a) have a far narrower difference
    interval than either model's own interval, and the difference is resolved."""
    rng = np.random.default_rng(5)
    ref = Reference(gaussian(rng, M, 0.3, 1.1), neighbourhood=3, content_hash="r")
    xs = [gaussian(rng, N) for _ in range(4)]
    a = measure_sets([SeedSet(s, x, np.ones(N, bool)) for s, x in enumerate(xs)], ref)["fid"]
    b = measure_sets([SeedSet(s, x + 0.05 + 0.01 * rng.normal(size=x.shape), np.ones(N, bool))
                      for s, x in enumerate(xs)], ref)["fid"]
    own, diff = a.interval(), difference(b, a)
    assert diff.high - diff.low < 0.3 * (own.high - own.low)
    assert diff.resolved


def test_the_floors_overlapping_draws_do_not_narrow_its_interval():
    rng = np.random.default_rng(8)
    ref = Reference(gaussian(rng, M), neighbourhood=3, content_hash="r")
    pool = gaussian(rng, N + 4)
    draws = [SeedSet(d, pool[rng.permutation(N + 4)[:N]], np.ones(N, bool)) for d in range(4)]
    floor = measure_sets(draws, ref, draws_overlap=True)["fid"]
    naive = measure_sets(draws, ref)["fid"]
    assert floor.sample_part()[0] > 4 * naive.sample_part()[0]  # nearly one set seen 4 times: not 4 draws


def test_replicates_survive_a_round_trip_through_arrays():
    rng = np.random.default_rng(6)
    ref = Reference(gaussian(rng, M), neighbourhood=3, content_hash="abc")
    fid = measure_sets([SeedSet(s, gaussian(rng, N), np.ones(N, bool)) for s in (4, 9)], ref)["fid"]
    again = Measured.from_arrays(fid.to_arrays("rf1/euler/1/fid"), "rf1/euler/1/fid", fid.pairing)
    assert again.interval() == fid.interval() and difference(again, fid).estimate == 0.0


def test_large_sets_are_measured_by_torch_fidelitys_batched_functions(monkeypatch):
    rng = np.random.default_rng(7)
    ref = Reference(gaussian(rng, M, 0.3), neighbourhood=3)
    sets = [SeedSet(s, gaussian(rng, N), np.ones(N, bool)) for s in range(2)]
    small = measure_sets(sets, ref)
    monkeypatch.setattr(intervals, "SMALL_SET_MAX", 10.0)
    large = measure_sets(sets, ref)
    for name in ("fid", "precision", "recall", "class_accuracy"):
        assert large[name].estimate == pytest.approx(small[name].estimate, rel=1e-6), name
    assert large["fid"].interval().low < large["fid"].estimate < large["fid"].interval().high


def test_intervals_over_runs_use_student_t_with_ddof_1():
    interval = over_runs([3.0, 4.0, 5.0])
    assert interval.estimate == 4.0 and interval.method == "runs"
    assert interval.high - 4.0 == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert math.isnan(over_runs([3.0]).low) and over_runs([3.0]).verdict == "no interval"
    assert Interval(0.5, 0.1, 0.9, "x").verdict == "resolved"
    assert Interval(0.5, -0.1, 0.9, "x").verdict == "within noise"
