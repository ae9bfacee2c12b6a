"""Model checkpoints (diffusers format) and training resume state.

* Models: ``save_pretrained(safe_serialization=True)`` (safetensors + config.json) plus our own
  ``reflow.json`` metadata, written as one directory that appears atomically.
* Resume state: a ``torch.save`` file replaced atomically, with a sha256 sidecar; loading uses
  ``weights_only=True`` so a resume file can never execute code, and any damage is reported as
  :class:`CheckpointError` instead of a confusing unpickling error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from storage.atomic import atomic_dir, atomic_write, atomic_write_json, atomic_write_text
from storage.faults import crash_point
from storage.hashing import file_sha256

__all__ = ["META_FILE", "CheckpointError", "load_state", "read_meta", "save_model", "save_state"]

META_FILE = "reflow.json"


class CheckpointError(ValueError):
    """A checkpoint or resume state is missing, damaged or unreadable."""


def save_model(model: Any, path: str | Path, *, meta: dict[str, Any]) -> None:
    """Save a diffusers ``ModelMixin`` to ``path`` plus ``reflow.json`` (= ``meta``), atomically.

    ``path`` is replaced as a whole: readers see the complete old or the complete new checkpoint.
    """
    path = Path(path)
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: meta is not JSON-serialisable ({e})") from e
    path.parent.mkdir(parents=True, exist_ok=True)  # artifacts/<stage>/ around its model folder
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / META_FILE, meta)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``reflow.json`` metadata of a checkpoint directory."""
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(
            f"checkpoint {path}: {META_FILE} missing; expected a directory written by save_model"
        ) from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: {META_FILE} holds {type(meta).__name__}, expected a JSON object")
    return meta


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save training resume state, then its sha256 sidecar ``<path>.sha256``.

    The state may hold tensors, (nested) dicts/lists of them, ints, floats, strings and bools:
    exactly what ``torch.load(weights_only=True)`` accepts (model/EMA/optimizer state_dicts,
    ``torch.get_rng_state()``...). A crash between the two renames leaves a new state file with
    the old sidecar, which :func:`load_state` reports as a checksum mismatch, never as valid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = ""

    def checksum(tmp: Path) -> None:  # the new file is complete and fsynced, not yet renamed
        nonlocal digest
        digest = file_sha256(tmp)
        crash_point("checkpoint_write")

    atomic_write(path, lambda f: torch.save(state, f), before_replace=checksum)
    atomic_write_text(_sidecar(path), f"{digest}  {path.name}\n")


def load_state(path: str | Path) -> dict[str, Any]:
    """Load state saved by :func:`save_state`, verifying its checksum; CPU tensors, no code execution."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"resume state {path}: file missing")
    try:
        expected = sidecar.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError) as e:
        raise CheckpointError(
            f"resume state {path}: checksum sidecar {sidecar.name} missing or empty; expected one written by save_state"
        ) from e
    found = file_sha256(path)
    if found != expected:
        raise CheckpointError(
            f"resume state {path}: checksum mismatch (file sha256 {found}, sidecar says {expected}); "
            "the file is truncated, altered or from an interrupted save"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "unusable"
        raise CheckpointError(f"resume state {path}: cannot be loaded ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"resume state {path}: holds {type(state).__name__}, expected a dict")
    return state
