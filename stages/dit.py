"""`dit`: the class-conditional DiT teacher on latents, DDPM epsilon objective, EMA weights saved.

With `dit.mirrored`, both flips of every image are training rows. The saved model is the EMA; the DDPM schedule it was
trained with is saved in its `reflow.json`, so the DDIM sampler reads the same alpha-bar.
"""

from __future__ import annotations

import sys

from models.dit import DIT_SUBFOLDER, build_dit, load_dit, null_label
from reflow.diffusion import DDPMObjective, make_ddpm_scheduler
from runtime.context import StageContext, train_config
from runtime.main import stage_main
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
    scheduler = make_ddpm_scheduler(p.num_train_timesteps, p.beta_start, p.beta_end)
    objective = DDPMObjective(scheduler, null_label=null_label(model), label_dropout=p.label_dropout,
                              learn_sigma=p.learn_sigma)
    accelerator = make_accelerator(compute.device, compute.mixed_precision)
    result = train(model, objective, data, cfg, accelerator,
                   resume=FileResume(ctx.scratch / "train_state.pt"), log=ctx.log_metrics, desc="dit",
                   crash_point=crash_point)
    if not ctx.is_main:  # every process trained its share of each batch; the main one saves
        return {}
    n_params = sum(q.numel() for q in result.ema.parameters())
    save_model(result.ema.to("cpu"), ctx.out("model") / DIT_SUBFOLDER, meta={
        **ctx.attrs(), "kind": "dit", "objective": "ddpm_epsilon", "num_classes": num_classes,
        "null_label": null_label(result.ema), "latent_shape": [channels, size, size],
        "scale_factor": float(latents.attrs["scale_factor"]), "learn_sigma": p.learn_sigma,
        "parameters": n_params, "ddpm": {"num_train_timesteps": p.num_train_timesteps,
                                         "beta_start": p.beta_start, "beta_end": p.beta_end}})
    return {"train_loss": result.last_loss, "images_per_s": result.images_per_s, "parameters": n_params,
            "resumed_from_step": result.resumed_from}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
