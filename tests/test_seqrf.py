"""Sequential rectified flow: boundaries, the adaptive dynamic program, segment targets, sampling."""

import itertools

import numpy as np
import pytest
import torch

from reflow.rectified import interpolate
from reflow.samplers import Field, time_grid
from reflow.segments import steps_problem, uneven_steps
from reflow.seqrf import (
    Segmented,
    adaptive_boundaries,
    segment_endpoints,
    segment_of,
    segment_train_example,
    uniform_boundaries,
)

KINKS = [0.0, 0.3, 0.7, 1.0]


def _knot_points(seed: int = 0) -> torch.Tensor:
    """Positions `[len(KINKS), B, C, H]` of a piecewise-linear path at its kinks."""
    return torch.randn(len(KINKS), 6, 2, 3, generator=torch.Generator().manual_seed(seed))


def _piecewise_linear(points: torch.Tensor, t: float) -> torch.Tensor:
    i = segment_of(t, KINKS)
    u = (t - KINKS[i]) / (KINKS[i + 1] - KINKS[i])
    return (1 - u) * points[i] + u * points[i + 1]


def test_uniform_boundaries() -> None:
    assert uniform_boundaries(1) == [0.0, 1.0]
    assert uniform_boundaries(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        uniform_boundaries(0)


def test_segment_of_uses_half_open_segments_and_closes_the_last() -> None:
    assert [segment_of(t, KINKS) for t in (0.0, 0.29, 0.3, 0.69, 0.7, 1.0)] == [0, 0, 1, 1, 2, 2]
    t = torch.tensor([0.0, 0.3, 0.5, 0.99, 1.0])
    assert segment_of(t, KINKS).tolist() == [0, 1, 1, 2, 2]
    assert segment_of(t, [0.0, 1.0]).tolist() == [0] * 5


def test_segment_train_example_times_points_and_targets() -> None:
    g = torch.Generator().manual_seed(0)
    x_ti, x_tj = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t_i, t_j = torch.tensor([0.0, 0.25, 0.5]), torch.tensor([0.25, 0.5, 1.0])
    u = torch.tensor([0.0, 0.5, 1.0])
    x_u, abs_t, target = segment_train_example(x_ti, x_tj, t_i, t_j, u)
    torch.testing.assert_close(abs_t, torch.tensor([0.0, 0.375, 1.0]))
    torch.testing.assert_close(x_u[0], x_ti[0])
    torch.testing.assert_close(x_u[1], 0.5 * (x_ti[1] + x_tj[1]))
    torch.testing.assert_close(x_u[2], x_tj[2])
    widths = (t_j - t_i).view(3, 1, 1)
    torch.testing.assert_close(target, (x_tj - x_ti) / widths)
    # Following the target from x_ti for the segment's width lands on x_tj: the chord in absolute time.
    torch.testing.assert_close(x_ti + widths * target, x_tj)
    # Scalar times broadcast too.
    _, abs_t, target = segment_train_example(x_ti, x_tj, 0.5, 0.75, 0.5)
    assert abs_t.item() == 0.625
    torch.testing.assert_close(target, 4 * (x_tj - x_ti))


def test_adaptive_boundaries_recover_the_kinks_of_a_piecewise_linear_path() -> None:
    points = _knot_points()
    times = torch.linspace(0, 1, 21, dtype=torch.float64)
    trajectory = torch.stack([_piecewise_linear(points, t) for t in times.tolist()])
    found = adaptive_boundaries(trajectory, times, 3)
    assert found == pytest.approx(KINKS, abs=1e-9)
    assert adaptive_boundaries(trajectory, times, 1) == [0.0, 1.0]
    with pytest.raises(ValueError):
        adaptive_boundaries(trajectory, times, 21)


def _segment_error(trajectory: torch.Tensor, times: torch.Tensor, i: int, j: int) -> float:
    """The documented cost, computed directly: sum over the fine steps of Δt mean ||u_m - chord slope||^2."""
    dt = (times[i + 1 : j + 1] - times[i:j]).view(-1, 1, 1)
    u = (trajectory[i + 1 : j + 1] - trajectory[i:j]) / dt
    slope = (trajectory[j] - trajectory[i]) / (times[j] - times[i])
    return (dt.view(-1) * (u - slope).pow(2).flatten(1).mean(dim=1)).sum().item()


def test_adaptive_boundaries_are_the_exhaustive_optimum_on_a_random_path() -> None:
    g = torch.Generator().manual_seed(2)
    times = torch.cat([torch.zeros(1), torch.rand(13, generator=g).sort().values, torch.ones(1)]).double()
    trajectory = torch.randn(15, 4, 3, generator=g, dtype=torch.float64).cumsum(dim=0)
    index = {t: i for i, t in enumerate(times.tolist())}
    for k in (2, 3):
        found = [index[t] for t in adaptive_boundaries(trajectory, times, k)]
        cost = sum(_segment_error(trajectory, times, a, b) for a, b in zip(found[:-1], found[1:], strict=True))
        splits = itertools.combinations(range(1, 14), k - 1)
        best = min(
            sum(_segment_error(trajectory, times, a, b) for a, b in itertools.pairwise([0, *cut, 14])) for cut in splits
        )
        assert found[0] == 0 and found[-1] == 14
        assert cost == pytest.approx(best, rel=1e-9)


def test_adaptive_boundaries_follow_curvature_not_the_uniform_grid() -> None:
    # x(t) = t^4 bends near t = 1: the chosen boundaries crowd there.
    times = torch.linspace(0, 1, 41)
    trajectory = (times**4).view(41, 1, 1).expand(41, 2, 3).contiguous()
    found = adaptive_boundaries(trajectory, times, 4)
    assert found[0] == 0.0 and found[-1] == 1.0 and found == sorted(found)
    gaps = [b - a for a, b in zip(found[:-1], found[1:], strict=True)]
    assert gaps[-1] < 0.25 < gaps[0]


def test_segmented_sampler_lands_on_the_end_point_with_one_evaluation_per_segment() -> None:
    points = _knot_points(1)
    chords = [(points[i + 1] - points[i]) / (KINKS[i + 1] - KINKS[i]) for i in range(3)]

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([chords[i][b] for b, i in enumerate(segment_of(t, KINKS).tolist())])

    field = Field(velocity)
    result = Segmented(tuple(KINKS))(field, points[0], 3, return_trajectory=True)
    torch.testing.assert_close(result.x, points[-1])
    assert result.nfe == 3 == field.nfe
    assert result.trajectory is not None
    assert [t for t, _ in result.trajectory] == KINKS
    for (_, x), expected in zip(result.trajectory, points, strict=True):
        torch.testing.assert_close(x, expected)
    finer = Segmented(tuple(KINKS))(Field(velocity), points[0], 12)
    torch.testing.assert_close(finer.x, points[-1])
    assert finer.nfe == 12


def test_segmented_sampler_splits_the_steps_evenly_and_visits_the_boundary() -> None:
    boundaries = (0.0, 0.2, 1.0)
    field = Field(lambda x, t: torch.ones_like(x))
    result = Segmented(boundaries)(field, torch.zeros(3, 2), 4, return_trajectory=True)
    assert result.nfe == 4 == field.nfe
    assert result.trajectory is not None
    # Two Euler steps inside each segment, so the boundary t = 0.2 is a grid point, not 0.25.
    assert [t for t, _ in result.trajectory] == pytest.approx([0.0, 0.1, 0.2, 0.6, 1.0])
    torch.testing.assert_close(result.trajectory[2][1], torch.full((3, 2), 0.2))
    torch.testing.assert_close(result.x, torch.ones(3, 2))


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_segmented_sampler_refuses_steps_that_are_not_a_multiple_of_its_segments(steps: int) -> None:
    with pytest.raises(ValueError, match="multiple of 2"):
        Segmented((0.0, 0.5, 1.0))(Field(lambda x, t: x), torch.zeros(2, 2), steps)


@pytest.mark.parametrize("steps", [0, None])
def test_segmented_sampler_refuses_no_steps(steps: int | None) -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Segmented((0.0, 0.5, 1.0))(Field(lambda x, t: x), torch.zeros(2, 2), steps)


def test_steps_problem_and_uneven_steps() -> None:
    assert uneven_steps([1, 2, 3, 4, 6, 8], 2) == [1, 3]
    assert uneven_steps([4, 8], 4) == [] and uneven_steps([5, 7], 1) == []
    assert steps_problem(4, 2) is None and steps_problem(3, 1) is None
    assert steps_problem(6, 4) == "a model with 4 segments takes a multiple of 4 steps, not 6"
    assert "steps must be >= 1" in steps_problem(0, 2)
    assert "steps must be >= 1" in steps_problem(-4, 2)


def test_segment_endpoints_carry_each_row_through_its_own_segment() -> None:
    """On a constant field v, x_end = x_start + (t_end - t_start) v; starts follow the flow or are given."""
    v = torch.tensor([1.0, -2.0])
    field_for = lambda rows: Field(lambda x, t: v.expand_as(x))  # noqa: E731
    boundaries = [0.0, 0.25, 1.0]
    times = [time_grid(0.0, 0.25, 2), time_grid(0.25, 1.0, 3)]
    z0 = torch.zeros(4, 2)
    segment = np.array([0, 1, 0, 1])
    x_start, x_end = segment_endpoints(field_for, z0, segment, times)
    torch.testing.assert_close(x_start[1], 0.25 * v)  # the flow's own trajectory up to t = 0.25
    torch.testing.assert_close(x_start[0], z0[0])
    widths = torch.tensor([boundaries[s + 1] - boundaries[s] for s in segment])[:, None]
    torch.testing.assert_close(x_end, x_start + widths * v)
    given = torch.full((4, 2), 5.0)
    x_start, x_end = segment_endpoints(field_for, z0, segment, times, x_start=given)
    torch.testing.assert_close(x_start, given)
    torch.testing.assert_close(x_end, given + widths * v)


def test_adaptive_boundaries_keep_every_segment_at_least_the_minimum_length() -> None:
    times = torch.linspace(0, 1, 41)
    trajectory = (times**4).view(41, 1, 1).expand(41, 2, 3).contiguous()
    free = adaptive_boundaries(trajectory, times, 4)
    assert min(b - a for a, b in itertools.pairwise(free)) < 0.15  # t^4 wants a short last segment
    bounded = adaptive_boundaries(trajectory, times, 4, min_length=0.15)
    assert min(b - a for a, b in itertools.pairwise(bounded)) >= 0.15 - 1e-6
    with pytest.raises(ValueError, match="do not fit"):
        adaptive_boundaries(trajectory, times, 4, min_length=0.3)


def test_a_segment_at_constant_velocity_costs_nothing_and_a_bent_one_its_velocity_gap() -> None:
    from reflow.seqrf import _segment_costs

    times = torch.linspace(0, 1, 5, dtype=torch.float64)
    straight = (3 * times - 1).view(5, 1, 1)
    assert torch.allclose(_segment_costs(straight, times)[0, 4], torch.zeros((), dtype=torch.float64), atol=1e-12)
    bent = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64).view(5, 1, 1)  # at rest, then speed 4
    # slope 2 over [0, 1]: velocity gaps 2 for the first half and 2 for the second, over length 1: cost 4.
    assert _segment_costs(bent, times)[0, 4].item() == pytest.approx(4.0)
    assert _segment_costs(bent, times)[2, 4].item() == pytest.approx(0.0, abs=1e-12)


