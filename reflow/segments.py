"""How many steps a model cut into K time segments can take: a whole number of Euler steps per segment.

Torch-free, so that the params schema checks it with the same rule the samplers apply.
"""

from __future__ import annotations

from collections.abc import Iterable


def uneven_steps(steps: Iterable[int], k: int) -> list[int]:
    """The step counts in `steps` that a K-segment model cannot take (those that are not multiples of K)."""
    return [n for n in steps if n % k]


def steps_problem(steps: int, k: int) -> str | None:
    """Why a K-segment model cannot sample with `steps` steps, or None when it can."""
    if steps < 1:
        return f"steps must be >= 1, got {steps}"
    if uneven_steps([steps], k):
        return f"a model with {k} segments takes a multiple of {k} steps, not {steps}"
    return None
