"""`report`: one self-contained HTML page of every evaluated model, and `reflow results` in the terminal.

`reports/index.html` holds the FID-vs-NFE curves of every model on one plot, each model's sample grid
(one row per NFE, one column per class), the measurement protocol, and each model's lineage stage by
stage (params, input and output hashes as `dvc.lock` records them, the MLflow run that made each output,
found by its output hash). Pictures are embedded as data URIs and nothing is fetched from a network, so
the file can be mailed or opened offline. The stage depends on the whole `artifacts/` folder: a report
describes everything the pipeline made, so it is redone whenever anything upstream changes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.spec import StageSpec
from storage.atomic import atomic_dir

if TYPE_CHECKING:  # stages.common pulls in torch and diffusers; `reflow results` and the summary need neither
    from stages.common import StageContext

SPEC = StageSpec(name="report", params=(), deps={"artifacts": "artifacts"}, outs={"report": "reports"},
                 note="last: depends on the whole artifacts/ folder, so it follows every stage")
TEACHER = "artifacts/dit"


# ---------------------------------------------------------------------------------------------------------
# The evaluations and their table (shared with `reflow results`)
# ---------------------------------------------------------------------------------------------------------
def load_evaluations(root: Path) -> list[dict[str, Any]]:
    """Every `artifacts/evaluate@<key>/results.json`, the teacher first, then by key."""
    found = []
    for path in sorted((root / "artifacts").glob("evaluate@*/results.json")):
        results = json.loads(path.read_text())
        results["key"] = path.parent.name.split("@", 1)[1]
        results["grid"] = path.parent / "grid.png"
        found.append(results)
    return sorted(found, key=lambda r: (r["protocol"]["model"] != TEACHER, r["key"]))


def _cell(point: dict[str, Any] | None, measure: str) -> str:
    if point is None:
        return ""
    if measure == "fid":
        return f"{point['fid']:.3g} ± {point['fid_std']:.2g}"
    return f"{point[measure]:.3g}"


def results_table(evaluations: list[dict[str, Any]], measure: str = "fid") -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per model and solver, one column per NFE actually spent."""
    nfes = sorted({p["nfe"] for r in evaluations for p in r["points"]})
    header = ["model", "solver", *(f"NFE {n}" for n in nfes), "straightness", "best FID (NFE)"]
    rows = []
    for r in evaluations:
        for solver in dict.fromkeys(p["solver"] for p in r["points"]):
            points = {p["nfe"]: p for p in r["points"] if p["solver"] == solver}
            best = min(points.values(), key=lambda p: p["fid"])
            straight = "" if r["straightness"] is None else f"{r['straightness']:.3g}"
            rows.append([f"{r['key']} ({r['protocol']['model'].removeprefix('artifacts/')})", solver,
                         *(_cell(points.get(n), measure) for n in nfes), straight,
                         f"{best['fid']:.3g} ({best['nfe']})"])
    if evaluations:
        real = evaluations[0]["real_data"]
        floor = f"{real[measure]:.3g}" if measure != "fid" else f"{real['fid']:.3g}"
        rows.append([f"real images ({real['images']}, the floor)", "", *([floor] * len(nfes)), "", floor])
    return header, rows


