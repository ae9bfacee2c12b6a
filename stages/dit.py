"""`dit`: the class-conditional DiT teacher on latents, EMA weights saved.

`dit.objective` is DDPM epsilon prediction (`ddpm_eps`, sampled by DDIM), or jax-flow's flow matching
(`flow_matching`): the rectified-flow regression on the independent coupling, real latents with fresh noise,
target `z1 - z0`, logit-normal times, labels dropped for classifier-free guidance (Lipman et al. 2023; Esser et
al. 2024 for the times), sampled by Euler or Heun like every velocity model. With `dit.mirrored`, both flips of
every image are training rows. The saved model is the EMA; its meta says what it is: the DDPM schedule it was
trained with (so DDIM reads the same alpha-bar), or, for flow matching, the velocity model's objective and time
axis, so the samplers and every model initialised from it read it as a velocity field.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from models.dit import DIT_SUBFOLDER, TIME_AXIS, build_dit, load_dit, null_label
from reflow.diffusion import DDPMObjective, make_ddpm_scheduler
from reflow.rectified import Independent, RectifiedFlow
from runtime.context import StageContext, StageError, train_config
from runtime.main import stage_main
from runtime.params import DiTParams
from runtime.spec import StageSpec
from storage.checkpoints import save_model
from storage.datasets import open_dataset
from storage.faults import crash_point
from storage.resume import FileResume
from training.loader import StackedViews, batch_source
from training.loop import make_accelerator, train

SPEC = StageSpec(
    name="dit",
    params=("compute", "dit"),
    deps={"latents": "artifacts/extract"},
    outs={"model": "artifacts/dit"},
    metrics="metrics/dit.json",
)


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.dit, ctx.params.compute
    latents = open_dataset(ctx.dep("latents") / "latents.zarr", kind="latents")
    views = ["z1", "z1_flip"] if p.mirrored else ["z1"]
    # Every view of every image is a row of the epoch: in RAM when it fits compute.ram_budget_gb, else read
    # chunk by chunk.
    rows = StackedViews(latents, {"z1": views, "label": ["labels"] * len(views)})
    cfg = train_config(p, compute.seed)
    data = batch_source(rows, ["z1", "label"], cfg.seed, ram_budget_gb=compute.ram_budget_gb)
    num_classes = int(latents.attrs["num_classes"])
    channels, size = latents["z1"].shape[1], latents["z1"].shape[-1]
    if p.pretrained:
        model = load_dit(ctx.root / p.pretrained)
    else:
        model = build_dit(sample_size=size, in_channels=channels, num_classes=num_classes,
                          patch_size=p.patch_size, num_layers=p.num_layers,
                          num_attention_heads=p.num_attention_heads, attention_head_dim=p.attention_head_dim,
                          learn_sigma=p.learn_sigma, seed=compute.seed)
    objective = teacher_objective(p, model)
    accelerator = make_accelerator(compute.device, compute.mixed_precision)
    result = train(model, objective, data, cfg, accelerator,
                   resume=FileResume(ctx.scratch / "train_state.pt"), log=ctx.log_metrics, desc="dit",
                   crash_point=crash_point)
    if not ctx.is_main:  # every process trained its share of each batch; the main one saves
        return {}
    n_params = sum(q.numel() for q in result.ema.parameters())
    save_teacher(result.ema.to("cpu"), ctx.out("model") / DIT_SUBFOLDER, p, attrs=ctx.attrs(),
                 num_classes=num_classes, latent_shape=[channels, size, size],
                 scale_factor=float(latents.attrs["scale_factor"]))
    return {"train_loss": result.last_loss, "images_per_s": result.images_per_s, "parameters": n_params,
            "resumed_from_step": result.resumed_from}


def teacher_objective(p: DiTParams, model: nn.Module):
    """The loss the teacher trains on: `DDPMObjective`, or `RectifiedFlow` on the independent coupling."""
    if p.objective == "ddpm_eps":
        return DDPMObjective(make_ddpm_scheduler(p.num_train_timesteps, p.beta_start, p.beta_end),
                             null_label=null_label(model), label_dropout=p.label_dropout, learn_sigma=p.learn_sigma)
    if model.config.out_channels != model.config.in_channels:  # a learned-variance DiT from dit.pretrained
        raise StageError(f"dit.objective: flow_matching trains a velocity head of {model.config.in_channels} "
                         f"channels, but dit.pretrained={p.pretrained!r} has {model.config.out_channels} output "
                         "channels (DDPM's learned variance): start from fresh weights or a velocity DiT")
    return RectifiedFlow(coupling=Independent(), null_label=null_label(model), label_dropout=p.label_dropout,
                         time_distribution=p.time_distribution)


def save_teacher(model: nn.Module, folder: Path, p: DiTParams, *, attrs: dict, num_classes: int,
                 latent_shape: list[int], scale_factor: float) -> None:
    """The teacher's weights and its meta: what every later stage reads about the latent space and the guidance
    class, and how to sample it. A flow-matching teacher is saved as a velocity model (its objective and time axis,
    as `runtime.velocity.evaluate_and_save` records them), so `load_generator` and `velocity_model_like` take it."""
    meta = {**attrs, "kind": "dit", "teacher_objective": p.objective, "num_classes": num_classes,
            "null_label": null_label(model), "latent_shape": latent_shape, "scale_factor": scale_factor,
            "learn_sigma": p.learn_sigma, "parameters": sum(q.numel() for q in model.parameters())}
    if p.objective == "ddpm_eps":
        meta |= {"objective": "ddpm_epsilon", "ddpm": {"num_train_timesteps": p.num_train_timesteps,
                                                       "beta_start": p.beta_start, "beta_end": p.beta_end}}
    else:
        meta |= {"objective": "rectified_flow_velocity", "time_convention": f"t=0 noise z0, t=1 data z1; {TIME_AXIS}",
                 "time_distribution": p.time_distribution}
    save_model(model, folder, meta=meta)


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
