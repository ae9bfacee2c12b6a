"""The reference every evaluation measures against: the extractor's entry, the real-data floor's draws, and
the protocol record that `fid_reference` stores beside the reference features."""

from __future__ import annotations

import numpy as np

from imagedata.splits import stratified_sample
from measure.fid import CLASSIFIER_SUBFOLDER, INCEPTION, FeatureNet, classify, fid_features, register_classifier
from measure.intervals import SMALL_SET_MAX, Reference, SeedSet
from runtime.context import StageContext, StageError
from storage.hashing import file_sha256


def extractor_entry(ctx: StageContext, judge: FeatureNet) -> dict:
    """The protocol's extractor entry; Inception when its weights are given, else the classifier."""
    p = ctx.params.eval
    if p.inception_weights:
        weights = ctx.root / p.inception_weights
        if not weights.is_file():
            raise StageError(f"eval.inception_weights: {weights} is not a file; expected torch-fidelity's "
                             "weights-inception-2015-12-05-6726825d.pth (nothing is downloaded)")
        return {"name": INCEPTION, "sha256": file_sha256(weights), "path": str(weights),
                "standard": "Inception-v3 (TF-compatible weights): the standard FID"}
    digest = file_sha256(ctx.dep("features") / CLASSIFIER_SUBFOLDER / "diffusion_pytorch_model.safetensors")
    register_classifier(judge, digest)
    return {"name": f"reflow-classifier-{digest[:16]}", "sha256": digest, "path": ctx.spec.deps["features"],
            "standard": "in-project classifier: comparable only with runs of the same extractor sha256"}


def floor_draws(judge: FeatureNet, images: np.ndarray, labels: np.ndarray, *, n: int, draws: int, extractor: str,
                weights: str | None) -> list[SeedSet]:
    """`draws` class-stratified draws of `n` real images, each measured like one seed of a model."""
    sets = []
    for d in range(draws):
        idx = stratified_sample(labels, n, seed=d)
        correct = classify(judge, images[idx]).numpy() == labels[idx]
        sets.append(SeedSet(d, fid_features(images[idx], extractor=extractor, inception_weights=weights), correct,
                            labels[idx]))
    return sets


def protocol_record(ctx: StageContext, extractor: dict, reference: Reference, reference_hash: str, splits: dict,
                    *, pool: int, n: int) -> dict:
    """What `protocol.json` says every evaluation on this reference measures, and how."""
    p = ctx.params.eval
    return {
        "extractor": extractor,
        "reference": {"path": f"{ctx.spec.deps['data']}/reference.zarr", "images": len(reference.features),
                      "content_hash": reference_hash, "pairing": reference.content_hash},
        "splits": splits,
        "samples_per_seed": p.num_samples,
        "floor": {"split": "floor", "pool": pool, "images_per_draw": n, "draws": p.floor_draws,
                  "stratified": "each class in proportion to its share of the floor split",
                  "comparable": n == p.num_samples},
        "intervals": "95%: estimate ± t · sqrt(spread over seeds / S + split-half variance of the reference), "
                     f"{p.reference_splits} class-stratified splits (measure/intervals.py, docs/evaluation.md)",
        "kid": ("unbiased MMD^2 over all samples and all reference images, cubic polynomial kernel"
                if max(p.num_samples, len(reference.features)) ** 2 <= SMALL_SET_MAX else
                "torch-fidelity's KID: 100 subsets of "
                f"{min(p.num_samples, len(reference.features), 1000)} samples and reference images"),
        "prc_neighborhood": p.prc_neighborhood,
    }
