"""The stage sections of the `params.yaml` schema (runtime/params.py): one strict model per stage's section.

Each field's default is the embedded CPU demo's value and its `description` the comment `params.yaml` shows
next to it. A section checks what it can alone; checks across sections are `Params`' own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from reflow.segments import uneven_steps
from runtime.params_common import NFE, Decay, Strict, TrainParams


class VAEParams(TrainParams):
    """A pretrained AutoencoderKL (local path or hub id), or a small one trained on the images."""

    pretrained: str | None = Field(
        None, description="local diffusers folder or cached hub id; null trains a small VAE here")
    subfolder: str | None = None
    scale_factor: float | None = Field(
        None, gt=0.0, description="null: pretrained config, or 1/std of the trained latents")
    latent_channels: PositiveInt = 4
    block_out_channels: list[int] = Field(default_factory=lambda: [16, 32, 32], min_length=1,
                                          description="32 px -> 8 x 8 latents (PSNR ~39 dB on digits)")
    layers_per_block: PositiveInt = 1
    norm_num_groups: PositiveInt = 8
    kl_weight: float = Field(1e-6, ge=0.0)
    steps: PositiveInt = 400
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 2e-3
    ema_decay: Decay = 0.99
    checkpoint_every: PositiveInt = 200

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
    batch_size: PositiveInt = 256
    posterior: Literal["mean", "sample"] = Field("mean", description="mean | sample")  # what of q(z|x) is stored


TeacherObjective = Literal["ddpm_eps", "flow_matching"]
# The samplers of each teacher objective, the teacher's own first: DDIM integrates the DDPM teacher's
# probability-flow ODE in its epsilon parameterisation; a flow-matching teacher is a velocity field.
TEACHER_SOLVERS: dict[str, tuple[str, ...]] = {"ddpm_eps": ("ddim",), "flow_matching": ("euler", "heun")}


class DiTParams(TrainParams):
    """Class-conditional DiT on latents: DDPM epsilon objective, or jax-flow's flow matching (docs/method.md,
    section 2)."""

    objective: TeacherObjective = Field("flow_matching", description=(
        "flow_matching (velocity z1 - z0, sampled by Euler/Heun; measured better here at equal compute) | "
        "ddpm_eps (DDPM epsilon, sampled by DDIM)"))
    time_distribution: Literal["uniform", "logit_normal"] = Field(
        "logit_normal", description="flow_matching's training times (SD3, jax-flow: logit_normal)")
    patch_size: PositiveInt = 2
    num_layers: PositiveInt = 4
    num_attention_heads: PositiveInt = 4
    attention_head_dim: PositiveInt = 32
    # Also train on the mirrored latents: on for mirror-symmetric data (the GPU presets say so).
    mirrored: bool = Field(False, description="digits are not mirror-symmetric: a mirrored 3 is not a 3")
    learn_sigma: bool = False  # DiT's learned variance: 2C output channels, needed for released weights
    pretrained: str | None = None  # a diffusers DiT folder to start from (local path)
    label_dropout: Decay = 0.1  # to the null class, for classifier-free guidance
    num_train_timesteps: int = Field(1000, gt=1)
    beta_start: PositiveFloat = 1e-4
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    steps: PositiveInt = Field(
        3000, description="the teacher everything inherits: 2500 cost 0.09 of its class accuracy (measured)")
    batch_size: PositiveInt = 64
    lr: PositiveFloat = Field(
        1e-3, description="the reference 1e-4 is for 400k steps; this small DiT learns digits in 3k")

    @model_validator(mode="after")
    def _flow_matching_has_no_variance(self) -> DiTParams:
        if self.objective == "flow_matching" and self.learn_sigma:
            raise ValueError("dit.learn_sigma: true is DDPM's learned variance, which a flow-matching teacher "
                             "(dit.objective: flow_matching) has no use for: set dit.learn_sigma: false, or "
                             "dit.objective: ddpm_eps")
        return self


class TeacherPairsParams(Strict):
    """The teacher's deterministic ODE from stored noise z0 to its sample z1 (docs/method.md, section 3)."""

    num_samples: PositiveInt = 1024
    solver: Literal["ddim", "euler", "heun"] | None = Field(
        None, description="null: the teacher's own (ddim for ddpm_eps, euler for flow_matching)")
    ddim_steps: PositiveInt = 50
    solver_steps: PositiveInt = Field(50, description="euler/heun steps of a flow_matching teacher")
    guidance_scale: float = Field(2.0, ge=0.0)  # 1 = no guidance; applied to every latent channel
    batch_size: PositiveInt = 256
    shard_size: PositiveInt = 256  # rows per resumable shard
    drop_farthest: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "drop this fraction of pairs with the largest ||z1 - z0|| (Re-MeanFlow's filter)"))
    seed: int = 1234
    grid_samples: PositiveInt = 100

    def solver_for(self, objective: str) -> str:
        """The solver that makes the pairs of a teacher trained with `objective` (`dit.objective`)."""
        fits = TEACHER_SOLVERS[objective]
        if self.solver is None:
            return fits[0]
        if self.solver not in fits:
            raise ValueError(f"teacher_pairs.solver: {self.solver} does not sample a teacher trained with "
                             f"dit.objective: {objective}; expected one of {list(fits)}, or null for its own")
        return self.solver

    def steps_for(self, solver: str) -> int:
        """The step count of `solver`: `ddim_steps` for DDIM, `solver_steps` for Euler and Heun."""
        return self.ddim_steps if solver == "ddim" else self.solver_steps


