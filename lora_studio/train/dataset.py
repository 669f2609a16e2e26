"""The training set: an image folder with captions, kohya-style repeats, aspect buckets and batch order.

Batch order, caption dropout and tag shuffling are pure functions of (seed, epoch, position), so a resumed run
sees exactly the batches an uninterrupted run would (no sampler state to save).
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DatasetError
from .images import IMAGE_SUFFIXES, choose_bucket, load_image, make_buckets

REPEATS_RE = re.compile(r"^(\d+)_(.+)$")
CAPTION_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")  # latin-1 decodes any byte string, so it is last


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str                 # with the trigger word, before dropout/shuffle
    repeats: int
    concept: str                 # the folder name ("10_stripes" -> "stripes"), for ss_tag_frequency
    size: tuple[int, int]        # (width, height) after EXIF orientation
    bucket: tuple[int, int] = (0, 0)


def read_caption_file(path: Path) -> str:
    """A sidecar caption; UTF-8 first, then Windows-1252/Latin-1 for files written by older tools."""
    raw = path.read_bytes()
    # UTF-16 (Windows Notepad's "Unicode") is recognised by its byte-order mark; cp1252 would decode it as garbage
    for enc in ("utf-16",) * raw.startswith((b"\xff\xfe", b"\xfe\xff")) + CAPTION_ENCODINGS:
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return ", ".join(lines)


def caption_for(image: Path, caption_extension: str = ".txt") -> str:
    """Caption from a sidecar (``.txt`` or the configured extension, then ``.caption``), else the file name."""
    for ext in dict.fromkeys((caption_extension, ".txt", ".caption")):
        side = image.with_suffix(ext)
        if side.is_file():
            return read_caption_file(side)
    stem = re.sub(r"[_\-]+", " ", image.stem).strip()
    return stem if re.search(r"[A-Za-z]{2,}", stem) else ""  # "0001" or "IMG 1234"-free names carry no caption


def with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption
    if caption == trigger or caption.startswith(trigger + ","):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def repeats_and_concept(image: Path, root: Path) -> tuple[int, str]:
    """kohya folders: the nearest folder named ``N_name`` (between the image and the root) gives N repeats."""
    for folder in [image.parent, *image.parent.parents]:
        m = REPEATS_RE.match(folder.name)
        if m:
            return max(1, int(m.group(1))), m.group(2)
        if folder == root:
            break
    return 1, image.parent.name


def scan_images(root: str | Path, caption_extension: str = ".txt", trigger_word: str = "") -> list[ImageItem]:
    """Every readable picture under ``root`` (recursive, sorted). Unreadable files are skipped with one warning each."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"training folder {root} does not exist or is not a folder. Give a folder of images.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    items, skipped = [], 0
    for path in files:
        try:
            size = load_image(path).size
        except Exception as err:  # PIL raises many types for corrupt or truncated data
            skipped += 1
            warnings.warn(f"skipping {path}: it cannot be read as an image ({err}).", stacklevel=2)
            continue
        repeats, concept = repeats_and_concept(path, root)
        caption = with_trigger(caption_for(path, caption_extension), trigger_word)
        items.append(ImageItem(path, caption, repeats, concept, size))
    if not items:
        detail = f"{len(files)} image file(s) found, {skipped} unreadable" if files else \
            f"no files ending in {', '.join(sorted(IMAGE_SUFFIXES))}"
        raise DatasetError(f"no usable training images in {root} ({detail}). "
                           "Put PNG/JPEG/WebP pictures (and .txt captions) in that folder.")
    return items


def transform_caption(caption: str, rng: random.Random, dropout: float = 0.0, shuffle: bool = False,
                      keep_tokens: int = 0, trigger_word: str = "") -> str:
    """Caption dropout (-> "") and tag shuffle keeping the first ``keep_tokens`` tags (and the trigger) in place."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    keep = max(keep_tokens, 1 if trigger_word and tags[:1] == [trigger_word] else 0)
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per concept folder, how many images carry each tag."""
    freq: dict[str, Counter] = defaultdict(Counter)
    for it in items:
        for tag in {t.strip() for t in it.caption.split(",") if t.strip()}:
            freq[f"{it.repeats}_{it.concept}"][tag] += 1
    return {k: dict(v) for k, v in freq.items()}


class BucketBatches:
    """Assigns buckets and yields batches (lists of item indices, one bucket per batch) for any epoch.

    Each image appears ``repeats`` times per epoch. The order within an epoch comes from a generator seeded with
    ``(seed, epoch)``, so batch ``i`` of epoch ``e`` is always the same.
    """

    def __init__(self, items: list[ImageItem], batch_size: int, seed: int, resolution: int,
                 enable_buckets: bool = True, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> None:
        buckets = make_buckets(resolution, min_reso, max_reso, step) if enable_buckets else [(resolution, resolution)]
        self.items = [ImageItem(it.path, it.caption, it.repeats, it.concept, it.size, choose_bucket(it.size, buckets))
                      for it in items]
        self.batch_size = batch_size
        self.seed = seed
        self._by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, it in enumerate(self.items):
            self._by_bucket[it.bucket].extend([i] * it.repeats)
        self.batches_per_epoch = sum(-(-len(v) // batch_size) for v in self._by_bucket.values())
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        return {b: len(v) for b, v in sorted(self._by_bucket.items())}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        batches: list[list[int]] = []
        for bucket in sorted(self._by_bucket):
            idx = self._by_bucket[bucket]
            order = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
            batches += [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        batches = [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]
        self._cache = (epoch, batches)
        return batches

    def batch(self, micro_index: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of the ``micro_index``-th batch since the start of training."""
        epoch, pos = divmod(micro_index, self.batches_per_epoch)
        return epoch, self.epoch_batches(epoch)[pos]
