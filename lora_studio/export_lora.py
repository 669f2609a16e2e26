"""LoRA files in, one kohya LoRA file out: merge several, resize one, extract one from two checkpoints.

The rank math is in ``lora_studio.lora.rank``; this module reads files, groups modules, writes the result with
kohya metadata and reports per-module ranks and energies. Merged checkpoints are in ``lora_studio.export``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import ConfigError, ExportError, LoraFormatError
from .family import Family, family_from_metadata
from .lora.formats import LoraModule
from .lora.writer import kohya_metadata, save_kohya_lora
from .lora.rank import ResizeStat, check_method, concat_merge, resize_module, summarize, svd_merge
from .progress import ProgressCallback, report

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_RESOLUTION = {Family.SD1: 512, Family.SD2: 768, Family.SDXL: 1024}
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


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    from .lora.formats import read_lora  # another engineer's reader; imported late on purpose

    lf = read_lora(path)
    if lf.embeddings and notes is not None:
        notes.append(f"{Path(path).name}: token embeddings {', '.join(lf.embeddings)} are not LoRA modules and "
                     "were not written; keep the original file for them.")
    modules = {normalize_name(k): v for k, v in lf.modules.items()}
    for mod in modules.values():
        _conv_shape_hint(mod)
    dora = [k for k, m in modules.items() if "dora_scale" in m.tensors]
    if dora:
        raise LoraFormatError(f"{path} is a DoRA file ({len(dora)} modules carry dora_scale, e.g. {dora[0]}); "
                              "its delta depends on the base weights, so it cannot be resized or merged "
                              "without the base. Merge it into a checkpoint with `export` instead.")
    family = getattr(lf, "family", None) or family_from_metadata(dict(lf.metadata or {}))
    return modules, dict(lf.metadata or {}), family


# UNet layers that are 3x3 convs in every SD family (conv_shortcut and SD1's proj_in/proj_out are 1x1)
_CONV3 = re.compile(r"_(conv1|conv2|conv_in|conv_out|downsamplers_0_conv|upsamplers_0_conv|op)$")


def _conv_shape_hint(mod: LoraModule) -> None:
    """LoHa/LoKr store a non-Tucker conv delta flattened to (out, in*3*3); without the base model the kernel
    size is unknown, so take it from the layer name (SD's 3x3 convs) and record it in ``extra["weight_shape"]``
    for the rank math, which then writes a proper LoCon (down (r, in, 3, 3)). A wrong guess cannot pass
    silently: the element count must divide by 9."""
    if mod.kind not in ("loha", "lokr") or "weight_shape" in mod.extra:
        return
    from .lora.math import natural_shape

    shape = natural_shape(mod)
    if len(shape) == 2 and mod.name.startswith("lora_unet_") and _CONV3.search(mod.name) and shape[1] % 9 == 0:
        mod.extra["weight_shape"] = (shape[0], shape[1] // 9, 3, 3)


def normalize_name(name: str) -> str:
    """One spelling per text-encoder module, so two LoRAs of the same base merge module by module
    (transformers 5.x names lack the ``text_model.`` level that real kohya files have)."""
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if name.startswith(prefix + "encoder_layers_"):
            return prefix + "text_model_" + name[len(prefix):]
    return name


def guess_family(modules: dict[str, LoraModule], *hints: Family | None) -> Family:
    """The family from the files' own claims, else from key prefixes and the cross-attention width."""
    for h in hints:
        if h is not None:
            return h
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in modules):
        return Family.SDXL
    for name, mod in modules.items():
        if name.endswith("attn2_to_k") and "lora_down.weight" in mod.tensors:
            width = int(mod.tensors["lora_down.weight"].shape[1])
            return {1024: Family.SD2, 2048: Family.SDXL}.get(width, Family.SD1)
    return Family.SD1


def _resolution(metadata: dict[str, str], family: Family) -> tuple[int, int]:
    raw = metadata.get("ss_resolution", "")
    try:
        nums = [int(x) for x in raw.strip("()[] ").replace("x", ",").split(",") if x.strip()]
        if len(nums) == 2:
            return nums[0], nums[1]
    except ValueError:
        pass
    r = DEFAULT_RESOLUTION[family]
    return r, r


