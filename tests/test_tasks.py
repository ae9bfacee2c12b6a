"""The DVC-stage runner on a real DVC repo: executed, skipped, restored, failed, timed out."""

import os
import subprocess
import sys
import time

import pytest

from flows.pipeline import execution_order, stage_graph
from tasks.dvc_stage import StageFailed, StageTimeout, run_stage_process, stage_env

DVC_YAML = """
stages:
  make:
    cmd: python -c "open('a.txt','w').write('a')"
    outs: [a.txt]
  copy:
    cmd: python -c "open('b.txt','w').write(open('a.txt').read()*2)"
    deps: [a.txt]
    outs: [b.txt]
  fail:
    cmd: python -c "import sys; print('bad input - x.txt'); sys.exit(3)"
    deps: [b.txt]
    outs: [never.txt]
  slow:
    cmd: sh -c 'sleep 120 & echo $! > child.pid; wait'
    outs: [slow.txt]
"""


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def run(repo, stage, timeout_s=120.0):
    lines = []
    outcome = run_stage_process(stage, repo, env=stage_env({}), timeout_s=timeout_s, log=lines.append)
    return outcome, lines


def test_graph_and_order_come_from_dvc(repo):
    graph = stage_graph(repo)
    assert graph == {"make": [], "copy": ["make"], "fail": ["copy"], "slow": []}
    assert execution_order(graph) == ["make", "slow", "copy", "fail"]
    assert execution_order(graph, ["copy"]) == ["make", "copy"]
    with pytest.raises(ValueError, match="unknown stage"):
        execution_order(graph, ["nope"])


def test_executed_then_skipped_then_restored_from_run_cache(repo):
    run(repo, "make")
    first, lines = run(repo, "copy")
    assert first.status == "executed" and (repo / "b.txt").read_text() == "aa"
    assert any("Running stage 'copy'" in line for line in lines)
    second, _ = run(repo, "copy")
    assert second.status == "skipped_up_to_date"
    (repo / "b.txt").unlink()  # DVC's run cache knows these deps: outputs come back without running
    third, _ = run(repo, "copy")
    assert third.status == "restored_from_run_cache" and (repo / "b.txt").read_text() == "aa"


def test_failure_carries_exit_code_and_output(repo):
    run(repo, "make")
    run(repo, "copy")
    with pytest.raises(StageFailed) as err:
        run(repo, "fail")
    assert "bad input - x.txt" in str(err.value)
    assert err.value.returncode != 0


def test_timeout_kills_the_whole_process_group(repo):
    start = time.monotonic()
    with pytest.raises(StageTimeout):
        run(repo, "slow", timeout_s=4.0)
    assert time.monotonic() - start < 30
    child = int((repo / "child.pid").read_text())
    time.sleep(0.5)
    assert not alive(child)


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a container's init to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/status").read()
    return "State:\tZ" not in status
