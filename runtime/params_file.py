"""`params.yaml` around its schema: read as YAML 1.2, its problems reported by key path, rendered from the
schema's defaults, and seen by a stage through the sections it declared.

The schema (runtime/params.py) is the one definition of every key, its default and its meaning. The committed
`params.yaml` is rendered from it by `render_yaml` (`reflow params --write`), so the file a user reads and copies
shows exactly the values a key left out of a params file takes. This module knows YAML and pydantic, not the
sections: runtime/params.py binds it to its `Params`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML, YAMLError

HEADER = """\
# The embedded CPU default: scikit-learn's handwritten digits at 32x32, end to end in minutes on 2 cores.
# Every key is validated (runtime/params.py): unknown keys and out-of-range values are errors.
# Presets for other sizes live in presets/; `reflow validate presets/<file>.yaml` checks one.
# Rendered from the defaults in runtime/params.py by `reflow params --write`: change a default there, not here.
"""
COMMENT_COLUMN = 27  # where a key's comment starts, so the file reads as a table

Model = TypeVar("Model", bound=BaseModel)


# ---------------------------------------------------------------------------------------------------------
# Reading and error reporting
# ---------------------------------------------------------------------------------------------------------
class ParamsError(ValueError):
    """`params.yaml` is unreadable or invalid; the message lists every problem with its key path."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


def read_params_mapping(path: str | Path) -> dict[str, Any]:
    """The raw, unvalidated mapping of a params file (an empty file is an empty mapping).

    The one YAML reader of params files: YAML 1.2, the dialect DVC writes back with `dvc exp run -S`. DVC drops
    the quotes around "no", which a YAML 1.1 reader (PyYAML) would turn into False.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(path, [f"cannot read the file: {exc.strerror}"]) from None
    try:
        raw = YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        raise ParamsError(path, [f"not valid YAML: {exc}"]) from None
    return _mapping(raw, path)


def _mapping(raw: Any, path: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ParamsError(path, [f"<top level>: got {type(raw).__name__}; expected a mapping of sections"])
    return raw


def validate_mapping(model: type[Model], raw: Any, path: Path) -> Model:
    """`raw` validated as `model`; every problem, each with its key path, in one ParamsError."""
    try:
        return model.model_validate(_mapping(raw, path))
    except ValidationError as exc:
        raise ParamsError(path, [_describe(e) for e in exc.errors()]) from None


def require_sections(raw: dict[str, Any], sections: Iterable[str], path: Path) -> None:
    """DVC reads each stage's sections from the file itself (dvc.yaml `params:`), so a section left to its
    default would still stop `dvc repro`, with a less helpful message: require it up front."""
    missing = [s for s in sections if s not in raw]
    if missing:
        raise ParamsError(path, [f"{s}: missing section; stages read it from this file (copy it from the "
                                 "project's params.yaml)" for s in missing])


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {err['input']!r}); allowed keys are listed in runtime/params.py"
    value = err.get("input")
    shown = "missing" if err["type"] == "missing" else repr(value)
    if isinstance(value, dict) and err["type"].startswith("value_error"):
        shown = "(section)"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: got {shown}; expected: {msg}"


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------
def render_yaml(defaults: BaseModel, header: str = HEADER) -> str:
    """The params file of `defaults`: one block per section in field order, `key: value  # description`.

    Each top-level field is a section: a model (its keys) or a mapping (its entries). Comments are the fields'
    descriptions, a section's own on its first line.
    """
    blocks = []
    for name, field in type(defaults).model_fields.items():
        value = getattr(defaults, name)
        lines = [_commented(f"{name}:", field.description)]
        if isinstance(value, BaseModel):
            fields = type(value).model_fields
            lines += [_commented(f"  {key}: {_scalar(getattr(value, key))}", fields[key].description)
                      for key in section_keys(type(value))]
        else:
            lines += [f"  {_scalar(key)}: {_scalar(item)}" for key, item in value.items()]
        blocks.append("\n".join(lines) + "\n")
    return header + "\n" + "\n".join(blocks)


def section_keys(model: type[BaseModel]) -> list[str]:
    """A section's keys as params.yaml lists them: its own first, then those it shares with other sections.

    Pydantic orders inherited fields first (the training knobs common to every loop would open each section).
    Here a class's own keys come before its bases', and a key a class only re-declares to change its default
    stays where its base declares it, so every training section ends with the same block of shared knobs.
    """
    classes = [c for c in model.__mro__ if issubclass(c, BaseModel) and c is not BaseModel]
    origin = {}  # key -> (rank of the base-most class declaring it, its position there); derived classes rank 0
    for rank, cls in enumerate(classes):
        for position, key in enumerate(cls.__dict__.get("__annotations__", {})):
            if key in model.model_fields:
                origin[key] = (rank, position)
    return sorted(model.model_fields, key=origin.__getitem__)


def _commented(line: str, description: str | None) -> str:
    if not description:
        return line
    # At least two spaces before the comment; a line that reaches the column gets three, as the file always had.
    padded = line.ljust(COMMENT_COLUMN) if len(line) <= COMMENT_COLUMN - 2 else line + "   "
    return f"{padded}# {description}"


# Written plain only when no YAML reader, 1.1 (PyYAML) or 1.2 (ruamel, DVC), can read it as anything but this
# string: no leading digit, sign or dot (numbers, .inf), no YAML 1.1 boolean or null words, no YAML syntax.
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_@./:+-]*")
_YAML11_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})


def _scalar(value: Any) -> str:
    """`value` as YAML 1.2 that every reader reads back as the same value; lists in flow style."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        plain = _PLAIN.fullmatch(value) and value.lower() not in _YAML11_WORDS
        return value if plain else json.dumps(value)  # a JSON string is a double-quoted YAML scalar
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"no YAML rendering for {type(value).__name__} {value!r}")


