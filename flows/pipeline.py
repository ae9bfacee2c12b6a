"""The pipeline flow: DVC's stage graph, one Prefect task per stage, one MLflow parent run.

The DAG is read from `dvc.yaml` through DVC itself, never kept a second time here. A stage starts as
soon as all of its upstream stages succeeded, beside any other ready stage, up to `scheduler.concurrency`
at once, each on devices of its own (flows/schedule.py). After a failure no new stage starts; the flow
(or a plain `dvc repro`) starts again at the failed stage while DVC skips what is done.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.schedule import Slot, run_dag, stage_slots
from tasks.dvc_stage import StageOutcome, dvc_stage

DEFAULT_STAGE_TIMEOUT_S = 6 * 3600.0


PIPELINE_FILES = {"class": "dvc.yaml", "text": "text/dvc.yaml"}  # flows/dvc_yaml.py renders both


def stage_graph(root: Path, pipeline: str = "class") -> dict[str, list[str]]:
    """{stage: [upstream stages]} of one pipeline's DVC file, from DVC's own graph (foreach stages expanded).
    Stage names are distinct across the two files (the text pipeline's start with `text_`)."""
    from dvc.repo import Repo

    graph = Repo(str(root)).index.graph  # edges point from a stage to the stages it depends on
    dvcfile = (root / PIPELINE_FILES[pipeline]).resolve()
    mine = [s for s in graph.nodes if Path(s.dvcfile.path).resolve() == dvcfile]
    return {s.name: sorted(d.name for d in graph.successors(s)) for s in mine}


def execution_order(graph: dict[str, list[str]], targets: list[str] | None = None) -> list[str]:
    """Topological order of `targets` and their ancestors (all stages when None); ties by name."""
    unknown = [t for t in targets or [] if t not in graph]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {sorted(graph)}")
    wanted: set[str] = set()
    stack = list(targets or graph)
    while stack:
        s = stack.pop()
        if s not in wanted:
            wanted.add(s)
            stack.extend(graph[s])
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(wanted):
        ready = sorted(s for s in wanted - done if all(u in done for u in graph[s]))
        if not ready:
            raise ValueError(f"dvc.yaml stage graph has a cycle among {sorted(wanted - done)}")
        order.extend(ready)
        done.update(ready)
    return order


def changed_stages(root: Path) -> set[str] | None:
    """Stages `dvc status` finds changed in themselves (deps, params, outputs, command), in one process.

    A stage not in the set, none of whose upstream stages runs in this flow, is up to date: the flow records
    it as skipped without starting a `dvc repro` for it (a second or so each). None when DVC cannot tell,
    and then every stage goes through `dvc repro` as usual.
    """
    from dvc.repo import Repo

    from runtime.text_chain import stage_of

    try:  # keyed by DVC address: `text/dvc.yaml:<name>` for the text pipeline's stages
        return {stage_of(address) for address in Repo(str(root)).status()}
    except Exception:  # a status DVC cannot compute is one `dvc repro` will report properly
        return None


@flow(name="reflow-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=64))
def pipeline(root: str = ".", targets: list[str] | None = None,
             stage_timeout_s: float = DEFAULT_STAGE_TIMEOUT_S, which: str = "class") -> list[dict]:
    """Run one DVC pipeline in `root` (`which`: `class`, dvc.yaml, or `text`, text/dvc.yaml), each stage as soon
    as its upstream stages are done, up to `scheduler.concurrency` at once, with lineage in MLflow."""
    import mlflow

    from runtime.params import load_params
    from storage import tracking
    from storage.repo import git_state

    logger = get_run_logger()
    repo = Path(root).resolve()
    params = load_params(repo / "params.yaml")  # fail before anything runs, with every problem listed
    graph = stage_graph(repo, which)
    order = execution_order(graph, targets)
    slots = stage_slots(params.scheduler, params.compute)
    logger.info("stages in order: %s", " -> ".join(order))
    logger.info("up to %d at once, on %s", len(slots), ", ".join(s.name for s in slots))
    changed = changed_stages(repo)

    pipeline_id = str(flow_run.get_id() or os.urandom(8).hex())
    tracking.configure(params.tracking.uri, params.tracking.experiment, repo)
    commit, dirty = git_state(repo)
    parent_tags = tracking.run_tags({"pipeline_run_id": pipeline_id, "kind": "pipeline", "pipeline": which,
                                     "git_commit": commit or "none", "git_dirty": str(dirty).lower(),
                                     "concurrency": str(len(slots))})
    name = "pipeline" if which == "class" else f"{which} pipeline"
    parent = mlflow.start_run(run_name=f"{name} {flow_run.get_name() or pipeline_id[:8]}", tags=parent_tags)
    cfg = {"pipeline_run_id": pipeline_id, "parent_run_id": parent.info.run_id,
           "uri": params.tracking.uri or "", "experiment": params.tracking.experiment,
           "ui_url": params.tracking.ui_url}

    def submit(stage: str, slot: Slot, upstream: list[StageOutcome]):
        # Up to date without asking DVC again: unchanged itself, and no upstream stage ran in this flow.
        up_to_date = (changed is not None and stage not in changed
                      and all(o.status == "skipped_up_to_date" for o in upstream))
        return dvc_stage.submit(stage, str(repo), stage_timeout_s, cfg, known_up_to_date=up_to_date,
                                env=slot.env, slot=slot.name)

    start = time.monotonic()
    try:
        results = run_dag(order, graph, slots, submit, wait_first=lambda fs: next(as_completed(fs)))
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    wall_s = time.monotonic() - start
    outcomes = [results[s] for s in order]
    tracking.set_tags({
        "stages": ",".join(order),
        "executed": ",".join(o.stage for o in outcomes if o.status == "executed"),
        "skipped": ",".join(o.stage for o in outcomes if o.status != "executed")})
    mlflow.log_metrics({"wall_s": wall_s, "stage_seconds_sum": sum(o.seconds for o in outcomes)})
    mlflow.end_run(status="FINISHED")
    for o in outcomes:
        logger.info("%-16s %-24s %6.1f s", o.stage, o.status, o.seconds)
    logger.info("wall time %.1f s; the stages' own times sum to %.1f s", wall_s, sum(o.seconds for o in outcomes))
    return [asdict(o) for o in outcomes]


def with_task_runner(scheduler: Any):
    """The pipeline flow on `scheduler.task_runner`: threads here (each stage is a process; its thread only
    waits on it), or a Dask / Ray cluster whose workers see this workspace on a shared filesystem."""
    if scheduler.task_runner == "threads":
        return pipeline
    package = f"prefect-{scheduler.task_runner}"
    try:
        if scheduler.task_runner == "dask":
            from prefect_dask import DaskTaskRunner

            runner = DaskTaskRunner(address=scheduler.address) if scheduler.address else DaskTaskRunner()
        else:
            from prefect_ray import RayTaskRunner

            runner = RayTaskRunner(address=scheduler.address) if scheduler.address else RayTaskRunner()
    except ImportError as exc:
        raise ValueError(f"scheduler.task_runner: {scheduler.task_runner} needs {package} "
                         f"(pip install {package}); or set scheduler.task_runner: threads") from exc
    return pipeline.with_options(task_runner=runner)
