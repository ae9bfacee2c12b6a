"""Strict params: the embedded defaults validate, every kind of mistake is named by its key path, and the schema is
the one source of the defaults (params.yaml is rendered from it, a key left out takes the value the file shows)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from ruamel.yaml import YAML

from flows.cli import main as reflow
from runtime.params import (
    INTERPOLATED_KEYS,
    SECTIONS,
    Params,
    ParamsError,
    ParamsView,
    load_params,
    parse_params,
    read_params_mapping,
    render_params,
)
from runtime.params_file import render_yaml, section_keys

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
# Every key of every section that is a model; reflow_rounds and evaluate_models are mappings, whole values.
LEAF_KEYS = [(name, key) for name, field in Params.model_fields.items()
             if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
             for key in field.annotation.model_fields]
# Keys dvc.yaml builds paths from must be written out (tests/test_interval_stages.py); every other may be left out.
OPTIONAL_KEYS = [(s, k) for s, k in LEAF_KEYS if f"{s}.{k}" not in INTERPOLATED_KEYS]


def raw_defaults() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_and_presets_validate():
    load_params(ROOT / "params.yaml")
    for preset in sorted((ROOT / "presets").glob("*.yaml")):
        load_params(preset)


def test_params_yaml_spells_out_every_key_of_every_section():
    """params.yaml is the documentation of the knobs: nothing may hide behind a default."""
    raw = raw_defaults()
    assert set(raw) == set(SECTIONS)
    for name, field in Params.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            assert set(raw[name]) == set(field.annotation.model_fields), name


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("dit", "steps", -5, "greater than 0"),
        ("dit", "steps", "many", "valid integer"),
        ("teacher_pairs", "ddim_steps", 0, "greater than 0"),
        ("teacher_pairs", "guidance_scale", -1.0, "greater than or equal to 0"),
        ("data", "source", "imagenet", "'digits', 'imagefolder' or 'npz'"),
        ("data", "resolution", 30, "multiple of 8"),
        ("compute", "mixed_precision", "fp8", "'no', 'bf16' or 'fp16'"),
        ("vae", "ema_decay", 1.0, "less than 1"),
    ],
)
def test_bad_value_is_reported_with_key_path_value_and_expectation(section, key, value, expected):
    raw = raw_defaults()
    raw[section][key] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    text = str(err.value)
    assert f"{section}." in text and expected in text
    assert repr(value) in text or "(section)" in text


def test_unknown_key_and_section_are_errors():
    raw = raw_defaults()
    raw["dit"]["stepz"] = 10
    raw["dtt"] = {"steps": 1}
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert len(err.value.problems) == 2
    text = str(err.value)
    assert "dit.stepz: unknown key" in text and "dtt: unknown key" in text


def test_every_problem_is_listed_at_once():
    raw = raw_defaults()
    raw["dit"]["lr"] = 0
    raw["vae"]["steps"] = 0
    raw["extract"]["posterior"] = "median"
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert len(err.value.problems) == 3


def test_vae_group_norm_cross_check():
    raw = raw_defaults()
    raw["vae"]["block_out_channels"] = [20, 64]
    with pytest.raises(ParamsError, match="multiples of vae.norm_num_groups"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ({"seqrf": {"segments": 3}}, "seqrf.eval_steps [4, 8] are not multiples of seqrf.segments=3"),
        ({"seqrf": {"segments": 128}}, "larger than seqrf.teacher_steps"),
        ({"distill": {"source": "rf@7"}}, "distill.source='rf@7' is not a model of this pipeline"),
        ({"distill": {"per_segment": True}}, "distill.per_segment needs distill.source: seqrf"),
        ({"distill": {"source": "seqrf", "per_segment": True, "eval_steps": [2]}}, "not multiples of seqrf.segments"),
        ({"distill": {"lpips_backbone": "vgg16.pth"}}, "lpips_backbone and distill.lpips_lin go together"),
        ({"distill": {"source": "seqrf", "per_segment": True, "eval_steps": [4], "drop_farthest": 0.1}},
         "segment rows, which have no z0 and z1"),
        ({"seqrf": {"segments": 8, "eval_steps": [8], "min_segment": 0.2}}, "do not fit in [0, 1]"),
        # Starting points off the flow the sampler follows: the paired 1-RF's data end is the teacher's.
        ({"seqrf": {"start": "noised_data"}}, "seqrf.start: noised_data starts segments from real latents"),
        ({"reflow": {"direction": "from_z1"}}, "reflow.direction: from_z1 inverts real latents"),
        ({"reflow": {"flip_prob": 0.5}}, "the data is not declared mirror-symmetric"),
    ],
)
def test_cross_checks_of_the_flow_stages(edits, expected):
    raw = raw_defaults()
    for section, values in edits.items():
        raw[section].update(values)
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert expected in str(err.value)


def test_unreadable_files_name_the_path(tmp_path):
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dit: [unclosed\n")
    with pytest.raises(ParamsError, match=str(bad)):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


def test_params_rewritten_by_dvc_exp_run_set_still_validate(tmp_path):
    """`dvc exp run -S` rewrites params.yaml through DVC's own YAML writer, which drops the quotes around
    "no"; the file it leaves must load to the same values."""
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    with modify_yaml(path) as data:
        data["rf1"]["coupling"] = "independent"
    assert '"no"' not in path.read_text()
    params = load_params(path)
    assert params.compute.mixed_precision == "no"
    assert params.rf1.coupling == "independent"


def test_view_refuses_undeclared_sections():
    view = ParamsView(load_params(ROOT / "params.yaml"), ["compute", "dit"])
    assert view.dit.steps > 0
    with pytest.raises(AttributeError, match="not declared by this stage"):
        _ = view.vae
    assert set(view.as_dict()) == {"compute", "dit"}


def test_cli_validate_prints_ok_or_every_error(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(ROOT / "params.yaml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and "OK" in ok.stdout
    raw = raw_defaults()
    raw["dit"]["steps"] = -1
    raw["teacher_pairs"]["bogus"] = 1
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1
    assert "dit.steps: got -1" in res.stderr and "teacher_pairs.bogus: unknown key" in res.stderr


def test_reflow_rounds_must_chain_from_rf1():
    raw = raw_defaults()
    raw["reflow_rounds"] = {"2": "rf1", "3": "rf@2", "2_classic": "rf1_classic"}
    assert parse_params(raw).reflow_rounds == {"2": "rf1", "3": "rf@2", "2_classic": "rf1_classic"}
    raw["reflow_rounds"] = {"2": "rf1", "3": "dit", "2_classic": "rf1_classic"}
    with pytest.raises(ParamsError, match="reflow_rounds must be consecutive from 2"):
        parse_params(raw)


def test_each_chain_chains_its_own_rounds():
    """The classic chain's rounds start from rf1_classic, never from the teacher chain's models."""
    raw = raw_defaults()
    raw["reflow_rounds"] = {"2": "rf1", "2_classic": "rf1"}
    with pytest.raises(ParamsError, match="each round starting from the previous round's model"):
        parse_params(raw)
    raw["reflow_rounds"] = {"2": "rf1", "2_slim": "rf1"}
    with pytest.raises(ParamsError, match="reflow_rounds key '2_slim'.*_classic"):
        parse_params(raw)
    raw["reflow_rounds"] = {"2": "rf1", "2_classic": "rf1_classic", "3_classic": "rf@2_classic"}
    raw["distill"] = {**raw["distill"], "classic_source": "rf@3_classic"}
    assert parse_params(raw).distill.classic_source == "rf@3_classic"
    raw["distill"]["classic_source"] = "rf@2"
    with pytest.raises(ParamsError, match="distill.classic_source='rf@2' is not a model of the classic chain"):
        parse_params(raw)


def test_presets_spell_out_what_dvc_yaml_interpolates():
    """dvc.yaml reads ${data.path} and ${reflow_rounds} from the params file itself, without our defaults."""
    for path in [ROOT / "params.yaml", *sorted((ROOT / "presets").glob("*.yaml"))]:
        raw = yaml.safe_load(path.read_text())
        assert "path" in raw.get("data", {}), path
        assert raw.get("reflow_rounds"), path
        assert "classic_source" in raw.get("distill", {}), path


# ---------------------------------------------------------------------------------------------------------
# One source of defaults: the schema, rendered into params.yaml
# ---------------------------------------------------------------------------------------------------------
def test_committed_params_yaml_is_the_rendered_schema():
    assert (ROOT / "params.yaml").read_text() == render_params(), (
        "params.yaml differs from the defaults in runtime/params.py: run `reflow params --write` and commit both")


def test_params_yaml_reads_back_as_the_schema_defaults_in_yaml_1_1_and_1_2():
    assert load_params(ROOT / "params.yaml") == Params()
    assert parse_params(raw_defaults()) == Params()  # PyYAML, YAML 1.1: "no" stays a string


@pytest.mark.parametrize(("section", "key"), OPTIONAL_KEYS, ids=[f"{s}.{k}" for s, k in OPTIONAL_KEYS])
def test_a_key_left_out_of_params_yaml_takes_the_value_the_file_shows(tmp_path, section, key):
    lines = (ROOT / "params.yaml").read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{section}:"))
    line = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(f"  {key}:"))
    path = tmp_path / "params.yaml"
    path.write_text("".join(lines[:line] + lines[line + 1:]))
    assert key not in read_params_mapping(path)[section]
    assert load_params(path) == load_params(ROOT / "params.yaml")


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_key_a_preset_does_not_set_is_the_params_yaml_value(preset):
    raw, params, documented = read_params_mapping(preset), load_params(preset), load_params(ROOT / "params.yaml")
    unset = [(s, k) for s, k in LEAF_KEYS if k not in (raw.get(s) or {})]
    differ = [f"{s}.{k}" for s, k in unset
              if getattr(getattr(params, s), k) != getattr(getattr(documented, s), k)]
    assert not differ


def test_tiny_preset_trains_the_demo_s_unmirrored_teacher():
    """The tests' preset takes the demo's values where it sets nothing (it once trained a mirrored DiT)."""
    tiny = load_params(ROOT / "presets" / "tiny.yaml")
    assert tiny.dit.mirrored is False
    assert tiny.dit.lr == 1e-3
    assert tiny.distill.label_dropout == 0.0
    assert tiny.teacher_pairs.guidance_scale == 2.0
    assert tiny.eval.steps == [1, 2, 4]  # tiny sets its own; the demo measures [1, 2, 4, 8, 16, 50]


def test_a_section_lists_its_own_keys_before_the_shared_training_knobs():
    keys = section_keys(type(Params().distill))
    assert keys[:3] == ["source", "classic_source", "student_num_layers"]
    assert keys[-8:] == ["steps", "batch_size", "lr", "weight_decay", "ema_decay", "grad_clip", "log_every",
                         "checkpoint_every"]
    assert keys.index("label_dropout") < keys.index("eval_samples")  # re-declared, kept in its base's place


class _Scalar(BaseModel):
    value: object


class _File(BaseModel):
    section: _Scalar


@pytest.mark.parametrize("value", ["no", "Yes", "off", "null", "2", "1e3", ".5", "", "a b", "x # y", "rf@2",
                                   "http://127.0.0.1:5000", "data/cifar10", 1e-6, 2e-3, 0.02, 1e20, 8.0, -0.5, 0,
                                   None, True, [1, 2, 4], ["euler"]])
def test_rendered_values_read_back_the_same_in_yaml_1_1_and_1_2(value):
    text = render_yaml(_File(section=_Scalar(value=value)), header="")
    for read in (YAML(typ="safe", pure=True).load, yaml.safe_load):
        assert read(text)["section"]["value"] == value, text


def test_small_floats_are_written_as_powers_of_ten():
    text = render_params()
    assert "  kl_weight: 1.0e-6\n" in text and "  lr: 2.0e-3\n" in text and "  beta_end: 0.02\n" in text
    assert '  mixed_precision: "no"' in text and '  "2": rf1\n' in text and "  eval_steps: [1, 2, 4]\n" in text


def test_reflow_params_prints_the_committed_file(capsys):
    assert reflow(["params"]) == 0
    assert capsys.readouterr().out == (ROOT / "params.yaml").read_text()


def test_reflow_params_write_replaces_the_repo_s_params_yaml(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("dit: {steps: 1}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # found from below, as DVC finds its repo
    assert reflow(["params", "--write"]) == 0
    assert (tmp_path / "params.yaml").read_text() == render_params()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.yaml", "params.yaml", "sub"]  # no temp file left


def test_real_data_starts_are_allowed_with_the_independent_coupling():
    raw = raw_defaults()
    raw["rf1"]["coupling"] = "independent"
    raw["seqrf"]["start"], raw["reflow"]["direction"] = "noised_data", "from_z1"
    p = parse_params(raw)
    assert (p.seqrf.start, p.reflow.direction) == ("noised_data", "from_z1")
