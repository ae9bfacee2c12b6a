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

from measure.fid import CLASSIFIER_SUBFOLDER, INCEPTION, FeatureNet, fid_features
from measure.intervals import MEASURES, Reference, measure_sets
from measure.reference import extractor_entry, floor_draws, protocol_record
from runtime.context import StageContext, StageError
from runtime.main import pipeline_stage_main
from runtime.spec import StageSpec
from storage.atomic import atomic_dir, atomic_write_json, atomic_write_npz
from storage.datasets import open_dataset

SPEC = StageSpec(
    name="fid_reference",
    params=("eval",),
    deps={"data": "artifacts/prepare", "features": "artifacts/fid_features"},
    outs={"reference": "artifacts/fid_reference"},
    metrics="metrics/fid_reference.json",
)


def run(ctx: StageContext) -> dict:
    p = ctx.params.eval
    judge = FeatureNet.from_pretrained(ctx.dep("features") / CLASSIFIER_SUBFOLDER).eval()
    extractor = extractor_entry(ctx, judge)
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
    floor_labels = floor_set.load("labels")
    n = min(p.num_samples, len(floor_labels))
    floor = measure_sets(floor_draws(judge, floor_set.load("images"), floor_labels, n=n, draws=p.floor_draws,
                                     extractor=extractor["name"], weights=weights), reference, draws_overlap=True)
    protocol = protocol_record(ctx, extractor, reference, reference_set.attrs["content_hash"], splits,
                               pool=len(floor_labels), n=n)
    summary = {name: {**m.interval().as_dict(), "per_draw": list(m.per_seed.values())} for name, m in floor.items()}
    with atomic_dir(ctx.out("reference")) as tmp:
        atomic_write_npz(tmp / "reference.npz",
                         {"features": reference_features, "labels": reference_set.load("labels")})
        atomic_write_npz(tmp / "floor.npz", {k: v for name, m in floor.items() for k, v in m.to_arrays(name).items()})
        atomic_write_json(tmp / "protocol.json", protocol)
        atomic_write_json(tmp / "floor.json", summary)
    if n < p.num_samples:
        print(f"fid_reference: the floor split has {len(floor_labels)} images, fewer than eval.num_samples="
              f"{p.num_samples}: the floor is measured at {n} and reads high against the models (raise "
              "data.floor_fraction or lower eval.num_samples)", file=sys.stderr)
    return {f"floor_{name}{suffix}": summary[name][key]
            for suffix, key in (("", "estimate"), ("_ci_low", "low"), ("_ci_high", "high")) for name in MEASURES}


def main(argv: list[str] | None = None) -> int:
    return pipeline_stage_main(SPEC, run, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
