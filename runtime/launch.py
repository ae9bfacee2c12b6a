"""Several processes (`compute.num_processes` > 1): the launching side (`accelerate launch` through torchrun)
and the launched side, which finds its context in a directory the launcher wrote."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.context import StageContext, StageError, failure_detail
from runtime.devices import ENV_LAUNCH_DIR, cores, set_threads, uses_cuda
from runtime.params import Params, ParamsView, load_params
from runtime.spec import StageSpec
from storage import repo, tracking
from storage.atomic import atomic_write_json, atomic_write_text
from storage.hashing import params_hash

ENV_LAUNCHER_PID = "REFLOW_LAUNCHER_PID"
CONTEXT_FILE, METRICS_FILE = "context.json", "metrics.json"


class LaunchError(StageError):
    """A launched process failed; the message is the one the user needs (a user error, or which process died)."""


def launch_argv(spec: StageSpec, processes: int, mixed_precision: str) -> list[str]:
    """`accelerate launch` arguments that run this stage's module in `processes` processes on this machine.

    `--multi_gpu` is what makes accelerate start N processes through torchrun on one machine; on a CPU
    (or with compute.device cpu) the processes then use the gloo backend (`--cpu` would start one
    process and expect mpirun). Port 0: a free port, so concurrent stages do not collide.
    """
    module, _, key = spec.name.partition("@")  # dvc.yaml runs `python -m stages.<name> [<key>]`
    return ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--main_process_port", "0",
            "--module", f"stages.{module}", *([key] if key else [])]


def launch(ctx: StageContext, params: Params, *, run_id: str) -> dict[str, Any]:
    """Run the stage's `run` in `compute.num_processes` processes; returns the main process's metrics."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    compute = params.compute
    n, cuda = compute.num_processes, uses_cuda(compute.device)
    if cuda:
        import torch

        if torch.cuda.device_count() < n:
            raise StageError(f"compute.num_processes is {n} but only {torch.cuda.device_count()} CUDA device(s) are "
                             "visible; lower compute.num_processes (one process per GPU) or set compute.device: cpu")
    args = launch_command_parser().parse_args(launch_argv(ctx.spec, n, compute.mixed_precision))
    with tempfile.TemporaryDirectory(prefix="reflow-launch-") as tmp:
        launch_dir = Path(tmp)
        # The launched processes get the context the launcher computed (one DVC hashing, one scratch key).
        atomic_write_json(launch_dir / CONTEXT_FILE, {
            "scratch": str(ctx.scratch), "inputs": ctx.inputs, "params_hash": ctx.params_hash, "run_id": run_id})
        env = {ENV_LAUNCH_DIR: tmp, ENV_LAUNCHER_PID: str(os.getpid()),
               # torchrun sets 1 thread per process otherwise; each gets its share of the cores
               "OMP_NUM_THREADS": str(compute.num_threads or max(1, cores() // n))}
        if not cuda and sys.platform == "linux" and "GLOO_SOCKET_IFNAME" not in os.environ:
            env["GLOO_SOCKET_IFNAME"] = "lo"  # one machine: gloo's connections stay on the loopback device
        saved_env = dict(os.environ)
        # The launcher logs every failure with a traceback of its own; the one message below replaces them.
        quiet = not os.environ.get("REFLOW_DEBUG")
        elastic_log = logging.getLogger("torch.distributed.elastic")
        saved_level = elastic_log.level
        if quiet:
            elastic_log.setLevel(logging.CRITICAL)
        os.environ.update(env)
        try:
            _multi_process_launch(args)
        except ChildFailedError as exc:
            raise LaunchError(_launch_failure(ctx, n, launch_dir, exc.failures)) from None
        except SignalException as exc:
            raise LaunchError(f"stopped by {signal.Signals(exc.sigval).name}; all {n} processes were stopped. "
                              f"Rerun to resume from the progress kept in {ctx.scratch}.") from None
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            elastic_log.setLevel(saved_level)
        metrics_file = launch_dir / METRICS_FILE
        if not metrics_file.is_file():
            raise LaunchError(f"all {n} processes exited cleanly but the main one left no metrics in {metrics_file}")
        return json.loads(metrics_file.read_text())


def _multi_process_launch(args: Any) -> None:
    """`accelerate launch` with these parsed arguments (its `--multi_gpu` path: torchrun on this machine), with
    torchrun's rendezvous store listening on the loopback device only.

    torchrun's own store listens on every interface; a store that already serves the port in this process
    is reused instead (TCPStore's multi_tenant), so one is opened on 127.0.0.1 first, between accelerate
    choosing the port and torchrun starting. Otherwise this is accelerate's `multi_gpu_launcher`.
    """
    import datetime
    import socket

    import torch.distributed.run as torchrun
    from accelerate.commands.launch import _validate_launch_command
    from accelerate.utils import check_cuda_p2p_ib_support, patch_environment
    from accelerate.utils.launch import _filter_args, prepare_multi_gpu_env
    from torch.distributed import TCPStore

    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)  # picks the free port (--main_process_port 0) into args.master_port
    if not check_cuda_p2p_ib_support():  # GPUs without P2P/InfiniBand (RTX 40xx): as accelerate sets it
        env.setdefault("NCCL_P2P_DISABLE", "1")
        env.setdefault("NCCL_IB_DISABLE", "1")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", int(args.master_port)))
        sock.listen(128)
        store = TCPStore("127.0.0.1", int(args.master_port), is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(minutes=30), multi_tenant=True, master_listen_fd=sock.fileno())
        sock.detach()  # the store owns the descriptor now and closes it itself
    torchrun_args = _filter_args(args, torchrun.get_args_parser(), [
        "--training_script", args.training_script, "--training_script_args", args.training_script_args])
    with patch_environment(**env):
        torchrun.run(torchrun_args)
    del store  # torchrun is done with it: the server closes with the last reference


def _launch_failure(ctx: StageContext, n: int, launch_dir: Path, failures: dict) -> str:
    """One message for a failed launch: the user errors the processes reported (each once), else which died."""
    details: dict[str, list[int]] = {}
    for f in sorted(launch_dir.glob("error-*.txt"), key=lambda f: int(f.stem.split("-")[1])):
        details.setdefault(f.read_text(), []).append(int(f.stem.split("-")[1]))
    if len(details) == 1:
        return next(iter(details))
    if details:
        return "; ".join(f"process {', '.join(map(str, ranks))} of {n}: {d}" for d, ranks in details.items())
    # The cause, not its echoes: a process that saw a peer vanish, or that the launcher itself stopped with
    # SIGTERM once another had failed, comes last.
    echoes = {int(f.name.rsplit("-", 1)[1]) for f in launch_dir.glob("peer-lost-*")}
    rank, failure = min(failures.items(), key=lambda rf: (rf[0] in echoes, rf[1].exitcode == -signal.SIGTERM, rf[0]))
    if failure.exitcode < 0:
        how = f"was killed by {signal.Signals(-failure.exitcode).name}"
    else:
        how = f"exited with code {failure.exitcode} (its traceback is above)"
    return (f"process {rank} of {n} {how}; the other processes were stopped. Rerun to resume from the progress "
            f"kept in {ctx.scratch}.")


def _peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process of the stage is gone (gloo's words)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _die_with_launcher() -> None:
    """Have Linux SIGKILL this process when the launcher dies.

    torchrun starts each process in a session of its own, so killing the stage's process group (a Prefect
    timeout, a SIGKILL) would otherwise leave them running, and possibly writing, after the stage is gone.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(os.environ[ENV_LAUNCHER_PID]):  # it died before the request took effect
        os._exit(1)


def launched_main(spec: StageSpec, run: Callable[[StageContext], dict[str, Any]]) -> int:
    """One of the launched processes: run the stage's work as process `rank`; rank 0 logs and writes outputs."""
    _die_with_launcher()
    from accelerate import PartialState

    launch_dir = Path(os.environ[ENV_LAUNCH_DIR])
    info = json.loads((launch_dir / CONTEXT_FILE).read_text())
    root = repo.find_repo_root()
    params = load_params(root / "params.yaml")
    view = ParamsView(params, spec.params, spec.aliases)
    state = PartialState(cpu=not uses_cuda(params.compute.device))
    ctx = StageContext(spec=spec, root=root, params=view, scratch=Path(info["scratch"]), inputs=info["inputs"],
                       params_hash=info["params_hash"], tracked=state.is_main_process, rank=state.process_index,
                       world=state.num_processes)
    set_threads(ctx.params, ctx.world)
    mlflow = None
    if ctx.is_main:
        import mlflow

        tracking.configure(params.tracking.uri, params.tracking.experiment, root)
        mlflow.start_run(run_id=info["run_id"])  # the launcher's run: one stage execution, one run
    try:
        if params_hash(view.as_dict()) != ctx.params_hash:
            raise StageError("params.yaml changed while the stage was starting; rerun it")
        metrics = run(ctx)
        if ctx.is_main:
            atomic_write_json(launch_dir / METRICS_FILE, metrics)
    except Exception as exc:
        if mlflow is not None:
            mlflow.end_run(status="FAILED")
        detail = failure_detail(exc, ctx)
        if detail is None and _peer_lost(exc):
            # Another process died while this one waited on it: the launcher reports that one, not this echo.
            atomic_write_text(launch_dir / f"peer-lost-{ctx.rank}", "")
            return 1
        if detail is None:
            raise
        atomic_write_text(launch_dir / f"error-{ctx.rank}.txt", detail)
        if os.environ.get("REFLOW_DEBUG"):
            traceback.print_exc()
        return 1
    if mlflow is not None:
        mlflow.end_run(status="RUNNING")  # the launcher ends it, after the metrics file and output hashes
    state.destroy_process_group()
    return 0
