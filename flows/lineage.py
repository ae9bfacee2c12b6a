"""`reflow lineage` and `reflow compare`: a model's ancestry, and where two pipelines part, from hashes.

Both read what DVC and MLflow already hold (dvc.lock, committed metrics, `dvc exp` refs, MLflow tags);
nothing is run or written. Imports are lazy, as in `flows/cli.py`.
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
    from storage.records import Records, Source, StageRecord

SHORT = 8  # hash characters shown; the JSON output has them whole


def _short(digest: str | None) -> str:
    return digest[:SHORT] if digest else "-"


def _number(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else f"{value:+.4g}" if signed else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    from measure.report import text_table

    return text_table(header, rows, indent=indent, rule=False)


def _tracking(root: Path):
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


def _client(root: Path, uri: str | None):
    """A client on the project's MLflow store, or None when the default sqlite store was never created
    (a read-only command must not create one)."""
    import mlflow

    from storage.tracking import tracking_uri

    resolved = tracking_uri(uri, root)
    if resolved.startswith("sqlite:///") and not Path(resolved.removeprefix("sqlite:///")).is_file():
        return None
    mlflow.set_tracking_uri(resolved)  # storage.tracking.run_link asks the global client
    return mlflow.MlflowClient(resolved)


def _source_json(source: Source) -> dict[str, str]:
    return {"name": source.name, "kind": source.kind, "ref": source.ref}


def _side(source: dict[str, str]) -> str:
    """`var (dvc experiment 3bff10120c8b)`; just `workspace` for the workspace."""
    if source["kind"] == source["name"]:
        return source["name"]
    ref = source["ref"]
    return f"{source['name']} ({source['kind']}{'' if ref == source['name'] else ' ' + ref[:12]})"


def _answer(command: str, build: Callable[[Path], dict[str, Any]], show: Callable[[dict[str, Any]], None],
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

    tracking = _tracking(root)
    client = _client(root, tracking.uri)
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
    return {"target": target, "stage": stage, "source": _source_json(source),
            "mlflow_store": client.tracking_uri if client is not None else None, "steps": out}


def _print_lineage(report: dict[str, Any]) -> None:
    print(f"Lineage of {report['target']} (stage {report['stage']}) in {_side(report['source'])}, roots first; "
          "stages joined by equal DVC hashes\n")
    for step in report["steps"]:
        print(step["stage"])
        if step["params"]:
            print("  params   " + ", ".join(f"{k}={v}" for k, v in sorted(step["params"].items())))
        for i in step["inputs"]:
            note = f"from {i['producer']}" if i["producer"] else ""
            if i["stale"]:
                note = (f"STALE: {i['producer']}'s recorded output is {_short(i['producer_now'])}; "
                        "the run that made this one is not recorded")
            print(f"  input    {i['path']}  {_short(i['hash'])}  {note}".rstrip())
        for path, digest in sorted(step["outputs"].items()):
            print(f"  output   {path}  {_short(digest)}")
        if step["metrics"]:
            print("  metrics  " + ", ".join(f"{k}={_number(v)}" for k, v in sorted(step["metrics"].items())))
        missing = "no run with these output hashes" if report["mlflow_store"] else "no MLflow store"
        print(f"  mlflow   {step['mlflow_link'] or missing}")


def cmd_lineage(args: argparse.Namespace) -> int:
    return _answer("lineage", lambda root: lineage_report(root, args.target, args.at), _print_lineage, args.json)


# ---------------------------------------------------------------------------------------------------------
# reflow compare
# ---------------------------------------------------------------------------------------------------------
def search_filter(source: Source, stage: str, record: StageRecord) -> str:
    """An MLflow search filter finding this side's run of `stage`: by experiment name for a `dvc exp`
    (its stages are tagged with it), otherwise by the hash of the stage's first output."""
    from storage.tracking import TAG, path_tag

    if source.kind == "dvc experiment":
        return f"tags.\"{TAG}stage\" = '{stage}' and tags.\"{TAG}dvc_exp_name\" = '{source.name}'"
    path, digest = sorted(record.outs.items())[0]
    return f"tags.\"{path_tag('output', path)}\" = '{digest}'"


def compare_link(ui_url: str, client, run_ids: list[str]) -> str:
    """The MLflow UI page comparing these runs side by side."""
    from urllib.parse import quote

    experiments = sorted({client.get_run(r).info.experiment_id for r in run_ids})
    return (f"{ui_url.rstrip('/')}/#/compare-runs?runs={quote(json.dumps(run_ids))}"
            f"&experiments={quote(json.dumps(experiments))}")