def _float(value: float) -> str:
    """`2.0e-3`, not Python's `0.002` or `1e-06`: small numbers read as powers of ten, and YAML 1.1 readers
    take an exponent as a float only with a dot in the mantissa and a sign on the exponent."""
    if value == 0 or 1e-2 <= abs(value) < 1e16:
        return repr(value)  # shortest round-trip digits, always with a dot in this range
    digits = next(p for p in range(17) if float(f"{value:.{p}e}") == value)
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exponent):+d}"


# ---------------------------------------------------------------------------------------------------------
# What a stage sees
# ---------------------------------------------------------------------------------------------------------
class ParamsView:
    """The sections one stage declared; reading any other section is an error.

    This is what makes the `params:` list of a stage in `dvc.yaml` trustworthy: a stage that read an
    undeclared section would not be rerun when that section changed.
    """

    def __init__(self, params: BaseModel, sections: Iterable[str], aliases: dict[str, str] | None = None):
        self._params = params
        self._sections = tuple(sections)
        self._aliases = dict(aliases or {})  # name read -> the section it is (see StageSpec.aliases)
        known = list(type(params).model_fields)
        unknown = (set(self._sections) | set(self._aliases.values())) - set(known)
        if unknown:
            raise KeyError(f"unknown params section(s) {sorted(unknown)}; known: {known}")
        undeclared = set(self._aliases.values()) - set(self._sections)
        if undeclared:
            raise KeyError(f"aliased params section(s) {sorted(undeclared)} are not among the declared "
                           f"{self._sections}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        name = self._aliases.get(name, name)
        if name not in self._sections:
            raise AttributeError(
                f"params section {name!r} is not declared by this stage (declared: {list(self._sections)}); "
                "add it to the stage's PARAMS and to its `params:` in dvc.yaml"
            )
        return getattr(self._params, name)

    def as_dict(self) -> dict[str, Any]:
        return {s: _dump(getattr(self._params, s)) for s in self._sections}


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
