"""The one Prefect task: run a DVC stage as `dvc repro --single-item <stage>` in a subprocess.

DVC alone decides what is up to date (no Prefect caching). The subprocess gets its own process
group so a timeout or a cancelled flow kills the stage and everything it started; its output is
streamed line by line into the Prefect log. Only transient failures (another process holds DVC's
lock) are retried: a stage that fails on its own would fail the same way again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

# What DVC prints when it does not run a stage's command.
SKIPPED = "didn't change, skipping"
RESTORED = "is cached - skipping run"
# Another `dvc repro` / `reflow run` holds the workspace lock, or the stage's inputs or outputs (rwlock).
TRANSIENT = ("Unable to acquire lock", "is locked by", "lock is being held", "is busy, it is being blocked by")
# DVC's after-run hints about git; said once per stage they drown the stage's own log.
HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
         "Use `dvc push`")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        super().__init__(f"stage {stage!r} exited with {returncode}:\n" + "\n".join(tail[-20:]))


class TransientStageFailure(StageFailed):
    """DVC could not take its lock (another repro on this workspace): worth a retry."""


class StageTimeout(StageFailed):
    pass


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str  # executed | skipped_up_to_date | restored_from_run_cache
    seconds: float


def stage_env(extra: dict[str, str]) -> dict[str, str]:
    """The stage's environment: ours, the venv's bin first (so `python` is this interpreter), telemetry off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the whole process group, then SIGKILL whatever is left after the grace period."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage_process(stage: str, root: Path, *, env: dict[str, str], timeout_s: float, log) -> StageOutcome:
    """Run `dvc repro --single-item stage` in `root`, streaming output to `log(line)`."""
    from runtime.text_chain import address

    # --wait-for-lock: DVC holds its workspace lock only around a stage (never while the command runs), so a
    # stage finishing beside this one delays its start by moments; failing instead would cost a retry.
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", address(stage)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        # tqdm redraws with '\r': split on it too, and log a bar at most every few seconds.
        assert proc.stdout is not None
        buf, last_bar = b"", 0.0
        while chunk := proc.stdout.read1(4096):
            buf += chunk
            *done, buf = buf.replace(b"\r", b"\n").split(b"\n")
            for raw in done:
                line = raw.decode(errors="replace").rstrip()
                if not line or line.lstrip().startswith(HINTS):
                    continue
                is_bar = "it/s]" in line or "s/it]" in line or "%|" in line
                if is_bar and time.monotonic() - last_bar < 5.0 and "100%" not in line:
                    continue
                last_bar = time.monotonic() if is_bar else last_bar
                lines.append(line)
                log(line)
        if buf.strip():
            lines.append(buf.decode(errors="replace"))
            log(lines[-1])

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(timeout=5)
        raise StageTimeout(stage, -9, lines + [f"killed after the {timeout_s:.0f} s limit"]) from None
    except BaseException:  # cancelled flow, Ctrl-C: never leave the stage running behind us
        _kill_group(proc)
        raise
    reader.join(timeout=30)
    if proc.returncode != 0:
        text = "\n".join(lines[-50:])
        cls = TransientStageFailure if any(t in text for t in TRANSIENT) else StageFailed
        raise cls(stage, proc.returncode, lines)
    text = "\n".join(lines)
    status = ("skipped_up_to_date" if SKIPPED in text else "restored_from_run_cache" if RESTORED in text
              else "executed")
    return StageOutcome(stage, status, time.monotonic() - start)


def _retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except TransientStageFailure:
        return True
    except Exception:
        return False
    return False


def _record_in_mlflow(stage: str, root: Path, outcome: StageOutcome, tracking_cfg: dict[str, str]) -> str | None:
    """Link to the stage's MLflow run; a stage restored from DVC's run cache ran no code, so record it here."""
    from storage import tracking
    from storage.records import lock_entries

    pipeline_id = tracking_cfg["pipeline_run_id"]
    tracking.configure(tracking_cfg.get("uri") or None, tracking_cfg["experiment"], root)
    if outcome.status == "executed":
        run_id = tracking.find_stage_run(pipeline_id, stage)
    elif outcome.status == "restored_from_run_cache":
        entry = lock_entries(root).get(stage, {})
        run_id = tracking.record_driver_run(
            stage, parent_run_id=tracking_cfg["parent_run_id"], pipeline_run_id=pipeline_id,
            status=outcome.status, inputs=entry.get("deps", {}), outputs=entry.get("outs", {}))
    else:
        return None
    return tracking.run_link(tracking_cfg["ui_url"], run_id) if run_id else None


@task(
    task_run_name="{stage}",
    retries=5,
    retry_delay_seconds=[10, 30, 60, 120, 300],  # wait out another run's stage for up to ~9 minutes
    retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE,
    log_prints=False,
)
def dvc_stage(stage: str, root: str, timeout_s: float, tracking_cfg: dict[str, str],
              known_up_to_date: bool = False, env: dict[str, str] | None = None, slot: str = "") -> StageOutcome:
    """Run one DVC stage; leaves a Prefect artifact saying whether it ran, was skipped or restored.

    `known_up_to_date`: the flow's `dvc status` found the stage and its inputs unchanged, so no `dvc repro`
    is started for it (DVC would only say it skipped it). `env`: the devices of the flow's slot for it
    (flows/schedule.py), named `slot`.
    """
    from storage.tracking import ENV_PARENT_RUN, ENV_PIPELINE_RUN

    logger = get_run_logger()
    if known_up_to_date:
        outcome = StageOutcome(stage, "skipped_up_to_date", 0.0)
    else:
        if slot:
            logger.info("stage %s starts on %s", stage, slot)
        env = stage_env({**(env or {}), ENV_PARENT_RUN: tracking_cfg["parent_run_id"],
                         ENV_PIPELINE_RUN: tracking_cfg["pipeline_run_id"]})
        outcome = run_stage_process(stage, Path(root), env=env, timeout_s=timeout_s, log=logger.info)
    safe_key = stage.replace("@", "-").replace("_", "-").lower()
    if outcome.status == "executed":
        logger.info("stage %s executed in %.1f s", stage, outcome.seconds)
    else:
        note = ("DVC found it up to date and did not run it" if outcome.status == "skipped_up_to_date"
                else "DVC restored its outputs from the run cache without running it")
        logger.info("stage %s: %s", stage, note)
        create_markdown_artifact(key=f"{safe_key}-status", markdown=f"**{stage}**: {note}.",
                                 description=f"{stage}: {outcome.status}")
    mlflow_link = _record_in_mlflow(stage, Path(root), outcome, tracking_cfg)
    if mlflow_link:
        create_link_artifact(key=f"{safe_key}-mlflow", link=mlflow_link, link_text=f"MLflow run of {stage}")
    return outcome
