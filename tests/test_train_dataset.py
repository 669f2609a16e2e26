"""Training folder scanning, captions, repeats, image conversion and aspect buckets."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lora_studio.errors import DatasetError
from lora_studio.train.dataset import BucketBatches, ImageItem, scan_images, tag_frequency, transform_caption
from lora_studio.train.images import choose_bucket, fit_to_bucket, load_image, make_buckets, to_rgb


def _png(path, size=(64, 64), color=(200, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_scan_recursive_captions_repeats_and_trigger(tmp_path):
    _png(tmp_path / "5_style" / "a.png")
    (tmp_path / "5_style" / "a.txt").write_text("a red circle, striped\n", encoding="utf-8")
    _png(tmp_path / "5_style" / "deep" / "b.jpg")
    (tmp_path / "5_style" / "deep" / "b.caption").write_bytes("caf\xe9 au lait".encode("cp1252"))
    _png(tmp_path / "plain" / "blue_square-drawing.webp")
    _png(tmp_path / "plain" / "0001.png")
    (tmp_path / "notes.md").write_text("not an image")
    items = scan_images(tmp_path, trigger_word="sks")
    by_name = {it.path.name: it for it in items}
    assert sorted(by_name) == ["0001.png", "a.png", "b.jpg", "blue_square-drawing.webp"]
    assert by_name["a.png"].caption == "sks, a red circle, striped"
    assert by_name["a.png"].repeats == 5 and by_name["a.png"].concept == "style"
    assert by_name["b.jpg"].caption == "sks, café au lait"          # non-UTF-8 sidecar decoded
    assert by_name["b.jpg"].repeats == 5                            # nearest N_name folder above it
    assert by_name["blue_square-drawing.webp"].caption == "sks, blue square drawing"
    assert by_name["blue_square-drawing.webp"].repeats == 1
    assert by_name["0001.png"].caption == "sks"                     # no caption at all -> the trigger word
    assert {it.path.name: it.caption for it in scan_images(tmp_path)}["0001.png"] == ""


def test_unreadable_files_warn_once_each_and_empty_set_is_an_error(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    good.write_bytes(good.read_bytes()[:200])                     # truncated JPEG
    with pytest.warns(UserWarning) as rec:
        items = scan_images(tmp_path)
    assert [it.path.name for it in items] == ["ok.png"]
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2 and any("broken.png" in m for m in msgs) and any("cut.jpg" in m for m in msgs)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no usable training images"):
        scan_images(empty)
    (empty / "x.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="1 image file.*1 unreadable"):
        scan_images(empty)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_images(tmp_path / "missing")


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    ImageDraw.Draw(img).rectangle((0, 0, 9, 19), fill=(0, 0, 255))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6                                                # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    top = np.asarray(out)[:5].mean(axis=(0, 1))
    assert top[2] > 150 and top[0] < 100                            # the blue band is now at the top


def test_colour_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))               # fully transparent -> white background
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))              # pure red in CMYK
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # 16-bit mid grey, not clipped to white
    assert deep.mode.startswith("I;16")
    assert to_rgb(deep).getpixel((0, 0)) == (128, 128, 128)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 200, 0] * 256)
    assert to_rgb(pal).getpixel((0, 0)) == (0, 200, 0)
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_buckets_keep_aspect_without_distortion():
    buckets = make_buckets(64, 32, 128, 8)
    assert all(w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 for w, h in buckets)
    assert (64, 64) in buckets
    assert choose_bucket((240, 100), buckets) == (96, 40)           # wide image -> a wide bucket
    assert choose_bucket((100, 240), buckets) == (40, 96)
    # a circle in a wide picture stays a circle after resizing into its bucket (cover + centre crop)
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((70, 20, 130, 80), fill=(0, 0, 0))
    out = np.asarray(fit_to_bucket(img, (96, 40))).mean(axis=2) < 128
    ys, xs = np.nonzero(out)
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert out.shape == (40, 96)
    assert abs(width - height) <= 1


def test_caption_dropout_and_shuffle_keep_first_tokens():
    rng = random.Random(0)
    caption = "sks, a, b, c, d, e, f"
    seen = {transform_caption(caption, rng, shuffle=True, keep_tokens=2) for _ in range(50)}
    assert len(seen) > 10
    assert all(s.startswith("sks, a, ") and sorted(s.split(", ")) == sorted(caption.split(", ")) for s in seen)
    shuffled = [transform_caption(caption, rng, shuffle=True, trigger_word="sks") for _ in range(20)]
    assert all(s.startswith("sks, ") for s in shuffled)             # the trigger always stays first
    drops = sum(transform_caption(caption, rng, dropout=0.3) == "" for _ in range(2000))
    assert 500 < drops < 700
    assert transform_caption(caption, rng) == caption


def _items(n, repeats=1, size=(64, 64)):
    return [ImageItem(__import__("pathlib").Path(f"{i}.png"), f"a, t{i % 2}", repeats, "c", size) for i in range(n)]


def test_batches_cover_repeats_are_seeded_and_bucket_pure():
    items = _items(5, repeats=3) + _items(2, size=(200, 100))
    bb = BucketBatches(items, batch_size=2, seed=7, resolution=64, min_reso=32, max_reso=128, step=8)
    e0 = bb.epoch_batches(0)
    flat = sorted(i for b in e0 for i in b)
    assert flat == sorted([i for i in range(5) for _ in range(3)] + [5, 6])
    assert all(len({bb.items[i].bucket for i in b}) == 1 for b in e0)  # one bucket per batch
    assert bb.batches_per_epoch == len(e0) == 8 + 1
    again = BucketBatches(items, batch_size=2, seed=7, resolution=64, min_reso=32, max_reso=128, step=8)
    assert again.epoch_batches(0) == e0 and again.batch(len(e0) + 3) == (1, bb.epoch_batches(1)[3])
    assert bb.epoch_batches(1) != e0
    other = BucketBatches(items, batch_size=2, seed=8, resolution=64, min_reso=32, max_reso=128, step=8)
    assert other.epoch_batches(0) != e0


def test_tag_frequency_counts_images_per_concept():
    freq = tag_frequency(_items(4, repeats=10))
    assert freq == {"10_c": {"a": 4, "t0": 2, "t1": 2}}


def _listed_order(items, batch_size, seed, epoch):
    """The batch order as it was computed before repeats became index arithmetic: every repeat listed, each
    bucket's list shuffled, the batches shuffled. The reference that keeps resumed runs bit-identical."""
    import torch

    by_bucket: dict = {}
    for i, it in enumerate(items):
        by_bucket.setdefault(it.bucket, []).extend([i] * it.repeats)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = []
    for bucket in sorted(by_bucket):
        idx = by_bucket[bucket]
        order = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        batches += [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


def test_repeats_are_not_listed_and_the_order_is_unchanged():
    """Regression guard (it passes before and after the change): the batch order equals the listed-repeats
    order for mixed repeat counts, buckets and batch sizes; and a folder at the repeat limit needs no list of
    its repeats to give any batch."""
    rng = random.Random(0)
    for _ in range(12):
        items = [ImageItem(__import__("pathlib").Path(f"{i}.png"), "a", rng.choice([1, 2, 3, 10, 40]), "c",
                           rng.choice([(64, 64), (200, 100), (100, 200)])) for i in range(rng.randint(1, 12))]
        bs, seed = rng.choice([1, 2, 3, 8]), rng.randint(0, 99)
        bb = BucketBatches(items, bs, seed, 64, min_reso=32, max_reso=128, step=8)
        for epoch in range(2):
            assert bb.epoch_batches(epoch) == _listed_order(bb.items, bs, seed, epoch)
    big = BucketBatches(_items(3, repeats=10_000), batch_size=4, seed=1, resolution=64, min_reso=32, max_reso=128,
                        step=8)
    assert big.batches_per_epoch == 7_500 and big.bucket_counts == {(64, 64): 30_000}
    assert big.batch(7_500 + 3) == (1, big.epoch_batches(1)[3])
