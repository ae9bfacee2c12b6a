"""Stage records: what each stage consumed and produced, and where they are read from.

A `StageRecord` is one execution of a stage: its deps and outs with DVC's hashes, its params and metrics.
The records of a pipeline come from `dvc.lock` (the workspace, a git revision, a `dvc exp` experiment) or
from MLflow's tags (`storage.tracking`); `load_source` resolves a name to one of them. Records from any
source are joined by hashes alone: names and timestamps never join anything, a dep belongs to the stage
whose output has its path and hash. Their ancestry and comparison are `storage.ancestry`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ruamel.yaml import YAML

from storage.repo import _git
from storage.tracking import TAG, flatten, path_tag, tag_path


@dataclass(frozen=True)
class StageRecord:
    """One execution of a stage. Params are text, the form MLflow stores them in, so sources compare alike."""

    stage: str
    deps: dict[str, str]  # path -> DVC hash
    outs: dict[str, str]  # path -> DVC hash (metrics files included: dvc.lock lists them as outs)
    params: dict[str, str] = field(default_factory=dict)  # "section.key" -> value, this stage's sections only
    metrics: dict[str, float] = field(default_factory=dict)  # flattened metrics file, or the MLflow run's
    run_id: str | None = None  # the MLflow run that produced `outs`, when one was found


Records = dict[str, StageRecord]


class LineageError(LookupError):
    """A source, stage or run that cannot be resolved; the message says what was tried."""


@dataclass(frozen=True)
class Source:
    """A resolved comparison side: what the user typed, what it turned out to be, and its records."""

    name: str
    kind: str  # workspace | git revision | dvc experiment | mlflow run
    ref: str  # the commit or MLflow run id it resolved to ("" for the workspace)
    records: Records


def _numbers(flat: dict[str, str]) -> dict[str, float]:
    """The numeric leaves of a flattened metrics file; text, lists and nulls are not metrics."""
    out = {}
    for key, value in flat.items():
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def _lock_params(entry: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for file, values in (entry.get("params") or {}).items():
        prefix = "" if file == "params.yaml" else f"{file}:"
        out.update(flatten(values or {}, prefix))
    return out


def _parse_lock(text: str) -> dict[str, dict[str, dict[str, str]]]:
    # YAML 1.2, the dialect DVC writes: a YAML 1.1 reader turns `no` into False and leaves `1e-4` a
    # string, and the params would then differ in text from the same values logged to MLflow.
    data = YAML(typ="safe", pure=True).load(text) or {}
    out: dict[str, dict[str, dict[str, str]]] = {}
    for name, entry in (data.get("stages") or {}).items():
        out[name] = {
            kind: {d["path"]: d.get("md5") or d.get("hash", "") for d in entry.get(kind, [])}
            for kind in ("deps", "outs")
        }
        out[name]["params"] = _lock_params(entry)
    return out


def lock_entries(root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """{stage: {"deps": {path: hash}, "outs": {path: hash}, "params": {"section.key": value}}} of `dvc.lock` and of
    the text pipeline's `text/dvc.lock` (stage names are distinct: the text pipeline's start with `text_`)."""
    entries: dict = {}
    for lock in (root / "dvc.lock", root / "text" / "dvc.lock"):
        if lock.is_file():
            entries |= _parse_lock(lock.read_text())
    return entries


def _records(read: Callable[[str], bytes | None]) -> Records:
    """Records of the dvc.lock `read(path)` returns (a file's bytes, or None where it is absent).

    A metrics file counts only when its md5 is the one dvc.lock recorded: a file rewritten since (a stage
    run by hand) holds another run's numbers.
    """
    records = {}
    text = read("text/dvc.lock")  # the text pipeline's, where it ran
    entries = _parse_lock(read("dvc.lock").decode()) | (_parse_lock(text.decode()) if text is not None else {})
    for stage, entry in entries.items():
        metrics: dict[str, float] = {}
        for path, digest in entry["outs"].items():
            data = read(path) if path.endswith(".json") else None
            if data is not None and hashlib.md5(data).hexdigest() == digest:
                values = json.loads(data)
                metrics |= _numbers(flatten(values)) if isinstance(values, dict) else {}
        records[stage] = StageRecord(stage, entry["deps"], entry["outs"], entry["params"], metrics)
    return records


def workspace_records(root: Path) -> Records:
    """Records of the workspace: `dvc.lock` and the metrics files on disk."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        raise LineageError(f"{lock} does not exist: run `dvc repro` or `reflow run` first")
    return _records(lambda p: (root / p).read_bytes() if (root / p).is_file() else None)


def revision_commit(root: Path, rev: str) -> str | None:
    """The commit a git revision names, or None."""
    return _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}") or None


