"""`text_prepare`: the text pipeline's data, captioned images in four splits and the prompts file they index.

The embedded digits are painted in one of four colours and captioned with class and colour ("a red seven",
imagedata/captions.py), so a prompt carries information the class does not. The prompts file
(`text_data.prompts`, versioned by DVC as this stage's dep) is the prompt table of every model of the text
chain: an image's label is the line of its caption, pair generation draws prompt i mod P, and the judge
(`text_fid_features`) has one class per prompt, so it checks class and colour at once. The splits are the class
pipeline's (`prepare.write_splits`), stratified by caption. The file is refused, with its line named, when it is
empty, not UTF-8, longer than CLIP's 77 tokens per prompt, repeats a prompt, or misses a caption of the images
or holds a prompt no image shows (the FID reference and the judge need images of every prompt).
"""

from __future__ import annotations

import shutil
import sys

import numpy as np

from imagedata.captions import COLOURS, PromptsError, captioned, read_prompts
from imagedata.sources import load_source
from models.text import clip_tokenizer
from runtime.context import StageContext, StageError
from runtime.main import stage_main
from runtime.spec import StageSpec
from stages.prepare import write_splits

SPEC = StageSpec(
    name="text_prepare",
    params=("text_data",),
    deps={"prompts": "${text_data.prompts}"},
    outs={"data": "text/artifacts/prepare"},
    metrics="text/metrics/prepare.json",
    note="the text pipeline's data: captioned digits and the prompts file",
)


def caption_labels(prompts: list[str], captions: list[str], path) -> np.ndarray:
    """Each caption's line in the prompts file (0-based); every caption must be a line and every line a caption."""
    seen: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        if prompt in seen:
            raise PromptsError(f"{path}: the prompt {prompt!r} is on two lines ({seen[prompt] + 1} and {i + 1}) of the "
                               "non-blank ones; each prompt is one class of the judge, keep one")
        seen[prompt] = i
    missing = sorted(set(captions) - set(seen))
    if missing:
        raise PromptsError(f"{path}: no line for the caption(s) {missing[:5]} of the captioned images; the teacher "
                           "learns every caption, so each needs its line")
    shown = set(captions)
    unused = [(i + 1, p) for i, p in enumerate(prompts) if p not in shown]
    if unused:
        raise PromptsError(f"{path}: prompt {unused[0][1]!r} (non-blank line {unused[0][0]}) is the caption of no "
                           "image; the FID reference and the judge need images of every prompt")
    return np.array([seen[c] for c in captions], dtype=np.int64)


def run(ctx: StageContext) -> dict:
    p = ctx.params.text_data
    prompts_file = ctx.dep("prompts")
    try:
        prompts = read_prompts(prompts_file, tokenizer=clip_tokenizer())
        digits = load_source("digits", "", p.resolution)
        images, captions, colour = captioned(digits.images, digits.labels, p.colour_seed)
        labels = caption_labels(prompts, captions, prompts_file)
    except PromptsError as exc:
        raise StageError(str(exc)) from None
    fractions = {"reference": p.reference_fraction, "features": p.features_fraction, "floor": p.floor_fraction}
    metrics = write_splits(ctx, images, labels, np.arange(len(labels)), prompts, fractions, p.split_seed,
                           {"resolution": p.resolution, "source": "digits, captioned", "colours": list(COLOURS),
                            "colour_seed": p.colour_seed},
                           also=lambda folder: shutil.copyfile(prompts_file, folder / "prompts.txt"))
    return metrics | {"prompts": len(prompts), "colours_used": int(len(np.unique(colour)))}


def main() -> int:
    return stage_main(SPEC, run)


if __name__ == "__main__":
    sys.exit(main())
