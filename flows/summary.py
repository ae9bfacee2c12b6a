"""What a finished run produced and where to look: printed at the end of `reflow run` and `make demo`."""

from __future__ import annotations

import json
from pathlib import Path


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def print_summary(root: Path, pipeline: str = "class") -> None:
    """`pipeline`: `class` (artifacts/, metrics/, reports/) or `text` (the same under text/)."""
    from runtime.params import load_params
    from storage.tracking import tracking_uri

    params = load_params(root / "params.yaml")
    base = root / "text" if pipeline == "text" else root
    report = base / ("report" if pipeline == "text" else "reports") / "index.html"
    print("\nArtifacts (versioned by DVC; `dvc status` says what is up to date):")
    for out in sorted((base / "artifacts").iterdir()) if (base / "artifacts").is_dir() else []:
        if out.name.startswith("."):
            continue
        print(f"  {out.relative_to(root)}/  {_size(out) / 1e6:8.2f} MB")
        for png in sorted(out.glob("*.png")):
            print(f"      picture: {png.relative_to(root)}")
    print("\nMetrics (`dvc metrics show`):")
    for m in sorted((base / "metrics").glob("*.json")) if (base / "metrics").is_dir() else []:
        if m.stem.startswith("evaluate@"):  # dozens of numbers each: shown below as one table
            continue
        values = json.loads(m.read_text())
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"  {m.stem:14s} {shown}")
    from measure.report import text_table
    from measure.results import load_evaluations, load_floor, results_table

    evaluations = load_evaluations(root, base / "artifacts")
    if evaluations:
        floor = load_floor(root, base / "artifacts")
        print("\nFID against NFE (± the 95% interval's half-width; comparisons in `reflow results`):")
        print(text_table(*results_table(evaluations, floor)))
        if pipeline == "text":
            print("\nPrompt consistency (the judge's class-and-colour agreement with the prompt, ± 95%):")
            print(text_table(*results_table(evaluations, floor, "class_accuracy")))
    if report.is_file():
        print(f"\nReport (curves, sample grids{', prompts' if pipeline == 'text' else ', lineage'}; opens offline): "
              f"{report}")
    print(f"\nMLflow store: {tracking_uri(params.tracking.uri, root)} (experiment {params.tracking.experiment!r})")
    print("Browse runs and flows: `reflow ui` (Prefect on http://127.0.0.1:4200, MLflow on http://127.0.0.1:5000)")