def experiment_commit(root: Path, name: str) -> str | None:
    """The commit of the `dvc exp` experiment `name` (ref refs/exps/<baseline>/NAME), or None.

    The same name may exist on several baselines; the one on HEAD wins, otherwise the name is ambiguous.
    """
    refs = (_git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps") or "").splitlines()
    matches = [line.split(" ", 1) for line in refs if line.endswith(f"/{name}")]
    if len(matches) > 1:
        head = revision_commit(root, "HEAD") or ""
        on_head = [m for m in matches if m[1].split("/")[2] + m[1].split("/")[3] == head]
        if len(on_head) != 1:
            raise LineageError(f"experiment {name!r} exists on several baselines: "
                               f"{', '.join(ref for _, ref in matches)}; name one by its commit")
        matches = on_head
    return matches[0][0] if matches else None


def revision_records(root: Path, commit: str) -> Records:
    """Records of a commit: its `dvc.lock` and the metrics files committed with it."""
    def show(path: str) -> bytes | None:
        res = subprocess.run(["git", "show", f"{commit}:./{path}"], cwd=root, capture_output=True)
        return res.stdout if res.returncode == 0 else None

    if show("dvc.lock") is None:
        raise LineageError(f"commit {commit[:12]} has no dvc.lock in {root}: nothing was reproduced there")
    return _records(show)


def _search_runs(client, filter_string: str, max_results: int = 1) -> list:
    """Runs matching an MLflow filter in every experiment of the store, newest first."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return client.search_runs(experiments, filter_string, order_by=["attributes.start_time DESC"],
                              max_results=max_results)


def _outputs_filter(outs: dict[str, str]) -> str:
    return " and ".join(f"tags.`{path_tag('output', p)}` = '{h}'" for p, h in sorted(outs.items()))


def find_producer_run(client, outs: dict[str, str]):
    """The newest MLflow run whose output tags equal these hashes, preferring one whose code executed."""
    if not outs:
        return None
    where = _outputs_filter(outs)
    runs = (_search_runs(client, f"{where} and tags.`{TAG}status` = 'executed'")
            or _search_runs(client, where))
    return runs[0] if runs else None


def _run_record(client, run) -> StageRecord:
    tags = run.data.tags
    deps = {p: h for k, h in tags.items() if (p := tag_path(k, "input"))}
    outs = {p: h for k, h in tags.items() if (p := tag_path(k, "output"))}
    params, metrics = dict(run.data.params), dict(run.data.metrics)
    if not params:  # a driver run (DVC restored the outputs): the run that made them holds the params
        producer = find_producer_run(client, outs)
        if producer is not None and producer.data.params:
            params, metrics = dict(producer.data.params), metrics or dict(producer.data.metrics)
    return StageRecord(tags[f"{TAG}stage"], deps, outs, params, metrics, run.info.run_id)


def mlflow_records(client, run_id: str) -> Records:
    """Records of an MLflow run and its ancestors, joined by hash.

    `run_id` may be a stage's run, the parent run of a `reflow run`, or that parent's pipeline_run_id tag.
    A pipeline run holds only the stages it executed or restored; the producers of everything they read
    are found by their output-hash tags, wherever and whenever they ran.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is not None and f"{TAG}stage" in run.data.tags:
        runs = [run]
    else:
        pipeline_id = run.data.tags.get(f"{TAG}pipeline_run_id", run_id) if run is not None else run_id
        found = _search_runs(client, f"tags.`{TAG}pipeline_run_id` = '{pipeline_id}'", max_results=10_000)
        runs = [r for r in found if f"{TAG}stage" in r.data.tags]
    if not runs:
        raise LineageError(f"no MLflow stage run or pipeline run with id {run_id!r} in {client.tracking_uri}")
    records: Records = {}
    for r in runs:  # newest first: a stage retried within one pipeline run keeps its last run
        records.setdefault(r.data.tags[f"{TAG}stage"], _run_record(client, r))

    looked_up: set[tuple[str, str]] = set()
    pending = list(records.values())
    while pending:
        produced = {(p, h) for rec in records.values() for p, h in rec.outs.items()}
        for dep in sorted(pending.pop().deps.items()):
            if dep in produced or dep in looked_up:
                continue
            looked_up.add(dep)
            producer = find_producer_run(client, dict([dep]))
            if producer is not None:
                record = _run_record(client, producer)
                if record.stage not in records:
                    records[record.stage] = record
                    pending.append(record)
    return records


def attach_runs(client, records: Records) -> Records:
    """The records with `run_id` set to the MLflow run found by their output hashes (kept where none is)."""
    out = {}
    for stage, rec in records.items():
        run = None if rec.run_id else find_producer_run(client, rec.outs)
        out[stage] = replace(rec, run_id=run.info.run_id) if run is not None else rec
    return out


def load_source(root: Path, name: str, client=None) -> Source:
    """Resolve a side: `workspace`, a git revision, a `dvc exp` name, or an MLflow run id, in that order."""
    if name == "workspace":
        return Source(name, "workspace", "", workspace_records(root))
    if commit := revision_commit(root, name):
        return Source(name, "git revision", commit, revision_records(root, commit))
    if commit := experiment_commit(root, name):
        return Source(name, "dvc experiment", commit, revision_records(root, commit))
    tried = ["'workspace'", f"a git revision in {root}", "a `dvc exp` name under refs/exps"]
    if client is not None:
        try:
            return Source(name, "mlflow run", name, mlflow_records(client, name))
        except LineageError:
            pass
        tried.append(f"an MLflow run or pipeline run id in {client.tracking_uri}")
    else:
        tried.append("an MLflow run id (no MLflow store)")
    raise LineageError(f"{name!r} is none of: {', '.join(tried)}")
