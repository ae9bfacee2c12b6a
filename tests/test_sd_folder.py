"""Stable Diffusion folders: what the project writes loads back exactly and in diffusers, and a user's folder that
lacks a component, holds pickles or names an unknown schedule is refused by name."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.sd import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_PAD_ID,
    MODEL_INDEX,
    SD15_SCHEDULE,
    SD_COMPONENTS,
    WEIGHTS,
    SDFolderError,
    build_text_encoder,
    build_unet,
    check_sd_folder,
    load_sd,
    save_sd,
    tiny_sd_folder,
)
from models.text import CLIP_VOCAB_SIZE, clip_tokenizer
from models.vae import build_vae

PROMPT = "a red seven"


def unet_output(unet, text_encoder, tokenizer) -> torch.Tensor:
    """The UNet's prediction for a fixed latent and timestep, conditioned on the encoded prompt."""
    ids = tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        context = text_encoder(ids).last_hidden_state
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return unet(z, torch.tensor([500]), encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """An SD folder written by save_sd, and its UNet's output before saving."""
    tokenizer = clip_tokenizer()
    text_encoder = build_text_encoder(seed=0)
    unet = build_unet(sample_size=8, in_channels=4, cross_attention_dim=text_encoder.config.hidden_size, seed=1)
    vae = build_vae(latent_channels=4, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, seed=2)
    folder = tmp_path_factory.mktemp("sd") / "teacher"
    save_sd(folder, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, schedule=SD15_SCHEDULE)
    return folder, unet_output(unet, text_encoder, tokenizer)


@pytest.fixture
def copy(saved, tmp_path: Path) -> Path:
    """A copy of the saved folder that a test may break."""
    return Path(shutil.copytree(saved[0], tmp_path / "teacher"))


def test_a_saved_folder_loads_back_with_the_same_unet_output(saved) -> None:
    folder, before = saved
    sd = load_sd(folder)
    assert not sd.unet.training and not sd.text_encoder.training and not sd.vae.training
    assert sd.schedule == SD15_SCHEDULE and sd.scale_factor == sd.vae.config.scaling_factor and sd.path == folder
    after = unet_output(sd.unet, sd.text_encoder, sd.tokenizer)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_diffusers_loads_the_folder_as_a_stable_diffusion_pipeline_and_samples(saved) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(saved[0])
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    images = pipe(PROMPT, height=16, width=16, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)


def test_save_sd_writes_only_safetensors_and_the_sd_tokenizer_files(saved) -> None:
    files = [p for p in saved[0].rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl", ".pth")]
    for name, weights in WEIGHTS.items():
        assert (saved[0] / name / weights).is_file()
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (saved[0] / "tokenizer").iterdir()}
    assert not [p for p in saved[0].parent.iterdir() if p.name.startswith(".tmp")]  # the atomic write cleaned up


def test_an_sd_layout_tokenizer_without_tokenizer_json_reads_back_as_clips(copy: Path) -> None:
    (copy / "tokenizer" / "tokenizer.json").unlink()  # what a Stable Diffusion release holds: vocab.json + merges.txt
    tokenizer = clip_tokenizer(copy / "tokenizer")
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer(PROMPT).input_ids == clip_tokenizer()(PROMPT).input_ids


def test_the_text_encoders_special_ids_are_the_tokenizers() -> None:
    tokenizer = clip_tokenizer()
    assert (CLIP_BOS_ID, CLIP_EOS_ID, CLIP_PAD_ID) == (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                       tokenizer.pad_token_id)
    config = build_text_encoder().config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (CLIP_BOS_ID, CLIP_EOS_ID, CLIP_PAD_ID)
    assert (config.vocab_size, config.max_position_embeddings) == (CLIP_VOCAB_SIZE, 77)


def test_the_small_models_are_deterministic_from_their_seed() -> None:
    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    kw = {"sample_size": 8, "in_channels": 4, "cross_attention_dim": 64}
    assert same(build_unet(**kw, seed=3), build_unet(**kw, seed=3))
    assert not same(build_unet(**kw, seed=0), build_unet(**kw, seed=1))
    assert same(build_text_encoder(seed=3), build_text_encoder(seed=3))


@pytest.mark.parametrize("name", [*SD_COMPONENTS, MODEL_INDEX])
def test_a_missing_component_is_named(copy: Path, name: str) -> None:
    target = copy / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    expected = f"no {name}" if name != "scheduler" else "no scheduler/scheduler_config.json"
    with pytest.raises(SDFolderError, match=expected):
        load_sd(copy)


@pytest.mark.parametrize("name", ["unet", "text_encoder", "vae"])
def test_pickled_weights_are_refused_with_the_file_named(copy: Path, name: str) -> None:
    weights = copy / name / WEIGHTS[name]
    pickle = weights.with_suffix(".bin")
    torch.save({"w": torch.zeros(1)}, pickle)  # never loaded: the check refuses it by its name
    weights.unlink()
    with pytest.raises(SDFolderError, match=rf"{name}/{pickle.name}.*safetensors"):
        check_sd_folder(copy)


def test_an_unknown_beta_schedule_is_refused_and_v_prediction_is_recorded(copy: Path) -> None:
    config_path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    assert load_sd(copy).schedule["prediction_type"] == "v_prediction"  # SD 2.1's; the caller decides
    config_path.write_text(json.dumps({**config, "beta_schedule": "warped"}))
    with pytest.raises(SDFolderError, match=r"scheduler_config\.json.*beta_schedule 'warped'"):
        load_sd(copy)
    del config["beta_schedule"], config["beta_end"]  # absent keys take SD 1.5's values
    config_path.write_text(json.dumps(config))
    assert load_sd(copy).schedule == SD15_SCHEDULE


def test_tiny_sd_folder_loads_and_components_that_do_not_fit_are_never_saved(tmp_path: Path) -> None:
    sd = load_sd(tiny_sd_folder(tmp_path / "tiny"))  # SD 1.5's shape and schedule, small
    assert sd.schedule == SD15_SCHEDULE and len(sd.vae.config.block_out_channels) == 2
    assert sd.vae.config.latent_channels == sd.unet.config.in_channels == 4 and len(sd.tokenizer) == CLIP_VOCAB_SIZE
    inpainting = build_unet(sample_size=8, in_channels=9, cross_attention_dim=64)
    with pytest.raises(SDFolderError, match="unet in_channels 9 != vae latent_channels 4"):
        save_sd(tmp_path / "bad", unet=inpainting, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, vae=sd.vae,
                schedule=sd.schedule)
    assert not (tmp_path / "bad").exists()
