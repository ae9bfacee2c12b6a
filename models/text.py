"""CLIP's tokenizer, built offline from the BPE vocabulary the `open_clip_torch` wheel ships.

Stable Diffusion's text encoder reads CLIP's 49,408-token BPE vocabulary. Nothing is downloaded at run time, so
the tokenizer is assembled from `open_clip/bpe_simple_vocab_16e6.txt.gz` the way CLIP builds it: the 256
byte-to-unicode symbols, the same with the end-of-word mark `</w>`, the merged pairs of the file's first 48,894
merges, then `<|startoftext|>` and `<|endoftext|>`. A tokenizer folder given by path (Stable Diffusion's
`tokenizer/`) is loaded instead, and checked the same way.

The size is asserted: transformers 5 silently ignores the older `vocab_file=` / `merges_file=` keyword names and
builds a 2-token tokenizer that would turn every prompt into unknown tokens.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77  # tokens, start and end included: the text encoder's positions
CLIP_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894: byte symbols twice, the merges, two specials
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or is not CLIP's, with the file named."""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode symbols, so BPE never sees
    whitespace or control characters: printable bytes map to themselves, the rest to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def bundled_bpe() -> Path:
    """The BPE merges inside the installed `open_clip_torch` wheel, found without importing it (its import pulls
    in timm and torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the CLIP vocabulary ships in the open_clip_torch package, which is not installed: "
                             "pip install open_clip_torch (or give a tokenizer folder by path)")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise TokenizerError(f"{path}: missing from the open_clip_torch package; expected CLIP's BPE merges there")
    return path


def clip_vocab(bpe: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and merges, from its gzipped BPE file."""
    try:
        lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise TokenizerError(f"{bpe}: not a gzipped UTF-8 BPE merges file ({e})") from e
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]  # line 0 is a version header
    if len(merges) != CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{bpe}: expected {CLIP_MERGES} merge lines of two symbols each after its header, got "
                             f"{len(merges)}")
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def clip_tokenizer(folder: str | Path | None = None):
    """CLIP's tokenizer: from a tokenizer folder (Stable Diffusion's `tokenizer/`) when given, otherwise built
    offline from the bundled BPE file. Either way it must hold CLIP's 49,408 tokens."""
    from transformers import CLIPTokenizer

    if folder is not None:
        folder = Path(folder)
        slow = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()  # Stable Diffusion's layout
        if not slow and not (folder / "tokenizer.json").is_file():  # what save_pretrained writes in transformers 5
            raise TokenizerError(f"{folder}: not a CLIP tokenizer folder; expected vocab.json and merges.txt, or "
                                 "tokenizer.json")
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        source = str(folder)
    else:
        bpe = bundled_bpe()
        vocab, merges = clip_vocab(bpe)
        # `vocab=` / `merges=`: the names transformers 5 reads (the older *_file names are ignored, see above).
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
        source = str(bpe)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise TokenizerError(f"{source}: the tokenizer has {len(tokenizer)} tokens, expected CLIP's {CLIP_VOCAB_SIZE} "
                             "(a transformers version that ignored the vocabulary would give 2)")
    return tokenizer
