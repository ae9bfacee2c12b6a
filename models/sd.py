"""Stable Diffusion folders: the text-to-image chain's teacher format, checked, loaded, built small and saved.

The chain's teacher is a diffusers `StableDiffusionPipeline` folder: a real SD 1.5 / 2.1 folder given by local path,
or a small teacher trained here and saved in the same layout, so one loader serves both and a folder the project
writes is one diffusers users can load. A user's folder is checked before anything is loaded, so a missing or
pickled component is reported by name rather than as a deep `from_pretrained` error: weights are read from
safetensors only, since unpickling a user's `.bin`/`.ckpt` could run code. Nothing is downloaded (HF_HUB_OFFLINE is
set by `models.dit`, and every load is `local_files_only`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.dit import ModelLoadError  # also sets HF_HUB_OFFLINE before diffusers is imported
from models.text import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, TokenizerError, clip_tokenizer
from storage.atomic import atomic_dir, atomic_write_json, atomic_write_text

# What a diffusers Stable Diffusion folder holds, in order, with the (library, class) its model_index.json names.
SD_COMPONENTS: dict[str, tuple[str, str]] = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "vae": ("diffusers", "AutoencoderKL"),
    "scheduler": ("diffusers", "DDIMScheduler"),  # what save_sd writes; a user's folder may name another scheduler
}
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# SD 1.5's training schedule (its scheduler_config.json): the defaults for keys a folder leaves out.
SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # the ones diffusers' DDPM/DDIM schedulers know
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # SD 1.5 predicts epsilon, SD 2.1 (768) v
# CLIP's two specials close its vocabulary (models.text.clip_vocab); the tokenizer pads with <|endoftext|>.
CLIP_BOS_ID, CLIP_EOS_ID = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1
CLIP_PAD_ID = CLIP_EOS_ID
NEEDS = f"it needs {', '.join(SD_COMPONENTS)}"  # the end of every "component missing" message


class SDFolderError(ModelLoadError):
    """A Stable Diffusion folder that is incomplete, pickled or inconsistent, with the folder and file named."""


def _check_weights(path: Path, name: str) -> None:
    """`name/` has its config and its weights as safetensors (one file, or a sharded index)."""
    sub, weights = path / name, WEIGHTS[name]
    if not sub.is_dir():
        raise SDFolderError(f"{path}: the Stable Diffusion folder has no {name}/ (expected {name}/config.json and its "
                            f"weights as .safetensors, {name}/{weights}); {NEEDS}")
    if not (sub / "config.json").is_file():
        raise SDFolderError(f"{path}: {name}/ has no config.json (expected {name}/config.json beside {weights})")
    if (sub / weights).is_file() or (sub / f"{weights}.index.json").is_file():
        return
    pickles = sorted(p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise SDFolderError(f"{path}: {name}/ holds its weights only as pickle ({name}/{pickles[0]}); this project "
                            "never unpickles a user's file: convert them to safetensors (load them where you trust "
                            f"the file and save_pretrained with safetensors) as {name}/{weights}")
    found = sorted(p.name for p in sub.iterdir() if p.suffix == ".safetensors")
    raise SDFolderError(f"{path}: {name}/ has no {weights} (found {', '.join(found) or 'no weights'}); expected its "
                        "full-precision weights as safetensors under that name")


def read_schedule(path: str | Path) -> dict[str, Any]:
    """The training noise schedule from `scheduler/scheduler_config.json`, SD 1.5's values where a key is absent."""
    config = Path(path) / "scheduler" / SCHEDULER_CONFIG
    if not config.is_file():
        raise SDFolderError(f"{path}: the Stable Diffusion folder has no scheduler/{SCHEDULER_CONFIG} (the noise "
                            f"schedule the UNet was trained with); {NEEDS}")
    try:
        recorded = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SDFolderError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(recorded, dict):
        raise SDFolderError(f"{config}: holds {type(recorded).__name__}, expected a JSON object")
    return _schedule({k: recorded.get(k, v) for k, v in SD15_SCHEDULE.items()}, config)


