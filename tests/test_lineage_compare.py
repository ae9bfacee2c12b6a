"""`reflow lineage` / `reflow compare` on a real git + DVC repo of four one-line stages and a real MLflow store.

The pipeline: a -> b -> c, and d beside them reading data.txt. Each stage adds its `k` param to its
upstream's value, writes it to artifacts/<stage>/value and to metrics/<stage>.json. The repo's history:
`base` (reproduced), experiment `var` (`dvc exp run --temp -S b.k=2`), `data` (data.txt edited,
reproduced), and an uncommitted workspace where only `a` was rerun with a.k=5 (so b's dep is stale).
"""

import json
import subprocess
import sys

import mlflow
import pytest

from flows.cli import main
from storage.ancestry import ancestry, compare
from storage.records import (
    LineageError,
    experiment_commit,
    load_source,
    lock_entries,
    mlflow_records,
    revision_commit,
    revision_records,
    workspace_records,
)
from storage.tracking import path_tag

STAGE_SCRIPT = """\
import json, pathlib, sys, yaml
name, upstream = sys.argv[1], sys.argv[2:]
k = yaml.safe_load(open("params.yaml"))[name]["k"]
value = k + sum(float(pathlib.Path(f"artifacts/{u}/value").read_text()) for u in upstream)
if name == "d":
    value += len(pathlib.Path("data.txt").read_text())
pathlib.Path(f"artifacts/{name}").mkdir(parents=True, exist_ok=True)
pathlib.Path(f"artifacts/{name}/value").write_text(str(value))
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path(f"metrics/{name}.json").write_text(json.dumps({"value": value, "eval": {"k": k}}))
"""


def stage(name: str, upstream: list[str], extra_deps: list[str] = ()) -> str:
    deps = ["stage.py", *extra_deps, *(f"artifacts/{u}" for u in upstream)]
    return (f"  {name}:\n    cmd: python stage.py {name} {' '.join(upstream)}\n    deps: {deps}\n"
            f"    params: [{name}]\n    outs: [artifacts/{name}]\n"
            f"    metrics: [{{metrics/{name}.json: {{cache: false}}}}]\n")


def run(root, *cmd: str) -> str:
    res = subprocess.run(list(cmd), cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd}: {res.stdout}{res.stderr}"
    return res.stdout


def git(root, *args: str) -> str:
    return run(root, "git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args)


def dvc(root, *args: str) -> str:
    return run(root, sys.executable, "-m", "dvc", *args)


def log_stage_run(client, experiment_id: str, record, *, params: bool = True, parent: str | None = None,
                  **tags: str) -> str:
    """An MLflow run tagged as `runtime.main.stage_main` tags one (with params=False, as a driver run)."""
    all_tags = {"reflow.stage": record.stage, "reflow.status": "executed" if params else "restored_from_run_cache"}
    all_tags |= {"mlflow.parentRunId": parent} if parent else {}
    all_tags |= {path_tag("input", p): h for p, h in record.deps.items()}
    all_tags |= {path_tag("output", p): h for p, h in record.outs.items()}
    all_tags |= {f"reflow.{k}": v for k, v in tags.items()}
    run_id = client.create_run(experiment_id, run_name=record.stage, tags=all_tags).info.run_id
    for key, value in record.params.items() if params else ():
        client.log_param(run_id, key, value)
    for key, value in record.metrics.items() if params else ():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "data.txt").write_text("four")
    (root / "params.yaml").write_text("a: {k: 1}\nb: {k: 1}\nc: {k: 1}\nd: {k: 1}\n")
    (root / "dvc.yaml").write_text("stages:\n" + stage("a", []) + stage("b", ["a"]) + stage("c", ["b"])
                                   + stage("d", [], ["data.txt"]))
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "repro", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    git(root, "tag", "base")
    dvc(root, "exp", "run", "--temp", "-q", "-n", "var", "-S", "b.k=2")

    (root / "data.txt").write_text("forty-two")
    dvc(root, "repro", "-q")
    git(root, "commit", "-qam", "data")
    git(root, "tag", "data")

    (root / "params.yaml").write_text("a: {k: 5}\nb: {k: 1}\nc: {k: 1}\nd: {k: 1}\n")
    dvc(root, "repro", "-q", "--single-item", "a")  # b still records the artifacts/a it read: stale

    # The MLflow store stages would have filled (the default sqlite file in the repo root): `base` ran
    # every stage by `dvc repro`, `var` reran b and c, and a later `reflow run` restored var's b and c
    # from DVC's run cache, which leaves driver runs with hashes but no params.
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment_id = client.create_experiment("reflow")
    base, var = revision_records(root, "base"), revision_records(root, experiment_commit(root, "var"))
    runs = {f"base/{s}": log_stage_run(client, experiment_id, base[s]) for s in "abcd"}
    runs |= {f"var/{s}": log_stage_run(client, experiment_id, var[s], dvc_exp_name="var") for s in "bc"}
    parent = client.create_run(experiment_id, tags={"reflow.kind": "pipeline", "reflow.pipeline_run_id": "flow-1"})
    runs["pipeline"] = parent.info.run_id
    for s in "bc":
        runs[f"pipeline/{s}"] = log_stage_run(client, experiment_id, var[s], params=False,
                                              parent=parent.info.run_id, pipeline_run_id="flow-1")
    client.set_terminated(parent.info.run_id)
    return root, client, runs


