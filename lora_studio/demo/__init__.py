"""The tiny built-in demo model and demo style dataset.

The demo model has the real Stable Diffusion 1.x structure (diffusers ``UNet2DConditionModel`` with
cross-attention ``to_q/to_k/to_v/to_out.0``, ``AutoencoderKL``, transformers ``CLIPTextModel`` +
``CLIPTokenizer``, a DDIM scheduler) at toy size, and is *trained here*, offline and deterministically, to draw
coloured shapes at 64 px from prompts like "a red circle". Its weights ship in ``lora_studio/assets/demo-model``.

- ``model``: the architecture, the tiny tokenizer and where the weights ship;
- ``build``: training it from nothing, and finding or loading the shipped one;
- ``shapes``: the pictures (shapes on white, and the striped style); ``dataset``: the demo style dataset;
- ``render``: a sample grid of what the model draws.
"""

from .build import DemoBuildConfig, build_demo_model, build_demo_pipeline, ensure_demo_model, load_demo_pipeline
from .dataset import make_demo_dataset
from .model import (ASSETS, DEMO_MODEL_DIR, DEMO_PROMPTS, DEMO_RESOLUTION, SCHEDULER_CONFIG, random_demo_pipeline,
                    tiny_text_config, tiny_tokenizer, tiny_unet_config, tiny_vae_config, tiny_vocab,
                    write_tokenizer_files)

__all__ = ["ASSETS", "DEMO_MODEL_DIR", "DEMO_PROMPTS", "DEMO_RESOLUTION", "SCHEDULER_CONFIG", "DemoBuildConfig",
           "build_demo_model", "build_demo_pipeline", "ensure_demo_model", "load_demo_pipeline", "make_demo_dataset",
           "random_demo_pipeline", "tiny_text_config", "tiny_tokenizer", "tiny_unet_config", "tiny_vae_config",
           "tiny_vocab", "write_tokenizer_files"]
