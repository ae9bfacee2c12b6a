"""`evaluate@<key>`: one model measured on the common protocol (`python -m stages.evaluate KEY MODEL`).

Every model, the DiT teacher included, is sampled from the same noise (per-sample seeds from each base
seed of `eval.seeds`, labels i mod K) at every NFE of `eval.steps` with each of its solvers, decoded by
the VAE and compared with the held-out reference images: FID, KID and precision/recall through
torch-fidelity, class consistency by the `fid_features` classifier, and straightness along the model's
own Euler path. Mean and spread are over the seeds. The protocol (extractor and its hash, reference hash,
sample count, seeds, NFE as actually spent, guided calls counted twice) is stored with the numbers in
`results.json`; a picture of the samples (one row per NFE, one column per class) in `grid.png`.

Each (solver, steps, seed) point is kept in the scratch area as soon as it is measured, so a killed run
resumes at the first point it had not finished.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from reflow.data import save_grid
from reflow.fid import INCEPTION, FeatureNet, classify, fidelity, register_classifier
from reflow.models import decode_latents, load_vae
from reflow.samplers import per_sample_noise, sample_seeds
from stages.common import StageContext, StageError, StageSpec, generation_autocast, generation_device, stage_main
from stages.generator import Generator, load_generator
from storage.atomic import atomic_dir, atomic_write_bytes, atomic_write_json
from storage.datasets import open_dataset
from storage.faults import crash_point
from storage.hashing import file_sha256

FIDELITY_CACHE = Path(".reflow") / "cache" / "fidelity"  # reference statistics, named by content hashes
MEASURES = ("fid", "kid", "precision", "recall", "class_accuracy")
STRAIGHTNESS_SAMPLES = 256  # per seed: the mean settles well before this


def spec(key: str, model: str) -> StageSpec:
    return StageSpec(
        name=f"evaluate@{key}",
        params=("compute", "eval"),
        deps={"model": f"artifacts/{model}", "features": "artifacts/fid_features", "data": "artifacts/prepare",
              "vae": "artifacts/vae", "teacher_pairs": "artifacts/teacher_pairs"},
        outs={"eval": f"artifacts/evaluate@{key}"},
        metrics=f"metrics/evaluate@{key}.json",
        note="every model on one protocol: evaluate@dit, @rf1, @rf2, ... (params: evaluate_models)",
    )


def extractor_setup(ctx: StageContext, judge: FeatureNet) -> tuple[str, dict]:
    """(torch-fidelity extractor name, its protocol entry). Inception when its weights are given."""
    p = ctx.params.eval
    if p.inception_weights:
        weights = ctx.root / p.inception_weights
        if not weights.is_file():
            raise StageError(f"eval.inception_weights: {weights} is not a file; expected torch-fidelity's "
                             "weights-inception-2015-12-05-6726825d.pth (nothing is downloaded)")
        return INCEPTION, {"name": INCEPTION, "sha256": file_sha256(weights), "path": str(weights)}
    digest = file_sha256(ctx.dep("features") / "diffusion_pytorch_model.safetensors")
    return register_classifier(judge, digest), {"name": "fid_features classifier", "sha256": digest,
                                               "path": str(ctx.spec.deps["features"])}


def generate_images(gen: Generator, vae, z0: torch.Tensor, labels: np.ndarray, *, steps: int, solver: str,
                    guidance: float | None, batch_size: int, device: str) -> tuple[np.ndarray, int]:
    """uint8 images of the model's samples from `z0`, batched; and the NFE per sample."""
    images, nfe = [], 0
    for i in range(0, len(z0), batch_size):
        y = torch.from_numpy(labels[i : i + batch_size]).to(device)
        res = gen.sample(z0[i : i + batch_size].to(device), y, steps=steps, solver=solver, guidance=guidance)
        images.append(decode_latents(vae, res.x.float(), gen.meta["scale_factor"]).numpy())
        nfe = res.nfe
    return np.concatenate(images), nfe


