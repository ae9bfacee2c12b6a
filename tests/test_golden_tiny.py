"""The tiny preset's results, pinned: every model's weights, every dataset and every measured number.

A change meant to leave behaviour alone (a refactor) must leave these digests alone. They are bitwise
properties of a CPU run, so they are compared only on the kind of machine that recorded them (the same torch
and numpy versions, CPU capability and architecture); elsewhere the test says so and skips. After a change
that is *meant* to alter results, record them again with `REFLOW_UPDATE_GOLDEN=1 make test` (or this file
alone) and say in the commit why they changed.

What is digested is content, not layout, so moving an artifact inside its stage's folder keeps its digest:
model weights by tensor name, dtype, shape and bytes; zarr datasets by their content hash; evaluations by the
per-seed values of every point, to 8 significant digits: the statistics' linear algebra runs on the BLAS kernel
the CPU model selects, and two x86-64 CPUs with the same torch capability were measured to differ by up to 7e-15
(relative) in FID and 2e-14 in KID, while weights and datasets stay bitwise.
"""

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e
GOLDEN = Path(__file__).parent / "golden" / "tiny.json"
# Datasets by what they are; a refactor that moves one lists its new path here, leaving its digest as it was.
DATASETS = {
    "train images": ["artifacts/prepare/train.zarr"],
    "features images": ["artifacts/prepare/features.zarr"],
    "reference images": ["artifacts/prepare/reference.zarr"],
    "floor images": ["artifacts/prepare/floor.zarr"],
    "latents": ["artifacts/extract/latents.zarr"],
    "teacher pairs": ["artifacts/teacher_pairs/pairs.zarr"],
    "reflow pairs 2": ["artifacts/reflow_pairs@2/pairs.zarr"],
    "seqrf pairs": ["artifacts/seqrf_pairs/pairs.zarr"],
    "distill pairs": ["artifacts/distill/pairs.zarr", "artifacts/distill_pairs/pairs.zarr"],
    "classic reflow pairs 2": ["artifacts/reflow_pairs@2_classic/pairs.zarr"],
    "classic distill pairs": ["artifacts/distill_pairs_classic/pairs.zarr"],
}
MODELS = ("vae", "dit", "fid_features", "rf1", "rf@2", "seqrf", "distill", "rf1_classic", "rf@2_classic",
          "distill_classic")
EVALUATIONS = ("dit", "rf1", "rf2", "seqrf", "distill", "rf1_classic", "rf2_classic", "distill_classic")


def fingerprint() -> dict[str, str]:
    import torch

    return {"torch": torch.__version__, "numpy": np.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def weights_digest(folder: Path) -> str:
    """sha256 over every tensor of every safetensors file under `folder`, by name, dtype, shape and bytes."""
    from safetensors.numpy import load_file

    h = hashlib.sha256()
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no weights under {folder}"
    for path in files:
        tensors = load_file(str(path))
        for name in sorted(tensors):
            t = np.ascontiguousarray(tensors[name])
            h.update(f"{name}|{t.dtype}|{t.shape}|".encode())
            h.update(t.tobytes())
    return h.hexdigest()


def _significant(value, digits: int = 8):
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _significant(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_significant(v, digits) for v in value]
    return value


def evaluation_digest(results: dict) -> str:
    points = [{"solver": p["solver"], "steps": p["steps"], "nfe": p["nfe"], "per_seed": _significant(p["per_seed"])}
              for p in results["points"]]
    return hashlib.sha256(json.dumps(points, sort_keys=True).encode()).hexdigest()


def digests(root: Path) -> dict[str, str]:
    from storage.datasets import open_dataset

    out = {}
    for name, candidates in DATASETS.items():
        path = next((root / c for c in candidates if (root / c).exists()), None)
        assert path is not None, f"{name}: none of {candidates} exists"
        out[f"dataset: {name}"] = open_dataset(path).attrs["content_hash"]
    for stage in MODELS:
        out[f"weights: {stage}"] = weights_digest(root / "artifacts" / stage)
    for key in EVALUATIONS:
        results = json.loads((root / "artifacts" / f"evaluate@{key}" / "results.json").read_text())
        out[f"evaluation: {key}"] = evaluation_digest(results)
    return out


def test_the_tiny_pipelines_results_are_the_pinned_ones(reproduced_pipeline):
    root, _ = reproduced_pipeline
    found = {"fingerprint": fingerprint(), "digests": digests(root)}
    if os.environ.get("REFLOW_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if golden["fingerprint"] != found["fingerprint"]:
        pytest.skip(f"digests were recorded on {golden['fingerprint']}, this is {found['fingerprint']}")
    changed = {k: (golden["digests"].get(k), v) for k, v in found["digests"].items() if golden["digests"].get(k) != v}
    assert not changed, ("results differ from tests/golden/tiny.json (REFLOW_UPDATE_GOLDEN=1 records them again "
                         f"after a change meant to alter them): {sorted(changed)}")
