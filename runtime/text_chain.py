"""The text-to-image pipeline (`text/dvc.yaml`): InstaFlow's chain from the class pipeline's own stages.

Stable Diffusion teacher -> DDIM pairs from stored noise -> a rectified flow on them (InstaFlow's 2-RF: it counts
the teacher's ODE as the first flow) -> a one-step student, measured like every model of the class pipeline.
Nothing of that chain is specific to class labels once a prompt is addressed by its index in a prompt table
(models/prompted.py), so the text pipeline runs the class stages themselves, `python -m stages.<name> text`:

- each stage is named `text_<name>` and keeps its artifacts under `text/artifacts/` and its metrics under
  `text/metrics/`, so both pipelines live in one workspace without touching each other's outputs;
- each reads its params from the `text_<section>` copy of its section (`StageSpec.aliases`), so the text chain is
  sized on its own: changing `rf1.steps` reruns nothing here.

Only what is about text is its own: `text_prepare` (captioned images and the prompts file) and `text_teacher` (a
UNet and CLIP text encoder trained here, or a Stable Diffusion folder by path).
"""

from __future__ import annotations

import re
from dataclasses import replace

from runtime.spec import StageSpec

TEXT = "text"
# Not under artifacts/: the class report depends on that whole folder, and would follow every text stage.
ARTIFACTS = "text/artifacts"
DVC_FILE = "text/dvc.yaml"
# The class pipeline's sections each text stage reads under the class name. compute and tracking are shared.
SECTIONS = ("vae", "extract", "teacher_pairs", "rf1", "distill", "fid_features", "eval")
# The class stage outputs whose text counterparts are named for what they are in the text chain.
RENAMED = {"dit": "teacher"}
_SECTION_REF = re.compile(r"\$\{(" + "|".join(SECTIONS) + r")\.")


def section(name: str) -> str:
    """The text pipeline's copy of a params section: `vae` -> `text_vae`."""
    return f"text_{name}" if name in SECTIONS else name


def artifact(path: str) -> str:
    """Where the text pipeline keeps the artifact the class pipeline keeps at `path`."""
    rel = path.removeprefix("artifacts/")
    head, sep, rest = rel.partition("/")
    head = RENAMED.get(head, head)
    return f"{ARTIFACTS}/{head}{sep}{rest}"


def stage_name(name: str) -> str:
    return f"{TEXT}_{RENAMED.get(name, name)}"


def text_spec(spec: StageSpec) -> StageSpec:
    """The text pipeline's copy of a class-pipeline stage (see the module's docstring)."""

    def path(p: str) -> str:
        p = _SECTION_REF.sub(lambda m: "${" + section(m.group(1)) + ".", p)
        return artifact(p) if p.startswith("artifacts/") else p

    return replace(
        spec,
        name=stage_name(spec.name),
        params=tuple(section(s) for s in spec.params),
        deps={role: path(p) for role, p in spec.deps.items()},
        outs={role: path(p) for role, p in spec.outs.items()},
        metrics=spec.metrics.replace("metrics/", "text/metrics/", 1) if spec.metrics else None,
        note=None,
        aliases={s: section(s) for s in spec.params if s in SECTIONS},
    )


def is_text(stage: str) -> bool:
    return stage.startswith(f"{TEXT}_")


def address(stage: str) -> str:
    """The stage as `dvc repro` addresses it from the repo root: `text/dvc.yaml:<name>` for the text pipeline's."""
    return f"{DVC_FILE}:{stage}" if is_text(stage) else stage


def stage_of(address: str) -> str:
    """The stage name of a DVC address (`text/dvc.yaml:text_rf1` -> `text_rf1`)."""
    return address.rpartition(":")[2]