def measure(images: np.ndarray, labels: np.ndarray, reference: np.ndarray, judge: FeatureNet, *,
            extractor: str, reference_name: str | None, cache_root: str | None, seed: int,
            eval_params) -> dict[str, float]:
    """FID, KID, precision/recall against the reference and class accuracy of one set of samples."""
    numbers = fidelity(images, reference, extractor=extractor, reference_name=reference_name,
                       cache_root=cache_root, inception_weights=eval_params.inception_weights,
                       kid_subset_size=eval_params.kid_subset_size, prc_neighborhood=eval_params.prc_neighborhood,
                       seed=seed)
    numbers["class_accuracy"] = float((classify(judge, images).numpy() == labels).mean())
    return numbers


def summarise(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean and (population) standard deviation over seeds of every measure."""
    out = {}
    for name in MEASURES:
        values = np.asarray([p[name] for p in per_seed], dtype=np.float64)
        out[name], out[f"{name}_std"] = float(values.mean()), float(values.std())
    return out


def _grid_row_path(scratch: Path, solver: str, steps: int) -> Path:
    return scratch / "grid" / f"{solver}-{steps}.npy"


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.eval, ctx.params.compute
    device = generation_device(compute)
    teacher_pairs = open_dataset(ctx.dep("teacher_pairs") / "pairs.zarr", kind="pairs")
    gen = load_generator(ctx.dep("model"), teacher_guidance=float(teacher_pairs.attrs["guidance_scale"])).to(device)
    vae = load_vae(ctx.dep("vae")).to(device).eval()
    judge = FeatureNet.from_pretrained(ctx.dep("features")).eval()
    reference_set = open_dataset(ctx.dep("data") / "reference.zarr", kind="images")
    reference = reference_set.load("images")
    extractor, extractor_info = extractor_setup(ctx, judge)
    reference_hash = str(reference_set.attrs["content_hash"])
    reference_name = f"reference-{reference_hash[:16]}-{extractor_info['sha256'][:16]}"
    cache_root = str(ctx.root / FIDELITY_CACHE)

    num_classes, shape = int(gen.meta["num_classes"]), tuple(gen.meta["latent_shape"])
    labels = np.arange(p.num_samples, dtype=np.int64) % num_classes
    solvers = list(gen.solvers) if gen.kind == "epsilon" else p.solvers
    plan, skipped = [], []
    for solver in solvers:
        for steps in p.steps:
            reason = gen.unsupported(solver, steps)
            (skipped.append({"solver": solver, "steps": steps, "reason": reason}) if reason
             else plan.append((solver, steps)))
    if not plan:
        raise StageError(f"{ctx.spec.name}: none of eval.steps {p.steps} suits {ctx.spec.deps['model']}: "
                         + "; ".join(s["reason"] for s in skipped))
    guidance = p.guidance_scale if p.guidance_scale is not None else gen.default_guidance

    points_dir = ctx.scratch / "points"
    for folder in (points_dir, ctx.scratch / "grid"):
        folder.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(plan) * len(p.seeds), desc=ctx.spec.name, unit="point", mininterval=1.0)
    per_point: dict[tuple[str, int], list[dict]] = {point: [] for point in plan}
    straightness, measured = [], 0
    for seed in p.seeds:
        z0 = per_sample_noise(sample_seeds(seed, 0, p.num_samples), shape)
        k = min(STRAIGHTNESS_SAMPLES, len(z0))
        path_s = gen.straightness(z0[:k].to(device), torch.from_numpy(labels[:k]).to(device),
                                  steps=p.straightness_steps, guidance=guidance)
        if path_s is not None:
            straightness.append(float(path_s.mean()))
        for solver, steps in plan:
            done = points_dir / f"{solver}-{steps}-{seed}.json"
            if done.is_file():
                per_point[(solver, steps)].append(json.loads(done.read_text()))
                bar.update()
                continue
            with generation_autocast(compute):
                images, nfe = generate_images(gen, vae, z0, labels, steps=steps, solver=solver, guidance=guidance,
                                              batch_size=p.batch_size, device=device)
            numbers = measure(images, labels, reference, judge, extractor=extractor, reference_name=reference_name,
                              cache_root=cache_root, seed=seed, eval_params=p)
            result = {"seed": seed, "nfe": nfe, **numbers}
            if seed == p.seeds[0]:  # the grid shows the first seed: one sample per class at each NFE
                buffer = io.BytesIO()
                np.save(buffer, images[: min(num_classes, 16)])
                atomic_write_bytes(_grid_row_path(ctx.scratch, solver, steps), buffer.getvalue())
            atomic_write_json(done, result)
            crash_point("eval_point")
            measured += 1
            per_point[(solver, steps)].append(result)
            bar.update()
    bar.close()

    points = []
    for (solver, steps), per_seed in per_point.items():
        summary = summarise(per_seed)
        nfe = per_seed[0]["nfe"]
        points.append({"solver": solver, "steps": steps, "nfe": nfe, **summary, "per_seed": per_seed})
        ctx.log_metrics({f"{name}_{solver}": summary[name] for name in MEASURES}
                        | {f"fid_std_{solver}": summary["fid_std"]}, step=nfe)

    # The floor: real training images (never in the reference set) measured the same way. A model cannot
    # be expected below it at this sample size; it also says how good the class judge is.
    train_set = open_dataset(ctx.dep("data") / "train.zarr", kind="images")
    n_real = min(p.num_samples, int(train_set.attrs["n_rows"]))
    real_data = measure(train_set.read("images", 0, n_real), train_set.read("labels", 0, n_real), reference, judge,
                        extractor=extractor, reference_name=reference_name, cache_root=cache_root,
                        seed=p.seeds[0], eval_params=p) | {"images": n_real}
    protocol = {
        "model": ctx.spec.deps["model"], "model_kind": gen.kind, "model_meta_kind": gen.meta.get("kind"),
        "extractor": extractor_info, "reference": {"path": f"{ctx.spec.deps['data']}/reference.zarr",
                                                   "content_hash": reference_hash, "images": len(reference)},
        "samples_per_point": p.num_samples, "seeds": list(p.seeds), "labels": "sample i has class i mod K",
        "guidance_scale": guidance, "nfe": "network evaluations per sample, a guided call counted twice",
        "straightness": (f"E ∫ ||(X1 - X0) - v(X_t, t)||^2 dt, Euler with {p.straightness_steps} steps, first "
                         f"{STRAIGHTNESS_SAMPLES} samples of each seed") if straightness
                        else "not defined for the DDIM teacher",
        "kid_subset_size": p.kid_subset_size, "prc_neighborhood": p.prc_neighborhood,
    }
    results = {"stage": ctx.spec.name, "protocol": protocol, "points": points, "skipped": skipped,
               "straightness": float(np.mean(straightness)) if straightness else None, "real_data": real_data}
    out = ctx.out("eval")
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "results.json", results)
        rows = [np.load(_grid_row_path(ctx.scratch, solver, steps)) for solver, steps in plan]
        save_grid(np.concatenate(rows), tmp / "grid.png", nrow=len(rows[0]))
    ctx.log_artifact(out / "grid.png", "samples")
    ctx.log_artifact(out / "results.json")
    return flat_metrics(results) | {"points_measured_this_run": float(measured)}


def flat_metrics(results: dict) -> dict[str, float]:
    """`metrics/evaluate@<key>.json`: `<solver>_nfe<n>_<measure>` (mean and `_std`), best FID, straightness."""
    metrics: dict[str, float] = {}
    for point in results["points"]:
        for name in MEASURES:
            for suffix in ("", "_std"):
                metrics[f"{point['solver']}_nfe{point['nfe']}_{name}{suffix}"] = point[name + suffix]
    best = min(results["points"], key=lambda q: q["fid"])
    metrics |= {"best_fid": best["fid"], "best_fid_nfe": float(best["nfe"])}
    metrics |= {f"real_data_{name}": results["real_data"][name] for name in MEASURES}
    if results["straightness"] is not None:
        metrics["straightness"] = results["straightness"]
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m stages.evaluate KEY MODEL_STAGE   (from evaluate_models in params.yaml)",
              file=sys.stderr)
        return 2
    return stage_main(spec(*args), run)


if __name__ == "__main__":
    sys.exit(main())
