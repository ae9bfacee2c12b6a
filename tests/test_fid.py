"""FID/KID/precision-recall from torch-fidelity's features of the in-project extractor, checked against SciPy."""

import numpy as np
import pytest
import torch

from imagedata.sources import load_digits
from imagedata.splits import split_dataset
from measure.fid import (
    FeatureNet,
    classifier_loss,
    classify,
    extract_features,
    fid_features,
    frechet_distance,
    register_classifier,
)
from measure.intervals import Reference, SeedSet, measure_sets
from training.loop import TrainConfig, make_accelerator, train


@pytest.fixture(scope="module")
def digits():
    data = load_digits(16)
    return data.images, data.labels


@pytest.fixture(scope="module")
def trained(digits):
    images, labels = digits
    splits = split_dataset(labels, {"held": 0.2}, seed=0)
    train_idx, held_idx = splits["train"], splits["held"]
    torch.manual_seed(0)
    net = FeatureNet(num_classes=10, resolution=16, width=8, feature_dim=32)
    data = {"images": torch.from_numpy(images[train_idx]), "labels": torch.from_numpy(labels[train_idx])}
    cfg = TrainConfig(steps=300, batch_size=64, lr=3e-3, ema_decay=0.9, seed=0)
    ema = train(net, classifier_loss, data, cfg, make_accelerator("cpu", "no"), desc="classifier").ema
    return ema, held_idx


def brighter(images: np.ndarray, by: int) -> np.ndarray:
    return np.clip(images.astype(np.int16) + by, 0, 255).astype(np.uint8)


def test_classifier_learns_the_held_out_digits(digits, trained):
    images, labels = digits
    net, held_idx = trained
    accuracy = (classify(net, images[held_idx]).numpy() == labels[held_idx]).mean()
    assert accuracy > 0.85


def measures(net_name: str, samples: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    ref = Reference(fid_features(reference, extractor=net_name), neighbourhood=3)
    measured = measure_sets([SeedSet(0, fid_features(samples, extractor=net_name), np.ones(len(samples), bool))],
                            ref)
    return {name: m.estimate for name, m in measured.items()}


def test_fid_is_zero_on_itself_and_grows_with_the_shift(digits, trained):
    images, _ = digits
    net, _ = trained
    name = register_classifier(net, "0" * 64)
    reference = images[:900]
    same = measures(name, reference, reference)
    other_half = measures(name, images[900:], reference)
    small = measures(name, brighter(images[900:], 40), reference)
    large = measures(name, brighter(images[900:], 120), reference)
    assert abs(same["fid"]) < 1e-6 * large["fid"]
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["fid"] < other_half["fid"] < small["fid"] < large["fid"]
    # KID is the unbiased MMD estimate: a set against itself comes out slightly below 0, not at 0.
    assert same["kid"] < other_half["kid"] < small["kid"] < large["kid"]
    assert large["precision"] < other_half["precision"] and large["recall"] < other_half["recall"]


def test_fid_equals_an_independent_scipy_computation(digits, trained):
    images, _ = digits
    net, _ = trained
    name = register_classifier(net, "1" * 64)
    samples, reference = brighter(images[900:], 30), images[:900]
    ours = frechet_distance(extract_features(net, samples), extract_features(net, reference))
    assert measures(name, samples, reference)["fid"] == pytest.approx(ours, rel=1e-4)


def test_inception_without_local_weights_says_how_to_supply_them(digits):
    images, _ = digits
    with pytest.raises(ValueError, match="inception_weights"):
        fid_features(images[:10], extractor="inception-v3-compat")
