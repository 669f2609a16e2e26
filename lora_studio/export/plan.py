"""What every merged-checkpoint export shares, in memory or streamed: the mixer that holds the LoRAs and their
coefficients, what the output records of each LoRA, the output's metadata, and the result."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..configs.carried import CONFIGS_KEY
from ..family import Family
from ..fileio import read_safetensors_header
from ..mix import LoraMixer
from ..models import modelspec_prediction_type
from .lora_ops import file_sha256

FORMATS = ("single_file", "diffusers")
MERGE_INFO_FILE = "lora_studio_merge.json"  # what a diffusers-folder export records (its files have no header)
OVERFLOW_REMEDY = "Lower the LoRA strengths, or export in fp32/bf16 if fp16 overflowed"


@dataclass
class ExportResult:
    out: Path
    fmt: str
    dtype: str
    family: Family
    merged: list[dict] = field(default_factory=list)    # name, strength, sha256, modules per LoRA
    modules_changed: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def text(self) -> str:
        loras = ", ".join(f"{m['name']}:{m['strength']:g}" for m in self.merged) or "no LoRAs"
        return (f"wrote {self.out} ({self.fmt}, {self.dtype}, {self.family.label}, {self.bytes / 2**20:.1f} MiB) "
                f"in {self.seconds:.1f}s: merged {loras} into {self.modules_changed} layers")


def mixer_on(pipe, loras) -> LoraMixer:
    """A ``LoraMixer`` on ``pipe`` holding ``loras``: (path, strength[, te_strength]), or another mixer's entries (same
    LoRA files, strengths, text-encoder strengths and block weights; the files are not read again)."""
    mixer = LoraMixer(pipe)
    if isinstance(loras, LoraMixer):
        for e in loras.entries:
            mixer.add(e.lora, name=e.name, strength=e.strength, te_strength=e.te_strength,
                      block_weights=dict(e.block_weights))
    else:
        for path, strength, *te in loras:       # (path, strength) pairs or ``LoraArg``s
            mixer.add(path, strength=float(strength), te_strength=te[0] if te else None)
    return mixer


def merge_records(mixer: LoraMixer) -> list[dict]:
    """What a merged file records of each LoRA: file name, strengths, block weights, SHA-256, modules."""
    out = []
    for e in mixer.entries:
        rec = {"name": e.path.name if e.path else e.name, "strength": e.strength,
               "sha256": file_sha256(e.path) if e.path and e.path.is_file() else None, "modules": e.matched}
        if e.te_strength is not None:
            rec["te_strength"] = e.te_strength
        if e.block_weights:
            rec["block_weights"] = e.block_weights
        out.append(rec)
    return out


def base_metadata(source: Path | None) -> dict[str, str]:
    if source is None or source.suffix.lower() != ".safetensors" or not source.is_file():
        return {}

    return read_safetensors_header(source)[1]


def checkpoint_metadata(base_meta: dict[str, str], family: Family, title: str, records: list[dict],
                        dtype: str, base_name: str, prediction_type: str | None = None,
                        configs: dict[str, str] | None = None) -> dict[str, str]:
    """Base metadata + what was merged + model-spec keys for a merged checkpoint. ``prediction_type`` is the base
    pipeline's scheduler's (``"epsilon"``, ``"v_prediction"``), written as the model spec spells it (``"epsilon"``,
    ``"v"``), which ``models.load_base`` reads back. ``configs`` (``configs.carried``: the base's config files)
    are stored as ``lora_studio.configs`` so a model of any size loads back without a config folder."""
    res = family.default_resolution
    meta = {k: v for k, v in base_meta.items() if k != "modelspec.hash_sha256"}
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture.removesuffix("/lora"),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family is Family.SDXL else "https://github.com/Stability-AI/stablediffusion",
        "modelspec.title": title,
        "modelspec.resolution": meta.get("modelspec.resolution", f"{res}x{res}"),
        "modelspec.date": time.strftime("%Y-%m-%d"),
        "lora_studio.base_model": base_name,
        "lora_studio.merged_loras": json.dumps(records),
        "lora_studio.dtype": dtype,
    })
    if configs:
        meta[CONFIGS_KEY] = json.dumps(configs, sort_keys=True)
    if modelspec_prediction_type(prediction_type):
        meta["modelspec.prediction_type"] = modelspec_prediction_type(prediction_type)
    return meta
