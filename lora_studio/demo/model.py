"""The tiny built-in demo model: its architecture, tokenizer and where its weights ship.

Written by hand because no library ships a trainable toy SD: the tokenizer vocabulary is byte-level CLIP BPE
plus merges for a small word list; the model is the real SD 1.x structure at toy size (see the package).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .shapes import WORDS

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_MODEL_DIR = ASSETS / "demo-model"
DEMO_RESOLUTION = 64
DEMO_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")


# --------------------------------------------------------------------------- tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (same rule as GPT-2 and CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges by rank, as CLIP's tokenizer does."""
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def tiny_vocab(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: every byte (so any prompt tokenizes) plus one token per demo word."""
    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:  # join what the earlier merges left, left to right
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append(f"{parts[0]} {parts[1]}")
            vocab_list.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=77)


# --------------------------------------------------------------------------- architecture
def tiny_unet_config() -> dict:
    return dict(
        sample_size=DEMO_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=8,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEMO_RESOLUTION,
    )


def tiny_text_config(vocab_size: int, eos_token_id: int, bos_token_id: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def random_demo_pipeline(seed: int = 0):
    """The demo architecture with freshly initialised (untrained) weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(**tiny_text_config(len(tok), tok.eos_token_id, tok.bos_token_id)))
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
