"""The evaluation of one model on the common protocol, as `evaluate@<key>` runs it.

Every (solver, steps) point the model can take is sampled from each seed's per-sample noise, decoded, and
measured against the reference (`measure.intervals`); each point's features are kept in the stage's scratch
area as soon as they are measured, so a killed run resumes at the first point it had not finished.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from imagedata.grids import save_grid
from measure.fid import INCEPTION, FeatureNet, classify, fid_features, register_classifier
from measure.intervals import MEASURES, Measured, Reference, SeedSet, measure_sets
from models.vae import decode_latents
from reflow.seeds import per_sample_noise, sample_seeds
from runtime.context import StageContext, StageError
from runtime.devices import generation_autocast, generation_device
from runtime.generator import Generator
from storage.atomic import atomic_write_bytes, atomic_write_npz
from storage.faults import crash_point

STRAIGHTNESS_SAMPLES = 256  # per seed: the mean settles well before this


def plan_points(gen: Generator, p) -> tuple[list[tuple[str, int]], list[dict]]:
    """The (solver, steps) points this model can take, and the ones it cannot with the reason. RK45 is one
    point (steps 0): it chooses its own steps to the tolerance `eval.rk45_tolerance`. The epsilon teacher takes
    DDIM; every velocity model, a flow-matching teacher included, the solvers of `eval.solvers`."""
    solvers = list(gen.solvers) if gen.kind == "epsilon" else p.solvers
    plan, skipped = [], []
    for solver in solvers:
        for steps in ([0] if solver == "rk45" else p.steps):
            reason = gen.unsupported(solver, steps)
            (skipped.append({"solver": solver, "steps": steps, "reason": reason}) if reason
             else plan.append((solver, steps)))
    return plan, skipped


def generate_images(gen: Generator, vae, z0: torch.Tensor, labels: np.ndarray, *, steps: int, solver: str,
                    guidance: float | None, batch_size: int, device: str, tolerance: float) -> tuple[np.ndarray, float]:
    """uint8 images of the model's samples from `z0`, batched; and the NFE spent per sample (RK45's varies by
    batch: the mean over samples)."""
    images, spent = [], 0.0
    for i in range(0, len(z0), batch_size):
        y = torch.from_numpy(labels[i : i + batch_size]).to(device)
        res = gen.sample(z0[i : i + batch_size].to(device), y, steps=steps, solver=solver, guidance=guidance,
                         tolerance=tolerance)
        images.append(decode_latents(vae, res.x.float(), gen.meta["scale_factor"]).numpy())
        spent += res.nfe * len(y)
    return np.concatenate(images), spent / len(z0)


def load_reference(ctx: StageContext, judge: FeatureNet) -> tuple[Reference, dict, str, str | None]:
    """The reference features and protocol that `fid_reference` stored, and the extractor to use on samples."""
    folder = ctx.dep("reference")
    protocol = json.loads((folder / "protocol.json").read_text())
    with np.load(folder / "reference.npz", allow_pickle=False) as arrays:
        features, labels = arrays["features"], arrays["labels"]
    extractor = protocol["extractor"]
    if extractor["name"] == INCEPTION:
        name, weights = INCEPTION, extractor["path"]
    else:
        name, weights = register_classifier(judge, extractor["sha256"]), None
    if protocol["samples_per_seed"] != ctx.params.eval.num_samples:
        raise StageError(f"{folder}: measured for eval.num_samples={protocol['samples_per_seed']}, not "
                         f"{ctx.params.eval.num_samples}; rerun fid_reference (dvc repro does)")
    ref = Reference(features, labels, neighbourhood=ctx.params.eval.prc_neighborhood,
                    content_hash=protocol["reference"]["pairing"], splits=ctx.params.eval.reference_splits)
    return ref, protocol, name, weights


def _point_file(ctx: StageContext, solver: str, steps: int, seed: int) -> Path:
    return ctx.scratch / "points" / f"{solver}-{steps}-{seed}.npz"


def _grid_row_path(scratch: Path, solver: str, steps: int) -> Path:
    return scratch / "grid" / f"{solver}-{steps}.npy"


def summarise(solver: str, steps: int, nfe: float, measured: dict[str, Measured]) -> dict:
    """A point of `results.json`: each measure's estimate, 95% interval and spread over seeds (ddof = 1)."""
    point: dict = {"solver": solver, "steps": steps, "nfe": nfe, "seeds": sorted(measured["fid"].per_seed)}
    for name, m in measured.items():
        interval = m.interval()
        values = list(m.per_seed.values())
        point |= {name: m.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high,
                  f"{name}_std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
    point["interval"] = measured["fid"].interval().method
    point["pairing"] = measured["fid"].pairing  # what another set needs to share to be paired with this one
    point["per_seed"] = [{"seed": s, **{name: measured[name].per_seed[s] for name in MEASURES}}
                         for s in point["seeds"]]
    return point


@dataclass
class Measurement:
    """What every point of one evaluation is sampled and measured with."""

    ctx: StageContext
    gen: Generator
    vae: torch.nn.Module
    judge: FeatureNet
    extractor: str
    weights: str | None
    guidance: float
    labels: np.ndarray

    def point(self, z0: torch.Tensor, solver: str, steps: int, seed: int, done: Path) -> None:
        """Sample one (solver, steps, seed) point and keep its features, judgements and NFE in `done`."""
        p, compute = self.ctx.params.eval, self.ctx.params.compute
        with generation_autocast(compute):
            images, nfe = generate_images(self.gen, self.vae, z0, self.labels, steps=steps, solver=solver,
                                          guidance=self.guidance, batch_size=p.batch_size,
                                          device=generation_device(compute), tolerance=p.rk45_tolerance)
        arrays = {"features": fid_features(images, extractor=self.extractor, inception_weights=self.weights),
                  "correct": classify(self.judge, images).numpy() == self.labels, "nfe": nfe}
        if seed == p.seeds[0]:  # the grid shows the first seed: one sample per class at each NFE
            row = io.BytesIO()
            np.save(row, images[: min(int(self.gen.meta["num_classes"]), 16)])
            atomic_write_bytes(_grid_row_path(self.ctx.scratch, solver, steps), row.getvalue())
        atomic_write_npz(done, arrays)
        crash_point("eval_point")

    def all_points(self, plan: list[tuple[str, int]]) -> tuple[dict, dict, list[float], int]:
        """Every point of the plan over the seeds, resuming from the points already kept: the seed sets and
        NFE of each point, the straightness of each base seed, and how many points this run measured."""
        p, device = self.ctx.params.eval, generation_device(self.ctx.params.compute)
        for folder in (self.ctx.scratch / "points", self.ctx.scratch / "grid"):
            folder.mkdir(parents=True, exist_ok=True)
        sets: dict[tuple[str, int], list[SeedSet]] = {point: [] for point in plan}
        nfe_of: dict[tuple[str, int], float] = {}
        straightness, measured = [], 0
        bar = tqdm(total=len(plan) * (len(p.seeds) + len(p.extra_seeds)), desc=self.ctx.spec.name, unit="point",
                   mininterval=1.0)
        for seed in [*p.seeds, *p.extra_seeds]:
            z0 = per_sample_noise(sample_seeds(seed, 0, p.num_samples), tuple(self.gen.meta["latent_shape"]))
            if seed in p.seeds:
                k = min(STRAIGHTNESS_SAMPLES, len(z0))
                path_s = self.gen.straightness(z0[:k].to(device), torch.from_numpy(self.labels[:k]).to(device),
                                               steps=p.straightness_steps, guidance=self.guidance)
                if path_s is not None:
                    straightness.append(float(path_s.mean()))
            for solver, steps in plan:
                bar.update()
                if seed not in p.seeds and nfe_of[(solver, steps)] > p.extra_seeds_max_nfe:
                    continue
                done = _point_file(self.ctx, solver, steps, seed)
                if not done.is_file():
                    self.point(z0, solver, steps, seed, done)
                    measured += 1
                with np.load(done, allow_pickle=False) as point:
                    sets[(solver, steps)].append(SeedSet(seed, point["features"], point["correct"], self.labels))
                    nfe_of.setdefault((solver, steps), float(point["nfe"]))
        bar.close()
        return sets, nfe_of, straightness, measured

    def protocol(self, *, straightness_measured: bool) -> dict:
        """What `results.json`'s protocol adds to the reference's: the model, seeds, labels, guidance, NFE."""
        p = self.ctx.params.eval
        return {
            "model": self.ctx.spec.deps["model"], "model_kind": self.gen.kind,
            "model_meta_kind": self.gen.meta.get("kind"), "model_objective": self.gen.meta.get("objective"),
            "seeds": list(p.seeds), "extra_seeds": list(p.extra_seeds),
            "extra_seeds_max_nfe": p.extra_seeds_max_nfe, "labels": "sample i has class i mod K",
            "guidance_scale": self.guidance,
            "nfe": "network evaluations per sample, a guided call counted twice; RK45: the mean it spent",
            "rk45_tolerance": p.rk45_tolerance,
            "straightness": (f"E ∫ ||(X1 - X0) - v(X_t, t)||^2 dt, Euler with {p.straightness_steps} steps, first "
                             f"{STRAIGHTNESS_SAMPLES} samples of each seed") if straightness_measured
                            else "not defined for the DDIM teacher",
        }


def summarise_all(ctx: StageContext, sets: dict, nfe_of: dict, reference: Reference) -> tuple[list[dict], dict]:
    """Every point's summary (`results.json`'s points) and its per-seed and per-half values (`replicates.npz`)."""
    points, replicates = [], {}
    for (solver, steps), seed_sets in sets.items():
        results = measure_sets(seed_sets, reference)
        nfe = nfe_of[(solver, steps)]
        points.append(summarise(solver, steps, nfe, results))
        for name, m in results.items():
            replicates |= m.to_arrays(f"{solver}/{steps}/{name}")
        ctx.log_metrics({f"{name}_{solver}": results[name].estimate for name in MEASURES}, step=round(nfe))
    return points, replicates


def save_grid_rows(scratch: Path, plan: list[tuple[str, int]], path: Path) -> None:
    """The samples' picture: one row per (solver, steps) point of the first seed, one column per class."""
    rows = [np.load(_grid_row_path(scratch, solver, steps)) for solver, steps in plan]
    save_grid(np.concatenate(rows), path, nrow=len(rows[0]))


def point_label(point: dict) -> str:
    """`euler_nfe4`; RK45, which picks its own NFE, is just `rk45`."""
    return point["solver"] if point["solver"] == "rk45" else f"{point['solver']}_nfe{point['nfe']:g}"


def flat_metrics(results: dict) -> dict[str, float]:
    """`metrics/evaluate@<key>.json`: `<solver>_nfe<n>_<measure>` with `_low`/`_high` (95%), best FID, floor."""
    metrics: dict[str, float] = {}
    for point in results["points"]:
        label = point_label(point)
        for name in MEASURES:
            for suffix in ("", "_low", "_high"):
                metrics[f"{label}_{name}{suffix}"] = point[name + suffix]
        if point["solver"] == "rk45":
            metrics["rk45_nfe"] = point["nfe"]
    best = min(results["points"], key=lambda q: q["fid"])
    metrics |= {"best_fid": best["fid"], "best_fid_nfe": float(best["nfe"])}
    metrics |= {f"floor_{name}": results["floor"][name]["estimate"] for name in MEASURES}
    if results["straightness"] is not None:
        metrics["straightness"] = results["straightness"]
    return metrics
