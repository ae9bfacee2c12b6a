"""The schema of `params.yaml`: one strict pydantic model per section.

Every stage validates the whole file before it touches an output, so a typo in any section stops the
pipeline at its first stage with the key path, the bad value and what was expected. Unknown keys are
errors (`extra="forbid"`): a misspelt knob silently falling back to its default is the worst outcome.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML, YAMLError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Field(gt=0)
NFE = Annotated[int, Field(gt=0)]  # a number of sampler steps: 0 is no sampling at all


# ---------------------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------------------
class DataParams(Strict):
    """Where the images come from and the resolution every stage works at."""

    source: Literal["digits", "imagefolder", "npz"] = "digits"
    # Folder (imagefolder) or file (npz), relative to the repo root or absolute. It is a DVC dependency
    # of `prepare`, so replacing images reruns the pipeline; the digits source ignores it.
    path: str = "data"
    resolution: int = Field(32, ge=8, le=1024)
    reference_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # held out for FID, never trained on
    split_seed: int = 0
    max_images: int | None = Field(None, ge=4)  # cap for quick runs; None keeps all

    @model_validator(mode="after")
    def _resolution_multiple_of_8(self) -> DataParams:
        if self.resolution % 8:
            raise ValueError(f"data.resolution must be a multiple of 8, got {self.resolution}")
        return self


class ComputeParams(Strict):
    """Device and numerics. Changing these can change results, so training stages depend on them."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    num_threads: int | None = Field(None, gt=0)  # None: every core (each of N processes: cores / N)
    seed: int = 0
    # Training and generation stages run in this many processes under `accelerate launch` (data-parallel
    # training, generation shards split by rank); on GPU one process per device.
    num_processes: int = Field(1, gt=0)
    # Training rows above this size are read chunk by chunk from zarr (chunk-level shuffling) instead of held
    # in RAM. A fixed number, not "what this machine has": the two orders differ, so the result must not
    # depend on the machine a stage happens to run on.
    ram_budget_gb: float = Field(8.0, gt=0)


class TrackingParams(Strict):
    """MLflow settings. No stage's outputs depend on them, so no DVC stage lists this section."""

    uri: str | None = None  # None: sqlite:///<repo root>/mlflow.db (absolute, see STACK.md)
    experiment: str = "reflow"
    ui_url: str = "http://127.0.0.1:5000"  # where `reflow ui` serves MLflow; used for links in Prefect


# ---------------------------------------------------------------------------------------------------------
# Stage sections
# ---------------------------------------------------------------------------------------------------------
class TrainParams(Strict):
    """Knobs shared by every training loop."""

    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    log_every: int = Field(25, gt=0)
    checkpoint_every: int = Field(200, gt=0)


class VAEParams(TrainParams):
    """A pretrained AutoencoderKL (local path or hub id), or a small one trained on the images."""

    pretrained: str | None = None
    subfolder: str | None = None
    scale_factor: float | None = Field(None, gt=0.0)  # None: from the pretrained config, or 1/std of latents
    latent_channels: int = Field(4, gt=0)
    block_out_channels: list[int] = Field(default_factory=lambda: [16, 32, 32], min_length=1)
    layers_per_block: int = Field(1, gt=0)
    norm_num_groups: int = Field(8, gt=0)
    kl_weight: float = Field(1e-6, ge=0.0)
    steps: int = Field(400, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(2e-3, gt=0.0)

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> VAEParams:
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"vae.block_out_channels {self.block_out_channels} must be multiples of "
                f"vae.norm_num_groups={self.norm_num_groups} (GroupNorm)"
            )
        return self


class ExtractParams(Strict):
    batch_size: int = Field(256, gt=0)
    posterior: Literal["mean", "sample"] = "mean"  # what of q(z|x) is stored


class DiTParams(TrainParams):
    """Class-conditional DiT on latents, DDPM epsilon objective (METHOD.md, `dit`)."""

    patch_size: int = Field(2, gt=0)
    num_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    attention_head_dim: int = Field(32, gt=0)
    mirrored: bool = True  # also train on the mirrored latents; off for data that is not mirror-symmetric
    learn_sigma: bool = False  # DiT's learned variance: 2C output channels, needed for released weights
    pretrained: str | None = None  # a diffusers DiT folder to start from (local path)
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # to the null class, for classifier-free guidance
    num_train_timesteps: int = Field(1000, gt=1)
    beta_start: float = Field(1e-4, gt=0.0)
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-4, gt=0.0)


