"""`reflow`: the command line. Imports are lazy so `reflow validate` answers in a fraction of a second."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

for _var, _value in (("DO_NOT_TRACK", "true"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                     ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DVC_NO_ANALYTICS", "1"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_var, _value)


def cmd_validate(args: argparse.Namespace) -> int:
    from runtime.params import ParamsError, load_params

    try:
        load_params(args.file)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from runtime.params import render_params

    text = render_params()
    if not args.write:
        sys.stdout.write(text)
        return 0
    from storage.atomic import atomic_write_text
    from storage.repo import find_repo_root

    path = find_repo_root() / "params.yaml"
    atomic_write_text(path, text)  # a reader (DVC, a running stage) sees the old file or the new, never half
    print(f"{path}: written from the defaults in runtime/params.py")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import with_task_runner
    from runtime.params import ParamsError, load_params
    from storage.repo import find_repo_root

    root = find_repo_root()
    try:
        pipeline = with_task_runner(load_params(root / "params.yaml").scheduler)
    except (ParamsError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    where = os.environ.get("PREFECT_API_URL") or "an ephemeral Prefect server (set PREFECT_API_URL to use yours)"
    print(f"reflow: running the {args.pipeline} pipeline in {root} on {where}", flush=True)
    state = pipeline(root=str(root), targets=args.targets or None, stage_timeout_s=args.stage_timeout,
                     which=args.pipeline, return_state=True)
    if not state.is_completed():
        print(f"reflow: pipeline {state.name}: {state.message or ''}", file=sys.stderr)
        return 1
    from flows.summary import print_summary

    print_summary(root, args.pipeline)
    return 0


def _wait_http(url: str, timeout_s: float) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_ui(args: argparse.Namespace) -> int:
    # Ctrl-C and SIGTERM both stop the servers, also when started from a script in the background (a shell
    # starts `cmd &` with SIGINT ignored, and Python would then never see Ctrl-C).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    from runtime.params import load_params
    from storage.repo import find_repo_root
    from storage.tracking import tracking_uri

    root = find_repo_root()
    params = load_params(root / "params.yaml")
    bin_dir = Path(sys.executable).parent
    prefect_url = f"http://{args.host}:{args.prefect_port}"
    mlflow_url = f"http://{args.host}:{args.mlflow_port}"
    store = tracking_uri(params.tracking.uri, root)
    procs = [subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", args.host,
                               "--port", str(args.prefect_port)], start_new_session=True)]
    if store.startswith(("http://", "https://")):  # a shared server (MLFLOW_TRACKING_URI): its UI is its own
        mlflow_url = store
    else:
        procs.append(subprocess.Popen([str(bin_dir / "mlflow"), "server", "--host", args.host, "--port",
                                       str(args.mlflow_port), "--backend-store-uri", store], start_new_session=True))
    ok = _wait_http(f"{prefect_url}/api/health", 90) and _wait_http(mlflow_url, 90)
    if ok:
        print(f"\nPrefect UI: {prefect_url}\nMLflow UI:  {mlflow_url}\n"
              f"To report flow runs to this Prefect server: export PREFECT_API_URL={prefect_url}/api\n"
              "Ctrl-C stops both.", flush=True)
    try:
        while ok and all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    return 0 if ok else 1


def cmd_results(args: argparse.Namespace) -> int:
    from measure.report import print_results
    from storage.repo import find_repo_root

    if args.runs:
        from flows.compare import cmd_runs

        return cmd_runs(args)
    return print_results(find_repo_root(), args.measure)


def cmd_sample(args: argparse.Namespace) -> int:
    from runtime.devices import generation_device
    from runtime.generator import GeneratorError, sample_grid
    from runtime.params import load_params
    from storage.checkpoints import CheckpointError
    from storage.repo import find_repo_root

    root = find_repo_root()
    device = generation_device(load_params(root / "params.yaml").compute)
    try:
        made = sample_grid(root, args.model, steps=args.steps, solver=args.solver, label=args.label, n=args.n,
                           out=Path(args.out), guidance=args.guidance, seed=args.seed, vae=args.vae, device=device,
                           prompt=args.prompt)
    except (GeneratorError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = f" for {made['prompt']!r}" if made["prompt"] else ""
    print(f"{made['out']}: {made['samples']} samples{what} of {made['model']} ({made['solver']}, "
          f"{made['steps']} steps, "
          f"NFE {made['nfe']} per sample, guidance {made['guidance']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a params file: OK, or every error with its key path")
    p.add_argument("file", nargs="?", default="params.yaml")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("params", help="print params.yaml as the schema's defaults make it, every key with its comment")
    p.add_argument("--write", action="store_true",
                   help="replace the repo's params.yaml with it (after changing a default in runtime/params.py; "
                        "edits made to params.yaml itself are lost)")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("run", help="run the pipeline through Prefect (DVC skips what is up to date)")
    p.add_argument("targets", nargs="*", help="stages to bring up to date with their ancestors (default all)")
    p.add_argument("--stage-timeout", type=float, default=6 * 3600.0, help="seconds before a stage is killed")
    p.add_argument("--pipeline", choices=["class", "text"], default="class",
                   help="class: dvc.yaml, the class-conditional chain (default); text: text/dvc.yaml, InstaFlow's "
                        "text-to-image chain")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ui", help="start the Prefect and MLflow servers and print their URLs")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("results", help="the evaluation table (FID against NFE for every model)")
    p.add_argument("--measure", default="fid", choices=["fid", "kid", "precision", "recall", "class_accuracy"])
    p.add_argument("--runs", nargs="+", metavar="RUN",
                   help="training replicates to aggregate (git revisions or `dvc exp` names that differ only in "
                        "training seeds): each number's 95%% interval over the runs covers training variance too")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("sample", help="a grid of samples from any trained model")
    p.add_argument("--model", required=True, help="a stage (dit, rf1, rf@2, seqrf, distill, meanflow, shortcut; "
                                                  "text_teacher, text_rf1, text_distill) or a model folder")
    p.add_argument("--steps", type=int, required=True, help="sampler steps (NFE, doubled with guidance)")
    p.add_argument("--solver", choices=["euler", "heun", "ddim"], default=None,
                   help="default: ddim for the DiT teacher, euler for velocity models")
    p.add_argument("--class", dest="label", type=int, default=None, help="one class for all (default: i mod K)")
    p.add_argument("--prompt", default=None,
                   help='a text model: one prompt for all, e.g. "a red seven" (default: its prompts, i mod K)')
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the teacher's for the DiT, none for the rest)")
    p.add_argument("--seed", type=int, default=0, help="base of the per-sample seeds")
    p.add_argument("--vae", default=None, help="VAE folder (default artifacts/vae/vae)")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    from flows import deploy, dvc_yaml, lineage, remote, serve

    for module in (lineage, deploy, remote, dvc_yaml, serve):  # each module owns its commands' arguments
        module.add_commands(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
