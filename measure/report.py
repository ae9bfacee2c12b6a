"""The report's pieces: text tables for the terminal, the FID-vs-NFE plot, and the self-contained HTML page
with every model's curve, sample grid, protocol and lineage (pictures as data URIs, nothing fetched)."""

from __future__ import annotations

import base64
import html
import io
import sys
from pathlib import Path

import numpy as np

from measure.results import (
    COMPARISON_HEADER,
    against_floor,
    chain_table,
    headline_comparisons,
    load_evaluations,
    load_floor,
    point_cell,
    ranking,
    results_table,
)

CHAIN_TITLE = "Reflow on each chain"
CHAIN_NOTE = ("Each chain is 1-RF, then 2-RF on 1-RF's own pairs, then a one-step student of 2-RF, with the same "
              "recipe; they differ only in the coupling 1-RF starts from: the teacher's deterministic pairs, "
              "or real latents with independent noise (RectifiedFlow's classic 1-RF). Error against the teacher "
              "and straightness are measured on the same 256 held-out teacher pairs for every model.")


def text_table(header: list[str], rows: list[list[str]], *, indent: str = "", rule: bool = True) -> str:
    """Columns padded to their widest cell; `rule` draws a dashed line under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [header, *([["-" * w for w in widths]] if rule else []), *rows]
    return "\n".join(indent + "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def comparisons(evaluations: list, floor) -> list[tuple[str, list]]:
    """The report's comparison tables: (title, comparisons) for the headlines, the ranking and the floor."""

    tables = [("Headline comparisons", headline_comparisons(evaluations)),
              ("Which model at which budget", ranking(evaluations))]
    if floor is not None:
        tables.append(("Against real images", against_floor(evaluations, floor)))
    return [(title, rows) for title, rows in tables if rows]


def protocol_line(evaluations: list) -> str:
    protocol = evaluations[0].results["protocol"]
    extractor = protocol["extractor"]
    extra = (f", NFE <= {protocol['extra_seeds_max_nfe']:g} also over seeds {protocol['extra_seeds']}"
             if protocol.get("extra_seeds") else "")
    return (f"{protocol['samples_per_seed']} samples per seed (seeds {protocol['seeds']}{extra}) against "
            f"{protocol['reference']['images']} held-out reference images; extractor {extractor['name']} "
            f"{extractor['sha256'][:12]} ({extractor['standard']}); ± is the 95% interval's half-width (over seeds and "
            "split halves of the reference); NFE counts guided calls twice")