class VelocityTrainParams(TrainParams):
    """Training a velocity model v(x_t, t, y) on a coupling (docs/method.md, section 1: t = 0 noise, t = 1 data)."""

    time_distribution: Literal["uniform", "logit_normal", "u_shaped"] = Field(
        "uniform", description="uniform on [time_eps, 1] | logit_normal | u_shaped (2-RF++, for reflow rounds)")
    time_eps: float = Field(1e-3, ge=0.0, lt=1.0)  # times drawn from [eps, 1]
    loss: Literal["mse", "pseudo_huber"] = Field("mse", description="mse | pseudo_huber")
    label_dropout: Decay = 0.1
    eval_samples: PositiveInt = Field(256, description="held-out teacher pairs: error vs the teacher and straightness")
    eval_steps: list[NFE] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 5e-4


class RF1Params(VelocityTrainParams):
    """1-RF: a velocity model on the teacher's pairs (paired) or on real latents with fresh noise."""

    coupling: Literal["paired", "independent"] = Field(
        "paired", description="paired: the teacher's (z0, z1); independent: real latents + fresh noise")
    init_from_teacher: bool = Field(True, description="copy the DiT teacher's weights where shapes match")


class ReflowParams(VelocityTrainParams):
    """k-RF rounds: pairs from round k-1's EMA model, then round k trained from round k-1's weights."""

    direction: Literal["from_z0", "from_z1", "random_paired"] = Field(
        "from_z0", description="from_z0 | from_z1 (invert real latents) | random_paired")
    solver: Literal["euler", "heun", "rk45"] = Field("euler", description="euler | heun | rk45 (adaptive, rtol/atol)")
    solver_steps: PositiveInt = 32
    rtol: PositiveFloat = 1e-5
    atol: PositiveFloat = 1e-5
    num_samples: PositiveInt = 1024
    pairs_batch_size: PositiveInt = 256
    shard_size: PositiveInt = 256
    drop_farthest: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "drop this fraction of pairs with the largest ||z1 - z0|| (Re-MeanFlow's filter)"))
    seed: int = 4321
    anneal_warmup_steps: int = Field(0, ge=0, description="SlimFlow's annealing reflow; 0 = off")
    student_num_layers: int | None = Field(None, gt=0, description=(  # SlimFlow: a smaller model of the next round
        "null: as deep as the model the round starts from; fewer: a smaller round (pair with anneal_warmup_steps)"))
    student_attention_head_dim: int | None = Field(
        None, gt=0, description="null: as wide as the model the round starts from")
    flip_prob: float = Field(0.0, ge=0.0, le=1.0, description="mirror z0 and z1 together (in latent space: needs "
                             "dit.mirrored and a flip-equivariant VAE)")
    max_flip_error: float = Field(0.05, ge=0.0, description="flip_prob > 0: the largest VAE flip-equivariance "
                                  "error allowed, ||E(flip x) - flip E(x)||^2 / ||E(x)||^2 (extract measures it)")
    steps: PositiveInt = Field(
        600, description="2-RF starts from 1-RF on straighter pairs: its loss is flat from step 400 (0.026)")


