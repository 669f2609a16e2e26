"""The diffusion training objective for one batch: noise, timesteps, target, min-SNR weighting, noise offset.

All randomness comes from a CPU generator the caller seeds per batch, so a run is reproducible on any device
and a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, gen: torch.Generator, num_timesteps: int,
                 noise_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise (plus an optional per-channel offset, which lets the model learn overall brightness)
    and uniform integer timesteps, drawn on the CPU."""
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=gen)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=gen)
    t = torch.randint(0, num_timesteps, (b,), generator=gen)
    return noise, t


def diffusion_loss(pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   noise_scheduler, prediction_type: str, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean squared error against the epsilon or v target, optionally weighted per sample by min-SNR-gamma
    (Hang et al. 2023: weight min(SNR, gamma)/SNR for epsilon, min(SNR, gamma)/(SNR + 1) for v)."""
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    if min_snr_gamma > 0:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps).to(per_sample.device).float()
        clipped = torch.clamp(snr, max=min_snr_gamma)
        weight = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
        per_sample = per_sample * weight
    return per_sample.mean()
