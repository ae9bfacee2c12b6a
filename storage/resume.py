"""Training state on disk for `reflow.train.train`: one atomically replaced file in the scratch dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.checkpoints import load_state, save_state


class FileResume:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        return load_state(self.path) if self.path.exists() else None

    def save(self, state: dict[str, Any]) -> None:
        save_state(self.path, state)
