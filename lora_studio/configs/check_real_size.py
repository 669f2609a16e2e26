"""Manual check of the shipped configs at full size (not part of the test suite: it needs several GB).

``python -m lora_studio.configs.check_real_size sd1 [out_dir]`` builds a random-weight fp16 pipeline of the real
SD1.5 / SD2.1 / SDXL architecture from the shipped configs, writes it as an original-layout single file with
``pipeline_to_ldm_state_dict``, loads it back with ``load_pipeline`` (shipped configs, offline) and checks every
weight is bit-identical. Needs about 2x the model size in RAM (SD1.5 ~4.5 GB, SD2.1 ~5.5 GB, SDXL ~14 GB).
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _random_pipeline(family):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from . import config_dir, family_tokenizers
    from ..family import Family

    folder = config_dir(family)
    gen = torch.Generator().manual_seed(0)
    parts = {}
    with init_empty_weights():
        parts["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        parts["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))
        if family is Family.SDXL:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
    for module in parts.values():
        module.to_empty(device="cpu").to(torch.float16)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    cls = DiffusionPipeline.load_config(folder)["_class_name"]
    sched_name = DiffusionPipeline.load_config(folder)["scheduler"][1]
    import diffusers

    sched = getattr(diffusers, sched_name).from_pretrained(folder, subfolder="scheduler")
    extra = {} if family is Family.SDXL else {"safety_checker": None, "feature_extractor": None,
                                               "requires_safety_checker": False}
    return getattr(diffusers, cls)(**parts, scheduler=sched, **family_tokenizers(family), **extra)


def check(family_name: str, out_dir: str | None = None) -> None:
    from ..family import Family
    from ..fileio import save_safetensors_atomic
    from ..ldm import pipeline_to_ldm_state_dict
    from ..models import load_pipeline

    family = Family(family_name)
    t = time.time()
    pipe = _random_pipeline(family)
    print(f"built {family.label} in {time.time() - t:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        path = Path(tmp) / f"{family.value}.safetensors"
        save_safetensors_atomic(pipeline_to_ldm_state_dict(pipe), path)
        # keep only fingerprints of the originals so the check needs ~2x, not 3x, the model in memory
        prints = {n: {k: (v.double().sum().item(), v.double().abs().sum().item())
                      for k, v in getattr(pipe, n).state_dict().items()}
                  for n in COMPONENTS if getattr(pipe, n, None) is not None}
        del pipe
        gc.collect()
        t = time.time()
        loaded = load_pipeline(path, dtype=torch.float16)
        print(f"loaded {loaded.family.label} ({loaded.kind}) in {time.time() - t:.1f} s; scheduler "
              f"{type(loaded.pipe.scheduler).__name__} {loaded.pipe.scheduler.config.prediction_type}", flush=True)
        for name, want in prints.items():
            got = {k: (v.double().sum().item(), v.double().abs().sum().item())
                   for k, v in getattr(loaded.pipe, name).state_dict().items()}
            bad = [k for k in want if got.get(k) != want[k]]
            print(f"{name}: {len(want)} tensors, {len(bad)} different {bad[:3]}", flush=True)
            assert not bad and got.keys() == want.keys()
        print("tokens", loaded.pipe.tokenizer("a photo of a cat").input_ids)


if __name__ == "__main__":
    check(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
