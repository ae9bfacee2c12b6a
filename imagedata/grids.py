"""The sample grids every stage writes: uint8 images tiled into one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["GRID_PADDING", "make_grid", "save_grid"]

GRID_PADDING = 2  # pixels between and around the tiles of a sample grid


def make_grid(images: np.ndarray, nrow: int, *, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 N x 3 x H x W images, `nrow` per row, into one uint8 H' x W' x 3 picture.

    Like torchvision's `make_grid`: 2 px of padding between and around the tiles, so
    H' = rows * (H + 2) + 2 and W' = min(nrow, N) * (W + 2) + 2. The padding is white by default so the
    tiles stay apart on dark images such as the white-on-black digits.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            f"images must be non-empty uint8 N x 3 x H x W, got {images.dtype} with shape {images.shape}"
        )
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, _, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    pad = GRID_PADDING
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    for i, image in enumerate(images):
        top = pad + (i // cols) * (h + pad)
        left = pad + (i % cols) * (w + pad)
        grid[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int) -> None:
    """Write `make_grid(images, nrow)` as a PNG at `path`, creating its folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow), "RGB").save(out, format="PNG")
