"""The VAE: diffusers' `AutoencoderKL`, built small or loaded pretrained, its pixel conversions, and the
objective the `vae` stage trains it with."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers: a missing hub id otherwise retries ~25 s

from diffusers import AutoencoderKL  # noqa: E402

from models.dit import ModelLoadError  # noqa: E402


def build_vae(
    *, latent_channels: int, block_out_channels: list[int], layers_per_block: int, norm_num_groups: int,
    seed: int = 0,
) -> AutoencoderKL:
    """A small AutoencoderKL; each block after the first halves the resolution."""
    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=32,
        )


VAE_SUBFOLDER = "vae"  # artifacts/vae/vae/: the model folder inside the stage's output, config beside weights


def load_vae(pretrained: str | Path, subfolder: str | None = None) -> AutoencoderKL:
    """An AutoencoderKL from a local diffusers folder or a hub id that is already in the local cache."""
    local = Path(pretrained).expanduser()
    try:
        if local.exists():
            return AutoencoderKL.from_pretrained(local, subfolder=subfolder)
        return AutoencoderKL.from_pretrained(str(pretrained), subfolder=subfolder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"vae.pretrained={pretrained!r}: could not load an AutoencoderKL ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}). This machine is offline: download the weights elsewhere "
            "(e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema`), copy the folder here and set "
            "vae.pretrained to its local path, or set vae.pretrained: null to train a small VAE."
        ) from None


def vae_downsampling(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range diffusers' VAEs expect."""
    return images.float().div(127.5).sub(1.0)


def unit_to_images(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


@torch.inference_mode()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor, scale_factor: float, batch_size: int = 256):
    """Scaled latents -> uint8 images, batched."""
    out = []
    for i in range(0, len(z), batch_size):
        chunk = z[i : i + batch_size].to(vae.device, vae.dtype) / scale_factor
        out.append(unit_to_images(vae.decode(chunk).sample.float()).cpu())
    return torch.cat(out)


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
