"""What every benchmark of `make bench` (bench/run.py) shares: timing, the params and the models they describe."""

from __future__ import annotations

import resource
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from runtime.params import Params, load_params, parse_params


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: a child's ru_maxrss can carry the RSS of the
    parent it was forked from, VmHWM starts afresh with the new address space at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: KiB on Linux, bytes on macOS


def timed(fn: Callable[[], float], repeats: int, warmup: bool = True) -> dict:
    """`fn()` returns a rate; median and every run, after one unrecorded warm-up run."""
    if warmup:
        fn()
    runs = [fn() for _ in range(repeats)]
    return {"median": statistics.median(runs), "runs": runs}


def load_with_overrides(path: str, overrides: list[str]) -> Params:
    """The params file with `section.key=value` overrides (values read as YAML), validated like the file."""
    if not overrides:
        return load_params(path)
    from ruamel.yaml import YAML

    load_params(path)  # the file itself must be valid first
    yaml = YAML(typ="safe", pure=True)
    raw = yaml.load(Path(path).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in raw or not isinstance(raw[section], dict):
            raise SystemExit(f"--set {item!r}: expected section.key=value with a section of {path}")
        raw[section][name] = yaml.load(value)
    return parse_params(raw, Path(f"{path} with --set {' '.join(overrides)}"))


def device_of(params: Params) -> str:
    return "cuda" if params.compute.device != "cpu" and torch.cuda.is_available() else "cpu"


def latent_shape(params: Params) -> tuple[int, int, int]:
    down = 2 ** (len(params.vae.block_out_channels) - 1)
    size = params.data.resolution // down
    return params.vae.latent_channels, size, size


def make_dit(params: Params, num_classes: int = 10, **overrides):
    from models.dit import build_dit

    c, size, _ = latent_shape(params)
    p = params.dit
    kw = dict(sample_size=size, in_channels=c, num_classes=num_classes, patch_size=p.patch_size,
              num_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
              attention_head_dim=p.attention_head_dim, learn_sigma=p.learn_sigma)
    return build_dit(**(kw | overrides))
