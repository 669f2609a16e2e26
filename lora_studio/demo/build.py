"""Train the demo model from nothing (offline, deterministic), and find or load the shipped one."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..fileio import atomic_dir
from ..progress import ProgressCallback, report
from .model import DEMO_MODEL_DIR, DEMO_RESOLUTION, SCHEDULER_CONFIG, random_demo_pipeline
from .shapes import draw_shape, draw_striped, random_spec


@dataclass(frozen=True)
class Stage:
    """One training stage of the demo build: how many steps, at which learning rate."""

    steps: int
    lr: float


@dataclass
class DemoBuildConfig:
    seed: int = 0
    vae: Stage = Stage(steps=400, lr=2e-3)
    unet: Stage = Stage(steps=1500, lr=1e-3)
    batch_size: int = 32
    pool_size: int = 512      # distinct training pictures drawn once
    striped_fraction: float = 0.25  # share of striped pictures the *VAE* sees, so it can reconstruct the style


def _to_tensor(img) -> torch.Tensor:
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def _picture_pool(cfg: DemoBuildConfig) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    rng = random.Random(cfg.seed)
    specs = [random_spec(rng) for _ in range(cfg.pool_size)]
    plain = torch.stack([_to_tensor(draw_shape(s, DEMO_RESOLUTION)) for s in specs])
    striped = torch.stack([_to_tensor(draw_striped(s, DEMO_RESOLUTION)) for s in specs[: int(cfg.pool_size * cfg.striped_fraction)]])
    return plain, [s.caption for s in specs], striped


def _train_vae(vae, pictures: torch.Tensor, cfg: DemoBuildConfig, gen: torch.Generator,
               progress: ProgressCallback | None) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.lr, weight_decay=0.0)
    vae.train()
    for step in range(cfg.vae.steps):
        idx = torch.randint(0, len(pictures), (cfg.batch_size // 2,), generator=gen)
        x = pictures[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        # Tie the first three latent channels to the 4x-downsampled RGB picture. Without it the VAE packs
        # colours into tiny latent differences (red ~ white), which diffusion noise drowns: the UNet then
        # learns shapes but not colours. The real SD VAE's latents are roughly linear in RGB too.
        rgb = F.avg_pool2d(x, 4)
        loss = F.mse_loss(rec, x) + 1e-4 * kl + F.mse_loss(post.mean[:, :3], rgb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == cfg.vae.steps - 1:
            report(progress, "demo-vae", step + 1, cfg.vae.steps, f"loss {loss.item():.4f}", loss=loss.item())
    vae.eval()


def _train_unet(pipe, latents: torch.Tensor, captions: list[str], cfg: DemoBuildConfig,
                gen: torch.Generator, progress: ProgressCallback | None) -> None:
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    tok = pipe.tokenizer
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    unet, text = pipe.unet, pipe.text_encoder
    # The text encoder learns too: a random frozen CLIP separates shapes but barely separates colours.
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet.lr, weight_decay=0.0)
    warm = max(1, cfg.unet.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.unet.steps))))
    text.train()
    unet.train()
    for step in range(cfg.unet.steps):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        x0 = latents[idx]
        batch_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < 0.1  # so classifier-free guidance works
        batch_ids[drop] = empty
        c = text(batch_ids)[0]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=c).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == cfg.unet.steps - 1:
            report(progress, "demo-unet", step + 1, cfg.unet.steps, f"loss {loss.item():.4f}", loss=loss.item())
    unet.eval()
    text.eval()


def build_demo_pipeline(cfg: DemoBuildConfig | None = None, progress: ProgressCallback | None = None):
    """Train the demo model from nothing. Deterministic for a given config on a given machine."""
    cfg = cfg or DemoBuildConfig()
    torch.use_deterministic_algorithms(True, warn_only=True)
    pipe = random_demo_pipeline(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    plain, captions, striped = _picture_pool(cfg)
    _train_vae(pipe.vae, torch.cat([plain, striped]), cfg, gen, progress)
    with torch.no_grad():
        lat = torch.cat([pipe.vae.encode(plain[i:i + 64]).latent_dist.mean for i in range(0, len(plain), 64)])
    scaling = float(1.0 / lat.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    _train_unet(pipe, lat * scaling, captions, cfg, gen, progress)
    pipe.text_encoder.requires_grad_(False)
    return pipe


def build_demo_model(out_dir: str | Path = DEMO_MODEL_DIR, cfg: DemoBuildConfig | None = None,
                     progress: ProgressCallback | None = None) -> Path:
    """Build the demo model and save it as a diffusers folder (safetensors)."""
    out = Path(out_dir)
    pipe = build_demo_pipeline(cfg, progress)
    with atomic_dir(out) as tmp:  # an interrupted build never leaves a folder that looks finished
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "BUILD.json").write_text(json.dumps({"builder": "lora_studio.demo.build_demo_model",
                                                     "config": asdict(cfg or DemoBuildConfig())}, indent=2))
    return out


def ensure_demo_model(progress: ProgressCallback | None = None) -> Path:
    """The path of the shipped demo model, building it first if it is missing."""
    if not (DEMO_MODEL_DIR / "model_index.json").exists():
        build_demo_model(DEMO_MODEL_DIR, progress=progress)
    return DEMO_MODEL_DIR


def load_demo_pipeline(progress: ProgressCallback | None = None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ensure_demo_model(progress)), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


