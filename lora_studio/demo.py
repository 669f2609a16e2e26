"""The tiny built-in demo model and demo style dataset.

The demo model has the real Stable Diffusion 1.x structure (diffusers
``UNet2DConditionModel`` with cross-attention ``to_q/to_k/to_v/to_out.0``,
``AutoencoderKL``, transformers ``CLIPTextModel`` + ``CLIPTokenizer``, a DDIM
scheduler) at toy size, and is *trained here*, offline and deterministically,
to draw coloured shapes at 64 px from prompts like "a red circle". Its weights
ship in ``lora_studio/assets/demo-model`` (a few MB); ``build_demo_model``
rebuilds them from nothing in about a minute and a half on two CPU cores.

Written by hand because no library ships a trainable toy SD: the tokenizer
vocabulary (byte-level CLIP BPE plus merges for a small word list), the
drawing of training pictures, and a minimal VAE + UNet training loop.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .demo_shapes import WORDS, ShapeSpec, draw_shape, draw_striped, random_spec
from .fileio import atomic_dir
from .progress import ProgressCallback, report

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL_DIR = ASSETS / "demo-model"
DEMO_RESOLUTION = 64
DEMO_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (same rule as GPT-2 and CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges by rank, as CLIP's tokenizer does."""
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def tiny_vocab(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: every byte (so any prompt tokenizes) plus one token per demo word."""
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:  # join what the earlier merges left, left to right
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append(f"{parts[0]} {parts[1]}")
            vocab_list.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=77)


# --------------------------------------------------------------------------- architecture
def tiny_unet_config() -> dict:
    return dict(
        sample_size=DEMO_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=8,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEMO_RESOLUTION,
    )


def tiny_text_config(vocab_size: int, eos_token_id: int, bos_token_id: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def random_demo_pipeline(seed: int = 0):
    """The demo architecture with freshly initialised (untrained) weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(**tiny_text_config(len(tok), tok.eos_token_id, tok.bos_token_id)))
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- build (train) the demo model
@dataclass
class DemoBuildConfig:
    seed: int = 0
    vae_steps: int = 400
    unet_steps: int = 1500
    batch_size: int = 32
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
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
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(cfg.vae_steps):
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
        if step % 20 == 0 or step == cfg.vae_steps - 1:
            report(progress, "demo-vae", step + 1, cfg.vae_steps, f"loss {loss.item():.4f}", loss=loss.item())
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
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    warm = max(1, cfg.unet_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.unet_steps))))
    text.train()
    unet.train()
    for step in range(cfg.unet_steps):
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
        if step % 20 == 0 or step == cfg.unet_steps - 1:
            report(progress, "demo-unet", step + 1, cfg.unet_steps, f"loss {loss.item():.4f}", loss=loss.item())
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
                                                     "config": vars(cfg or DemoBuildConfig())}, indent=2))
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


# --------------------------------------------------------------------------- demo style dataset
def make_demo_dataset(out_dir: str | Path, count: int = 24, seed: int = 1, repeats: int = 10,
                      trigger: str = "") -> Path:
    """Write the demo *style* dataset: striped shapes with ``.txt`` captions, in a kohya ``N_name`` folder."""
    folder = Path(out_dir) / f"{repeats}_stripes"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        spec: ShapeSpec = random_spec(rng)
        draw_striped(spec, DEMO_RESOLUTION).save(folder / f"{i:03d}.png")
        caption = f"{trigger}, {spec.caption}" if trigger else spec.caption
        (folder / f"{i:03d}.txt").write_text(caption, encoding="utf-8")
    return Path(out_dir)
