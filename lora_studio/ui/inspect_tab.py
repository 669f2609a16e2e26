"""Inspect tab: drop a LoRA or checkpoint file (or give a path) and see its metadata, family, kind, ranks,
the blocks it touches and its trigger words / tags, as ``lora.inspect`` and ``models.describe_checkpoint`` tell."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ..lora.inspect import format_lora_info, inspect_lora, looks_like_checkpoint
from ..models import describe_checkpoint
from .state import AppContext, user_errors

MODULE_COLUMNS = ["module", "component", "block", "kind", "rank", "alpha"]


def format_checkpoint(desc: dict[str, Any]) -> str:
    fam = desc.get("family")
    lines = [f"{Path(desc['path']).name}: a base model ({desc.get('kind')}), not a LoRA",
             f"Family:     {getattr(fam, 'label', None) or 'unknown'}"
             + (f" ({desc['family_error']})" if desc.get("family_error") else ""),
             f"Tensors:    {desc.get('tensors')} ({desc.get('parameters', 0) / 1e6:.2f} M parameters), "
             f"dtype {desc.get('dtype')}, {desc.get('size_bytes', 0) / 1e6:.1f} MB"]
    lines += [f"  {name}: {n}" for name, n in (desc.get("components") or {}).items()]
    meta = desc.get("metadata") or {}
    if meta:
        lines.append("Metadata:")
        lines += [f"  {k} = {v if len(v) <= 100 else v[:97] + '...'}" for k, v in sorted(meta.items())]
    return "\n".join(lines)


def build_inspect_tab(ctx: AppContext) -> None:
    with gr.Row():
        upload = gr.File(label="Drop a LoRA or checkpoint (.safetensors)", file_types=[".safetensors"], scale=2)
        path = gr.Textbox("", label="...or a path (a file, or a diffusers model folder)", scale=2)
    btn = gr.Button("Inspect", variant="primary")
    report = gr.Textbox(label="Report", lines=18, max_lines=40, interactive=False, elem_id="inspect-report")
    modules = gr.Dataframe(headers=MODULE_COLUMNS, label="Modules", interactive=False)

    @user_errors
    def inspect(file, text):
        raw = getattr(file, "name", file) if file else text
        p = ctx.policy.readable(raw, "file to inspect")
        if p.is_dir() or (p.suffix.lower() == ".safetensors" and looks_like_checkpoint(p)):
            return format_checkpoint(describe_checkpoint(p)), []
        info = inspect_lora(p)
        rows = [[m.name, m.component, m.block, m.kind, m.rank, "" if m.alpha is None else m.alpha]
                for m in info.modules]
        return format_lora_info(info), rows

    btn.click(inspect, [upload, path], [report, modules], api_name="inspect")
    upload.upload(inspect, [upload, path], [report, modules], api_name=False)
