"""`vae`: the autoencoder whose latent space every later stage works in.

Either a pretrained `AutoencoderKL` (`vae.pretrained`: local folder or a hub id already cached) or a
small one trained here on the training images. The latent scale factor (latents * scale ~ unit
variance) is stored in the saved config as `scaling_factor`, the one place later stages read it. The
training pass and objective are `models.vae.VAETraining` and `VAEObjective`; this module is their wiring.
"""

from __future__ import annotations

import sys

import torch

from models.vae import VAE_SUBFOLDER, VAEObjective, VAETraining, build_vae, latent_stats, load_vae, vae_downsampling
from runtime.context import StageContext, train_config
from runtime.devices import generation_device
from runtime.main import pipeline_stage_main
from runtime.spec import StageSpec
from storage.checkpoints import save_model
from storage.datasets import open_dataset
from storage.faults import crash_point
from storage.resume import FileResume
from training.loop import make_accelerator, train

SPEC = StageSpec(
    name="vae",
    params=("compute", "vae"),
    deps={"data": "artifacts/prepare"},
    outs={"model": "artifacts/vae"},
    metrics="metrics/vae.json",
)


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.vae, ctx.params.compute
    data = ctx.dep("data")
    train_images = torch.from_numpy(open_dataset(data / "train.zarr", kind="images").load("images"))
    reference = torch.from_numpy(open_dataset(data / "reference.zarr", kind="images").load("images"))
    metrics: dict[str, float] = {}
    if p.pretrained:
        vae = load_vae(p.pretrained, p.subfolder)
    else:
        vae = build_vae(latent_channels=p.latent_channels, block_out_channels=p.block_out_channels,
                        layers_per_block=p.layers_per_block, norm_num_groups=p.norm_num_groups,
                        seed=compute.seed)
        accelerator = make_accelerator(compute.device, compute.mixed_precision)
        cfg = train_config(p, compute.seed)
        result = train(VAETraining(vae), VAEObjective(p.kl_weight), {"images": train_images}, cfg, accelerator,
                       resume=FileResume(ctx.scratch / "train_state.pt"), log=ctx.log_metrics, desc="vae",
                       crash_point=crash_point)
        vae = result.ema.vae
        metrics["train_loss"] = result.last_loss
    if not ctx.is_main:  # every process trained its share of each batch; the main one measures and saves
        return {}
    vae.to(generation_device(compute)).eval()  # a pretrained VAE is measured on the GPU too, not left on the CPU
    # The scale factor is fitted on the training images, like the weights; the reference only measures.
    latent_std, _ = latent_stats(vae, train_images)
    _, recon_mse = latent_stats(vae, reference)
    scale = p.scale_factor or (vae.config.scaling_factor if p.pretrained else 1.0 / latent_std)
    vae.register_to_config(scaling_factor=float(scale))
    metrics |= {"reference_recon_mse": recon_mse, "reference_psnr": 10 * torch.log10(
        torch.tensor(4.0 / max(recon_mse, 1e-12))).item(), "scale_factor": float(scale),
        "latent_std": latent_std}
    size = train_images.shape[-1] // vae_downsampling(vae)
    save_model(vae.to("cpu"), ctx.out("model") / VAE_SUBFOLDER, meta={
        **ctx.attrs(), "kind": "vae", "pretrained": p.pretrained, "scale_factor": float(scale),
        "latent_shape": [vae.config.latent_channels, size, size]})
    return metrics


def main(argv: list[str] | None = None) -> int:
    return pipeline_stage_main(SPEC, run, distributed=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
