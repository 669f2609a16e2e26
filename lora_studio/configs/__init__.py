"""Config-only diffusers folders for the three base families, so single files load fully offline.

``sd15/`` (Stable Diffusion 1.5), ``sd21/`` (SD 2.1 768, v-prediction) and ``sdxl/`` (SDXL base 1.0) hold
``model_index.json`` plus each component's config with the published values (no weights). The CLIP tokenizer
is shipped once, in ``clip-tokenizer/`` (built by ``build_tokenizer.py``); ``clip_tokenizer()`` makes the
tokenizer(s) a family needs (SD2 and SDXL's second tokenizer pad with "!", as OpenCLIP does).
"""

from __future__ import annotations

from pathlib import Path

from ..family import Family

ROOT = Path(__file__).resolve().parent
TOKENIZER_DIR = ROOT / "clip-tokenizer"
FAMILY_DIRS = {Family.SD1: "sd15", Family.SD2: "sd21", Family.SDXL: "sdxl"}


def config_dir(family: Family) -> Path:
    """The shipped config folder for ``family`` (what ``from_single_file(config=...)`` needs)."""
    return ROOT / FAMILY_DIRS[Family(family)]


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (49,408 tokens, 77 positions) from the shipped vocabulary."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(TOKENIZER_DIR / "vocab.json"), merges=str(TOKENIZER_DIR / "merges.txt"),
                         pad_token=pad_token, model_max_length=77)


def family_tokenizers(family: Family) -> dict:
    """The tokenizer components a pipeline of ``family`` takes, by pipeline argument name."""
    family = Family(family)
    if family is Family.SD1:
        return {"tokenizer": clip_tokenizer()}
    if family is Family.SD2:
        return {"tokenizer": clip_tokenizer(pad_token="!")}
    return {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer(pad_token="!")}
