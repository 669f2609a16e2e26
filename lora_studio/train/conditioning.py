"""What the UNet is conditioned on: text-encoder states (SD 1/2), plus pooled text and size/crop ids (SDXL).

SDXL conditioning follows diffusers' ``StableDiffusionXLPipeline.encode_prompt``: the penultimate hidden states
of both encoders side by side, the second encoder's projected pooled output, and ``time_ids`` =
(original height, width, crop top, crop left, target height, width).
"""

from __future__ import annotations

import torch

from .cache import TextCache, encode_prompts
from .dataset import ImageItem
from .images import crop_top_left


def _ids(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_sdxl(pipe, captions: list[str], device, te1=None, te2=None) -> tuple[torch.Tensor, torch.Tensor]:
    te1, te2 = te1 or pipe.text_encoder, te2 or pipe.text_encoder_2
    h1 = te1(_ids(pipe.tokenizer, captions, device), output_hidden_states=True).hidden_states[-2]
    out2 = te2(_ids(pipe.tokenizer_2, captions, device), output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def sdxl_time_ids(items: list[ImageItem]) -> torch.Tensor:
    rows = []
    for it in items:
        top, left = crop_top_left(it.size, it.bucket)
        rows.append([it.size[1], it.size[0], top, left, it.bucket[1], it.bucket[0]])
    return torch.tensor(rows, dtype=torch.float32)


class Conditioner:
    """``cond(captions, items) -> (encoder_hidden_states, added_cond_kwargs or None)``.

    With frozen text encoders the outputs are cached per caption; trained encoders (possibly wrapped by
    accelerate, passed as ``encoders``) run with gradients every step.
    """

    def __init__(self, pipe, device, sdxl: bool, trained: bool, cache: bool, encoders: tuple = ()) -> None:
        self.pipe, self.device, self.sdxl, self.trained = pipe, device, sdxl, trained
        self.encoders = encoders or ((pipe.text_encoder, pipe.text_encoder_2) if sdxl else (pipe.text_encoder,))
        self.cache = TextCache(self._encode, enabled=cache and not trained)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        if self.sdxl:
            return encode_sdxl(self.pipe, captions, self.device, *self.encoders)
        return (encode_prompts(self.pipe.tokenizer, self.encoders[0], captions, self.device),)

    def precompute(self, captions: list[str], chunk: int = 32) -> bool:
        """Cache the states of ``captions`` now. True when the cache is in use (frozen encoders, caching on),
        i.e. when every step that only sees these captions runs no text encoder."""
        self.cache.fill(captions, chunk)
        return self.cache.enabled

    def __call__(self, captions: list[str], items: list[ImageItem]) -> tuple[torch.Tensor, dict | None]:
        outs = self._encode(captions) if self.trained else self.cache.get(captions)
        if not self.sdxl:
            return outs[0], None
        states, pooled = outs
        return states, {"text_embeds": pooled, "time_ids": sdxl_time_ids(items).to(self.device, states.dtype)}
