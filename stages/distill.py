"""`distill`: a one-step student, `z0 -> z0 + v(z0, 0)`, trained on `distill_pairs` (or a k-step one).

The pairs are the source model's (`distill.source`: rf1, rf@k or seqrf). The student may be smaller
than the source (its own depth and width, a null one the source's, initialised from the source where shapes
match). `distill.k_steps` > 1 trains RectifiedFlow's k-step student; `distill.guide_weight` > 0 adds
SlimFlow's flow-guided term, the source model run online as the guide; `distill.loss: lpips_huber` is
2-RF++'s loss. With `per_segment` (source seqrf) it takes one step per segment instead, SeqRF's distillation.
It is measured like every velocity model, on the held-out teacher pairs, so its one-step error sits next to
1-RF's and k-RF's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel

from models.dit import load_dit
from models.lpips import LPIPSLoss
from models.prompted import is_prompt_conditioned
from models.vae import VAE_SUBFOLDER, load_vae
from reflow.distill import KStepDistill
from reflow.samplers import Euler
from reflow.seqrf import Segmented, SegmentObjective
from runtime.chains import chain_of, source_key, suffix
from runtime.context import StageContext, StageError
from runtime.devices import generation_device
from runtime.main import chain_stage_main
from runtime.spec import StageSpec
from runtime.velocity import teacher_meta, velocity_stage
from storage.datasets import open_dataset
from training.loader import batch_source


def spec(chain: str = "") -> StageSpec:
    """A chain's student (runtime/chains.py): `distill`, or `distill_classic` from `distill.classic_source`."""
    name = f"distill{suffix(chain)}"
    return StageSpec(
        name=name,
        params=("compute", "distill"),
        deps={"pairs": f"artifacts/distill_pairs{suffix(chain)}",
              "source": f"artifacts/${{distill.{source_key(chain)}}}", "teacher_pairs": "artifacts/teacher_pairs",
              "dit": "artifacts/dit", "vae": "artifacts/vae"},
        outs={"model": f"artifacts/{name}"},
        metrics=f"metrics/{name}.json",
    )


SPEC = spec()
LPIPS_SIZE = 224  # decoded images are resized to this before LPIPS, as InstaFlow and SlimFlow do


def lpips_on_decoded(ctx: StageContext, meta: dict, device: str):
    """`(prediction, z1) -> LPIPS` of the VAE decodings, from local weight files (None when not configured)."""
    p = ctx.params.distill
    if p.lpips_backbone is None:
        return None
    lpips = LPIPSLoss(ctx.root / p.lpips_backbone, ctx.root / p.lpips_lin, net=p.lpips_net).to(device)
    vae = load_vae(ctx.dep("vae") / VAE_SUBFOLDER).to(device).eval().requires_grad_(False)
    scale = meta["scale_factor"]

    def decode(z: torch.Tensor) -> torch.Tensor:  # LPIPS's networks expect ImageNet-sized inputs
        image = vae.decode(z / scale).sample.clamp(-1, 1)
        return F.interpolate(image, size=(LPIPS_SIZE, LPIPS_SIZE), mode="bilinear", align_corners=False)

    def perceptual(prediction: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = decode(z1)
        return lpips(decode(prediction), target)

    return perceptual


def student_shape(p, source_dir: Path) -> dict | None:
    """The student's DiT shape, each null key the source's own; None for a text UNet (the source's shape)."""
    if is_prompt_conditioned(source_dir):
        if p.student_num_layers or p.student_attention_head_dim:
            raise StageError(f"{source_dir}: a smaller student of the text chain's UNet is not available yet; set "
                             "text_distill.student_num_layers and student_attention_head_dim to null")
        return None
    source = DiTTransformer2DModel.load_config(source_dir)
    return {"num_layers": p.student_num_layers or source["num_layers"],
            "attention_head_dim": p.student_attention_head_dim or source["attention_head_dim"]}


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.distill, ctx.params.compute
    chain = chain_of(ctx.spec.name)
    source_name = getattr(p, source_key(chain))
    per_segment = p.per_segment and not chain  # SeqRF, the only per-segment source, is the teacher chain's
    meta = teacher_meta(ctx)
    pairs = open_dataset(ctx.dep("pairs") / "pairs.zarr", kind="pairs")
    data = batch_source(pairs, [name for name in pairs.names if name not in ("seed", "segment")], compute.seed,
                        ram_budget_gb=compute.ram_budget_gb)
    source_dir = ctx.dep("source") / "transformer"
    if per_segment:
        boundaries = [float(b) for b in pairs.attrs["boundaries"]]
        objective = SegmentObjective(null_label=meta["null_label"], label_dropout=p.label_dropout, loss=p.loss,
                                     one_step=True)
        sampler, extra = Segmented(tuple(boundaries)), {"boundaries": boundaries}  # a whole number per segment
    else:  # k steps (one by default), SlimFlow's flow-guided term from the source when guide_weight > 0
        device = generation_device(compute)
        guide = load_dit(source_dir).to(device).eval().requires_grad_(False) if p.guide_weight > 0 else None
        objective = KStepDistill(null_label=meta["null_label"], k=p.k_steps, label_dropout=p.label_dropout,
                                 loss=p.loss, perceptual=lpips_on_decoded(ctx, meta, device),
                                 perceptual_weight=p.lpips_weight, guide=guide, guide_weight=p.guide_weight)
        sampler, extra = Euler(), {"k_steps": p.k_steps}
    metrics, copied = velocity_stage(
        ctx, p, meta, data=data, objective=objective, kind="distilled", sampler=sampler,
        init_from=source_dir if p.init_from_source else None, student=student_shape(p, source_dir),
        model_meta={**extra, "source": source_name, "chain": chain or "teacher", "per_segment": per_segment,
                    "one_step": not per_segment and p.k_steps == 1})
    return {**metrics, "tensors_from_source": float(copied)}


def main(argv: list[str] | None = None) -> int:
    return chain_stage_main("distill", spec, run, "the classic chain's student, distill_classic", argv)


if __name__ == "__main__":
    sys.exit(main())
