"""Malformed params: every case a clear message with the key path, a non-zero exit, and nothing touched.

The listed cases are the mistakes people make; on top, hypothesis corrupts one key of the real
`params.yaml` at a time in every way it can think of and checks that validation either accepts the value
or names that key, and never fails in any other way.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())

# (edits {dotted key: value}, text the message must hold)
CASES = [
    ({"dit.steps": -3}, "dit.steps: got -3"),
    ({"vae.steps": 0}, "vae.steps: got 0"),
    ({"dit.steps": "many"}, "dit.steps: got 'many'"),
    ({"dit.lr": "1e-3x"}, "dit.lr"),
    ({"eval.steps": [0, 1]}, "eval.steps.0: got 0"),
    ({"rf1.eval_steps": [0]}, "rf1.eval_steps"),
    ({"teacher_pairs.ddim_steps": 0}, "teacher_pairs.ddim_steps: got 0"),
    ({"teacher_pairs.guidance_scale": -1.0}, "teacher_pairs.guidance_scale: got -1.0"),
    ({"eval.guidance_scale": -0.5}, "eval.guidance_scale: got -0.5"),
    ({"seqrf.segments": 8, "seqrf.teacher_steps": 4}, "seqrf"),
    ({"seqrf.segments": 3}, "not multiples of seqrf.segments=3"),
    ({"dit.stepz": 10}, "dit.stepz: unknown key"),
    ({"ditt": {"steps": 1}}, "ditt: unknown key"),
    ({"distill.source": "rf@9"}, "distill.source='rf@9' is not a model of this pipeline"),
    ({"evaluate_models.rf9": "rf@9"}, "evaluate_models.rf9='rf@9' is not a model"),
    ({"evaluate_models.../x": "rf1"}, "names the stage"),
    ({"reflow_rounds.3": "rf1"}, "reflow_rounds must be consecutive"),
    ({"data.resolution": 30}, "data.resolution must be a multiple of 8"),
    ({"data.source": "folder"}, "data.source: got 'folder'"),
    ({"compute.device": "tpu"}, "compute.device"),
    ({"compute.mixed_precision": False}, "compute.mixed_precision"),
    ({"eval.seeds": [1, 1]}, "eval.seeds has repeated entries"),
    ({"eval.solvers": ["rk4"]}, "eval.solvers.0"),
]


def edited(edits: dict) -> dict:
    params = copy.deepcopy(PARAMS)
    for dotted, value in edits.items():
        section, _, key = dotted.partition(".")
        if key:
            params.setdefault(section, {})[key] = value
        else:
            params[section] = value
    return params


@pytest.mark.parametrize(("edits", "expected"), CASES, ids=[next(iter(c[0])) for c in CASES])
def test_listed_mistake_is_named_with_its_key_path(tmp_path, edits, expected):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(edited(edits)))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert expected in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("section", ["dit", "eval", "evaluate_models", "reflow_rounds"])
def test_missing_section_is_named(tmp_path, section):
    params = copy.deepcopy(PARAMS)
    del params[section]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=f"{section}: missing section"):
        load_params(path)


def test_validate_command_exits_non_zero_and_lists_every_problem(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(edited({"dit.steps": -3, "eval.steps": [0], "distill.source": "nope"})))
    res = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(path)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 1
    assert "dit.steps: got -3" in res.stderr and "eval.steps.0: got 0" in res.stderr


BAD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                  max_size=2),
)
KEYS = sorted((section, key) for section, values in PARAMS.items() if isinstance(values, dict) for key in values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.sampled_from(KEYS), value=BAD_VALUES, extra=st.booleans())
def test_any_corrupted_key_is_accepted_or_named(where, value, extra):
    section, key = where
    params = copy.deepcopy(PARAMS)
    target = f"{key}_typo" if extra else key  # an unknown key next to the real ones, or a replaced value
    params[section][target] = value
    try:
        parse_params(params)
    except ParamsError as err:
        # The message names the section (a cross-check such as reflow_rounds names it whole) or the key.
        assert f"{section}." in str(err) or f"{section}:" in str(err) or section in str(err), str(err)
    except Exception as err:  # anything else is a crash the user would see as a traceback
        pytest.fail(f"{section}.{target}={value!r} raised {type(err).__name__}: {err}")
    else:  # reflow_rounds and evaluate_models are maps whose keys the user chooses
        assert not extra or section in ("reflow_rounds", "evaluate_models"), f"unknown {section}.{target} accepted"
