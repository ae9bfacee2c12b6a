"""`evaluate@<key>`: one model measured on the common protocol (`python -m stages.evaluate KEY MODEL`).

Every model, the DiT teacher included, is sampled from the same noise (per-sample seeds from each base
seed of `eval.seeds`, labels i mod K) at every NFE of `eval.steps` with each of its solvers (RK45 once, at
its own NFE), decoded by the VAE, and measured against the `fid_reference` stage's reference features:
FID, KID, precision and recall, class consistency by the `fid_features` classifier, and straightness
along the model's own Euler path. Points cheap enough (NFE at most `eval.extra_seeds_max_nfe`) are also
measured from `eval.extra_seeds`, which narrows their intervals at little cost.

Each number has a 95% interval from its spread over the seeds and over split halves of the reference
(`measure.intervals`); the per-seed and per-half values are kept in `replicates.npz`, so the report and
`reflow compare` pair any two models measured from the same noise, seed by seed and half by half. The
protocol is stored with the numbers in `results.json`, a picture of the samples (one row per NFE, one
column per class) in `grid.png`.

Each (solver, steps, seed) point's features are kept in the scratch area as soon as they are measured, so
a killed run resumes at the first point it had not finished.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from measure.evaluation import Measurement, flat_metrics, load_reference, plan_points, save_grid_rows, summarise_all
from measure.fid import CLASSIFIER_SUBFOLDER, FeatureNet
from models.vae import VAE_SUBFOLDER, load_vae
from runtime.context import StageContext, StageError
from runtime.devices import generation_device
from runtime.generator import load_generator
from runtime.main import stage_main
from runtime.spec import StageSpec
from storage.atomic import atomic_dir, atomic_write_json, atomic_write_npz
from storage.datasets import open_dataset


def spec(key: str, model: str) -> StageSpec:
    return StageSpec(
        name=f"evaluate@{key}",
        params=("compute", "eval"),
        deps={"model": f"artifacts/{model}", "reference": "artifacts/fid_reference",
              "features": "artifacts/fid_features", "vae": "artifacts/vae", "teacher_pairs": "artifacts/teacher_pairs"},
        outs={"eval": f"artifacts/evaluate@{key}"},
        metrics=f"metrics/evaluate@{key}.json",
        note="every model on one protocol: evaluate@dit, @rf1, @rf2, ... (params: evaluate_models)",
    )


def run(ctx: StageContext) -> dict:
    p = ctx.params.eval
    device = generation_device(ctx.params.compute)
    teacher_pairs = open_dataset(ctx.dep("teacher_pairs") / "pairs.zarr", kind="pairs")
    gen = load_generator(ctx.dep("model"), teacher_guidance=float(teacher_pairs.attrs["guidance_scale"])).to(device)
    judge = FeatureNet.from_pretrained(ctx.dep("features") / CLASSIFIER_SUBFOLDER).eval()
    reference, protocol, extractor, weights = load_reference(ctx, judge)
    plan, skipped = plan_points(gen, p)
    if not plan:
        raise StageError(f"{ctx.spec.name}: none of eval.steps {p.steps} suits {ctx.spec.deps['model']}: "
                         + "; ".join(s["reason"] for s in skipped))
    guidance = p.guidance_scale if p.guidance_scale is not None else gen.default_guidance
    labels = np.arange(p.num_samples, dtype=np.int64) % int(gen.meta["num_classes"])
    vae = load_vae(ctx.dep("vae") / VAE_SUBFOLDER).to(device).eval()
    measurement = Measurement(ctx, gen, vae, judge, extractor, weights, guidance, labels)
    sets, nfe_of, straightness, measured = measurement.all_points(plan)
    points, replicates = summarise_all(ctx, sets, nfe_of, reference)
    results = {"stage": ctx.spec.name,
               "protocol": protocol | measurement.protocol(straightness_measured=bool(straightness)),
               "points": points, "skipped": skipped,
               "straightness": float(np.mean(straightness)) if straightness else None,
               "floor": json.loads((ctx.dep("reference") / "floor.json").read_text())}
    out = ctx.out("eval")
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "results.json", results)
        atomic_write_npz(tmp / "replicates.npz", replicates)
        save_grid_rows(ctx.scratch, plan, tmp / "grid.png")
    ctx.log_artifact(out / "grid.png", "samples")
    ctx.log_artifact(out / "results.json")
    return flat_metrics(results) | {"points_measured_this_run": float(measured)}


def main(argv: list[str] | None = None) -> int:
    from runtime.text_chain import TEXT, text_spec

    args = sys.argv[1:] if argv is None else argv
    text = args[:1] == [TEXT]
    if len(args) != 2 + text:
        print(f"usage: python -m stages.evaluate [{TEXT}] KEY MODEL_STAGE   (from evaluate_models in params.yaml, or "
              f"with {TEXT} from text_evaluate_models)", file=sys.stderr)
        return 2
    return stage_main(text_spec(spec(*args[1:])) if text else spec(*args), run)


if __name__ == "__main__":
    sys.exit(main())
