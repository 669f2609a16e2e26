"""Encode once, reuse: VAE latents per image (in memory or on disk) and text-encoder states per caption.

Latents are the VAE posterior mean times the scaling factor (deterministic, so a cached and an uncached run agree).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from ..fileio import load_safetensors, save_safetensors_atomic
from ..progress import ProgressCallback, report
from .dataset import ImageItem
from .images import fit_to_bucket, load_image, to_tensor


def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    cfg = vae.config
    with torch.no_grad():
        lat = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return ((lat - shift) * cfg.scaling_factor).float()


def _vae_fingerprint(vae) -> str:
    h = hashlib.sha1(repr(sorted(vae.config.items())).encode())
    for t in list(vae.state_dict().values())[:4]:
        h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


class LatentCache:
    """Latents for every item. ``mode``: "memory" (encode all up front), "disk" (encode once into ``cache_dir``,
    reused across runs while image, bucket and VAE are unchanged) or "none" (encode each time)."""

    def __init__(self, vae, items: list[ImageItem], mode: str = "memory", cache_dir: Path | None = None,
                 progress: ProgressCallback | None = None, chunk: int = 8) -> None:
        self.vae, self.items, self.mode = vae, items, mode
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._mem: dict[int, torch.Tensor] = {}
        if mode == "none":
            return
        if mode == "disk":
            assert self.cache_dir is not None
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._fp = _vae_fingerprint(vae)
        todo = [i for i in range(len(items)) if not (mode == "disk" and self._disk_path(i).exists())]
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in todo:
            by_bucket.setdefault(items[i].bucket, []).append(i)
        done = 0
        for group in by_bucket.values():
            for k in range(0, len(group), chunk):
                idx = group[k:k + chunk]
                lat = encode_pixels(vae, torch.stack([self._pixels(i) for i in idx]))
                for i, z in zip(idx, lat):
                    if mode == "memory":
                        self._mem[i] = z.cpu()
                    else:
                        save_safetensors_atomic({"latent": z.cpu()}, self._disk_path(i))
                done += len(idx)
                report(progress, "cache latents", done, len(todo), f"{done}/{len(todo)} images encoded")

    def _pixels(self, i: int) -> torch.Tensor:
        it = self.items[i]
        return to_tensor(fit_to_bucket(load_image(it.path), it.bucket))

    def _disk_path(self, i: int) -> Path:
        it = self.items[i]
        st = it.path.stat()
        key = f"{it.path.resolve()}|{st.st_mtime_ns}|{st.st_size}|{it.bucket}|{self._fp}"
        # surrogateescape: a file name that is not UTF-8 hashes as its own bytes (the same key as before otherwise)
        return self.cache_dir / f"{hashlib.sha1(key.encode('utf-8', 'surrogateescape')).hexdigest()}.safetensors"

    def get(self, indices: list[int]) -> torch.Tensor:
        if self.mode == "memory":
            return torch.stack([self._mem[i] for i in indices])
        if self.mode == "disk":
            return torch.stack([load_safetensors(self._disk_path(i))[0]["latent"] for i in indices])
        return encode_pixels(self.vae, torch.stack([self._pixels(i) for i in indices])).cpu()


def encode_prompts(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    """Per-token states of the text encoder (the UNet's ``encoder_hidden_states``), CLIP-style padding to 77."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


class TextCache:
    """Outputs of frozen text encoders, computed once per distinct caption (shuffled captions add entries).

    ``encode(captions)`` returns a tuple of batch-first tensors (SD: the token states; SDXL: states and pooled).
    """

    def __init__(self, encode: Callable[[list[str]], tuple[torch.Tensor, ...]], enabled: bool = True) -> None:
        self.encode, self.enabled = encode, enabled
        self._mem: dict[str, tuple[torch.Tensor, ...]] = {}

    def get(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        if not self.enabled:
            with torch.no_grad():
                return self.encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._mem]
        if missing:
            with torch.no_grad():
                outs = self.encode(missing)
            for j, c in enumerate(missing):
                self._mem[c] = tuple(o[j] for o in outs)
        return tuple(torch.stack([self._mem[c][k] for c in captions]) for k in range(len(self._mem[captions[0]])))

    def fill(self, captions: list[str], chunk: int = 32) -> int:
        """Encode every caption not cached yet, ``chunk`` at a time, before training starts (so no step runs the
        text encoder, and it can leave the GPU). Returns how many were encoded."""
        if not self.enabled:
            return 0
        missing = [c for c in dict.fromkeys(captions) if c not in self._mem]
        for k in range(0, len(missing), chunk):
            self.get(missing[k:k + chunk])
        return len(missing)

    def __len__(self) -> int:
        return len(self._mem)