class SeqRFParams(VelocityTrainParams):
    """Sequential rectified flow: K time segments, each straightened on its own (docs/method.md, section 6)."""

    segments: PositiveInt = Field(4, description="K: one Euler step per segment samples with K evaluations")
    boundaries: Literal["uniform", "adaptive"] = Field(
        "uniform", description="uniform | adaptive (dynamic program over a fine teacher trajectory)")
    min_segment: float = Field(0.05, ge=0.0, lt=1.0, description="adaptive: the shortest segment allowed")
    start: Literal["noised_data", "teacher_trajectory"] = Field(  # where a segment's x_{t_i} comes from
        "teacher_trajectory", description="teacher_trajectory (the 1-RF flow's own path, what the sampler visits) "
        "| noised_data (real latents noised to t_i: needs rf1.coupling independent)")
    teacher_steps: PositiveInt = 64  # Euler steps of the 1-RF teacher over [0, 1] (fine trajectory)
    num_samples: PositiveInt = 1024  # segment-endpoint pairs
    pairs_batch_size: PositiveInt = 256
    shard_size: PositiveInt = 256
    seed: int = 2468
    eval_steps: list[NFE] = Field(default_factory=lambda: [4, 8], min_length=1,
                                  description="NFE, multiples of segments (steps per segment x K)")
    steps: PositiveInt = Field(
        650, description="make demo <= 20 min: its loss is 0.0163 from 625 on (0.016 at 1000)")

    @model_validator(mode="after")
    def _segments_fit_the_trajectory(self) -> SeqRFParams:
        if self.segments > self.teacher_steps:
            raise ValueError(f"seqrf.segments={self.segments} is larger than seqrf.teacher_steps="
                             f"{self.teacher_steps}: each segment needs at least one teacher step")
        if self.segments * self.min_segment > 1:
            raise ValueError(f"seqrf.segments={self.segments} segments of at least seqrf.min_segment="
                             f"{self.min_segment} do not fit in [0, 1]")
        uneven = uneven_steps(self.eval_steps, self.segments)
        if uneven:
            raise ValueError(f"seqrf.eval_steps {uneven} are not multiples of seqrf.segments={self.segments}: "
                             "SeqRF samples with a whole number of Euler steps per segment")
        return self


