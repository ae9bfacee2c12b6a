"""`fid_reference`: the FID reference's features and the real-data floor, once for every evaluation.

The features of the `reference` split (the in-project extractor, or Inception when `eval.inception_weights`
is given) are stored with the protocol every `evaluate@<model>` measures on: which extractor and its hash,
the four splits of `prepare` with their sizes and content hashes, the sample count. The floor is what real
images score on that protocol: `eval.floor_draws` class-stratified draws of `eval.num_samples` images from
the `floor` split, which no generator, extractor or reference used, each measured like one seed of a model.
The draws share images when the split is small, so the floor's interval comes from split halves of each
draw, and does not shrink with their number (docs/evaluation.md).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from imagedata.splits import stratified_sample
from measure.fid import INCEPTION, FeatureNet, classify, fid_features, register_classifier
from measure.intervals import MEASURES, SMALL_SET_MAX, Reference, SeedSet, measure_sets
from runtime.context import StageContext, StageError
from runtime.main import stage_main
from runtime.spec import StageSpec
from storage.atomic import atomic_dir, atomic_write_json, atomic_write_npz
from storage.datasets import open_dataset
from storage.hashing import file_sha256

SPEC = StageSpec(
    name="fid_reference",
    params=("eval",),
    deps={"data": "artifacts/prepare", "features": "artifacts/fid_features"},
    outs={"reference": "artifacts/fid_reference"},
    metrics="metrics/fid_reference.json",
)


def extractor_setup(ctx: StageContext, judge: FeatureNet) -> dict:
    """The protocol's extractor entry; Inception when its weights are given, else the classifier."""
    p = ctx.params.eval
    if p.inception_weights:
        weights = ctx.root / p.inception_weights
        if not weights.is_file():
            raise StageError(f"eval.inception_weights: {weights} is not a file; expected torch-fidelity's "
                             "weights-inception-2015-12-05-6726825d.pth (nothing is downloaded)")
        return {"name": INCEPTION, "sha256": file_sha256(weights), "path": str(weights),
                "standard": "Inception-v3 (TF-compatible weights): the standard FID"}
    digest = file_sha256(ctx.dep("features") / "diffusion_pytorch_model.safetensors")
    register_classifier(judge, digest)
    return {"name": f"reflow-classifier-{digest[:16]}", "sha256": digest, "path": ctx.spec.deps["features"],
            "standard": "in-project classifier: comparable only with runs of the same extractor sha256"}


def run(ctx: StageContext) -> dict:
    p = ctx.params.eval
    judge = FeatureNet.from_pretrained(ctx.dep("features")).eval()
    extractor = extractor_setup(ctx, judge)
    weights = extractor.get("path") if extractor["name"] == INCEPTION else None
    splits = json.loads((ctx.dep("data") / "splits.json").read_text())["splits"]
    need = 2 * (p.prc_neighborhood + 2)  # precision/recall on half of a set need k + 2 points
    for split, key in (("reference", "reference_fraction"), ("floor", "floor_fraction")):
        if splits[split]["rows"] < need:
            raise StageError(f"the {split} split has {splits[split]['rows']} images; measuring needs at least "
                             f"{need} (eval.prc_neighborhood={p.prc_neighborhood}): raise data.{key}")
    reference_set = open_dataset(ctx.dep("data") / "reference.zarr", kind="images")
    # Stored as float32 (what evaluate@ reads back), so the floor is measured on exactly those features.
    reference_features = fid_features(reference_set.load("images"), extractor=extractor["name"],
                                      inception_weights=weights).astype(np.float32)
    reference = Reference(reference_features, reference_set.load("labels"), splits=p.reference_splits,
                          neighbourhood=p.prc_neighborhood,
                          content_hash=f"{reference_set.attrs['content_hash'][:16]}-{extractor['sha256'][:16]}")

    floor_set = open_dataset(ctx.dep("data") / "floor.zarr", kind="images")
    floor_images, floor_labels = floor_set.load("images"), floor_set.load("labels")
    n = min(p.num_samples, len(floor_labels))
    draws = []
    for d in range(p.floor_draws):
        idx = stratified_sample(floor_labels, n, seed=d)
        images = floor_images[idx]
        correct = classify(judge, images).numpy() == floor_labels[idx]
        draws.append(SeedSet(d, fid_features(images, extractor=extractor["name"], inception_weights=weights),
                             correct, floor_labels[idx]))
    floor = measure_sets(draws, reference, draws_overlap=True)

    protocol = {
        "extractor": extractor,
        "reference": {"path": f"{ctx.spec.deps['data']}/reference.zarr", "images": len(reference.features),
                      "content_hash": reference_set.attrs["content_hash"], "pairing": reference.content_hash},
        "splits": splits,
        "samples_per_seed": p.num_samples,
        "floor": {"split": "floor", "pool": len(floor_labels), "images_per_draw": n, "draws": p.floor_draws,
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
    summary = {name: {**m.interval().as_dict(), "per_draw": list(m.per_seed.values())} for name, m in floor.items()}
    out = ctx.out("reference")
    with atomic_dir(out) as tmp:
        atomic_write_npz(tmp / "reference.npz",
                         {"features": reference_features, "labels": reference_set.load("labels")})
        atomic_write_npz(tmp / "floor.npz", {k: v for name, m in floor.items() for k, v in m.to_arrays(name).items()})
        atomic_write_json(tmp / "protocol.json", protocol)
        atomic_write_json(tmp / "floor.json", summary)
    if n < p.num_samples:
        print(f"fid_reference: the floor split has {len(floor_labels)} images, fewer than eval.num_samples="
              f"{p.num_samples}: the floor is measured at {n} and reads high against the models (raise "
              "data.floor_fraction or lower eval.num_samples)", file=sys.stderr)
    return ({f"floor_{name}": summary[name]["estimate"] for name in MEASURES}
            | {f"floor_{name}_ci_low": summary[name]["low"] for name in MEASURES}
            | {f"floor_{name}_ci_high": summary[name]["high"] for name in MEASURES})


def main() -> int:
    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
