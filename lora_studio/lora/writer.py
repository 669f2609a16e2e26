"""Write kohya/Civitai LoRA files: the one writer every producer (trainer, resize, merge, extract) uses.

kohya's layout is written by hand on purpose: diffusers' ``convert_state_dict_to_kohya`` writes SD1
text-encoder keys as ``lora_te1_`` and drops ``lora_alpha``.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from ..fileio import save_safetensors_atomic, tensor_data_sha256
from ..finite import refuse_nonfinite
from .formats import LoraModule


def _kohya_tensors(modules: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    """Modules flattened to kohya keys: ``<name>.<suffix>`` for each tensor plus a scalar fp32 ``<name>.alpha``."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        for suffix, t in mod.tensors.items():
            out[f"{name}.{suffix}"] = t.detach()
        alpha = mod.alpha if mod.alpha is not None else float(mod.rank)
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def save_kohya_lora(modules: Mapping[str, LoraModule], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
                    hashes: bool = False) -> None:
    """Write a kohya/Civitai LoRA (atomically). Metadata values are stored as strings. ``hashes`` adds kohya's
    ``sshs_model_hash`` and ``modelspec.hash_sha256`` (``0x`` + the same): the SHA-256 of the file's tensor data,
    A1111's "addnet" hash, which does not change when the metadata does.

    Raises ``ExportError`` naming the key, and writes nothing, when a tensor is NaN/inf in ``dtype``. Checked
    here, after the cast, for every producer (trainer, merge, resize, extract): values finite in fp32 (an alpha
    of 3e38, strength-scaled factors) can overflow fp16, and every reader refuses a file with inf in it."""
    raw = _kohya_tensors(modules)
    sd = {k: t.to(dtype) for k, t in raw.items()} if dtype is not None else raw
    refuse_nonfinite(sd.items(), str(path), "Write the LoRA as fp32 or bf16 (which has fp32's range), or lower "
                     "the strengths", raw)
    if hashes:
        digest = tensor_data_sha256(sd)
        metadata = {**(metadata or {}), "sshs_model_hash": digest, "modelspec.hash_sha256": "0x" + digest}
    save_safetensors_atomic(sd, path, metadata)


def kohya_metadata(*, family, rank: int, alpha: float, title: str, resolution: int | tuple[int, int],
                   network_module: str = "networks.lora", num_train_images: int | None = None,
                   tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
                   extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` keys that A1111, ComfyUI and Civitai read, for a file we write."""
    res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    meta: dict[str, str] = {
        "ss_network_module": network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": family.ss_base_model_version,
        "ss_v2": str(family.value == "sd2"),
        "ss_resolution": f"({res[0]}, {res[1]})",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{res[0]}x{res[1]}",
    }
    if num_train_images is not None:
        meta["ss_num_train_images"] = str(num_train_images)
    if tag_frequency is not None:
        meta["ss_tag_frequency"] = json.dumps(tag_frequency)
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


# =========================================================================== reading
