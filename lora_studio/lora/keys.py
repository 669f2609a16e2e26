"""Key maps between kohya LoRA names, diffusers module names and original (ldm) checkpoint names.

Pure functions over strings; a name that cannot be mapped is reported by the caller, never dropped.
"""

from __future__ import annotations

# kohya prefixes per component. SD1/SD2 have one text encoder ("lora_te_"); SDXL has two ("lora_te1_", "lora_te2_").
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
TE1_PREFIX = "lora_te1_"
TE2_PREFIX = "lora_te2_"


def kohya_module_name(prefix: str, module_name: str) -> str:
    """``("lora_unet_", "down_blocks.0.attentions.0.proj_in")`` -> ``"lora_unet_down_blocks_0_attentions_0_proj_in"``.

    Text-encoder module names are written in the spelling real kohya files use
    (``text_model.encoder.layers...``), adding the ``text_model.`` level that
    transformers 5.x ``CLIPTextModel`` no longer has.
    """
    if prefix != UNET_PREFIX and module_name.startswith("encoder.layers."):
        module_name = "text_model." + module_name
    return prefix + module_name.replace(".", "_")
