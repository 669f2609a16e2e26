"""Where one diffusers parameter lives in the original single-file layout, without building the whole state dict.

``pipeline_to_ldm_state_dict`` renames a loaded pipeline; the streamed export (``lora_studio.export.stream``)
never loads one, so it asks here, name by name, which tensor of the checkpoint file a LoRA's target weight is.
Every answer is the same rename the state-dict functions make (a test checks the two agree on every weight of
tiny SD1, SD2 and SDXL pipelines); the one new case is a fused OpenCLIP ``in_proj_weight``, of which q, k and v
are each a third along dim 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..family import Family
from .text import (_LAYER, _QKV, LAYER_PARTS, OPENCLIP_FIXED, SD1_CLIP_PREFIX, SD2_OPENCLIP_PREFIX,
                   SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, _strip_text_model)
from .unet import PREFIX as UNET_PREFIX
from .unet import _layers_per_block, unet_key_to_ldm
from .vae import PREFIX as VAE_PREFIX
from .vae import vae_key_to_ldm


@dataclass(frozen=True)
class LdmLocation:
    """A diffusers parameter in the single file: the tensor ``key`` and, for one of OpenCLIP's fused q/k/v
    projections, which third of it (``part`` 0, 1 or 2 along dim 0; ``None`` means the whole tensor)."""

    key: str
    part: int | None = None


def _text_layout(family: Family, component: str) -> tuple[str, bool] | None:
    """(prefix, is_openclip) of a text encoder in ``family``'s single file."""
    if family is Family.SD1 and component == "text_encoder":
        return SD1_CLIP_PREFIX, False
    if family is Family.SD2 and component == "text_encoder":
        return SD2_OPENCLIP_PREFIX, True
    if family is Family.SDXL and component == "text_encoder":
        return SDXL_CLIP_PREFIX, False
    if family is Family.SDXL and component == "text_encoder_2":
        return SDXL_OPENCLIP_PREFIX, True
    return None


def _openclip_location(prefix: str, param: str) -> LdmLocation | None:
    inner = _strip_text_model(param)
    if inner in OPENCLIP_FIXED:
        return LdmLocation(prefix + OPENCLIP_FIXED[inner])
    m = _LAYER.match(inner)
    if not m:
        return None  # text_projection is stored transposed: not a plain location
    layer, rest = int(m[1]), m[2]
    module, _, kind = rest.rpartition(".")
    if module in _QKV:
        suffix = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        return LdmLocation(f"{prefix}transformer.resblocks.{layer}.attn.{suffix}", "qkv".index(_QKV[module]))
    if module in LAYER_PARTS:
        return LdmLocation(f"{prefix}transformer.resblocks.{layer}.{LAYER_PARTS[module]}.{kind}")
    return None


def ldm_location(family: Family, component: str, param: str, unet_config: Mapping | None = None,
                 vae_up_blocks: int | None = None) -> LdmLocation | None:
    """The single-file location of ``component``'s parameter ``param`` (``"unet"`` needs ``unet_config``, ``"vae"``
    the number of decoder up blocks); ``None`` when the layout has no plain place for it."""
    if component == "unet":
        with_attention = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
        key = unet_key_to_ldm(param, _layers_per_block(unet_config), with_attention)
        return LdmLocation(UNET_PREFIX + key) if key else None
    if component == "vae":
        key = vae_key_to_ldm(param, vae_up_blocks) if vae_up_blocks is not None else None
        return LdmLocation(VAE_PREFIX + key) if key else None
    layout = _text_layout(Family(family), component)
    if layout is None:
        return None
    prefix, openclip = layout
    if openclip:
        return _openclip_location(prefix, param)
    inner = _strip_text_model(param)
    if inner.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
        return LdmLocation(prefix + "text_model." + inner)
    return None
