"""Mix tab: a LoRA library from a folder, a fixed number of slots (LoRA + strength; text-encoder strength and
block weights under "Advanced"), generation settings, and Render -> the base / each LoRA / mix comparison row,
plus X/Y grids. The session's ``MixSession`` (in ``gr.State``) keeps the pipeline and the mixer in memory:
moving a slider and rendering again reloads nothing."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from ..library import scan_library
from ..mix.args import SlotSpec, parse_block_weights
from ..mix.session import MixSession
from ..render import GenParams, sampler_names
from .state import AppContext, progress_adapter, user_errors, wire

SLOTS = 4
SLOT_FIELDS = ("lora", "strength", "te_strength", "blocks")   # per slot: lora_1, strength_1, ... in the API
GEN_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "cfg", "width", "height", "sampler")
LIBRARY_COLUMNS = ["name", "family", "kind", "rank", "trigger words", "problem"]


def _slots_from_values(ctx: AppContext, values: dict) -> list[SlotSpec]:
    separate_te = bool(values["separate_te"])
    slots = []
    for i in range(SLOTS):
        lora, strength, te, blocks = (values[f"{f}_{i + 1}"] for f in SLOT_FIELDS)
        if not lora:
            continue
        path = ctx.policy.readable(lora, f"LoRA file in slot {i + 1}")
        slots.append(SlotSpec(str(path), float(strength), float(te) if separate_te else None,
                              parse_block_weights(blocks or "")))
    return slots


def _params(v: dict) -> GenParams:
    return GenParams(prompt=v["prompt"] or "", negative_prompt=v["negative_prompt"] or "", steps=int(v["steps"]),
                     cfg=float(v["cfg"]), seed=int(v["seed"]), width=int(v["width"]), height=int(v["height"]),
                     sampler=v["sampler"] or "DDIM")


def build_mix_tab(ctx: AppContext, mix_state: gr.State) -> None:
    with gr.Row():
        base = gr.Textbox("demo", label="Base model ('demo', a diffusers folder or a .safetensors file)", scale=3)
        library_dir = gr.Textbox(str(ctx.outputs), label="LoRA library folder", scale=3)
        scan_btn = gr.Button("Scan library", scale=1)
    library = gr.Dataframe(headers=LIBRARY_COLUMNS, label="Library", interactive=False, wrap=True)
    slot_fields: dict[str, gr.components.Component] = {}
    lora_boxes, strengths, te_sliders, block_boxes = [], [], [], []
    for i in range(SLOTS):
        with gr.Row():
            lora_boxes.append(gr.Dropdown([], value="", label=f"LoRA {i + 1}", allow_custom_value=True, scale=3))
            strengths.append(gr.Slider(-2, 2, value=1.0, step=0.05, label=f"Strength {i + 1}", scale=2,
                                       elem_id=f"mix-strength-{i + 1}"))
    with gr.Accordion("Advanced: text-encoder strength and block weights", open=False):
        separate_te = gr.Checkbox(False, label="Separate text-encoder strengths (off: same as the strength)")
        for i in range(SLOTS):
            with gr.Row():
                te_sliders.append(gr.Slider(-2, 2, value=1.0, step=0.05, label=f"Text encoder {i + 1}"))
                block_boxes.append(gr.Textbox("", label=f"Block weights {i + 1}",
                                              placeholder="down=1, mid=1, up=1 or down.0=0.5, up.1=0"))
    for i in range(SLOTS):
        slot_fields.update(zip((f"{f}_{i + 1}" for f in SLOT_FIELDS),
                               (lora_boxes[i], strengths[i], te_sliders[i], block_boxes[i])))

    with gr.Row():
        prompt = gr.Textbox("a red circle", label="Prompt", scale=3)
        negative = gr.Textbox("", label="Negative prompt", scale=2)
    with gr.Row():
        seed = gr.Number(0, label="Seed (-1: random)", precision=0)
        steps = gr.Slider(1, 100, value=12, step=1, label="Steps")
        cfg = gr.Slider(0, 20, value=4.0, step=0.5, label="CFG scale")
        width = gr.Slider(64, 1536, value=64, step=8, label="Width")
        height = gr.Slider(64, 1536, value=64, step=8, label="Height")
        sampler = gr.Dropdown(sampler_names(), value="DDIM", label="Sampler")
    gen_fields = dict(zip(GEN_FIELDS, (prompt, negative, seed, steps, cfg, width, height, sampler)))
    render_btn = gr.Button("Render comparison", variant="primary")
    grid = gr.Image(label="Base / each LoRA / mix", type="filepath", elem_id="mix-grid", format="png")
    tiles = gr.File(label="Each image (PNG with its generation parameters)", file_count="multiple",
                    interactive=False)
    info = gr.Markdown(elem_id="mix-info")
    with gr.Accordion("X/Y grid", open=False):
        with gr.Row():
            x_axis = gr.Textbox("strength=0,0.5,1", label="X axis (strength, te_strength, lora, seed, steps, cfg, "
                                "sampler, prompt)")
            y_axis = gr.Textbox("", label="Y axis (optional)", placeholder="seed=1,2")
        xy_btn = gr.Button("Render X/Y grid")
        xy_image = gr.Image(label="X/Y grid", type="filepath", format="png")

    # ------------------------------------------------------------------ handlers
    @user_errors
    def scan(folder, progress=gr.Progress()):
        root = ctx.policy.readable(folder, "LoRA library folder")
        items = scan_library(root, progress=progress_adapter(progress))
        rows = [[it.name, it.family or "", it.kind or "", it.rank or "", "; ".join(it.trigger_words), it.error or ""]
                for it in items]
        choices = [(it.name, str(it.path)) for it in items if not it.error]
        return [rows] + [gr.update(choices=choices) for _ in range(SLOTS)]

    def _out_dir(kind: str) -> Path:
        return ctx.outputs / "mix" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6:06d}"

    def _summary(session: MixSession, extra: str) -> str:
        return (f"{extra}\n\n```\n{session.report()}\n```\n\nModel loads this session: {session.loads}; "
                f"LoRA file reads: {session.reads}.")

    def render(v, progress):
        """The comparison row: base, each LoRA alone, then the mix (same prompt and seed)."""
        session = v["session"] or MixSession()
        base_text = _base(ctx, v["base"])
        if progress is not None:
            progress(0, desc="loading the base model" if session.base != base_text else "rendering")
        result = session.compare(base_text, _slots_from_values(ctx, v), _params(v), _out_dir("compare"),
                                 progress=progress_adapter(progress))
        return session, str(result.grid_path), [str(p) for p in result.image_paths], _summary(session, "Rendered: " + ", ".join(result.labels))

    def render_xy(v, progress):
        """An X/Y grid starting from the slots' strengths."""
        session = v["session"] or MixSession()
        result = session.xy(_base(ctx, v["base"]), _slots_from_values(ctx, v), _params(v), v["x_axis"], v["y_axis"],
                            _out_dir("xy"), progress=progress_adapter(progress))
        return session, str(result.grid_path), _summary(session, f"X/Y grid: {len(result.image_paths)} cells")

    common = {"session": mix_state, "base": base, "separate_te": separate_te, **gen_fields}
    scan_btn.click(scan, library_dir, [library, *lora_boxes], api_name="mix_scan")
    wire(render_btn.click, render, {**common, **slot_fields}, [mix_state, grid, tiles, info], api_name="mix_render",
         progress=True)
    wire(xy_btn.click, render_xy, {**common, "x_axis": x_axis, "y_axis": y_axis, **slot_fields},
         [mix_state, xy_image, info], api_name="mix_xy", progress=True)


def _base(ctx: AppContext, text: str) -> str:
    text = (text or "demo").strip()
    return "demo" if text.lower() == "demo" else str(ctx.policy.readable(text, "base model"))
