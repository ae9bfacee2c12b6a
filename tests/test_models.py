"""The DiT as the reference recipe expects it, the DDPM objective, and the VAE helpers."""

import pytest
import torch
from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding, Timesteps

from models.dit import build_dit, dit_epsilon, dit_velocity, init_where_shapes_match, load_dit, null_label
from models.vae import build_vae, images_to_unit, unit_to_images
from reflow.diffusion import DDPMObjective, drop_labels, make_ddpm_scheduler
from storage.checkpoints import save_model


def tiny_dit(learn_sigma=False, seed=0):
    return build_dit(sample_size=8, in_channels=4, num_classes=10, patch_size=2, num_layers=2,
                     num_attention_heads=2, attention_head_dim=8, learn_sigma=learn_sigma, seed=seed)


def test_adaln_zero_init_makes_the_initial_output_zero_and_blocks_identity():
    model = tiny_dit().eval()
    x = torch.randn(3, 4, 8, 8)
    out = model(x, timestep=torch.tensor([1.0, 500.0, 999.0]), class_labels=torch.tensor([0, 3, 10])).sample
    assert torch.count_nonzero(out) == 0
    for block in model.transformer_blocks:
        assert torch.count_nonzero(block.norm1.linear.weight) == 0


def test_reference_fixes_survive_save_and_load(tmp_path):
    model = tiny_dit()
    for p in model.parameters():  # move off the zero init so outputs are informative
        p.data.add_(0.05 * torch.randn_like(p))
    save_model(model, tmp_path / "dit", meta={"kind": "dit"})
    loaded = load_dit(tmp_path / "dit").eval()
    model.eval()
    for m in loaded.modules():
        if isinstance(m, LabelEmbedding):
            assert m.dropout_prob == 0.0
        if isinstance(m, Timesteps):
            assert m.downscale_freq_shift == 0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.tensor([1, 10])
    assert torch.equal(dit_epsilon(model, x, t, y), dit_epsilon(loaded, x, t, y))


def test_label_dropout_is_ours_only():
    model = tiny_dit().train()
    assert null_label(model) == 10
    emb = model.transformer_blocks[0].norm1.emb.class_embedder
    assert emb.embedding_table.num_embeddings == 11  # null row kept for guidance
    y = torch.arange(10).repeat(100)
    assert torch.equal(emb.token_drop(y) if emb.dropout_prob > 0 else y, y)
    g = torch.Generator().manual_seed(0)
    dropped = drop_labels(y, 0.1, 10, g)
    frac = (dropped == 10).float().mean().item()
    assert 0.06 < frac < 0.14
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])


def test_learned_sigma_outputs_twice_the_channels_and_velocity_scales_time():
    model = tiny_dit(learn_sigma=True)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    full = model(x, timestep=torch.tensor([999.0, 999.0]), class_labels=y).sample
    assert full.shape[1] == 8
    # Flow time 0 is noise, which the teacher knows as its timestep 999.
    assert torch.allclose(dit_velocity(model, x, torch.zeros(2), y), full[:, :4], atol=1e-5)


def time_embeddings(model, call) -> list[torch.Tensor]:
    """What every timestep embedder of `model` produced during `call()`."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
             for m in model.modules() if isinstance(m, TimestepEmbedding)]
    call()
    for h in hooks:
        h.remove()
    return seen


def test_a_velocity_model_from_the_teacher_sees_the_teachers_timestep_for_the_same_noise_level():
    teacher = tiny_dit(learn_sigma=True)
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    student = tiny_dit(seed=1)
    init_where_shapes_match(student, teacher)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    for t, timestep in ((0.0, 999.0), (1.0, 0.0), (0.25, 749.25)):  # noise, data, and in between
        ours = time_embeddings(student, lambda t=t: dit_velocity(student, x, torch.full((2,), t), y))
        theirs = time_embeddings(teacher, lambda s=timestep: teacher(x, timestep=torch.full((2,), s), class_labels=y))
        assert ours and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, theirs, strict=True)), t


def test_ddpm_objective_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_dit(learn_sigma=True)
    objective = DDPMObjective(make_ddpm_scheduler(1000, 1e-4, 0.02), null_label=10, label_dropout=0.1,
                              learn_sigma=True)
    batch = {"z1": torch.randn(32, 4, 8, 8) * 0.5 + 1.0, "label": torch.randint(0, 10, (32,))}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        loss = objective(model, batch, torch.Generator().manual_seed(step % 4), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_vae_shapes_and_image_range_round_trip():
    vae = build_vae(latent_channels=4, block_out_channels=[16, 16, 16], layers_per_block=1, norm_num_groups=8)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    z = vae.encode(images_to_unit(images)).latent_dist.mean
    assert z.shape == (2, 4, 8, 8)
    assert torch.equal(unit_to_images(images_to_unit(images)), images)


def test_missing_pretrained_vae_says_how_to_supply_it(tmp_path):
    import pytest

    from models.dit import ModelLoadError
    from models.vae import load_vae

    with pytest.raises(ModelLoadError) as err:
        load_vae("stabilityai/sd-vae-ft-ema-not-cached")
    text = str(err.value)
    assert "vae.pretrained='stabilityai/sd-vae-ft-ema-not-cached'" in text
    assert "local path" in text and "vae.pretrained: null" in text
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_vae(tmp_path)  # a folder without a model


def test_a_velocity_model_trained_on_another_time_axis_is_refused(tmp_path):
    from runtime.generator import GeneratorError, load_generator

    meta = {"objective": "rectified_flow_velocity", "kind": "rf1", "null_label": 10, "num_classes": 10,
            "latent_shape": [4, 8, 8], "scale_factor": 1.0}
    save_model(tiny_dit(), tmp_path / "old" / "transformer",
               meta={**meta, "time_convention": "t=0 noise z0, t=1 data z1; network sees t*999"})
    with pytest.raises(GeneratorError, match="another time axis"):
        load_generator(tmp_path / "old")
    save_model(tiny_dit(), tmp_path / "new" / "transformer",
               meta={**meta, "time_convention": "t=0 noise z0, t=1 data z1; timestep = (1 - t) * 999"})
    assert load_generator(tmp_path / "new").kind == "velocity"
