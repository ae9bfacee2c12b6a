"""`reflow compare` and `reflow results --runs`: pipelines side by side, from hashes.

`compare` finds where two pipelines' lineages part and why; `results --runs` puts training replicates' evaluated
points next to each other with an interval over the runs. Like `reflow lineage` (flows/lineage.py, which
registers `compare` and holds the helpers both use) they only read what DVC and MLflow hold; imports are lazy.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.lineage import (
    answer,
    format_number,
    mlflow_client,
    short_hash,
    side_label,
    source_json,
    table,
    tracking_params,
)

if TYPE_CHECKING:
    from storage.records import Records, Source, StageRecord


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

    tracking = tracking_params(root)
    client = mlflow_client(root, tracking.uri)
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
    return {"a": source_json(side_a), "b": source_json(side_b),
            "first_divergent": comparison.first_divergent,
            "only_in_a": comparison.only_in("a"), "only_in_b": comparison.only_in("b"),
            "stages": [asdict(d) for d in comparison.stages], "mlflow": mlflow,
            "evaluations": evaluation_changes(root, side_a, side_b, comparison)}


def _evaluation(root: Path, source: Source, stage: str):
    """The evaluation `stage` made in `source`, read from DVC's cache by its output hash; None if absent."""
    from measure.results import evaluation_from_bytes
    from runtime.text_chain import ARTIFACTS, is_text
    from storage.repo import output_file

    out = f"{ARTIFACTS}/{stage.removeprefix('text_')}" if is_text(stage) else f"artifacts/{stage}"
    out_hash = source.records[stage].outs.get(out, "")
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
        if not d.stage.startswith(("evaluate@", "text_evaluate@")) or d.status in ("same", "only_a", "only_b"):
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
    print(f"A: {side_label(a)}\nB: {side_label(b)}\n")
    print(table(["stage", "A vs B"], [
        [d["stage"], STATUS.get(d["status"]) or f"outputs differ, from {', '.join(d['differing_upstream'])}"]
        for d in report["stages"]]))
    if not report["first_divergent"]:
        print("\nThe lineages do not part: every stage in both has the same outputs.")
    diffs = {d["stage"]: d for d in report["stages"]}
    for stage in report["first_divergent"]:
        d, links = diffs[stage], report["mlflow"][stage]
        print(f"\nFirst divergent stage: {stage}")
        if d["params"]:
            print("  params that differ:\n" + table(["param", "A", "B"], [
                [k, "-" if x is None else x, "-" if y is None else y] for k, x, y in d["params"]], "    "))
        else:
            print("  params: the same")
        if d["deps"]:
            print("  code/data deps that differ:\n" + table(["path", "A", "B"], [
                [p, short_hash(x), short_hash(y)] for p, x, y in d["deps"]], "    "))
        else:
            print("  code/data deps: the same")
        if not d["params"] and not d["deps"]:
            print("  same params, code and data: the stage is not deterministic, or the cause is not recorded")
        print(f"  MLflow compare: {links['compare_link'] or 'not both runs found by output hash'}")
        print(f"  MLflow search A: {links['search_a']}\n  MLflow search B: {links['search_b']}")
    rows = [[d["stage"], k, format_number(x), format_number(y), format_number(delta, signed=True)]
            for d in report["stages"] for k, x, y, delta in d["metrics"]]
    if rows:
        print("\nMetrics at and downstream of the divergence:")
        print(table(["stage", "metric", "A", "B", "B-A"], rows))
    if report["evaluations"]:
        print("\nFID, B - A with its 95% interval (paired over the shared noise and reference):")
        print(table(["stage", "point", "A", "B", "B - A (95%)", "verdict"], [
            [e["stage"], e["point"], format_number(e["a"]), format_number(e["b"]), e["shown"], e["verdict"]]
            if "point" in e else [e["stage"], "", "", "", "", e["note"]] for e in report["evaluations"]]))


def cmd_compare(args: argparse.Namespace) -> int:
    return answer("compare", lambda root: compare_report(root, args.a, args.b), _print_compare, args.json)


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

    client = mlflow_client(root, tracking_params(root).uri)
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
    return {"runs": [source_json(s) for s in sources], "measure": measure, "not_seeds": differing,
            "points": points, "headlines": headlines}


def _print_runs(report: dict[str, Any]) -> None:
    from measure.results import with_interval

    runs = ", ".join(side_label(r) for r in report["runs"])
    print(f"{report['measure']} over {len(report['runs'])} training replicates ({runs}); ± is the 95% interval over "
          "runs (Student t, ddof 1), which holds training and sampling variance\n")
    if report["not_seeds"]:
        print("warning: the runs differ in more than seeds: " + ", ".join(report["not_seeds"]) + "\n")
    print(table(["stage", "point", "mean ± 95%", "per run"], [
        [p["stage"], p["point"], with_interval(p["estimate"], p["low"], p["high"], report["measure"]),
         ", ".join(f"{v:.3g}" for v in p["values"])] for p in report["points"]], indent=""))
    if report["headlines"]:
        print("\nHeadline differences, each run pairing its own models:")
        print(table(["comparison", "A - B ± 95%", "per run", "verdict"], [
            [h["question"], with_interval(h["estimate"], h["low"], h["high"], report["measure"]),
             ", ".join(f"{v:+.3g}" for v in h["values"]), h["verdict"]] for h in report["headlines"]], indent=""))


def cmd_runs(args: argparse.Namespace) -> int:
    return answer("results --runs", lambda root: runs_report(root, args.runs, args.measure), _print_runs,
                   getattr(args, "json", False))
