"""A NaN or inf loss stops training with the step named, and no output is touched.

(`tests/test_train.py::test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint` shows, in
process, that the last checkpoint before the bad step loads and resumes.)"""

import os
import subprocess
import sys

import pytest
import yaml

from storage.hashing import tree_sha256

pytestmark = pytest.mark.e2e


def test_diverging_training_stops_with_the_step_and_keeps_the_output(tmp_path, copy_pipeline):
    root = copy_pipeline(tmp_path / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["dit"].update(lr=1e30, grad_clip=None)  # the first update blows every weight up
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = tree_sha256(root / "artifacts/dit")
    res = subprocess.run([sys.executable, "-m", "stages.dit"], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "at step" in res.stderr and ("nan" in res.stderr or "inf" in res.stderr), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert tree_sha256(root / "artifacts/dit") == before
