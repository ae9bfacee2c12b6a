"""The thin `main()` around a stage's pure `run()`.

A stage module declares a `SPEC` (name, params sections, deps, outs, metrics file), from which
`dvc.yaml` is rendered (`reflow dvc-yaml`), and a `run(ctx) -> metrics`. `stage_main` does the
rest, in an order chosen so that nothing is touched before the params are known to be valid:

  1. validate the whole `params.yaml` (exit 2 with every problem listed);
  2. hash the inputs with DVC and pick the scratch directory (resume state) for params + inputs;
  3. open (or resume) the stage's MLflow run with its lineage tags;
  4. `run(ctx)`; outputs are written atomically by the stage through `storage`;
  5. write the metrics file, tag the run with DVC's hashes of the outputs, clear the scratch.

With `compute.num_processes` N > 1, a stage that declares itself distributed (training and pair
generation) does steps 1-3 and 5 in the process DVC started, and step 4 in N processes started by
`accelerate launch` (torch.distributed: gloo on CPU, NCCL on GPU). They share the scratch directory;
the main process (rank 0) logs into the same MLflow run and writes the outputs, the others only
compute (their data shard, their generation shards). Any process failing stops all of them, and the
user's error is printed once, by the launching process.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from runtime.context import StageContext, failure_detail  # noqa: E402
from runtime.devices import ENV_LAUNCH_DIR, set_threads  # noqa: E402
from runtime.launch import launch, launched_main  # noqa: E402
from runtime.params import Params, ParamsError, ParamsView, load_params  # noqa: E402
from runtime.spec import StageSpec  # noqa: E402
from storage import repo, tracking  # noqa: E402
from storage.atomic import atomic_write_json  # noqa: E402
from storage.hashing import params_hash  # noqa: E402
from storage.scratch import clear_scratch, scratch_dir  # noqa: E402


def make_context(spec: StageSpec, root: Path, params: Params, tracked: bool = True) -> StageContext:
    """Resolve a stage's params view, input hashes and scratch dir in `root`."""
    view = ParamsView(params, spec.params, spec.aliases)
    try:
        inputs = repo.stage_input_hashes(root, spec.name)
    except KeyError:
        inputs = {}  # not declared in this dvc.yaml (a notebook or a test calling run() directly)
    section_values = view.as_dict()
    key = {"params": section_values, "inputs": inputs}
    return StageContext(
        spec=spec, root=root, params=view, scratch=scratch_dir(root, spec.name, key), inputs=inputs,
        params_hash=params_hash(section_values), tracked=tracked,
    )


def stage_main(spec: StageSpec, run: Callable[[StageContext], dict[str, Any]], *, distributed: bool = False) -> int:
    """Entry point of `python -m stages.<name>`: returns the process exit code.

    `distributed`: `run` works in several processes (it splits its work by `ctx.rank` and only the main
    process writes outputs), so `compute.num_processes` > 1 runs it under `accelerate launch`.
    """
    if os.environ.get(ENV_LAUNCH_DIR):
        return launched_main(spec, run)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"error: stage {spec.name!r} was started by a distributed launcher; set compute.num_processes in "
              f"params.yaml and run `python -m stages.{spec.name.partition('@')[0]}` instead: it launches its "
              "own processes and keeps one MLflow run and one output.", file=sys.stderr)
        return 2
    root = repo.find_repo_root()
    try:
        params = load_params(root / "params.yaml")
    except ParamsError as exc:
        print(f"error: stage {spec.name!r} did not start, no output was touched.\n{exc}", file=sys.stderr)
        return 2
    ctx = make_context(spec, root, params)
    processes = params.compute.num_processes if distributed else 1
    set_threads(ctx.params)
    tracking.configure(params.tracking.uri, params.tracking.experiment, root)
    commit, dirty = repo.git_state(root)
    tags = {"params_hash": ctx.params_hash, "git_commit": commit or "none", "git_dirty": str(dirty).lower(),
            "status": "executed"}
    if processes > 1:
        tags["num_processes"] = str(processes)
    if os.environ.get(tracking.ENV_PIPELINE_RUN):
        tags["pipeline_run_id"] = os.environ[tracking.ENV_PIPELINE_RUN]
    for tag, var in (("dvc_exp_name", "DVC_EXP_NAME"), ("dvc_exp_baseline", "DVC_EXP_BASELINE_REV")):
        if os.environ.get(var):  # set by `dvc exp run`: the experiment this run belongs to
            tags[tag] = os.environ[var]
    try:
        with tracking.stage_run(stage=spec.name, scratch=ctx.scratch, params=ctx.params.as_dict(),
                                tags=tags, inputs=ctx.inputs) as mlflow_run:
            if processes > 1:
                metrics = launch(ctx, params, run_id=mlflow_run.info.run_id)
            else:
                metrics = run(ctx)
            if spec.metrics:
                (root / spec.metrics).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(root / spec.metrics, metrics)
            tracking.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
            outputs = repo.stage_output_hashes(root, spec.name)
            tracking.set_tags(outputs=outputs)
    except Exception as exc:
        detail = failure_detail(exc, ctx)
        if detail is None:
            raise
        print(f"error: stage {spec.name!r} failed: {detail}", file=sys.stderr)
        if os.environ.get("REFLOW_DEBUG"):
            traceback.print_exc()
        return 1
    clear_scratch(ctx.scratch)
    return 0


def pipeline_stage_main(spec: StageSpec, run: Callable[[StageContext], dict[str, Any]], *, distributed: bool = False,
                        argv: list[str] | None = None) -> int:
    """Entry point of a stage both pipelines run: `python -m stages.<module>` in the class pipeline, `python -m
    stages.<module> text` its copy in the text pipeline (runtime/text_chain.py). Usage errors exit 2."""
    from runtime.text_chain import TEXT, text_spec

    args = sys.argv[1:] if argv is None else argv
    if args not in ([], [TEXT]):
        print(f"usage: python -m stages.{spec.name} [{TEXT}]   ({TEXT}: the text pipeline's {text_spec(spec).name})",
              file=sys.stderr)
        return 2
    return stage_main(text_spec(spec) if args else spec, run, distributed=distributed)


def chain_stage_main(module: str, spec: Callable[..., StageSpec], run: Callable[[StageContext], dict[str, Any]],
                     what: str, argv: list[str] | None = None) -> int:
    """Entry point of a stage that both chains run (`runtime.chains`): `python -m stages.<module> [classic]`, the
    classic chain's copy (`what`) with the argument, or `text`: the text pipeline's copy of the teacher chain's
    stage (runtime/text_chain.py). Usage errors exit 2."""
    from runtime.chains import CLASSIC
    from runtime.text_chain import TEXT, text_spec

    args = sys.argv[1:] if argv is None else argv
    if args not in ([], [CLASSIC], [TEXT]):
        print(f"usage: python -m stages.{module} [{CLASSIC}|{TEXT}]   ({CLASSIC}: {what}; {TEXT}: the text "
              "pipeline's)", file=sys.stderr)
        return 2
    if args == [TEXT]:
        return stage_main(text_spec(spec()), run, distributed=True)
    return stage_main(spec(*args), run, distributed=True)
