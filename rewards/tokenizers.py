"""The real CLIP BPE tokenizer, built offline from the vocabulary file that open_clip_torch ships.

open_clip's `bpe_simple_vocab_16e6.txt.gz` holds the same merges as OpenAI CLIP and Stable Diffusion's
tokenizer, so the ids are identical (49408 tokens, <|startoftext|>=49406, <|endoftext|>=49407). We write
`vocab.json` + `merges.txt` (readable by every transformers version) and load them with `from_pretrained`.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level mapping: printable bytes map to themselves, the rest to unused code points.
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer_files(directory: str | os.PathLike) -> Path:
    """Write `vocab.json` and `merges.txt` of the CLIP tokenizer into `directory` and return it."""
    from open_clip.tokenizer import default_bpe

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    (directory / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return directory


@lru_cache(maxsize=1)
def _tokenizer_dir() -> Path:
    return write_clip_tokenizer_files(tempfile.mkdtemp(prefix="clip-tokenizer-"))


def clip_tokenizer(model_max_length: int = 77):
    """A `transformers.CLIPTokenizer` with the real CLIP vocabulary, built without any download."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(_tokenizer_dir()))
    tok.model_max_length = model_max_length
    return tok
