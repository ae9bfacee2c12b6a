"""A stage as `dvc.yaml` sees it; kept import-light so `validate` starts in a fraction of a second."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageSpec:
    """A stage as `dvc.yaml` sees it. Paths are relative to the repo root."""

    name: str
    params: tuple[str, ...]
    deps: dict[str, str] = field(default_factory=dict)  # role -> path
    outs: dict[str, str] = field(default_factory=dict)  # role -> path
    metrics: str | None = None
