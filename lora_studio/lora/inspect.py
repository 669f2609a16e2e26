"""Describe one LoRA file: metadata, family, kinds, rank/alpha per module, what it touches, trigger words.

``inspect_lora(path)`` never changes anything and needs no model. Files the mixer refuses (another model
family, the cloneofsimo format) still get their header, tensor counts and metadata, with the reason in
``problem``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FamilyMismatchError, LoraFormatError
from ..family import Family
from ..fileio import read_safetensors_header
from .formats import read_lora
from .kinds import LABELS
from .keys import component_of_kohya_name

COMPONENT_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}
CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")


@dataclass
class ModuleInfo:
    name: str
    component: str
    block: str
    kind: str
    rank: int
    alpha: float | None


@dataclass
class LoraInfo:
    path: Path
    size_bytes: int
    tensor_count: int
    dtypes: dict[str, int]
    metadata: dict[str, str]
    format: str | None = None
    family: Family | None = None
    kinds: list[str] = field(default_factory=list)
    modules: list[ModuleInfo] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)
    trigger_words: list[str] = field(default_factory=list)
    top_tags: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def rank_alpha(self) -> Counter:
        """How many modules have each (kind, rank, alpha)."""
        return Counter((m.kind, m.rank, m.alpha) for m in self.modules)


def block_of_kohya_name(name: str) -> str:
    """``lora_unet_down_blocks_1_...`` -> "down.1"; ldm names -> "input.4"/"middle"/"output.3"; TE -> "layer 5"."""
    rest = re.sub(r"^lora_(unet|te[12]?)_", "", name)
    for pattern, label in ((r"down_blocks_(\d+)", "down.{}"), (r"up_blocks_(\d+)", "up.{}"), (r"mid_block", "mid"),
                           (r"input_blocks_(\d+)", "input.{}"), (r"output_blocks_(\d+)", "output.{}"),
                           (r"middle_block", "middle"), (r"(?:encoder_)?layers_(\d+)", "layer {}")):
        m = re.match(r"(?:text_model_)?" + pattern, rest)
        if m:
            return label.format(*m.groups())
    return "other"


def _tags(metadata: dict[str, str]) -> tuple[list[str], list[tuple[str, int]]]:
    """Trigger words (modelspec, kohya folder names ``N_words``, training comment) and the top caption tags."""
    triggers: list[str] = []
    if metadata.get("modelspec.trigger_phrase"):
        triggers.append(metadata["modelspec.trigger_phrase"])
    tags: Counter = Counter()
    try:
        freq = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        freq = {}
    for folder, counts in (freq.items() if isinstance(freq, dict) else []):
        m = re.match(r"^\d+_(.+)$", str(folder))
        if m and m.group(1) not in triggers:
            triggers.append(m.group(1))
        if isinstance(counts, dict):
            tags.update({str(k).strip(): int(v) for k, v in counts.items() if isinstance(v, (int, float))})
    comment = metadata.get("ss_training_comment", "")
    m = re.search(r"trigger(?: word| words| phrase)?s?\s*(?:is|are|:)\s*(.+)", comment, re.IGNORECASE)
    if m:
        triggers.append(m.group(1).strip())
    return triggers, tags.most_common(10)


def inspect_lora(path: str | os.PathLike) -> LoraInfo:
    p = Path(path)
    header, metadata = read_safetensors_header(p)
    dtypes = Counter(info["dtype"] for info in header.values())
    info = LoraInfo(p, p.stat().st_size, len(header), dict(dtypes), dict(metadata))
    info.trigger_words, info.top_tags = _tags(metadata)
    try:
        lf = read_lora(p)
    except (LoraFormatError, FamilyMismatchError) as err:
        info.problem = str(err)
        return info
    info.format, info.family, info.kinds, info.notes = lf.format, lf.family, lf.kinds, list(lf.notes)
    groups: Counter = Counter()
    for name, mod in lf.modules.items():
        comp = component_of_kohya_name(name) or "?"
        block = block_of_kohya_name(name)
        kind = LABELS.get(mod.kind, mod.kind) + ("+DoRA" if "dora_scale" in mod.tensors else "")
        info.modules.append(ModuleInfo(name, comp, block, kind, mod.rank, mod.alpha))
        groups[f"{COMPONENT_LABELS.get(comp, comp)} {block}"] += 1
    natural = lambda kv: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", kv[0])]
    info.groups = dict(sorted(groups.items(), key=natural))
    return info


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """True for a full model file (original layout) rather than a LoRA."""
    header, _ = read_safetensors_header(path)
    return any(k.startswith(CHECKPOINT_MARKERS) for k in header) and not any("lora" in k for k in header)


def format_lora_info(info: LoraInfo, all_modules: bool = False) -> str:
    mb = info.size_bytes / 1e6
    dt = ", ".join(f"{k} x{v}" for k, v in sorted(info.dtypes.items()))
    lines = [f"File:     {info.path.name} ({mb:.2f} MB, {info.tensor_count} tensors: {dt})"]
    if info.problem:
        lines.append(f"Problem:  {info.problem}")
    else:
        lines += [f"Format:   {info.format}",
                  f"Family:   {info.family.label if info.family else 'unknown (neither shapes nor metadata tell)'}",
                  f"Kind:     {', '.join(info.kinds)}",
                  f"Modules:  {len(info.modules)}"]
        lines += [f"Note:     {n}" for n in info.notes]
        lines.append("Rank / alpha:")
        for (kind, rank, alpha), n in sorted(info.rank_alpha.items(), key=lambda kv: -kv[1]):
            a = "none (= rank)" if alpha is None else f"{alpha:g}"
            r = "-" if rank == 0 else str(rank)
            lines.append(f"  {kind:<10} rank {r:<4} alpha {a:<14} {n} modules")
        lines.append("Touches:")
        lines += [f"  {g:<28} {n} modules" for g, n in info.groups.items()]
    if info.trigger_words:
        lines.append(f"Trigger words: {'; '.join(info.trigger_words)}")
    if info.top_tags:
        lines.append("Top tags: " + ", ".join(f"{t} ({n})" for t, n in info.top_tags))
    keys = [k for k in sorted(info.metadata) if k.startswith(("ss_", "modelspec.")) and k != "ss_tag_frequency"]
    if keys:
        lines.append("Metadata:")
        for k in keys:
            v = info.metadata[k]
            lines.append(f"  {k} = {v if len(v) <= 100 else v[:97] + '...'}")
    other = [k for k in sorted(info.metadata) if not k.startswith(("ss_", "modelspec.", "sshs_"))]
    if other:
        lines.append(f"Other metadata keys: {', '.join(other[:20])}{' ...' if len(other) > 20 else ''}")
    if all_modules and info.modules:
        lines.append("All modules:")
        for m in info.modules:
            a = "-" if m.alpha is None else f"{m.alpha:g}"
            lines.append(f"  {m.name}  {m.kind} rank {m.rank or '-'} alpha {a}")
    return "\n".join(lines)
