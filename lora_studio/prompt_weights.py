"""A1111's prompt weights on the text-encoder side: emphasis, 75-token chunks, ``BREAK`` and clip skip.

A prompt is read by ``parse_prompt_attention``; each piece is tokenized on its own and every token keeps its
piece's weight. The tokens are cut into chunks of 75 (``BREAK`` starts a new chunk), each wrapped in BOS/EOS
and padded to 77; each chunk is encoded alone, its token embeddings are multiplied by their weights and the
chunk is rescaled to its original mean (A1111's "Original" emphasis). The chunks are joined along the sequence
axis, so a 150-token prompt gives 154 positions. SDXL encodes every chunk with both text encoders, weights each,
and joins them along the feature axis; its pooled embedding is the second encoder's, from the first chunk.

Clip skip counts as A1111 does: 1 is the encoder's usual output, 2 one layer earlier. SD1/SD2 apply the final
layer norm to the earlier layer (A1111's SD1 rule, and diffusers'); SDXL already reads the penultimate layer
without the norm, and clip skip N goes N - 1 layers further back (diffusers' ``clip_skip=N - 1``).

Not done: A1111's comma backtracking (moving the words after the last comma into the next chunk when a chunk
fills up) and textual-inversion embeddings in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError
from .prompt import parse_prompt_attention

CHUNK_TOKENS = 75


@dataclass(frozen=True)
class Chunk:
    """Up to 75 token ids (no BOS/EOS) and one weight per token."""

    tokens: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()


def chunk_prompt(tokenizer, text: str) -> list[Chunk]:
    """``text`` as A1111 cuts it: weighted tokens in chunks of at most 75; ``BREAK`` ends a chunk; an empty
    prompt is one empty chunk."""
    pieces = parse_prompt_attention(text)
    ids = tokenizer([t for t, _ in pieces], truncation=False, add_special_tokens=False)["input_ids"]
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    for (piece, weight), piece_ids in zip(pieces, ids):
        if piece == "BREAK" and weight == -1:
            chunks.append(Chunk(tuple(tokens), tuple(weights)))
            tokens, weights = [], []
            continue
        for token in piece_ids:
            if len(tokens) == CHUNK_TOKENS:
                chunks.append(Chunk(tuple(tokens), tuple(weights)))
                tokens, weights = [], []
            tokens.append(token)
            weights.append(float(weight))
    if tokens or not chunks:
        chunks.append(Chunk(tuple(tokens), tuple(weights)))
    return chunks


def chunk_ids(tokenizer, chunk: Chunk) -> tuple[list[int], list[float]]:
    """The 77 ids the encoder sees (BOS, tokens, EOS, padding) and the 77 weights (1 outside the tokens)."""
    pad = CHUNK_TOKENS - len(chunk.tokens)
    ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
    return ids, [1.0, *chunk.weights, 1.0] + [1.0] * pad


def _encoders(pipe) -> list[tuple[object, object]]:
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]


def _is_sdxl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def _device(pipe, encoder) -> torch.device:
    return getattr(pipe, "_execution_device", None) or encoder.device


def encode_chunk(pipe, tokenizer, encoder, chunk: Chunk, clip_skip: int = 1):
    """One chunk through one encoder: ``(hidden (1, 77, width), pooled or None)``, weighted and rescaled to the
    unweighted chunk's mean."""
    layers = encoder.config.num_hidden_layers
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= layers:
        raise ConfigError(f"clip skip must be a whole number from 1 to {layers} for this model's text encoder, "
                          f"got {clip_skip!r}. Use 1 (no skip) or 2 (A1111's usual choice for anime models).")
    ids, weights = chunk_ids(tokenizer, chunk)
    device = _device(pipe, encoder)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):   # as diffusers: BOS, tokens and EOS, not padding
        mask = (torch.arange(len(ids), device=device) < len(chunk.tokens) + 2).long()[None]
    with torch.no_grad():
        out = encoder(torch.tensor([ids], device=device), attention_mask=mask, output_hidden_states=True)
        if _is_sdxl(pipe):
            hidden = out.hidden_states[-(clip_skip + 1)]
        elif clip_skip == 1:
            hidden = out.last_hidden_state
        else:
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-clip_skip])
    if any(w != 1.0 for w in weights):
        original_mean = hidden.mean()
        hidden = hidden * torch.tensor(weights, dtype=hidden.dtype, device=hidden.device)[None, :, None]
        hidden = hidden * (original_mean / hidden.mean())
    return hidden, getattr(out, "text_embeds", None)


def encode_weighted(pipe, text: str, clip_skip: int = 1, chunks: int = 0):
    """``text`` (no ``<lora:...>`` tags) as conditioning: ``(embeds (1, 77 * n, width), pooled or None)`` with
    at least ``chunks`` chunks (more are added as the empty prompt's chunk, as A1111 pads cond and uncond)."""
    encoders = _encoders(pipe)
    per_encoder = [chunk_prompt(tok, text) for tok, _ in encoders]
    count = max([chunks] + [len(c) for c in per_encoder])
    rows, pooled = [], None
    for index in range(count):
        parts = []
        for (tok, enc), encoder_chunks in zip(encoders, per_encoder):
            chunk = encoder_chunks[index] if index < len(encoder_chunks) else Chunk()
            hidden, chunk_pooled = encode_chunk(pipe, tok, enc, chunk, clip_skip)
            parts.append(hidden)
            if index == 0 and chunk_pooled is not None:
                pooled = chunk_pooled
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=1), pooled


def chunk_count(pipe, text: str) -> int:
    """How many 77-token chunks ``text`` takes (the most over the pipeline's tokenizers)."""
    return max(len(chunk_prompt(tok, text)) for tok, _ in _encoders(pipe))


def prompt_embeds(pipe, prompt: str, negative_prompt: str = "", clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """The pipeline keyword arguments for ``prompt`` and ``negative_prompt`` (``prompt_embeds``,
    ``negative_prompt_embeds`` and, for SDXL, the pooled pair), both with the same number of chunks. An empty
    negative prompt on SDXL gives zeros when the pipeline asks for that (``force_zeros_for_empty_prompt``),
    as A1111 and diffusers do."""
    embeds, pooled = encode_weighted(pipe, prompt, clip_skip, chunk_count(pipe, negative_prompt))
    chunks = embeds.shape[1] // (CHUNK_TOKENS + 2)
    negative, negative_pooled = encode_weighted(pipe, negative_prompt, clip_skip, chunks)
    if not negative_prompt and _is_sdxl(pipe) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative = torch.zeros_like(negative)
        negative_pooled = torch.zeros_like(negative_pooled) if negative_pooled is not None else None
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    if _is_sdxl(pipe):
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    return kwargs
