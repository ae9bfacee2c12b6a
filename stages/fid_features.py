"""`fid_features`: the in-project FID feature extractor and class-consistency judge.

A small classifier (`measure.fid.FeatureNet`) fitted on the `features` split of `prepare`, which neither the
generators nor the FID reference use (an extractor fitted on the reference would make the reference's features
in-sample and every generated set's out-of-sample); its accuracy is measured on the `floor` split, which it
never saw. The content hash of its weights names it wherever FID numbers are stored, so numbers made with
different extractors are never mistaken for comparable ones. With `eval.inception_weights` set, FID uses
Inception instead, and this classifier still judges whether conditional samples show their class.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from measure.fid import CLASSIFIER_SUBFOLDER, FeatureNet, classifier_loss, classify
from runtime.context import StageContext, train_config
from runtime.main import pipeline_stage_main
from runtime.spec import StageSpec
from storage.checkpoints import save_model
from storage.datasets import open_dataset
from storage.faults import crash_point
from storage.resume import FileResume
from training.loop import make_accelerator, train

SPEC = StageSpec(
    name="fid_features",
    params=("compute", "fid_features"),
    deps={"data": "artifacts/prepare"},
    outs={"model": "artifacts/fid_features"},
    metrics="metrics/fid_features.json",
)


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.fid_features, ctx.params.compute
    fit = open_dataset(ctx.dep("data") / "features.zarr", kind="images")
    held = open_dataset(ctx.dep("data") / "floor.zarr", kind="images")
    images, labels = fit.load("images"), fit.load("labels")
    held_images, held_labels = held.load("images"), held.load("labels")
    num_classes = int(fit.attrs["num_classes"])

    torch.manual_seed(compute.seed)
    net = FeatureNet(num_classes=num_classes, resolution=images.shape[-1], width=p.width, feature_dim=p.feature_dim)
    cfg = train_config(p, compute.seed)
    data = {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}
    result = train(net, classifier_loss, data, cfg, make_accelerator(compute.device, compute.mixed_precision),
                   resume=FileResume(ctx.scratch / "train_state.pt"), log=ctx.log_metrics, desc="fid_features",
                   crash_point=crash_point)
    if not ctx.is_main:  # every process trained its share of each batch; the main one measures and saves
        return {}
    net = result.ema.to("cpu")
    accuracy = float((classify(net, held_images).numpy() == held_labels).mean())
    chance = float(np.bincount(held_labels).max() / len(held_labels))

    save_model(net, ctx.out("model") / CLASSIFIER_SUBFOLDER, meta={
        **ctx.attrs(), "kind": "fid_features", "held_out_accuracy": accuracy, "held_out_images": len(held_labels),
        "held_out_split": {"split": "floor", "content_hash": held.attrs["content_hash"]},
        "fit_images": len(labels), "fit_split": {"split": "features", "content_hash": fit.attrs["content_hash"]}})
    return {"held_out_accuracy": accuracy, "majority_class_accuracy": chance, "train_loss": result.last_loss}


def main(argv: list[str] | None = None) -> int:
    return pipeline_stage_main(SPEC, run, distributed=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
