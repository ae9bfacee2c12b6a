"""`reflow dvc-yaml`: `dvc.yaml` rendered from the stage modules, so each stage is declared once.

A stage's params sections, data deps, outputs and metrics are its `SPEC` in `stages/<name>.py` (for a
foreach stage, its `spec` factory called with DVC's `${key}` and `${item}`). Its code deps are not listed
by hand: they are every project module the stage module imports, followed transitively through `import`
and `from ... import` (inside functions and under `if TYPE_CHECKING:` too), packages' `__init__.py`
included. An edit to any file a stage runs therefore reruns it, and no other stage.

The text pipeline's `text/dvc.yaml` is rendered the same way from `TEXT_STAGES`: its own two stages and the class
stages run with `text` first (runtime/text_chain.py), from the repo root (`wdir`) with the root's params.yaml as
DVC's `vars`. Adding a stage is one line in `STAGES` (or `TEXT_STAGES`) below, after its module in `stages/`,
then `reflow dvc-yaml`.
`reflow dvc-yaml --check` and tests/test_dvc_yaml.py fail while the committed file differs from the
rendering. Specs come from the imported stage modules and code from the files under the given root, so
run it in the checkout `reflow` is installed from (or as `python -m flows.cli dvc-yaml` in that checkout).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.chains import CHAINS
from runtime.text_chain import DVC_FILE, TEXT, text_spec

# The project's own packages: imports of anything else (torch, diffusers, ...) are not code deps.
PACKAGES = ("imagedata", "measure", "models", "reflow", "runtime", "stages", "storage", "tasks", "flows", "training")


@dataclass(frozen=True)
class Stage:
    """One entry of `dvc.yaml`: the stage module `stages.<module>`, and for a foreach stage what it loops over."""

    module: str
    foreach: str | None = None  # `${params_key}`: one stage per entry, its spec built from `${key}`, `${item}`
    args: tuple[str, ...] = ()  # the command's arguments after `python -m stages.<module>`, and its `spec`'s


def chain_stages(module: str) -> tuple[Stage, ...]:
    """A chain stage of each chain (runtime/chains.py): `module` for the teacher's, `module classic` beside it."""
    return tuple(Stage(module, args=(chain,) if chain else ()) for chain in CHAINS)


# dvc.yaml's stages, in its order.
STAGES = (
    Stage("validate"),
    Stage("prepare"),
    Stage("vae"),
    Stage("extract"),
    Stage("dit"),
    Stage("teacher_pairs"),
    *chain_stages("rf1"),
    Stage("reflow_pairs", foreach="${reflow_rounds}", args=("${key}", "${item}")),
    Stage("rf", foreach="${reflow_rounds}", args=("${key}", "${item}")),
    Stage("seqrf_pairs"),
    Stage("seqrf"),
    Stage("meanflow"),
    Stage("shortcut"),
    Stage("fid_features"),
    Stage("fid_reference"),
    *chain_stages("distill_pairs"),
    *chain_stages("distill"),
    Stage("evaluate", foreach="${evaluate_models}", args=("${key}", "${item}")),
    Stage("report"),
)

# text/dvc.yaml's stages: the text pipeline (runtime/text_chain.py), the class stages run with `text` first.
TEXT_STAGES = (
    Stage("text_prepare"),
    Stage("vae", args=(TEXT,)),
    Stage("extract", args=(TEXT,)),
    Stage("text_teacher"),
    Stage("teacher_pairs", args=(TEXT,)),
    Stage("rf1", args=(TEXT,)),
    Stage("fid_features", args=(TEXT,)),
    Stage("fid_reference", args=(TEXT,)),
    Stage("distill_pairs", args=(TEXT,)),
    Stage("distill", args=(TEXT,)),
    Stage("evaluate", foreach="${text_evaluate_models}", args=(TEXT, "${key}", "${item}")),
    Stage("text_report"),
)


