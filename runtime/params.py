"""The schema of `params.yaml`: one strict pydantic model per section, and the one definition of every default.

Every stage validates the whole file before it touches an output, so a typo in any section stops the
pipeline at its first stage with the key path, the bad value and what was expected. Unknown keys are
errors (`extra="forbid"`): a misspelt knob silently falling back to its default is the worst outcome.

A field's default is the embedded CPU demo's value and its `description` the comment `params.yaml` shows
next to it: the committed `params.yaml` is rendered from this module (`reflow params --write`, see
runtime/params_file.py), so a key left out of a params file or preset takes exactly the documented value.

The sections are defined in runtime/params_common.py (the base model and the sections every stage shares) and
runtime/params_stages.py (one per stage); this module joins them into `Params`, checks what spans sections, and
loads, validates and renders the file. Every name is importable from here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from reflow.segments import uneven_steps
from runtime.chains import CHAINS, CLASSIC, chain_of, first_flow, parse_round, round_model, suffix

# Re-exported: stages, tools and tests import the sections and the file helpers from here. The sections are
# defined by idea in runtime/params_common.py (shared) and runtime/params_stages.py (one per stage family).
from runtime.params_common import NFE as NFE
from runtime.params_common import ComputeParams as ComputeParams
from runtime.params_common import DataParams as DataParams
from runtime.params_common import Decay as Decay
from runtime.params_common import SchedulerParams as SchedulerParams
from runtime.params_common import Strict as Strict
from runtime.params_common import TrackingParams as TrackingParams
from runtime.params_common import TrainParams as TrainParams
from runtime.params_file import ParamsError as ParamsError
from runtime.params_file import ParamsView as ParamsView
from runtime.params_file import read_params_mapping as read_params_mapping
from runtime.params_file import render_yaml, require_sections, validate_mapping
from runtime.params_interval import MeanFlowParams as MeanFlowParams
from runtime.params_interval import ShortcutParams as ShortcutParams
from runtime.params_stages import DistillParams as DistillParams
from runtime.params_stages import DiTParams as DiTParams
from runtime.params_stages import EvalParams as EvalParams
from runtime.params_stages import ExtractParams as ExtractParams
from runtime.params_stages import FIDFeaturesParams as FIDFeaturesParams
from runtime.params_stages import ReflowParams as ReflowParams
from runtime.params_stages import RF1Params as RF1Params
from runtime.params_stages import SeqRFParams as SeqRFParams
from runtime.params_stages import TeacherPairsParams as TeacherPairsParams
from runtime.params_stages import VAEParams as VAEParams
from runtime.params_stages import VelocityTrainParams as VelocityTrainParams
from runtime.params_text import (
    TEXT_MODELS,
    TextDataParams,
    TextDistillParams,
    TextEvalParams,
    TextFIDFeaturesParams,
    TextRF1Params,
    TextTeacherPairsParams,
    TextTeacherParams,
)


class Params(Strict):
    """The whole of `params.yaml`; a section's `description` is the comment on its first line."""

    data: DataParams = DataParams()
    compute: ComputeParams = ComputeParams()
    tracking: TrackingParams = TrackingParams()
    scheduler: SchedulerParams = SchedulerParams()
    vae: VAEParams = VAEParams()
    extract: ExtractParams = ExtractParams()
    dit: DiTParams = DiTParams()
    teacher_pairs: TeacherPairsParams = TeacherPairsParams()
    rf1: RF1Params = RF1Params()
    reflow: ReflowParams = Field(ReflowParams(), description="every k-RF round (see reflow_rounds)")
    # DVC's foreach expands each round into reflow_pairs@k and rf@k. Its own section so that adding a round
    # reruns nothing that exists.
    reflow_rounds: dict[str, str] = Field(
        default_factory=lambda: {"2": "rf1", "2_classic": "rf1_classic"}, min_length=1,
        description='round k -> the model it starts from, per chain (runtime/chains.py); add "3": rf@2 for 3-RF')
    seqrf: SeqRFParams = Field(SeqRFParams(), description="sequential rectified flow on top of the 1-RF teacher flow")
    distill: DistillParams = Field(DistillParams(), description="one step: z0 -> z0 + v(z0, 0)")
    meanflow: MeanFlowParams = Field(MeanFlowParams(), description=(
        "MeanFlow's average velocity over [t, t + h], any step count from one network; on pairs, Re-MeanFlow"))
    shortcut: ShortcutParams = Field(ShortcutParams(), description=(
        "a shortcut model: the step size d as an input, flow matching plus self-consistency"))
    fid_features: FIDFeaturesParams = Field(FIDFeaturesParams(), description=(
        "FID feature extractor and class-consistency judge, fitted on the features split"))
    eval: EvalParams = Field(
        EvalParams(), description="how every evaluate@<model> measures: same noise, same reference, same extractor")
    # DVC's foreach expands one evaluate stage per entry.
    evaluate_models: dict[str, str] = Field(
        default_factory=lambda: {"dit": "dit", "rf1": "rf1", "rf2": "rf@2", "seqrf": "seqrf", "distill": "distill",
                                 "rf1_classic": "rf1_classic", "rf2_classic": "rf@2_classic",
                                 "distill_classic": "distill_classic", "meanflow": "meanflow",
                                 "shortcut": "shortcut"},
        min_length=1, description="evaluate@<key> -> the model it measures (add rf3: rf@3 with a third round)")
    # The text pipeline (text/dvc.yaml, runtime/text_chain.py): its own sections, then its copies of the class
    # pipeline's. Required like the rest: DVC reads text/dvc.yaml's vars from this file for any repro.
    text_data: TextDataParams = Field(TextDataParams(), description=(
        "the text pipeline (text/dvc.yaml): captioned images and the prompts file"))
    text_teacher: TextTeacherParams = TextTeacherParams()
    text_vae: VAEParams = Field(VAEParams(), description="as vae, for the captioned images")
    text_extract: ExtractParams = ExtractParams()
    text_teacher_pairs: TextTeacherPairsParams = Field(TextTeacherPairsParams(), description=(
        "as teacher_pairs: guided DDIM from stored noise, a prompt per row (label = its line in the prompts file)"))
    text_rf1: TextRF1Params = Field(TextRF1Params(), description=(
        "as rf1: InstaFlow's 2-RF (it counts the teacher's ODE as the first flow), from the teacher's UNet"))
    text_distill: TextDistillParams = Field(TextDistillParams(), description="as distill: InstaFlow's one step")
    text_fid_features: TextFIDFeaturesParams = Field(TextFIDFeaturesParams(), description=(
        "as fid_features: one class per prompt, so the judge checks class and colour at once"))
    text_eval: TextEvalParams = Field(TextEvalParams(), description=(
        "as eval; 25 is the teacher's DDIM steps (text_teacher_pairs.ddim_steps)"))
    text_evaluate_models: dict[str, str] = Field(
        default_factory=lambda: {m: m for m in TEXT_MODELS}, min_length=1,
        description="text_evaluate@<key> -> the text model it measures")

    @model_validator(mode="after")
    def _starts_follow_the_coupling(self) -> Params:
        """A paired 1-RF's data end is the teacher's distribution, not the data's: points made by noising or
        inverting real latents are off the flow the sampler follows (docs/method.md, section 6)."""
        if self.rf1.coupling != "paired":
            return self
        if self.seqrf.start == "noised_data":
            raise ValueError("seqrf.start: noised_data starts segments from real latents noised with fresh noise, "
                             "which a 1-RF trained on the teacher's pairs (rf1.coupling: paired) never visits: set "
                             "seqrf.start: teacher_trajectory, or rf1.coupling: independent")
        if self.reflow.direction == "from_z1":
            raise ValueError("reflow.direction: from_z1 inverts real latents through a flow whose data end is the "
                             "teacher's samples (rf1.coupling: paired), not the data: set reflow.direction: from_z0, "
                             "or rf1.coupling: independent")
        return self

    @model_validator(mode="after")
    def _text_models_exist(self) -> Params:
        if self.text_distill.source != "rf1":
            raise ValueError(f"text_distill.source={self.text_distill.source!r}: the text chain distills its rf1 "
                             "(InstaFlow's 2-RF); expected rf1")
        for key, stage in self.text_evaluate_models.items():
            if stage not in TEXT_MODELS or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise ValueError(f"text_evaluate_models.{key}={stage!r}: expected a lower-case key and one of "
                                 f"{list(TEXT_MODELS)}")
        self.text_teacher_pairs.solver_for("ddpm_eps")
        return self

    @model_validator(mode="after")
    def _teacher_pairs_solver_fits_the_teacher(self) -> Params:
        """DDIM needs an epsilon teacher and Euler/Heun a velocity one: refused here, before the teacher trains."""
        self.teacher_pairs.solver_for(self.dit.objective)
        return self

    @model_validator(mode="after")
    def _mirrors_need_mirror_symmetric_data(self) -> Params:
        if self.reflow.flip_prob > 0 and not self.dit.mirrored:
            raise ValueError(f"reflow.flip_prob={self.reflow.flip_prob} mirrors pairs, but the data is not declared "
                             "mirror-symmetric (dit.mirrored: false; a mirrored digit is not a digit): set "
                             "reflow.flip_prob: 0, or dit.mirrored: true for data whose mirror images are data")
        return self

    @model_validator(mode="after")
    def _rounds_chain_from_1rf(self) -> Params:
        rounds: dict[str, list[int]] = {chain: [] for chain in CHAINS}
        for key in self.reflow_rounds:
            k, chain = parse_round(key)
            rounds[chain].append(k)
        expected = {f"{k}{suffix(chain)}": round_model(k - 1, chain)
                    for chain, ks in rounds.items() for k in range(2, 2 + len(ks))}
        if self.reflow_rounds != expected:
            raise ValueError(
                "reflow_rounds must be consecutive from 2 in each chain, each round starting from the previous "
                f"round's model (a reference to any other stage breaks the chain): expected {expected}, got "
                f"{self.reflow_rounds}")
        models = ["rf1", *(f"rf@{k}" for k in self.reflow_rounds if not chain_of(k)), "seqrf"]
        classic = [first_flow(CLASSIC), *(f"rf@{k}" for k in self.reflow_rounds if chain_of(k))]
        evaluated = ["dit", *models, "distill", *classic, f"distill{suffix(CLASSIC)}", "meanflow", "shortcut"]
        pair_sets = ["teacher_pairs", *(f"reflow_pairs@{k}" for k in self.reflow_rounds)]
        for section in ("meanflow", "shortcut"):
            p = getattr(self, section)
            if p.pairs not in pair_sets:
                raise ValueError(f"{section}.pairs={p.pairs!r} is not a pair set of this pipeline; expected one of "
                                 f"{pair_sets}")
            if p.init_from not in ["dit", *models, *classic]:
                raise ValueError(f"{section}.init_from={p.init_from!r} is not a model of this pipeline; expected one "
                                 f"of {['dit', *models, *classic]}")
        if self.distill.classic_source not in classic:
            raise ValueError(f"distill.classic_source={self.distill.classic_source!r} is not a model of the classic "
                             f"chain; expected one of {classic}")
        for key, stage in self.evaluate_models.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise ValueError(f"evaluate_models key {key!r} names the stage evaluate@{key}: use lower-case "
                                 "letters, digits and '_' (e.g. rf2 for rf@2)")
            if stage not in evaluated:
                raise ValueError(f"evaluate_models.{key}={stage!r} is not a model of this pipeline; expected one "
                                 f"of {evaluated}")
        if self.distill.source not in models:
            raise ValueError(f"distill.source={self.distill.source!r} is not a model of this pipeline; expected "
                             f"one of {models}")
        uneven = uneven_steps(self.distill.eval_steps, self.seqrf.segments)
        if self.distill.per_segment and uneven:
            raise ValueError(f"distill.eval_steps {uneven} are not multiples of seqrf.segments={self.seqrf.segments}:"
                             " a per-segment student takes a whole number of steps per segment")
        return self


