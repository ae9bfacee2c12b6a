"""What every stage shares: its declaration, and the thin `main()` around its pure `run()`.

A stage module declares a `SPEC` (name, params sections, deps, outs, metrics file) that mirrors its
entry in `dvc.yaml` (a test keeps the two equal) and a `run(ctx) -> metrics`. `stage_main` does the
rest, in an order chosen so that nothing is touched before the params are known to be valid:

  1. validate the whole `params.yaml` (exit 2 with every problem listed);
  2. hash the inputs with DVC and pick the scratch directory (resume state) for params + inputs;
  3. open (or resume) the stage's MLflow run with its lineage tags;
  4. `run(ctx)`; outputs are written atomically by the stage through `storage`;
  5. write the metrics file, tag the run with DVC's hashes of the outputs, clear the scratch.

With `compute.num_processes` N > 1, a stage that declares itself distributed (training and pair
generation) does steps 1-3 and 5 in the process DVC started, and step 4 in N processes started by
`accelerate launch` (torch.distributed: gloo on CPU, NCCL on GPU). They share the scratch directory;
the main process (rank 0) logs into the same MLflow run and writes the outputs, the others only
compute (their data shard, their generation shards). Any process failing stops all of them, and the
user's error is printed once, by the launching process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagedata.sources import DataError  # noqa: E402
from models.dit import ModelLoadError  # noqa: E402
from stages.params import Params, ParamsError, ParamsView, TrainParams, load_params  # noqa: E402
from stages.spec import StageSpec, resolve_path  # noqa: E402
from storage import repo, tracking  # noqa: E402
from storage.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from storage.checkpoints import CheckpointError  # noqa: E402
from storage.hashing import params_hash  # noqa: E402
from storage.layout import DatasetError  # noqa: E402
from storage.scratch import clear_scratch, scratch_dir  # noqa: E402
from training.loop import NonFiniteLossError, TrainConfig, enable_tf32  # noqa: E402


@dataclass
class StageContext:
    """Everything `run()` may use: its params sections, paths, resume scratch and the tracker."""

    spec: StageSpec
    root: Path
    params: ParamsView
    scratch: Path
    inputs: dict[str, str]  # dep path -> DVC hash
    params_hash: str
    tracked: bool = True  # False when run() is called directly (tests, notebooks): nothing is logged
    rank: int = 0  # this process among the `world` that `accelerate launch` started (compute.num_processes)
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs and logs (rank 0; the only process unless launched)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process of this stage gets here (nothing to wait for in one process)."""
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def dep(self, role: str) -> Path:
        return self.root / resolve_path(self.spec.deps[role], self.params)

    def out(self, role: str) -> Path:
        return self.root / self.spec.outs[role]

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.tracked:
            tracking.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.tracked:
            tracking.log_artifact(path, artifact_path)

    def attrs(self) -> dict[str, str]:
        """What every artifact records about its making (zarr attrs, model meta)."""
        return {"producer": self.spec.name, "params_hash": self.params_hash}


class StageError(RuntimeError):
    """A failure with a message meant for the user (no traceback needed)."""


# Failures whose message says what is wrong and where: shown without a traceback (REFLOW_DEBUG=1 adds it).
USER_ERRORS = (StageError, DataError, DatasetError, CheckpointError, ModelLoadError, NonFiniteLossError)


def train_config(p: TrainParams, seed: int) -> TrainConfig:
    """The training-loop settings of a stage's params section (every such section extends TrainParams)."""
    return TrainConfig(steps=p.steps, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                       ema_decay=p.ema_decay, grad_clip=p.grad_clip, log_every=p.log_every,
                       checkpoint_every=p.checkpoint_every, seed=seed)


def uses_cuda(device: str) -> bool:
    """Whether `compute.device` means CUDA here: asked for (or `auto`) and present."""
    import torch

    return device != "cpu" and torch.cuda.is_available()


def generation_device(compute: Any) -> str:
    """Where sampling and pair generation run: CUDA when asked for (or `auto`) and present, else the CPU.

    In a launched process that is its own GPU (`cuda:<local rank>`), so N processes use N devices.
    """
    if not uses_cuda(compute.device):
        return "cpu"
    if os.environ.get(ENV_LAUNCH_DIR):
        from accelerate import PartialState

        return str(PartialState().device)
    return "cuda"


def generation_autocast(compute: Any):
    """The precision of sampling and pair generation: `compute.mixed_precision` as autocast (bf16/fp16 matmuls,
    the ODE state stays fp32), and TF32 for what stays fp32 on CUDA, as the training loops have it. With
    `mixed_precision: "no"` (the CPU default) it changes nothing, so pairs stay bitwise reproducible."""
    import contextlib

    import torch

    device = generation_device(compute)
    if device.startswith("cuda"):
        enable_tf32()
    if compute.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if compute.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.split(":")[0], dtype=dtype)


