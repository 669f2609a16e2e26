"""Build the Gradio Blocks app. Each tab lives in its own module and only calls the core."""

from __future__ import annotations

import gradio as gr

from ..demo import DEMO_MODEL_DIR


def build_app() -> gr.Blocks:
    with gr.Blocks(title="LoRA Studio") as app:
        gr.Markdown(f"# LoRA Studio\nBase model: built-in demo model (`{DEMO_MODEL_DIR.name}`).")
        with gr.Tab("Train"):
            gr.Markdown("Training tab: coming soon.")
        with gr.Tab("Mix"):
            gr.Markdown("Mix tab: coming soon.")
        with gr.Tab("Export"):
            gr.Markdown("Export tab: coming soon.")
        with gr.Tab("Inspect"):
            gr.Markdown("Inspect tab: coming soon.")
    return app