class TeacherPairsParams(Strict):
    """Deterministic DDIM from stored noise z0 to the teacher's sample z1 (METHOD.md, `teacher_pairs`)."""

    num_samples: int = Field(1024, gt=0)
    ddim_steps: int = Field(50, gt=0)
    guidance_scale: float = Field(1.5, ge=0.0)  # 1 = no guidance; applied to every latent channel
    batch_size: int = Field(256, gt=0)
    shard_size: int = Field(256, gt=0)  # rows per resumable shard
    seed: int = 1234
    grid_samples: int = Field(64, gt=0)


class VelocityTrainParams(TrainParams):
    """Training a velocity model v(x_t, t, y) on a coupling (METHOD.md conventions: t = 0 noise, t = 1 data)."""

    time_distribution: Literal["uniform", "logit_normal"] = "uniform"
    time_eps: float = Field(1e-3, ge=0.0, lt=1.0)  # times drawn from [eps, 1]
    loss: Literal["mse", "pseudo_huber"] = "mse"
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    eval_samples: int = Field(256, gt=0)  # pairs held out of training to measure error vs the teacher
    eval_steps: list[NFE] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0.0)


class RF1Params(VelocityTrainParams):
    """1-RF: a velocity model on the teacher's pairs (paired) or on real latents with fresh noise."""

    coupling: Literal["paired", "independent"] = "paired"
    init_from_teacher: bool = True  # copy the DiT teacher's weights where shapes match


class ReflowParams(VelocityTrainParams):
    """k-RF rounds: pairs from round k-1's EMA model, then round k trained from round k-1's weights."""

    direction: Literal["from_z0", "from_z1", "random_paired"] = "from_z0"
    solver: Literal["euler", "heun", "rk45"] = "euler"
    solver_steps: int = Field(32, gt=0)
    rtol: float = Field(1e-5, gt=0.0)
    atol: float = Field(1e-5, gt=0.0)
    num_samples: int = Field(1024, gt=0)
    pairs_batch_size: int = Field(256, gt=0)
    shard_size: int = Field(256, gt=0)
    seed: int = 4321
    anneal_warmup_steps: int = Field(0, ge=0)  # SlimFlow's annealing reflow; 0 = off
    flip_prob: float = Field(0.0, ge=0.0, le=1.0)  # mirror z0 and z1 together




class SeqRFParams(VelocityTrainParams):
    """Sequential rectified flow: K time segments, each straightened on its own (METHOD.md, seqrf)."""

    segments: int = Field(4, gt=0)  # K
    boundaries: Literal["uniform", "adaptive"] = "uniform"  # adaptive: DP over a fine teacher trajectory
    start: Literal["noised_data", "teacher_trajectory"] = "noised_data"  # where a segment's x_{t_i} comes from
    teacher_steps: int = Field(64, gt=0)  # Euler steps of the 1-RF teacher over [0, 1] (fine trajectory)
    num_samples: int = Field(1024, gt=0)  # segment-endpoint pairs
    pairs_batch_size: int = Field(256, gt=0)
    shard_size: int = Field(256, gt=0)
    seed: int = 2468
    eval_steps: list[NFE] = Field(default_factory=lambda: [4, 8], min_length=1)  # multiples of segments

    @model_validator(mode="after")
    def _segments_fit_the_trajectory(self) -> SeqRFParams:
        if self.segments > self.teacher_steps:
            raise ValueError(f"seqrf.segments={self.segments} is larger than seqrf.teacher_steps="
                             f"{self.teacher_steps}: each segment needs at least one teacher step")
        uneven = [n for n in self.eval_steps if n % self.segments]
        if uneven:
            raise ValueError(f"seqrf.eval_steps {uneven} are not multiples of seqrf.segments={self.segments}: "
                             "SeqRF samples with a whole number of Euler steps per segment")
        return self


