"""`reflow lineage` and `reflow compare`: a model's ancestry, and where two pipelines part, from hashes.

Both read what DVC and MLflow already hold (dvc.lock, committed metrics, `dvc exp` refs, MLflow tags);
nothing is run or written. Imports are lazy, as in `flows/cli.py`.

This module holds `reflow lineage`, the commands' registration and what every report shares (the MLflow store,
how a source is shown, printing a report or its JSON); comparing pipelines and replicates is flows/compare.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.records import Records, Source

SHORT = 8  # hash characters shown; the JSON output has them whole


def short_hash(digest: str | None) -> str:
    return digest[:SHORT] if digest else "-"


def format_number(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else f"{value:+.4g}" if signed else f"{value:.4g}"


def table(header: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    from measure.report import text_table

    return text_table(header, rows, indent=indent, rule=False)


def tracking_params(root: Path):
    """Only the `tracking` section of params.yaml: lineage must work while other sections are mid-edit."""
    from pydantic import ValidationError

    from runtime.params import ParamsError, TrackingParams, read_params_mapping
    from storage.records import LineageError

    path = root / "params.yaml"
    try:
        raw = read_params_mapping(path) if path.is_file() else {}
    except ParamsError as exc:
        raise LineageError(str(exc)) from None
    try:
        return TrackingParams.model_validate(raw.get("tracking") or {})
    except ValidationError as exc:
        raise LineageError(f"{path}: the tracking section is invalid: {exc}") from None


def mlflow_client(root: Path, uri: str | None):
    """A client on the project's MLflow store, or None when the default sqlite store was never created
    (a read-only command must not create one)."""
    import mlflow

    from storage.tracking import tracking_uri

    resolved = tracking_uri(uri, root)
    if resolved.startswith("sqlite:///") and not Path(resolved.removeprefix("sqlite:///")).is_file():
        return None
    mlflow.set_tracking_uri(resolved)  # storage.tracking.run_link asks the global client
    return mlflow.MlflowClient(resolved)


def source_json(source: Source) -> dict[str, str]:
    return {"name": source.name, "kind": source.kind, "ref": source.ref}


def side_label(source: dict[str, str]) -> str:
    """`var (dvc experiment 3bff10120c8b)`; just `workspace` for the workspace."""
    if source["kind"] == source["name"]:
        return source["name"]
    ref = source["ref"]
    return f"{source['name']} ({source['kind']}{'' if ref == source['name'] else ' ' + ref[:12]})"


def answer(command: str, build: Callable[[Path], dict[str, Any]], show: Callable[[dict[str, Any]], None],
           as_json: bool) -> int:
    """Build a report in the repo root and print it (or its JSON); 2 with the reason when it cannot be built."""
    from storage.records import LineageError
    from storage.repo import find_repo_root

    try:
        report = build(find_repo_root())
    except (LineageError, FileNotFoundError) as exc:
        print(f"reflow {command}: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        show(report)
    return 0


# ---------------------------------------------------------------------------------------------------------
# reflow lineage
# ---------------------------------------------------------------------------------------------------------
def _repo_path(root: Path, target: str) -> str | None:
    """`target` as a path relative to the repo root (given relative to the cwd, or absolute), or None."""
    full = Path(os.path.normpath(Path.cwd() / target))
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        return None


def resolve_target(root: Path, records: Records, target: str, client) -> tuple[Records, str]:
    """(records, stage) for a stage name, a path inside a stage's output, or an MLflow stage run id."""
    from storage.records import LineageError, mlflow_records

    if target in records:
        return records, target
    path = _repo_path(root, target)
    for stage, record in sorted(records.items()):
        if path and any(path == out or path.startswith(out + "/") for out in record.outs):
            return records, stage
    tried = f"a stage among {sorted(records)}, a path inside one of their outputs"
    if client is None:
        raise LineageError(f"{target!r} is neither {tried}, nor an MLflow run id (no MLflow store)")
    try:
        from_mlflow = mlflow_records(client, target)
    except LineageError:
        raise LineageError(f"{target!r} is neither {tried}, nor an MLflow run id in {client.tracking_uri}") from None
    stage = next((s for s, r in from_mlflow.items() if r.run_id == target), None)
    if stage is None:
        raise LineageError(f"{target!r} is a pipeline run, not a stage's run: name one of its stages "
                           f"{sorted(from_mlflow)} and pass the run with --at, e.g. "
                           f"`reflow lineage {sorted(from_mlflow)[-1]} --at {target}`")
    return from_mlflow, stage


