"""Tiny SD1 / SD2 / SDXL-structured pipelines with random weights, for tests that need the real layouts.

Plain functions so any test can import them:

* ``tiny_pipeline(family, seed=0)`` -> a diffusers pipeline (SD1 is the demo architecture; SD2 has a 1024-wide
  context, a linear-projection UNet with an ``UpBlock2D`` first and a v-prediction scheduler; SDXL has two text
  encoders (768 + 1280 = 2048 wide, the second with a projection) and ``text_time`` size conditioning).
* ``write_ldm_checkpoint(pipe, path)`` -> writes it as an original-layout single ``.safetensors`` file.
* ``tiny_config_dir(family, dest)`` -> a config-only diffusers folder (no weights) that
  ``load_pipeline(path, config_dir=dest)`` / ``from_single_file(config=dest)`` need for these tiny models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_studio.demo import SCHEDULER_CONFIG, random_demo_pipeline, tiny_tokenizer, tiny_vae_config
from lora_studio.family import Family


def _text_encoder(cls, tok, hidden: int, layers: int, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_attention_heads=2,
                         num_hidden_layers=layers, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection_dim or hidden, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return cls(cfg)


def _sd2_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
        norm_num_groups=8)
    sched = DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**tiny_vae_config()), text_encoder=_text_encoder(CLIPTextModel, tok, 1024, 2, "gelu"),
        tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _sdxl_pipeline():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_tokenizer()
    pooled, time_dim = 32, 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim, norm_num_groups=8)
    sched = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")})
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**tiny_vae_config()),
        text_encoder=_text_encoder(CLIPTextModel, tok, 768, 1, "quick_gelu"),
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, tok, 1280, 1, "gelu", projection_dim=pooled),
        tokenizer=tok, tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=sched)


def tiny_pipeline(family: Family | str, seed: int = 0):
    """A tiny pipeline of ``family`` with random weights (deterministic for a seed), in float32 on the CPU."""
    family = Family(family)
    torch.manual_seed(seed)
    if family is Family.SD1:
        pipe = random_demo_pipeline(seed)
    elif family is Family.SD2:
        pipe = _sd2_pipeline()
    else:
        pipe = _sdxl_pipeline()
    # random init leaves norms at 1/0 and some layers at 0: perturb every weight so a swapped name shows
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is None:
                continue
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_ldm_checkpoint(pipe, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``pipe`` as an original-layout single file with LoRA Studio's own converter."""
    from lora_studio.fileio import save_safetensors_atomic
    from lora_studio.ldm import pipeline_to_ldm_state_dict

    save_safetensors_atomic(pipeline_to_ldm_state_dict(pipe), path, metadata)
    return Path(path)


def tiny_config_dir(family: Family | str, dest: str | Path, pipe=None) -> Path:
    """A config-only diffusers folder for the tiny ``family`` pipeline (model_index.json, component configs,
    tokenizer files; no weights)."""
    dest = Path(dest)
    pipe = pipe or tiny_pipeline(family)
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_config(dest)
    for name, component in pipe.components.items():
        if component is None:
            continue
        sub = dest / name
        if hasattr(component, "save_vocabulary") or name.startswith("tokenizer"):
            component.save_pretrained(sub)
        elif hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(sub)
        else:  # transformers models: config only
            component.config.save_pretrained(sub)
    index = json.loads((dest / "model_index.json").read_text())
    assert index["_class_name"] in ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    return dest


def tiny_ldm_checkpoint(family: Family | str, folder: str | Path, seed: int = 0):
    """All three at once: ``(pipe, checkpoint_path, config_dir)`` under ``folder``; load the file back with
    ``load_pipeline(checkpoint_path, config_dir=config_dir)``."""
    family = Family(family)
    folder = Path(folder)
    pipe = tiny_pipeline(family, seed)
    path = write_ldm_checkpoint(pipe, folder / f"tiny-{family.value}.safetensors")
    return pipe, path, tiny_config_dir(family, folder / f"tiny-{family.value}-config", pipe)
