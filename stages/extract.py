"""`extract`: VAE latents of every training image and of its horizontal mirror.

Both flips are kept as separate arrays (never one random flip frozen into the features), and the
latents are stored already multiplied by the VAE's scale factor, which is recorded in the attrs.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from models.vae import VAE_SUBFOLDER, images_to_unit, load_vae
from runtime.context import StageContext
from runtime.devices import generation_device
from runtime.main import pipeline_stage_main
from runtime.spec import StageSpec
from storage.atomic import atomic_dir
from storage.datasets import open_dataset, write_dataset

SPEC = StageSpec(
    name="extract",
    params=("compute", "extract"),
    deps={"data": "artifacts/prepare", "vae": "artifacts/vae"},
    outs={"latents": "artifacts/extract"},
    metrics="metrics/extract.json",
)


@torch.inference_mode()
def encode(vae, images: torch.Tensor, *, batch_size: int, posterior: str, seed: int, desc: str):
    """Scaled latents of uint8 images; `posterior` is 'mean' or 'sample' (seeded per batch)."""
    scale = float(vae.config.scaling_factor)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=1.0):
        x = images_to_unit(images[start : start + batch_size].to(vae.device))
        dist = vae.encode(x).latent_dist
        if posterior == "mean":
            z = dist.mean
        else:
            g = torch.Generator(device=vae.device).manual_seed(seed + start)
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g, device=vae.device)
        out.append((z.float() * scale).cpu())
    return torch.cat(out)


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.extract, ctx.params.compute
    train = open_dataset(ctx.dep("data") / "train.zarr", kind="images")
    images = torch.from_numpy(train.load("images"))
    labels = train.load("labels")
    device = generation_device(compute)
    vae = load_vae(ctx.dep("vae") / VAE_SUBFOLDER).to(device).eval()
    kw = {"batch_size": p.batch_size, "posterior": p.posterior, "seed": compute.seed}
    z1 = encode(vae, images, desc="latents", **kw)
    z1_flip = encode(vae, images.flip(-1), desc="mirrored latents", **kw)
    # A mirrored latent is the latent of the mirrored image only as far as the VAE is flip-equivariant; mirrored
    # reflow pairs (reflow.flip_prob) are flipped in latent space and are refused when this is large.
    flip_error = float((z1_flip - z1.flip(-1)).pow(2).mean() / z1.pow(2).mean())
    attrs = {"scale_factor": float(vae.config.scaling_factor), "posterior": p.posterior, "scaled": True,
             "flip_equivariance_error": flip_error,
             "num_classes": train.attrs["num_classes"], "class_names": train.attrs["class_names"],
             "images": {"split": "train", "content_hash": train.attrs["content_hash"]}}  # what the DiT learns from
    with atomic_dir(ctx.out("latents")) as tmp:
        write_dataset(tmp / "latents.zarr",
                      {"z1": z1.numpy(), "z1_flip": z1_flip.numpy(), "labels": labels},
                      kind="latents", attrs=attrs, **ctx.attrs())
    return {"latents": int(len(z1)), "latent_std": float(z1.std()), "latent_mean": float(z1.mean()),
            "flip_equivariance_error": flip_error}


def main(argv: list[str] | None = None) -> int:
    return pipeline_stage_main(SPEC, run, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
