"""`text_report`: the text pipeline's page, `text/report/index.html`.

One-step samples for a row of prompts next to the teacher's (same noise, same prompts), FID and prompt
consistency (the judge's class-and-colour accuracy) of every text model at every NFE with their 95% intervals,
the FID-vs-NFE plot, and each model's sample grid. Self-contained like the class report: pictures are data URIs.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

from runtime.spec import StageSpec

SPEC = StageSpec(name="text_report", params=(), deps={"artifacts": "text/artifacts"}, outs={"report": "text/report"},
                 metrics="text/metrics/report.json", note="last: depends on the whole text/artifacts/ folder")
ROW_PROMPTS = 8  # the prompts of the side-by-side picture, spread over the prompt table
ROW_MODELS = (("teacher", None), ("rf1", 1), ("distill", 1))  # (model, steps): None is the teacher's own steps


def prompt_row(artifacts: Path, out: Path) -> tuple[list[str], list[str], int]:
    """The side-by-side picture: one row per model of `ROW_MODELS`, one column per prompt, from the same noise.
    Returns (the prompts, the row labels, the size of the prompt table)."""
    import numpy as np
    import torch

    from imagedata.grids import save_grid
    from models.vae import VAE_SUBFOLDER, decode_latents, load_vae
    from reflow.seeds import per_sample_noise, sample_seeds
    from runtime.generator import load_generator
    from storage.datasets import open_dataset

    pairs = open_dataset(artifacts / "teacher_pairs" / "pairs.zarr", kind="pairs")
    guidance, teacher_steps = float(pairs.attrs["guidance_scale"]), int(pairs.attrs["steps"])
    vae = load_vae(artifacts / "vae" / VAE_SUBFOLDER).eval()
    rows, labels, prompts = [], [], []
    for model, steps in ROW_MODELS:
        if not (artifacts / model).is_dir():
            continue
        gen = load_generator(artifacts / model, teacher_guidance=guidance)
        table = gen.model.prompts
        chosen = np.linspace(0, len(table) - 1, min(ROW_PROMPTS, len(table))).round().astype(np.int64)
        prompts = [table[i] for i in chosen]
        z0 = per_sample_noise(sample_seeds(0, 0, len(chosen)), tuple(gen.meta["latent_shape"]))
        n = steps or teacher_steps
        res = gen.sample(z0, torch.from_numpy(chosen), steps=n, solver=gen.solvers[0])
        rows.append(decode_latents(vae, res.x.float(), gen.meta["scale_factor"]).numpy())
        labels.append(f"{model}, {res.nfe} NFE")
    save_grid(np.concatenate(rows), out, nrow=len(prompts))
    return prompts, labels, len(table)


def render(evaluations, floor, plot: bytes, row_png: bytes, prompts: list[str], row_labels: list[str],
           n_prompts: int) -> str:
    from measure.report import STYLE, _html_table, _img, protocol_line
    from measure.results import results_table

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>reflow: text to image</title>",
             f"<style>{STYLE}</style></head><body><h1>reflow: text to image in one step</h1>",
             "<p>InstaFlow's chain on this workspace's text pipeline: the text-conditioned teacher, its rectified "
             "flow on the teacher's DDIM pairs (InstaFlow's 2-RF, stage <code>text_rf1</code>) and the one-step "
             "student distilled from it.</p>",
             "<h2>One step against the teacher, same noise and prompts</h2>",
             "<p>Columns: " + html.escape(" | ".join(prompts)) + ".<br>Rows: " + html.escape(" | ".join(row_labels))
             + ".</p>", f"<div class='grid'>{_img(row_png, 'one-step samples beside the teacher')}</div>",
             f"<h2>FID against NFE</h2><p>{html.escape(protocol_line(evaluations))}.</p>",
             _img(plot, "FID against NFE, text models"), _html_table(*results_table(evaluations, floor)),
             "<h2>Prompt consistency</h2><p>The judge (one class per prompt, trained on held-out captioned images) "
             "agrees with the prompt, class and colour both, at this rate (95% interval); chance is 1 in "
             f"{n_prompts}.</p>",
             _html_table(*results_table(evaluations, floor, "class_accuracy"))]
    for e in evaluations:
        parts.append(f"<h2>{html.escape(e.key)}: <code>{html.escape(e.model)}</code></h2>"
                     f"<div class='grid'>{_img((e.folder / 'grid.png').read_bytes(), e.key + ' samples')}</div>"
                     "<p>Rows: each NFE; columns: the first prompts of the table.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def run(ctx) -> dict:
    from measure.report import fid_vs_nfe_png, text_table
    from measure.results import load_evaluations, load_floor, results_table
    from runtime.context import StageError
    from storage.atomic import atomic_dir, atomic_write_text

    artifacts = ctx.dep("artifacts")
    evaluations = load_evaluations(ctx.root, artifacts)
    if not evaluations:
        raise StageError(f"no evaluate@*/results.json in {artifacts}: the report needs evaluated text models")
    floor = load_floor(ctx.root, artifacts)
    plot = fid_vs_nfe_png(evaluations, floor)
    out = ctx.out("report")
    with atomic_dir(out) as tmp:
        prompts, row_labels, n_prompts = prompt_row(artifacts, tmp / "prompts.png")
        (tmp / "fid_vs_nfe.png").write_bytes(plot)
        atomic_write_text(tmp / "index.html", render(evaluations, floor, plot, (tmp / "prompts.png").read_bytes(),
                                                     prompts, row_labels, n_prompts))
        atomic_write_text(tmp / "results.txt", "\n\n".join(
            text_table(*results_table(evaluations, floor, m)) for m in ("fid", "class_accuracy")) + "\n")
    ctx.log_artifact(out / "index.html", "report")
    return {f"{e.key}_nfe{p['nfe']:g}_{m}": p[m] for e in evaluations for p in e.points
            for m in ("fid", "class_accuracy")}


def main() -> int:
    from runtime.main import stage_main

    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
