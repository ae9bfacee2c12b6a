"""The pipeline's two chains, 1-RF -> reflow rounds -> a distilled student, run side by side.

- The **teacher chain** (stage names as they are): `rf1` on `rf1.coupling`, by default the teacher's pairs,
  then `rf@2`, `rf@3`, ... and `distill` (from `distill.source`).
- The **classic chain** (suffix `_classic`): `rf1_classic` on the independent coupling, real latents with fresh
  noise (RectifiedFlow's own 1-RF), then `rf@2_classic`, ... and `distill_classic` (from `distill.classic_source`).

Both take their hyperparameters from the same `rf1`, `reflow` and `distill` sections, so they differ in the
coupling their 1-RF starts from and in nothing else: the comparison the seeds' defining claim is about (reflow
straightens a flow that starts from independent noise; deterministic teacher pairs are nearly straight already).
`reflow_rounds` holds the rounds of both, keyed `K` and `K_classic`.
"""

from __future__ import annotations

import re

CLASSIC = "classic"
CHAINS = ("", CLASSIC)  # "" is the teacher chain
ROUND_KEY = re.compile(rf"(\d+)(?:_({CLASSIC}))?")


def suffix(chain: str) -> str:
    """The stage-name suffix of a chain: "" for the teacher chain, `_classic` for the classic one."""
    if chain not in CHAINS:
        raise ValueError(f"unknown chain {chain!r}; expected one of {list(CHAINS)}")
    return f"_{chain}" if chain else ""


def chain_of(stage: str) -> str:
    """The chain a stage or model name belongs to (`rf@2_classic` -> classic, `rf@2` -> the teacher's "")."""
    return CLASSIC if stage.endswith(f"_{CLASSIC}") else ""


def parse_round(key: str) -> tuple[int, str]:
    """(round k, chain) of a `reflow_rounds` key: `2` -> (2, ""), `3_classic` -> (3, "classic")."""
    match = ROUND_KEY.fullmatch(str(key))
    if match is None or int(match.group(1)) < 2:
        raise ValueError(f"reflow_rounds key {key!r}: expected a round number of 2 or more, optionally with the "
                         f"chain suffix _{CLASSIC} (2, 3, 2_{CLASSIC})")
    return int(match.group(1)), match.group(2) or ""


def first_flow(chain: str) -> str:
    """The 1-RF stage a chain starts from."""
    return f"rf1{suffix(chain)}"


def round_model(k: int, chain: str) -> str:
    """The stage of round k of a chain (round 1 is its 1-RF)."""
    return first_flow(chain) if k == 1 else f"rf@{k}{suffix(chain)}"


def source_key(chain: str) -> str:
    """The `distill` key naming the model a chain's student learns from: `source`, `classic_source`."""
    return f"{chain}_source" if chain else "source"
