"""Training a LoRA: config (presets), dataset (images + captions + buckets), the loop (accelerate + peft)."""

from .config import TrainConfig, list_presets, load_preset

__all__ = ["TrainConfig", "list_presets", "load_preset"]
