"""The DiT: diffusers' `DiTTransformer2DModel`, brought in line with the reference recipe.

diffusers' `DiTTransformer2DModel` differs from facebookresearch/DiT in ways that matter for training
from scratch and for importing released weights: no adaLN-Zero initialisation, a
per-block label embedder with a hard-coded 10% dropout, and timestep frequencies divided by 127
instead of 128. `build_dit` and `load_dit` are the only ways this project makes a DiT, and both
apply `_reference_fixes`, so a saved and reloaded model behaves exactly as the one trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers: a missing hub id otherwise retries ~25 s

from diffusers import DiTTransformer2DModel  # noqa: E402
from diffusers.models.embeddings import LabelEmbedding, Timesteps  # noqa: E402

# Velocity models see flow time t on the teacher's timestep axis, timestep = (1 - t) * TIME_SCALE: noise (t = 0) is
# the teacher's step 999 and data (t = 1) its step 0, so the embedding they inherit from it starts the right way round.
TIME_SCALE = 999.0
TIME_AXIS = "timestep = (1 - t) * 999"  # recorded with every velocity model; a model is sampled on the axis it learned
REFERENCE_NORM_EPS = 1e-6  # facebookresearch/DiT's LayerNorm epsilon (diffusers defaults to 1e-5)
DIT_SUBFOLDER = "transformer"  # where a diffusers DiTPipeline folder keeps its DiT, and every stage its DiT


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says from where and how to supply it."""


def _reference_fixes(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Label dropout off (we drop labels ourselves, once per sample) and reference timestep frequencies."""
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0  # the table keeps its null row (index num_classes) for guidance
        elif isinstance(module, Timesteps):
            module.downscale_freq_shift = 0
    return model


def _adaln_zero_init(model: DiTTransformer2DModel) -> None:
    """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zeroed modulation and output layers.

    With zeroed adaLN modulation every block starts as the identity, which the reference learning rate
    and EMA settings assume.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    patch = model.pos_embed.proj
    nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
    nn.init.zeros_(patch.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_dit(
    *,
    sample_size: int,
    in_channels: int,
    num_classes: int,
    patch_size: int,
    num_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    learn_sigma: bool = False,
    seed: int = 0,
) -> DiTTransformer2DModel:
    """A class-conditional DiT with adaLN-Zero initialisation; `num_classes` is the null label."""
    if sample_size % patch_size:
        raise ValueError(f"latent size {sample_size} is not divisible by dit.patch_size={patch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiTTransformer2DModel(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=in_channels * (2 if learn_sigma else 1),
            num_layers=num_layers,
            sample_size=sample_size,
            patch_size=patch_size,
            num_embeds_ada_norm=num_classes,
            norm_eps=REFERENCE_NORM_EPS,
        )
        _adaln_zero_init(model)
    return _reference_fixes(model)


def load_dit(path: str | Path) -> DiTTransformer2DModel:
    """A DiT from a diffusers model folder, or from a pipeline folder holding one in `transformer/` (or the text
    chain's `PromptConditioned` UNet, which every stage calls the same way).

    The released DiT weights (facebook/DiT-XL-2-256) come as a `DiTPipeline` folder whose `transformer/config.json`
    names the legacy `Transformer2DModel` class (diffusers maps it to `DiTTransformer2DModel`) and records no
    `norm_eps`: those weights were trained with the reference LayerNorm epsilon 1e-6, not diffusers' default 1e-5.
    """
    path = Path(path)
    if not (path / "config.json").is_file() and (path / DIT_SUBFOLDER / "config.json").is_file():
        path = path / DIT_SUBFOLDER
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path}: no DiT here (expected a diffusers folder with config.json, or a pipeline "
                             f"folder with {DIT_SUBFOLDER}/config.json such as facebook/DiT-XL-2-256)")
    from models.interval import IntervalDiT, is_interval_model
    from models.prompted import PromptConditioned, is_prompt_conditioned

    if is_prompt_conditioned(path):  # the text chain's UNet, behind the same interface (models/prompted.py)
        try:
            return PromptConditioned.from_pretrained(path)
        except Exception as exc:
            raise ModelLoadError(f"{path}: the text-conditioned model cannot be loaded ({exc.__class__.__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); rerun the stage that made "
                                 "it") from None
    try:
        recorded = json.loads(config.read_text())
        extra = {} if "norm_eps" in recorded else {"norm_eps": REFERENCE_NORM_EPS}
        model = _reference_fixes(DiTTransformer2DModel.from_pretrained(path, **extra))
        if is_interval_model(path):  # MeanFlow's and the shortcut model's second time input
            model = IntervalDiT.from_dit_folder(model, path)
    except Exception as exc:  # safetensors, JSON and shape errors come in many types; all mean "unusable"
        raise ModelLoadError(f"{path}: the DiT's weights or config cannot be loaded ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); the checkpoint is truncated or "
                             "altered: rerun the stage that made it (`dvc repro` sees the change)") from None
    return model


def null_label(model: DiTTransformer2DModel) -> int:
    """The class index reserved for 'no class' (classifier-free guidance)."""
    return int(model.config.num_embeds_ada_norm)


def dit_epsilon(model: DiTTransformer2DModel, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor):
    """Epsilon prediction; with learned sigma the variance channels are dropped (DDIM does not use them)."""
    out = model(x, timestep=timesteps, class_labels=y).sample
    return out[:, : x.shape[1]]


def flow_timestep(t: torch.Tensor) -> torch.Tensor:
    """The teacher's timestep for flow time `t` (t = 0 noise, t = 1 data): `(1 - t) * 999` (docs/method.md, 1)."""
    return (1 - t) * TIME_SCALE


def flow_time(timestep: torch.Tensor) -> torch.Tensor:
    """The inverse of `flow_timestep`: the flow time a network input timestep stands for."""
    return 1 - timestep / TIME_SCALE


def dit_velocity(model: DiTTransformer2DModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 interval: torch.Tensor | None = None):
    """Velocity prediction at time t in [0, 1] (t = 0 noise, t = 1 data), on the teacher's timestep axis; with
    `interval` h (an interval model, models/interval.py) the average velocity over [t, t + h]."""
    extra = {} if interval is None else {"interval": interval}
    out = model(x, timestep=flow_timestep(t), class_labels=y, **extra).sample
    return out[:, : x.shape[1]]


def init_where_shapes_match(model: nn.Module, source: nn.Module) -> tuple[int, int]:
    """Copy every tensor of `source` whose name and shape match into `model`; (copied, total) counts.

    Used to start a velocity model or a smaller student from the teacher: matching layers start
    trained, the rest (e.g. a different output width) keep their fresh initialisation.
    """
    target = model.state_dict()
    matched = {k: v for k, v in source.state_dict().items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return len(matched), len(target)
