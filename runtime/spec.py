"""A stage as `dvc.yaml` sees it; kept import-light so `validate` starts in a fraction of a second."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    """A stage as `dvc.yaml` sees it. Paths are relative to the repo root."""

    name: str
    params: tuple[str, ...]
    deps: dict[str, str] = field(default_factory=dict)  # role -> path
    outs: dict[str, str] = field(default_factory=dict)  # role -> path
    metrics: str | None = None
    note: str | None = None  # why the stage is where it is: its comment in dvc.yaml
    # The section a stage's code reads -> the params.yaml section it is given instead: the text pipeline's copy
    # of a class stage reads `text_vae` where the class stage reads `vae` (runtime/text_chain.py).
    aliases: dict[str, str] = field(default_factory=dict)


_TEMPLATE = re.compile(r"\$\{([a-z_]+)\.([a-z_]+)\}")


def resolve_path(path: str, sections: Any) -> str:
    """Fill `${section.key}` in a dvc.yaml path the way DVC does, from an object with those sections."""
    return _TEMPLATE.sub(lambda m: str(getattr(getattr(sections, m.group(1)), m.group(2))), path)