def test_experiment_diverges_at_the_stage_whose_param_was_set(repo):
    root, client, _ = repo
    side = load_source(root, "var", client)
    assert side.kind == "dvc experiment" and side.ref == experiment_commit(root, "var")
    result = compare(load_source(root, "base", client).records, side.records)
    diffs = {d.stage: d for d in result.stages}

    assert result.first_divergent == ["b"]
    assert diffs["b"].params == [("b.k", "1", "2")] and diffs["b"].deps == []
    assert diffs["b"].changed_outs == ["artifacts/b", "metrics/b.json"]
    assert diffs["c"].status == "inherited" and diffs["c"].differing_upstream == ["b"]
    assert diffs["c"].params == [] and ("value", 3.0, 4.0, 1.0) in diffs["c"].metrics
    assert ("eval.k", 1.0, 1.0, 0.0) in diffs["c"].metrics
    assert diffs["a"].status == diffs["d"].status == "same" and diffs["a"].metrics == diffs["d"].metrics == []
    assert [d.stage for d in result.stages].index("a") < [d.stage for d in result.stages].index("b")


def test_git_revisions_diverge_at_the_stage_whose_data_changed(repo):
    root, _, _ = repo
    result = compare(revision_records(root, "base"), revision_records(root, revision_commit(root, "data")))
    d = next(x for x in result.stages if x.stage == "d")
    assert result.first_divergent == ["d"] and d.params == []
    assert [path for path, _, _ in d.deps] == ["data.txt"]
    assert d.metrics == [("eval.k", 1.0, 1.0, 0.0), ("value", 5.0, 10.0, 5.0)]
    assert {x.stage: x.status for x in result.stages} == {"a": "same", "b": "same", "c": "same", "d": "origin"}


def test_ancestry_joins_stages_by_equal_hashes_roots_first(repo):
    root, _, _ = repo
    records = revision_records(root, "base")
    steps = ancestry(records, "c")
    assert [s.record.stage for s in steps] == ["a", "b", "c"]
    b_inputs = {i.path: i for i in steps[1].inputs}
    assert b_inputs["artifacts/a"].producer == "a" and not b_inputs["artifacts/a"].stale
    assert b_inputs["artifacts/a"].hash == records["a"].outs["artifacts/a"]
    assert b_inputs["stage.py"].producer is None  # code: made by no stage
    assert steps[1].record.params == {"b.k": "1"} and steps[1].record.metrics == {"value": 2.0, "eval.k": 1.0}
    assert lock_entries(root)["b"]["params"] == {"b.k": "1"}  # the workspace: b was not rerun


def test_a_dep_no_recorded_output_matches_is_stale(repo):
    root, _, _ = repo
    steps = ancestry(workspace_records(root), "c")
    assert [s.record.stage for s in steps] == ["b", "c"]  # a's current output is not what b read
    stale = next(i for i in steps[0].inputs if i.path == "artifacts/a")
    assert stale.producer == "a" and stale.stale


