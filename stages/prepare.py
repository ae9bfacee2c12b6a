"""`prepare`: images from the configured source to uint8 NCHW zarr datasets, split into train and reference.

The reference set is held out from every training stage: FID compares generated samples against it.
"""

from __future__ import annotations

import sys

import numpy as np

from reflow.data import load_source, save_grid, split_reference
from stages.common import StageContext, StageSpec, stage_main
from storage.atomic import atomic_dir, atomic_write_json
from storage.datasets import write_dataset

SPEC = StageSpec(
    name="prepare",
    params=("data",),
    deps={"validated": "artifacts/validate", "source": "${data.path}"},
    outs={"data": "artifacts/prepare"},
    metrics="metrics/prepare.json",
)


def run(ctx: StageContext) -> dict:
    p = ctx.params.data
    source_path = ctx.root / p.path
    images = load_source(p.source, str(source_path), p.resolution)
    keep = np.arange(len(images.labels))
    if p.max_images is not None and p.max_images < len(keep):
        # A seeded subset, stratified by the split below, for quick runs on a large source.
        keep = np.sort(np.random.default_rng(p.split_seed).permutation(len(keep))[: p.max_images])
    labels = images.labels[keep]
    train_idx, ref_idx = split_reference(labels, p.reference_fraction, p.split_seed)
    attrs = {"class_names": images.class_names, "num_classes": len(images.class_names),
             "resolution": p.resolution, "source": p.source}
    out = ctx.out("data")
    with atomic_dir(out) as tmp:
        for split, idx in (("train", train_idx), ("reference", ref_idx)):
            write_dataset(
                tmp / f"{split}.zarr",
                {"images": images.images[keep[idx]], "labels": labels[idx]},
                kind="images", attrs={**attrs, "split": split}, **ctx.attrs(),
            )
        atomic_write_json(tmp / "classes.json", images.class_names)
        save_grid(images.images[keep[train_idx[:64]]], tmp / "grid.png", nrow=8)
    ctx.log_artifact(out / "grid.png", "samples")
    return {"train_images": int(len(train_idx)), "reference_images": int(len(ref_idx)),
            "num_classes": len(images.class_names)}


def main() -> int:
    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
