"""Train tab: dataset (folder, upload, demo set, preview), base + preset + main knobs, Start / Stop / Resume,
and a live view of the background job (progress with it/s and ETA, loss plot, samples, log) that a timer
polls. The job runs in ``jobs.REGISTRY``; a reloaded page finds it again through ``registry.current()``."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from ..dataset_preview import import_images, preview_dataset
from ..jobs import JobSnapshot
from ..train.config import CHOICES, DEFAULT_UNET_TARGETS, TrainConfig, list_presets, load_preset
from .state import AppContext, user_errors, wire
from ..demo import make_demo_dataset

# Attention projections, the transformer's other linears, and the ResNet convs (LoCon-style training).
TARGET_CHOICES = list(DEFAULT_UNET_TARGETS) + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
DEFAULT_PRESET = "demo-cpu"
POLL_SECONDS = 1.0

# TrainConfig fields the tab edits, in the order of the knob components (and of the API's parameters).
KNOB_FIELDS = ("rank", "alpha", "learning_rate", "steps", "resolution", "batch_size", "target_modules",
               "train_text_encoder", "mixed_precision", "save_precision", "sample_every_n_steps", "trigger_word")
_INT_FIELDS = {"rank", "steps", "resolution", "batch_size", "sample_every_n_steps"}


def training_presets() -> list[str]:
    return [p for p in list_presets() if not p.startswith("mix")]


def _target_choices(targets) -> list[str]:
    """The usual choices plus whatever a preset names, so any preset can be shown and sent back."""
    return list(dict.fromkeys([*TARGET_CHOICES, *targets]))


def _knob_components(cfg: TrainConfig) -> dict[str, gr.components.Component]:
    k: dict[str, gr.components.Component] = {}
    with gr.Row():
        k["rank"] = gr.Number(cfg.rank, label="Rank", precision=0, minimum=1)
        k["alpha"] = gr.Number(cfg.alpha, label="Alpha", minimum=0)
        k["learning_rate"] = gr.Number(cfg.learning_rate, label="Learning rate", minimum=0)
        k["steps"] = gr.Number(cfg.steps, label="Steps", precision=0, minimum=1)
    with gr.Row():
        k["resolution"] = gr.Number(cfg.resolution, label="Resolution", precision=0, minimum=8, step=8)
        k["batch_size"] = gr.Number(cfg.batch_size, label="Batch size", precision=0, minimum=1)
        k["mixed_precision"] = gr.Dropdown(list(CHOICES["mixed_precision"]), value=cfg.mixed_precision,
                                           label="Mixed precision")
        k["save_precision"] = gr.Dropdown(list(CHOICES["save_precision"]), value=cfg.save_precision,
                                          label="Save precision")
    with gr.Row():
        k["target_modules"] = gr.CheckboxGroup(_target_choices(cfg.target_modules), value=list(cfg.target_modules),
                                               label="UNet layers to train")
        k["train_text_encoder"] = gr.Checkbox(cfg.train_text_encoder, label="Train the text encoder too")
    with gr.Row():
        k["sample_every_n_steps"] = gr.Number(cfg.sample_every_n_steps, label="Sample every N steps (0: never)",
                                              precision=0, minimum=0)
        k["trigger_word"] = gr.Textbox(cfg.trigger_word, label="Trigger word (added to every caption)")
    return k


def config_from_inputs(ctx: AppContext, values: dict[str, Any], resume: bool = False) -> TrainConfig:
    """The preset, with the knobs, folders and names of the page on top; paths checked by the policy.
    ``values`` holds the preset, data_dir, base, run_name and the ``KNOB_FIELDS``."""
    preset = values.get("preset")
    cfg = load_preset(preset) if preset else TrainConfig()
    changes: dict[str, Any] = {}
    for name in KNOB_FIELDS:
        value = values[name]
        if name in _INT_FIELDS and value is not None:
            value = int(value)
        elif name in ("alpha", "learning_rate") and value is not None:
            value = float(value)
        changes[name] = list(value or []) if name == "target_modules" else value
    data = ctx.policy.readable(values["data_dir"], "training folder")
    base = (values["base"] or "demo").strip()
    if base.lower() != "demo":
        base = str(ctx.policy.readable(base, "base model"))
    changes.update(data_dir=str(data), base=base, output_dir=str(ctx.outputs / "runs"),
                   run_name=(values["run_name"] or "").strip(), resume=bool(resume))
    return cfg.replace(**changes)


# --------------------------------------------------------------------------- rendering a snapshot
def status_html(snap: JobSnapshot | None) -> str:
    if snap is None:
        return "<div id='train-status-text'>No training yet. Pick a folder and press Start.</div>"
    colour = {"error": "#c0392b", "stopped": "#d68910", "done": "#1e8449"}.get(snap.state, "#2e86c1")
    return (f"<div style='background:#ddd;border-radius:4px;height:14px;width:100%'>"
            f"<div style='background:{colour};height:14px;border-radius:4px;width:{snap.fraction * 100:.1f}%'>"
            f"</div></div><div id='train-status-text' data-state='{snap.state}'>"
            f"{html.escape(snap.status_line())}</div>")


def loss_frame(snap: JobSnapshot | None) -> pd.DataFrame:
    rows = snap.losses if snap is not None else []
    return pd.DataFrame({"step": [s for s, _ in rows], "loss": [v for _, v in rows]})


def _buttons(snap: JobSnapshot | None) -> tuple:
    running = snap is not None and not snap.finished
    return (gr.update(interactive=not running), gr.update(interactive=running), gr.update(interactive=not running))


def build_train_tab(ctx: AppContext) -> None:
    presets = training_presets()
    preset0 = DEFAULT_PRESET if DEFAULT_PRESET in presets else (presets[0] if presets else "")
    cfg0 = load_preset(preset0) if preset0 else TrainConfig()
    job_state = gr.State(None)        # the job id this page shows
    seen_state = gr.State(None)       # what the page shows already: (job id, state, step, samples, log lines)

    gr.Markdown("### 1. Images")
    with gr.Row():
        data_dir = gr.Textbox(label="Training image folder", scale=4,
                              placeholder=f"a folder inside {ctx.policy.roots_text()}")
        demo_btn = gr.Button("Use the demo dataset", scale=1)
    with gr.Row():
        uploads = gr.File(label="...or upload images (+ .txt captions)", file_count="multiple", scale=3)
        upload_name = gr.Textbox("my-images", label="Name for the uploaded set", scale=1)
        upload_btn = gr.Button("Use the uploads", scale=1)
    preview_btn = gr.Button("Preview dataset")
    preview_text = gr.Markdown()
    preview_gallery = gr.Gallery(label="Dataset", columns=8, height=220, allow_preview=True)

    gr.Markdown("### 2. Settings")
    with gr.Row():
        base = gr.Textbox("demo", label="Base model ('demo', a diffusers folder or a .safetensors file)", scale=3)
        preset = gr.Dropdown(presets, value=preset0 or None, label="Preset", scale=1)
        run_name = gr.Textbox("", label="Run name (empty: the folder's name)", scale=1)
    knobs = _knob_components(cfg0)
    knob_list = [knobs[f] for f in KNOB_FIELDS]

    gr.Markdown("### 3. Train")
    with gr.Row():
        start_btn = gr.Button("Start", variant="primary")
        stop_btn = gr.Button("Stop", variant="stop", interactive=False)
        resume_btn = gr.Button("Resume")
    status = gr.HTML(status_html(None), elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(loss_frame(None), x="step", y="loss", title="Loss", height=260)
        samples = gr.Gallery(label="Latest samples", columns=1, height=260)
    lora_out = gr.Textbox(label="LoRA file", interactive=False)
    log = gr.Textbox(label="Log", lines=8, max_lines=8, autoscroll=True, interactive=False)
    timer = gr.Timer(POLL_SECONDS)

    # ------------------------------------------------------------------ handlers
    @user_errors
    def use_demo_dataset():

        folder = ctx.outputs / "datasets" / "demo"
        if not folder.is_dir():
            make_demo_dataset(folder)
        return str(folder)

    @user_errors
    def use_uploads(files, name):
        if not files:
            raise gr.Error("no files uploaded yet: drop images (and .txt captions) on the upload box first.")
        dest = ctx.policy.output(name, "datasets")
        paths = [ctx.policy.readable(getattr(f, "name", f), "uploaded file") for f in files]
        return str(import_images(paths, dest, concept="images"))

    @user_errors
    def preview(folder, trigger, resolution):
        path = ctx.policy.readable(folder, "training folder")
        pv = preview_dataset(path, cfg0.replace(trigger_word=trigger or "", resolution=int(resolution or 512)))
        return f"**{pv.text()}**", pv.gallery(64)

    @user_errors
    def on_preset(name):
        cfg = load_preset(name)
        return [gr.update(choices=_target_choices(cfg.target_modules), value=list(cfg.target_modules))
                if f == "target_modules" else getattr(cfg, f) for f in KNOB_FIELDS]

    def start(values):
        """Start training in the background; the page follows the job through the timer."""
        return ctx.registry.start(config_from_inputs(ctx, values)), None

    def resume(values):
        """Continue the run of the same name from its saved state."""
        return ctx.registry.start(config_from_inputs(ctx, values, resume=True)), None

    @user_errors
    def stop(job_id):
        if not job_id:
            raise gr.Error("no training is running.")
        return status_html(ctx.registry.stop(job_id))

    def poll(job_id, seen):
        """Refresh the live view; returns skips when nothing changed (the page stays still between steps)."""
        job_id = job_id or ctx.registry.current()   # a reloaded page reattaches here
        n_out = 10
        if not job_id:
            return (None, seen) + (gr.skip(),) * (n_out - 2)
        try:
            snap = ctx.registry.snapshot(job_id)
        except Exception:
            return (None, None) + (gr.skip(),) * (n_out - 2)
        key = (snap.job_id, snap.state, snap.step, len(snap.samples), len(snap.log))
        if key == (tuple(seen) if seen else None):
            return (job_id, seen) + (gr.skip(),) * (n_out - 2)
        gallery = [str(p) for p in reversed(snap.samples[-4:])]
        return (job_id, list(key), status_html(snap), loss_frame(snap), gallery, "\n".join(snap.log),
                str(snap.lora_path or ""), *_buttons(snap))

    # ------------------------------------------------------------------ wiring
    demo_btn.click(use_demo_dataset, None, data_dir, api_name="train_demo_dataset")
    upload_btn.click(use_uploads, [uploads, upload_name], data_dir, api_name="train_use_uploads")
    preview_btn.click(preview, [data_dir, knobs["trigger_word"], knobs["resolution"]], [preview_text, preview_gallery],
                      api_name="train_preview")
    preset.change(on_preset, preset, knob_list, api_name="train_load_preset")
    start_fields = {"preset": preset, "data_dir": data_dir, "base": base, "run_name": run_name,
                    **{f: knobs[f] for f in KNOB_FIELDS}}
    wire(start_btn.click, start, start_fields, [job_state, seen_state], api_name="train_start")
    wire(resume_btn.click, resume, start_fields, [job_state, seen_state], api_name="train_resume")
    stop_btn.click(stop, job_state, status, api_name="train_stop")
    poll_outputs = [job_state, seen_state, status, loss_plot, samples, log, lora_out, start_btn, stop_btn,
                    resume_btn]
    timer.tick(poll, [job_state, seen_state], poll_outputs, api_name="train_poll", show_progress="hidden",
               queue=False)
