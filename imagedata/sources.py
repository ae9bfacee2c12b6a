"""Image sources for the `prepare` stage: every source becomes uint8 N x 3 x H x W RGB plus int64 labels.

Three sources, one output shape:

- `load_digits`: scikit-learn's embedded handwritten digits (1,797 real 8x8 images, 10 classes), shipped
  inside the package so the pipeline runs end to end with no download. Drawn white-on-black (bright ink on
  a dark background, the MNIST convention) and upsampled with a bicubic filter.
- `load_image_folder`: the ImageNet layout, `root/<class>/<image>`, class index = position in the sorted
  folder names.
- `load_npz`: arrays in an `.npz`, in any of the usual layouts and encodings.

Photos are resized so the shorter side equals `resolution`, then centre-cropped to a square, as
torchvision's `Resize(resolution)` + `CenterCrop(resolution)` do, with PIL's (antialiased) bicubic filter.
Transparent pixels are composited onto white, which is how image viewers show them; dropping the alpha
channel instead would expose whatever colour the encoder left under fully transparent pixels.

The splits and class-stratified draws are in `imagedata.splits`, the sample grids in `imagedata.grids`.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageSet",
    "load_digits",
    "load_image_folder",
    "load_npz",
    "load_source",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
_MAX_LISTED = 20  # skipped files named in a warning before the rest are only counted


class DataError(ValueError):
    """Input the pipeline cannot use; the message names the file, folder or key and what was expected."""


@dataclass
class ImageSet:
    """A labelled image collection in the pipeline's one in-memory format.

    images: uint8, N x 3 x H x W, RGB. labels: int64, N, each in [0, len(class_names)).
    class_names: the name of each label index.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


# ---------------------------------------------------------------------------------------------------------
# Pixel helpers shared by the loaders
# ---------------------------------------------------------------------------------------------------------


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Flatten uint8 RGBA (... x 4, channels last) onto a white background; returns uint8 ... x 3."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _resize_center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Shorter side to `resolution`, then the central square; returns the pixels (H x W or H x W x C)."""
    width, height = image.size
    if (width, height) != (resolution, resolution):
        scale = resolution / min(width, height)
        # torchvision's rule: the short side is exact, the long side is truncated.
        new_w = resolution if width <= height else int(width * scale)
        new_h = resolution if height <= width else int(height * scale)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left = int(round((new_w - resolution) / 2.0))
        top = int(round((new_h - resolution) / 2.0))
        image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image)


def _pil_to_rgb(image: Image.Image, source: Path) -> Image.Image:
    """Any PIL mode (grey, palette, RGBA, CMYK, 16-bit grey, ...) as an 8-bit RGB image."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B"):
        # PIL clips these to 255 when converting, which would turn a 16-bit image white.
        deep = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(np.clip(deep, 0, 65535) * (255 / 65535)).astype(np.uint8), "L")
    elif image.mode == "F":
        raise DataError(f"{source}: floating-point image (PIL mode 'F'); expected 8- or 16-bit pixels")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return Image.fromarray(_composite_on_white(np.asarray(image.convert("RGBA"))), "RGB")
    return image.convert("RGB")


def _check_count(n: int, where: str) -> None:
    if n < 2:
        raise DataError(f"{where}: found {n} image(s); expected at least 2")


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------


def load_digits(resolution: int) -> ImageSet:
    """scikit-learn's 1,797 handwritten 8x8 digits as white-on-black RGB at `resolution` x `resolution`.

    The default dataset: real images that ship inside scikit-learn, so a fresh checkout can run the whole
    pipeline offline. Values 0..16 are scaled to 0..255 (ink bright, background black) and upsampled with
    a bicubic filter so the strokes stay smooth rather than blocky.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    _check_resolution(resolution)
    digits = sklearn_digits()
    small = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(img, "L").resize((resolution, resolution), Image.Resampling.BICUBIC))
            for img in small
        ]
    )
    images = np.ascontiguousarray(np.repeat(big[:, None], 3, axis=1))
    labels = digits.target.astype(np.int64)
    return ImageSet(images=images, labels=labels, class_names=[str(d) for d in range(10)])


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _load_image_file(path: Path, resolution: int) -> np.ndarray:
    """Decode one file fully and return its H x W x 3 uint8 pixels; a DataError names a bad file."""
    try:
        with Image.open(path) as image:
            image.load()  # Image.open is lazy: force the decode so truncated files fail here.
            rgb = _pil_to_rgb(image, path)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); expected a complete, readable image") from exc
    return _resize_center_crop(rgb, resolution)


