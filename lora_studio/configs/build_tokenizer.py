"""Build the shipped CLIP tokenizer files (``clip-tokenizer/vocab.json`` + ``merges.txt``) from CLIP's BPE table.

Run once: ``python -m lora_studio.configs.build_tokenizer /path/to/bpe_simple_vocab_16e6.txt.gz``.
The table is the one OpenAI's CLIP and open_clip (MIT licence) ship; SD1, SD2 and both SDXL text encoders use
this same vocabulary (49,408 tokens: 256 bytes, the same 256 bytes ending a word, 48,894 merges, two specials).
Written by hand because transformers' ``CLIPTokenizer`` reads vocab.json/merges.txt, not the gzipped table.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from ..demo.model import bytes_to_unicode

OUT = Path(__file__).resolve().parent / "clip-tokenizer"
N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the table


def build(bpe_gz: str | Path, out: Path = OUT) -> Path:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")
    return out


if __name__ == "__main__":
    print(build(sys.argv[1]))
