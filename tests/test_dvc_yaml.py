"""dvc.yaml and the stage modules say the same thing: params sections, inputs, outputs, metrics.

A stage reads params only through its declared sections (ParamsView raises otherwise), so equality
of the declared sections and dvc.yaml's `params:` means DVC reruns a stage whenever anything it reads
changes.
"""

import importlib
from pathlib import Path

import pytest
import yaml

from stages.params import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def names(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_module_matches_dvc_yaml(stage):
    entry = DVC[stage]
    assert entry["cmd"] == f"python -m stages.{stage}"
    spec = importlib.import_module(f"stages.{stage}").SPEC
    assert spec.name == stage
    assert sorted(entry.get("params", [])) == sorted(spec.params), "params sections differ"
    assert "tracking" not in entry.get("params", []), "tracking changes no output and must not trigger reruns"
    data_deps = [d for d in entry["deps"] if not d.endswith(".py")]
    assert sorted(data_deps) == sorted(spec.deps.values())
    assert sorted(entry["outs"]) == sorted(spec.outs.values())
    assert names(entry.get("metrics", [])) == ([spec.metrics] if spec.metrics else [])


@pytest.mark.parametrize("stage", sorted(DVC))
def test_code_deps_exist_and_include_the_stage_module(stage):
    code = [d for d in DVC[stage]["deps"] if d.endswith(".py")]
    assert f"stages/{stage}.py" in code
    for path in code:
        assert (ROOT / path).is_file(), path


def test_every_params_section_is_used_by_some_stage_or_is_tracking():
    used = {s for e in DVC.values() for s in e.get("params", [])}
    assert used | {"tracking"} == set(SECTIONS)


def test_outputs_are_produced_once_and_consumed_after():
    producers = {o: s for s, e in DVC.items() for o in e["outs"]}
    assert len(producers) == sum(len(e["outs"]) for e in DVC.values())
    order = list(DVC)
    for stage, entry in DVC.items():
        for dep in entry["deps"]:
            if dep in producers:
                assert order.index(producers[dep]) < order.index(stage)


def test_validate_runs_before_every_other_stage():
    """Every stage has `validate` as an ancestor, so DVC runs it first and a bad params file stops the run."""
    producers = {o: s for s, e in DVC.items() for o in e["outs"]}
    parents = {s: {producers[d] for d in e["deps"] if d in producers} for s, e in DVC.items()}

    def ancestors(stage):
        found = set()
        for p in parents[stage]:
            found |= {p} | ancestors(p)
        return found

    assert "params.yaml" in DVC["validate"]["deps"]
    for stage in DVC:
        if stage != "validate":
            assert "validate" in ancestors(stage), stage