def load_image_folder(path: str | Path, resolution: int) -> ImageSet:
    """Images in the ImageNet layout, `path/<class>/<image>`, labelled by the sorted class-folder names.

    Files are searched recursively inside each class folder (as torchvision's ImageFolder does). Hidden
    files and folders are ignored; files without an image extension, and files directly under `path`, are
    skipped with one warning listing them. Every image is decoded, converted to RGB (transparency over
    white), resized on its shorter side and centre-cropped.
    """
    _check_resolution(resolution)
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: folder does not exist; expected a folder with one subfolder per class")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected a folder with one subfolder per class")

    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    skipped = [p for p in entries if not p.is_dir()]
    if not class_dirs:
        raise DataError(f"{root}: no class subfolders; expected the layout {root}/<class>/<image>")

    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not _is_hidden(p, class_dir))
        image_files = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped.extend(p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS)
        if not image_files:
            raise DataError(
                f"{class_dir}: class folder '{class_dir.name}' has no images; "
                f"expected files with one of the extensions {', '.join(sorted(IMAGE_EXTENSIONS))}"
            )
        for file in image_files:
            images.append(_load_image_file(file, resolution))
            labels.append(label)

    if skipped:
        listed = ", ".join(str(p.relative_to(root)) for p in skipped[:_MAX_LISTED])
        more = f" and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
        warnings.warn(f"{root}: skipped {len(skipped)} non-image file(s): {listed}{more}", stacklevel=2)
    _check_count(len(images), str(root))
    return ImageSet(
        images=np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=[p.name for p in class_dirs],
    )


def _to_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    """N x H x W, N x H x W x C or N x C x H x W (C in 1, 3, 4) as N x H x W x C."""
    channels = (1, 3, 4)
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4:
        last, second = images.shape[-1] in channels, images.shape[1] in channels
        if last and not second:
            return images
        if second and not last:
            return images.transpose(0, 2, 3, 1)
        if last and second:
            raise DataError(
                f"{where}: shape {images.shape} is ambiguous between N x H x W x C and N x C x H x W; "
                "expected images larger than 4 pixels on a side"
            )
    raise DataError(
        f"{where}: shape {images.shape}; expected N x H x W, N x H x W x C or N x C x H x W with C in 1, 3, 4"
    )


def _to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 passes through; floats in [0, 1] are scaled to 0..255; anything else is refused."""
    if images.dtype == np.uint8:
        log.info("%s: detected uint8 pixels in 0..255", where)
        return images
    if np.issubdtype(images.dtype, np.floating):
        if images.size and not np.isfinite(images).all():
            raise DataError(f"{where}: float images contain NaN or inf; expected values in [0, 1]")
        low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise DataError(
                f"{where}: float images range over [{low:g}, {high:g}]; expected float in [0, 1] "
                "or uint8 in 0..255"
            )
        log.info("%s: detected float pixels in [0, 1]; scaling to 0..255", where)
        return np.round(images * 255.0).astype(np.uint8)
    raise DataError(f"{where}: images have dtype {images.dtype}; expected uint8 in 0..255 or float in [0, 1]")


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """1-D whole-number labels, none negative, as int64."""
    if labels.ndim != 1:
        raise DataError(f"{where}: labels have shape {labels.shape}; expected a 1-D array of N integers")
    if np.issubdtype(labels.dtype, np.floating):
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise DataError(f"{where}: labels contain non-integer values; expected integers >= 0")
    elif not np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_:
        raise DataError(f"{where}: labels have dtype {labels.dtype}; expected integers >= 0")
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: labels contain negative values (min {labels.min()}); expected ints >= 0")
    return labels.astype(np.int64)


def _read_npz(
    file: Path, images_key: str, labels_key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The images, labels and (if stored) class_names arrays of an .npz, or a DataError saying why not."""
    expected = "expected an .npz of plain (non-object) arrays"
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{file}: cannot read ({exc}); {expected}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{file}: holds a single array; expected an .npz archive of named arrays")
    with archive:
        present = sorted(archive.files)
        for key in (images_key, labels_key):
            if key not in present:
                raise DataError(f"{file}: no key '{key}'; keys present: {', '.join(present) or '(none)'}")
        arrays: dict[str, np.ndarray] = {}
        for key in (images_key, labels_key, "class_names"):
            if key in present:
                try:
                    arrays[key] = archive[key]
                except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                    raise DataError(f"{file} key '{key}': cannot read ({exc}); {expected}") from exc
    return arrays[images_key], arrays[labels_key], arrays.get("class_names")


