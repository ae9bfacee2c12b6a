"""Stable hashes for params, keys and files.

Params hashes name scratch directories and are recorded in artifacts and MLflow, so the JSON form
they are computed from must not depend on dict order, whitespace or the Python version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePath
from typing import Any

import numpy as np

_READ_BLOCK = 1 << 20


def _json_default(obj: Any) -> Any:
    """Map the few non-JSON types that show up in params to a stable JSON form."""
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"canonical_json: cannot serialise {type(obj).__name__}: {obj!r}")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace; floats use ``repr`` (shortest round-trip form).

    Paths become POSIX strings, numpy scalars/arrays plain numbers/lists, sets sorted lists.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def params_hash(obj: Any) -> str:
    """First 16 hex chars of the sha256 of :func:`canonical_json` (64 bits: plenty for naming)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """Full sha256 hex digest of a file, read in 1 MiB blocks so memory stays flat."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: str | Path) -> str:
    """sha256 over every file under `root` (relative path and content, in sorted order): equal exactly when
    two folders hold the same files with the same bytes. How a resumed output is compared with an
    uninterrupted one."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()