class DistillParams(VelocityTrainParams):
    """A one-step student z0 -> z0 + v(z0, 0) from the pairs of a chosen model (METHOD.md, distill).

    With `per_segment` (source `seqrf` only) the student takes one step per SeqRF segment instead:
    x_{t_i} -> x_{t_i} + (t_j - t_i) v(x_{t_i}, t_i) fitted to the source's own x_{t_j} (SeqRF's distillation).
    """

    source: str = "rf@2"  # the model whose pairs are distilled: rf1, rf@k or seqrf (the straightest)
    student_num_layers: int | None = Field(None, gt=0)  # None: the teacher's depth; smaller = SlimFlow-style
    student_attention_head_dim: int | None = Field(None, gt=0)
    init_from_source: bool = True  # copy the source model's weights where shapes match
    solver_steps: int = Field(32, gt=0)  # Euler steps of the source model to make the pairs
    num_samples: int = Field(1024, gt=0)
    seed: int = 1357
    per_segment: bool = False  # seqrf source: one step per segment instead of one step in all
    # LPIPS on decoded images, added to `loss` when both local weight files are given (nothing is downloaded):
    lpips_backbone: str | None = None  # torchvision vgg16 / alexnet state dict
    lpips_lin: str | None = None  # the LPIPS linear heads (lin{k}.model.1.weight)
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lpips_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> DistillParams:
        if (self.lpips_backbone is None) != (self.lpips_lin is None):
            raise ValueError("distill.lpips_backbone and distill.lpips_lin go together: give both weight files "
                             "for an LPIPS term, or neither")
        if self.per_segment and self.source != "seqrf":
            raise ValueError(f"distill.per_segment needs distill.source: seqrf (got {self.source!r}); "
                             "other sources are distilled to one step in all")
        if self.per_segment and self.lpips_backbone is not None:
            raise ValueError("distill.lpips_* applies to one-step students (decoded images); per-segment "
                             "students end segments at noisy latents: set distill.per_segment: false or drop LPIPS")
        return self


class FIDFeaturesParams(TrainParams):
    """The in-project FID feature extractor: a small classifier trained on the reference images.

    It is also the class-consistency judge of conditional samples, so it is trained even when Inception
    weights are given for FID."""

    width: int = Field(16, gt=0)  # 16/32/64 channels: 98.6 % held-out accuracy on the digits in 26 s
    feature_dim: int = Field(64, gt=0)
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # of the reference set, to measure accuracy on
    steps: int = Field(500, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0.0)

    @model_validator(mode="after")
    def _groups_divide_width(self) -> FIDFeaturesParams:
        if self.width % 8:
            raise ValueError(f"fid_features.width={self.width} must be a multiple of 8 (GroupNorm with 8 groups)")
        return self


class EvalParams(Strict):
    """How `evaluate@<model>` measures every model, the same way for all of them.

    Samples use per-sample seeds from each base seed in `seeds` (the same noise for every model), labels
    i mod K, and are compared with the held-out reference images. FID features come from the
    `fid_features` classifier unless `inception_weights` names torch-fidelity's Inception file."""

    inception_weights: str | None = None  # local weights-inception-2015-12-05-6726825d.pth (nothing is downloaded)
    num_samples: int = Field(360, ge=10)  # per seed and NFE; the digits' reference set has 360 images
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)  # mean and spread over these
    steps: list[NFE] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 50], min_length=1)
    solvers: list[Literal["euler", "heun"]] = Field(default_factory=lambda: ["euler"], min_length=1)  # the DiT: DDIM
    guidance_scale: float | None = Field(None, ge=0.0)  # None: the teacher as it made its pairs, the rest unguided
    straightness_steps: int = Field(16, gt=0)
    batch_size: int = Field(512, gt=0)
    kid_subset_size: int = Field(1000, gt=1)
    prc_neighborhood: int = Field(3, gt=0)

    @model_validator(mode="after")
    def _distinct(self) -> EvalParams:
        for name in ("seeds", "steps", "solvers"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"eval.{name} has repeated entries: {values}")
        return self


