"""The original (ldm / CompVis / "single file") checkpoint layout that AUTOMATIC1111 and ComfyUI load.

``pipeline_to_ldm_state_dict(pipe)`` renames a diffusers Stable Diffusion (1.x / 2.x / XL) pipeline's weights
into that layout; ``detect_family_from_ldm_keys`` tells the family of such a file. The per-component maps live
in ``unet.py``, ``vae.py`` and ``text.py`` as pure functions over names. Loading goes the other way through
diffusers' own ``from_single_file`` (see ``lora_studio.models``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import ExportError
from ..family import Family, family_of_pipeline
from .detect import detect_family_from_ldm_keys
from .text import (SD1_CLIP_PREFIX, SD2_OPENCLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, clip_to_ldm,
                   openclip_to_ldm)
from .unet import unet_to_ldm
from .vae import vae_to_ldm

__all__ = ["pipeline_to_ldm_state_dict", "detect_family_from_ldm_keys", "SD2_FULL_TEXT_LAYERS"]

# The SD2 OpenCLIP-H text tower has 24 blocks; diffusers keeps 23 (SD2 reads the penultimate layer).
SD2_FULL_TEXT_LAYERS = 24


def _merge(into: dict[str, torch.Tensor], part: Mapping[str, torch.Tensor], unmapped: list[str],
           part_unmapped: list[str], component: str) -> None:
    unmapped.extend(f"{component}: {k}" for k in part_unmapped)
    clash = into.keys() & part.keys()
    if clash:
        unmapped.extend(f"{component}: {k} (maps onto a name already used)" for k in sorted(clash))
    into.update(part)


def _is_cut_sd2_text_encoder(te) -> bool:
    cfg = te.config
    return int(cfg.num_hidden_layers) == SD2_FULL_TEXT_LAYERS - 1 and int(cfg.hidden_size) == 1024


def pipeline_to_ldm_state_dict(pipe, family: Family | None = None, *,
                               pad_sd2_text_encoder: bool = True) -> dict[str, torch.Tensor]:
    """All weights of ``pipe`` under original single-file names, ready for ``save_safetensors_atomic``.

    Tensors are the pipeline's own (renamed, not copied), so holding the result costs almost no memory; the
    exceptions are the OpenCLIP fused q/k/v projections and a few small constants. Keep the pipeline
    unchanged until the dict is written. ``family`` defaults to ``family_of_pipeline(pipe)``.

    For a real SD2 pipeline (23-block text encoder, 1024 wide) the 24th OpenCLIP block is written as an exact
    identity and ``text_projection`` as the identity matrix (unless ``pad_sd2_text_encoder=False``), so the file
    has every tensor A1111/ComfyUI expect; neither is used to generate images (SD2 reads the penultimate layer)
    and diffusers drops both when loading the file back.

    Raises ``ExportError`` listing every weight that has no place in the layout (e.g. LoRA layers still
    injected: merge or unload them first).
    """
    family = family or family_of_pipeline(pipe)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    part, bad = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    _merge(out, part, unmapped, bad, "unet")
    part, bad = vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    _merge(out, part, unmapped, bad, "vae")

    if family is Family.SD1:
        part, bad = clip_to_ldm(pipe.text_encoder.state_dict(), SD1_CLIP_PREFIX)
        _merge(out, part, unmapped, bad, "text_encoder")
    elif family is Family.SD2:
        te = pipe.text_encoder
        pad = SD2_FULL_TEXT_LAYERS if pad_sd2_text_encoder and _is_cut_sd2_text_encoder(te) else None
        part, bad = openclip_to_ldm(te.state_dict(), SD2_OPENCLIP_PREFIX, pad_to_layers=pad)
        if pad and SD2_OPENCLIP_PREFIX + "text_projection" not in part:
            ref = part[SD2_OPENCLIP_PREFIX + "positional_embedding"]
            part[SD2_OPENCLIP_PREFIX + "text_projection"] = torch.eye(ref.shape[1], dtype=ref.dtype, device=ref.device)
        _merge(out, part, unmapped, bad, "text_encoder")
    elif family is Family.SDXL:
        if getattr(pipe, "text_encoder_2", None) is None:
            raise ExportError("this SDXL pipeline has no second text encoder (text_encoder_2), so it cannot be "
                              "written as an SDXL single file. Load the full SDXL base model.")
        part, bad = clip_to_ldm(pipe.text_encoder.state_dict(), SDXL_CLIP_PREFIX)
        _merge(out, part, unmapped, bad, "text_encoder")
        part, bad = openclip_to_ldm(pipe.text_encoder_2.state_dict(), SDXL_OPENCLIP_PREFIX)
        _merge(out, part, unmapped, bad, "text_encoder_2")
    else:  # pragma: no cover - Family has three members
        raise ExportError(f"unknown family {family!r}")

    if unmapped:
        shown = "\n  ".join(unmapped[:20]) + (f"\n  ... and {len(unmapped) - 20} more" if len(unmapped) > 20 else "")
        raise ExportError(f"{len(unmapped)} weight(s) of this {family.label} pipeline have no place in the original "
                          f"single-file layout:\n  {shown}\nIf LoRA layers are still injected, merge or unload "
                          "them first; other extra modules cannot be exported to this layout.")
    return out
