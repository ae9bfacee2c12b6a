"""dvc.yaml is the rendering of the stage modules, and its code deps are every module a stage runs.

Checks run on DVC's own expansion of dvc.yaml (foreach rounds included). A stage reads params only through
its declared sections (ParamsView raises otherwise), and its code deps are the closure of its imports, so
DVC reruns a stage whenever anything it reads or runs changes: the e2e tests below edit a module in a
reproduced pipeline and ask the real `dvc status` which stages it would rerun.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from flows.cli import main
from flows.dvc_yaml import PACKAGES, code_closure, document, render, stale_diff
from runtime.params import SECTIONS, load_params

ROOT = Path(__file__).resolve().parents[1]
def class_stages(repo) -> list:
    """The class pipeline's stages (dvc.yaml); text/dvc.yaml's are the text pipeline's (tests/test_text_chain.py)."""
    return [s for s in repo.index.stages if Path(s.dvcfile.path).name == "dvc.yaml" and Path(s.dvcfile.path).parent
            == Path(repo.root_dir)]


STAGES = {s.name: s for s in class_stages(Repo(str(ROOT)))}
PARAMS = load_params(ROOT / "params.yaml")


def file_deps(stage):
    return [d for d in stage.deps if not isinstance(d, ParamsDependency)]


def params_sections(stage) -> list[str]:
    return sorted(k for p in stage.params for k in p.params)


def stage_module(stage) -> str:
    """The module a stage's command runs (`python -m stages.rf 2` -> `stages.rf`)."""
    return stage.cmd.split()[2]


def missing_code_deps(root: Path) -> dict[str, list[str]]:
    """{stage: the project files its module imports, transitively, that are not among its deps} from DVC."""
    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
    missing = {}
    for stage in stages:
        deps = {str(d.def_path) for d in file_deps(stage)}
        gap = sorted(set(code_closure(stage_module(stage), root)) - deps)
        if gap:
            missing[stage.name] = gap
    return missing


def test_the_committed_dvc_yaml_is_the_rendering_of_the_stage_modules():
    diff = stale_diff(ROOT)
    assert not diff, "dvc.yaml differs from the stage modules: run `reflow dvc-yaml`\n" + diff


def test_the_rendered_text_reads_back_as_the_declared_document():
    assert yaml.safe_load(render(ROOT)) == document(ROOT)


def test_every_stage_depends_on_every_project_module_it_imports():
    assert missing_code_deps(ROOT) == {}


def test_an_import_missing_from_the_deps_is_named_with_its_stage(pipeline_repo, tmp_path):
    root = pipeline_repo(tmp_path / "repo")
    assert "storage/resume.py" not in code_closure("stages.validate", root)
    with open(root / "stages" / "validate.py", "a") as f:
        f.write("import storage.resume  # noqa: E402, F401\n")
    missing = missing_code_deps(root)
    assert set(missing) == {"validate"}
    assert "storage/resume.py" in missing["validate"]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_closure_follows_every_kind_of_import_and_only_the_projects_modules(tmp_path):
    write(tmp_path, {
        "stages/__init__.py": "",
        "stages/main.py": "import numpy\nfrom . import sibling\nfrom .helpers import thing\nimport reflow.deep.leaf\n",
        "stages/sibling.py": "def f():\n    from storage import lazy\n",
        "stages/helpers.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from storage.typed import T\n",
        "stages/unused.py": "",
        "reflow/deep/__init__.py": "from ..top import x\n",  # no reflow/__init__.py: a namespace package
        "reflow/deep/leaf.py": "",
        "reflow/top.py": "",
        "storage/lazy.py": "",
        "storage/typed.py": "",
    })
    assert code_closure("stages.main", tmp_path) == [
        "reflow/deep/__init__.py", "reflow/deep/leaf.py", "reflow/top.py", "stages/__init__.py",
        "stages/helpers.py", "stages/main.py", "stages/sibling.py", "storage/lazy.py", "storage/typed.py"]


def test_reflow_dvc_yaml_check_prints_the_diff_until_the_file_is_rewritten(tmp_path, monkeypatch, capsys):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    current = (ROOT / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(current.replace("      - runtime/main.py\n", "", 1))
    monkeypatch.chdir(tmp_path)
    assert main(["dvc-yaml", "--check"]) == 1
    out, err = capsys.readouterr()
    assert "+      - runtime/main.py" in out and "run `reflow dvc-yaml`" in err
    assert main(["dvc-yaml"]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == current
    assert main(["dvc-yaml", "--check"]) == 0


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_stage_reruns_on_tracking_params(name):
    assert "tracking" not in params_sections(STAGES[name]), "tracking changes no output and must not trigger reruns"


def test_every_params_section_is_used_by_some_stage_or_is_tracking():
    used = {s for stage in Repo(str(ROOT)).index.stages for s in params_sections(stage)}  # both pipelines
    assert used | {"tracking", "scheduler", "reflow_rounds", "evaluate_models", "text_evaluate_models"} == set(SECTIONS)


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


def edited_status(repo: Path, path: str) -> tuple[set[str], dict[str, list[str]]]:
    """(stages `dvc status` reports after a comment is appended to `path`, {stage: its code closure})."""
    with open(repo / path, "a") as f:
        f.write("# an edit that changes no behaviour\n")
    res = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], cwd=repo, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with Repo(str(repo)) as dvc_repo:
        closures = {s.name: code_closure(stage_module(s), repo) for s in class_stages(dvc_repo)}
    return set(json.loads(res.stdout)), closures


def importers(closures: dict[str, list[str]], path: str) -> set[str]:
    return {name for name, files in closures.items() if path in files}


@pytest.mark.e2e
def test_an_edit_to_the_losses_reruns_exactly_the_stages_that_import_them(copy_pipeline, tmp_path):
    changed, closures = edited_status(copy_pipeline(tmp_path / "repo"), "reflow/losses.py")
    assert changed == importers(closures, "reflow/losses.py")
    assert {"rf1", "rf@2", "seqrf", "distill"} <= changed


@pytest.mark.e2e
def test_an_edit_to_stages_common_reruns_every_stage_that_imports_it(copy_pipeline, tmp_path):
    changed, closures = edited_status(copy_pipeline(tmp_path / "repo"), "runtime/main.py")
    assert changed == importers(closures, "runtime/main.py")
    assert changed == set(closures) - {"validate"}, "every stage but validate runs through runtime.main"


@pytest.mark.e2e
def test_an_edit_to_the_models_reruns_teacher_pairs_rf1_and_every_evaluation(copy_pipeline, tmp_path):
    changed, closures = edited_status(copy_pipeline(tmp_path / "repo"), "models/dit.py")
    assert changed == importers(closures, "models/dit.py")
    assert {"teacher_pairs", "rf1"} | {name for name in closures if name.startswith("evaluate@")} <= changed


def test_every_interpolated_params_key_is_required_written_out():
    """dvc.yaml's `${section.key}` paths are read by DVC from the params file itself: `load_params` requires each."""
    import re

    from runtime.params import INTERPOLATED_KEYS

    text = (ROOT / "dvc.yaml").read_text() + (ROOT / "text/dvc.yaml").read_text()
    used = set(re.findall(r"\$\{([a-z_0-9]+\.[a-z_0-9]+)\}", text))
    assert used == set(INTERPOLATED_KEYS)