class Params(Strict):
    """The whole of `params.yaml`."""

    data: DataParams = DataParams()
    compute: ComputeParams = ComputeParams()
    tracking: TrackingParams = TrackingParams()
    vae: VAEParams = VAEParams()
    extract: ExtractParams = ExtractParams()
    dit: DiTParams = DiTParams()
    teacher_pairs: TeacherPairsParams = TeacherPairsParams()
    rf1: RF1Params = RF1Params()
    reflow: ReflowParams = ReflowParams()
    # Reflow round k -> the model it starts from; DVC's foreach expands each into reflow_pairs@k and rf@k.
    # Its own section so that adding a round reruns nothing that exists.
    reflow_rounds: dict[str, str] = Field(default_factory=lambda: {"2": "rf1"}, min_length=1)
    seqrf: SeqRFParams = SeqRFParams()
    distill: DistillParams = DistillParams()
    fid_features: FIDFeaturesParams = FIDFeaturesParams()
    eval: EvalParams = EvalParams()
    # evaluate@<key> -> the model stage it measures; DVC's foreach expands one evaluate stage per entry.
    evaluate_models: dict[str, str] = Field(default_factory=lambda: {
        "dit": "dit", "rf1": "rf1", "rf2": "rf@2", "seqrf": "seqrf", "distill": "distill"}, min_length=1)

    @model_validator(mode="after")
    def _rounds_chain_from_1rf(self) -> Params:
        expected = {str(k): ("rf1" if k == 2 else f"rf@{k - 1}") for k in range(2, 2 + len(self.reflow_rounds))}
        if self.reflow_rounds != expected:
            raise ValueError(
                "reflow_rounds must be consecutive from 2, each starting from the previous round's model "
                f"(a reference to any other stage breaks the chain): expected {expected}, got {self.reflow_rounds}")
        models = ["rf1", *(f"rf@{k}" for k in self.reflow_rounds), "seqrf"]
        evaluated = ["dit", *models, "distill"]
        for key, stage in self.evaluate_models.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise ValueError(f"evaluate_models key {key!r} names the stage evaluate@{key}: use lower-case "
                                 "letters, digits and '_' (e.g. rf2 for rf@2)")
            if stage not in evaluated:
                raise ValueError(f"evaluate_models.{key}={stage!r} is not a model of this pipeline; expected one "
                                 f"of {evaluated}")
        if self.distill.source not in models:
            raise ValueError(f"distill.source={self.distill.source!r} is not a model of this pipeline; expected "
                             f"one of {models}")
        uneven = [n for n in self.distill.eval_steps if n % self.seqrf.segments]
        if self.distill.per_segment and uneven:
            raise ValueError(f"distill.eval_steps {uneven} are not multiples of seqrf.segments={self.seqrf.segments}:"
                             " a per-segment student takes a whole number of steps per segment")
        return self

    def section(self, name: str) -> Any:
        return getattr(self, name)


SECTIONS: tuple[str, ...] = tuple(Params.model_fields)
OPTIONAL_SECTIONS = frozenset({"tracking"})  # no stage reads it through DVC


# ---------------------------------------------------------------------------------------------------------
# Loading and error reporting
# ---------------------------------------------------------------------------------------------------------
class ParamsError(ValueError):
    """`params.yaml` is unreadable or invalid; the message lists every problem with its key path."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {err['input']!r}); allowed keys are listed in stages/params.py"
    value = err.get("input")
    shown = "missing" if err["type"] == "missing" else repr(value)
    if isinstance(value, dict) and err["type"].startswith("value_error"):
        shown = "(section)"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: got {shown}; expected: {msg}"


def parse_params(raw: Any, path: Path = Path("params.yaml")) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(path, [f"<top level>: got {type(raw).__name__}; expected a mapping of sections"])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(path, [_describe(e) for e in exc.errors()]) from None


def load_params(path: str | Path) -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(path, [f"cannot read the file: {exc.strerror}"]) from None
    try:
        # YAML 1.2, the dialect DVC writes back with `dvc exp run -S`: it drops the quotes around "no",
        # which a YAML 1.1 reader (PyYAML) would turn into False.
        raw = YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        raise ParamsError(path, [f"not valid YAML: {exc}"]) from None
    params = parse_params(raw, path)
    # DVC reads each stage's sections from the file itself (dvc.yaml `params:`), so a section left to its
    # default here would still stop `dvc repro`, with a less helpful message: require it up front.
    missing = [s for s in SECTIONS if s not in OPTIONAL_SECTIONS and s not in (raw or {})]
    if missing:
        raise ParamsError(path, [f"{s}: missing section; stages read it from this file (copy it from the "
                                 "project's params.yaml)" for s in missing])
    return params


class ParamsView:
    """The sections one stage declared; reading any other section is an error.

    This is what makes the `params:` list of a stage in `dvc.yaml` trustworthy: a stage that read an
    undeclared section would not be rerun when that section changed.
    """

    def __init__(self, params: Params, sections: Iterable[str]):
        self._params = params
        self._sections = tuple(sections)
        unknown = set(self._sections) - set(SECTIONS)
        if unknown:
            raise KeyError(f"unknown params section(s) {sorted(unknown)}; known: {list(SECTIONS)}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._sections:
            raise AttributeError(
                f"params section {name!r} is not declared by this stage (declared: {list(self._sections)}); "
                "add it to the stage's PARAMS and to its `params:` in dvc.yaml"
            )
        return getattr(self._params, name)

    def as_dict(self) -> dict[str, Any]:
        return {s: _dump(self._params.section(s)) for s in self._sections}


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