def _out_metadata(source: dict[str, str], family: Family, out: Path, modules: dict[str, LoraModule],
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
    family = guess_family(merged, *families)
    extra: dict[str, object] = {"lora_studio.merged_from": sources, "lora_studio.merge_method": method}
    if method == "svd":
        extra["lora_studio.rank_rule"] = {"method": rank_method, "value": value}
    meta = _out_metadata(first_meta or {}, family, out, merged, extra)
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
    out_meta = _out_metadata(meta, guess_family(modules, fam), out, new, extra)
    save_kohya_lora(new, out, out_meta, parse_dtype(dtype) or (src_dtype if src_dtype.is_floating_point else None))
    return ResizeReport(out, stats, summary, kind="resize", notes=notes)


# --------------------------------------------------------------------------- extraction
ATTN_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def _components(pipe) -> list[tuple[str, torch.nn.Module]]:
    """(kohya prefix, module) for the parts a LoRA adapts: the UNet and the text encoder(s)."""
    from .lora.keys import TE1_PREFIX, TE2_PREFIX, TE_PREFIX, UNET_PREFIX

    parts = [(UNET_PREFIX, pipe.unet)]
    te2 = getattr(pipe, "text_encoder_2", None)
    if getattr(pipe, "text_encoder", None) is not None:
        parts.append((TE1_PREFIX if te2 is not None else TE_PREFIX, pipe.text_encoder))
    if te2 is not None:
        parts.append((TE2_PREFIX, te2))
    return parts


def _targets(model: torch.nn.Module, targets: str) -> dict[str, torch.nn.Module]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    if targets == "all":
        return layers
    return {n: m for n, m in layers.items() if n.endswith(ATTN_SUFFIXES)}


def _pipeline(model, config_dir: str | os.PathLike | None = None):
    if not isinstance(model, (str, os.PathLike)):
        pipe = getattr(model, "pipe", model)  # a LoadedModel or a bare pipeline (the UI and tests pass these)
        return pipe, getattr(model, "family", None)
    from .models import load_pipeline

    loaded = load_pipeline(str(model), config_dir=config_dir)
    return loaded.pipe, loaded.family


def extract_lora(tuned, base, out: str | os.PathLike, method: str = "energy", value: float = 0.9,
                 targets: str = "attn", dtype: str | None = "fp16", min_change: float = 1e-6,
                 config_dir: str | os.PathLike | None = None,
                 progress: ProgressCallback | None = None) -> ResizeReport:
    """Extract a LoRA approximating ``tuned - base`` per layer by truncated SVD, written in kohya format.

    ``tuned`` and ``base`` are model paths (anything ``models.load_pipeline`` reads; ``config_dir`` as there) or
    loaded pipelines.
    ``targets="attn"`` covers the attention projections (UNet ``to_q/to_k/to_v/to_out.0``, text encoder
    ``q_proj/k_proj/v_proj/out_proj``); ``"all"`` covers every linear and conv layer. Layers whose largest
    change is below ``min_change`` times their largest weight are skipped (unchanged, e.g. a frozen encoder).
    """
    from .lora.keys import kohya_module_name
    from .lora.rank import extract_delta

    check_method(method, value)
    if targets not in ("attn", "all"):
        raise ConfigError(f"targets {targets!r} is unknown; use 'attn' (attention projections) or 'all'.")
    out = Path(out)
    tuned_pipe, tuned_fam = _pipeline(tuned, config_dir)
    base_pipe, base_fam = _pipeline(base, config_dir)
    from .family import family_of_pipeline, require_same_family

    fam_t = tuned_fam or family_of_pipeline(tuned_pipe)
    fam_b = base_fam or family_of_pipeline(base_pipe)
    require_same_family("the tuned model", fam_t, fam_b)
    jobs = []
    for (prefix, t_model), (_, b_model) in zip(_components(tuned_pipe), _components(base_pipe)):
        t_layers, b_layers = _targets(t_model, targets), _targets(b_model, targets)
        missing = sorted(set(t_layers) ^ set(b_layers))
        if missing:
            raise LoraFormatError(f"the tuned and base models differ in structure (e.g. layer {missing[0]}); "
                                  "extract from two checkpoints of the same architecture.")
        jobs += [(kohya_module_name(prefix, n), t_layers[n], b_layers[n]) for n in sorted(t_layers)]
    modules: dict[str, LoraModule] = {}
    stats: list[ResizeStat] = []
    skipped = 0
    with torch.no_grad():
        for i, (name, t_layer, b_layer) in enumerate(jobs, 1):
            wt, wb = t_layer.weight.float(), b_layer.weight.float()
            if (wt - wb).abs().max() <= min_change * max(float(wb.abs().max()), 1e-12):
                skipped += 1
            else:
                modules[name], st = extract_delta(wt, wb, method, value, name=name)
                stats.append(st)
            report(progress, "extract", i, len(jobs), name)
    if not modules:
        raise ExportError(f"the tuned model equals the base on every {targets} layer ({len(jobs)} checked); "
                          "nothing to extract. Check that you passed the fine-tuned model as --tuned.")
    summary = summarize(stats)
    summary["skipped_unchanged"] = skipped
    names = {"tuned": str(tuned) if isinstance(tuned, (str, os.PathLike)) else "(pipeline)",
             "base": str(base) if isinstance(base, (str, os.PathLike)) else "(pipeline)"}
    extra = {"lora_studio.extracted_from": names, "lora_studio.rank_rule": {"method": method, "value": value},
             "lora_studio.extract_targets": targets, "lora_studio.resize_summary": summary}
    meta = _out_metadata({}, fam_b, out, modules, extra)
    save_kohya_lora(modules, out, meta, parse_dtype(dtype))
    return ResizeReport(out, stats, summary, kind="extract")
