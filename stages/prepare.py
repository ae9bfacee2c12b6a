"""`prepare`: images from the configured source to uint8 NCHW zarr datasets, in four disjoint splits.

- `train`: what the VAE, the DiT teacher and (through them) every generator learn from;
- `features`: what the in-project FID feature extractor is fitted on;
- `reference`: the FID reference, never fitted on by anything;
- `floor`: real images from none of the above, measured like a model to give the real-data floor.

Each split is class-stratified and records the source row of every image (`source_index`), and
`splits.json` holds their sizes, per-class counts and content hashes: the stored protocol that shows the
splits are disjoint (docs/evaluation.md).
"""

from __future__ import annotations

import sys

import numpy as np

from imagedata.grids import save_grid
from imagedata.sources import load_source
from imagedata.splits import class_grid_indices, split_dataset
from runtime.context import StageContext
from runtime.main import stage_main
from runtime.spec import StageSpec
from storage.atomic import atomic_dir, atomic_write_json
from storage.datasets import write_dataset

SPLITS = ("train", "features", "reference", "floor")

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
    splits = split_dataset(labels, {"reference": p.reference_fraction, "features": p.features_fraction,
                                    "floor": p.floor_fraction}, p.split_seed)
    attrs = {"class_names": images.class_names, "num_classes": len(images.class_names),
             "resolution": p.resolution, "source": p.source}
    num_classes = len(images.class_names)
    manifest = {}
    out = ctx.out("data")
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            idx = splits[split]
            content_hash = write_dataset(
                tmp / f"{split}.zarr",
                {"images": images.images[keep[idx]], "labels": labels[idx], "source_index": keep[idx]},
                kind="images", attrs={**attrs, "split": split}, **ctx.attrs(),
            )
            manifest[split] = {"rows": int(len(idx)), "content_hash": content_hash,
                               "per_class": np.bincount(labels[idx], minlength=num_classes).tolist()}
        atomic_write_json(tmp / "splits.json", {"seed": p.split_seed, "splits": manifest})
        atomic_write_json(tmp / "classes.json", images.class_names)
        train = splits["train"]
        shown, columns = class_grid_indices(labels[train], rows=8, seed=p.split_seed)
        save_grid(images.images[keep[train[shown]]], tmp / "grid.png", nrow=columns)
    ctx.log_artifact(out / "grid.png", "samples")
    return {f"{split}_images": manifest[split]["rows"] for split in SPLITS} | {"num_classes": num_classes}


def main() -> int:
    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
