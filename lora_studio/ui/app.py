"""Build the Gradio Blocks app: tabs Train / Mix / Export / Inspect, each a thin module over the core.

``build_app`` builds and returns the Blocks; it starts nothing (``launch.py`` does). Per-session values live in
``gr.State``: the Mix tab's ``MixSession`` (pipeline + mixer, shared with Export's "use the mix") and the job
id the Train tab watches. Long work goes through gradio's queue with ``gr.Progress``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import gradio as gr

from ..jobs import REGISTRY, JobRegistry
from .paths import PathPolicy
from .state import AppContext
from ..demo import DEMO_MODEL_DIR
from .export_tab import build_export_tab
from .inspect_tab import build_inspect_tab
from .mix_tab import build_mix_tab
from .train_tab import build_train_tab

DEFAULT_OUTPUTS = Path("outputs")


def make_context(outputs: str | Path = DEFAULT_OUTPUTS, allow_dirs: Sequence[str | Path] = (),
                 registry: JobRegistry | None = None) -> AppContext:
    from gradio.utils import get_upload_folder

    policy = PathPolicy(Path(outputs), list(allow_dirs), uploads=[Path(get_upload_folder())],
                        readonly=[DEMO_MODEL_DIR])
    return AppContext(policy, registry or REGISTRY)


def build_app(ctx: AppContext | None = None) -> gr.Blocks:

    ctx = ctx or make_context()
    with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as app:
        gr.Markdown(f"# LoRA Studio\nTrain, mix and export Stable Diffusion LoRAs. Files are read from "
                    f"{ctx.policy.roots_text()}; results go to `{ctx.outputs}`.")
        mix_state = gr.State(None)  # this session's MixSession: the loaded base and the LoRAs in the mix
        with gr.Tab("Train", id="train"):
            build_train_tab(ctx)
        with gr.Tab("Mix", id="mix"):
            build_mix_tab(ctx, mix_state)
        with gr.Tab("Export", id="export"):
            build_export_tab(ctx, mix_state)
        with gr.Tab("Inspect", id="inspect"):
            build_inspect_tab(ctx)
    app.lora_studio_context = ctx  # for launch() (allowed_paths) and tests
    return app
