"""`report`: one self-contained HTML page of every evaluated model, and `reflow results` in the terminal.

`reports/index.html` holds the FID-vs-NFE curves of every model on one plot, each model's sample grid
(one row per NFE, one column per class), the measurement protocol, and each model's lineage stage by
stage (params, input and output hashes as `dvc.lock` records them, the MLflow run that made each output,
found by its output hash). Pictures are embedded as data URIs and nothing is fetched from a network, so
the file can be mailed or opened offline. The stage depends on the whole `artifacts/` folder: a report
describes everything the pipeline made, so it is redone whenever anything upstream changes.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from measure.report import comparisons, fid_vs_nfe_png, render, text_table
from runtime.spec import StageSpec
from storage.atomic import atomic_dir

if TYPE_CHECKING:  # runtime.context pulls in torch and diffusers; the report needs neither to be imported
    from runtime.context import StageContext

SPEC = StageSpec(name="report", params=(), deps={"artifacts": "artifacts"}, outs={"report": "reports"},
                 note="last: depends on the whole artifacts/ folder, so it follows every stage")
def run(ctx: StageContext) -> dict:
    from measure.results import COMPARISON_HEADER, load_evaluations, load_floor, results_table
    from runtime.context import StageError

    evaluations = load_evaluations(ctx.root)
    if not evaluations:
        raise StageError(f"no artifacts/evaluate@*/results.json in {ctx.root}: the report needs evaluated models")
    floor = load_floor(ctx.root)
    plot = fid_vs_nfe_png(evaluations, floor)
    tables = [text_table(*results_table(evaluations, floor))]
    tables += [f"{title}\n" + text_table(COMPARISON_HEADER, [c.row() for c in rows])
               for title, rows in comparisons(evaluations, floor)]
    out = ctx.out("report")
    with atomic_dir(out) as tmp:
        (tmp / "fid_vs_nfe.png").write_bytes(plot)
        (tmp / "index.html").write_text(render(ctx.root, evaluations, floor, plot, ctx.tracked), encoding="utf-8")
        (tmp / "results.txt").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
    ctx.log_artifact(out / "index.html", "report")
    ctx.log_artifact(out / "fid_vs_nfe.png", "report")
    return {}


def main() -> int:
    from runtime.main import stage_main

    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
