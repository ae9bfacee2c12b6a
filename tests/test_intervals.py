"""The intervals: exact leave-one-out statistics, torch-fidelity's numbers, and coverage on synthetic data."""

import math

import numpy as np
import pytest
import torch

from reflow.intervals import (
    MEASURES,
    Interval,
    Measured,
    Reference,
    SeedSet,
    coverage,
    difference,
    left_out_moments,
    measure_sets,
    over_runs,
    seed_statistics,
)

D, N, M = 8, 60, 70


def gaussian(rng, n, shift=0.0, scale=1.0):
    return rng.normal(size=(n, D)) * scale + shift


def test_point_estimates_are_torch_fidelitys_numbers():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(0)
    x, y = gaussian(rng, 64), gaussian(rng, 64, 0.3, 1.2)
    stats = seed_statistics(x, np.ones(64, bool), Reference(y, neighbourhood=3))
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    fid = fid_statistics_to_metric(fid_features_to_statistics(tx), fid_features_to_statistics(ty), False)
    assert stats["fid"][0] == pytest.approx(fid["frechet_inception_distance"], rel=1e-9)
    # one "subset" of all 64 rows is a permutation of them: torch-fidelity's KID is then the full estimator
    kid = kid_features_to_metric(tx, ty, kid_subsets=1, kid_subset_size=64, verbose=False, rng_seed=0,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1)
    assert stats["kid"][0] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-9)
    prc = prc_features_to_metric(tx, ty, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False,
                                 verbose=False)
    assert stats["precision"][0] == pytest.approx(prc["precision"])
    assert stats["recall"][0] == pytest.approx(prc["recall"])


def test_every_left_out_value_is_the_measure_recomputed_without_that_point():
    rng = np.random.default_rng(1)
    x, y = gaussian(rng, 12), gaussian(rng, 14, 0.5)
    correct = rng.random(12) < 0.7
    ref = Reference(y, neighbourhood=2)
    stats = seed_statistics(x, correct, ref)
    for i in (0, 5, 11):
        again = seed_statistics(np.delete(x, i, 0), np.delete(correct, i), ref)
        for name in MEASURES:
            assert stats[name][1][i] == pytest.approx(again[name][0], rel=1e-8, abs=1e-12), (name, i)
    for j in (0, 7, 13):
        again = seed_statistics(x, correct, Reference(np.delete(y, j, 0), neighbourhood=2))
        for name in MEASURES:
            assert stats[name][2][j] == pytest.approx(again[name][0], rel=1e-8, abs=1e-12), (name, j)


def test_left_out_moments_and_coverage_match_brute_force():
    rng = np.random.default_rng(2)
    x = gaussian(rng, 9)
    mu, cov = left_out_moments(x)
    for i in range(9):
        rest = np.delete(x, i, 0)
        assert np.allclose(mu[i], rest.mean(0)) and np.allclose(cov[i], np.cov(rest, rowvar=False))
    points, centres = gaussian(rng, 20), gaussian(rng, 10)
    measured, left_out = coverage(points, centres, 3)
    for c in range(10):
        assert np.array_equal(left_out[c], coverage(points, np.delete(centres, c, 0), 3)[0])


def _repeat(shift: float, repeats: int, seed: int) -> dict[str, float]:
    """How often a set drawn with `shift` differs from an unshifted one, resolved, per measure."""
    rng = np.random.default_rng(seed)
    resolved = dict.fromkeys(MEASURES, 0)
    for _ in range(repeats):
        ref = Reference(gaussian(rng, M, 0.3, 1.15), neighbourhood=3)
        a = measure_sets([SeedSet(s, gaussian(rng, N), rng.random(N) < 0.8) for s in range(2)], ref)
        # away from the reference (centred at +0.3), with a worse class judge
        b = measure_sets([SeedSet(s, gaussian(rng, N, -shift), rng.random(N) < 0.8 - shift / 2) for s in range(2)],
                         ref)
        for name in MEASURES:
            resolved[name] += difference(a[name], b[name]).resolved
    return {name: k / repeats for name, k in resolved.items()}


def test_two_sets_from_one_distribution_are_within_noise_about_95_percent_of_the_time():
    within = {name: 1 - rate for name, rate in _repeat(0.0, repeats=200, seed=3).items()}
    for name in ("fid", "kid", "class_accuracy"):
        assert 0.90 <= within[name] <= 0.995, (name, within[name])
    # the k-NN manifolds make the jackknife conservative for precision and recall (docs/evaluation.md)
    assert within["precision"] >= 0.93 and within["recall"] >= 0.93


def test_a_shifted_set_is_resolved():
    resolved = _repeat(0.6, repeats=30, seed=4)
    assert resolved["fid"] >= 0.9 and resolved["kid"] >= 0.9 and resolved["class_accuracy"] >= 0.9


def test_pairing_removes_the_noise_two_models_share():
    """Two models measured from the same noise (b is a slightly perturbed a) have a far narrower difference
    interval than either model's own interval, and the difference is resolved only when it is real."""
    rng = np.random.default_rng(5)
    ref = Reference(gaussian(rng, M, 0.3, 1.1), neighbourhood=3)
    xs = [gaussian(rng, N) for _ in range(3)]
    a = measure_sets([SeedSet(s, x, np.ones(N, bool)) for s, x in enumerate(xs)], ref)["fid"]
    b = measure_sets([SeedSet(s, x + 0.05 + 0.01 * rng.normal(size=x.shape), np.ones(N, bool))
                      for s, x in enumerate(xs)], ref)["fid"]
    own, diff = a.interval(), difference(b, a)
    assert diff.high - diff.low < 0.3 * (own.high - own.low)
    assert diff.resolved


def test_replicates_survive_a_round_trip_through_arrays():
    rng = np.random.default_rng(6)
    ref = Reference(gaussian(rng, M), neighbourhood=3, content_hash="abc")
    fid = measure_sets([SeedSet(s, gaussian(rng, N), np.ones(N, bool)) for s in (4, 9)], ref)["fid"]
    again = Measured.from_arrays(fid.to_arrays("rf1/euler/1/fid"), "rf1/euler/1/fid", fid.pairing)
    assert again.interval() == fid.interval() and difference(again, fid).estimate == 0.0


def test_intervals_over_runs_use_student_t_with_ddof_1():
    interval = over_runs([3.0, 4.0, 5.0])
    assert interval.estimate == 4.0 and interval.method == "runs"
    assert interval.high - 4.0 == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert math.isnan(over_runs([3.0]).low) and over_runs([3.0]).verdict == "no interval"
    assert Interval(0.5, 0.1, 0.9, "x").verdict == "resolved"
    assert Interval(0.5, -0.1, 0.9, "x").verdict == "within noise"


def test_sets_too_large_for_the_jackknife_are_measured_by_torch_fidelity_with_intervals_over_seeds(monkeypatch):
    import reflow.intervals as intervals

    rng = np.random.default_rng(7)
    y = gaussian(rng, M, 0.3)
    sets = [SeedSet(s, gaussian(rng, N), np.ones(N, bool)) for s in range(3)]
    exact = measure_sets(sets, Reference(y, neighbourhood=3))
    monkeypatch.setattr(intervals, "JACKKNIFE_MAX_FLOATS", 10.0)
    large = measure_sets(sets, Reference(y, neighbourhood=3))
    assert not large["fid"].has_replicates and large["fid"].interval().method == "seeds"
    for name in ("fid", "precision", "recall", "class_accuracy"):
        assert large[name].estimate == pytest.approx(exact[name].estimate, rel=1e-6), name
    assert difference(large["fid"], large["fid"]).estimate == 0.0
