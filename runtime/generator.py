"""Any trained model of the pipeline as a sampler: noise `z0` and labels in, latents out, NFE counted.

The DiT teacher is sampled guided as it was when it made the teacher's pairs: by deterministic DDIM when it
predicts epsilon (`dit.objective: ddpm_eps`), like a velocity model when it was trained by flow matching;
velocity models (`rf1`, `rf@k`, `seqrf`, `distill`) by Euler or Heun from `t = 0` to `t = 1`, on their
own segment boundaries when they have them (SeqRF, a per-segment student), or by adaptive RK45 (steps 0:
it picks its own, and the NFE it spends is counted). `evaluate@<model>` and
`reflow sample` both go through here, so a number in the report and a picture on the command line
come from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.dit import TIME_AXIS, dit_epsilon, load_dit
from reflow.rectified import velocity_field
from reflow.samplers import DDIM, IntervalEuler, SampleResult, guided, straightness
from reflow.samplers import SOLVERS as VELOCITY_SOLVERS
from reflow.samplers import solver as solver_named
from reflow.segments import steps_problem
from reflow.seqrf import Segmented
from storage.checkpoints import read_meta

SOLVERS = (*VELOCITY_SOLVERS, "ddim")
TEACHER_KINDS = ("dit", "text_teacher")  # the class pipeline's DiT, the text pipeline's UNet (models/prompted.py)


class GeneratorError(ValueError):
    """A model folder that cannot be sampled, or a (solver, steps) it cannot take; the message says why."""


@dataclass
class Generator:
    model: torch.nn.Module
    kind: str  # "epsilon" (the DDPM teacher, sampled by DDIM) or "velocity" (a flow-matching teacher included)
    meta: dict
    path: Path
    default_guidance: float  # how the model is used: the teacher at its pairs' guidance, other velocity models unguided

    @property
    def boundaries(self) -> list[float] | None:
        return self.meta.get("boundaries")

    @property
    def solvers(self) -> tuple[str, ...]:
        return ("ddim",) if self.kind == "epsilon" else VELOCITY_SOLVERS

    @property
    def interval_model(self) -> str | None:
        """`meanflow` or `shortcut` for a model that takes its step's length (models/interval.py), else None."""
        return self.meta.get("interval_model")

    def unsupported(self, solver: str, steps: int) -> str | None:
        """Why `solver` with `steps` steps is not a way to sample this model, or None when it is."""
        if solver not in self.solvers:
            return f"a {self.kind} model samples with {' or '.join(self.solvers)}, not {solver!r}"
        if self.interval_model and solver != "euler":
            return f"a {self.interval_model} model samples with steps of its own (solver euler), not {solver!r}"
        allowed = self.meta.get("step_counts")
        if allowed and steps not in allowed:
            return f"a shortcut model samples at the step counts it was trained for, {allowed}, not {steps}"
        if self.boundaries and solver != "euler":
            return "a segmented model samples with Euler inside each segment"
        if solver == "rk45":
            return None
        return steps_problem(steps, len(self.boundaries) - 1 if self.boundaries else 1)

    @torch.inference_mode()
    def sample(self, z0: torch.Tensor, y: torch.Tensor, *, steps: int, solver: str,
               guidance: float | None = None, tolerance: float = 1e-3) -> SampleResult:
        """Latents from noise `z0` (t = 0) for labels `y`; `nfe` counts guided calls twice. RK45 ignores
        `steps` and integrates to relative and absolute `tolerance`."""
        reason = self.unsupported(solver, steps)
        if reason:
            raise GeneratorError(f"{self.path}: {reason}")
        scale = self.default_guidance if guidance is None else guidance
        null = self.meta["null_label"]
        if self.kind == "epsilon":
            field = guided(lambda x, t, c: dit_epsilon(self.model, x, t, c), y, null_label=null, scale=scale)
            return DDIM(**self.meta["ddpm"])(field, z0, steps)
        field = velocity_field(self.model, y, null_label=null, guidance=scale)
        if self.boundaries:
            return Segmented(tuple(self.boundaries))(field, z0, steps)
        if self.interval_model:
            return IntervalEuler()(field, z0, steps)
        return solver_named(solver, rtol=tolerance, atol=tolerance)(field, z0, steps)

    @torch.inference_mode()
    def straightness(self, z0: torch.Tensor, y: torch.Tensor, *, steps: int,
                     guidance: float | None = None) -> torch.Tensor | None:
        """Per-sample straightness along the model's own Euler path over [0, 1] (a flow-matching teacher's guided
        one included); None for the DDIM teacher (its path is a diffusion ODE in another time parameterisation; its
        straightness is not comparable)."""
        if self.kind == "epsilon":
            return None
        scale = self.default_guidance if guidance is None else guidance
        field = velocity_field(self.model, y, null_label=self.meta["null_label"], guidance=scale)
        return straightness(field, z0, steps=steps)

    def to(self, device: str) -> Generator:
        self.model.to(device)
        return self


