"""`validate`: the first stage, so that a bad `params.yaml` stops `dvc repro` before anything is deleted.

DVC removes a stage's outputs before it runs the stage's command, so a stage cannot protect its own
outputs from a params mistake. This stage depends on the whole `params.yaml`, runs before every other
stage (the root stage depends on its output), and fails with every problem listed. Its output is a
constant marker: a valid edit reruns it in a second without invalidating anything downstream.
"""

from __future__ import annotations

import sys

from runtime.params import ParamsError, load_params
from runtime.spec import StageSpec
from storage.atomic import atomic_dir, atomic_write_json
from storage.repo import find_repo_root

SPEC = StageSpec(name="validate", params=(), deps={"params": "params.yaml"}, outs={"ok": "artifacts/validate"},
                 note="first, so a bad params.yaml stops the run before DVC deletes any output")


def main() -> int:
    root = find_repo_root()
    try:
        load_params(root / "params.yaml")
    except ParamsError as exc:
        print(f"error: params.yaml is invalid; no stage ran and no output was touched.\n{exc}", file=sys.stderr)
        return 2
    with atomic_dir(root / SPEC.outs["ok"]) as tmp:
        atomic_write_json(tmp / "ok.json", {"params": "valid"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
