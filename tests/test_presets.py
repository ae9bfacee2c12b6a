"""The GPU presets, checked at tiny size on this CPU.

Each preset must validate as it stands, and its *structure* must run end to end: the same data source kind, the
same VAE kind (a pretrained diffusers folder with Stable Diffusion's config keys for ImageNet-256, a VAE trained
here for CIFAR-10), the same DiT patch size, learned-sigma and class setup, and bf16 autocast, with only the sizes
shrunk. The released DiT-XL/2 layout (a DiTPipeline folder whose `transformer/` names the legacy class, records no
LayerNorm epsilon and predicts 8 channels for 1000 classes) is rebuilt at tiny size and trained from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from accelerate.state import AcceleratorState
from PIL import Image
from ruamel.yaml import YAML

from imagedata.sources import load_digits
from models.dit import DIT_SUBFOLDER, REFERENCE_NORM_EPS, build_dit, dit_epsilon, load_dit, null_label
from models.vae import load_vae
from reflow.diffusion import DDPMObjective, make_ddpm_scheduler
from runtime.params import load_params
from training.loop import TrainConfig, make_accelerator, train

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {name: ROOT / "presets" / f"{name}.yaml" for name in ("cifar10", "imagenet256")}
SD_SCALE = 0.18215


def read_yaml(path: Path) -> dict:
    return YAML(typ="safe", pure=True).load(path.read_text())


def write_yaml(data: dict, path: Path) -> None:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with path.open("w") as f:
        yaml.dump(data, f)


# ---------------------------------------------------------------------------------------------------------
# Tiny stand-ins for the downloaded weights, in the layouts the presets point at
# ---------------------------------------------------------------------------------------------------------
def save_tiny_sd_vae(folder: Path) -> Path:
    """An AutoencoderKL with SD's config keys (4 blocks, 8x down, 4 latent channels, 0.18215), tiny widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  act_fn="silu", latent_channels=4, norm_num_groups=8, sample_size=256,
                  scaling_factor=SD_SCALE).save_pretrained(folder)
    return folder


def save_released_dit_layout(root: Path, *, sample_size: int, num_layers: int = 2) -> Path:
    """facebook/DiT-XL-2-256 at tiny width: model_index.json, transformer/ (legacy class name, no norm_eps, the
    2023 keys only, pickle-free .bin weights loaded with weights_only) and a vae/ subfolder."""
    from diffusers import Transformer2DModel

    torch.manual_seed(1)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=num_layers, sample_size=sample_size, patch_size=2,
                               num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                               attention_bias=True, activation_fn="gelu-approximate")
    with torch.no_grad():  # diffusers zero-initialises the output layers; a released model's are trained
        for q in model.parameters():
            q.add_(0.02 * torch.randn_like(q))
    model.save_pretrained(root / DIT_SUBFOLDER, safe_serialization=False)
    config_file = root / DIT_SUBFOLDER / "config.json"
    keys = ("activation_fn", "attention_bias", "attention_head_dim", "cross_attention_dim", "dropout", "in_channels",
            "norm_elementwise_affine", "norm_num_groups", "norm_type", "num_attention_heads", "num_embeds_ada_norm",
            "num_layers", "num_vector_embeds", "only_cross_attention", "out_channels", "patch_size", "sample_size",
            "upcast_attention", "use_linear_projection")
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
                                       **{k: saved[k] for k in keys}}, indent=2))
    save_tiny_sd_vae(root / "vae")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": "0.12.0.dev0",
        "scheduler": ["diffusers", "KarrasDiffusionSchedulers"], "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return root


def test_presets_validate_and_state_their_structure():
    cifar, imagenet = (load_params(PRESETS[n]) for n in ("cifar10", "imagenet256"))
    for p in (cifar, imagenet):
        assert p.compute.mixed_precision == "bf16" and p.compute.device == "cuda"
        assert p.data.source == "imagefolder"
    assert cifar.data.resolution == 32 and cifar.vae.pretrained is None
    assert imagenet.data.resolution == 256 and imagenet.vae.pretrained and imagenet.vae.scale_factor is None
    dit = imagenet.dit
    assert (dit.patch_size, dit.num_layers, dit.num_attention_heads, dit.attention_head_dim) == (2, 12, 12, 64)
    assert len(imagenet.vae.block_out_channels) == 4  # SD's 8x down: 256 px -> 32 x 32 latents
    # The commented DiT-XL/2 option must stay valid when it is uncommented.
    text = PRESETS["imagenet256"].read_text()
    assert "#   pretrained: models/DiT-XL-2-256" in text and "#   learn_sigma: true" in text
    raw = read_yaml(PRESETS["imagenet256"])
    raw["dit"] |= {"pretrained": "models/DiT-XL-2-256", "learn_sigma": True, "batch_size": 128}
    from runtime.params import parse_params

    assert parse_params(raw).dit.learn_sigma