class DistillParams(VelocityTrainParams):
    """A one-step student z0 -> z0 + v(z0, 0) from the pairs of a chosen model (docs/method.md, section 7).

    With `per_segment` (source `seqrf` only) the student takes one step per SeqRF segment instead:
    x_{t_i} -> x_{t_i} + (t_j - t_i) v(x_{t_i}, t_i) fitted to the source's own x_{t_j} (SeqRF's distillation).
    """

    source: str = Field("rf@2", description="whose pairs: rf1, rf@k or seqrf (the straightest)")
    classic_source: str = Field("rf@2_classic", description=(
        "distill_classic's: rf1_classic or rf@k_classic (runtime/chains.py)"))
    student_num_layers: int | None = Field(  # smaller = SlimFlow-style
        None, gt=0, description="null: as deep as the source; fewer = a smaller, faster student")
    student_attention_head_dim: int | None = Field(None, gt=0)
    init_from_source: bool = True  # copy the source model's weights where shapes match
    solver_steps: PositiveInt = 32  # Euler steps of the source model to make the pairs
    num_samples: PositiveInt = 1024
    seed: int = 1357
    pairs_batch_size: PositiveInt = 256  # the distill_pairs stage's generation batch
    shard_size: PositiveInt = 256  # rows per resumable shard
    drop_farthest: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "drop this fraction of pairs with the largest ||z1 - z0|| (Re-MeanFlow's filter)"))
    per_segment: bool = Field(
        False, description="source seqrf: one step per segment (SeqRF's distillation) instead of one in all")
    # LPIPS on decoded images, added to `loss` when both local weight files are given (nothing is downloaded):
    lpips_backbone: str | None = Field(  # torchvision vgg16 / alexnet state dict
        None, description="local vgg16/alexnet weights + LPIPS heads: adds LPIPS on decoded images")
    lpips_lin: str | None = None  # the LPIPS linear heads (lin{k}.model.1.weight)
    lpips_net: Literal["vgg", "alex"] = Field("vgg", description="vgg | alex")
    lpips_weight: float = Field(1.0, ge=0)
    label_dropout: Decay = Field(0.0, description="the student is used without guidance")
    loss: Literal["mse", "pseudo_huber", "lpips_huber"] = Field(
        "mse", description="mse | pseudo_huber | lpips_huber (2-RF++: t-weighted Huber + LPIPS; needs lpips_*)")
    k_steps: PositiveInt = Field(1, description=(
        "1: one step z0 + v(z0, 0); k: RectifiedFlow's k-step student, trained at t = i/k, sampled in k steps"))
    guide_weight: float = Field(0.0, ge=0.0, description=(
        "SlimFlow's flow-guided term: the source's two-step target on fresh noise, this weight; 0 = off"))
    eval_steps: list[NFE] = Field(default_factory=lambda: [1], min_length=1, description="must include k_steps")
    steps: PositiveInt = Field(700, description="its loss is flat from step 600 (0.0031 to 0.0030 at 1000)")

    @model_validator(mode="after")
    def _consistent(self) -> DistillParams:
        if (self.lpips_backbone is None) != (self.lpips_lin is None):
            raise ValueError("distill.lpips_backbone and distill.lpips_lin go together: give both weight files "
                             "for an LPIPS term, or neither")
        if self.loss == "lpips_huber" and self.lpips_backbone is None:
            raise ValueError("distill.loss: lpips_huber (2-RF++'s LPIPS-Huber) needs local LPIPS weights: set "
                             "distill.lpips_backbone and distill.lpips_lin, or choose distill.loss: pseudo_huber")
        if self.drop_farthest > 0 and self.per_segment:
            raise ValueError(f"distill.drop_farthest={self.drop_farthest} filters pairs by ||z1 - z0||, and "
                             "distill.per_segment: true makes segment rows, which have no z0 and z1: set "
                             "distill.drop_farthest: 0 with it")
        if self.k_steps > 1 and self.per_segment:
            raise ValueError(f"distill.k_steps={self.k_steps} and distill.per_segment: true both set the student's "
                             "steps (per_segment: one per SeqRF segment); keep distill.k_steps: 1 with it")
        if not self.per_segment and self.k_steps not in self.eval_steps:
            raise ValueError(f"distill.eval_steps {self.eval_steps} must include distill.k_steps={self.k_steps}: "
                             "a k-step student is measured at the k steps it was trained for")
        if self.guide_weight > 0 and (self.k_steps > 1 or self.per_segment or self.source == "seqrf"):
            raise ValueError(f"distill.guide_weight={self.guide_weight} (SlimFlow's flow-guided term) regularises a "
                             "one-step student with two Euler steps of a straight source: it needs distill.k_steps: 1, "
                             f"distill.per_segment: false and a source other than seqrf (got k_steps={self.k_steps}, "
                             f"per_segment={self.per_segment}, source={self.source!r})")
        if self.per_segment and self.source != "seqrf":
            raise ValueError(f"distill.per_segment needs distill.source: seqrf (got {self.source!r}); "
                             "other sources are distilled to one step in all")
        if self.per_segment and self.lpips_backbone is not None:
            raise ValueError("distill.lpips_* applies to one-step students (decoded images); per-segment "
                             "students end segments at noisy latents: set distill.per_segment: false or drop LPIPS")
        return self


