"""A DiT that also takes the length `h` of a time interval: the network of MeanFlow and of shortcut models.

MeanFlow (Geng et al. 2025) learns the average velocity `u(x_t, t, t + h)` over `[t, t + h]`, shortcut models
(Frans et al. 2024) the step `s(x_t, t, d)` that takes `x_t` to `x_{t+d}`; both are a velocity network with a
second time input, so one step of any size is `x_{t+h} = x_t + h * f(x_t, t, h)` (docs/method.md, section 11).
MeanFlow's ablation conditions on `(t, t - r)`, the start and the length, and so does this model.

`IntervalDiT` is the pipeline's DiT, unchanged, plus an embedding of `h` added to the timestep-and-class
embedding that every block's adaLN modulation (and the final layer's) reads. The embedding's last layer starts
at zero, so an `IntervalDiT` initialised from a velocity model is that model at every `h`: training starts from
the 1-RF and only has to learn how the step bends with its length. Called without `interval` (or with `h = 0`) it
is an instantaneous velocity model like every other, so the pipeline's Euler solvers, straightness and
guidance apply to it as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, TimestepEmbedding, Timesteps
from safetensors.torch import load_file, save_file
from torch import nn

INTERVAL_FILE = "interval_embedding.safetensors"  # beside the DiT's own weights in a model folder
INTERVAL_SCALE = 999.0  # h in [0, 1] on the same scale as the timestep axis (models.dit.TIME_SCALE)
FREQUENCY_CHANNELS = 256  # DiT's sinusoidal width for its timestep


def _add_interval(module: CombinedTimestepLabelEmbeddings, args, output: torch.Tensor) -> torch.Tensor:
    """The forward hook on each block's conditioning embedding: adds the interval's embedding when one is set.

    A module-level function reading the module's own attribute (not a bound method of the model), so that a deep
    copy of the model (the training loop's EMA copy) adds its own embedding, not the original's."""
    interval = getattr(module, "reflow_interval", None)
    return output if interval is None else output + interval.to(output.dtype)


class IntervalDiT(nn.Module):
    """`forward(x, timestep, class_labels, interval=None)`: the DiT's output for the interval `[t, t + h]`.

    `interval` is `h` in `[0, 1]`, shape `[B]`; None is `h = 0` (the instantaneous velocity).
    """

    def __init__(self, dit: nn.Module, *, seed: int = 0) -> None:
        super().__init__()
        self.dit = dit
        self.config = dit.config  # what the stages read of a DiT (sample_size, num_embeds_ada_norm, ...)
        width = dit.config.num_attention_heads * dit.config.attention_head_dim
        self.interval_frequencies = Timesteps(FREQUENCY_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.interval_embedder = TimestepEmbedding(FREQUENCY_CHANNELS, width)
            nn.init.normal_(self.interval_embedder.linear_1.weight, std=0.02)
        nn.init.zeros_(self.interval_embedder.linear_2.weight)  # at h != 0 the model starts as the one it copies
        nn.init.zeros_(self.interval_embedder.linear_2.bias)
        self._conditioning = [m for m in dit.modules() if isinstance(m, CombinedTimestepLabelEmbeddings)]
        for module in self._conditioning:
            module.register_forward_hook(_add_interval)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                interval: torch.Tensor | None = None, return_dict: bool = True):
        h = torch.zeros((), device=hidden_states.device) if interval is None else interval
        h = torch.as_tensor(h, device=hidden_states.device).reshape(-1).expand(hidden_states.shape[0])
        frequencies = self.interval_frequencies(h * INTERVAL_SCALE).to(hidden_states.dtype)
        embedding = self.interval_embedder(frequencies)
        for module in self._conditioning:
            module.reflow_interval = embedding
        try:
            return self.dit(hidden_states, timestep=timestep, class_labels=class_labels, return_dict=return_dict)
        finally:
            for module in self._conditioning:
                module.reflow_interval = None

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True) -> None:
        """The DiT as diffusers saves it, and the interval embedding beside it (safetensors only)."""
        folder = Path(folder)
        self.dit.save_pretrained(folder, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.interval_embedder.state_dict().items()}, folder / INTERVAL_FILE)

    @classmethod
    def from_dit_folder(cls, dit: nn.Module, folder: Path) -> IntervalDiT:
        """The `IntervalDiT` saved in `folder`, around its already loaded DiT `dit`."""
        model = cls(dit)
        model.interval_embedder.load_state_dict(load_file(folder / INTERVAL_FILE))
        return model


def is_interval_model(folder: Path) -> bool:
    """Whether `folder` holds a saved `IntervalDiT` (its interval embedding beside the DiT)."""
    return (Path(folder) / INTERVAL_FILE).is_file()
