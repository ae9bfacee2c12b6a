"""LPIPS (Zhang et al. 2018), the learned perceptual distance, built from local files only."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

# Per backbone: torchvision constructor, indices in `.features` whose outputs are tapped (the ReLUs the
# LPIPS paper uses) and the channel count of each tap.
_BACKBONES: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "vgg": ("vgg16", (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
    "alex": ("alexnet", (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
}
# LPIPS's input normalisation for images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LPIPS needs local {what} weights, and {path} is not a file (nothing is downloaded)")
    return path


class LPIPSLoss(nn.Module):
    """Learned perceptual distance between images in [-1, 1], averaged over the batch.

    Built only from local files, so it works offline:
    - `backbone_weights`: a torchvision state dict of `vgg16` or `alexnet` (the full model's, or one
      holding only the `features.*` keys);
    - `lin_weights`: the LPIPS linear heads as released with the `lpips` package
      (`lin{k}.model.1.weight`, shape `[1, C_k, 1, 1]`).
    A missing file raises `ValueError` naming it. Every parameter is frozen; gradients flow to the inputs.
    """

    def __init__(self, backbone_weights: str | Path, lin_weights: str | Path, *, net: str = "vgg") -> None:
        super().__init__()
        if net not in _BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; expected one of {sorted(_BACKBONES)}")
        constructor, taps, channels = _BACKBONES[net]
        backbone_state = torch.load(_require_file(backbone_weights, f"{net} backbone"), weights_only=True)
        lin_state = torch.load(_require_file(lin_weights, "LPIPS linear"), weights_only=True)

        features = getattr(torchvision.models, constructor)(weights=None).features
        features.load_state_dict(
            {k.removeprefix("features."): v for k, v in backbone_state.items() if k.startswith("features.")}
        )
        self.features = features[: taps[-1] + 1]
        self.taps = taps
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in channels)
        for k, lin in enumerate(self.lins):
            lin.weight.data.copy_(lin_state[f"lin{k}.model.1.weight"])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Distance between image batches `a` and `b` (`[B, 3, H, W]` in [-1, 1]), batch mean."""
        per_sample = sum(
            lin((fa - fb).pow(2)).mean(dim=(1, 2, 3))
            for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b), strict=True)
        )
        return per_sample.mean()
