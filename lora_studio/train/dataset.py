"""The training set: an image folder with captions, kohya-style repeats, aspect buckets and batch order.

Batch order, caption dropout and tag shuffling are pure functions of (seed, epoch, position), so a resumed run
sees exactly the batches an uninterrupted run would (no sampler state to save).
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import DatasetError
from ..names import as_text, decode_bytes
from .images import IMAGE_SUFFIXES, choose_bucket, load_image, make_buckets

REPEATS_RE = re.compile(r"^(\d+)_(.+)$")
# kohya repeats: a folder "N_name" shows its pictures N times an epoch. Counts past these are typing slips
# ("999999999_x"), and an epoch of that many items would take hours before step 1 to even order.
MAX_REPEATS = 10_000
MAX_EPOCH_ITEMS = 10_000_000
# Captions: a text encoder reads ~75 tokens (about 300 characters); longer captions get one warning, and a
# caption is cut at MAX_CAPTION_CHARS (room for tag shuffling to draw from). A bigger file is not a caption.
LONG_CAPTION_CHARS = 1_000
MAX_CAPTION_CHARS = 10_000
MAX_CAPTION_FILE_BYTES = 16 * 1024 * 1024
# ss_tag_frequency (LoRA metadata, read by A1111/Civitai to show tags): at most this many tags of each caption
# and characters of each tag, and at most this many characters of JSON in all (the most frequent tags are kept).
MAX_TAGS_PER_CAPTION = 100
MAX_TAG_CHARS = 100
MAX_TAG_FREQUENCY_CHARS = 200_000

# byte-order marks, UTF-32 first: a UTF-32-LE mark starts with the UTF-16-LE one
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe", "utf-16-le"),
         (b"\xfe\xff", "utf-16-be"))
_LINE_BREAK_CONTROLS = re.compile(r"[\x0b\x0c\x1c-\x1e\x85]")          # str.splitlines() breaks lines at these
_OTHER_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ufeff]")  # NUL, escape, stray BOMs ...


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str                 # with the trigger word, before dropout/shuffle
    repeats: int
    concept: str                 # the folder name ("10_stripes" -> "stripes"), for ss_tag_frequency
    size: tuple[int, int]        # (width, height) after EXIF orientation
    bucket: tuple[int, int] = (0, 0)


def _bomless_utf16(raw: bytes) -> str | None:
    """UTF-16 without a byte-order mark, told by where its NUL bytes fall: every ASCII character has a zero
    high byte, at odd positions in little-endian text and at even ones in big-endian. None when it is not."""
    half = len(raw) // 2
    if half == 0 or b"\x00" not in raw:
        return None
    nul_even, nul_odd = raw[0::2].count(0), raw[1::2].count(0)
    if nul_odd >= 0.3 * half and nul_even <= 0.05 * half:
        return "utf-16-le"
    if nul_even >= 0.3 * half and nul_odd <= 0.05 * half:
        return "utf-16-be"
    return None


def decode_caption(raw: bytes) -> tuple[str, str]:
    """``(text, encoding)`` of a caption file: a byte-order mark (UTF-8/16/32), else UTF-16 recognised by its
    NUL bytes (Notepad's "Unicode" saved without a mark), else UTF-8, else Windows-1252 / Latin-1."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return decode_bytes(raw[3:])
    for bom, enc in _BOMS:
        if raw.startswith(bom):
            return raw[len(bom):].decode(enc, errors="replace"), enc
    enc = _bomless_utf16(raw)
    if enc:
        return raw.decode(enc, errors="replace"), enc
    return decode_bytes(raw)


def clean_caption(text: str) -> str:
    """One line of tags: control characters dropped, tabs and runs of spaces made one space, lines joined
    with ", " (a caption file with one tag per line is a tag list)."""
    text = _OTHER_CONTROLS.sub("", _LINE_BREAK_CONTROLS.sub("\n", text))
    lines = (" ".join(ln.split()) for ln in text.splitlines())
    return ", ".join(ln for ln in lines if ln)


def read_caption_file(path: Path) -> str:
    """A sidecar caption as clean text (``decode_caption`` + ``clean_caption``). Every caption is read here."""
    shown = as_text(str(path))
    try:
        size = path.stat().st_size
        if size > MAX_CAPTION_FILE_BYTES:
            raise DatasetError(f"caption file {shown} is {size / 2 ** 20:.0f} MB, too large to be a caption (the "
                               f"limit is {MAX_CAPTION_FILE_BYTES // 2 ** 20} MB). Check that it is the right file, "
                               "or rename it so it is not read as a picture's caption.")
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read caption file {shown}: {err.strerror or err}. Check its permissions, "
                           "or remove it to caption the picture from its file name.") from err
    text, enc = decode_caption(raw)
    if enc in ("cp1252", "latin-1"):
        warnings.warn(f"caption {shown} is not UTF-8; read it as {enc}. If its accents look wrong, save it as "
                      "UTF-8.", stacklevel=2)
    caption = clean_caption(text)
    if len(caption) > MAX_CAPTION_CHARS:
        full = len(caption)
        cut = caption.rfind(",", 0, MAX_CAPTION_CHARS + 1)  # at a tag boundary when there is one
        caption = caption[:cut if cut > 0 else MAX_CAPTION_CHARS].rstrip(", ")
        warnings.warn(f"caption {shown} is {full:,} characters long; kept the first {len(caption):,} (a "
                      "text encoder reads about 300). Shorten it.", stacklevel=2)
    return caption