def set_threads(params: ParamsView, processes: int = 1) -> None:
    """`compute.num_threads`, or the cores shared out among the stage's processes."""
    import torch

    n = params.compute.num_threads if "compute" in params._sections else None
    torch.set_num_threads(n or max(1, (os.cpu_count() or 1) // processes))


def make_context(spec: StageSpec, root: Path, params: Params, tracked: bool = True) -> StageContext:
    """Resolve a stage's params view, input hashes and scratch dir in `root`."""
    view = ParamsView(params, spec.params)
    try:
        inputs = repo.stage_input_hashes(root, spec.name)
    except KeyError:
        inputs = {}  # not declared in this dvc.yaml (a notebook or a test calling run() directly)
    section_values = view.as_dict()
    key = {"params": section_values, "inputs": inputs}
    return StageContext(
        spec=spec, root=root, params=view, scratch=scratch_dir(root, spec.name, key), inputs=inputs,
        params_hash=params_hash(section_values), tracked=tracked,
    )


def failure_detail(exc: BaseException, ctx: StageContext) -> str | None:
    """What to tell the user about a failure whose message says what is wrong and where; None for a bug
    (whose traceback is the message)."""
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing {exc.filename or 'its output'} ({exc.strerror}). Earlier "
                "outputs are intact (every write goes to a temporary name first); free some space and rerun: the "
                f"stage resumes from its last checkpoint in {ctx.scratch}.")
    return None


def stage_main(spec: StageSpec, run: Callable[[StageContext], dict[str, Any]], *, distributed: bool = False) -> int:
    """Entry point of `python -m stages.<name>`: returns the process exit code.

    `distributed`: `run` works in several processes (it splits its work by `ctx.rank` and only the main
    process writes outputs), so `compute.num_processes` > 1 runs it under `accelerate launch`.
    """
    if os.environ.get(ENV_LAUNCH_DIR):
        return _launched_main(spec, run)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"error: stage {spec.name!r} was started by a distributed launcher; set compute.num_processes in "
              f"params.yaml and run `python -m stages.{spec.name.partition('@')[0]}` instead: it launches its "
              "own processes and keeps one MLflow run and one output.", file=sys.stderr)
        return 2
    root = repo.find_repo_root()
    try:
        params = load_params(root / "params.yaml")
    except ParamsError as exc:
        print(f"error: stage {spec.name!r} did not start, no output was touched.\n{exc}", file=sys.stderr)
        return 2
    ctx = make_context(spec, root, params)
    processes = params.compute.num_processes if distributed else 1
    set_threads(ctx.params)
    tracking.configure(params.tracking.uri, params.tracking.experiment, root)
    commit, dirty = repo.git_state(root)
    tags = {"params_hash": ctx.params_hash, "git_commit": commit or "none", "git_dirty": str(dirty).lower(),
            "status": "executed"}
    if processes > 1:
        tags["num_processes"] = str(processes)
    if os.environ.get(tracking.ENV_PIPELINE_RUN):
        tags["pipeline_run_id"] = os.environ[tracking.ENV_PIPELINE_RUN]
    for tag, var in (("dvc_exp_name", "DVC_EXP_NAME"), ("dvc_exp_baseline", "DVC_EXP_BASELINE_REV")):
        if os.environ.get(var):  # set by `dvc exp run`: the experiment this run belongs to
            tags[tag] = os.environ[var]
    try:
        with tracking.stage_run(stage=spec.name, scratch=ctx.scratch, params=ctx.params.as_dict(),
                                tags=tags, inputs=ctx.inputs) as mlflow_run:
            if processes > 1:
                metrics = launch(ctx, params, run_id=mlflow_run.info.run_id)
            else:
                metrics = run(ctx)
            if spec.metrics:
                (root / spec.metrics).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(root / spec.metrics, metrics)
            tracking.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
            outputs = repo.stage_output_hashes(root, spec.name)
            tracking.set_tags(outputs=outputs)
    except Exception as exc:
        detail = failure_detail(exc, ctx)
        if detail is None:
            raise
        print(f"error: stage {spec.name!r} failed: {detail}", file=sys.stderr)
        if os.environ.get("REFLOW_DEBUG"):
            traceback.print_exc()
        return 1
    clear_scratch(ctx.scratch)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Several processes (`compute.num_processes` > 1): the launching side and the launched side.
# ---------------------------------------------------------------------------------------------------------
ENV_LAUNCH_DIR = "REFLOW_LAUNCH_DIR"  # set in launched processes: where they find their context and leave results
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
               "OMP_NUM_THREADS": str(compute.num_threads or max(1, (os.cpu_count() or 1) // n))}
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


def _launched_main(spec: StageSpec, run: Callable[[StageContext], dict[str, Any]]) -> int:
    """One of the launched processes: run the stage's work as process `rank`; rank 0 logs and writes outputs."""
    _die_with_launcher()
    from accelerate import PartialState

    launch_dir = Path(os.environ[ENV_LAUNCH_DIR])
    info = json.loads((launch_dir / CONTEXT_FILE).read_text())
    root = repo.find_repo_root()
    params = load_params(root / "params.yaml")
    view = ParamsView(params, spec.params)
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
