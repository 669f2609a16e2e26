"""One training step of the demo UNet with fp32 LoRA layers, as the trainer runs it, for the tests and the GPU
checks (``cuda_check.py``) that compare variants of that step (peft's input casts, lean_backward) bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_studio.demo import random_demo_pipeline
from peft.helpers import disable_input_dtype_casting

from lora_studio.train.adapters import InjectedLora, inject_lora, skips_input_casts
from lora_studio.train.config import TrainConfig

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def lora_unet(dtype: torch.dtype, *, skip_casts: bool = True, channels_last: bool = False, targets=ATTENTION,
              device: str = "cpu", **lora) -> tuple[torch.nn.Module, InjectedLora, int]:
    """The demo UNet frozen in ``dtype`` with fp32 LoRA layers whose factors are all non-zero (B too, so every
    LoRA path carries gradient into its input; 1-D DoRA magnitudes near 1). Returns (unet, the LoRA layers,
    how many skip peft's input cast: with ``skip_casts`` under a half-precision ``dtype``)."""
    unet = random_demo_pipeline().unet.requires_grad_(False).to(device, dtype)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    cfg = TrainConfig(rank=4, **lora)
    inj = inject_lora(unet, cfg, list(targets), "lora_unet_")
    gen = torch.Generator().manual_seed(1)
    for p in inj.parameters():
        p.data = (torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.dim() == 1 else 0.0)).float().to(device)
    if skip_casts and dtype != torch.float32 and skips_input_casts(cfg):
        casts_off = disable_input_dtype_casting(unet)  # open for the UNet's life, as the trainer's run holds it
        casts_off.__enter__()
        unet.casts_off = casts_off  # a generator's context closes (and restores the casts) when collected
    skipped = sum(not layer.cast_input_dtype_enabled for layer in inj.layers.values())
    return unet, inj, skipped


def unet_step(unet: torch.nn.Module, dtype: torch.dtype, size: int = 16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward + backward (under autocast for a half-precision ``dtype``); returns the output and every
    gradient, the trainable parameters' and the input's, and clears the parameters' gradients again."""
    device = unet.device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, size, size, generator=gen).to(device).requires_grad_(True)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen).to(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = unet(x, torch.tensor([10, 500], device=device), encoder_hidden_states=states).sample
        loss = F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
    loss.backward()
    grads = [p.grad.clone() for p in unet.parameters() if p.requires_grad] + [x.grad]
    for p in unet.parameters():
        p.grad = None
    return out.detach(), grads


def kept_step(unet: torch.nn.Module, dtype: torch.dtype, size: int = 16):
    """``unet_step``, and what it kept for the backward (a ``SavedActivations``; weights excluded)."""
    from bench.common import SavedActivations

    acts = SavedActivations(at=0, weights=unet.parameters)
    acts.after_step(0)
    out, grads = unet_step(unet, dtype, size)
    acts.after_step(1)
    return out, grads, acts
