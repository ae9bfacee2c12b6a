"""The evaluation protocol's pieces: which (solver, steps) a model can take, mean and spread over seeds,
the stored FID against an independent SciPy computation, and a report that needs no network."""

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from reflow.data import load_digits, save_grid
from reflow.fid import FeatureNet, extract_features, frechet_distance, register_classifier
from stages.evaluate import flat_metrics, measure, summarise
from stages.generator import Generator, GeneratorError
from stages.params import EvalParams
from stages.report import load_evaluations, render, results_table, text_table


def velocity_generator(boundaries=None) -> Generator:
    """A velocity 'model' that is the straight field towards 0 (v = -z0): no training needed."""

    class ToZero(torch.nn.Module):
        def forward(self, x, timestep, class_labels):
            from types import SimpleNamespace

            return SimpleNamespace(sample=-x / (1 - timestep.view(-1, 1, 1, 1) / 999.0 + 1e-9))

    meta = {"null_label": 10, "num_classes": 10, **({"boundaries": boundaries} if boundaries else {})}
    return Generator(ToZero(), "velocity", meta, Path("artifacts/m"), 1.0)


def test_segmented_models_take_only_multiples_of_their_segments():
    gen = velocity_generator(boundaries=[0.0, 0.25, 0.5, 0.75, 1.0])
    assert gen.unsupported("euler", 4) is None and gen.unsupported("euler", 8) is None
    assert "multiple of 4" in gen.unsupported("euler", 2)
    assert "samples with euler or heun" in gen.unsupported("ddim", 4)
    with pytest.raises(GeneratorError, match="artifacts/m: a model with 4 segments"):
        gen.sample(torch.zeros(1, 4, 2, 2), torch.zeros(1, dtype=torch.long), steps=6, solver="euler")


def test_sampling_counts_the_nfe_it_spends():
    gen = velocity_generator()
    z0 = torch.randn(3, 4, 2, 2)
    y = torch.zeros(3, dtype=torch.long)
    assert gen.sample(z0, y, steps=4, solver="euler").nfe == 4
    assert gen.sample(z0, y, steps=4, solver="heun").nfe == 7
    assert gen.sample(z0, y, steps=4, solver="euler", guidance=2.0).nfe == 8  # guided: two evaluations a call
    x = gen.sample(z0, y, steps=1, solver="euler").x  # the straight field lands exactly on 0 in one step
    assert torch.allclose(x, torch.zeros_like(x), atol=1e-5)


def test_summary_is_mean_and_spread_over_seeds():
    per_seed = [{"fid": 1.0, "kid": 0.1, "precision": 0.5, "recall": 0.4, "class_accuracy": 0.9},
                {"fid": 3.0, "kid": 0.3, "precision": 0.7, "recall": 0.6, "class_accuracy": 0.7}]
    s = summarise(per_seed)
    assert s["fid"] == 2.0 and s["fid_std"] == 1.0 and s["class_accuracy"] == pytest.approx(0.8)


@pytest.fixture(scope="module")
def digits_and_net():
    digits = load_digits(16)
    torch.manual_seed(0)
    net = FeatureNet(num_classes=10, resolution=16, width=8, feature_dim=16).eval()
    return digits, net


def test_measured_fid_equals_scipy_from_the_same_features(digits_and_net, tmp_path):
    """What `evaluate` stores is torch-fidelity's FID; an independent NumPy/SciPy Fréchet distance over the
    extractor's features of the same images must agree, and the cached reference must not change it."""
    digits, net = digits_and_net
    name = register_classifier(net, "0" * 16 + "test-measure")
    reference, samples = digits.images[:150], digits.images[150:300]
    params = EvalParams(kid_subset_size=50)
    got = [measure(samples, digits.labels[150:300], reference, net, extractor=name, reference_name="ref-test",
                   cache_root=str(tmp_path), seed=0, eval_params=params) for _ in range(2)]  # 2nd: from the cache
    expected = frechet_distance(extract_features(net, samples), extract_features(net, reference))
    assert got[0]["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert got[1]["fid"] == pytest.approx(got[0]["fid"], rel=1e-9)
    assert 0.0 <= got[0]["class_accuracy"] <= 1.0


def fake_evaluation(root: Path, key: str, model: str, fids: list[float]) -> None:
    """A results.json shaped as `evaluate` writes it, and a real PNG grid."""
    out = root / "artifacts" / f"evaluate@{key}"
    out.mkdir(parents=True)
    points = [{"solver": "euler", "steps": n, "nfe": n, "fid": f, "fid_std": 0.1, "kid": 0.0, "kid_std": 0.0,
               "precision": 0.5, "precision_std": 0.0, "recall": 0.5, "recall_std": 0.0, "class_accuracy": 0.9,
               "class_accuracy_std": 0.0, "per_seed": []} for n, f in zip([1, 2, 4], fids, strict=True)]
    protocol = {"model": model, "seeds": [0, 1, 2], "samples_per_point": 10, "guidance_scale": 1.0,
                "reference": {"path": "artifacts/prepare/reference.zarr", "content_hash": "ab" * 32, "images": 10},
                "extractor": {"name": "fid_features classifier", "sha256": "cd" * 32}}
    real = {"fid": 0.5, "kid": 0.0, "precision": 1.0, "recall": 1.0, "class_accuracy": 1.0, "images": 10}
    (out / "results.json").write_text(json.dumps({"protocol": protocol, "points": points, "skipped": [],
                                                  "straightness": 0.01, "real_data": real}))
    save_grid(np.zeros((3, 3, 8, 8), np.uint8), out / "grid.png", nrow=3)


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.images, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href"):
                self.urls.append(value)
                if tag == "img":
                    self.images.append(value)


def test_report_page_embeds_every_picture_and_fetches_nothing(tmp_path):
    fake_evaluation(tmp_path, "rf1", "artifacts/rf1", [3.0, 2.0, 1.5])
    fake_evaluation(tmp_path, "dit", "artifacts/dit", [9.0, 4.0, 1.0])
    evaluations = load_evaluations(tmp_path)
    assert [e["key"] for e in evaluations] == ["dit", "rf1"], "the teacher comes first"
    page = render(tmp_path, evaluations, plot_png=(tmp_path / "artifacts/evaluate@dit/grid.png").read_bytes(),
                  tracked=False)
    parser = Links()
    parser.feed(page)
    assert len(parser.images) == 3  # the plot and one grid per model
    assert all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "lineage unavailable" in page  # no dvc.lock here: said, not hidden


def test_results_table_has_a_column_per_nfe_and_the_real_data_floor(tmp_path):
    fake_evaluation(tmp_path, "rf1", "artifacts/rf1", [3.0, 2.0, 1.5])
    header, rows = results_table(load_evaluations(tmp_path))
    assert header[:5] == ["model", "solver", "NFE 1", "NFE 2", "NFE 4"]
    assert rows[0][2] == "3 ± 0.1" and rows[0][-1] == "1.5 (4)"
    assert rows[-1][0].startswith("real images")
    assert "NFE 4" in text_table(header, rows).splitlines()[0]


def test_flat_metrics_name_solver_nfe_and_measure(tmp_path):
    fake_evaluation(tmp_path, "rf1", "artifacts/rf1", [3.0, 2.0, 1.5])
    metrics = flat_metrics(json.loads((tmp_path / "artifacts/evaluate@rf1/results.json").read_text()))
    assert metrics["euler_nfe2_fid"] == 2.0 and metrics["euler_nfe2_fid_std"] == 0.1
    assert metrics["best_fid"] == 1.5 and metrics["best_fid_nfe"] == 4.0 and metrics["real_data_fid"] == 0.5
