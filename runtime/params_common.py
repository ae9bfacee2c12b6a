"""The building blocks of the `params.yaml` schema (runtime/params.py) and the sections every stage shares.

`Strict` is the base of every section: unknown keys are errors and a validated section is immutable.
`TrainParams` holds the knobs of every training loop; each training section (runtime/params_stages.py) derives
from it and sets its own length, batch and learning rate.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NFE = Annotated[int, Field(gt=0)]  # a number of sampler steps: 0 is no sampling at all
Decay = Annotated[float, Field(ge=0.0, lt=1.0)]  # an EMA decay or a dropout probability


# ---------------------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------------------
class DataParams(Strict):
    """Where the images come from and the resolution every stage works at."""

    source: Literal["digits", "imagefolder", "npz"] = Field(
        "digits", description="digits (embedded) | imagefolder | npz")
    # Folder (imagefolder) or file (npz), relative to the repo root or absolute. It is a DVC dependency
    # of `prepare`, so replacing images reruns the pipeline; the digits source ignores it.
    path: str = Field("data", description="your images (imagefolder: one subfolder per class; npz: images + labels)")
    resolution: int = Field(32, ge=8, le=1024)
    reference_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="the FID reference: fitted on by nothing")
    features_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="fits the FID feature extractor only")
    floor_fraction: float = Field(
        0.15, gt=0.0, lt=1.0, description="the real-data floor; the rest (55%) trains the VAE and the DiT")
    split_seed: int = 0
    max_images: int | None = Field(None, ge=4)  # cap for quick runs; None keeps all

    @model_validator(mode="after")
    def _resolution_and_splits(self) -> DataParams:
        if self.resolution % 8:
            raise ValueError(f"data.resolution must be a multiple of 8, got {self.resolution}")
        held = self.reference_fraction + self.features_fraction + self.floor_fraction
        if held >= 0.9:
            raise ValueError(f"data.reference_fraction + features_fraction + floor_fraction = {held:g} leaves "
                             "under 10% of the images to train on; expected a sum below 0.9")
        return self


class ComputeParams(Strict):
    """Device and numerics. Changing these can change results, so training stages depend on them."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="no | bf16 | fp16")
    num_threads: int | None = Field(None, gt=0, description="null: every core (each of N processes: cores / N)")
    # Data-parallel training and generation shards split by rank; on GPU one process per device.
    num_processes: PositiveInt = Field(
        1, description="training and pair generation under `accelerate launch`: N GPUs, or CPU processes")
    # A fixed number, not "what this machine has": the two orders (chunk-level shuffling or not) differ, so the
    # result must not depend on the machine a stage happens to run on.
    ram_budget_gb: PositiveFloat = Field(
        8.0, description="training rows above this are read chunk by chunk from zarr, not held in RAM")
    seed: int = 0


class TrackingParams(Strict):
    """MLflow settings. No stage's outputs depend on them, so no DVC stage lists this section."""

    # The default store is absolute: a relative sqlite URI would follow each process's working directory.
    uri: str | None = Field(None, description="null: $MLFLOW_TRACKING_URI if set, else sqlite:///<repo>/mlflow.db")
    experiment: str = "reflow"
    ui_url: str = "http://127.0.0.1:5000"  # where `reflow ui` serves MLflow; used for links in Prefect


class SchedulerParams(Strict):
    """How `reflow run` runs the stages (flows/schedule.py). No stage lists this section, so changing it reruns
    nothing; with `cpu_threads: shared` it changes no number either."""

    # 1 on the 2-core default: the demo at 2 with shared threads took 1598 s against 1300 s serial (measured).
    concurrency: int = Field(1, ge=1, le=64, description=(
        "stages at once, each as soon as its upstream stages are done (1: one at a time; a GPU each: GPUs)"))
    cpu_threads: Literal["shared", "split"] = Field("shared", description=(
        "shared: each stage its usual threads, so results are bitwise those of a serial run | split: cores / "
        "concurrency each, faster on parallel branches but results then depend on the concurrency"))
    task_runner: Literal["threads", "dask", "ray"] = Field("threads", description=(
        "threads: stages start from this machine | dask, ray: on a cluster (prefect-dask/prefect-ray, shared "
        "filesystem)"))
    address: str | None = Field(None, description="dask/ray: the cluster's address (null: a local cluster)")


# ---------------------------------------------------------------------------------------------------------
# The base of every training section
# ---------------------------------------------------------------------------------------------------------
class TrainParams(Strict):
    """Knobs shared by every training loop; each section sets its own length, batch and learning rate."""

    steps: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    weight_decay: float = Field(0.0, ge=0.0)
    ema_decay: Decay = 0.999
    grad_clip: float | None = Field(1.0, gt=0.0)
    log_every: PositiveInt = 25
    checkpoint_every: PositiveInt = 250
