"""LoRA files in, one kohya LoRA file out: merge several, resize one.

The rank math is in ``lora_studio.lora.rank``; this module reads files, groups modules, writes the result with
kohya metadata and reports per-module ranks and energies. Extraction is ``extract``; merged checkpoints are
``checkpoint``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError, LoraFormatError
from ..family import Family
from ..fileio import file_sha256
from ..lora.formats import read_lora
from ..lora.keys import canonical_kohya_name
from ..lora.math import natural_shape
from ..lora.module import LoraModule
from ..lora.rank import ResizeStat, check_method, concat_merge, resize_module, summarize, svd_merge
from ..lora.writer import kohya_metadata, save_kohya_lora
from ..progress import ProgressCallback, report

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# metadata a changed file must not carry over: hashes of the old weights, and LyCORIS settings of the old layout
STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "ss_network_args", "ss_network_dropout")


@dataclass
class ResizeReport:
    """What a resize / merge / extraction wrote: the file, per-module stats and a summary."""

    out: Path
    stats: list[ResizeStat] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    kind: str = "resize"
    notes: list[str] = field(default_factory=list)  # what was not carried over, and why

    def text(self, limit: int = 12) -> str:
        lines = [f"{self.kind}: wrote {self.out}"]
        if self.stats:
            lines.append(f"{'module':64s} {'rank':>9s} {'energy':>7s}")
            shown = sorted(self.stats, key=lambda s: s.energy_kept)[:limit] if len(self.stats) > limit else self.stats
            for st in shown:
                name = st.name[5:] if st.name.startswith("lora_") else st.name
                name = name if len(name) <= 64 else "..." + name[-61:]
                lines.append(f"{name:64s} {st.old_rank:>4d}->{st.new_rank:<4d} {st.energy_kept:7.4f}")
            if len(self.stats) > limit:
                lines.append(f"... ({len(self.stats) - limit} more; the {limit} lowest energies are shown)")
        s = self.summary
        if "new_rank_min" in s:
            lines.append(f"{int(s['modules'])} modules, rank {int(s['new_rank_min'])}..{int(s['new_rank_max'])} "
                         f"(mean {s['new_rank_mean']:.1f}), energy kept: worst {s['energy_kept_min']:.4f}, "
                         f"overall {s['energy_kept_overall']:.4f}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is unknown; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


# --------------------------------------------------------------------------- reading
def read_modules(path: str | os.PathLike, notes: list[str] | None = None):
    """``(modules, metadata, family)`` of a LoRA file, through ``lora.formats.read_lora``. Token embeddings
    some files carry are not LoRA modules: they are left out and said so in ``notes``.

    DoRA modules are refused: their delta depends on the base weight, which these file-only operations lack.
    """
    lf = read_lora(path)
    if lf.embeddings and notes is not None:
        notes.append(f"{Path(path).name}: token embeddings {', '.join(lf.embeddings)} are not LoRA modules and "
                     "were not written; keep the original file for them.")
    modules = {canonical_kohya_name(k): v for k, v in lf.modules.items()}
    for mod in modules.values():
        _conv_shape_hint(mod)
    dora = [k for k, m in modules.items() if "dora_scale" in m.tensors]
    if dora:
        raise LoraFormatError(f"{path} is a DoRA file ({len(dora)} modules carry dora_scale, e.g. {dora[0]}); "
                              "its delta depends on the base weights, so it cannot be resized or merged "
                              "without the base. Merge it into a checkpoint with `export` instead.")
    return modules, dict(lf.metadata or {}), lf.family


# UNet layers that are 3x3 convs in every SD family (conv_shortcut and SD1's proj_in/proj_out are 1x1)
_CONV3 = re.compile(r"_(conv1|conv2|conv_in|conv_out|downsamplers_0_conv|upsamplers_0_conv|op)$")


def _conv_shape_hint(mod: LoraModule) -> None:
    """LoHa/LoKr store a non-Tucker conv delta flattened to (out, in*3*3); without the base model the kernel
    size is unknown, so take it from the layer name (SD's 3x3 convs) and record it in ``extra["weight_shape"]``
    for the rank math, which then writes a proper LoCon (down (r, in, 3, 3)). A wrong guess cannot pass
    silently: the element count must divide by 9."""
    if not mod.spec.flattens_convs or "weight_shape" in mod.extra:
        return
    shape = natural_shape(mod)
    if len(shape) == 2 and mod.name.startswith("lora_unet_") and _CONV3.search(mod.name) and shape[1] % 9 == 0:
        mod.extra["weight_shape"] = (shape[0], shape[1] // 9, 3, 3)


def family_of(families: Sequence[Family | None], notes: list[str]) -> Family:
    """The family the files' reader found (``lora.formats``: shapes first, then metadata); when it could not
    tell (toy models), SD 1.x, said in ``notes``. The callers refuse a mix of families first."""
    known = {f for f in families if f is not None}
    if not known:
        notes.append("the base-model family could not be told from the files; written as SD 1.x.")
        return Family.SD1
    return known.pop()


def _resolution(metadata: dict[str, str], family: Family) -> tuple[int, int]:
    raw = metadata.get("ss_resolution", "")
    try:
        nums = [int(x) for x in raw.strip("()[] ").replace("x", ",").split(",") if x.strip()]
        if len(nums) == 2:
            return nums[0], nums[1]
    except ValueError:
        pass
    r = family.default_resolution
    return r, r


def out_metadata(source: dict[str, str], family: Family, out: Path, modules: dict[str, LoraModule],
                  extra: dict[str, object]) -> dict[str, str]:
    """The source's metadata minus stale keys, with dims/alpha/module/modelspec updated for what is written."""
    ranks = [m.rank for m in modules.values()]
    alphas = [m.alpha if m.alpha is not None else m.rank for m in modules.values()]
    top = max(ranks) if ranks else 0
    top_alpha = max((a for a, r in zip(alphas, ranks) if r == top), default=0.0)
    meta = {k: v for k, v in source.items() if k not in STALE_KEYS}
    meta.update(kohya_metadata(family=family, rank=top, alpha=float(top_alpha), title=out.stem,
                               resolution=_resolution(source, family), extra=extra))
    if len(set(ranks)) > 1:
        meta["ss_network_dim_per_module"] = "dynamic"  # ranks differ per module; ss_network_dim is the largest
    return meta


# --------------------------------------------------------------------------- operations
def merge_loras(paths_with_strengths: Sequence[tuple[str | os.PathLike, float]], out: str | os.PathLike,
                method: str = "concat", rank_method: str = "energy", value: float = 0.99,
                dtype: str | None = None, progress: ProgressCallback | None = None) -> ResizeReport:
    """Merge LoRAs at strengths into one kohya LoRA.

    ``method="concat"`` stacks ranks: exact (delta = sum of strength * delta), rank = sum of ranks.
    ``method="svd"`` takes the best approximation of that sum at the rank ``rank_method``/``value`` chooses
    (fixed/ratio/energy), per module. The header lists the merged files with strengths and sha256.
    """
    if method not in ("concat", "svd"):
        raise ConfigError(f"merge method {method!r} is unknown; use 'concat' (exact) or 'svd' (smaller).")
    if method == "svd":
        check_method(rank_method, value)
    if not paths_with_strengths:
        raise ConfigError("nothing to merge: give at least one LoRA file.")
    out = Path(out)
    groups: dict[str, list[tuple[LoraModule, float]]] = {}
    families, sources, first_meta, notes = [], [], None, []
    for path, strength in paths_with_strengths:
        modules, meta, fam = read_modules(path, notes)
        first_meta = meta if first_meta is None else first_meta
        families.append(fam)
        sources.append({"name": Path(path).name, "strength": float(strength), "sha256": file_sha256(path)})
        for name, mod in modules.items():
            groups.setdefault(name, []).append((mod, float(strength)))
    known = {f for f in families if f is not None}
    if len(known) > 1:
        raise LoraFormatError("cannot merge LoRAs made for different base models: "
                              + ", ".join(f"{s['name']} is {f.label if f else 'unknown'}"
                                          for s, f in zip(sources, families)) + ". Merge LoRAs of one family.")
    merged: dict[str, LoraModule] = {}
    stats: list[ResizeStat] = []
    for i, (name, items) in enumerate(sorted(groups.items()), 1):
        if method == "concat":
            merged[name] = concat_merge(items)
        else:
            merged[name], st = svd_merge(items, rank_method, value)
            stats.append(st)
        report(progress, "merge", i, len(groups), name)
    family = family_of(families, notes)
    extra: dict[str, object] = {"lora_studio.merged_from": sources, "lora_studio.merge_method": method}
    if method == "svd":
        extra["lora_studio.rank_rule"] = {"method": rank_method, "value": value}
    meta = out_metadata(first_meta or {}, family, out, merged, extra)
    save_kohya_lora(merged, out, meta, parse_dtype(dtype))  # refuses NaN/inf after the cast
    return ResizeReport(out, stats, summarize(stats) if stats else {"modules": len(merged)}, kind="merge",
                        notes=notes)


def resize_lora(path: str | os.PathLike, out: str | os.PathLike, method: str, value: float,
                dtype: str | None = None, progress: ProgressCallback | None = None) -> ResizeReport:
    """Resize every module of a LoRA by SVD (rank per module by fixed rank / ratio / energy) and write it in
    kohya format. LoHa/LoKr modules become classic LoRA modules. The source's metadata is kept, with
    ``ss_network_dim``/``ss_network_alpha`` set to the largest new rank and its alpha, and stale hashes dropped.
    The output keeps the source's dtype unless ``dtype`` is given."""
    check_method(method, value)
    out = Path(out)
    if out.resolve() == Path(path).resolve():
        raise ConfigError(f"--out {out} is the input file; choose another name so the original stays.")
    notes: list[str] = []
    modules, meta, fam = read_modules(path, notes)
    if not modules:
        raise LoraFormatError(f"{path} holds no LoRA modules.")
    src_dtype = next(iter(next(iter(modules.values())).tensors.values())).dtype
    new: dict[str, LoraModule] = {}
    stats: list[ResizeStat] = []
    for i, (name, mod) in enumerate(sorted(modules.items()), 1):
        new[name], st = resize_module(mod, method, value)
        stats.append(st)
        report(progress, "resize", i, len(modules), name, energy=st.energy_kept)
    summary = summarize(stats)
    extra = {"lora_studio.resized_from": {"name": Path(path).name, "sha256": file_sha256(path)},
             "lora_studio.rank_rule": {"method": method, "value": value},
             "lora_studio.resize_summary": summary}
    out_meta = out_metadata(meta, family_of([fam], notes), out, new, extra)
    save_kohya_lora(new, out, out_meta, parse_dtype(dtype) or (src_dtype if src_dtype.is_floating_point else None))
    return ResizeReport(out, stats, summary, kind="resize", notes=notes)