def test_released_dit_xl_layout_loads_through_load_dit(tmp_path):
    root = save_released_dit_layout(tmp_path / "DiT-XL-2-256", sample_size=4)
    model = load_dit(root)  # the pipeline folder: the DiT comes from transformer/
    assert type(model).__name__ == "DiTTransformer2DModel"
    assert model.config.out_channels == 8 and null_label(model) == 1000
    assert model.config.norm_eps == REFERENCE_NORM_EPS  # released weights were trained with eps 1e-6
    # Every tensor came from the file (none left at a fresh initialisation).
    saved = torch.load(root / DIT_SUBFOLDER / "diffusion_pytorch_model.bin", weights_only=True)
    state = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
    x, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 999])
    t = torch.tensor([10.0, 500.0])
    assert model(x, timestep=t, class_labels=y).sample.shape == (2, 8, 4, 4)
    assert dit_epsilon(model, x, t, torch.tensor([1000, 3])).shape == (2, 4, 4, 4)  # null class for guidance
    assert load_dit(root / DIT_SUBFOLDER).config.num_embeds_ada_norm == 1000  # the subfolder itself works too
    vae = load_vae(root, subfolder="vae")
    assert vae.config.scaling_factor == SD_SCALE and vae.config.latent_channels == 4


def test_missing_dit_folder_names_both_layouts(tmp_path):
    from models.dit import ModelLoadError

    with pytest.raises(ModelLoadError, match="transformer/config.json"):
        load_dit(tmp_path)


def test_bf16_autocast_trains_on_cpu():
    """compute.mixed_precision: bf16 on a CPU-only machine: accelerate's CPU autocast runs the DiT's matmuls in
    bf16 while the weights, the optimizer state and the loss stay fp32."""
    p = load_params(PRESETS["imagenet256"]).dit
    model = build_dit(sample_size=4, in_channels=4, num_classes=1000, patch_size=p.patch_size, num_layers=1,
                      num_attention_heads=2, attention_head_dim=16, learn_sigma=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model.transformer_blocks[0].ff.net[2].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    objective = DDPMObjective(make_ddpm_scheduler(1000, 1e-4, 0.02), null_label=null_label(model),
                              label_dropout=0.1, learn_sigma=True)
    data = {"z1": torch.randn(32, 4, 4, 4), "label": torch.randint(0, 1000, (32,))}
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-3, ema_decay=0.9, grad_clip=1.0, log_every=2,
                      checkpoint_every=10**9)
    # accelerate keeps one process-wide state: another test in this worker may have set mixed_precision "no"
    # (a stage process makes one Accelerator, so only tests meet this). Start afresh and leave no bf16 behind.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = train(model, objective, data, cfg, make_accelerator("cpu", "bf16"), desc="bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen and set(seen) == {torch.bfloat16}
    assert np.isfinite(result.last_loss)
    trained = result.ema.state_dict()
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert any(not torch.equal(start[k], trained[k]) for k in start)


# ---------------------------------------------------------------------------------------------------------
# Each preset's structure end to end, shrunk
# ---------------------------------------------------------------------------------------------------------
def write_image_folder(folder: Path, classes: int = 3, per_class: int = 12) -> None:
    """Real images (the digits, coloured per class) in the ImageNet layout, at 40 px: prepare resizes them."""
    digits = load_digits(40)
    for c in range(classes):
        (folder / f"n0{c}").mkdir(parents=True)
        picks = np.flatnonzero(digits.labels == c)[:per_class]
        for i, k in enumerate(picks):
            rgb = digits.images[k].transpose(1, 2, 0).copy()
            rgb[..., c] = 255 - rgb[..., c]
            Image.fromarray(rgb).save(folder / f"n0{c}" / f"{i}.png")