def test_unknown_names_are_errors_naming_what_was_tried(repo):
    root, client, _ = repo
    with pytest.raises(LineageError, match=r"'nope' is none of: 'workspace', a git revision .* `dvc exp` name .* "
                                           r"MLflow run or pipeline run id"):
        load_source(root, "nope", client)
    with pytest.raises(LineageError, match=r"no stage 'z' among the recorded stages \['a', 'b', 'c', 'd'\]"):
        ancestry(workspace_records(root), "z")


def test_mlflow_pipeline_run_completes_its_lineage_by_hash(repo):
    root, client, runs = repo
    for run_id in (runs["pipeline"], "flow-1"):  # the parent run, or the pipeline_run_id tag it carries
        records = mlflow_records(client, run_id)
        assert sorted(records) == ["a", "b", "c"]  # a: the base run whose output b read
        assert records["b"].run_id == runs["pipeline/b"] and records["a"].run_id == runs["base/a"]
        assert records["b"].params == {"b.k": "2"}  # a driver run: params of var's run with these outputs
        assert records["c"].metrics["value"] == 4.0
    side = load_source(root, "flow-1", client)
    assert side.kind == "mlflow run"
    result = compare(load_source(root, "base", client).records, side.records)
    assert result.first_divergent == ["b"] and result.only_in("a") == ["d"]


def test_mlflow_stage_run_ancestry(repo):
    _, client, runs = repo
    steps = ancestry(mlflow_records(client, runs["var/c"]), "c")
    assert [(s.record.stage, s.record.run_id) for s in steps] == [
        ("a", runs["base/a"]), ("b", runs["var/b"]), ("c", runs["var/c"])]
    assert steps[1].inputs[0].producer == "a"


def test_cli_compare_and_lineage(repo, capsys, monkeypatch):
    root, _, runs = repo
    monkeypatch.chdir(root)
    assert main(["compare", "base", "var"]) == 0
    out = capsys.readouterr().out
    assert "B: var (dvc experiment" in out and "First divergent stage: b" in out
    assert "b.k    1  2" in out and "#/compare-runs?runs=" in out and runs["var/b"] in out
    assert "tags.\"reflow.dvc_exp_name\" = 'var'" in out
    assert "c      value   3  4  +1" in out

    assert main(["compare", "base", "var", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["first_divergent"] == ["b"] and report["mlflow"]["b"]["run_ids"] == [runs["base/b"], runs["var/b"]]

    assert main(["lineage", "artifacts/c/value", "--at", "var"]) == 0
    out = capsys.readouterr().out
    assert "Lineage of artifacts/c/value (stage c) in var" in out
    assert "params   b.k=2" in out and "from a" in out and f"runs/{runs['var/c']}" in out

    assert main(["lineage", runs["var/c"], "--json"]) == 0
    assert [s["stage"] for s in json.loads(capsys.readouterr().out)["steps"]] == ["a", "b", "c"]

    assert main(["lineage", "c"]) == 0
    assert "STALE: a's recorded output is" in capsys.readouterr().out

    assert main(["compare", "base", "nope"]) == 2
    assert "reflow compare: 'nope' is none of" in capsys.readouterr().err


def test_a_dep_on_a_folder_of_outputs_inherits_their_difference():
    """The report depends on the whole `artifacts/` folder: a changed model upstream is not a new origin."""
    from storage.ancestry import compare
    from storage.records import StageRecord

    def records(model_hash: str) -> dict:
        return {
            "model": StageRecord("model", {"stages/model.py": "c"}, {"artifacts/model": model_hash},
                                 {"model.seed": model_hash}),
            "report": StageRecord("report", {"artifacts": "folder-" + model_hash, "stages/report.py": "r"},
                                  {"reports": "page-" + model_hash}),
        }

    result = compare(records("1"), records("2"))
    assert result.first_divergent == ["model"]
    report = next(d for d in result.stages if d.stage == "report")
    assert report.status == "inherited" and report.differing_upstream == ["model"] and report.deps == []
