"""The project checkout: where it is, its git state, and what DVC knows of a stage's files.

The hashes are DVC's own (`Output.get_hash()`), the same values `dvc.lock` records, so an MLflow run
tagged with them can be joined to its producer and consumers from hashes alone.

A revision or an experiment other than the workspace has its outputs only in DVC's local cache (`dvc exp
run`, `dvc commit` and `dvc repro` all put them there, `dvc pull` brings them back): `output_file` reads a
file of a stage's output from there by the output's hash, as `dvc.lock` records it. `reflow compare` reads
the evaluations of both sides this way, so it needs no checkout of either.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) holding `dvc.yaml`."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d
    raise FileNotFoundError(f"no dvc.yaml in {here} or any parent: run from the project checkout")


def _git(root: Path, *args: str) -> str | None:
    """A git command's stripped output in `root`, or None when it fails (not a repo, no such revision)."""
    res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def git_state(root: Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the git checkout at `root`; (None, False) outside git."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None, False
    return commit, bool(_git(root, "status", "--porcelain", "--untracked-files=no"))


def _stage(root: Path, name: str):
    from dvc.repo import Repo

    repo = Repo(str(root))
    for stage in repo.index.stages:
        if stage.name == name:
            return stage
    raise KeyError(f"{root / 'dvc.yaml'}: no stage named {name!r}")


def _hashes(items) -> dict[str, str]:
    out = {}
    for item in items:
        info = item.get_hash()
        if info and isinstance(info.value, str):  # params deps hash to a dict: they are logged as params
            out[str(item.def_path)] = info.value
    return out


def stage_input_hashes(root: Path, name: str) -> dict[str, str]:
    """{dep path: DVC hash} for a stage's deps as they are now (what dvc.lock will record)."""
    return _hashes(_stage(root, name).deps)


def stage_output_hashes(root: Path, name: str) -> dict[str, str]:
    """{out path: DVC hash} for a stage's outs and metrics as they are now on disk."""
    return _hashes(_stage(root, name).outs)


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