class FIDFeaturesParams(TrainParams):
    """The in-project FID feature extractor: a small classifier fitted on the `features` split.

    It is also the class-consistency judge of conditional samples, so it is trained even when Inception
    weights are given for FID."""

    width: PositiveInt = 16  # 16/32/64 channels: 98.6 % held-out accuracy on the digits in 26 s
    feature_dim: PositiveInt = 64
    steps: PositiveInt = Field(350, description="it fits the features split by 350 (loss 0.0004; 0.0001 at 500)")
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 2e-3
    ema_decay: Decay = 0.99
    log_every: PositiveInt = 50

    @model_validator(mode="after")
    def _groups_divide_width(self) -> FIDFeaturesParams:
        if self.width % 8:
            raise ValueError(f"fid_features.width={self.width} must be a multiple of 8 (GroupNorm with 8 groups)")
        return self


class EvalParams(Strict):
    """How `evaluate@<model>` measures every model, the same way for all of them.

    Samples use per-sample seeds from each base seed in `seeds` (the same noise for every model), labels
    i mod K, and are compared with the held-out reference images. FID features come from the
    `fid_features` classifier unless `inception_weights` names torch-fidelity's Inception file (nothing is
    downloaded)."""

    inception_weights: str | None = Field(
        None, description="local weights-inception-2015-12-05-6726825d.pth; null: the fid_features classifier")
    num_samples: int = Field(256, ge=10, description="per seed and NFE, against the whole reference set (359 digits)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="base seeds of the per-sample noise, for every point")
    extra_seeds: list[int] = Field(default_factory=lambda: [3, 4],
                                   description="more seeds for the points cheap enough (NFE <= extra_seeds_max_nfe)")
    extra_seeds_max_nfe: PositiveFloat = Field(
        16, description="the headline points: one step, SeqRF's 4, the teacher's best")
    steps: list[NFE] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1,
                             description="8 and not 16 keeps make demo within 20 min; SeqRF takes the multiples of K")
    solvers: list[Literal["euler", "heun", "rk45"]] = Field(
        default_factory=lambda: ["euler"], min_length=1,
        description="velocity models (heun: 2n - 1 evaluations; rk45: its own); an epsilon teacher samples by DDIM")
    rk45_tolerance: PositiveFloat = Field(1e-3, description="rtol = atol of the rk45 solver")
    floor_draws: int = Field(5, ge=2, description="class-stratified draws of num_samples real images for the floor")
    reference_splits: int = Field(16, ge=2, description="split halves of the reference behind each interval")
    guidance_scale: float | None = Field(
        None, ge=0.0, description="null: the teacher as it made its pairs, velocity models unguided")
    straightness_steps: PositiveInt = 16
    batch_size: PositiveInt = 512
    prc_neighborhood: PositiveInt = 3

    @model_validator(mode="after")
    def _distinct(self) -> EvalParams:
        for name in ("seeds", "steps", "solvers"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"eval.{name} has repeated entries: {values}")
        if set(self.seeds) & set(self.extra_seeds) or len(set(self.extra_seeds)) != len(self.extra_seeds):
            raise ValueError(f"eval.extra_seeds {self.extra_seeds} must be distinct and none of eval.seeds "
                             f"{self.seeds}: a seed is one draw of the noise")
        if self.num_samples < 2 * (self.prc_neighborhood + 2):
            raise ValueError(f"eval.num_samples={self.num_samples} is too few for precision/recall with "
                             f"eval.prc_neighborhood={self.prc_neighborhood} on half of the samples: expected at "
                             f"least {2 * (self.prc_neighborhood + 2)}")
        return self
