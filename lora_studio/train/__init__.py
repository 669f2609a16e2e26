"""Training a LoRA: config (presets), dataset (images + captions + buckets), the loop (accelerate + peft).

``from lora_studio.train import TrainConfig, load_preset, train`` — the trainer (and torch/diffusers with it) is
imported only when ``train``, ``TrainCallbacks`` or ``TrainResult`` is first used.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig, list_presets, load_preset

__all__ = ["TrainConfig", "list_presets", "load_preset", "train", "TrainCallbacks", "TrainResult"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainCallbacks", "TrainResult"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