def model_folder(path: str | Path) -> Path:
    """The DiT folder of a stage's artifact (`artifacts/<stage>/transformer`), or a model folder given as is."""
    path = Path(path)
    return path / "transformer" if (path / "transformer" / "config.json").is_file() else path


def require_time_axis(meta: dict, folder: Path) -> None:
    """A velocity model must have learned the time axis this code feeds it (`models.dit.TIME_AXIS`)."""
    recorded = meta.get("time_convention", "")
    if TIME_AXIS not in recorded:
        raise GeneratorError(f"{folder}: a velocity model trained with another time axis ({recorded!r}); this version "
                             f"feeds velocity models {TIME_AXIS!r}. Retrain it (`dvc repro` does), or sample it with "
                             "the version that trained it")


def teacher_objective(meta: dict) -> str:
    """What the DiT teacher of `meta` was trained with, as `dit.objective` names it: `flow_matching` when it is a
    velocity model, else `ddpm_eps` (teachers saved before the option, and the benchmarks' bare metas, are)."""
    return "flow_matching" if meta.get("objective") == "rectified_flow_velocity" else "ddpm_eps"


def teacher_generator(model: torch.nn.Module, meta: dict, folder: Path, guidance: float) -> Generator:
    """The DiT teacher as a sampler at its pairs' `guidance`: DDIM for epsilon, ODE solvers for flow matching."""
    if teacher_objective(meta) == "flow_matching":
        require_time_axis(meta, folder)
        return Generator(model, "velocity", meta, folder, guidance)
    return Generator(model, "epsilon", meta, folder, guidance)


def load_generator(path: str | Path, *, teacher_guidance: float | None = None) -> Generator:
    """The model in `path` (an artifact folder or its `transformer/`) with what its metadata says about it.

    `teacher_guidance` is the guidance the teacher used for its pairs (velocity models record it
    themselves); it is the teacher's default scale, whichever its objective.
    """
    folder = model_folder(path)
    meta = read_meta(folder)
    if meta.get("kind") in TEACHER_KINDS:
        if teacher_guidance is None:
            raise GeneratorError(f"{folder}: the DiT teacher needs its guidance scale (teacher_pairs' attrs)")
        return teacher_generator(load_dit(folder).eval(), meta, folder, teacher_guidance)
    if meta.get("objective") != "rectified_flow_velocity":
        raise GeneratorError(f"{folder}: not a model of this pipeline (meta kind {meta.get('kind')!r}, objective "
                             f"{meta.get('objective')!r}); expected the DiT teacher or a velocity model")
    require_time_axis(meta, folder)
    return Generator(load_dit(folder).eval(), "velocity", meta, folder, 1.0)


def stage_artifact(root: Path, stage: str) -> Path:
    """Where a stage keeps its output: `artifacts/<stage>`, or `text/artifacts/<name>` for the text pipeline's
    `text_<name>` (runtime/text_chain.py)."""
    from runtime.text_chain import ARTIFACTS, is_text

    return root / ARTIFACTS / stage.removeprefix("text_") if is_text(stage) else root / "artifacts" / stage


def with_prompt(gen: Generator, prompt: str) -> Generator:
    """A text model of the text pipeline sampled for one prompt of the user's: a prompt table of that one."""
    from dataclasses import replace

    from models.prompted import PromptError

    if getattr(gen.model, "family", "dit") != "text":
        raise GeneratorError(f"{gen.path}: --prompt is for the text pipeline's models (text_teacher, text_rf1, "
                             "text_distill); this one is class-conditional: use --class")
    try:
        model = gen.model.with_prompts([prompt])
    except PromptError as exc:
        raise GeneratorError(str(exc)) from None
    return replace(gen, model=model, meta={**gen.meta, "num_classes": 1, "null_label": model.null_label})


