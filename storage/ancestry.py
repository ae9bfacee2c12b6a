"""A model's ancestry and where two pipelines part, from their `StageRecord`s (`storage.records`).

Stages are joined by hashes alone: a dep belongs to the stage whose output has its path and hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.records import LineageError, Records, StageRecord


@dataclass(frozen=True)
class LineageInput:
    """A dep of a stage: an output of `producer` (code and data have none); stale when the producer's
    recorded output has another hash, i.e. the dep was made by a run these records do not hold."""

    path: str
    hash: str
    producer: str | None = None
    stale: bool = False


@dataclass(frozen=True)
class LineageStep:
    record: StageRecord
    inputs: list[LineageInput]


def _topological(upstream: dict[str, set[str]]) -> list[str]:
    """Stages with their upstream stages first; ties by name, so the order is stable."""
    from graphlib import TopologicalSorter

    sorter = TopologicalSorter(upstream)
    sorter.prepare()
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        order.extend(ready)
        sorter.done(*ready)
    return order


def _inputs(record: StageRecord, records: Records) -> list[LineageInput]:
    producer = {p: s for s, rec in records.items() for p in rec.outs}
    return [LineageInput(p, h, producer.get(p), p in producer and records[producer[p]].outs[p] != h)
            for p, h in sorted(record.deps.items())]


def ancestry(records: Records, stage: str) -> list[LineageStep]:
    """`stage` and every stage that made what it read, joined by equal hashes, roots first.

    A stale dep (its path is some stage's output, but not with this hash) ends its branch: the
    artifact it names is not among the records, so nothing above it can be claimed as an ancestor.
    """
    if stage not in records:
        raise LineageError(f"no stage {stage!r} among the recorded stages {sorted(records)}")
    steps: dict[str, LineageStep] = {}
    pending = [stage]
    while pending:
        name = pending.pop()
        if name not in steps:
            steps[name] = LineageStep(records[name], _inputs(records[name], records))
            pending.extend(i.producer for i in steps[name].inputs if i.producer and not i.stale)
    upstream = {name: {i.producer for i in step.inputs if i.producer and not i.stale}
                for name, step in steps.items()}
    return [steps[name] for name in _topological(upstream)]


@dataclass(frozen=True)
class StageDiff:
    """One stage in A and B. `status`: same | origin (first divergence) | inherited | only_a | only_b."""

    stage: str
    status: str
    changed_outs: list[str] = field(default_factory=list)
    differing_upstream: list[str] = field(default_factory=list)  # upstream stages whose outputs differ
    params: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # (key, A, B)
    deps: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # code/data (path, A, B)
    metrics: list[tuple[str, float | None, float | None, float | None]] = field(default_factory=list)


@dataclass(frozen=True)
class Comparison:
    stages: list[StageDiff]  # topological order

    @property
    def first_divergent(self) -> list[str]:
        return [d.stage for d in self.stages if d.status == "origin"]

    def only_in(self, side: str) -> list[str]:
        return [d.stage for d in self.stages if d.status == f"only_{side}"]


def _differing(a: dict, b: dict) -> list[tuple]:
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def compare(a: Records, b: Records) -> Comparison:
    """Where two pipelines' lineages part, why, and what it changed downstream.

    An origin is a stage whose outputs differ although every dep another stage produces has the same
    hash in A and B: the difference starts there, in its params or its code/data deps (both listed for
    every stage in A and B). Metric deltas (A, B, B-A) are given for each origin and every stage
    downstream of one. Stages are matched by name and joined to their upstream by dep path.
    """
    outs = {p: s for recs in (a, b) for s, rec in recs.items() for p in rec.outs}

    def producers(dep: str, consumer: str) -> set[str]:
        """Stages whose outputs a dep is, or holds (a dep on a folder, e.g. the report's `artifacts`)."""
        folder = dep.rstrip("/") + "/"
        return {s for p, s in outs.items() if (p == dep or p.startswith(folder)) and s != consumer}

    upstream = {s: set().union(*(producers(p, s) for rec in (a.get(s), b.get(s)) if rec for p in rec.deps))
                for s in a.keys() | b.keys()}
    diffs: list[StageDiff] = []
    affected: set[str] = set()  # origins and everything downstream of one
    changed: set[str] = set()  # stages whose outputs differ
    for s in _topological(upstream):
        if s not in a or s not in b:
            diffs.append(StageDiff(s, "only_a" if s in a else "only_b"))
            continue
        ra, rb = a[s], b[s]
        changed_outs = [p for p, _, _ in _differing(ra.outs, rb.outs)]
        dep_diffs = _differing(ra.deps, rb.deps)
        from_upstream = set().union(*(producers(p, s) for p, _, _ in dep_diffs))
        status = "same" if not changed_outs else "inherited" if from_upstream else "origin"
        if changed_outs:
            changed.add(s)
        if status == "origin" or upstream[s] & affected:
            affected.add(s)
        metrics = [(k, ra.metrics.get(k), rb.metrics.get(k)) for k in sorted(ra.metrics.keys() | rb.metrics.keys())]
        diffs.append(StageDiff(
            s, status, changed_outs, sorted(from_upstream & changed),
            _differing(ra.params, rb.params), [d for d in dep_diffs if not producers(d[0], s)],
            [(k, x, y, None if x is None or y is None else y - x) for k, x, y in metrics] if s in affected else []))
    return Comparison(diffs)
