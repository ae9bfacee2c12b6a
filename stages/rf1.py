"""`rf1`: the first rectified flow, a velocity model from noise to the data the teacher makes.

`coupling: paired` (default) trains on the teacher's stored pairs (z0, z1): the flow learns the
teacher's own noise-to-sample map, which is what makes the following reflow rounds meaningful.
`coupling: independent` is classic 1-RF: real latents with fresh noise every step. `python -m stages.rf1 classic`
is the classic chain's 1-RF, `rf1_classic`: the same recipe, always on the independent coupling
(runtime/chains.py). Either way the model is measured on held-out teacher pairs (runtime/velocity.py).
"""

from __future__ import annotations

import sys

from models.dit import DIT_SUBFOLDER
from reflow.rectified import RectifiedFlow, coupling
from runtime.chains import CLASSIC, chain_of, first_flow
from runtime.context import StageContext
from runtime.main import chain_stage_main
from runtime.spec import StageSpec
from runtime.velocity import held_out_pairs, teacher_meta, training_rows, velocity_stage
from storage.datasets import open_dataset
from training.loader import batch_source


def spec(chain: str = "") -> StageSpec:
    """The 1-RF of a chain (runtime/chains.py): `rf1` on `rf1.coupling`, or `rf1_classic` on independent noise."""
    name = first_flow(chain)
    return StageSpec(
        name=name,
        params=("compute", "rf1"),
        deps={"teacher_pairs": "artifacts/teacher_pairs", "latents": "artifacts/extract", "dit": "artifacts/dit",
              "vae": "artifacts/vae"},
        outs={"model": f"artifacts/{name}"},
        metrics=f"metrics/{name}.json",
        note="the classic chain's 1-RF: rf1's recipe on the independent coupling" if chain else None,
    )


SPEC = spec()


def run(ctx: StageContext) -> dict:
    p, compute = ctx.params.rf1, ctx.params.compute
    chain = chain_of(ctx.spec.name)
    coupling_name = "independent" if chain == CLASSIC else p.coupling
    meta = teacher_meta(ctx)
    if coupling_name == "paired":  # every teacher pair but the held-out ones
        n_train, _ = held_out_pairs(ctx.dep("teacher_pairs") / "pairs.zarr", meta, p.eval_samples)
        data = training_rows(ctx.dep("teacher_pairs") / "pairs.zarr", meta, compute, rows=n_train)
    else:
        latents = open_dataset(ctx.dep("latents") / "latents.zarr", kind="latents")
        data = batch_source(latents, {"z1": "z1", "label": "labels"}, compute.seed,
                            ram_budget_gb=compute.ram_budget_gb)
    objective = RectifiedFlow(coupling=coupling(coupling_name), null_label=meta["null_label"],
                              label_dropout=p.label_dropout, time_distribution=p.time_distribution,
                              time_eps=p.time_eps, loss=p.loss)
    metrics, copied = velocity_stage(ctx, p, meta, data=data, objective=objective, kind="rf1",
                                     init_from=ctx.dep("dit") / DIT_SUBFOLDER if p.init_from_teacher else None,
                                     model_meta={"coupling": coupling_name, "round": 1, "chain": chain or "teacher"})
    return {**metrics, "tensors_from_teacher": float(copied), "training_rows": float(data.n)}


def main(argv: list[str] | None = None) -> int:
    return chain_stage_main("rf1", spec, run, "the classic chain's 1-RF, rf1_classic", argv)


if __name__ == "__main__":
    sys.exit(main())
