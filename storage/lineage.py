"""Where an artifact came from: DVC's hashes of a stage's inputs and outputs, and the git state.

The hashes are DVC's own (`Output.get_hash()`), the same values `dvc.lock` records, so an MLflow run
tagged with them can be joined to its producer and consumers from hashes alone.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def find_repo_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) holding `dvc.yaml`."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d
    raise FileNotFoundError(f"no dvc.yaml in {here} or any parent: run from the project checkout")


def git_state(root: Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the git checkout at `root`; (None, False) outside git."""
    def git(*args: str) -> str | None:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, False
    return commit, bool(git("status", "--porcelain", "--untracked-files=no"))


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


def lock_entries(root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """{stage: {"deps": {path: hash}, "outs": {path: hash}}} as recorded in `dvc.lock`."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    out: dict[str, dict[str, dict[str, str]]] = {}
    for name, entry in (data.get("stages") or {}).items():
        out[name] = {
            kind: {d["path"]: d.get("md5") or d.get("hash", "") for d in entry.get(kind, [])}
            for kind in ("deps", "outs")
        }
    return out
