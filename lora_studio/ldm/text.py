"""transformers CLIP text-encoder names -> the two original single-file text-encoder layouts.

* **HF-CLIP layout** (SD1 ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``):
  the transformers names under ``text_model.``. transformers 5.x ``CLIPTextModel`` dropped that level from its own
  names (``CLIPTextModelWithProjection`` kept it), so it is added back here. Real files also carry the
  ``embeddings.position_ids`` buffer (0..76), which we write too.
* **OpenCLIP layout** (SD2 ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``):
  ``token_embedding``, ``positional_embedding`` (a bare tensor), ``transformer.resblocks.N`` with ``ln_1``,
  a fused ``attn.in_proj_weight``/``in_proj_bias`` (q, k, v stacked on dim 0), ``attn.out_proj``, ``ln_2``,
  ``mlp.c_fc``, ``mlp.c_proj``; then ``ln_final``, ``text_projection`` stored as ``(width, embed_dim)`` (the
  transpose of the transformers ``Linear`` weight) and ``logit_scale``.

Written by hand (transformers/diffusers only ship the original -> transformers direction). The fused q/k/v is the
one place a new tensor is made; everything else is the encoder's own tensor under a new name.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch

SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

# The value trained OpenCLIP models end with (the logit scale is clamped at 100). It only scales image-text
# similarity logits and is never used to generate images; real single files carry it, so we write it.
OPENCLIP_LOGIT_SCALE = math.log(100.0)

_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
OPENCLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _strip_text_model(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str,
                max_positions: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF-CLIP layout: ``prefix + "text_model." + name``. A projection has no place in it (it is reported)."""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        inner = _strip_text_model(key)
        if inner.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
            out[prefix + "text_model." + inner] = tensor
        else:
            unmapped.append(key)
    pos = out.get(prefix + "text_model.embeddings.position_embedding.weight")
    n = max_positions or (pos.shape[0] if pos is not None else None)
    if n:
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    return out, unmapped


def openclip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str,
                    pad_to_layers: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenCLIP layout. ``pad_to_layers`` appends all-zero residual blocks (each is an exact identity: zero attention
    and zero MLP add nothing to the residual stream) so a file cut down by diffusers (SD2's text encoder lacks the
    24th block, which SD2 never uses because it reads the penultimate layer) loads strictly in other tools."""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    ref: torch.Tensor | None = None
    for key, tensor in state_dict.items():
        inner = _strip_text_model(key)
        if inner in OPENCLIP_FIXED:
            out[prefix + OPENCLIP_FIXED[inner]] = tensor
            ref = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T
        elif m := _LAYER.match(inner):
            layer, rest = int(m[1]), m[2]
            module, _, param = rest.rpartition(".")
            if module in _QKV:
                qkv.setdefault(layer, {})[f"{_QKV[module]}.{param}"] = tensor
            elif module in LAYER_PARTS:
                out[f"{prefix}transformer.resblocks.{layer}.{LAYER_PARTS[module]}.{param}"] = tensor
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    for layer, parts in sorted(qkv.items()):
        for param, suffix in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            pieces = [parts.get(f"{c}.{param}") for c in "qkv"]
            if any(p is None for p in pieces):
                unmapped += [f"encoder.layers.{layer}.self_attn.{c}_proj.{param} (q/k/v incomplete)" for c in "qkv"]
                continue
            out[f"{prefix}transformer.resblocks.{layer}.attn.{suffix}"] = torch.cat(pieces, dim=0)
    if ref is not None:
        out[prefix + "logit_scale"] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=ref.dtype, device=ref.device)
    if pad_to_layers is not None and qkv:
        _pad_layers(out, prefix, have=max(qkv) + 1, want=pad_to_layers)
    return out, unmapped


def _pad_layers(out: dict[str, torch.Tensor], prefix: str, have: int, want: int) -> None:
    last = f"{prefix}transformer.resblocks.{have - 1}."
    template = {k[len(last):]: v for k, v in out.items() if k.startswith(last)}
    for layer in range(have, want):
        for name, t in template.items():
            fill = torch.ones_like if name.startswith(("ln_1.weight", "ln_2.weight")) else torch.zeros_like
            out[f"{prefix}transformer.resblocks.{layer}.{name}"] = fill(t)
