"""Base-model families and how to tell them apart.

SD1.x conditions on 768-wide CLIP-L states, SD2.x on 1024-wide OpenCLIP-H states, SDXL on 2048-wide states
from two text encoders (CLIP-L 768 + OpenCLIP-bigG 1280). The demo model is SD1-structured at toy width.
"""

from __future__ import annotations

from enum import Enum

from .errors import FamilyMismatchError


class Family(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        return {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[self.value]

    @property
    def context_dim(self) -> int:
        return CONTEXT_DIMS[self]

    @property
    def modelspec_architecture(self) -> str:
        return {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-768-v/lora",
                "sdxl": "stable-diffusion-xl-v1-base/lora"}[self.value]

    @property
    def default_resolution(self) -> int:
        """The side, in pixels, the family's base models were trained at."""
        return {"sd1": 512, "sd2": 768, "sdxl": 1024}[self.value]

    @property
    def ss_base_model_version(self) -> str:
        return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[self.value]


CONTEXT_DIMS = {Family.SD1: 768, Family.SD2: 1024, Family.SDXL: 2048}


def family_from_context_dim(dim: int, has_second_text_encoder: bool = False) -> Family | None:
    """Map a cross-attention width to a family; SDXL is recognised by its second text encoder too."""
    if has_second_text_encoder or dim == 2048:
        return Family.SDXL
    if dim == 1024:
        return Family.SD2
    if dim == 768:
        return Family.SD1
    return None


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded diffusers pipeline. Toy pipelines (like the demo) count by structure: two text
    encoders make SDXL; otherwise SD2 when the width is 1024, else SD1."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return Family.SDXL
    dim = int(pipe.unet.config.cross_attention_dim)
    return family_from_context_dim(dim) or Family.SD1


def family_from_metadata(metadata: dict[str, str]) -> Family | None:
    """Read the family a file claims (kohya ``ss_base_model_version`` / ``modelspec.architecture``)."""
    text = " ".join([metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", ""),
                     metadata.get("ss_sd_model_name", "")]).lower()
    if not text.strip():
        return None
    if "xl" in text:
        return Family.SDXL
    if "v2" in text or "sd_2" in text or "2-1" in text or "v-2" in text:
        return Family.SD2
    if "v1" in text or "sd_1" in text or "1.5" in text or "1-5" in text:
        return Family.SD1
    return None


def require_same_family(what: str, got: Family, base: Family) -> None:
    if got != base:
        raise FamilyMismatchError(
            f"{what} is made for {got.label}, but the loaded base model is {base.label}. "
            f"Load a {got.label} base model, or pick a LoRA made for {base.label}.")