def load_npz(
    path: str | Path, resolution: int, *, images_key: str = "images", labels_key: str = "labels"
) -> ImageSet:
    """Images and labels stored as arrays in an `.npz` (read with `allow_pickle=False`).

    `images_key` may be N x H x W (grey), N x H x W x C or N x C x H x W with C in 1 (grey), 3 (RGB) or
    4 (RGBA, composited onto white); uint8 in 0..255 or float in [0, 1]. `labels_key` holds N integers
    >= 0; there are max+1 classes, named by an optional `class_names` string array, else "0".."K-1".
    """
    _check_resolution(resolution)
    file = Path(path)
    if not file.is_file():
        raise DataError(
            f"{file}: file does not exist; expected an .npz with '{images_key}' and '{labels_key}'"
        )
    raw_images, raw_labels, raw_names = _read_npz(file, images_key, labels_key)
    where_images, where_labels = f"{file} key '{images_key}'", f"{file} key '{labels_key}'"
    nhwc = _to_nhwc(raw_images, where_images)
    labels = _check_labels(raw_labels, where_labels)
    if len(nhwc) != len(labels):
        raise DataError(
            f"{file}: '{images_key}' has {len(nhwc)} images but '{labels_key}' has {len(labels)} "
            "labels; expected one label per image"
        )
    _check_count(len(labels), where_images)

    if raw_names is None:
        class_names = [str(k) for k in range(int(labels.max()) + 1)]
    else:
        if raw_names.ndim != 1 or raw_names.dtype.kind not in "US":
            raise DataError(
                f"{file} key 'class_names': dtype {raw_names.dtype}, shape {raw_names.shape}; "
                "expected a 1-D array of strings"
            )
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw_names.tolist()]
        if labels.max() >= len(class_names):
            raise DataError(
                f"{where_labels}: label {labels.max()} is out of range for the {len(class_names)} names "
                f"in key 'class_names'; expected labels in [0, {len(class_names)})"
            )

    pixels = _to_uint8(nhwc, where_images)
    if pixels.shape[-1] == 4:
        pixels = _composite_on_white(pixels)
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    planes = pixels[..., 0] if mode == "L" else pixels
    resized = np.stack([_resize_center_crop(Image.fromarray(p, mode), resolution) for p in planes])
    if mode == "L":
        resized = np.repeat(resized[..., None], 3, axis=-1)
    return ImageSet(
        images=np.ascontiguousarray(resized.transpose(0, 3, 1, 2)), labels=labels, class_names=class_names
    )


def load_source(
    source: Literal["digits", "imagefolder", "npz"], path: str | Path | None, resolution: int
) -> ImageSet:
    """The `prepare` stage's one entry point: load `source` (with `path` for the ones on disk)."""
    if source == "digits":
        return load_digits(resolution)
    if source in ("imagefolder", "npz"):
        if path is None or str(path) == "":
            raise DataError(f"source '{source}' needs a path; expected data.path to name the folder or file")
        loader = load_image_folder if source == "imagefolder" else load_npz
        return loader(path, resolution)
    raise DataError(f"unknown source {source!r}; expected one of 'digits', 'imagefolder', 'npz'")
