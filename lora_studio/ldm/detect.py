"""Tell SD1 / SD2 / SDXL apart from the names and shapes of an original-layout (ldm) single-file checkpoint.

The text-encoder prefix names the family (SDXL ``conditioner.embedders.1``, SD2 ``cond_stage_model.model.``,
SD1 ``cond_stage_model.transformer.``); the UNet's cross-attention width (the input width of ``attn2.to_k``)
must agree with it (768 / 1024 / 2048) and with the width of the text encoder(s). Toy models (like the demo)
have other widths; they are accepted by structure as long as UNet and text encoder agree.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import InputFileError
from ..family import CONTEXT_DIMS, Family
from .text import SD1_CLIP_PREFIX, SD2_OPENCLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX
from .unet import PREFIX as UNET_PREFIX

SUPPORTED = "SD 1.x, SD 2.x and SDXL base text-to-image checkpoints"


def _shape(value: Any) -> tuple[int, ...]:
    if hasattr(value, "shape"):
        return tuple(int(d) for d in value.shape)
    if isinstance(value, Mapping):  # a safetensors header entry
        return tuple(int(d) for d in value["shape"])
    return tuple(int(d) for d in value)


def _what_else(keys: list[str]) -> str:
    """A hint for files that are not full SD checkpoints."""
    if any(k.startswith(("lora_", "lycoris_")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return " It looks like a LoRA: load it as a LoRA, not as a base model."
    if any(k.startswith(("double_blocks.", "joint_blocks.", "model.diffusion_model.double_blocks.",
                         "model.diffusion_model.joint_blocks.")) for k in keys):
        return " It looks like a Flux or SD3 model, which LoRA Studio does not support."
    if any(k.startswith(("down_blocks.", "unet.", "mid_block.")) for k in keys):
        return (" It looks like a diffusers-format component; give the diffusers folder (the one with "
                "model_index.json) instead.")
    if keys and all(k.startswith(("encoder.", "decoder.", "first_stage_model.", "quant_conv", "post_quant_conv"))
                    for k in keys):
        return " It looks like a VAE on its own, not a full checkpoint."
    return ""


def detect_family_from_ldm_keys(keys_and_shapes: Mapping[str, Any], source: str = "this checkpoint") -> Family:
    """The family of an ldm single-file checkpoint, from its tensor names and shapes.

    ``keys_and_shapes`` maps tensor names to shapes, tensors, or safetensors header entries.
    Raises ``InputFileError`` naming what was found when the file is not one of the supported families.
    """
    shapes = {k: _shape(v) for k, v in keys_and_shapes.items() if not k.startswith("__")}
    keys = list(shapes)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise InputFileError(f"{source} is not an original-layout Stable Diffusion checkpoint: it has no "
                             f"model.diffusion_model.* UNet weights ({len(keys)} tensors).{_what_else(keys)} "
                             f"LoRA Studio loads {SUPPORTED}.")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(conv_in[1], "not a text-to-image model")
        raise InputFileError(f"{source} has a UNet with {conv_in[1]} input channels: it is {kind}. "
                             f"LoRA Studio trains and exports on {SUPPORTED} (4 input channels); "
                             "use the matching base model instead.")

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1."):
        family = Family.SDXL
        te1 = shapes.get(SDXL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight")
        te2 = shapes.get(SDXL_OPENCLIP_PREFIX + "token_embedding.weight")
        text_width = te1[1] + te2[1] if te1 and te2 else None
    elif has("conditioner.embedders.0.model."):
        raise InputFileError(f"{source} looks like an SDXL *refiner* (one OpenCLIP text encoder under "
                             f"conditioner.embedders.0). LoRA Studio loads {SUPPORTED}; use the SDXL base model.")
    elif has(SD2_OPENCLIP_PREFIX):
        family = Family.SD2
        te = shapes.get(SD2_OPENCLIP_PREFIX + "token_embedding.weight")
        text_width = te[1] if te else None
    elif has(SD1_CLIP_PREFIX):
        family = Family.SD1
        te = shapes.get(SD1_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight")
        text_width = te[1] if te else None
    else:
        raise InputFileError(f"{source} has UNet weights but no text encoder in a known layout "
                             "(cond_stage_model.transformer., cond_stage_model.model. or conditioner.embedders.). "
                             f"LoRA Studio loads {SUPPORTED} that include their text encoder(s).")

    to_k = sorted(k for k in keys if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise InputFileError(f"{source} has no cross-attention (attn2) layers in its UNet, so it is not a "
                             f"text-conditioned Stable Diffusion model. LoRA Studio loads {SUPPORTED}.")
    width = shapes[to_k[0]][-1]
    expected = CONTEXT_DIMS[family]
    if width in CONTEXT_DIMS.values() and width != expected:
        raise InputFileError(f"{source} has a {family.label} text encoder layout but its UNet cross-attention is "
                             f"{width} wide ({family.label} uses {expected}). The file mixes families or is damaged.")
    if text_width is not None and text_width != width:
        raise InputFileError(f"{source}: the text encoder(s) produce {text_width}-wide states but the UNet "
                             f"cross-attention expects {width}. The file mixes parts of different models.")
    if family is Family.SDXL and not has(UNET_PREFIX + "label_emb."):
        raise InputFileError(f"{source} has SDXL text encoders but its UNet lacks the size/pooled-text embedding "
                             f"(model.diffusion_model.label_emb.*). It is not an SDXL base model.")
    return family
