"""Extract a LoRA from two checkpoints: ``tuned - base`` per layer, truncated by SVD, written in kohya format."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError, ExportError, LoraFormatError
from ..family import Family, require_same_family
from ..lora.keys import TE1_PREFIX, TE2_PREFIX, TE_PREFIX, UNET_PREFIX, UnetLayout, kohya_module_name
from ..lora.module import LoraModule
from ..lora.rank import ResizeStat, check_method, extract_delta, summarize
from ..models import load_base
from ..progress import ProgressCallback, report
from ..lora.writer import save_kohya_lora
from .lora_ops import ResizeReport, out_metadata, parse_dtype

ATTN_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def _components(pipe) -> list[tuple[str, torch.nn.Module]]:
    """(kohya prefix, module) for the parts a LoRA adapts: the UNet and the text encoder(s)."""
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


def extract_lora(tuned, base, out: str | os.PathLike, method: str = "energy", value: float = 0.9,
                 targets: str = "attn", dtype: str | None = "fp16", min_change: float = 1e-6,
                 config_dir: str | os.PathLike | None = None,
                 progress: ProgressCallback | None = None) -> ResizeReport:
    """Extract a LoRA approximating ``tuned - base`` per layer by truncated SVD, written in kohya format.

    ``tuned`` and ``base`` are model paths (anything ``models.load_base`` reads; ``config_dir`` as there) or
    loaded pipelines.
    ``targets="attn"`` covers the attention projections (UNet ``to_q/to_k/to_v/to_out.0``, text encoder
    ``q_proj/k_proj/v_proj/out_proj``); ``"all"`` covers every linear and conv layer. Layers whose largest
    change is below ``min_change`` times their largest weight are skipped (unchanged, e.g. a frozen encoder).
    """
    check_method(method, value)
    if targets not in ("attn", "all"):
        raise ConfigError(f"targets {targets!r} is unknown; use 'attn' (attention projections) or 'all'.")
    out = Path(out)
    tuned_model, base_model = load_base(tuned, config_dir=config_dir), load_base(base, config_dir=config_dir)
    tuned_pipe, base_pipe, fam_b = tuned_model.pipe, base_model.pipe, base_model.family
    require_same_family("the tuned model", tuned_model.family, fam_b)
    jobs = []
    for (prefix, t_model), (_, b_model) in zip(_components(tuned_pipe), _components(base_pipe)):
        t_layers, b_layers = _targets(t_model, targets), _targets(b_model, targets)
        missing = sorted(set(t_layers) ^ set(b_layers))
        if missing:
            raise LoraFormatError(f"the tuned and base models differ in structure (e.g. layer {missing[0]}); "
                                  "extract from two checkpoints of the same architecture.")
        layout = UnetLayout.from_config(b_model.config) if prefix == UNET_PREFIX and fam_b is Family.SDXL else None
        jobs += [(kohya_module_name(prefix, n, layout), t_layers[n], b_layers[n]) for n in sorted(t_layers)]
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
    meta = out_metadata({}, fam_b, out, modules, extra)
    save_kohya_lora(modules, out, meta, parse_dtype(dtype))  # refuses NaN/inf after the cast
    return ResizeReport(out, stats, summary, kind="extract")
