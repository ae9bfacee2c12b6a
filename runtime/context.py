"""What a stage's `run(ctx)` is given (`StageContext`), the errors meant for the user, and the training-loop
settings of a params section."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

from imagedata.sources import DataError
from models.dit import ModelLoadError
from runtime.params import ParamsView, TrainParams
from runtime.spec import StageSpec, resolve_path
from storage import tracking
from storage.checkpoints import CheckpointError
from storage.layout import DatasetError
from training.loop import NonFiniteLossError, TrainConfig


@dataclass
class StageContext:
    """Everything `run()` may use: its params sections, paths, resume scratch and the tracker."""

    spec: StageSpec
    root: Path
    params: ParamsView
    scratch: Path
    inputs: dict[str, str]  # dep path -> DVC hash
    params_hash: str
    tracked: bool = True  # False when run() is called directly (tests, notebooks): nothing is logged
    rank: int = 0  # this process among the `world` that `accelerate launch` started (compute.num_processes)
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs and logs (rank 0; the only process unless launched)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process of this stage gets here (nothing to wait for in one process)."""
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def dep(self, role: str) -> Path:
        return self.root / resolve_path(self.spec.deps[role], self.params)

    def out(self, role: str) -> Path:
        return self.root / self.spec.outs[role]

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.tracked:
            tracking.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.tracked:
            tracking.log_artifact(path, artifact_path)

    def attrs(self) -> dict[str, str]:
        """What every artifact records about its making (zarr attrs, model meta)."""
        return {"producer": self.spec.name, "params_hash": self.params_hash}


class StageError(RuntimeError):
    """A failure with a message meant for the user (no traceback needed)."""


# Failures whose message says what is wrong and where: shown without a traceback (REFLOW_DEBUG=1 adds it).
USER_ERRORS = (StageError, DataError, DatasetError, CheckpointError, ModelLoadError, NonFiniteLossError)


def train_config(p: TrainParams, seed: int) -> TrainConfig:
    """The training-loop settings of a stage's params section (every such section extends TrainParams)."""
    return TrainConfig(steps=p.steps, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                       ema_decay=p.ema_decay, grad_clip=p.grad_clip, log_every=p.log_every,
                       checkpoint_every=p.checkpoint_every, seed=seed)


def failure_detail(exc: BaseException, ctx: StageContext) -> str | None:
    """What to tell the user about a failure whose message says what is wrong and where; None for a bug
    (whose traceback is the message)."""
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing {exc.filename or 'its output'} ({exc.strerror}). Earlier "
                "outputs are intact (every write goes to a temporary name first); free some space and rerun: the "
                f"stage resumes from its last checkpoint in {ctx.scratch}.")
    return None
