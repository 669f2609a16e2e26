"""Reading training pictures: EXIF orientation, colour modes, and cover-resize + centre-crop into a bucket.

Written with PIL by hand (torchvision is not usable beside this torch build); each step is a few lines.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
BACKGROUND = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency over white, CMYK/greyscale/palette converted, 16-bit scaled down."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(path: str | Path) -> Image.Image:
    """Open, decode fully (so truncated files fail here), honour EXIF orientation, convert to RGB."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, each side in [min_reso, max_reso], area <= resolution²."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    w = min_reso
    while w <= min(max_reso, resolution):  # the narrow side; the wide side is the largest that fits the area
        h = min(max_reso, (area // w) // step * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets)


def choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to the picture's; ties go to the larger area."""
    ar = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The smallest (width, height) with the picture's aspect ratio that covers the bucket."""
    bw, bh = bucket
    scale = max(bw / size[0], bh / size[1])
    return max(bw, round(size[0] * scale)), max(bh, round(size[1] * scale))


def crop_top_left(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the centre crop ``fit_to_bucket`` takes, in resized pixels (SDXL's crop conditioning)."""
    w, h = cover_size(size, bucket)
    return (h - bucket[1]) // 2, (w - bucket[0]) // 2


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale so the picture covers the bucket (keeping its aspect ratio), then crop the centre: no distortion."""
    w, h = cover_size(img.size, bucket)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    top, left = crop_top_left(img.size, bucket)
    return img.crop((left, top, left + bucket[0], top + bucket[1]))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL picture -> (3, H, W) float tensor in [-1, 1], as the VAE expects."""
    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0
