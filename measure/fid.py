"""FID features through torch-fidelity, with Inception or an in-project extractor.

Inception needs its TF-compatible weights file, which cannot be downloaded here. Without it, a small
classifier trained on the reference images is the feature extractor: its penultimate layer gives the
features, its logits the class-consistency check. Numbers made with it are comparable only inside this
project (same extractor hash), and every result records which extractor made it.

torch-fidelity's registry is keyed by name only, so every classifier registered here carries the content
hash of its weights in its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

CLASSIFIER_SUBFOLDER = "classifier"  # artifacts/fid_features/classifier/: config beside weights
INCEPTION = "inception-v3-compat"
FEATURES = "features"
LOGITS = "logits"


class FeatureNet(ModelMixin, ConfigMixin):
    """A small CNN classifier over uint8 RGB images; `features` is its penultimate activation."""

    @register_to_config
    def __init__(self, num_classes: int, resolution: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(4 * w, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (or [0, 255] float) B x 3 x H x W -> (features B x feature_dim, logits B x classes)."""
        x = images.float() / 127.5 - 1.0
        size = self.config.resolution
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        features = self.embed(self.body(x))
        return features, self.head(features)


def classifier_loss(model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator,
                    step: int) -> torch.Tensor:
    """Cross-entropy on the labels (the `training.loop.train` loss signature)."""
    return F.cross_entropy(model(batch["images"])[1], batch["labels"])


@torch.inference_mode()
def _outputs(net: FeatureNet, images: torch.Tensor | np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of uint8 images, batched, on the CPU."""
    images = torch.as_tensor(images)
    device = next(net.parameters()).device
    outs = [net(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    return torch.cat([f.cpu() for f, _ in outs]), torch.cat([logits.cpu() for _, logits in outs])


def classify(net: FeatureNet, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """Predicted class of each uint8 image."""
    return _outputs(net, images, batch_size)[1].argmax(1)


def extract_features(net: FeatureNet, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The FID features of uint8 images, float64 (what torch-fidelity computes its statistics from)."""
    return _outputs(net, images, batch_size)[0].double().numpy()


# ---------------------------------------------------------------------------------------------------------
# torch-fidelity glue
# ---------------------------------------------------------------------------------------------------------
_NETS: dict[str, FeatureNet] = {}


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatures(FeatureExtractorBase):
        """torch-fidelity's view of a registered FeatureNet (looked up by the registered name)."""

        def __init__(self, name: str, features_list: Sequence[str], **kwargs: Any):
            super().__init__(name, features_list)
            self.net = _NETS[name]

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return (FEATURES, LOGITS)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return LOGITS if metric == "isc" else FEATURES

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features, logits = self.net(images)
            out = {FEATURES: features, LOGITS: logits}
            return tuple(out[name] for name in self.features_list)

    return ClassifierFeatures


def register_classifier(net: FeatureNet, digest: str) -> str:
    """Register `net` with torch-fidelity under a name carrying its content hash; returns the name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    name = f"reflow-classifier-{digest[:16]}"
    _NETS[name] = net.eval().requires_grad_(False)
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, _extractor_class())
    return name


class _Images(torch.utils.data.Dataset):
    """uint8 N x 3 x H x W as torch-fidelity wants it: a bare tensor per item, no label."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images N x 3 x H x W, got {images.dtype} {images.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


_EXTRACTORS: dict[tuple[str, str | None], Any] = {}


def extractor_info(name: str) -> tuple[str, bool]:
    """(the layer FID reads, whether a weights file is needed) of a torch-fidelity extractor."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"no feature extractor {name!r} is registered with torch-fidelity")
    return FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid"), name == INCEPTION


def fid_features(images: np.ndarray, *, extractor: str, inception_weights: str | None = None,
                 batch_size: int = 256) -> np.ndarray:
    """The FID features (float64, N x D) of uint8 N x 3 x H x W images, extracted by torch-fidelity.

    `extractor` is a name from `register_classifier` or `INCEPTION`, which needs `inception_weights`: the
    local path of torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (nothing is downloaded).
    FID, KID, precision and recall are computed from these features by `measure.intervals`, whose numbers
    equal torch-fidelity's own metric functions on them (tests/test_intervals.py).
    """
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    layer, needs_weights = extractor_info(extractor)
    if needs_weights and not inception_weights:
        raise ValueError("the Inception extractor needs eval.inception_weights: a local path to "
                         "weights-inception-2015-12-05-6726825d.pth (nothing is downloaded)")
    cuda = torch.cuda.is_available()
    key = (extractor, inception_weights)
    if key not in _EXTRACTORS:  # Inception's weights are read once per process, not once per point
        kwargs = {"feature_extractor_weights_path": inception_weights} if needs_weights else {}
        _EXTRACTORS[key] = create_feature_extractor(extractor, [layer], cuda=cuda, verbose=False,
                                                    feature_extractor_compile=False, **kwargs)
    # The images are already tensors in RAM: on CPU, DataLoader worker processes (save_cpu_ram=False starts
    # four) only add start-up time and compete for the cores the extractor needs.
    features = get_featuresdict_from_dataset(_Images(images), _EXTRACTORS[key], batch_size, cuda,
                                             save_cpu_ram=not cuda, verbose=False)
    return features[layer].double().cpu().numpy()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID from two feature matrices with NumPy/SciPy: the independent check of torch-fidelity's number."""
    from scipy import linalg

    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
