"""LoRA Studio desktop app: ``python app.py`` opens the Gradio UI on the built-in demo model."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from lora_studio.cpu_memory import APP_TRIM_THRESHOLD, tune_glibc_malloc
    from lora_studio.ui.launch import launch_from_args

    tune_glibc_malloc(trim_threshold=APP_TRIM_THRESHOLD)
    return launch_from_args(argv)


if __name__ == "__main__":
    sys.exit(main())