def compare_report(root: Path, a: str, b: str) -> dict[str, Any]:
    """Both sides resolved, their comparison, and for each first divergent stage the MLflow ways in."""
    from storage.ancestry import compare
    from storage.records import attach_runs, load_source

    tracking = _tracking(root)
    client = _client(root, tracking.uri)
    side_a, side_b = load_source(root, a, client), load_source(root, b, client)
    comparison = compare(side_a.records, side_b.records)
    mlflow: dict[str, dict[str, Any]] = {}
    for stage in comparison.first_divergent:
        ra, rb = side_a.records[stage], side_b.records[stage]
        entry: dict[str, Any] = {"search_a": search_filter(side_a, stage, ra),
                                 "search_b": search_filter(side_b, stage, rb), "compare_link": None}
        if client is not None:
            found = attach_runs(client, {"a": ra, "b": rb})
            ids = entry["run_ids"] = [found["a"].run_id, found["b"].run_id]
            if all(ids):
                entry["compare_link"] = compare_link(tracking.ui_url, client, ids)
        mlflow[stage] = entry
    return {"a": _source_json(side_a), "b": _source_json(side_b),
            "first_divergent": comparison.first_divergent,
            "only_in_a": comparison.only_in("a"), "only_in_b": comparison.only_in("b"),
            "stages": [asdict(d) for d in comparison.stages], "mlflow": mlflow,
            "evaluations": evaluation_changes(root, side_a, side_b, comparison)}


def _evaluation(root: Path, source: Source, stage: str):
    """The evaluation `stage` made in `source`, read from DVC's cache by its output hash; None if absent."""
    from measure.results import evaluation_from_bytes
    from storage.repo import output_file

    out_hash = source.records[stage].outs.get(f"artifacts/{stage}", "")
    results, replicates = (output_file(root, out_hash, name) for name in ("results.json", "replicates.npz"))
    if results is None or replicates is None:
        return None
    return evaluation_from_bytes(stage.split("@", 1)[1], results, replicates)


def evaluation_changes(root: Path, side_a: Source, side_b: Source, comparison) -> list[dict[str, Any]]:
    """For every evaluate@ stage whose outputs differ: FID B - A at each point both measured, with its 95%
    interval (paired: both sides sample from the same per-sample noise against the same reference) and
    whether it is resolved or within noise."""
    from measure.results import paired_points, same_protocol, with_interval

    rows = []
    for d in comparison.stages:
        if not d.stage.startswith("evaluate@") or d.status in ("same", "only_a", "only_b"):
            continue
        a, b = _evaluation(root, side_a, d.stage), _evaluation(root, side_b, d.stage)
        if a is None or b is None:
            rows.append({"stage": d.stage, "note": "not in the local DVC cache: `dvc pull` that revision"})
            continue
        if reason := same_protocol(a, b):
            rows.append({"stage": d.stage, "note": f"not comparable: {reason}"})
            continue
        for c in paired_points(a, b):
            i = c.interval
            rows.append({"stage": d.stage, "point": c.b.split(" at ", 1)[1], "a": c.b_value, "b": c.a_value,
                         "b_minus_a": i.estimate, "low": i.low, "high": i.high, "verdict": i.verdict,
                         "shown": with_interval(i.estimate, i.low, i.high)})
    return rows


STATUS = {"same": "same outputs", "origin": "outputs differ  <- lineages part here",
          "only_a": "only in A", "only_b": "only in B"}


def _print_compare(report: dict[str, Any]) -> None:
    a, b = report["a"], report["b"]
    print(f"A: {_side(a)}\nB: {_side(b)}\n")
    print(_table(["stage", "A vs B"], [
        [d["stage"], STATUS.get(d["status"]) or f"outputs differ, from {', '.join(d['differing_upstream'])}"]
        for d in report["stages"]]))
    if not report["first_divergent"]:
        print("\nThe lineages do not part: every stage in both has the same outputs.")
    diffs = {d["stage"]: d for d in report["stages"]}
    for stage in report["first_divergent"]:
        d, links = diffs[stage], report["mlflow"][stage]
        print(f"\nFirst divergent stage: {stage}")
        if d["params"]:
            print("  params that differ:\n" + _table(["param", "A", "B"], [
                [k, "-" if x is None else x, "-" if y is None else y] for k, x, y in d["params"]], "    "))
        else:
            print("  params: the same")
        if d["deps"]:
            print("  code/data deps that differ:\n" + _table(["path", "A", "B"], [
                [p, _short(x), _short(y)] for p, x, y in d["deps"]], "    "))
        else:
            print("  code/data deps: the same")
        if not d["params"] and not d["deps"]:
            print("  same params, code and data: the stage is not deterministic, or the cause is not recorded")
        print(f"  MLflow compare: {links['compare_link'] or 'not both runs found by output hash'}")
        print(f"  MLflow search A: {links['search_a']}\n  MLflow search B: {links['search_b']}")
    rows = [[d["stage"], k, _number(x), _number(y), _number(delta, signed=True)]
            for d in report["stages"] for k, x, y, delta in d["metrics"]]
    if rows:
        print("\nMetrics at and downstream of the divergence:")
        print(_table(["stage", "metric", "A", "B", "B-A"], rows))
    if report["evaluations"]:
        print("\nFID, B - A with its 95% interval (paired over the shared noise and reference):")
        print(_table(["stage", "point", "A", "B", "B - A (95%)", "verdict"], [
            [e["stage"], e["point"], _number(e["a"]), _number(e["b"]), e["shown"], e["verdict"]] if "point" in e
            else [e["stage"], "", "", "", "", e["note"]] for e in report["evaluations"]]))


