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
    fractions = {"reference": p.reference_fraction, "features": p.features_fraction, "floor": p.floor_fraction}
    return write_splits(ctx, images.images[keep], images.labels[keep], keep, images.class_names, fractions,
                        p.split_seed, {"resolution": p.resolution, "source": p.source})


def write_splits(ctx: StageContext, images: np.ndarray, labels: np.ndarray, source_index: np.ndarray,
                 class_names: list[str], fractions: dict[str, float], seed: int, attrs: dict,
                 also=None) -> dict:
    """The four splits of `images` into the stage's output, with `splits.json`, `classes.json` and a grid of the
    training images (one column per class); `also(folder)` adds files beside them. Returns the stage's metrics."""
    splits = split_dataset(labels, fractions, seed)
    attrs = {"class_names": class_names, "num_classes": len(class_names), **attrs}
    num_classes = len(class_names)
    manifest = {}
    out = ctx.out("data")
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            idx = splits[split]
            content_hash = write_dataset(
                tmp / f"{split}.zarr",
                {"images": images[idx], "labels": labels[idx], "source_index": source_index[idx]},
                kind="images", attrs={**attrs, "split": split}, **ctx.attrs(),
            )
            manifest[split] = {"rows": int(len(idx)), "content_hash": content_hash,
                               "per_class": np.bincount(labels[idx], minlength=num_classes).tolist()}
        atomic_write_json(tmp / "splits.json", {"seed": seed, "splits": manifest})
        atomic_write_json(tmp / "classes.json", class_names)
        train = splits["train"]
        shown, columns = class_grid_indices(labels[train], rows=8, seed=seed)
        save_grid(images[train[shown]], tmp / "grid.png", nrow=columns)
        if also is not None:
            also(tmp)
    ctx.log_artifact(out / "grid.png", "samples")
    return {f"{split}_images": manifest[split]["rows"] for split in SPLITS} | {"num_classes": num_classes}


def main() -> int:
    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