def text_table(header: list[str], rows: list[list[str]], *, indent: str = "", rule: bool = True) -> str:
    """Columns padded to their widest cell; `rule` draws a dashed line under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [header, *([["-" * w for w in widths]] if rule else []), *rows]
    return "\n".join(indent + "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def print_results(root: Path, measure: str = "fid") -> int:
    """`reflow results`: the report's table in the terminal."""
    evaluations = load_evaluations(root)
    if not evaluations:
        print(f"no evaluations in {root / 'artifacts'}: run `reflow run` (or `dvc repro`) first", file=sys.stderr)
        return 1
    protocol = evaluations[0]["protocol"]
    print(f"{measure} (mean ± std over seeds {protocol['seeds']}, {protocol['samples_per_point']} samples each) "
          f"against {protocol['reference']['images']} reference images, extractor "
          f"{protocol['extractor']['name']} {protocol['extractor']['sha256'][:12]}; NFE counts guided calls twice\n")
    print(text_table(*results_table(evaluations, measure)))
    report = root / "reports" / "index.html"
    if report.is_file():
        print(f"\nThe report with curves, sample grids and lineage: {report}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# The HTML page
# ---------------------------------------------------------------------------------------------------------
def fid_vs_nfe_png(evaluations: list[dict[str, Any]]) -> bytes:
    """Every model's FID (mean, error bar = std over seeds) against NFE on one log-2 axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in evaluations:
        for solver in dict.fromkeys(p["solver"] for p in r["points"]):
            points = sorted((p for p in r["points"] if p["solver"] == solver), key=lambda p: p["nfe"])
            ax.errorbar([p["nfe"] for p in points], [p["fid"] for p in points], yerr=[p["fid_std"] for p in points],
                        marker="o", capsize=3, label=f"{r['key']} ({solver})")
    if evaluations:
        ax.axhline(evaluations[0]["real_data"]["fid"], color="grey", linestyle="--", label="real images")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # a few-step teacher sits 10x above the rest; differences near the floor matter
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def lineage_rows(steps) -> list[list[str]]:
    """One row per ancestor: stage, its params, inputs and outputs (short hashes), its MLflow run."""
    rows = []
    for step in steps:
        rec = step.record
        inputs = ", ".join(f"{i.path}:{i.hash[:8]}" + (" (stale)" if i.stale else "")
                           for i in step.inputs if i.producer or not i.path.endswith(".py"))
        outputs = ", ".join(f"{p}:{h[:8]}" for p, h in sorted(rec.outs.items()))
        params = ", ".join(f"{k}={v}" for k, v in sorted(rec.params.items()))
        rows.append([rec.stage, params, inputs, outputs, rec.run_id or ""])
    return rows


def model_lineage(root: Path, stage: str, tracked: bool) -> list[list[str]]:
    from storage.lineage import LineageError, ancestry, attach_runs, workspace_records

    try:
        records = workspace_records(root)
        if tracked:
            import mlflow

            records = attach_runs(mlflow.MlflowClient(), records)
        return lineage_rows(ancestry(records, stage))
    except LineageError as exc:
        return [[stage, f"lineage unavailable: {exc}", "", "", ""]]


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td{word-break:break-word;max-width:420px}img{image-rendering:pixelated}
.grid img{width:min(100%,480px)}code{background:#f3f3f3;padding:0 3px}h2{margin-top:2em}"""


def render(root: Path, evaluations: list[dict[str, Any]], plot_png: bytes, tracked: bool) -> str:
    header, rows = results_table(evaluations)
    protocol = evaluations[0]["protocol"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>reflow report</title>",
        f"<style>{STYLE}</style></head><body><h1>reflow: FID against NFE</h1>",
        f"<p>FID, mean ± standard deviation over seeds {protocol['seeds']}, {protocol['samples_per_point']} samples "
        f"per point against {protocol['reference']['images']} held-out reference images "
        f"(<code>{html.escape(protocol['reference']['path'])}</code>, content hash "
        f"<code>{protocol['reference']['content_hash'][:16]}</code>). "
        f"Features: {html.escape(protocol['extractor']['name'])}"
        f" (sha256 <code>{protocol['extractor']['sha256'][:16]}</code>); numbers are comparable only between runs "
        f"with the same extractor hash. NFE counts network evaluations per sample, a guided call twice.</p>",
        _img(plot_png, "FID against NFE, every model"), _html_table(header, rows),
    ]
    for r in evaluations:
        model = r["protocol"]["model"]
        nfes = ", ".join(str(p["nfe"]) for p in r["points"] if p["solver"] == r["points"][0]["solver"])
        parts.append(f"<h2>{html.escape(r['key'])}: <code>{html.escape(model)}</code></h2>")
        parts.append(f"<div class='grid'>{_img(r['grid'].read_bytes(), r['key'] + ' samples')}</div>")
        parts.append(f"<p>Rows: NFE {nfes} ({html.escape(r['points'][0]['solver'])}, seed {r['protocol']['seeds'][0]},"
                     f" guidance {r['protocol']['guidance_scale']}); one column per class. Class accuracy at each "
                     "NFE (the extractor's classifier on the conditional samples): "
                     + ", ".join(f"{p['nfe']}: {p['class_accuracy']:.2f}" for p in r["points"]) + ".</p>")
        if r["skipped"]:
            parts.append("<p>Not measured: " + html.escape("; ".join(
                f"{s['solver']} {s['steps']} steps ({s['reason']})" for s in r["skipped"])) + ".</p>")
        parts.append("<h3>Lineage</h3><p>Every stage this evaluation rests on, joined by DVC hashes; MLflow run "
                     "ids open in the MLflow UI (<code>reflow ui</code>).</p>")
        parts.append(_html_table(["stage", "params", "inputs", "outputs", "MLflow run"],
                                 model_lineage(root, f"evaluate@{r['key']}", tracked)))
    parts.append("</body></html>")
    return "\n".join(parts)


def run(ctx: StageContext) -> dict:
    from stages.common import StageError

    evaluations = load_evaluations(ctx.root)
    if not evaluations:
        raise StageError(f"no artifacts/evaluate@*/results.json in {ctx.root}: the report needs evaluated models")
    plot = fid_vs_nfe_png(evaluations)
    out = ctx.out("report")
    with atomic_dir(out) as tmp:
        (tmp / "fid_vs_nfe.png").write_bytes(plot)
        (tmp / "index.html").write_text(render(ctx.root, evaluations, plot, ctx.tracked), encoding="utf-8")
        (tmp / "results.txt").write_text(text_table(*results_table(evaluations)) + "\n", encoding="utf-8")
    ctx.log_artifact(out / "index.html", "report")
    ctx.log_artifact(out / "fid_vs_nfe.png", "report")
    return {}


def main() -> int:
    from stages.common import stage_main

    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
