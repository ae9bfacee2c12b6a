"""A text-to-image UNet behind the class chain's label interface: `PromptConditioned`.

Every stage of the class chain calls its network as `model(x, timestep=t, class_labels=y).sample` and guides it
by swapping labels for a null label. Here label i is prompt i of the model's prompt table and the null label,
one past the last prompt, is the empty prompt: Stable Diffusion's unconditional input, the caption it drops to
for classifier-free guidance. So teacher pairs, rectified flow, distillation and evaluation run a
text-conditioned UNet with the same code as a DiT: a pair's `label` names its prompt, and the table travels with
the model (its `config.json`) from the teacher to every model trained from it.

The folder a `PromptConditioned` saves is `config.json` (the table), `unet/`, `text_encoder/` and `tokenizer/`
in diffusers' and transformers' own formats, so diffusers users load the UNet and text encoder without this
project (README, "Text to image").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

CLASS_NAME = "PromptConditioned"


class PromptError(ValueError):
    """A prompt the model cannot take (too long for its context), with the prompt named."""


class PromptConditioned(nn.Module):
    """`unet(x, t, encoder_hidden_states=text_encoder(prompt ids))` with prompts addressed by label."""

    family = "text"

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer, prompts: list[str], *,
                 context_length: int = 77, train_text_encoder: bool = False):
        super().__init__()
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.prompts, self.context_length = list(prompts), int(context_length)
        self.register_buffer("input_ids", tokenize(tokenizer, [*self.prompts, ""], self.context_length),
                             persistent=False)
        self.text_encoder.requires_grad_(train_text_encoder)
        # What the class chain reads from a DiT's config: the null label (`num_embeds_ada_norm`) and the shapes.
        cfg = unet.config
        self.config = SimpleNamespace(num_embeds_ada_norm=len(self.prompts), in_channels=cfg.in_channels,
                                      out_channels=cfg.out_channels, sample_size=cfg.sample_size)

    @property
    def null_label(self) -> int:
        return len(self.prompts)

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden states for each label's prompt, [B, context, width]; each distinct
        prompt of the batch is encoded once (a guided batch is half empty prompts)."""
        unique, inverse = labels.unique(return_inverse=True)
        hidden = self.text_encoder(self.input_ids[unique]).last_hidden_state
        return hidden[inverse]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        return self.unet(x, timestep, encoder_hidden_states=self.encode(class_labels))

    def with_prompts(self, prompts: list[str]) -> PromptConditioned:
        """The same networks (shared, not copied) with another prompt table (`reflow sample --prompt`)."""
        return PromptConditioned(self.unet, self.text_encoder, self.tokenizer, prompts,
                                 context_length=self.context_length)

    def velocity_like(self, seed: int) -> PromptConditioned:
        """A fresh UNet of this one's shape, with a frozen copy of the text encoder and the same table: the
        velocity models of the text chain start here (and copy the teacher's UNet where shapes match)."""
        unet_class = type(self.unet)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = unet_class.from_config(self.unet.config)
        return PromptConditioned(unet, copy.deepcopy(self.text_encoder), self.tokenizer, self.prompts,
                                 context_length=self.context_length)

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True) -> None:
        """diffusers' `save_pretrained` contract (what `storage.checkpoints.save_model` calls): safetensors only."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(folder / "text_encoder")  # transformers 5: always safetensors
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        (folder / "config.json").write_text(json.dumps(
            {"_class_name": CLASS_NAME, "context_length": self.context_length, "prompts": self.prompts}, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> PromptConditioned:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        from models.text import clip_tokenizer

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
        return cls(unet, text_encoder.eval(), clip_tokenizer(folder / "tokenizer"), config["prompts"],
                   context_length=config["context_length"])


def is_prompt_conditioned(folder: Path) -> bool:
    """Whether `folder` holds a saved `PromptConditioned` (its config.json names the class)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") == CLASS_NAME
    except (OSError, ValueError):
        return False


def tokenize(tokenizer, prompts: list[str], context_length: int) -> torch.Tensor:
    """Token ids [N, context_length], padded as Stable Diffusion pads (to the full context); a prompt longer than
    the context is refused, not cut."""
    ids = tokenizer(prompts, padding="max_length", max_length=context_length, truncation=False,
                    return_tensors=None).input_ids
    for prompt, row in zip(prompts, ids, strict=True):
        if len(row) > context_length:
            raise PromptError(f"prompt {prompt!r} is {len(row)} tokens, more than the text encoder's context of "
                              f"{context_length} (start and end tokens included); shorten it or raise the context")
    return torch.tensor(ids, dtype=torch.long)