@dataclass(frozen=True)
class Pipeline:
    """One DVC file of the project and the stages it holds."""

    file: str  # relative to the repo root
    stages: tuple[Stage, ...]
    header: str


HEADER = """\
# Generated from the stage modules by `reflow dvc-yaml` (flows/dvc_yaml.py): edit those and rerun it, not this file.
# Each stage is `python -m stages.<name>`; its params sections, inputs, outputs and metrics are the SPEC in
# stages/<name>.py, and its code deps every project module that module imports, followed transitively, so
# an edit to any of them reruns it. `reflow dvc-yaml --check` says whether this file is current.
# Outputs are whole directories under artifacts/, written atomically; metrics are small JSON files.
"""


TEXT_HEADER = HEADER + """\
# The text pipeline (runtime/text_chain.py): `dvc repro text/dvc.yaml`, or `reflow run --pipeline text`. Its
# stages run in the repo root (wdir) and read the text_* sections of the root's params.yaml (vars).
"""

PIPELINES = {"class": Pipeline("dvc.yaml", STAGES, HEADER), TEXT: Pipeline(DVC_FILE, TEXT_STAGES, TEXT_HEADER)}


def _module_file(root: Path, module: str) -> Path | None:
    """The file of project module `module` under `root` (`a/b.py`, or `a/b/__init__.py`); None for others."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    return next((p for p in (base.with_name(base.name + ".py"), base / "__init__.py") if p.is_file()), None)


def _with_parents(module: str) -> set[str]:
    """`a.b.c` and the packages Python imports before it: `a`, `a.b`."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _from_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a `from ... import` reads from, relative levels resolved against `package`."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - node.level + 1]  # `.` is the package itself, each further dot one level up
    return ".".join([*parts, node.module] if node.module else parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module the file `path` (module `module`) may import, anywhere in it, with their parent packages.

    `from pkg import name` yields both `pkg` and `pkg.name`: the name may be a submodule, and
    `_module_file` tells which ones are.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return set().union(*(_with_parents(name) for name in names if name))


def code_closure(module: str, root: Path) -> list[str]:
    """Repo-relative paths of `module` and every project module it imports, transitively; sorted."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = list(_with_parents(module))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(root, name)
        if path is not None:
            files.add(path)
            todo.extend(imported_modules(path, name))
    return sorted(p.relative_to(root).as_posix() for p in files)


def stage_spec(stage: Stage):
    """The `StageSpec` of a `dvc.yaml` entry: its module's `SPEC`, or its `spec(*args)`; `text` first makes it the
    text pipeline's copy."""
    loaded = importlib.import_module(f"stages.{stage.module}")
    text = stage.args[:1] == (TEXT,)
    args = stage.args[1:] if text else stage.args
    spec = loaded.spec(*args) if args else loaded.SPEC
    return text_spec(spec) if text else spec


def _stage_entry(stage: Stage, root: Path, pipeline: Pipeline) -> tuple[str, str | None, dict[str, Any]]:
    """(name, note, body) of one stage in its dvc.yaml."""
    module = f"stages.{stage.module}"
    spec = stage_spec(stage)
    body: dict[str, Any] = {"cmd": " ".join(["python", "-m", module, *stage.args])}
    if pipeline.file != "dvc.yaml":  # commands and paths are the repo root's
        body["wdir"] = _up(pipeline.file)
    body["deps"] = [*spec.deps.values(), *code_closure(module, root)]
    if spec.params:
        body["params"] = list(spec.params)
    body["outs"] = list(spec.outs.values())
    if spec.metrics:
        body["metrics"] = [{spec.metrics: {"cache": False}}]
    if stage.foreach:
        return spec.name.partition("@")[0], spec.note, {"foreach": stage.foreach, "do": body}
    return spec.name, spec.note, body


def _up(file: str) -> str:
    """The repo root seen from the folder of `file` (`text/dvc.yaml` -> `..`)."""
    depth = len(Path(file).parent.parts)
    return "/".join([".."] * depth) or "."


def document(root: Path, pipeline: Pipeline = PIPELINES["class"]) -> dict[str, Any]:
    """A dvc.yaml as data: what `render` writes, without its comments."""
    doc: dict[str, Any] = {}
    if pipeline.file != "dvc.yaml":
        doc["vars"] = [f"{_up(pipeline.file)}/params.yaml"]
    doc["stages"] = {name: body for name, _, body in (_stage_entry(s, root, pipeline) for s in pipeline.stages)}
    return doc


def _scalar(value: str | bool) -> str:
    """`value` as YAML writes it: plain where it reads back the same, quoted otherwise."""
    import yaml

    return yaml.safe_dump(value, width=1 << 16).removesuffix("\n...\n").rstrip("\n")


def _block(value: dict | list, indent: int) -> list[str]:
    """Lines of `value` in YAML block style (never flow lists: DVC cannot parse `${...}` inside them)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list):
                lines += [f"{pad}{_scalar(key)}:", *_block(item, indent + 2)]
            else:
                lines.append(f"{pad}{_scalar(key)}: {_scalar(item)}")
        return lines
    for item in value:  # `- ` replaces the first two columns of the item's own first line
        first, *rest = _block(item, indent + 2) if isinstance(item, dict | list) else [f"{pad}  {_scalar(item)}"]
        lines += [f"{pad}- {first[indent + 2:]}", *rest]
    return lines


def render(root: Path, pipeline: Pipeline = PIPELINES["class"]) -> str:
    """A whole dvc.yaml of the project at `root`: header, then each stage with its note as a comment."""
    lines = [*pipeline.header.splitlines()]
    if pipeline.file != "dvc.yaml":
        lines += ["vars:", f"  - {_up(pipeline.file)}/params.yaml"]
    lines.append("stages:")
    for stage in pipeline.stages:
        name, note, body = _stage_entry(stage, root, pipeline)
        lines += [f"  {name}:" + (f"  # {note}" if note else ""), *_block(body, 4), ""]
    return "\n".join(lines)


def stale_diff(root: Path) -> str:
    """A unified diff from each committed dvc.yaml to its rendering; empty when every file is current."""
    import difflib

    diff = []
    for pipeline in PIPELINES.values():
        path = root / pipeline.file
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        diff += difflib.unified_diff(current.splitlines(keepends=True),
                                     render(root, pipeline).splitlines(keepends=True),
                                     f"{pipeline.file} (committed)", f"{pipeline.file} (rendered)")
    return "".join(diff)


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    from storage.atomic import atomic_write_text
    from storage.repo import find_repo_root

    root = find_repo_root()
    if args.check:
        diff = stale_diff(root)
        files = " and ".join(str(root / p.file) for p in PIPELINES.values())
        if diff:
            print(diff, end="")
            print(f"{files}: not the rendering of the stage modules: run `reflow dvc-yaml`", file=sys.stderr)
            return 1
        print(f"{files}: current")
        return 0
    for pipeline in PIPELINES.values():
        (root / pipeline.file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / pipeline.file, render(root, pipeline))
        print(f"{root / pipeline.file}: written from the stage modules")
    return 0


def add_commands(subparsers) -> None:
    """Register `dvc-yaml` on the `reflow` command's subparsers."""
    p = subparsers.add_parser(
        "dvc-yaml", help="write dvc.yaml from the stage modules (specs, and code deps from their imports)",
        description="Render dvc.yaml from stages/<name>.py: each stage's SPEC, and as code deps every project "
                    "module its module imports, transitively. With --check, write nothing: print the diff and "
                    "exit 1 when the committed file differs.")
    p.add_argument("--check", action="store_true", help="exit 1 with a diff when dvc.yaml is not current")
    p.set_defaults(func=cmd_dvc_yaml)
