"""Export tab: merged checkpoint (single file / diffusers folder, precision), merged LoRA, resize by rank /
ratio / energy with the spectrum plot, and extraction of a LoRA from two models. Outputs are plain names
written under ``outputs/exports``, numbered (``merged-0001``) rather than replacing an earlier file; every input
path goes through the path policy."""

from __future__ import annotations

import gradio as gr

from ..export import FORMATS, export_merged_checkpoint, extract_lora, merge_loras, resize_lora
from ..mix.args import parse_lora_arg
from ..lora.rank import METHODS
from ..mix.session import MixSession
from ..spectrum import plot_spectrum
from .state import AppContext, progress_adapter, user_errors

LORA_LINES_HINT = "one LoRA per line: PATH or PATH:STRENGTH"


def _lora_lines(ctx: AppContext, text: str) -> list[tuple[str, float]]:
    pairs = []
    for line in (text or "").splitlines():
        if line.strip():
            arg = parse_lora_arg(line.strip())
            pairs.append((str(ctx.policy.readable(arg.ref, "LoRA file")), arg.strength))
    if not pairs:
        raise gr.Error(f"no LoRAs given: {LORA_LINES_HINT}.")
    return pairs


def _model(ctx: AppContext, text: str, what: str) -> str:
    text = (text or "demo").strip()
    return "demo" if text.lower() == "demo" else str(ctx.policy.readable(text, what))


def build_export_tab(ctx: AppContext, mix_state: gr.State) -> None:
    precisions = ["fp16", "bf16", "fp32"]   # checked by export.parse_dtype
    with gr.Accordion("Merged checkpoint: LoRAs fused into the base model", open=True):
        with gr.Row():
            ck_base = gr.Textbox("demo", label="Base model", scale=2)
            ck_use_mix = gr.Checkbox(False, label="Use the Mix tab's LoRAs, strengths and block weights", scale=1)
        ck_loras = gr.Textbox("", label=f"LoRAs ({LORA_LINES_HINT})", lines=3)
        with gr.Row():
            ck_format = gr.Radio(list(FORMATS), value="single_file", label="Format")
            ck_dtype = gr.Radio(precisions, value="fp16", label="Precision")
            ck_name = gr.Textbox("merged", label="Output name")
        ck_btn = gr.Button("Export merged checkpoint", variant="primary")
        ck_out = gr.Textbox(label="Result", interactive=False, elem_id="export-checkpoint-result")

    with gr.Accordion("Merged LoRA: several LoRAs into one file", open=False):
        ml_loras = gr.Textbox("", label=f"LoRAs ({LORA_LINES_HINT})", lines=3)
        with gr.Row():
            ml_method = gr.Radio(["concat", "svd"], value="concat", label="Method (concat: exact; svd: smaller)")
            ml_rank_method = gr.Radio(list(METHODS), value="energy", label="SVD rank rule")
            ml_value = gr.Number(0.95, label="SVD rank value (rank, ratio or energy)")
            ml_name = gr.Textbox("merged-lora", label="Output name")
        ml_btn = gr.Button("Merge LoRAs")
        ml_out = gr.Textbox(label="Result", interactive=False)

    with gr.Accordion("Resize a LoRA (SVD), with its spectrum", open=False):
        rs_lora = gr.Textbox("", label="LoRA file")
        with gr.Row():
            rs_method = gr.Radio(list(METHODS), value="energy", label="Rank rule")
            rs_value = gr.Number(0.9, label="Value (rank, ratio or energy)")
            rs_name = gr.Textbox("resized", label="Output name")
        rs_btn = gr.Button("Resize")
        rs_out = gr.Textbox(label="Result", interactive=False, lines=6)
        rs_plot = gr.Image(label="Spectrum", type="filepath", format="png")

    with gr.Accordion("Extract a LoRA from two models (tuned - base)", open=False):
        with gr.Row():
            ex_tuned = gr.Textbox("", label="Tuned model")
            ex_base = gr.Textbox("demo", label="Base model")
        with gr.Row():
            ex_method = gr.Radio(list(METHODS), value="energy", label="Rank rule")
            ex_value = gr.Number(0.9, label="Value")
            ex_targets = gr.Radio(["attn", "all"], value="attn", label="Layers")
            ex_name = gr.Textbox("extracted", label="Output name")
        ex_btn = gr.Button("Extract")
        ex_out = gr.Textbox(label="Result", interactive=False, lines=6)
        ex_plot = gr.Image(label="Spectrum", type="filepath", format="png")

    # ------------------------------------------------------------------ handlers
    @user_errors
    def export_checkpoint(session, base, use_mix, loras, fmt, dtype, name, progress=gr.Progress()):
        suffix = ".safetensors" if fmt == "single_file" else ""
        out = ctx.policy.new_output(name, "exports", suffix)
        if use_mix:
            if not isinstance(session, MixSession) or session.mixer is None or not session.mixer.entries:
                raise gr.Error("the Mix tab holds no LoRAs yet: render a mix there first, or list LoRA files here.")
            base_model, lora_arg = session.base, session.mixer
        else:
            base_model, lora_arg = _model(ctx, base, "base model"), _lora_lines(ctx, loras)
        result = export_merged_checkpoint(base_model, lora_arg, out, fmt=fmt, dtype=dtype,
                                          progress=progress_adapter(progress))
        return result.text()

    @user_errors
    def export_lora(loras, method, rank_method, value, name, progress=gr.Progress()):
        out = ctx.policy.new_output(name, "exports", ".safetensors")
        report = merge_loras(_lora_lines(ctx, loras), out, method=method, rank_method=rank_method,
                             value=float(value), progress=progress_adapter(progress))
        return report.text()

    def _spectrum(report, out_png) -> str | None:
        stats = {s.name: s for s in report.stats if s.singular_values is not None}
        if not stats:
            return None
        plot_spectrum(stats, out_png, suggested={s.name: s.new_rank for s in stats.values()})
        return str(out_png)

    @user_errors
    def resize(lora, method, value, name, progress=gr.Progress()):
        src = ctx.policy.readable(lora, "LoRA file")
        out = ctx.policy.new_output(name, "exports", ".safetensors")
        report = resize_lora(src, out, method, float(value), progress=progress_adapter(progress))
        return report.text(), _spectrum(report, out.with_suffix(".spectrum.png"))

    @user_errors
    def extract(tuned, base, method, value, targets, name, progress=gr.Progress()):
        out = ctx.policy.new_output(name, "exports", ".safetensors")
        report = extract_lora(_model(ctx, tuned, "tuned model"), _model(ctx, base, "base model"), out, method,
                              float(value), targets=targets, progress=progress_adapter(progress))
        return report.text(), _spectrum(report, out.with_suffix(".spectrum.png"))

    ck_btn.click(export_checkpoint, [mix_state, ck_base, ck_use_mix, ck_loras, ck_format, ck_dtype, ck_name], ck_out,
                 api_name="export_checkpoint")
    ml_btn.click(export_lora, [ml_loras, ml_method, ml_rank_method, ml_value, ml_name], ml_out,
                 api_name="export_merged_lora")
    rs_btn.click(resize, [rs_lora, rs_method, rs_value, rs_name], [rs_out, rs_plot], api_name="export_resize")
    ex_btn.click(extract, [ex_tuned, ex_base, ex_method, ex_value, ex_targets, ex_name], [ex_out, ex_plot],
                 api_name="export_extract")
