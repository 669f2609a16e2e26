"""Start and stop the LoRA Studio app for tests: in this process, on a free localhost port, in a thread.

In-process (gradio's ``prevent_thread_lock``) rather than a subprocess: torch and the app load once, the
tests can look at the job registry, and ``close()`` frees the port. ``launch.free_port`` is the same code
``python app.py`` uses to pick its port.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lora_studio.jobs import JobRegistry


@dataclass
class RunningApp:
    url: str
    port: int
    outputs: Path
    registry: JobRegistry
    app: object

    def close(self) -> None:
        # wait for background training to end so no thread outlives the test
        for job_id in self.registry.ids():
            job = self.registry.get(job_id)
            job.stop()
            job.wait(120)
        self.app.close()


def start_app(outputs: Path, allow_dirs: Sequence[Path] = (), start_port: int = 7860) -> RunningApp:
    from lora_studio.ui.app import build_app, make_context
    from lora_studio.ui.launch import free_port

    registry = JobRegistry()  # a fresh table: tests must not see each other's jobs
    ctx = make_context(outputs, list(allow_dirs), registry)
    app = build_app(ctx)
    port = free_port("127.0.0.1", start_port)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, inbrowser=False,
                       quiet=True, allowed_paths=[str(p) for p in ctx.policy.roots])
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                app.close()
                raise
            time.sleep(0.2)
    return RunningApp(url, port, ctx.outputs, registry, app)


def base_model_for_tests(tmp_path_factory) -> tuple[str, list[Path]]:
    """('demo', []) once the demo weights are shipped; until then the same architecture with random weights,
    saved as a diffusers folder that the app is allowed to read (never trains the demo model: that takes
    minutes). Returns (the base-model text to type, folders to allow)."""
    from lora_studio.demo import DEMO_MODEL_DIR, random_demo_pipeline

    if (DEMO_MODEL_DIR / "model_index.json").exists():
        return "demo", []
    folder = tmp_path_factory.mktemp("random-base") / "base"
    random_demo_pipeline().save_pretrained(folder)
    return str(folder), [folder]