SECTIONS: tuple[str, ...] = tuple(Params.model_fields)
OPTIONAL_SECTIONS = frozenset({"tracking", "scheduler"})  # no stage reads them through DVC
# Keys dvc.yaml interpolates into paths (`artifacts/${distill.source}`): DVC reads them from the file itself, so
# they must be written out even at their defaults (tests/test_dvc_yaml.py checks this list against dvc.yaml).
INTERPOLATED_KEYS = ("data.path", "distill.source", "distill.classic_source", "meanflow.pairs", "meanflow.init_from",
                     "shortcut.pairs", "shortcut.init_from", "text_data.prompts", "text_distill.source")


def parse_params(raw: Any, path: Path = Path("params.yaml")) -> Params:
    """A params file's raw mapping validated; a key left out of a section takes its documented default."""
    return validate_mapping(Params, raw, path)


def load_params(path: str | Path) -> Params:
    """The params file at `path`, validated; every section but `tracking` must be in it (DVC reads them there)."""
    path = Path(path)
    raw = read_params_mapping(path)
    params = parse_params(raw, path)
    require_sections(raw, [s for s in SECTIONS if s not in OPTIONAL_SECTIONS], path)
    missing = [key for key in INTERPOLATED_KEYS if key.split(".")[1] not in (raw[key.split(".")[0]] or {})]
    if missing:
        raise ParamsError(path, [f"{key}: missing; dvc.yaml builds a dependency path from it, which DVC reads from "
                                 f"this file: write it out (its default is {_default(key)!r})" for key in missing])
    return params


def _default(key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(Params(), section), name)


def render_params() -> str:
    """The text of the project's `params.yaml`: every section and key at its default, with its description."""
    return render_yaml(Params())