def cmd_compare(args: argparse.Namespace) -> int:
    return _answer("compare", lambda root: compare_report(root, args.a, args.b), _print_compare, args.json)


# ---------------------------------------------------------------------------------------------------------
# reflow results --runs: training replicates
# ---------------------------------------------------------------------------------------------------------
def _point_metrics(metrics: dict[str, float], measure: str) -> dict[str, float]:
    """`euler_nfe1_fid`-style entries of one evaluate stage's metrics (estimates, not interval ends)."""
    return {k.removesuffix(f"_{measure}"): v for k, v in metrics.items()
            if k.endswith(f"_{measure}") and not k.startswith(("floor_", "best_"))}


def _headline_value(records: Records, key: str, nfe, measure: str) -> float | None:
    record = records.get(f"evaluate@{key}")
    if record is None:
        return None
    if nfe == "best":
        return record.metrics.get(f"best_{measure}") if measure == "fid" else None
    points = _point_metrics(record.metrics, measure)
    return points.get(f"euler_nfe{nfe}", points.get(f"ddim_nfe{nfe}"))


def runs_report(root: Path, names: list[str], measure: str = "fid") -> dict[str, Any]:
    """Every evaluated point and headline difference over training replicates: per-run values and the
    interval over runs (Student t, ddof = 1), which covers training and sampling variance together."""
    from measure.intervals import over_runs
    from measure.results import HEADLINES
    from storage.ancestry import _differing as differing_keys
    from storage.records import load_source

    client = _client(root, _tracking(root).uri)
    sources = [load_source(root, name, client) for name in names]
    base = sources[0].records
    differing = sorted({k for s in sources[1:] for stage in base.keys() & s.records.keys()
                        for k, _, _ in differing_keys(base[stage].params, s.records[stage].params)
                        if not k.rsplit(".", 1)[-1].endswith("seed")})
    points = []
    for stage in sorted(s for s in base if s.startswith("evaluate@")):
        per_run = [_point_metrics(src.records[stage].metrics, measure) if stage in src.records else {}
                   for src in sources]
        for label in sorted(set.intersection(*(set(r) for r in per_run))):
            values = [r[label] for r in per_run]
            points.append({"stage": stage, "point": label, "values": values, **over_runs(values).as_dict()})
    headlines = []
    for question, (key_a, nfe_a), (key_b, nfe_b) in HEADLINES:
        diffs = [(_headline_value(s.records, key_a, nfe_a, measure), _headline_value(s.records, key_b, nfe_b, measure))
                 for s in sources]
        if all(a is not None and b is not None for a, b in diffs):
            interval = over_runs([a - b for a, b in diffs])
            headlines.append({"question": question, "values": [a - b for a, b in diffs], **interval.as_dict(),
                              "verdict": interval.verdict})
    return {"runs": [_source_json(s) for s in sources], "measure": measure, "not_seeds": differing,
            "points": points, "headlines": headlines}


def _print_runs(report: dict[str, Any]) -> None:
    from measure.results import with_interval

    runs = ", ".join(_side(r) for r in report["runs"])
    print(f"{report['measure']} over {len(report['runs'])} training replicates ({runs}); ± is the 95% interval over "
          "runs (Student t, ddof 1), which holds training and sampling variance\n")
    if report["not_seeds"]:
        print("warning: the runs differ in more than seeds: " + ", ".join(report["not_seeds"]) + "\n")
    print(_table(["stage", "point", "mean ± 95%", "per run"], [
        [p["stage"], p["point"], with_interval(p["estimate"], p["low"], p["high"], report["measure"]),
         ", ".join(f"{v:.3g}" for v in p["values"])] for p in report["points"]], indent=""))
    if report["headlines"]:
        print("\nHeadline differences, each run pairing its own models:")
        print(_table(["comparison", "A - B ± 95%", "per run", "verdict"], [
            [h["question"], with_interval(h["estimate"], h["low"], h["high"], report["measure"]),
             ", ".join(f"{v:+.3g}" for v in h["values"]), h["verdict"]] for h in report["headlines"]], indent=""))


def cmd_runs(args: argparse.Namespace) -> int:
    return _answer("results --runs", lambda root: runs_report(root, args.runs, args.measure), _print_runs,
                   getattr(args, "json", False))


SIDE_HELP = "`workspace`, a git revision, a `dvc exp` name, or an MLflow pipeline run id (tried in that order)"


def add_commands(subparsers) -> None:
    """Register `lineage` and `compare` on the `reflow` command's subparsers."""
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
