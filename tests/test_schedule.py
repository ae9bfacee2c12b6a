"""The pipeline's scheduler: stages at once when the DAG allows it, each on devices of its own, on real Prefect
and DVC with stages that only sleep."""

import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.schedule import StagesFailed, run_dag, stage_slots

ROOT = Path(__file__).resolve().parents[1]
DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


def scheduler(concurrency=2, cpu_threads="shared"):
    return SimpleNamespace(concurrency=concurrency, cpu_threads=cpu_threads)


def compute(device="auto", num_processes=1):
    return SimpleNamespace(device=device, num_processes=num_processes)


def run_sleeping(graph, order, concurrency, seconds=0.2, fail=(), slow=()):
    """run_dag on a thread pool where each stage sleeps (the `slow` ones 5 x longer); returns
    {stage: (start, end, slot)} and the error."""
    spans, lock = {}, threading.Lock()

    def work(stage, slot):
        start = time.monotonic()
        time.sleep(seconds * (5 if stage in slow else 1))
        with lock:
            spans[stage] = (start, time.monotonic(), slot.name)
        if stage in fail:
            raise RuntimeError(f"{stage} failed")
        return stage

    slots = stage_slots(scheduler(concurrency), compute("cpu"))
    with ThreadPoolExecutor(8) as pool:
        try:
            run_dag(order, graph, slots, lambda s, slot, up: pool.submit(work, s, slot),
                    wait_first=lambda fs: next(iter(wait(fs, return_when=FIRST_COMPLETED).done)))
        except StagesFailed as exc:
            return spans, exc
    return spans, None


def overlap(x, y):
    return x[0] < y[1] and y[0] < x[1]


def test_independent_branches_run_at_once_and_a_join_waits_for_both():
    spans, _ = run_sleeping(DIAMOND, ["a", "b", "c", "d"], concurrency=2)
    assert overlap(spans["b"], spans["c"])
    assert spans["b"][2] != spans["c"][2]  # each on a slot of its own
    assert spans["a"][1] <= min(spans["b"][0], spans["c"][0])
    assert spans["d"][0] >= max(spans["b"][1], spans["c"][1])


def test_concurrency_one_runs_stages_one_at_a_time_in_order():
    spans, _ = run_sleeping(DIAMOND, ["a", "b", "c", "d"], concurrency=1)
    assert sorted(spans, key=lambda s: spans[s][0]) == ["a", "b", "c", "d"]
    assert not overlap(spans["b"], spans["c"])


def test_after_a_failure_no_new_stage_starts_but_running_ones_finish():
    graph = {"a": [], "slow": [], "after_a": ["a"], "after_slow": ["slow"]}
    spans, exc = run_sleeping(graph, ["a", "slow", "after_a", "after_slow"], concurrency=2, fail={"a"},
                              slow={"slow"})
    assert isinstance(exc, StagesFailed) and list(exc.failures) == ["a"] and "a failed" in str(exc)
    assert set(spans) == {"a", "slow"}  # slow finished; nothing downstream of either started


def test_gpus_are_handed_out_in_whole_groups_and_never_shared():
    slots = stage_slots(scheduler(4), compute(num_processes=2), gpus=["0", "1", "2", "3", "4"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]  # GPU 4 alone is no group
    one = stage_slots(scheduler(4), compute(), gpus=["3", "5"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in one] == ["3", "5"]
    with pytest.raises(ValueError, match="compute.num_processes is 4 but only 2 GPU"):
        stage_slots(scheduler(1), compute(num_processes=4), gpus=["0", "1"])


def test_cpu_slots_share_or_split_the_cores():
    shared = stage_slots(scheduler(2), compute("cpu"), cpu_count=2)
    assert all("REFLOW_CORES" not in s.env and s.env["OMP_WAIT_POLICY"] == "PASSIVE" for s in shared)
    split = stage_slots(scheduler(3, "split"), compute("cpu"), cpu_count=8)
    assert [s.env["REFLOW_CORES"] for s in split] == ["2", "2", "2"]


def test_a_stage_given_its_share_of_cores_sets_that_many_threads(monkeypatch):
    import torch

    from runtime.devices import cores, set_threads

    monkeypatch.setenv("REFLOW_CORES", "1")
    before = torch.get_num_threads()
    try:
        set_threads(SimpleNamespace(_sections={"compute"}, compute=SimpleNamespace(num_threads=None)))
        assert cores() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# A stage that sleeps and leaves when it ran: the real flow, DVC and Prefect schedule it like any stage.
SLEEP = ("python -c \"import time; s = time.time(); time.sleep(3); "
         "open('{out}', 'w').write(f'{{s}} {{time.time()}}')\"")


def sleeping_repo(root: Path, concurrency: int) -> Path:
    root.mkdir()
    stages = {name: {"cmd": SLEEP.format(out=f"{name}.txt"), "deps": [f"{u}.txt" for u in ups],
                     "outs": [f"{name}.txt"]} for name, ups in DIAMOND.items()}
    for spec in stages.values():
        spec["deps"] = spec["deps"] or ["params.yaml"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["scheduler"]["concurrency"] = concurrency
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True)
    return root


@pytest.mark.parametrize("concurrency", [1, 2])
def test_the_pipeline_flow_runs_branches_at_once_on_dvc_and_prefect(tmp_path, prefect_harness, concurrency):
    from flows.pipeline import pipeline

    repo = sleeping_repo(tmp_path / "repo", concurrency)
    outcomes = pipeline(root=str(repo))
    assert sorted(o["stage"] for o in outcomes) == ["a", "b", "c", "d"]
    assert all(o["status"] == "executed" for o in outcomes)
    spans = {s: tuple(map(float, (repo / f"{s}.txt").read_text().split())) for s in DIAMOND}
    assert overlap(spans["b"], spans["c"]) == (concurrency == 2)
    assert spans["d"][0] >= max(spans["b"][1], spans["c"][1])
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == ["a", "b", "c", "d"]  # both branches' entries, neither lost to the other
    again = pipeline(root=str(repo))
    assert all(o["status"] == "skipped_up_to_date" for o in again)

