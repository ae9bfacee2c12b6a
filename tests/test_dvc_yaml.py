"""dvc.yaml and the stage modules say the same thing: params sections, inputs, outputs, metrics.

The comparison runs on DVC's own expansion of dvc.yaml (foreach rounds included). A stage reads params
only through its declared sections (ParamsView raises otherwise), so equality of the declared sections
and dvc.yaml's `params:` means DVC reruns a stage whenever anything it reads changes.
"""

import importlib
from pathlib import Path

import pytest
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from stages.params import SECTIONS, load_params
from stages.spec import resolve_path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {s.name: s for s in Repo(str(ROOT)).index.stages}
PARAMS = load_params(ROOT / "params.yaml")


def module_spec(stage):
    words = stage.cmd.split()
    assert words[:3] == ["python", "-m", f"stages.{words[2].removeprefix('stages.')}"], stage.cmd
    module = importlib.import_module(words[2])
    return module.spec(*words[3:]) if words[3:] else module.SPEC


def file_deps(stage):
    return [d for d in stage.deps if not isinstance(d, ParamsDependency)]


def params_sections(stage) -> list[str]:
    return sorted(k for p in stage.params for k in p.params)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_module_matches_dvc_yaml(name):
    stage = STAGES[name]
    spec = module_spec(stage)
    assert spec.name == name
    assert params_sections(stage) == sorted(spec.params), "params sections differ"
    assert "tracking" not in params_sections(stage), "tracking changes no output and must not trigger reruns"
    data_deps = sorted(str(d.def_path) for d in file_deps(stage) if not str(d.def_path).endswith(".py"))
    expected_deps = sorted(resolve_path(v, PARAMS) for v in spec.deps.values())
    assert data_deps == expected_deps
    outs = sorted(str(o.def_path) for o in stage.outs if not o.metric)
    assert outs == sorted(spec.outs.values())
    assert [str(o.def_path) for o in stage.outs if o.metric] == ([spec.metrics] if spec.metrics else [])


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_exist_and_include_the_stage_module(name):
    stage = STAGES[name]
    code = [str(d.def_path) for d in file_deps(stage) if str(d.def_path).endswith(".py")]
    assert f"{stage.cmd.split()[2].replace('.', '/')}.py" in code
    for path in code:
        assert (ROOT / path).is_file(), path


def test_every_params_section_is_used_by_some_stage_or_is_tracking():
    used = {s for stage in STAGES.values() for s in params_sections(stage)}
    assert used | {"tracking", "reflow_rounds", "evaluate_models"} == set(SECTIONS)


def test_outputs_are_produced_once_and_validate_runs_before_every_other_stage():
    """Every stage has `validate` as an ancestor, so DVC runs it first and a bad params file stops the run."""
    producers = {}
    for name, stage in STAGES.items():
        for out in stage.outs:
            assert str(out.def_path) not in producers
            producers[str(out.def_path)] = name
    def made_by(dep: str) -> set[str]:  # a dep on a folder (report: artifacts/) depends on every output in it
        return {stage for out, stage in producers.items() if out == dep or out.startswith(dep.rstrip("/") + "/")}

    parents = {n: set().union(*(made_by(str(d.def_path)) for d in file_deps(s))) for n, s in STAGES.items()}

    def ancestors(name):
        found = set()
        for p in parents[name]:
            found |= {p} | ancestors(p)
        return found

    assert "params.yaml" in [str(d.def_path) for d in file_deps(STAGES["validate"])]
    for name in STAGES:
        if name != "validate":
            assert "validate" in ancestors(name), name
    assert ancestors("rf@2") >= {"rf1", "reflow_pairs@2", "teacher_pairs"}
    assert ancestors("report") >= {f"evaluate@{key}" for key in PARAMS.evaluate_models} | {"distill", "seqrf"}