def open_model(root: Path, model: str, *, guidance: float | None = None) -> tuple[Generator, Path]:
    """A stage's model (`rf@2`, `dit`, `text_distill`) or a model folder, ready to sample, and the artifacts folder of
    the pipeline it belongs to (where its VAE is). The teacher is used at its pairs' guidance."""
    from runtime.text_chain import ARTIFACTS
    from storage.datasets import open_dataset

    path = Path(model) if Path(model).exists() else stage_artifact(root, model)
    if not path.exists():
        raise GeneratorError(f"{model!r} is neither a model folder nor a stage with outputs at {path}")
    text = path.resolve().is_relative_to((root / ARTIFACTS).resolve())
    artifacts = root / ARTIFACTS if text else root / "artifacts"
    pairs = artifacts / "teacher_pairs" / "pairs.zarr"
    teacher_guidance = (float(open_dataset(pairs, kind="pairs").attrs["guidance_scale"]) if pairs.exists()
                        else None)
    gen = load_generator(path, teacher_guidance=teacher_guidance if teacher_guidance is not None else guidance)
    return gen, artifacts


def sample_images(gen: Generator, decoder: torch.nn.Module, *, steps: int, solver: str | None = None,
                  label: int | None = None, n: int = 64, guidance: float | None = None, seed: int = 0,
                  device: str = "cpu", prompt: str | None = None) -> tuple[np.ndarray, dict]:
    """`n` images (N, C, H, W in [0, 1]) of `gen` decoded by `decoder`, and what was made. Labels are `label` for
    every sample, or i mod K; a text model takes `prompt` for every sample instead. Noise comes from per-sample
    seeds of base `seed`, the way `evaluate` draws it."""
    from models.vae import decode_latents
    from reflow.seeds import per_sample_noise, sample_seeds

    if prompt is not None:
        if label is not None:
            raise GeneratorError("--prompt and --class both set what to draw: give one")
        gen = with_prompt(gen, prompt)
    solver = solver or gen.solvers[0]
    num_classes = int(gen.meta["num_classes"])
    if label is not None and not 0 <= label < num_classes:
        raise GeneratorError(f"--class {label} is out of range: {gen.path} has classes 0..{num_classes - 1}")
    labels = np.full(n, label, dtype=np.int64) if label is not None else np.arange(n, dtype=np.int64) % num_classes
    z0 = per_sample_noise(sample_seeds(seed, 0, n), tuple(gen.meta["latent_shape"]))
    gen.to(device)
    res = gen.sample(z0.to(device), torch.from_numpy(labels).to(device), steps=steps, solver=solver, guidance=guidance)
    images = decode_latents(decoder, res.x.float(), gen.meta["scale_factor"]).numpy()
    return images, {"model": str(gen.path), "kind": gen.kind, "solver": solver, "steps": steps, "nfe": res.nfe,
                    "samples": n, "guidance": gen.default_guidance if guidance is None else guidance,
                    "prompt": prompt, "num_classes": num_classes}


def sample_grid(root: Path, model: str, *, steps: int, solver: str | None = None, label: int | None = None,
                n: int = 64, out: Path, guidance: float | None = None, seed: int = 0, vae: str | None = None,
                device: str = "cpu", prompt: str | None = None) -> dict:
    """`reflow sample`: `n` samples of a trained model (a stage name or a model folder) as one PNG grid; returns
    what was made."""
    from imagedata.grids import save_grid
    from models.vae import VAE_SUBFOLDER, load_vae

    gen, artifacts = open_model(root, model, guidance=guidance)
    vae_dir = Path(vae) if vae else artifacts / "vae" / VAE_SUBFOLDER
    images, made = sample_images(gen, load_vae(vae_dir).to(device).eval(), steps=steps, solver=solver, label=label,
                                 n=n, guidance=guidance, seed=seed, device=device, prompt=prompt)
    one = label is not None or prompt is not None
    save_grid(images, out, nrow=int(np.ceil(np.sqrt(n))) if one else min(made["num_classes"], 16))
    return {**made, "out": str(out)}