def caption_for(image: Path, caption_extension: str = ".txt") -> str:
    """Caption from a sidecar (``.txt`` or the configured extension, then ``.caption``), else the file name
    (a name that is not UTF-8 is decoded leniently)."""
    for ext in dict.fromkeys((caption_extension, ".txt", ".caption")):
        side = image.with_suffix(ext)
        if side.is_file():
            return read_caption_file(side)
    stem = clean_caption(re.sub(r"[_\-]+", " ", as_text(image.stem)))
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
            repeats = int(m.group(1))
            if repeats > MAX_REPEATS:
                raise DatasetError(f"folder {as_text(str(folder))} asks for {repeats:,} repeats (its name starts with "
                                   f"{m.group(1)}_), over the limit of {MAX_REPEATS:,}. Rename it with a smaller "
                                   f"count, e.g. 10_{as_text(m.group(2))}; train longer with more steps instead.")
            return max(1, repeats), as_text(m.group(2))
        if folder == root:
            break
    return 1, as_text(image.parent.name)


def scan_images(root: str | Path, caption_extension: str = ".txt", trigger_word: str = "") -> list[ImageItem]:
    """Every readable picture under ``root`` (recursive, sorted). Unreadable files are skipped with one warning each."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"training folder {as_text(str(root))} does not exist or is not a folder. Give a folder "
                           "of images.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    items, skipped = [], 0
    for path in files:
        try:
            size = load_image(path).size
        except Exception as err:  # PIL raises many types for corrupt or truncated data
            skipped += 1
            warnings.warn(f"skipping {as_text(str(path))}: it cannot be read as an image ({err}).", stacklevel=2)
            continue
        repeats, concept = repeats_and_concept(path, root)
        caption = with_trigger(caption_for(path, caption_extension), trigger_word)
        items.append(ImageItem(path, caption, repeats, concept, size))
    if not items:
        detail = f"{len(files)} image file(s) found, {skipped} unreadable" if files else \
            f"no files ending in {', '.join(sorted(IMAGE_SUFFIXES))}"
        raise DatasetError(f"no usable training images in {as_text(str(root))} ({detail}). "
                           "Put PNG/JPEG/WebP pictures (and .txt captions) in that folder.")
    _check_epoch(items, root)
    long = [it for it in items if len(it.caption) > LONG_CAPTION_CHARS]
    if long:
        top = max(long, key=lambda it: len(it.caption))
        warnings.warn(f"{len(long)} caption(s) are longer than {LONG_CAPTION_CHARS:,} characters (the longest, "
                      f"{len(top.caption):,}, is {as_text(top.path.name)}'s); a text encoder reads only about the "
                      "first 300, so the rest is ignored unless tags are shuffled.", stacklevel=2)
    return items


def _check_epoch(items: list[ImageItem], root: Path) -> None:
    total = sum(it.repeats for it in items)
    if total > MAX_EPOCH_ITEMS:
        per_folder: Counter = Counter()
        for it in items:
            per_folder[f"{it.repeats}_{it.concept}"] += it.repeats
        name, n = per_folder.most_common(1)[0]
        raise DatasetError(f"one epoch of {as_text(str(root))} would hold {total:,} pictures (images x repeats), "
                           f"over the limit of {MAX_EPOCH_ITEMS:,}; folder {name} gives {n:,} of them. Lower the "
                           "repeat counts in the folder names (N_name).")


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
    """kohya's ``ss_tag_frequency``: per concept folder, how many images carry each tag (within the caps above)."""
    freq: dict[str, Counter] = defaultdict(Counter)
    for it in items:
        tags = [t.strip() for t in it.caption.split(",") if t.strip()][:MAX_TAGS_PER_CAPTION]
        for tag in {t[:MAX_TAG_CHARS].strip() for t in tags}:
            freq[f"{it.repeats}_{it.concept}"][tag] += 1
    out = {k: dict(v) for k, v in freq.items()}
    if len(json.dumps(out)) <= MAX_TAG_FREQUENCY_CHARS:
        return out
    # Too much for metadata: keep the most frequent tags (of any folder) that fit.
    ranked = sorted(((n, k, tag) for k, c in freq.items() for tag, n in c.items()), key=lambda e: (-e[0], e[1], e[2]))
    kept: dict[str, dict[str, int]] = {}
    size = 2
    for n, k, tag in ranked:
        cost = len(json.dumps(tag)) + len(str(n)) + 4 + (0 if k in kept else len(json.dumps(k)) + 6)
        if size + cost > MAX_TAG_FREQUENCY_CHARS:
            break
        kept.setdefault(k, {})[tag] = n
        size += cost
    return kept


