"""The text chain's inputs: CLIP's tokenizer built offline, captioned digits, prompt files."""

import json
from pathlib import Path

import numpy as np
import pytest

from imagedata.captions import COLOURS, NUMBERS, PromptsError, caption, captioned, colourise, read_prompts
from models.text import CLIP_VOCAB_SIZE, TokenizerError, bundled_bpe, clip_tokenizer, clip_vocab


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def test_the_offline_tokenizer_gives_clips_ids_for_a_known_sentence(tokenizer) -> None:
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_a_stable_diffusion_tokenizer_folder_loads_by_path_and_a_saved_one_reloads(tokenizer, tmp_path: Path) -> None:
    vocab, merges = clip_vocab(bundled_bpe())
    sd = tmp_path / "tokenizer"  # Stable Diffusion's layout: vocab.json and merges.txt
    sd.mkdir()
    (sd / "vocab.json").write_text(json.dumps(vocab))
    (sd / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    assert clip_tokenizer(sd)("a red seven").input_ids == tokenizer("a red seven").input_ids
    tokenizer.save_pretrained(tmp_path / "saved")
    assert clip_tokenizer(tmp_path / "saved")("a photo of a cat").input_ids == tokenizer("a photo of a cat").input_ids


def test_a_tokenizer_that_lost_its_vocabulary_is_refused(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(bundled_bpe())
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # The older keyword names are ignored by transformers 5: a 2-token tokenizer, which must not pass as CLIP's.
    broken = CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    broken.save_pretrained(tmp_path / "broken")
    if len(broken) == CLIP_VOCAB_SIZE:
        pytest.skip("this transformers reads the older keyword names: nothing to refuse")
    with pytest.raises(TokenizerError, match=f"expected CLIP's {CLIP_VOCAB_SIZE}"):
        clip_tokenizer(tmp_path / "broken")
    with pytest.raises(TokenizerError, match="not a CLIP tokenizer folder"):
        clip_tokenizer(tmp_path / "nowhere")


def test_captions_carry_the_class_and_a_colour_the_image_shows() -> None:
    g = np.random.default_rng(0)
    images = np.repeat(g.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8), 3, axis=1)
    labels = np.arange(40) % 10
    painted, captions, colour = captioned(images, labels, seed=3)
    names = list(COLOURS)
    assert captions[7] == caption(7, names[colour[7]]) == f"a {names[colour[7]]} {NUMBERS[7]}"
    assert len(set(colour.tolist())) == len(COLOURS)  # 40 rows draw every colour
    for i in range(40):  # the channel the colour keeps is the brightest
        assert painted[i].reshape(3, -1).sum(1).argmax() == int(np.argmax(COLOURS[names[colour[i]]]))
    np.testing.assert_array_equal(captioned(images, labels, seed=3)[0], painted)  # a pure function of its inputs
    assert captioned(images, labels, seed=4)[1] != captions
    np.testing.assert_array_equal(colourise(np.full((1, 3, 2, 2), 255, np.uint8), "red")[0, :, 0, 0], [255, 38, 38])


def test_prompt_files_are_read_line_by_line_and_bad_ones_are_named(tokenizer, tmp_path: Path) -> None:
    good = tmp_path / "prompts.txt"
    good.write_text("a red seven\n\n  a blue two  \n")
    assert read_prompts(good, tokenizer) == ["a red seven", "a blue two"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(PromptsError, match=r"empty.txt: no prompts"):
        read_prompts(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"a red seven\na green one\nun caf\xe9 vert\n")
    with pytest.raises(PromptsError, match=r"latin.txt, line 3: not UTF-8 \(byte 0xe9 at column 7\)"):
        read_prompts(latin)
    long = tmp_path / "long.txt"
    long.write_text("a red seven\n" + " ".join(["seven"] * 80) + "\n")
    with pytest.raises(PromptsError, match=r"long.txt, line 2: the prompt is 82 tokens, more than .* 77"):
        read_prompts(long, tokenizer)
    with pytest.raises(PromptsError, match=r"missing.txt: cannot read"):
        read_prompts(tmp_path / "missing.txt")