def lineage_report(root: Path, target: str, at: str = "workspace") -> dict[str, Any]:
    """The ancestry of `target` in the source `at`, each stage with its MLflow run found by output hash."""
    from storage.ancestry import ancestry
    from storage.records import attach_runs, load_source
    from storage.tracking import run_link

    tracking = tracking_params(root)
    client = mlflow_client(root, tracking.uri)
    source = load_source(root, at, client)
    records, stage = resolve_target(root, source.records, target, client)
    steps = ancestry(records, stage)
    runs = attach_runs(client, {s.record.stage: s.record for s in steps}) if client is not None else {}
    out = []
    for step in steps:
        record = runs.get(step.record.stage, step.record)
        out.append({
            "stage": record.stage, "params": record.params,
            "inputs": [asdict(i) | ({"producer_now": records[i.producer].outs[i.path]} if i.stale else {})
                       for i in step.inputs],
            "outputs": record.outs, "metrics": record.metrics,
            "run_id": record.run_id,
            "mlflow_link": run_link(tracking.ui_url, record.run_id) if record.run_id else None,
        })
    return {"target": target, "stage": stage, "source": source_json(source),
            "mlflow_store": client.tracking_uri if client is not None else None, "steps": out}


def _print_lineage(report: dict[str, Any]) -> None:
    print(f"Lineage of {report['target']} (stage {report['stage']}) in {side_label(report['source'])}, roots first; "
          "stages joined by equal DVC hashes\n")
    for step in report["steps"]:
        print(step["stage"])
        if step["params"]:
            print("  params   " + ", ".join(f"{k}={v}" for k, v in sorted(step["params"].items())))
        for i in step["inputs"]:
            note = f"from {i['producer']}" if i["producer"] else ""
            if i["stale"]:
                note = (f"STALE: {i['producer']}'s recorded output is {short_hash(i['producer_now'])}; "
                        "the run that made this one is not recorded")
            print(f"  input    {i['path']}  {short_hash(i['hash'])}  {note}".rstrip())
        for path, digest in sorted(step["outputs"].items()):
            print(f"  output   {path}  {short_hash(digest)}")
        if step["metrics"]:
            print("  metrics  " + ", ".join(f"{k}={format_number(v)}" for k, v in sorted(step["metrics"].items())))
        missing = "no run with these output hashes" if report["mlflow_store"] else "no MLflow store"
        print(f"  mlflow   {step['mlflow_link'] or missing}")


def cmd_lineage(args: argparse.Namespace) -> int:
    return answer("lineage", lambda root: lineage_report(root, args.target, args.at), _print_lineage, args.json)


SIDE_HELP = "`workspace`, a git revision, a `dvc exp` name, or an MLflow pipeline run id (tried in that order)"


def add_commands(subparsers) -> None:
    """Register `lineage` and `compare` on the `reflow` command's subparsers."""
    from flows.compare import cmd_compare

    p = subparsers.add_parser("lineage", help="a model's ancestry stage by stage, joined by DVC hashes")
    p.add_argument("target", help="a stage (rf@2), a path inside its output (artifacts/rf@2/transformer), "
                                  "or an MLflow stage run id")
    p.add_argument("--at", default="workspace", help=f"where to read the pipeline: {SIDE_HELP}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_lineage)

    p = subparsers.add_parser("compare", help="where two pipelines' lineages part, why, and the metric deltas")
    p.add_argument("a", help=SIDE_HELP)
    p.add_argument("b", help=SIDE_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_compare)
