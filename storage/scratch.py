"""Scratch directories for resumable stages.

DVC deletes a stage's outputs when the stage starts, so partial progress (training checkpoints,
finished generation shards) lives outside them, in ``<root>/.reflow/scratch/``. Each directory is
keyed by the stage name plus a hash of its params and input hashes: a rerun with the same inputs
resumes, and anything else gets a fresh directory.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from storage.atomic import atomic_write_text
from storage.hashing import canonical_json, params_hash

__all__ = ["KEY_FILE", "SCRATCH_SUBDIR", "clear_scratch", "scratch_dir"]

SCRATCH_SUBDIR = Path(".reflow") / "scratch"
KEY_FILE = "key.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _safe_stage(stage: str) -> str:
    """A stage name as one path component: ``rf@2`` -> ``rf_2``, ``a/b`` -> ``a_b``."""
    safe = _UNSAFE.sub("_", stage).lstrip(".")
    if not safe:
        raise ValueError(f"scratch: stage name {stage!r} gives an empty directory name")
    return safe


def scratch_dir(root: str | Path, stage: str, key: dict[str, Any]) -> Path:
    """``<root>/.reflow/scratch/<stage>-<params_hash(key)>/``, created if missing, with ``key.json``.

    ``key`` is e.g. ``{"params": {...}, "inputs": {path: hash}}``; ``key.json`` records it so a
    human can tell what the directory belongs to.
    """
    path = Path(root) / SCRATCH_SUBDIR / f"{_safe_stage(stage)}-{params_hash(key)}"
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json.loads(canonical_json({"stage": stage, "key": key})), indent=2, sort_keys=True) + "\n"
    key_file = path / KEY_FILE
    if not key_file.is_file() or key_file.read_text(encoding="utf-8") != text:
        atomic_write_text(key_file, text)
    return path


def clear_scratch(path: str | Path) -> None:
    """Remove a scratch directory (after the stage's final output is in place); missing is fine.

    Refuses anything that is not directly inside a ``.reflow/scratch`` directory, so a wrong
    argument cannot delete a repository.
    """
    path = Path(path)
    parent = path.resolve().parent
    if (parent.parent.name, parent.name) != SCRATCH_SUBDIR.parts:
        raise ValueError(f"clear_scratch: {path} is not inside a {SCRATCH_SUBDIR} directory; refusing to delete it")
    if path.exists():
        shutil.rmtree(path)
