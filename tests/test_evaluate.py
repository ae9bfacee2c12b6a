"""The evaluation protocol's pieces: which (solver, steps) a model can take, the measured FID against an
independent SciPy computation, intervals and paired comparisons, and a report that needs no network."""

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from imagedata.grids import save_grid
from imagedata.sources import load_digits
from measure.evaluation import flat_metrics, plan_points, summarise
from measure.fid import FeatureNet, classify, extract_features, fid_features, frechet_distance, register_classifier
from measure.intervals import MEASURES, Reference, SeedSet, measure_sets
from measure.report import render, text_table
from measure.results import headline_comparisons, load_evaluations, ranking, results_table
from runtime.generator import Generator, GeneratorError
from runtime.params import EvalParams
from storage.atomic import atomic_write_npz


def velocity_generator(boundaries=None) -> Generator:
    """A velocity 'model' that is the straight field towards 0 (v = -z0): no training needed."""

    class ToZero(torch.nn.Module):
        def forward(self, x, timestep, class_labels):
            from types import SimpleNamespace

            from models.dit import flow_time

            return SimpleNamespace(sample=-x / (1 - flow_time(timestep).view(-1, 1, 1, 1) + 1e-9))

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


def test_rk45_is_one_point_at_the_nfe_it_spends_and_segmented_models_refuse_it():
    gen = velocity_generator()
    p = EvalParams(solvers=["euler", "rk45"], steps=[1, 2])
    plan, skipped = plan_points(gen, p)
    assert plan == [("euler", 1), ("euler", 2), ("rk45", 0)] and not skipped
    z0 = torch.randn(3, 4, 2, 2)
    res = gen.sample(z0, torch.zeros(3, dtype=torch.long), steps=0, solver="rk45", tolerance=1e-3)
    assert res.nfe >= 6 and torch.allclose(res.x, torch.zeros_like(res.x), atol=1e-3)  # dopri5: 6 a step
    plan, skipped = plan_points(velocity_generator(boundaries=[0.0, 0.5, 1.0]), p)
    assert ("rk45", 0) not in plan and "Euler inside each segment" in skipped[-1]["reason"]
    assert "Euler inside each segment" in velocity_generator(boundaries=[0.0, 0.5, 1.0]).unsupported("heun", 4)


@pytest.fixture(scope="module")
def digits_and_net():
    digits = load_digits(16)
    torch.manual_seed(0)
    net = FeatureNet(num_classes=10, resolution=16, width=8, feature_dim=16).eval()
    return digits, net


def test_measured_fid_equals_scipy_from_the_same_features(digits_and_net):
    """The features `evaluate` measures are torch-fidelity's from the registered extractor; an independent
    NumPy/SciPy Fréchet distance over the extractor's own outputs on the same images must agree."""
    digits, net = digits_and_net
    name = register_classifier(net, "0" * 16 + "test-measure")
    reference, samples = digits.images[:150], digits.images[150:300]
    ref = Reference(fid_features(reference, extractor=name), neighbourhood=3)
    correct = classify(net, samples).numpy() == digits.labels[150:300]
    measured = measure_sets([SeedSet(0, fid_features(samples, extractor=name), correct)], ref)
    expected = frechet_distance(extract_features(net, samples), extract_features(net, reference))
    assert measured["fid"].estimate == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert measured["class_accuracy"].estimate == pytest.approx(correct.mean())
    interval = measured["fid"].interval()
    assert interval.low < measured["fid"].estimate < interval.high and interval.method == "seeds+splits"


def fake_evaluation(root: Path, key: str, model: str, shifts: list[float], floor: bool = True) -> None:
    """An evaluation written the way `evaluate` writes it, from Gaussian 'features' (a shift per NFE; the
    same noise for every model), and a real PNG grid."""
    rng = np.random.default_rng(0)
    reference = Reference(rng.normal(size=(40, 4)), neighbourhood=3, content_hash="ref")
    out = root / "artifacts" / f"evaluate@{key}"
    out.mkdir(parents=True)
    points, replicates = [], {}
    for nfe, shift in zip([1, 2, 4], shifts, strict=True):
        sets = [SeedSet(s, np.random.default_rng(s).normal(size=(30, 4)) + shift, np.ones(30, bool)) for s in (0, 1)]
        measured = measure_sets(sets, reference)
        points.append(summarise("euler", nfe, nfe, measured))
        for name, m in measured.items():
            replicates |= m.to_arrays(f"euler/{nfe}/{name}")
    protocol = {"model": model, "seeds": [0, 1], "samples_per_seed": 30, "guidance_scale": 1.0,
                "reference": {"path": "artifacts/prepare/reference.zarr", "content_hash": "ab" * 32, "images": 40},
                "extractor": {"name": "fid_features classifier", "sha256": "cd" * 32, "standard": "in-project"},
                "splits": {"train": {"rows": 100, "content_hash": "ef" * 32}}, "floor": {"draws": 2}}
    floor_summary = {name: {"estimate": 0.5, "low": 0.4, "high": 0.6} for name in MEASURES}
    (out / "results.json").write_text(json.dumps({"protocol": protocol, "points": points, "skipped": [],
                                                  "straightness": 0.01, "floor": floor_summary}))
    atomic_write_npz(out / "replicates.npz", replicates)
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
    assert [e.key for e in evaluations] == ["dit", "rf1"], "the teacher comes first"
    page = render(tmp_path, evaluations, None, plot_png=(tmp_path / "artifacts/evaluate@dit/grid.png").read_bytes(),
                  tracked=False)
    parser = Links()
    parser.feed(page)
    assert len(parser.images) == 3  # the plot and one grid per model
    assert all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "lineage unavailable" in page  # no dvc.lock here: said, not hidden
    assert "Which model at which budget" in page and "resolved" in page


