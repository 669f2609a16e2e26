"""diffusers ``AutoencoderKL`` names -> original (ldm) ``first_stage_model.*`` names.

The ldm decoder numbers its up blocks in the opposite order (``up.0`` is the last, full-resolution
block), resnets are ``block.N`` and the mid block is ``block_1`` / ``attn_1`` / ``block_2``. The mid
attention in ldm is built from 1x1 convolutions (``q``, ``k``, ``v``, ``proj_out``), so its linear
weights get two trailing unit dimensions (a view of the same storage, not a copy).

Written by hand (diffusers only ships the ldm -> diffusers direction).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

PREFIX = "first_stage_model."

FIXED = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}

RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                "conv_shortcut": "nin_shortcut"}
ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

_ENC_RES = re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$")
_ENC_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$")
_DEC_RES = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$")
_DEC_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$")
_MID_RES = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)$")
_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


def vae_key_to_ldm(key: str, num_up_blocks: int) -> str | None:
    """One diffusers VAE parameter name -> its ldm name (without ``first_stage_model.``); ``None`` if unknown."""
    module, _, param = key.rpartition(".")
    if module in FIXED:
        return f"{FIXED[module]}.{param}"
    if (m := _ENC_RES.match(key)) and m[3] in RESNET_PARTS:
        return f"encoder.down.{m[1]}.block.{m[2]}.{RESNET_PARTS[m[3]]}.{m[4]}"
    if m := _ENC_DOWN.match(key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if (m := _DEC_RES.match(key)) and m[3] in RESNET_PARTS:
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{RESNET_PARTS[m[3]]}.{m[4]}"
    if m := _DEC_UP.match(key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if (m := _MID_RES.match(key)) and m[3] in RESNET_PARTS and int(m[2]) in (0, 1):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{RESNET_PARTS[m[3]]}.{m[4]}"
    if m := _MID_ATTN.match(key):
        return f"{m[1]}.mid.attn_1.{ATTENTION_PARTS[m[2]]}.{m[3]}"
    return None


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a diffusers VAE state dict to ldm names; mid-attention linear weights become 1x1-conv shaped views.

    Returns ``(renamed, unmapped_keys)``.
    """
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        new = vae_key_to_ldm(key, n_up)
        if new is None:
            unmapped.append(key)
            continue
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2 and ".norm." not in new:
            tensor = tensor[:, :, None, None]
        out[PREFIX + new] = tensor
    return out, unmapped
