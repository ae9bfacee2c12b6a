"""`fid_features`: the in-project FID feature extractor and class-consistency judge.

A small classifier (`reflow.fid.FeatureNet`) trained on part of the reference images; the rest measures
its accuracy. The content hash of its weights names it wherever FID numbers are stored, so numbers made with
different extractors are never mistaken for comparable ones. With `eval.inception_weights` set, FID uses
Inception instead, and this classifier still judges whether conditional samples show their class.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from reflow.data import split_reference
from reflow.fid import FeatureNet, classifier_loss, classify
from reflow.train import make_accelerator, train
from stages.common import StageContext, StageSpec, stage_main, train_config
from storage.checkpoints import save_model
from storage.datasets import open_dataset
from storage.resume import FileResume

SPEC = StageSpec(
    name="fid_features",
    params=("compute", "fid_features"),
    deps={"data": "artifacts/prepare"},
    outs={"model": "artifacts/fid_features"},
    metrics="metrics/fid_features.json",
)


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.fid_features, ctx.params.compute
    reference = open_dataset(ctx.dep("data") / "reference.zarr", kind="images")
    images, labels = reference.load("images"), reference.load("labels")
    num_classes = int(reference.attrs["num_classes"])
    fit_idx, held_idx = split_reference(labels, p.holdout_fraction, seed=compute.seed)

    torch.manual_seed(compute.seed)
    net = FeatureNet(num_classes=num_classes, resolution=images.shape[-1], width=p.width, feature_dim=p.feature_dim)
    cfg = train_config(p, compute.seed)
    data = {"images": torch.from_numpy(images[fit_idx]), "labels": torch.from_numpy(labels[fit_idx])}
    result = train(net, classifier_loss, data, cfg, make_accelerator(compute.device, compute.mixed_precision),
                   resume=FileResume(ctx.scratch / "train_state.pt"), log=ctx.log_metrics, desc="fid_features")
    if not ctx.is_main:  # every process trained its share of each batch; the main one measures and saves
        return {}
    net = result.ema.to("cpu")
    accuracy = float((classify(net, images[held_idx]).numpy() == labels[held_idx]).mean())
    chance = float(np.bincount(labels[held_idx]).max() / len(held_idx))

    save_model(net, ctx.out("model"), meta={**ctx.attrs(), "kind": "fid_features", "held_out_accuracy": accuracy,
                               "held_out_images": len(held_idx), "fit_images": len(fit_idx)})
    return {"held_out_accuracy": accuracy, "majority_class_accuracy": chance, "train_loss": result.last_loss}


def main() -> int:
    return stage_main(SPEC, run, distributed=True)


if __name__ == "__main__":
    sys.exit(main())
