"""Files of a stage's output read from DVC's local cache by the output's hash, as `dvc.lock` records it.

A revision or an experiment other than the workspace has its outputs only in the cache (`dvc exp run`,
`dvc commit` and `dvc repro` all put them there, `dvc pull` brings them back). `reflow compare` reads the
evaluations of both sides this way, so it needs no checkout of either.
"""

from __future__ import annotations

import json
from pathlib import Path


def _cache(root: Path):
    from dvc.repo import Repo

    return Repo(str(root)).cache.local


def output_file(root: Path, out_hash: str, relpath: str) -> bytes | None:
    """The bytes of `relpath` inside the directory output whose DVC hash is `out_hash` (`<md5>.dir`), or
    None when the cache does not hold it (run `dvc pull` or `dvc repro` for that revision)."""
    if not out_hash.endswith(".dir"):
        return None
    cache = _cache(root)
    manifest = Path(cache.oid_to_path(out_hash))
    if not manifest.is_file():
        return None
    entry = next((e for e in json.loads(manifest.read_text()) if e["relpath"] == relpath), None)
    if entry is None:
        return None
    path = Path(cache.oid_to_path(entry["md5"]))
    return path.read_bytes() if path.is_file() else None
