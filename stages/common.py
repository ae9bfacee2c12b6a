"""What every stage shares: its declaration, and the thin `main()` around its pure `run()`.

A stage module declares a `SPEC` (name, params sections, deps, outs, metrics file) that mirrors its
entry in `dvc.yaml` (a test keeps the two equal) and a `run(ctx) -> metrics`. `stage_main` does the
rest, in an order chosen so that nothing is touched before the params are known to be valid:

  1. validate the whole `params.yaml` (exit 2 with every problem listed);
  2. hash the inputs with DVC and pick the scratch directory (resume state) for params + inputs;
  3. open (or resume) the stage's MLflow run with its lineage tags;
  4. `run(ctx)`; outputs are written atomically by the stage through `storage`;
  5. write the metrics file, tag the run with DVC's hashes of the outputs, clear the scratch.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reflow.data import DataError  # noqa: E402
from reflow.models import ModelLoadError  # noqa: E402
from reflow.train import NonFiniteLossError, TrainConfig  # noqa: E402
from stages.params import Params, ParamsError, ParamsView, TrainParams, load_params  # noqa: E402
from stages.spec import StageSpec, resolve_path  # noqa: E402
from storage import lineage, tracking  # noqa: E402
from storage.atomic import atomic_write_json  # noqa: E402
from storage.checkpoints import CheckpointError  # noqa: E402
from storage.datasets import DatasetError  # noqa: E402
from storage.hashing import params_hash  # noqa: E402
from storage.scratch import clear_scratch, scratch_dir  # noqa: E402


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


def generation_device(compute: Any) -> str:
    """Where sampling and pair generation run: CUDA when asked for (or `auto`) and present, else the CPU."""
    import torch

    return "cuda" if compute.device != "cpu" and torch.cuda.is_available() else "cpu"


def set_threads(params: ParamsView) -> None:
    import torch

    n = params.compute.num_threads if "compute" in params._sections else None
    torch.set_num_threads(n or os.cpu_count() or 1)


def make_context(spec: StageSpec, root: Path, params: Params, tracked: bool = True) -> StageContext:
    """Resolve a stage's params view, input hashes and scratch dir in `root`."""
    view = ParamsView(params, spec.params)
    try:
        inputs = lineage.stage_input_hashes(root, spec.name)
    except KeyError:
        inputs = {}  # not declared in this dvc.yaml (a notebook or a test calling run() directly)
    section_values = view.as_dict()
    key = {"params": section_values, "inputs": inputs}
    return StageContext(
        spec=spec, root=root, params=view, scratch=scratch_dir(root, spec.name, key), inputs=inputs,
        params_hash=params_hash(section_values), tracked=tracked,
    )


def stage_main(spec: StageSpec, run: Callable[[StageContext], dict[str, Any]]) -> int:
    """Entry point of `python -m stages.<name>`: returns the process exit code."""
    root = lineage.find_repo_root()
    try:
        params = load_params(root / "params.yaml")
    except ParamsError as exc:
        print(f"error: stage {spec.name!r} did not start, no output was touched.\n{exc}", file=sys.stderr)
        return 2
    ctx = make_context(spec, root, params)
    set_threads(ctx.params)
    tracking.configure(params.tracking.uri, params.tracking.experiment, root)
    commit, dirty = lineage.git_state(root)
    tags = {"params_hash": ctx.params_hash, "git_commit": commit or "none", "git_dirty": str(dirty).lower(),
            "status": "executed"}
    if os.environ.get(tracking.ENV_PIPELINE_RUN):
        tags["pipeline_run_id"] = os.environ[tracking.ENV_PIPELINE_RUN]
    for tag, var in (("dvc_exp_name", "DVC_EXP_NAME"), ("dvc_exp_baseline", "DVC_EXP_BASELINE_REV")):
        if os.environ.get(var):  # set by `dvc exp run`: the experiment this run belongs to
            tags[tag] = os.environ[var]
    try:
        with tracking.stage_run(stage=spec.name, scratch=ctx.scratch, params=ctx.params.as_dict(),
                                tags=tags, inputs=ctx.inputs):
            metrics = run(ctx)
            if spec.metrics:
                (root / spec.metrics).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(root / spec.metrics, metrics)
            tracking.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
            outputs = lineage.stage_output_hashes(root, spec.name)
            mlflow_tags = {tracking.path_tag("output", path): h for path, h in outputs.items()}
            tracking.set_tags({k.removeprefix(tracking.TAG): v for k, v in mlflow_tags.items()})
    except USER_ERRORS as exc:
        print(f"error: stage {spec.name!r} failed: {exc}", file=sys.stderr)
        if os.environ.get("REFLOW_DEBUG"):
            traceback.print_exc()
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: stage {spec.name!r} failed: no space left on the device writing "
              f"{exc.filename or 'its output'} ({exc.strerror}). Earlier outputs are intact (every write goes "
              "to a temporary name first); free some space and rerun: the stage resumes from its last "
              f"checkpoint in {ctx.scratch}.", file=sys.stderr)
        return 1
    clear_scratch(ctx.scratch)
    return 0
