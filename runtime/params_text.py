"""The text pipeline's sections of `params.yaml` (runtime/text_chain.py): its own two, and its copies of the class
pipeline's, sized so that the whole text chain runs on the embedded default in minutes on 2 cores."""

from __future__ import annotations

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from runtime.params_common import NFE, Decay, Strict, TrainParams
from runtime.params_stages import DistillParams, EvalParams, FIDFeaturesParams, RF1Params, TeacherPairsParams

TEXT_MODELS = ("teacher", "rf1", "distill")  # what text_evaluate_models may name


class TextDataParams(Strict):
    """Captioned images and the prompts file: the embedded digits painted in a colour and captioned with both
    ("a red seven"), split like `data`; pair generation reads the prompts file."""

    prompts: str = Field("text/prompts.txt", description=(
        "UTF-8, one prompt per line: the prompt table of every model of the text chain (each image's caption "
        "must be one)"))
    resolution: PositiveInt = 32
    reference_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    features_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    floor_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    split_seed: int = 0
    colour_seed: int = Field(0, description="the colour of image i comes from (colour_seed, i) alone")


class TextTeacherParams(TrainParams):
    """The text-conditioned teacher: a Stable Diffusion folder by local path, or a small UNet2DConditionModel and
    CLIP text encoder trained here by DDPM epsilon prediction with caption dropout (for classifier-free guidance)."""

    pretrained: str | None = Field(None, description=(
        "a local diffusers Stable Diffusion folder (unet, text_encoder, tokenizer, vae, scheduler); null trains one"))
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    layers_per_block: PositiveInt = 1
    attention_head_dim: PositiveInt = 8
    text_hidden_size: PositiveInt = Field(64, description="the CLIP text encoder's width (the UNet's cross-attention)")
    text_layers: PositiveInt = 2
    text_heads: PositiveInt = 4
    context_length: int = Field(8, ge=3, le=77, description=(
        "tokens per prompt, start and end included (SD: 77); 'a red seven' is 5"))
    train_text_encoder: bool = True  # a pretrained teacher's is frozen, as InstaFlow keeps it
    caption_dropout: Decay = Field(0.1, description="captions dropped to the empty prompt, for guidance")
    num_train_timesteps: int = Field(1000, gt=1)
    beta_start: PositiveFloat = 1e-4
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    steps: PositiveInt = Field(2500, description=(
        "the text chain's biggest cost (~6 min); 1600 halved the student's prompt consistency (measured)"))
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    ema_decay: Decay = 0.999
    checkpoint_every: PositiveInt = 250

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> TextTeacherParams:
        if self.text_hidden_size % self.text_heads:
            raise ValueError(f"text_teacher.text_hidden_size={self.text_hidden_size} must be a multiple of "
                             f"text_teacher.text_heads={self.text_heads}")
        bad = [c for c in self.block_out_channels if c % 8 or c % self.attention_head_dim]
        if bad:
            raise ValueError(f"text_teacher.block_out_channels {self.block_out_channels}: {bad} must be multiples of "
                             f"8 (GroupNorm) and of text_teacher.attention_head_dim={self.attention_head_dim}")
        return self


# The class sections' copies, with the text chain's defaults as fields of their own (a key left out of a text
# section then takes the value params.yaml shows for it, not the class section's).
class TextTeacherPairsParams(TeacherPairsParams):
    num_samples: PositiveInt = 768
    ddim_steps: PositiveInt = 25  # InstaFlow's DDIM steps
    batch_size: PositiveInt = 128
    shard_size: PositiveInt = 128
    seed: int = 2468
    grid_samples: PositiveInt = 40


class TextRF1Params(RF1Params):
    eval_samples: PositiveInt = 128
    steps: PositiveInt = 800


class TextDistillParams(DistillParams):
    source: str = Field("rf1", description="the text chain distills its rf1 (InstaFlow's 2-RF)")
    classic_source: str = Field("rf1", description="unused: the text chain has no classic chain")
    num_samples: PositiveInt = 640
    solver_steps: PositiveInt = 16
    pairs_batch_size: PositiveInt = 128
    shard_size: PositiveInt = 128
    steps: PositiveInt = 600


class TextFIDFeaturesParams(FIDFeaturesParams):
    steps: PositiveInt = 500


class TextEvalParams(EvalParams):
    num_samples: int = Field(200, ge=10, description="5 per prompt, against the whole reference split")
    extra_seeds: list[int] = Field(default_factory=list)
    extra_seeds_max_nfe: PositiveFloat = 8
    steps: list[NFE] = Field(default_factory=lambda: [1, 2, 4, 25], min_length=1,
                             description="25: the teacher's DDIM steps")
