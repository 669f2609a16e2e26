"""Validation loss: held-out pictures scored at fixed timesteps with fixed noise, so the curve compares across
steps and across runs with the same seed.

The noise comes from private generators seeded from the config seed and the picture's number: scoring draws
nothing from the training RNG and changes no training batch. The models are scored in eval mode (no dropout)
without gradients, then put back in the mode they were in.
"""

from __future__ import annotations

import random

import torch

from ..errors import DatasetError
from ..names import as_text
from .cache import LatentCache
from .config import TrainConfig
from .dataset import BucketBatches, ImageItem, scan_images
from .objective import diffusion_loss

TIMESTEPS = 4                 # each picture is scored at this many timesteps, spread evenly over the schedule
_NOISE_STREAM = 0x5EED_0000   # keeps the validation noise apart from the training noise of the same seed


def split_items(items: list[ImageItem], share: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items, held-out items): ``share`` of the pictures (at least one) chosen by ``seed``."""
    if share <= 0:
        return items, []
    held_n = max(1, round(len(items) * share))
    if held_n >= len(items):
        raise DatasetError(f"validation_split = {share} of {len(items)} picture(s) would hold out {held_n}, leaving "
                           "nothing to train on. Lower validation_split, add pictures, or give a validation_dir.")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:held_n])
    return [it for i, it in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def validation_items(cfg: TrainConfig, items: list[ImageItem]) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items, validation items) as the config says: a held-out share, a separate folder, or none."""
    if cfg.validation_dir:
        held = scan_images(cfg.validation_dir, cfg.caption_extension, cfg.trigger_word)
        train_paths = {it.path.resolve() for it in items}
        shared = [it for it in held if it.path.resolve() in train_paths]
        if shared:
            raise DatasetError(f"validation_dir {as_text(cfg.validation_dir)} holds training pictures (e.g. "
                               f"{as_text(str(shared[0].path))}); give a folder outside data_dir.")
        return items, held
    return split_items(items, cfg.validation_split, cfg.seed)


class Validator:
    """``validator(unet, modules, accelerator) -> mean validation loss`` for the current LoRA weights."""

    def __init__(self, cfg: TrainConfig, items: list[ImageItem], vae, conditioner, noise_scheduler,
                 prediction: str, cache_dir, accelerator) -> None:
        self.items = BucketBatches(items, 1, cfg.seed, cfg.resolution, cfg.enable_buckets, cfg.min_bucket_reso,
                                   cfg.max_bucket_reso, cfg.bucket_reso_step).items
        self.latents = LatentCache(vae, self.items, cfg.cache_latents, cache_dir, chunk=cfg.batch_size)
        self.conditioner, self.scheduler, self.prediction = conditioner, noise_scheduler, prediction
        self.seed, self.min_snr_gamma = cfg.seed, cfg.min_snr_gamma
        with torch.no_grad(), accelerator.autocast():  # after the training captions, so their chunks are unchanged
            conditioner.precompute(sorted({it.caption for it in self.items}))
        n = noise_scheduler.config.num_train_timesteps
        self.timesteps = torch.linspace(0, n - 1, TIMESTEPS + 2)[1:-1].round().long()

    def _noise(self, i: int, shape: torch.Size) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + _NOISE_STREAM + i) % (2 ** 63))
        return torch.randn((TIMESTEPS, *shape), generator=gen)

    def __call__(self, unet, modules, accelerator) -> float:
        device = accelerator.device
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        total = 0.0
        try:
            with torch.no_grad(), accelerator.autocast():
                for i, it in enumerate(self.items):
                    x0 = self.latents.get([i])
                    noise = self._noise(i, x0.shape[1:])
                    x0 = x0.expand(TIMESTEPS, *x0.shape[1:]).to(device)
                    noise, t = noise.to(device), self.timesteps.to(device)
                    noisy = self.scheduler.add_noise(x0, noise, t)
                    states, added = self.conditioner([it.caption] * TIMESTEPS, [it] * TIMESTEPS)
                    pred = unet(noisy, t, encoder_hidden_states=states, added_cond_kwargs=added).sample
                    loss = diffusion_loss(pred, x0, noise, t, self.scheduler, self.prediction, self.min_snr_gamma)
                    total += float(loss)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        return total / len(self.items)
