"""Models and data the benchmarks run on: the demo model, or real SD1.5 / SDXL architectures with random weights.

The big UNets and VAEs are built on the meta device and then filled in place (``fill_random_``): torch's
default init of ~1e9 parameters takes minutes on two cores, and a benchmark only needs the real shapes and
finite, deterministic values. Every worker process builds the
same weights from the same seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_studio.configs import clip_tokenizer, config_dir
from lora_studio.family import Family

FAMILIES = {"sd15": Family.SD1, "sdxl": Family.SDXL}


def fill_random_(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Deterministic random-looking weights, fast: each matrix is cut from one seeded normal(0, std) pool of
    ~4M values at its own offset (drawing 1e9 fresh normals takes minutes on two cores; copying takes
    seconds). Norm scales are 1 and biases 0."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(4_194_301, generator=gen) * std  # a prime length, so tensors do not line up
    offset = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm scales
                p.fill_(1.0)
            else:
                flat = p.view(-1)
                pos = 0
                while pos < flat.numel():
                    start = (offset + pos) % pool.numel()
                    n = min(flat.numel() - pos, pool.numel() - start)
                    flat[pos:pos + n].copy_(pool[start:start + n])
                    pos += n
                offset += 7919 * (1 + flat.numel() % 1009)
    return module


def _fast_random(cls, config: dict, seed: int):
    """``cls.from_config(config)`` built on meta, then materialised and filled (only for buffer-free models)."""
    with torch.device("meta"):
        model = cls.from_config(config)
    if any(True for _ in model.buffers()):  # buffers would be left uninitialised by to_empty
        model = cls.from_config(config)
    else:
        model = model.to_empty(device="cpu")
    return fill_random_(model, seed)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def random_pipeline(name: str, seed: int = 0):
    """An SD1.5 (``"sd15"``) or SDXL (``"sdxl"``) pipeline with the published configs and random fp32 weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = config_dir(FAMILIES[name])
    unet = _fast_random(UNet2DConditionModel, _read(folder / "unet" / "config.json"), seed)
    vae = _fast_random(AutoencoderKL, _read(folder / "vae" / "config.json"), seed + 1)
    torch.manual_seed(seed + 2)
    te_cfg = CLIPTextConfig.from_json_file(str(folder / "text_encoder" / "config.json"))
    text_encoder = fill_random_(CLIPTextModel(te_cfg), seed + 2)
    scheduler = DDPMScheduler.from_config(_read(folder / "scheduler" / "scheduler_config.json"))
    if name == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        te2_cfg = CLIPTextConfig.from_json_file(str(folder / "text_encoder_2" / "config.json"))
        te2 = fill_random_(CLIPTextModelWithProjection(te2_cfg), seed + 3)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=te2,
                                         tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
                                         unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def demo_pipeline():
    """The shipped demo model (its random-weight twin while the trained weights are not there yet)."""
    from lora_studio.demo import DEMO_MODEL_DIR, load_demo_pipeline, random_demo_pipeline

    if (DEMO_MODEL_DIR / "model_index.json").is_file():
        return load_demo_pipeline()
    return random_demo_pipeline(0)


def pipeline_for(model: str, seed: int = 0):
    """``"demo"``, ``"sd15"``, ``"sdxl"``; ``"tiny-sdxl"`` (a source checkout's test helper) checks the SDXL code
    paths on a CPU."""
    if model == "tiny-sdxl":
        from tests.tiny_families import tiny_pipeline

        return tiny_pipeline("sdxl", seed)
    return demo_pipeline() if model == "demo" else random_pipeline(model, seed)


def write_dataset(folder: str | Path, count: int, resolution: int) -> Path:
    """``count`` demo pictures with captions in ``folder/1_stripes``, resized to ``resolution`` px squares."""
    from PIL import Image

    from lora_studio.demo import DEMO_RESOLUTION, make_demo_dataset

    root = make_demo_dataset(folder, count=count, repeats=1)
    if resolution != DEMO_RESOLUTION:
        for png in sorted((Path(root) / "1_stripes").glob("*.png")):
            with Image.open(png) as img:
                img.convert("RGB").resize((resolution, resolution), Image.BICUBIC).save(png)
    return Path(root)
