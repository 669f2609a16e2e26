"""What a training folder holds, as the trainer will see it: images, captions, repeats and aspect buckets.

Uses the trainer's own scanner and bucketer (``train.dataset``), so the preview cannot disagree with training.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image

from .errors import DatasetError
from .names import as_text
from .train.config import TrainConfig
from .train.dataset import BucketBatches, ImageItem, scan_images
from .train.images import IMAGE_SUFFIXES, load_image

CAPTION_SUFFIXES = (".txt", ".caption")


@dataclass
class DatasetPreview:
    folder: Path
    items: list[ImageItem]
    buckets: dict[tuple[int, int], int]      # (width, height) -> images per epoch (repeats counted)
    images_per_epoch: int
    concepts: dict[str, int] = field(default_factory=dict)   # "10_stripes" -> image files

    def text(self) -> str:
        buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.buckets.items())
        concepts = ", ".join(f"{k} ({n} images)" for k, n in self.concepts.items())
        return (f"{len(self.items)} images in {as_text(str(self.folder))} ({concepts}); {self.images_per_epoch} per "
                f"epoch with repeats. Buckets: {buckets}.")

    def gallery(self, limit: int = 64) -> list[tuple[str | Image.Image, str]]:
        """(picture, caption) of the first ``limit`` items for a gallery: the file's path, or a small copy of the
        picture when its name is not valid UTF-8 (a web page cannot carry that name)."""
        out: list[tuple[str | Image.Image, str]] = []
        for it in self.items[:limit]:
            path = str(it.path)
            if as_text(path) != path:
                img = load_image(it.path)
                img.thumbnail((256, 256))
                out.append((img, it.caption))
            else:
                out.append((path, it.caption))
        return out


def preview_dataset(folder: str | Path, config: TrainConfig | None = None) -> DatasetPreview:
    """Scan ``folder`` like training would (``DatasetError`` when it holds no usable images)."""
    cfg = config or TrainConfig()
    items = scan_images(folder, cfg.caption_extension, cfg.trigger_word)
    batches = BucketBatches(items, 1, cfg.seed, cfg.resolution, cfg.enable_buckets, cfg.min_bucket_reso,
                            cfg.max_bucket_reso, cfg.bucket_reso_step)
    concepts: dict[str, int] = {}
    for it in items:
        key = f"{it.repeats}_{it.concept}"
        concepts[key] = concepts.get(key, 0) + 1
    return DatasetPreview(Path(folder), batches.items, batches.bucket_counts, sum(batches.bucket_counts.values()),
                          concepts)


def import_images(files: Iterable[str | Path], dest: str | Path, repeats: int = 10, concept: str = "upload") -> Path:
    """Copy uploaded images (and caption files with the same stem) into ``dest/<repeats>_<concept>/``, the
    kohya folder layout training reads; returns ``dest``. Other files are refused with their names."""
    files = [Path(f) for f in files]
    bad = [f.name for f in files if f.suffix.lower() not in (*IMAGE_SUFFIXES, *CAPTION_SUFFIXES)]
    if bad:
        raise DatasetError(f"these uploads are not images or captions: {', '.join(bad[:5])}. Upload "
                           f"{', '.join(sorted(IMAGE_SUFFIXES))} images with optional .txt captions.")
    if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
        raise DatasetError("no images among the uploaded files; upload .png/.jpg/.webp images.")
    if repeats < 1 or not concept.replace("-", "").replace("_", "").isalnum():
        raise DatasetError(f"repeats {repeats} must be at least 1 and the concept {concept!r} a plain word.")
    folder = Path(dest) / f"{repeats}_{concept}"
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)
    return Path(dest)