def test_results_table_shows_each_point_with_its_95_percent_interval(tmp_path):
    fake_evaluation(tmp_path, "rf1", "artifacts/rf1", [3.0, 2.0, 1.5])
    evaluations = load_evaluations(tmp_path)
    header, rows = results_table(evaluations, None)
    assert header[:5] == ["model", "solver", "NFE 1", "NFE 2", "NFE 4"]
    point = evaluations[0].points[0]
    assert rows[0][2] == f"{point['fid']:.3g} ± {(point['fid_high'] - point['fid_low']) / 2:.2g}"
    assert rows[0][-1] == f"{evaluations[0].at('best')['fid']:.3g} (4)"
    assert "NFE 4" in text_table(header, rows).splitlines()[0]


def test_comparisons_pair_models_measured_from_the_same_noise(tmp_path):
    """rf2 is rf1 moved a little nearer the reference at every NFE: from the same noise the difference is
    resolved although each model's own interval is wide; an identical model is within noise."""
    fake_evaluation(tmp_path, "rf1", "artifacts/rf1", [1.0, 1.0, 1.0])
    fake_evaluation(tmp_path, "rf2", "artifacts/rf@2", [0.9, 0.9, 0.9])
    fake_evaluation(tmp_path, "seqrf", "artifacts/seqrf", [0.9, 0.9, 0.9])
    evaluations = load_evaluations(tmp_path)
    by_key = {e.key: e for e in evaluations}
    headline = {c.question: c for c in headline_comparisons(evaluations)}
    one_step = headline["teacher pairs: 2-RF against 1-RF at one step"]
    assert one_step.interval.resolved and one_step.interval.estimate < 0
    own = by_key["rf1"].points[0]
    assert one_step.interval.high - one_step.interval.low < own["fid_high"] - own["fid_low"]
    assert headline["SeqRF against 2-RF at 4 NFE"].interval.verdict == "within noise"
    assert [c.a for c in ranking(evaluations)][0] in ("rf2 at NFE 1", "seqrf at NFE 1")


def test_flat_metrics_name_solver_nfe_measure_and_interval(tmp_path):
    fake_evaluation(tmp_path, "rf1", "artifacts/rf1", [3.0, 2.0, 1.5])
    results = json.loads((tmp_path / "artifacts/evaluate@rf1/results.json").read_text())
    metrics = flat_metrics(results)
    point = results["points"][1]
    assert metrics["euler_nfe2_fid"] == point["fid"] and metrics["euler_nfe2_fid_low"] == point["fid_low"]
    assert metrics["best_fid_nfe"] == 4.0 and metrics["floor_fid"] == 0.5


def test_each_chain_is_compared_with_itself_and_tabled_with_its_models_metrics(tmp_path):
    """Per chain: 2-RF against 1-RF at one step, and the student against the best point of either of its
    chain's flows; the chain table carries each model's own error and straightness with their intervals."""
    from measure.results import chain_table
    from storage.checkpoints import META_FILE

    fake_evaluation(tmp_path, "rf1_classic", "artifacts/rf1_classic", [3.0, 2.0, 1.5])
    fake_evaluation(tmp_path, "rf2_classic", "artifacts/rf@2_classic", [1.2, 1.1, 1.0])
    fake_evaluation(tmp_path, "distill_classic", "artifacts/distill_classic", [1.1, 2.0, 3.0])
    for stage, error in (("rf1_classic", 0.3), ("rf@2_classic", 0.1)):
        folder = tmp_path / "artifacts" / stage / "transformer"
        folder.mkdir(parents=True)
        metrics = {"error_1_step": error, "error_1_step_low": error - 0.01, "error_1_step_high": error + 0.01,
                   "straightness": error / 10, "straightness_low": error / 10 - 0.001,
                   "straightness_high": error / 10 + 0.001}
        (folder / META_FILE).write_text(json.dumps({"metrics": metrics}))
    evaluations = load_evaluations(tmp_path)
    headline = {c.question: c for c in headline_comparisons(evaluations)}
    reflowed = headline["classic: independent noise: 2-RF against 1-RF at one step"]
    assert reflowed.a == "rf2_classic at NFE 1" and reflowed.b == "rf1_classic at NFE 1"
    assert reflowed.interval.resolved and reflowed.interval.estimate < 0
    student = headline["classic: independent noise: the one-step student against its chain's best flow"]
    assert student.b == "rf2_classic at NFE 4"  # the lowest FID of rf1_classic's and rf2_classic's points
    assert not any(q.startswith("teacher pairs") for q in headline)  # that chain was not evaluated here
    header, rows = chain_table(evaluations, tmp_path)
    assert [r[1] for r in rows] == ["rf1_classic (rf1_classic)", "rf2_classic (rf@2_classic)",
                                    "distill_classic (distill_classic)"]  # the chain's order
    by_model = {r[1].split()[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by_model["rf1_classic"]["error vs teacher, NFE 1"] == "0.3 ± 0.01"
    assert by_model["rf2_classic"]["straightness"] == "0.01 ± 0.001"
    assert by_model["distill_classic"]["straightness"] == ""  # no model folder: its FID stands alone