class BucketBatches:
    """Assigns buckets and yields batches (lists of item indices, one bucket per batch) for any epoch.

    Each image appears ``repeats`` times per epoch. The order within an epoch comes from a generator seeded with
    ``(seed, epoch)``, so batch ``i`` of epoch ``e`` is always the same. Repeats are not listed out: position
    ``j`` of a bucket's epoch is the image whose range of cumulative repeats holds ``j``.
    """

    def __init__(self, items: list[ImageItem], batch_size: int, seed: int, resolution: int,
                 enable_buckets: bool = True, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> None:
        buckets = make_buckets(resolution, min_reso, max_reso, step) if enable_buckets else [(resolution, resolution)]
        self.items = [replace(it, bucket=choose_bucket(it.size, buckets)) for it in items]
        self.batch_size = batch_size
        self.seed = seed
        members: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, it in enumerate(self.items):
            members[it.bucket].append(i)
        # per bucket (sorted): its item indices and their cumulative repeats
        self._by_bucket = {b: (torch.tensor(idx), torch.tensor([self.items[i].repeats for i in idx]).cumsum(0))
                           for b, idx in sorted(members.items())}
        self.batches_per_epoch = sum(-(-c // batch_size) for c in self.bucket_counts.values())
        self._cache: tuple[int, list[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        return {b: int(ends[-1]) for b, (_, ends) in self._by_bucket.items()}

    def _epoch(self, epoch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per bucket, the epoch's order of item indices; and every batch as (bucket number, start), shuffled.
        The generator draws exactly what listing each repeat and shuffling the lists would."""
        if self._cache and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        orders, starts = [], []
        for k, (idx, ends) in enumerate(self._by_bucket.values()):
            n = int(ends[-1])
            orders.append(idx[torch.searchsorted(ends, torch.randperm(n, generator=gen), right=True)])
            begin = torch.arange(0, n, self.batch_size)
            starts.append(torch.stack([torch.full_like(begin, k), begin], dim=1))
        table = torch.cat(starts) if starts else torch.zeros(0, 2, dtype=torch.long)
        table = table[torch.randperm(len(table), generator=gen)]
        self._cache = (epoch, orders, table)
        return orders, table

    def _batch_at(self, epoch: int, pos: int) -> list[int]:
        orders, table = self._epoch(epoch)
        k, start = table[pos].tolist()
        return orders[k][start:start + self.batch_size].tolist()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return [self._batch_at(epoch, pos) for pos in range(self.batches_per_epoch)]

    def batch(self, micro_index: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of the ``micro_index``-th batch since the start of training."""
        epoch, pos = divmod(micro_index, self.batches_per_epoch)
        return epoch, self._batch_at(epoch, pos)