def print_results(root: Path, measure: str = "fid") -> int:
    """`reflow results`: the report's tables in the terminal."""

    evaluations = load_evaluations(root)
    if not evaluations:
        print(f"no evaluations in {root / 'artifacts'}: run `reflow run` (or `dvc repro`) first", file=sys.stderr)
        return 1
    floor = load_floor(root)
    print(f"{measure}: {protocol_line(evaluations)}\n")
    print(text_table(*results_table(evaluations, floor, measure)))
    header, rows = chain_table(evaluations, root)
    if rows:
        print(f"\n{CHAIN_TITLE}:")
        print(text_table(header, rows))
    for title, rows in comparisons(evaluations, floor):
        print(f"\n{title} (FID; a difference whose interval holds 0 is within noise):")
        print(text_table(COMPARISON_HEADER, [c.row() for c in rows]))
    report = root / "reports" / "index.html"
    if report.is_file():
        print(f"\nThe report with curves, sample grids and lineage: {report}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# The HTML page
# ---------------------------------------------------------------------------------------------------------
def fid_vs_nfe_png(evaluations: list, floor) -> bytes:
    """Every model's FID against NFE on one log-2 axis; error bars and the floor's band are 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for e in evaluations:
        for solver in e.solvers():
            points = sorted((p for p in e.points if p["solver"] == solver), key=lambda p: p["nfe"])
            fid = np.asarray([p["fid"] for p in points])
            errors = np.nan_to_num([[p["fid"] - p["fid_low"] for p in points],
                                    [p["fid_high"] - p["fid"] for p in points]])
            ax.errorbar([p["nfe"] for p in points], fid, yerr=errors, marker="o", capsize=3,
                        label=f"{e.key} ({solver})")
    if floor is not None:
        interval = floor["fid"].interval()
        ax.axhline(interval.estimate, color="grey", linestyle="--", label="real images (95%)")
        if not np.isnan(interval.low):
            ax.axhspan(max(interval.low, 1e-3), interval.high, color="grey", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # a few-step teacher sits 10x above the rest; differences near the floor matter
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID (95% interval)")
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
    from storage.ancestry import ancestry
    from storage.records import LineageError, attach_runs, workspace_records

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


def splits_table(protocol: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[name, str(split["rows"]), split["content_hash"][:16], USES.get(name, "")]
            for name, split in protocol["splits"].items()]
    return ["split", "images", "content hash", "used by"], rows


USES = {"train": "the VAE, the DiT teacher and through them every generator",
        "features": "fitting the FID feature extractor (and class judge)",
        "reference": "the FID reference statistics, fitted on by nothing",
        "floor": "the real-data floor (and the judge's held-out accuracy)"}


def render(root: Path, evaluations: list, floor, plot_png: bytes, tracked: bool) -> str:

    protocol = evaluations[0].results["protocol"]
    floor_info = protocol.get("floor", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>reflow report</title>",
        f"<style>{STYLE}</style></head><body><h1>reflow: FID against NFE</h1>",
        f"<p>{html.escape(protocol_line(evaluations))}. Reference <code>{html.escape(protocol['reference']['path'])}"
        f"</code>, content hash <code>{protocol['reference']['content_hash'][:16]}</code>. The floor: "
        f"{floor_info.get('draws', '?')} class-stratified draws of {floor_info.get('images_per_draw', '?')} real "
        "images that no generator, extractor or reference used.</p>",
        _img(plot_png, "FID against NFE, every model"), _html_table(*results_table(evaluations, floor)),
    ]
    header, rows = chain_table(evaluations, root)
    if rows:
        parts.append(f"<h2>{html.escape(CHAIN_TITLE)}</h2><p>{html.escape(CHAIN_NOTE)}</p>"
                     + _html_table(header, rows))
    for title, rows in comparisons(evaluations, floor):
        parts.append(f"<h2>{html.escape(title)}</h2><p>FID of A minus FID of B with its 95% interval: paired where "
                     "A and B were sampled from the same noise; a difference whose interval holds 0 is within "
                     "noise, not a finding.</p>")
        parts.append(_html_table(COMPARISON_HEADER, [c.row() for c in rows]))
    parts.append("<h2>Protocol: four disjoint splits</h2>" + _html_table(*splits_table(protocol)))
    for e in evaluations:
        points = e.points
        nfes = ", ".join(f"{p['nfe']:g}" for p in points if p["solver"] == points[0]["solver"])
        parts.append(f"<h2>{html.escape(e.key)}: <code>{html.escape(e.model)}</code></h2>")
        parts.append(f"<div class='grid'>{_img((e.folder / 'grid.png').read_bytes(), e.key + ' samples')}</div>")
        parts.append(f"<p>Rows: NFE {nfes} ({html.escape(points[0]['solver'])}, seed "
                     f"{e.results['protocol']['seeds'][0]}, guidance {e.results['protocol']['guidance_scale']}); "
                     "one column per class. Class accuracy at each NFE (the extractor's classifier on the "
                     "conditional samples, 95%): "
                     + ", ".join(f"{p['nfe']:g}: {point_cell(p, 'class_accuracy')}" for p in points) + ".</p>")
        if e.results["skipped"]:
            parts.append("<p>Not measured: " + html.escape("; ".join(
                f"{s['solver']} {s['steps']} steps ({s['reason']})" for s in e.results["skipped"])) + ".</p>")
        parts.append("<h3>Lineage</h3><p>Every stage this evaluation rests on, joined by DVC hashes; MLflow run "
                     "ids open in the MLflow UI (<code>reflow ui</code>).</p>")
        parts.append(_html_table(["stage", "params", "inputs", "outputs", "MLflow run"],
                                 model_lineage(root, f"evaluate@{e.key}", tracked)))
    parts.append("</body></html>")
    return "\n".join(parts)
