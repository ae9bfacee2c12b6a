"""The one recipe of the velocity-model stages (`rf1`, `rf@k`, `seqrf`, `distill`): `velocity_stage`.

Each of them trains a DiT with a velocity head, shaped like the teacher and initialised from a model of
the chain, on its own data with its own objective; then measures it and saves it. What differs between
them are the arguments: the data, the objective (`reflow.rectified`, `reflow.seqrf`, `reflow.distill`),
the model it starts from, the student's size and the sampler it is measured with.

Every velocity model is measured the same way, on the same held-out teacher pairs (the last
`eval_samples` rows of `teacher_pairs`, never trained on by `rf1`), so the metrics of 1-RF, k-RF and
later stages are directly comparable: N-step error against the teacher's sample from the same noise,
and straightness.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imagedata.grids import save_grid
from measure.metrics import EULER, flow_errors
from models.dit import DIT_SUBFOLDER, TIME_AXIS, build_dit, init_where_shapes_match, load_dit
from models.interval import IntervalDiT
from models.vae import VAE_SUBFOLDER, decode_latents, load_vae
from reflow.rectified import velocity_field
from reflow.samplers import Solver
from runtime.context import StageContext, train_config
from runtime.generator import require_time_axis
from runtime.pairs import nearest_rows
from runtime.params import ComputeParams, VelocityTrainParams
from runtime.spec import StageSpec
from storage.atomic import atomic_dir
from storage.checkpoints import read_meta, save_model
from storage.datasets import Dataset, open_dataset
from storage.faults import crash_point
from storage.resume import FileResume
from training.loader import BatchSource, as_tensor, batch_source
from training.loop import LossFn, TrainResult, make_accelerator, train


def _pairs(path, meta: dict, names) -> Dataset:
    """The pairs dataset; its latents must have the teacher's shape, `meta["latent_shape"]` (else a
    DatasetError naming `path`, instead of a shape error deep inside the model)."""
    shape = tuple(meta["latent_shape"])
    return open_dataset(path, kind="pairs", expect={n: shape if n in ("z0", "z1") else () for n in names})


def training_rows(path, meta: dict, compute: ComputeParams, *, names=("z0", "z1", "label"),
                  rows: int | None = None) -> BatchSource:
    """Rows `[0, rows)` of a pairs dataset to train on: in RAM within `compute.ram_budget_gb`, else read chunk
    by chunk (training.loader). Shapes are checked as in `held_out_pairs`."""
    return batch_source(_pairs(path, meta, names), names, compute.seed, rows=rows,
                        ram_budget_gb=compute.ram_budget_gb)


def held_out_pairs(path, meta: dict, eval_samples: int, names=("z0", "z1", "label")) -> tuple[int, dict]:
    """(rows before the held-out ones, the last `eval_samples` pairs as tensors): never trained on by `rf1`."""
    ds = _pairs(path, meta, names)
    if eval_samples >= ds.n_rows:
        raise ValueError(f"eval_samples={eval_samples} leaves no training pairs out of {ds.n_rows} in {path}; "
                         "lower it")
    start = ds.n_rows - eval_samples
    return start, {n: as_tensor(n, ds.read(n, start, ds.n_rows)) for n in names}


def velocity_model_like(teacher_dir, *, init_from=None, seed: int = 0, num_layers: int | None = None,
                        attention_head_dim: int | None = None):
    """A model shaped like the teacher with a velocity head (C output channels), optionally initialised.

    `init_from` is a model folder (the teacher, or the previous round) copied where shapes match;
    `num_layers` / `attention_head_dim` make a smaller student (SlimFlow), initialised where they match. A
    text-conditioned teacher (models/prompted.py) gives a UNet of its shape with its frozen text encoder.
    """
    teacher = load_dit(teacher_dir)
    if getattr(teacher, "family", "dit") == "text":
        if num_layers is not None or attention_head_dim is not None:
            raise ValueError(f"{teacher_dir}: a smaller student of a text-conditioned UNet is not available; set "
                             "the student_* keys of its section to null")
        model = teacher.velocity_like(seed)
    else:
        cfg = teacher.config
        model = build_dit(sample_size=cfg.sample_size, in_channels=cfg.in_channels,
                          num_classes=cfg.num_embeds_ada_norm, patch_size=cfg.patch_size,
                          num_layers=num_layers or cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                          attention_head_dim=attention_head_dim or cfg.attention_head_dim, learn_sigma=False,
                          seed=seed)
    copied = 0
    if init_from is not None:
        source = read_meta(init_from)
        if source.get("objective") == "rectified_flow_velocity":  # the teacher's own axis needs no check
            require_time_axis(source, Path(init_from))
        # rf1 starts from the teacher it is shaped like: the model already loaded, not a second read of it
        source_model = teacher if Path(init_from).resolve() == Path(teacher_dir).resolve() else load_dit(init_from)
        copied, _ = init_where_shapes_match(model, source_model)
    return model, copied


def train_velocity(ctx: StageContext, p: VelocityTrainParams, compute: ComputeParams, model,
                   data: dict | BatchSource,
                   objective: LossFn, desc: str) -> TrainResult:
    cfg = train_config(p, compute.seed)
    return train(model, objective, data, cfg, make_accelerator(compute.device, compute.mixed_precision),
                 resume=FileResume(ctx.scratch / "train_state.pt"), log=ctx.log_metrics, desc=desc,
                 crash_point=crash_point)


@torch.inference_mode()
def evaluate_and_save(ctx: StageContext, p: VelocityTrainParams, result: TrainResult, eval_pairs: dict, *,
                      meta: dict, vae_dir, kind: str, sampler: Solver = EULER) -> dict[str, float]:
    """Errors vs the teacher on held-out pairs, a grid (teacher row, then 1, 2, 4, ... Euler steps), save.

    `sampler` is the model's own way
    of taking n steps (a `reflow.samplers.Solver`). Only the main process evaluates and saves; the others,
    done with their share of the training, return no metrics.
    """
    if not ctx.is_main:
        return {}
    model = result.ema.to("cpu").eval()
    null = meta["null_label"]
    field = velocity_field(model, eval_pairs["label"], null_label=null)
    metrics = flow_errors(field, eval_pairs["z0"], eval_pairs["z1"], steps=p.eval_steps, sampler=sampler)
    vae = load_vae(vae_dir / VAE_SUBFOLDER).eval()
    k = min(10, len(eval_pairs["z0"]))
    z0, y = eval_pairs["z0"][:k], eval_pairs["label"][:k]
    rows = [eval_pairs["z1"][:k]] + [sampler(velocity_field(model, y, null_label=null), z0, n).x
                                 for n in p.eval_steps]
    images = decode_latents(vae, torch.cat(rows), meta["scale_factor"]).numpy()
    out = ctx.out("model")
    with atomic_dir(out) as tmp:
        save_model(model, tmp / "transformer", meta={**meta, **ctx.attrs(), "kind": kind,
                                                    "objective": "rectified_flow_velocity", "metrics": metrics})
        save_grid(images, tmp / "grid.png", nrow=k)
    ctx.log_artifact(out / "grid.png", "samples")
    return {**metrics, "train_loss": result.last_loss, "images_per_s": result.images_per_s,
            "resumed_from_step": float(result.resumed_from)}


def teacher_meta(ctx: StageContext) -> dict:
    """What every velocity model records about the space it lives in (from the stage's `dit` and
    `teacher_pairs` deps)."""
    meta = read_meta(ctx.dep("dit") / DIT_SUBFOLDER)
    pairs = open_dataset(ctx.dep("teacher_pairs") / "pairs.zarr", kind="pairs")
    return {"null_label": meta["null_label"], "num_classes": meta["num_classes"],
            "latent_shape": meta["latent_shape"], "scale_factor": meta["scale_factor"],
            "time_convention": f"t=0 noise z0, t=1 data z1; {TIME_AXIS}",
            "teacher_guidance_scale": float(pairs.attrs["guidance_scale"])} | (
                {"prompts": meta["prompts"]} if "prompts" in meta else {})  # a text teacher's table


def velocity_stage(ctx: StageContext, p: VelocityTrainParams, meta: dict, *, data: BatchSource | dict,
                   objective: LossFn, init_from: Path | None, kind: str, model_meta: dict, sampler: Solver = EULER,
                   student: dict | None = None, interval: bool = False) -> tuple[dict, int]:
    """Train a velocity model on `data` with `objective`, measure it on the held-out teacher pairs, save it.

    `init_from`: the model folder it starts from where shapes match (None: fresh weights); `student`: its
    own shape (`num_layers`, `attention_head_dim`; None keeps the teacher's), recorded with its parameter
    count; `interval`: the model also takes the step's length (models/interval.py: MeanFlow, shortcut), starting
    as the model it copies; `model_meta`: what its `meta.json` adds to the teacher's `meta`. Returns the stage's
    metrics and how many tensors were initialised from `init_from`.
    """
    compute = ctx.params.compute
    _, eval_pairs = held_out_pairs(ctx.dep("teacher_pairs") / "pairs.zarr", meta, p.eval_samples)
    model, copied = velocity_model_like(ctx.dep("dit") / DIT_SUBFOLDER, init_from=init_from, seed=compute.seed,
                                        **(student or {}))
    if interval:
        model = IntervalDiT(model, seed=compute.seed)
    result = train_velocity(ctx, p, compute, model, data, objective, desc=ctx.spec.name)
    if student is not None:  # a student records its size
        n_params = sum(q.numel() for q in result.ema.parameters())
        model_meta = {**model_meta, "parameters": n_params}
    metrics = evaluate_and_save(ctx, p, result, eval_pairs, vae_dir=ctx.dep("vae"), kind=kind, sampler=sampler,
                                meta={**meta, **model_meta})
    if student is not None:
        metrics["student_parameters"] = float(n_params)
    return metrics, copied


def coupling_data(ctx: StageContext, p, meta: dict) -> BatchSource | dict:
    """The training rows of a model that names its coupling (`p.coupling`, `p.pairs`, `p.drop_farthest`):
    real latents for `independent`; otherwise the pair set `p.pairs` (without the held-out teacher pairs when it
    is `teacher_pairs`), minus the `drop_farthest` fraction of pairs with the largest `||z1 - z0||` (Re-MeanFlow's
    filter, applied in RAM; the dataset itself is left as it is)."""
    compute = ctx.params.compute
    if p.coupling == "independent":
        latents = open_dataset(ctx.dep("latents") / "latents.zarr", kind="latents")
        return batch_source(latents, {"z1": "z1", "label": "labels"}, compute.seed,
                            ram_budget_gb=compute.ram_budget_gb)
    path = ctx.dep("pairs") / "pairs.zarr"
    rows = held_out_pairs(path, meta, p.eval_samples)[0] if p.pairs == "teacher_pairs" else None
    if p.drop_farthest <= 0:
        return training_rows(path, meta, compute, rows=rows)
    pairs = _pairs(path, meta, ("z0", "z1", "label"))
    n = pairs.n_rows if rows is None else rows
    arrays = {name: pairs.read(name, 0, n) for name in ("z0", "z1", "label")}
    keep, _ = nearest_rows(arrays["z0"], arrays["z1"], p.drop_farthest)
    return {name: as_tensor(name, a[keep]) for name, a in arrays.items()}


def interval_model_spec(name: str) -> StageSpec:
    """The stage of an interval model (`meanflow`, `shortcut`): its section names the pair set it trains on and
    the model it starts from, so both are dependencies built from those keys."""
    return StageSpec(
        name=name,
        params=("compute", name),
        deps={"pairs": f"artifacts/${{{name}.pairs}}", "latents": "artifacts/extract",
              "init": f"artifacts/${{{name}.init_from}}", "teacher_pairs": "artifacts/teacher_pairs",
              "dit": "artifacts/dit", "vae": "artifacts/vae"},
        outs={"model": f"artifacts/{name}"},
        metrics=f"metrics/{name}.json",
    )
