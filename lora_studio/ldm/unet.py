"""diffusers ``UNet2DConditionModel`` names -> original (ldm) ``model.diffusion_model.*`` names.

The ldm UNet numbers its blocks flat: ``input_blocks.0`` is ``conv_in``; then, per down block, one
``input_blocks.N`` per resnet (``.0`` the resnet, ``.1`` its transformer if any) and one more for the
downsampler (``.0.op``). The middle block is resnet / transformer / resnet. ``output_blocks`` hold
``layers_per_block + 1`` resnets per up block, the upsampler sitting after the transformer (``.2.conv``)
or directly after the resnet (``.1.conv``). Transformer internals (``proj_in``, ``transformer_blocks.*``,
``attn1/attn2.to_q`` ...) have the same names on both sides; only the resnet parts are renamed.

Written by hand (diffusers only ships the opposite direction, ldm -> diffusers, in ``from_single_file``).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..errors import ExportError

PREFIX = "model.diffusion_model."

# diffusers resnet part -> ldm ResBlock part
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# whole-module renames outside the numbered blocks
FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's pooled-text + size conditioning ("text_time"); SD2-unCLIP-style class embeddings use the same slot
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}

_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_DOWNSAMPLE = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_UPSAMPLE = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$")


def _resnet(rest: str) -> str | None:
    part, _, tail = rest.partition(".")
    new = RESNET_PARTS.get(part)
    return f"{new}.{tail}" if new else None


def _join(head: str, rest: str | None) -> str | None:
    return f"{head}.{rest}" if rest is not None else None


def _layers_per_block(config: Mapping) -> int:
    lpb = config["layers_per_block"]
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ExportError(f"this UNet has layers_per_block={list(lpb)} (different per block); the original "
                              "single-file layout only describes UNets with the same count in every block.")
        lpb = lpb[0]
    return int(lpb)


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    """One diffusers UNet parameter name -> its ldm name (without the ``model.diffusion_model.`` prefix).

    ``None`` when the name has no ldm counterpart (the caller reports it).
    """
    module, _, param = key.rpartition(".")
    if module in FIXED:
        return f"{FIXED[module]}.{param}"
    n_down = layers_per_block + 1  # resnets + downsampler per down block
    n_up = layers_per_block + 1    # resnets per up block
    if m := _DOWN.match(key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + block * n_down + j
        return _join(f"input_blocks.{idx}.0", _resnet(rest)) if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := _DOWNSAMPLE.match(key):
        block, rest = int(m[1]), m[2]
        return f"input_blocks.{1 + block * n_down + layers_per_block}.0.op.{rest}"
    if m := _MID.match(key):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets" and j in (0, 1):
            return _join(f"middle_block.{2 * j}", _resnet(rest))
        if kind == "attentions" and j == 0:
            return f"middle_block.1.{rest}"
        return None
    if m := _UP.match(key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = block * n_up + j
        return _join(f"output_blocks.{idx}.0", _resnet(rest)) if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := _UPSAMPLE.match(key):
        block, rest = int(m[1]), m[2]
        slot = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{block * n_up + layers_per_block}.{slot}.conv.{rest}"
    return None


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a diffusers UNet state dict to ldm names (tensors are shared, not copied).

    Returns ``(renamed, unmapped_keys)``.
    """
    lpb = _layers_per_block(config)
    with_attention = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        new = unet_key_to_ldm(key, lpb, with_attention)
        if new is None:
            unmapped.append(key)
        else:
            out[PREFIX + new] = tensor
    return out, unmapped