def _schedule(schedule: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """The five schedule keys, checked and typed; a schedule diffusers could not rebuild is refused."""
    if schedule["beta_schedule"] not in BETA_SCHEDULES:
        raise SDFolderError(f"{source}: beta_schedule {schedule['beta_schedule']!r} is not one of "
                            f"{', '.join(BETA_SCHEDULES)}; the teacher's noise levels cannot be rebuilt from it")
    if schedule["prediction_type"] not in PREDICTION_TYPES:
        raise SDFolderError(f"{source}: prediction_type {schedule['prediction_type']!r} is not one of "
                            f"{', '.join(PREDICTION_TYPES)}")
    try:
        out = {**{k: schedule[k] for k in SD15_SCHEDULE}, "num_train_timesteps": int(schedule["num_train_timesteps"]),
               "beta_start": float(schedule["beta_start"]), "beta_end": float(schedule["beta_end"])}
    except (TypeError, ValueError) as e:
        raise SDFolderError(f"{source}: num_train_timesteps, beta_start and beta_end must be numbers ({e})") from None
    if out["num_train_timesteps"] < 1 or not 0 < out["beta_start"] < out["beta_end"] < 1:
        raise SDFolderError(f"{source}: expected num_train_timesteps >= 1 and 0 < beta_start < beta_end < 1, got "
                            f"{out['num_train_timesteps']}, {out['beta_start']}, {out['beta_end']}")
    return out


def _check(path: Path):
    """check_sd_folder's work; returns the tokenizer it had to load anyway, so load_sd reads it once."""
    if path.is_file():
        raise SDFolderError(f"{path}: a single-file checkpoint; expected a diffusers Stable Diffusion folder (convert "
                            "it with StableDiffusionPipeline.from_single_file(...).save_pretrained(folder))")
    if not path.is_dir():
        raise SDFolderError(f"{path}: no such folder; expected a diffusers Stable Diffusion folder ({NEEDS})")
    if not (path / MODEL_INDEX).is_file():
        raise SDFolderError(f"{path}: the Stable Diffusion folder has no {MODEL_INDEX} (written by diffusers' "
                            f"save_pretrained beside the component folders); {NEEDS}")
    for name in ("unet", "text_encoder"):
        _check_weights(path, name)
    if not (path / "tokenizer").is_dir():
        raise SDFolderError(f"{path}: the Stable Diffusion folder has no tokenizer/ (expected CLIP's vocab.json and "
                            f"merges.txt there); {NEEDS}")
    try:
        tokenizer = clip_tokenizer(path / "tokenizer")
    except TokenizerError as e:
        raise SDFolderError(f"{path}: tokenizer/ is not CLIP's: {e}") from None
    _check_weights(path, "vae")
    read_schedule(path)
    return tokenizer


def check_sd_folder(path: str | Path) -> None:
    """Raise SDFolderError naming the component and file if `path` is not a complete, safetensors-only SD folder."""
    _check(Path(path))


def _fit(where: Path, unet, text_encoder, tokenizer, vae) -> None:
    """Refuse components that would only fail at the first sample: shapes that must agree between them."""
    te, u, v, mismatches = text_encoder.config, unet.config, vae.config, []
    if te.vocab_size != len(tokenizer):
        mismatches.append(f"text_encoder vocab_size {te.vocab_size} != the tokenizer's {len(tokenizer)}")
    if u.cross_attention_dim != te.hidden_size:
        mismatches.append(f"unet cross_attention_dim {u.cross_attention_dim} != text_encoder hidden_size "
                          f"{te.hidden_size}")
    if u.in_channels != v.latent_channels:  # an inpainting UNet takes 9: image, mask and masked-image latents
        mismatches.append(f"unet in_channels {u.in_channels} != vae latent_channels {v.latent_channels}")
    if mismatches:
        raise SDFolderError(f"{where}: the components do not fit together: {'; '.join(mismatches)}")


@dataclass
class SDModel:
    unet: Any  # diffusers UNet2DConditionModel
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    vae: Any  # diffusers AutoencoderKL
    schedule: dict[str, Any]  # num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type
    scale_factor: float  # latents = vae.encode(x).latent_dist.sample() * scale_factor (SD: 0.18215)
    path: Path


def load_sd(path: str | Path, *, dtype: torch.dtype = torch.float32) -> SDModel:
    """A checked Stable Diffusion folder's models, in eval mode, from local safetensors only.

    A prediction_type other than epsilon (SD 2.1's v_prediction) is recorded in `schedule`, not refused: the caller
    knows whether it can use it. Components that do not fit together are refused here, not at the first sample.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    tokenizer = _check(path)
    local = {"use_safetensors": True, "local_files_only": True}
    loaders = {"unet": lambda: UNet2DConditionModel.from_pretrained(path / "unet", **local, torch_dtype=dtype),
               # transformers 5 names it dtype (torch_dtype is its deprecated alias); diffusers still torch_dtype
               "text_encoder": lambda: CLIPTextModel.from_pretrained(path / "text_encoder", **local, dtype=dtype),
               "vae": lambda: AutoencoderKL.from_pretrained(path / "vae", **local, torch_dtype=dtype)}
    models = {}
    for name, load in loaders.items():
        try:
            models[name] = load().eval()
        except Exception as exc:  # safetensors, JSON and shape errors come in many types; all mean "unusable"
            raise SDFolderError(f"{path}: {name}/ cannot be loaded ({exc.__class__.__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); its config or weights are "
                                "damaged or not this component's") from None
    unet, text_encoder, vae = models["unet"], models["text_encoder"], models["vae"]
    _fit(path, unet, text_encoder, tokenizer, vae)
    return SDModel(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, schedule=read_schedule(path),
                   scale_factor=float(vae.config.scaling_factor), path=path)


def build_text_encoder(*, hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                       intermediate_size: int = 128, seed: int = 0):
    """A small CLIP text encoder over CLIP's vocabulary and 77 positions, with the tokenizer's special ids (the
    pooled output is read at the first eos, so eos must be the tokenizer's)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                            max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",  # CLIP's and SD 1.5's
                            bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_PAD_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config).eval()


def build_unet(*, sample_size: int, in_channels: int, cross_attention_dim: int,
               block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1, attention_head_dim: int = 8,
               norm_num_groups: int = 8, seed: int = 0):
    """A small SD-shaped UNet: cross-attention in every down block but the last, mirrored on the way up.

    `attention_head_dim` is diffusers' (and SD's config) name for what is the number of heads per block.
    """
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    if n < 2:
        raise ValueError(f"block_out_channels={block_out_channels}: an SD UNet needs at least two blocks")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim,
        ).eval()


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained (transformers 5 writes tokenizer.json only), plus SD's vocab.json and merges.txt, which
    older transformers and other SD tools read; both come from the same BPE model."""
    tokenizer.save_pretrained(folder)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    atomic_write_text(folder / "vocab.json", json.dumps(tokenizer.get_vocab(), ensure_ascii=False) + "\n")
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")


def save_sd(folder: str | Path, *, unet, text_encoder, tokenizer, vae, schedule: dict[str, Any]) -> None:
    """Write a StableDiffusionPipeline folder (safetensors only, DDIM scheduler, no safety checker), atomically:
    it is built in a temporary sibling, checked, then renamed, so a crash never leaves half a folder."""
    from diffusers import DDIMScheduler, __version__

    folder = Path(folder)
    _fit(folder, unet, text_encoder, tokenizer, vae)
    schedule = _schedule({**SD15_SCHEDULE, **schedule}, f"save_sd({folder})")
    with atomic_dir(folder) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        text_encoder.save_pretrained(tmp / "text_encoder")  # transformers 5 writes safetensors only
        _save_tokenizer(tokenizer, tmp / "tokenizer")
        # SD's sampling conventions: the last step lands on alpha_bar[0], not 1, and timesteps start at 1.
        DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(
            tmp / "scheduler")
        atomic_write_json(tmp / MODEL_INDEX, {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": __version__,
            **{name: list(cls) for name, cls in SD_COMPONENTS.items()},
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
        })
        _check(tmp)  # a folder save_sd writes is one load_sd accepts, or it never appears


def tiny_sd_folder(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny random-weight folder in SD 1.5's layout and schedule (4-channel VAE over two blocks, 8x8 latents of
    16x16 images), for tests and for checking the by-path teacher route end to end."""
    from models.vae import build_vae

    text_encoder = build_text_encoder(seed=seed)
    vae = build_vae(latent_channels=4, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                    seed=seed + 1)
    unet = build_unet(sample_size=8, in_channels=4, cross_attention_dim=text_encoder.config.hidden_size, seed=seed + 2)
    save_sd(path, unet=unet, text_encoder=text_encoder, tokenizer=clip_tokenizer(), vae=vae, schedule=SD15_SCHEDULE)
    return Path(path)
