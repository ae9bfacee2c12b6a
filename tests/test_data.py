"""images: every source yields uint8 N x 3 x R x R RGB with int64 labels, or a clear DataError."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagedata.grids import make_grid, save_grid
from imagedata.sources import DataError, ImageSet, load_digits, load_image_folder, load_npz, load_source
from imagedata.splits import class_grid_indices, split_dataset, stratified_sample


def _check_image_set(data: ImageSet, n: int, resolution: int, n_classes: int) -> None:
    assert data.images.shape == (n, 3, resolution, resolution)
    assert data.images.dtype == np.uint8
    assert data.images.flags.c_contiguous
    assert data.labels.shape == (n,)
    assert data.labels.dtype == np.int64
    assert len(data.class_names) == n_classes
    assert data.labels.min() >= 0 and data.labels.max() < n_classes


# ---------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return load_digits(16)


def test_digits_shape_and_classes(digits: ImageSet) -> None:
    _check_image_set(digits, 1797, 16, 10)
    assert digits.class_names == [str(d) for d in range(10)]
    assert set(np.unique(digits.labels)) == set(range(10))
    # Grey digits replicated to RGB, using the full 0..255 range.
    assert (digits.images == digits.images[:, :1]).all()
    assert digits.images.max() >= 250


def test_digits_are_white_on_black_zeros_with_a_hole(digits: ImageSet) -> None:
    zero = digits.images[digits.labels == 0, 0].astype(np.float64).mean(axis=0)
    centre = zero[6:10, 6:10].mean()
    ring = np.concatenate([zero[2:4, 5:11].ravel(), zero[12:14, 5:11].ravel()]).mean()
    corners = np.array([zero[0, 0], zero[0, -1], zero[-1, 0], zero[-1, -1]]).mean()
    assert ring > centre + 60  # the stroke of a 0 is bright, its hole dark
    assert corners < 20  # background is black
    one = digits.images[digits.labels == 1, 0].astype(np.float64).mean(axis=0)
    assert one[6:10, 6:10].mean() > centre + 60  # a 1 has ink where a 0 has its hole


def test_digits_resolution_follows_argument() -> None:
    assert load_digits(8).images.shape == (1797, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------------
# image folder
# ---------------------------------------------------------------------------------------------------------


def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_image_folder_modes_sizes_and_labels(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _save(root / "cat" / "rgb.png", Image.new("RGB", (20, 10), (200, 10, 30)))
    _save(root / "cat" / "GREY.JPG", Image.new("L", (12, 24), 77))
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    _save(root / "dog" / "clear.png", transparent)
    palette = Image.new("P", (9, 9), 0)
    palette.putpalette([10, 220, 40] + [0] * 765)
    _save(root / "dog" / "pal.gif", palette)
    _save(root / "dog" / "cmyk.tiff", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))  # pure red
    _save(root / "dog" / ".hidden.png", Image.new("RGB", (8, 8)))
    _save(root / ".ipynb_checkpoints" / "x.png", Image.new("RGB", (8, 8)))
    (root / "dog" / "notes.txt").write_text("not an image")

    with pytest.warns(UserWarning, match="notes.txt"):
        data = load_image_folder(root, 8)

    _check_image_set(data, 5, 8, 2)
    assert data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1, 1, 1]  # sorted files: GREY.JPG, rgb.png | clear, cmyk, pal
    centre = data.images[:, :, 4, 4]
    assert np.abs(centre[0].astype(int) - 77).max() <= 2  # grey replicated to RGB
    assert centre[1].tolist() == [200, 10, 30]
    assert centre[2].tolist() == [255, 255, 255]  # transparent composited onto white
    assert centre[3].tolist() == [255, 0, 0]  # CMYK converted
    assert centre[4].tolist() == [10, 220, 40]  # palette expanded


def test_image_folder_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    for name, value in (("dark.png", 16384), ("bright.png", 65535)):
        _save(tmp_path / "a" / name, Image.fromarray(np.full((8, 8), value, np.uint16)))
    data = load_image_folder(tmp_path, 8)
    assert data.images[:, :, 4, 4].tolist() == [[255] * 3, [64] * 3]  # sorted: bright, dark


def test_image_folder_resizes_shorter_side_then_centre_crops(tmp_path: Path) -> None:
    wide = np.zeros((8, 32, 3), dtype=np.uint8)
    wide[:, 12:20] = 255  # a white band in the middle third; the outer parts must be cropped away
    _save(tmp_path / "a" / "wide.png", Image.fromarray(wide))
    _save(tmp_path / "a" / "tall.png", Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))))
    data = load_image_folder(tmp_path, 4)
    wide_out, tall_out = data.images[1, 0], data.images[0, 0]  # sorted: tall.png, wide.png
    # 8 x 32 -> 4 x 16 -> crop columns 6..10: the band (columns 6..10 after scaling) fills the crop.
    assert wide_out.min() > 200
    assert tall_out.min() > 200


def test_image_folder_missing_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 8)
    file = tmp_path / "file.png"
    file.write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(file, 8)


def test_image_folder_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path, 8)


def test_image_folder_empty_class_is_named(tmp_path: Path) -> None:
    _save(tmp_path / "full" / "a.png", Image.new("RGB", (8, 8)))
    _save(tmp_path / "full" / "b.png", Image.new("RGB", (8, 8)))
    (tmp_path / "hollow").mkdir()
    (tmp_path / "hollow" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="'hollow' has no images"):
        load_image_folder(tmp_path, 8)


def test_image_folder_truncated_png_is_named(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "good.png", Image.new("RGB", (8, 8)))
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    _save(tmp_path / "a" / "broken.png", Image.fromarray(noisy))
    broken = tmp_path / "a" / "broken.png"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path, 8)


def test_image_folder_needs_two_images(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "only.png", Image.new("RGB", (8, 8)))
    with pytest.raises(DataError, match="at least 2"):
        load_image_folder(tmp_path, 8)


def test_image_folder_clean_folder_does_not_warn(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "x.png", Image.new("RGB", (8, 8)))
    _save(tmp_path / "b" / "y.webp", Image.new("RGB", (8, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_image_folder(tmp_path, 8)
    assert data.labels.tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------------------


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_npz_nhwc_uint8(tmp_path: Path) -> None:
    images = np.zeros((3, 10, 10, 3), dtype=np.uint8)
    images[:, ..., 0] = [[[10]], [[20]], [[30]]]
    path = _npz(tmp_path, images=images, labels=np.array([0, 2, 1]))
    data = load_npz(path, 6)
    _check_image_set(data, 3, 6, 3)
    assert data.class_names == ["0", "1", "2"]
    assert data.images[:, 0, 3, 3].tolist() == [10, 20, 30]
    assert (data.images[:, 1:] == 0).all()


def test_npz_nchw_float_and_class_names(tmp_path: Path) -> None:
    images = np.full((4, 3, 8, 8), 0.5, dtype=np.float32)
    images[1] = 1.0
    path = _npz(tmp_path, images=images, labels=np.array([0, 1, 1, 0]), class_names=np.array(["cat", "dog"]))
    data = load_npz(path, 8)
    _check_image_set(data, 4, 8, 2)
    assert data.class_names == ["cat", "dog"]
    assert data.images[0, :, 0, 0].tolist() == [128, 128, 128]
    assert (data.images[1] == 255).all()


def test_npz_grayscale_nhw_and_rgba(tmp_path: Path) -> None:
    grey = np.full((2, 12, 12), 90, dtype=np.uint8)
    data = load_npz(_npz(tmp_path, images=grey, labels=np.array([0, 0])), 6)
    _check_image_set(data, 2, 6, 1)
    assert (data.images == 90).all()

    rgba = np.zeros((2, 5, 5, 4), dtype=np.uint8)
    rgba[1, ..., 3] = 255  # opaque black; image 0 fully transparent
    data = load_npz(_npz(tmp_path, images=rgba, labels=np.array([0, 1])), 5)
    assert (data.images[0] == 255).all() and (data.images[1] == 0).all()


def test_npz_custom_keys(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros((2, 6, 6, 3), np.uint8), y=np.array([1, 0]))
    assert load_npz(path, 4, images_key="x", labels_key="y").labels.tolist() == [1, 0]


def test_npz_missing_key_lists_keys(tmp_path: Path) -> None:
    path = _npz(tmp_path, pixels=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"no key 'images'; keys present: labels, pixels"):
        load_npz(path, 4)


def test_npz_bad_labels_name_the_key(tmp_path: Path) -> None:
    images = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(DataError, match="key 'labels'.*negative"):
        load_npz(_npz(tmp_path, images=images, labels=np.array([0, -1])), 4)
    with pytest.raises(DataError, match="key 'labels'.*non-integer"):
        load_npz(_npz(tmp_path, images=images, labels=np.array([0.0, 1.5])), 4)
    whole = load_npz(_npz(tmp_path, images=images, labels=np.array([0.0, 1.0])), 4)
    assert whole.labels.dtype == np.int64 and whole.labels.tolist() == [0, 1]


def test_npz_length_mismatch(tmp_path: Path) -> None:
    path = _npz(tmp_path, images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="3 images but 'labels' has 2 labels"):
        load_npz(path, 4)


def test_npz_rejects_out_of_range_pixels_and_dtypes(tmp_path: Path) -> None:
    labels = np.array([0, 1])
    with pytest.raises(DataError, match=r"expected float in \[0, 1\]"):
        load_npz(_npz(tmp_path, images=np.full((2, 4, 4), 2.0), labels=labels), 4)
    with pytest.raises(DataError, match="dtype int64"):
        load_npz(_npz(tmp_path, images=np.zeros((2, 4, 4), np.int64), labels=labels), 4)
    with pytest.raises(DataError, match=r"shape \(2, 6, 6, 2\); expected"):
        load_npz(_npz(tmp_path, images=np.zeros((2, 6, 6, 2), np.uint8), labels=labels), 4)
    with pytest.raises(DataError, match="ambiguous"):
        load_npz(_npz(tmp_path, images=np.zeros((2, 3, 4, 3), np.uint8), labels=labels), 4)


def test_npz_label_outside_class_names(tmp_path: Path) -> None:
    images, names = np.zeros((2, 4, 4), np.uint8), np.array(["a", "b"])
    path = _npz(tmp_path, images=images, labels=np.array([0, 2]), class_names=names)
    with pytest.raises(DataError, match="label 2 is out of range.*'class_names'"):
        load_npz(path, 4)


def test_npz_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "none.npz", 4)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="single.npy: holds a single array"):
        load_npz(single, 4)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not numpy")
    with pytest.raises(DataError, match="garbage.npz: cannot read"):
        load_npz(garbage, 4)
    objects = np.empty(2, dtype=object)
    path = _npz(tmp_path, images=np.zeros((2, 4, 4), np.uint8), labels=objects)
    with pytest.raises(DataError, match="key 'labels': cannot read"):
        load_npz(path, 4)


# ---------------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------------


def test_load_source_dispatch_and_path_required(tmp_path: Path) -> None:
    path = _npz(tmp_path, images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1]))
    assert load_source("npz", str(path), 4).images.shape == (2, 3, 4, 4)
    assert load_source("digits", None, 8).images.shape == (1797, 3, 8, 8)
    for source in ("imagefolder", "npz"):
        with pytest.raises(DataError, match=f"source '{source}' needs a path"):
            load_source(source, None, 8)
    with pytest.raises(DataError, match="unknown source"):
        load_source("cifar", None, 8)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# splits, stratified draws and grids
# ---------------------------------------------------------------------------------------------------------


def test_splits_are_stratified_deterministic_disjoint_and_covering() -> None:
    labels = np.array([0] * 50 + [1] * 20 + [2] * 3 + [3] * 1)
    labels = np.random.default_rng(1).permutation(labels)
    held = {"reference": 0.1, "features": 0.2}
    splits = split_dataset(labels, held, seed=7)
    assert list(splits) == ["reference", "features", "train"]
    for idx in splits.values():
        assert idx.dtype == np.int64 and (np.diff(idx) > 0).all()
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.intersect1d(splits[a], splits[b]).size == 0, (a, b)
    assert np.array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(len(labels)))
    # round(f * n), at least 1 while one image stays in training; a singleton class only trains
    assert np.bincount(labels[splits["reference"]], minlength=4).tolist() == [5, 2, 1, 0]
    assert np.bincount(labels[splits["features"]], minlength=4).tolist() == [10, 4, 1, 0]
    assert set(labels[splits["train"]].tolist()) == {0, 1, 2, 3}
    again = split_dataset(labels, held, seed=7)
    assert all(np.array_equal(again[k], splits[k]) for k in splits)
    assert not np.array_equal(split_dataset(labels, held, seed=8)["reference"], splits["reference"])
    with pytest.raises(ValueError):
        split_dataset(labels, {"reference": 0.0}, seed=0)
    with pytest.raises(ValueError):
        split_dataset(labels, {"reference": 0.6, "floor": 0.5}, seed=0)


def test_stratified_draws_and_previews_cover_every_class_of_a_class_sorted_set() -> None:
    labels = np.repeat(np.arange(8), [40, 30, 30, 30, 30, 30, 30, 20])  # sorted by class, as a folder is
    drawn = stratified_sample(labels, 48, seed=0)
    assert len(set(drawn.tolist())) == 48
    counts = np.bincount(labels[drawn], minlength=8)
    assert counts.sum() == 48 and counts.min() >= 4 and counts[0] > counts[7]
    assert labels[drawn[:8]].tolist() == list(range(8))  # interleaved: one of each class first
    idx, columns = class_grid_indices(labels, rows=5, seed=0)
    assert columns == 8 and len(idx) == 40
    assert labels[idx].reshape(5, 8).tolist() == [list(range(8))] * 5  # one class per column


def test_make_grid_layout_and_padding(tmp_path: Path) -> None:
    images = np.stack([np.full((3, 4, 5), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = make_grid(images, nrow=3)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2, 3)
    assert grid.dtype == np.uint8
    assert (grid[2:6, 2:7] == 10).all()  # first tile, top-left
    assert (grid[8:12, 9:14] == 50).all()  # fifth tile: row 1, column 1
    assert (grid[8:12, 16:21] == 255).all()  # the unused sixth slot stays padding
    assert (grid[:2] == 255).all() and (grid[:, 7:9] == 255).all()

    out = tmp_path / "sub" / "grid.png"
    save_grid(images, out, nrow=3)
    assert np.array_equal(np.asarray(Image.open(out)), grid)