def shrink(preset: Path, vae_folder: Path | None) -> dict:
    """The preset with sizes cut to seconds on a CPU; every structural choice left as the preset makes it."""
    raw = read_yaml(preset)
    raw["data"] |= {"path": "images", "resolution": 32 if vae_folder else 16, "reference_fraction": 0.25}
    raw["compute"] |= {"device": "cpu", "num_threads": 2}  # mixed_precision stays as the preset says (bf16)
    if vae_folder:
        raw["vae"] |= {"pretrained": str(vae_folder)}
    else:  # same number of blocks (same downsampling), narrow
        blocks = len(raw["vae"]["block_out_channels"])
        raw["vae"] |= {"block_out_channels": [8] * blocks, "layers_per_block": 1, "norm_num_groups": 8,
                       "steps": 6, "batch_size": 8, "log_every": 3, "checkpoint_every": 3}
    raw["extract"] |= {"batch_size": 16}
    raw["dit"] |= {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "steps": 6, "batch_size": 8,
                   "log_every": 3, "checkpoint_every": 3}
    raw["teacher_pairs"] |= {"num_samples": 12, "ddim_steps": 3, "batch_size": 8, "shard_size": 8,
                             "grid_samples": 6}
    return raw


def repro(root: Path, target: str) -> str:
    res = subprocess.run([sys.executable, "-m", "dvc", "repro", target], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def check_pairs(root: Path, n: int, shape: tuple[int, ...]) -> None:
    group = zarr.open_group(str(root / "artifacts" / "teacher_pairs" / "pairs.zarr"), mode="r")
    z0, z1 = np.asarray(group["z0"]), np.asarray(group["z1"])
    assert z0.shape == z1.shape == (n, *shape)
    assert np.isfinite(z1).all() and not np.allclose(z0, z1)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["cifar10", "imagenet256"])
def test_preset_structure_runs_vae_extract_dit_teacher_pairs(name, tmp_path, pipeline_repo):
    preset = load_params(PRESETS[name])
    vae_folder = save_tiny_sd_vae(tmp_path / "sd-vae-ft-ema") if preset.vae.pretrained else None
    raw = shrink(PRESETS[name], vae_folder)
    root = tmp_path / "repo"
    write_image_folder(root / "images")
    write_yaml(raw, tmp_path / "params.yaml")
    pipeline_repo(root, tmp_path / "params.yaml")
    out = repro(root, "teacher_pairs")
    for stage in ("prepare", "vae", "extract", "dit", "teacher_pairs"):
        assert f"Running stage '{stage}'" in out

    vae_meta = json.loads((root / "artifacts" / "vae" / "vae" / "reflow.json").read_text())
    latent = tuple(vae_meta["latent_shape"])
    down = 2 ** (len(preset.vae.block_out_channels) - 1)
    assert latent == (4, raw["data"]["resolution"] // down, raw["data"]["resolution"] // down)
    if vae_folder:  # the pretrained VAE is used as it is, its own scale factor recorded
        assert vae_meta["scale_factor"] == pytest.approx(SD_SCALE)
        assert vae_meta["pretrained"] == str(vae_folder)
    dit_config = json.loads((root / "artifacts" / "dit" / "transformer" / "config.json").read_text())
    assert dit_config["patch_size"] == preset.dit.patch_size
    assert dit_config["out_channels"] == 4 * (2 if preset.dit.learn_sigma else 1)
    assert dit_config["num_embeds_ada_norm"] == 3  # the image folder's classes; index 3 is the null label
    assert np.isfinite(json.loads((root / "metrics" / "dit.json").read_text())["train_loss"])
    check_pairs(root, 12, latent)

    if name != "imagenet256":
        return
    # The commented option: start from released DiT-XL/2 weights (pipeline folder, 8 channels, 1000 classes).
    released = save_released_dit_layout(tmp_path / "DiT-XL-2-256", sample_size=latent[-1], num_layers=2)
    raw["dit"] |= {"pretrained": str(released), "learn_sigma": True}
    write_yaml(raw, root / "params.yaml")
    out = repro(root, "teacher_pairs")
    assert "Running stage 'dit'" in out and "Running stage 'teacher_pairs'" in out
    assert "Running stage 'extract'" not in out
    dit_config = json.loads((root / "artifacts" / "dit" / "transformer" / "config.json").read_text())
    meta = json.loads((root / "artifacts" / "dit" / "transformer" / "reflow.json").read_text())
    assert dit_config["num_layers"] == 2  # the released model's depth, not dit.num_layers
    assert dit_config["out_channels"] == 8 and dit_config["norm_eps"] == REFERENCE_NORM_EPS
    assert meta["null_label"] == 1000 and meta["learn_sigma"] is True
    check_pairs(root, 12, latent)
