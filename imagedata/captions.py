"""Text for the text-to-image chain: captioned digits and prompt files.

The embedded digits carry only a class, so a text teacher trained on "a seven" would need nothing of its prompt
beyond the label. Each captioned digit is painted in one of `COLOURS` and captioned with both, "a red seven": a
sample is consistent with its prompt only if the class and the colour are right, and the colour is information
the class does not hold. The colour of row i is drawn from its own seed (`captioned`), so the captions are a pure
function of the images, the labels and the seed.

Prompt files are what pair generation reads: UTF-8 text, one prompt per line (blank lines skipped). A file that
cannot serve (empty, a line that is not UTF-8, a prompt longer than the text encoder's 77 tokens) is refused
with the file and line named, before anything is generated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# RGB multipliers of the white strokes, chosen to stay far apart after the VAE: pure primaries and their mixes.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 1.0, 0.15),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.15),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class PromptsError(ValueError):
    """A prompts file that cannot be used, with the file and line named."""


def caption(label: int, colour: str) -> str:
    """The prompt of a digit of class `label` painted `colour`: "a red seven"."""
    return f"a {colour} {NUMBERS[label]}"


def colourise(images: np.ndarray, colour: str) -> np.ndarray:
    """uint8 images [N, 3, H, W] with their brightness painted in `colour` (white strokes on black become
    coloured strokes on black)."""
    grey = images.astype(np.float32).mean(axis=1, keepdims=True)
    rgb = np.asarray(COLOURS[colour], np.float32).reshape(1, 3, 1, 1)
    return np.clip(np.rint(grey * rgb), 0, 255).astype(np.uint8)


def captioned(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The digits painted and captioned: (images, captions, colour index per row). Row i's colour comes from
    `seed` and i alone (its own generator), so the set is the same however it is batched."""
    names = list(COLOURS)
    colour = np.array([np.random.default_rng([seed, i]).integers(len(names)) for i in range(len(labels))])
    out = np.empty_like(images)
    for c, name in enumerate(names):
        rows = colour == c
        out[rows] = colourise(images[rows], name)
    return out, [caption(int(y), names[c]) for y, c in zip(labels, colour, strict=True)], colour


def read_prompts(path: str | Path, tokenizer=None, max_tokens: int = 77) -> list[str]:
    """The prompts of a UTF-8 file, one per line (blank lines skipped), each at most `max_tokens` tokens with
    the start and end tokens when a tokenizer is given."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PromptsError(f"{path}: cannot read the prompts file ({e.strerror})") from e
    prompts = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise PromptsError(f"{path}, line {number}: not UTF-8 (byte {line[e.start]:#04x} at column "
                               f"{e.start + 1}); expected UTF-8 text, one prompt per line") from e
        if not text:
            continue
        if tokenizer is not None:
            n = len(tokenizer(text).input_ids)
            if n > max_tokens:
                raise PromptsError(f"{path}, line {number}: the prompt is {n} tokens, more than the text encoder's "
                                   f"{max_tokens} (start and end tokens included); shorten it")
        prompts.append(text)
    if not prompts:
        raise PromptsError(f"{path}: no prompts; expected UTF-8 text with one prompt per line")
    return prompts
