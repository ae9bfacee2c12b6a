"""`text_teacher`: the text-conditioned teacher of the text pipeline, as a `PromptConditioned` UNet.

Trained here (the embedded default): a small `UNet2DConditionModel` and a small CLIP text encoder, trained
together by DDPM epsilon prediction on the captioned latents of `text_extract`, captions dropped to the empty
prompt with probability `caption_dropout` so that classifier-free guidance has an unconditional model, as Stable
Diffusion was trained. By path (`text_teacher.pretrained`): a Stable Diffusion folder (models/sd.py), its UNet and
text encoder as they are; its VAE is `text_vae.pretrained` (the same folder, subfolder `vae`). Either way the
saved teacher is an epsilon model on the DDPM schedule its meta records, sampled by DDIM, with the prompts file
as its prompt table, so every later stage of the class chain takes it as it takes the DiT.
"""

from __future__ import annotations

import sys

from imagedata.captions import read_prompts
from models.dit import DIT_SUBFOLDER
from models.prompted import PromptConditioned, PromptError
from models.text import clip_tokenizer
from reflow.diffusion import DDPMObjective, make_ddpm_scheduler
from runtime.context import StageContext, StageError, train_config
from runtime.main import stage_main
from runtime.spec import StageSpec
from storage.checkpoints import save_model
from storage.datasets import open_dataset
from storage.faults import crash_point
from storage.resume import FileResume
from training.loader import batch_source
from training.loop import make_accelerator, train

SPEC = StageSpec(
    name="text_teacher",
    params=("compute", "text_teacher"),
    deps={"latents": "text/artifacts/extract", "data": "text/artifacts/prepare"},
    outs={"model": "text/artifacts/teacher"},
    metrics="text/metrics/teacher.json",
    note="trained here, or a Stable Diffusion folder by path (text_teacher.pretrained)",
)


def pretrained_teacher(ctx: StageContext, prompts: list[str], latent_shape: list[int]):
    """(model, DDPM schedule) of the Stable Diffusion folder `text_teacher.pretrained`."""
    from models.sd import load_sd

    p = ctx.params.text_teacher
    sd = load_sd(ctx.root / p.pretrained)
    if sd.schedule["prediction_type"] != "epsilon":
        raise StageError(f"{sd.path}: the UNet predicts {sd.schedule['prediction_type']!r} (scheduler/"
                         "scheduler_config.json); the text chain samples epsilon teachers by DDIM (SD 1.x, 2.x-base)")
    cfg = sd.unet.config
    if [cfg.in_channels, cfg.sample_size, cfg.sample_size] != latent_shape:
        raise StageError(f"{sd.path}: its UNet takes {cfg.in_channels} x {cfg.sample_size} x {cfg.sample_size} latents "
                         f"but text_extract made {latent_shape}: set text_vae.pretrained to the same folder (subfolder "
                         "vae) and text_data.resolution to 8 x the UNet's sample_size")
    model = PromptConditioned(sd.unet, sd.text_encoder, sd.tokenizer, prompts, context_length=77)
    return model, {k: sd.schedule[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}


def trained_teacher(ctx: StageContext, prompts: list[str], latents):
    """(model, DDPM schedule, metrics) of a small UNet and CLIP text encoder trained on the captioned latents."""
    from models.sd import build_text_encoder, build_unet

    p, compute = ctx.params.text_teacher, ctx.params.compute
    channels, size = latents["z1"].shape[1], latents["z1"].shape[-1]
    unet = build_unet(sample_size=size, in_channels=channels, cross_attention_dim=p.text_hidden_size,
                      block_out_channels=tuple(p.block_out_channels), layers_per_block=p.layers_per_block,
                      attention_head_dim=p.attention_head_dim, seed=compute.seed)
    text_encoder = build_text_encoder(hidden_size=p.text_hidden_size, num_hidden_layers=p.text_layers,
                                      num_attention_heads=p.text_heads, intermediate_size=4 * p.text_hidden_size,
                                      seed=compute.seed)
    model = PromptConditioned(unet, text_encoder, clip_tokenizer(), prompts, context_length=p.context_length,
                              train_text_encoder=p.train_text_encoder)
    schedule = {"num_train_timesteps": p.num_train_timesteps, "beta_start": p.beta_start, "beta_end": p.beta_end,
                "beta_schedule": "linear"}
    objective = DDPMObjective(make_ddpm_scheduler(p.num_train_timesteps, p.beta_start, p.beta_end),
                              null_label=model.null_label, label_dropout=p.caption_dropout, learn_sigma=False)
    cfg = train_config(p, compute.seed)
    data = batch_source(latents, {"z1": "z1", "label": "labels"}, cfg.seed, ram_budget_gb=compute.ram_budget_gb)
    result = train(model, objective, data, cfg, make_accelerator(compute.device, compute.mixed_precision),
                   resume=FileResume(ctx.scratch / "train_state.pt"), log=ctx.log_metrics, desc="text_teacher",
                   crash_point=crash_point)
    return result.ema, schedule, {"train_loss": result.last_loss, "images_per_s": result.images_per_s,
                                  "resumed_from_step": result.resumed_from}


def run(ctx: StageContext) -> dict:
    p = ctx.params.text_teacher
    latents = open_dataset(ctx.dep("latents") / "latents.zarr", kind="latents")
    prompts = read_prompts(ctx.dep("data") / "prompts.txt")
    latent_shape = list(latents["z1"].shape[1:])
    try:
        if p.pretrained:
            model, schedule = pretrained_teacher(ctx, prompts, latent_shape)
            metrics: dict = {}
        else:
            model, schedule, metrics = trained_teacher(ctx, prompts, latents)
    except PromptError as exc:
        raise StageError(f"{ctx.dep('data') / 'prompts.txt'}: {exc}") from None
    if not ctx.is_main:
        return {}
    n_params = sum(q.numel() for q in model.unet.parameters())
    meta = {**ctx.attrs(), "kind": "text_teacher", "teacher_objective": "ddpm_eps", "objective": "ddpm_epsilon",
            "ddpm": schedule, "num_classes": len(prompts), "null_label": model.null_label, "prompts": prompts,
            "grid_columns": len(open_dataset(ctx.dep("data") / "train.zarr", kind="images").attrs["colours"]),
            "latent_shape": latent_shape, "scale_factor": float(latents.attrs["scale_factor"]),
            "learn_sigma": False, "pretrained": p.pretrained, "parameters": n_params,
            "text_encoder_parameters": sum(q.numel() for q in model.text_encoder.parameters())}
    save_model(model.to("cpu"), ctx.out("model") / DIT_SUBFOLDER, meta=meta)
    return {**metrics, "unet_parameters": n_params, "prompts": len(prompts)}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
