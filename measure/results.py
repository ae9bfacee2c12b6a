"""The evaluations of a pipeline as tables and comparisons, every number with its 95% interval.

Read by the `report` stage, `reflow results` and `reflow compare`. Each `artifacts/evaluate@<key>/` holds
`results.json` (estimates, intervals, protocol) and `replicates.npz` (the leave-one-out replicates of every
measure at every point); `artifacts/fid_reference/floor.npz` holds the real-data floor's. A difference
between two points is computed from their replicates (`measure.intervals.difference`), paired where they
share the noise, and labelled resolved or within noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from measure.intervals import MEASURES, Interval, Measured, difference

TEACHER = "artifacts/dit"
TEACHERS = (TEACHER, "text/artifacts/teacher")  # the class pipeline's and the text pipeline's
# The chains (runtime/chains.py) by evaluate_models key: (name, (1-RF, 2-RF, the distilled student)).
CHAINS = (("teacher pairs", ("rf1", "rf2", "distill")),
          ("classic: independent noise", ("rf1_classic", "rf2_classic", "distill_classic")))
# The comparisons the pipeline exists to make, by evaluate_models key: (label, (key, NFE), (keys, NFE or "best")),
# where several keys in the second place mean the best point of any of them.
HEADLINES = (
    ("the one-step student against the teacher's best", ("distill", 1), (("dit",), "best")),
    *((f"{name}: 2-RF against 1-RF at one step", (rf2, 1), ((rf1,), 1)) for name, (rf1, rf2, _) in CHAINS),
    *((f"{name}: the one-step student against its chain's best flow", (student, 1), ((rf1, rf2), "best"))
      for name, (rf1, rf2, student) in CHAINS),
    ("one-step students: classic chain against teacher pairs", ("distill_classic", 1), (("distill",), 1)),
    ("SeqRF against 2-RF at 4 NFE", ("seqrf", 4), (("rf2",), 4)),
    ("MeanFlow against 2-RF at one step (both from 1-RF, on 2-RF's pairs)", ("meanflow", 1), (("rf2",), 1)),
    ("MeanFlow against the distilled student at one step", ("meanflow", 1), (("distill",), 1)),
    ("shortcut against the distilled student at one step", ("shortcut", 1), (("distill",), 1)),
    ("MeanFlow against shortcut at two steps", ("meanflow", 2), (("shortcut",), 2)),
)


@dataclass
class Evaluation:
    """One `evaluate@<key>` output: its results and, loaded on demand, its replicates."""

    key: str
    folder: Path
    results: dict[str, Any]
    _arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def model(self) -> str:
        return self.results["protocol"]["model"]

    @property
    def label(self) -> str:
        return f"{self.key} ({self.model.removeprefix('artifacts/')})"

    @property
    def points(self) -> list[dict[str, Any]]:
        return self.results["points"]

    def solvers(self) -> list[str]:
        return list(dict.fromkeys(p["solver"] for p in self.points))

    def at(self, nfe: int | str) -> dict[str, Any] | None:
        """The point at this NFE with the model's first solver (Euler, or DDIM for the teacher), or the
        lowest-FID point of any solver for "best"."""
        if nfe == "best":
            return min(self.points, key=lambda p: p["fid"])
        return next((p for p in self.points if p["solver"] == self.solvers()[0] and p["nfe"] == nfe), None)

    def measured(self, point: dict[str, Any], measure: str) -> Measured:
        if self._arrays is None:
            path = self.folder / "replicates.npz"
            with np.load(path, allow_pickle=False) as arrays:
                self._arrays = dict(arrays)
        return Measured.from_arrays(self._arrays, f"{point['solver']}/{point['steps']}/{measure}",
                                    point.get("pairing", ""))


def evaluation_from_bytes(key: str, results: bytes, replicates: bytes) -> Evaluation:
    """An evaluation read from elsewhere than the workspace (DVC's cache, for `reflow compare`)."""
    import io

    with np.load(io.BytesIO(replicates), allow_pickle=False) as arrays:
        return Evaluation(key, Path(), json.loads(results), dict(arrays))


def same_protocol(a: Evaluation, b: Evaluation) -> str | None:
    """Why two evaluations' numbers cannot be compared (another extractor or reference), or None."""
    pa, pb = a.results["protocol"], b.results["protocol"]
    if pa["extractor"]["sha256"] != pb["extractor"]["sha256"]:
        return "the FID extractors differ: the numbers live in different feature spaces"
    if pa["reference"]["content_hash"] != pb["reference"]["content_hash"]:
        return "the reference sets differ"
    return None


def paired_points(a: Evaluation, b: Evaluation, measure: str = "fid") -> list[Comparison]:
    """`b - a` at every (solver, steps) both measured: the change from A to B."""
    out = []
    for pa in a.points:
        pb = next((p for p in b.points if (p["solver"], p["steps"]) == (pa["solver"], pa["steps"])), None)
        if pb is not None:
            out.append(compare(f"{a.key}: B - A", b, pb, a, pa, measure))
    return out


def load_evaluations(root: Path, artifacts: Path | None = None) -> list[Evaluation]:
    """Every `evaluate@<key>/results.json` of an artifacts folder (the class pipeline's `artifacts/` unless
    given), the teacher first, then by key."""
    found = []
    for path in sorted((artifacts or root / "artifacts").glob("evaluate@*/results.json")):
        found.append(Evaluation(path.parent.name.split("@", 1)[1], path.parent, json.loads(path.read_text())))
    return sorted(found, key=lambda e: (e.model not in TEACHERS, e.key))


def load_floor(root: Path, artifacts: Path | None = None) -> dict[str, Measured] | None:
    """The real-data floor's measures with their replicates, or None before `fid_reference` ran."""
    path = (artifacts or root / "artifacts") / "fid_reference" / "floor.npz"
    if not path.is_file():
        return None
    protocol = json.loads((path.parent / "protocol.json").read_text())
    pairing = f"n={protocol['floor']['images_per_draw']}|{protocol['reference']['pairing']}"
    with np.load(path, allow_pickle=False) as arrays:
        return {m: Measured.from_arrays(arrays, m, pairing, draws_overlap=True) for m in MEASURES}


# ---------------------------------------------------------------------------------------------------------
# Cells and the main table
# ---------------------------------------------------------------------------------------------------------
def with_interval(estimate: float, low: float, high: float, measure: str = "fid") -> str:
    """`3.74 ± 0.52`, the ± being the 95% interval's half-width (the intervals are symmetric)."""
    if math.isnan(low):
        return f"{estimate:.3g}"
    half = (high - low) / 2
    return f"{estimate:.3g} ± {half:.2g}" if measure in ("fid", "kid") else f"{estimate:.2f} ± {half:.2f}"


def point_cell(point: dict[str, Any] | None, measure: str) -> str:
    return "" if point is None else with_interval(point[measure], point[f"{measure}_low"], point[f"{measure}_high"],
                                                  measure)


def interval_cell(interval: Interval, measure: str = "fid") -> str:
    return with_interval(interval.estimate, interval.low, interval.high, measure)


def results_table(evaluations: list[Evaluation], floor: dict[str, Measured] | None,
                  measure: str = "fid") -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per model and solver, one column per NFE actually spent (RK45 at the one it
    spent, rounded), the floor last."""
    nfes = sorted({round(p["nfe"]) for e in evaluations for p in e.points})
    header = ["model", "solver", *(f"NFE {n}" for n in nfes), "straightness", "best FID (NFE)"]
    rows = []
    for e in evaluations:
        for solver in e.solvers():
            points = {round(p["nfe"]): p for p in e.points if p["solver"] == solver}
            best = min(points.values(), key=lambda p: p["fid"])
            straight = "" if e.results["straightness"] is None else f"{e.results['straightness']:.3g}"
            rows.append([e.label, solver, *(point_cell(points.get(n), measure) for n in nfes), straight,
                         f"{best['fid']:.3g} ({best['nfe']:g})"])
    if floor is not None:
        cell = interval_cell(floor[measure].interval(), measure)
        rows.append(["real images (the floor)", "", *([cell] * len(nfes)), "", cell])
    return header, rows


# ---------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """`a - b` of one measure, with its 95% interval and verdict."""

    question: str
    a: str
    b: str
    measure: str
    a_value: float
    b_value: float
    interval: Interval

    def row(self) -> list[str]:
        return [self.question, self.a, self.b, f"{self.a_value:.3g}", f"{self.b_value:.3g}",
                interval_cell(self.interval, self.measure), self.interval.verdict]


COMPARISON_HEADER = ["comparison", "A", "B", "A", "B", "A - B (95%)", "verdict"]


def _describe(e: Evaluation, point: dict[str, Any]) -> str:
    solver = "" if point["solver"] in ("euler", "ddim") else f" ({point['solver']})"
    return f"{e.key} at NFE {point['nfe']:g}{solver}"


def compare(question: str, ea: Evaluation, pa: dict, eb: Evaluation, pb: dict, measure: str = "fid") -> Comparison:
    interval = difference(ea.measured(pa, measure), eb.measured(pb, measure))
    return Comparison(question, _describe(ea, pa), _describe(eb, pb), measure, pa[measure], pb[measure], interval)


def headline_comparisons(evaluations: list[Evaluation], measure: str = "fid") -> list[Comparison]:
    """The comparisons of HEADLINES whose models and NFE this pipeline evaluated."""
    by_key = {e.key: e for e in evaluations}
    out = []
    for question, (key_a, nfe_a), (keys_b, nfe_b) in HEADLINES:
        if key_a not in by_key or not all(k in by_key for k in keys_b):
            continue
        pa = by_key[key_a].at(nfe_a)
        candidates = [(by_key[k], by_key[k].at(nfe_b)) for k in keys_b]
        candidates = [(e, point) for e, point in candidates if point is not None]
        if pa is not None and candidates:
            eb, pb = min(candidates, key=lambda ep: ep[1]["fid"])
            out.append(compare(question, by_key[key_a], pa, eb, pb, measure))
    return out


def chain_table(evaluations: list[Evaluation], root: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each chain's models with their one-step FID (from their evaluation) and their one-step
    error against the teacher and straightness (on the held-out teacher pairs, from the model's own metrics),
    each with its 95% interval. Models this pipeline did not evaluate are left out."""
    from storage.checkpoints import CheckpointError, read_meta

    by_key = {e.key: e for e in evaluations}
    header = ["chain", "model", "FID, NFE 1", "best FID (NFE)", "error vs teacher, NFE 1", "straightness"]
    rows = []
    for name, keys in CHAINS:
        for key in keys:
            if key not in by_key:
                continue
            e = by_key[key]
            try:
                metrics = read_meta(root / e.model / "transformer").get("metrics", {})
            except CheckpointError:  # the model folder is gone (pruned, or not pulled): its FID still stands
                metrics = {}
            best = e.at("best")
            measured = [with_interval(metrics[m], metrics[f"{m}_low"], metrics[f"{m}_high"])
                        if f"{m}_low" in metrics else "" for m in ("error_1_step", "straightness")]
            rows.append([name, e.label, point_cell(e.at(1), "fid"), f"{point_cell(best, 'fid')} ({best['nfe']:g})",
                         *measured])
    return header, rows


def ranking(evaluations: list[Evaluation], measure: str = "fid") -> list[Comparison]:
    """At each NFE two or more models reached (first solver each): the best against the runner-up."""
    out = []
    for nfe in sorted({p["nfe"] for e in evaluations for p in e.points if p["solver"] == e.solvers()[0]}):
        here = sorted(((e.at(nfe)[measure], e) for e in evaluations if e.at(nfe) is not None),
                      key=lambda pe: pe[0] if measure in ("fid", "kid") else -pe[0])
        if len(here) >= 2:
            (_, best), (_, second) = here[:2]
            out.append(compare(f"best at NFE {nfe:g} against the runner-up", best, best.at(nfe), second,
                               second.at(nfe), measure))
    return out


def against_floor(evaluations: list[Evaluation], floor: dict[str, Measured], measure: str = "fid") -> list[Comparison]:
    """Each model's best point against the real-data floor (unpaired: the floor's images are not the models')."""
    out = []
    for e in evaluations:
        best = e.at("best")
        interval = difference(e.measured(best, measure), floor[measure])
        out.append(Comparison("best point against real images", _describe(e, best), "the floor", measure,
                              best[measure], floor[measure].estimate, interval))
    return out