def test_default_starts_on_a_paired_flow_are_where_the_sampler_goes_and_noised_data_is_not() -> None:
    """2-D toy of the mismatch `seqrf.start` guards against. A paired 1-RF that learned a guided teacher's map
    carries noise to the teacher's distribution, a narrow cluster away from the data (z1 = s z0 + b); the real
    latents lie elsewhere. Its paths are straight, so SeqRF's chords are the flow itself, and SeqRF's sampler
    (one Euler step per segment) visits exactly the flow's marginal at each boundary. Segment starts drawn
    from the flow's own trajectory (`teacher_trajectory`, the default) have that distribution; real data noised
    to t_i (`noised_data`) does not, so its segments train on points the sampler never visits."""
    s, b = 0.4, torch.tensor([2.0, 0.0])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # of the paths (1 + t(s - 1)) z0 + t b
        t = t[:, None]
        return (s - 1) * (x - t * b) / (1 + t * (s - 1)) + b

    k, n = 4, 8000
    boundaries = uniform_boundaries(k)
    times = [time_grid(t_i, t_j, 8) for t_i, t_j in itertools.pairwise(boundaries)]
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(n, 2, generator=g)
    segment = np.arange(n) % k
    trajectory_starts, _ = segment_endpoints(lambda rows: Field(velocity), z0, segment, times)
    data = torch.randn(n, 2, generator=g) * 0.5 + torch.tensor([0.0, 1.5])  # the real latents
    noised_starts = interpolate(z0, data, torch.tensor([boundaries[i] for i in segment]))
    # Where the sampler goes, from noise of its own.
    visited = Segmented(tuple(boundaries))(Field(velocity), torch.randn(n // k, 2, generator=g), k,
                                           return_trajectory=True).trajectory
    assert visited is not None
    for i in range(1, k):
        at_boundary = visited[i][1]
        ours, theirs = trajectory_starts[segment == i], noised_starts[segment == i]
        assert torch.allclose(ours.mean(0), at_boundary.mean(0), atol=0.1)
        assert torch.allclose(ours.std(0), at_boundary.std(0), rtol=0.1)
        assert (theirs.mean(0) - at_boundary.mean(0)).norm() > boundaries[i]  # 2.5 t apart in expectation
