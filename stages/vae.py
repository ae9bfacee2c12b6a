"""`vae`: the autoencoder whose latent space every later stage works in.

Either a pretrained `AutoencoderKL` (`vae.pretrained`: local folder or a hub id already cached) or a
small one trained here on the training images. The latent scale factor (latents * scale ~ unit
variance) is stored in the saved config as `scaling_factor`, the one place later stages read it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from reflow.models import build_vae, images_to_unit, load_vae, unit_to_images, vae_downsampling
from stages.common import StageContext, StageSpec, generation_device, stage_main, train_config
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


class VAETraining(nn.Module):
    """The VAE's training pass (encode, sample the posterior, decode) as one `forward`.

    Data-parallel training wraps the model in DDP, which synchronises gradients only for work done
    through its `forward`; calling `encode`/`decode` on the wrapper is not possible and on the VAE
    itself would skip that.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator, device=x.device)
        z = posterior.mean + posterior.std * noise
        return self.vae.decode(z).sample, posterior.kl()


class VAEObjective:
    """Reconstruction MSE in [-1, 1] plus a small KL to keep the latent space smooth."""

    def __init__(self, kl_weight: float):
        self.kl_weight = kl_weight

    def __call__(self, model, batch, generator, step):
        x = images_to_unit(batch["images"])
        recon, kl = model(x, generator)
        return (recon.float() - x).pow(2).mean() + self.kl_weight * kl.mean()


@torch.inference_mode()
def latent_stats(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(std of the posterior means, reconstruction MSE in [-1, 1]) over `images`."""
    means, sq_err = [], 0.0
    for i in range(0, len(images), batch_size):
        x = images_to_unit(images[i : i + batch_size].to(vae.device))
        mean = vae.encode(x).latent_dist.mean
        means.append(mean.float().cpu())
        sq_err += (images_to_unit(unit_to_images(vae.decode(mean).sample)) - x).pow(2).sum().item()
    latents = torch.cat(means)
    return latents.std().item(), sq_err / images.numel()


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
    save_model(vae.to("cpu"), ctx.out("model"), meta={
        **ctx.attrs(), "kind": "vae", "pretrained": p.pretrained, "scale_factor": float(scale),
        "latent_shape": [vae.config.latent_channels, size, size]})
    return metrics


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
