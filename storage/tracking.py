"""MLflow runs for stages and pipelines, with the tags that make lineage walkable.

Tag scheme (every key is under `reflow.`):
  stage, pipeline_run_id, git_commit, git_dirty, params_hash,
  dvc_exp_name, dvc_exp_baseline (when the stage ran inside `dvc exp run`),
  input.<dvc path> = DVC hash of that dependency, output.<dvc path> = DVC hash of that output
  ('@' in a path is written ':', which MLflow allows in keys),
  status = executed | restored_from_run_cache | skipped_up_to_date (set by the pipeline driver).
A `reflow run` makes one parent run; each executed stage is its child (the id travels in
REFLOW_PARENT_RUN_ID, not MLFLOW_RUN_ID, which MLflow would silently adopt as the stage's own run).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENV_PARENT_RUN = "REFLOW_PARENT_RUN_ID"
ENV_PIPELINE_RUN = "REFLOW_PIPELINE_RUN_ID"
TAG = "reflow."

for _var, _value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
    os.environ.setdefault(_var, _value)


def path_tag(kind: str, path: str) -> str:
    """`reflow.input.<path>` / `reflow.output.<path>`; MLflow keys forbid '@', so `rf@2` is written `rf:2`."""
    return f"{TAG}{kind}.{path.replace('@', ':')}"


def tag_path(key: str, kind: str) -> str | None:
    """The DVC path in a `path_tag` key of this kind, or None."""
    prefix = f"{TAG}{kind}."
    return key[len(prefix):].replace(":", "@") if key.startswith(prefix) else None


def run_tags(values: Mapping[str, str] | None = None, *, inputs: Mapping[str, str] | None = None,
             outputs: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow tags in the scheme above: `reflow.<name>` for each of `values`, then `reflow.input.<path>` and
    `reflow.output.<path>` (see `path_tag`) for each dependency's and output's DVC hash."""
    tags = {f"{TAG}{k}": v for k, v in (values or {}).items()}
    tags |= {path_tag("input", p): h for p, h in (inputs or {}).items()}
    tags |= {path_tag("output", p): h for p, h in (outputs or {}).items()}
    return tags


# The user's MLFLOW_TRACKING_URI, read before MLflow can overwrite it: `mlflow.set_tracking_uri` exports the URI it
# is given to child processes, so a stage started by a flow working in another workspace would otherwise log
# there. Children inherit the user's value (empty: none) through USER_URI_ENV instead.
USER_URI_ENV = "REFLOW_USER_MLFLOW_TRACKING_URI"
os.environ.setdefault(USER_URI_ENV, os.environ.get("MLFLOW_TRACKING_URI", ""))


def tracking_uri(uri: str | None, root: Path) -> str:
    """The configured URI (`tracking.uri`), else the user's `MLFLOW_TRACKING_URI` (one MLflow server shared by
    workers on several machines, docs/workers.md), else an absolute sqlite file in the workspace root.

    `dvc exp run --temp` and queued experiments run stages in a throwaway copy of the repo and name the
    real workspace in DVC_ROOT; the default store lives there, so experiment runs sit next to the
    workspace's and outlive the copy.
    """
    home = Path(os.environ.get("DVC_ROOT") or root)
    return uri or os.environ.get(USER_URI_ENV) or f"sqlite:///{(home / 'mlflow.db').resolve()}"


def configure(uri: str | None, experiment: str, root: Path) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri, root))
    return mlflow.set_experiment(experiment).experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def _dvc_source():
    """An MLflow dataset source naming a DVC-tracked path and its hash (`dvc get`/`dvc pull` fetch it)."""
    from mlflow.data.dataset_source import DatasetSource

    class DVCDatasetSource(DatasetSource):
        def __init__(self, path: str, md5: str):
            self.path, self.md5 = path, md5

        @staticmethod
        def _get_source_type() -> str:
            return "dvc"

        def load(self) -> str:
            return self.path

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> DatasetSource:
            raise NotImplementedError("DVC sources are created explicitly")

        def to_dict(self) -> dict[str, Any]:
            return {"path": self.path, "md5": self.md5}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> DatasetSource:
            return cls(source_dict["path"], source_dict["md5"])

    return DVCDatasetSource


def _resumable(run_id: str | None) -> bool:
    """A run left RUNNING or FAILED by a killed attempt of the same stage is continued, not duplicated."""
    import mlflow

    if not run_id:
        return False
    try:
        return mlflow.get_run(run_id).info.status != "FINISHED"
    except Exception:  # deleted run or another store: start afresh
        return False


@contextmanager
def stage_run(
    *, stage: str, scratch: Path, params: dict[str, Any], tags: dict[str, str], inputs: dict[str, str]
) -> Iterator[Any]:
    """The MLflow run of one stage execution, resumed if a killed attempt left one in `scratch`."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    from storage.atomic import atomic_write_text

    marker = scratch / "mlflow_run_id"
    previous = marker.read_text().strip() if marker.exists() else None
    parent = os.environ.get(ENV_PARENT_RUN) or None
    all_tags = run_tags({"stage": stage, **tags}, inputs=inputs)
    if _resumable(previous):
        run = mlflow.start_run(run_id=previous)
        mlflow.set_tags(all_tags | run_tags({"resumed": "true"}))
    else:
        run = mlflow.start_run(run_name=stage, parent_run_id=parent, tags=all_tags)
        atomic_write_text(marker, run.info.run_id)
        mlflow.log_params(flatten(params))
        for path, digest in inputs.items():
            source = _dvc_source()(path=path, md5=digest)
            mlflow.log_input(MetaDataset(source=source, name=path, digest=digest[:36]))
    try:
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def set_tags(values: dict[str, str] | None = None, *, outputs: dict[str, str] | None = None) -> None:
    """Tag the active run (`run_tags` names the keys)."""
    import mlflow

    mlflow.set_tags(run_tags(values, outputs=outputs))


def find_stage_run(pipeline_run_id: str, stage: str) -> str | None:
    """The newest run of `stage` in this pipeline run, or None."""
    import mlflow

    runs = mlflow.search_runs(
        filter_string=f"tags.`{TAG}pipeline_run_id` = '{pipeline_run_id}' and tags.`{TAG}stage` = '{stage}'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
        search_all_experiments=True)
    return runs[0].info.run_id if runs else None


def record_driver_run(stage: str, *, parent_run_id: str, pipeline_run_id: str, status: str,
                      inputs: dict[str, str], outputs: dict[str, str]) -> str:
    """A run for a stage whose code did not execute (restored by DVC), so its lineage is still complete."""
    import mlflow

    tags = run_tags({"stage": stage, "pipeline_run_id": pipeline_run_id, "status": status},
                    inputs=inputs, outputs=outputs)
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(experiment_id, run_name=stage,
                            tags=tags | {"mlflow.parentRunId": parent_run_id})
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def run_link(ui_url: str, run_id: str) -> str:
    import mlflow

    experiment_id = mlflow.get_run(run_id).info.experiment_id
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
