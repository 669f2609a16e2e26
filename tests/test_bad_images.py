"""Training pictures and captions that real folders hold: truncated, CMYK, 16-bit, palette with transparency,
EXIF-rotated, 1x1, huge (decompression-bomb limit), not an image at all, a file name that is not UTF-8; captions
in cp1252 / UTF-16 with and without a BOM, with control characters, 1 MB long, or a file too big to be one;
folders that are empty, hold only bad files, or ask for absurd repeat counts."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

import bad_inputs as B
from lora_studio.errors import DatasetError
from lora_studio.train.dataset import BucketBatches, caption_for, read_caption_file, scan_images, tag_frequency
from lora_studio.train.images import fit_to_bucket, load_image, to_tensor

GOOD = ("cmyk_jpeg", "png16", "palette_transparent", "exif_rotated", "one_pixel")
BAD = ("truncated_jpeg", "not_an_image")


@pytest.fixture()
def cases(tmp_path):
    return B.image_cases(tmp_path / "5_mixed")


def test_scan_keeps_the_readable_and_names_each_skipped_file(cases, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = scan_images(tmp_path)
    assert sorted(it.path for it in items) == sorted(cases[n] for n in GOOD)
    messages = [str(w.message) for w in caught]
    for name in BAD:
        assert any(cases[name].name in m and "cannot be read as an image" in m for m in messages), messages
    assert all(it.repeats == 5 and it.concept == "mixed" for it in items)


@pytest.mark.parametrize("name", GOOD)
def test_every_readable_kind_becomes_an_rgb_training_tensor(cases, name):
    img = load_image(cases[name])
    assert img.mode == "RGB"
    t = to_tensor(fit_to_bucket(img, (64, 48)))
    assert t.shape == (3, 48, 64) and t.min() >= -1 and t.max() <= 1


def test_exif_orientation_is_honoured(cases):
    """Stored 40 wide and 64 high with 'rotate 90' in EXIF: it is a wide picture."""
    with Image.open(cases["exif_rotated"]) as raw:
        assert raw.size == (40, 64)
        stored = np.asarray(raw.convert("RGB"))
    img = load_image(cases["exif_rotated"])
    assert img.size == (64, 40)
    # orientation 6 means "rotate 90 clockwise to display": the stored left column becomes the top row
    shown = np.asarray(img).astype(int)
    expected = np.rot90(stored, k=-1).astype(int)
    assert np.abs(shown - expected).mean() < 3


def test_16_bit_png_keeps_its_range(cases):
    """A 0..65535 ramp becomes a 0..255 ramp, not a white or clipped picture."""
    arr = np.asarray(load_image(cases["png16"]))[..., 0]
    assert arr.min() == 0 and arr.max() == 255
    assert np.all(np.diff(arr.reshape(-1).astype(int)) >= 0)


def test_palette_transparency_becomes_white(cases):
    with Image.open(cases["palette_transparent"]) as raw:
        idx = np.asarray(raw)
    rgb = np.asarray(load_image(cases["palette_transparent"]))
    assert (idx == 0).any()
    assert np.all(rgb[idx == 0] == 255)
    assert not np.all(rgb[idx != 0] == 255)


def test_cmyk_jpeg_colours_survive(cases):
    """CMYK -> RGB: a noisy picture stays noisy (not flat, not black) at its own size."""
    img = np.asarray(load_image(cases["cmyk_jpeg"])).astype(int)
    assert img.shape == (48, 64, 3) and img.std() > 30  # a noisy picture, not a flat or black one


def test_one_pixel_picture_fills_a_bucket(cases, tmp_path):
    items = [it for it in scan_images(tmp_path) if it.path == cases["one_pixel"]]
    batches = BucketBatches(items, 1, 0, 64, True, 32, 128, 8)
    bucket = batches.items[0].bucket
    assert bucket == (64, 64)
    img = fit_to_bucket(load_image(cases["one_pixel"]), bucket)
    assert img.size == (64, 64) and img.getpixel((10, 50)) == (200, 10, 10)


def test_decompression_bomb_limit_is_respected(tmp_path, monkeypatch):
    """PIL refuses pictures over twice MAX_IMAGE_PIXELS before decoding them; the scan skips such a file
    with a message naming it and the limit, and a folder of nothing else is a DatasetError."""
    big = B.large_image(tmp_path, 400, 300)  # 120,000 pixels, over a limit of 2 x 20,000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    with pytest.raises(Image.DecompressionBombError):
        load_image(big)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DatasetError) as info:
        warnings.simplefilter("always")
        scan_images(tmp_path)
    assert any(big.name in str(w.message) and "exceeds limit" in str(w.message) for w in caught)
    B.assert_helpful(info.value, (("1 unreadable",),))


@pytest.mark.parametrize("case", B.CAPTION_CASES)
def test_captions_in_other_encodings(tmp_path, case):
    """BOMs, UTF-16 without a BOM (told by its NUL bytes), cp1252; control characters dropped."""
    writer, expected = B.CAPTION_CASES[case]
    img = tmp_path / "pic.png"
    Image.new("RGB", (8, 8)).save(img)
    writer(img.with_suffix(".txt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_caption_file(img.with_suffix(".txt")) == expected
    assert caption_for(img) == expected
    # only a legacy 8-bit encoding is a guess worth a warning
    assert [("not UTF-8" in str(w.message)) for w in caught] == ([True] if case == "cp1252" else [])


@pytest.mark.parametrize("case", B.FOLDER_CASES)
def test_bad_training_folders_are_named(tmp_path, case):
    """Absurd repeat counts (refused at once, not after hours of listing repeats) and a caption file too big to
    be one: a DatasetError naming the folder or file, the count and the limit."""
    build, words = B.FOLDER_CASES[case]
    with pytest.raises(DatasetError) as info:
        scan_images(build(tmp_path))
    B.assert_helpful(info.value, words)


def test_huge_caption_is_cut_and_metadata_is_capped(tmp_path):
    """A 1 MB caption trains on its first 10,000 characters (with a warning) and its tags do not flood the LoRA's
    ss_tag_frequency; one huge tag is cut; the most frequent tags are the ones kept."""
    from lora_studio.train import dataset as D

    folder = tmp_path / "3_style"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    B.caption_huge(folder / "0.txt")
    (folder / "1.txt").write_text("tag00001, " + "x" * 5000, encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = scan_images(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("0.txt" in m and "characters long" in m for m in messages), messages
    assert any("longer than 1,000 characters" in m for m in messages), messages
    by_name = {it.path.name: it.caption for it in items}
    assert len(by_name["0.png"]) <= D.MAX_CAPTION_CHARS and by_name["0.png"].startswith("tag00000, tag00001")
    assert not by_name["0.png"].endswith(",")
    freq = tag_frequency(items)
    assert len(json.dumps(freq)) <= D.MAX_TAG_FREQUENCY_CHARS
    tags = freq["3_style"]
    assert tags["tag00001"] == 2                                       # in two captions: kept
    assert max(len(t) for t in tags) == D.MAX_TAG_CHARS                 # the 5,000-character tag, cut
    assert sum(1 for t in tags if t.startswith("tag")) <= D.MAX_TAGS_PER_CAPTION


def test_file_name_that_is_not_utf8_trains(tmp_path):
    """A picture named in Latin-1 bytes: captioned from its name decoded leniently, shown in the preview, and
    a real (1-step) run writes a LoRA whose metadata carries the decoded name; before the fix the tokenizer
    raised TypeError after the model had loaded."""
    from lora_studio.dataset_preview import preview_dataset
    from lora_studio.demo import random_demo_pipeline
    from lora_studio.fileio import load_safetensors
    from lora_studio.train.config import TrainConfig
    from lora_studio.train.trainer import train

    data = B.latin1_file_name(tmp_path / "data")
    (item,) = scan_images(data)
    assert item.caption == "café crème" and "\udce9" in str(item.path)
    (entry,) = preview_dataset(data).gallery()
    assert isinstance(entry[0], Image.Image) and entry[1] == "café crème"   # no undecodable name for the page
    cfg = TrainConfig(data_dir=str(data), output_dir=str(tmp_path / "out"), run_name="run", resolution=64,
                      min_bucket_reso=32, max_bucket_reso=128, bucket_reso_step=8, rank=2, alpha=2.0, steps=1,
                      batch_size=1, cache_latents="disk", save_precision="fp32")
    result = train(cfg, pipeline=random_demo_pipeline())
    _, meta = load_safetensors(result.lora_path)
    assert json.loads(meta["ss_tag_frequency"]) == {"1_data": {"café crème": 1}}


def test_empty_folder_and_all_bad_folder_are_dataset_errors(tmp_path, cases):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as info:
        scan_images(empty)
    B.assert_helpful(info.value, (("no usable training images",), ("no files ending in",)))
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in BAD:
        (bad / cases[name].name).write_bytes(cases[name].read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError) as info:
            scan_images(bad)
    B.assert_helpful(info.value, (("2 image file(s) found, 2 unreadable",),))
    with pytest.raises(DatasetError) as info:
        scan_images(tmp_path / "nowhere")
    B.assert_helpful(info.value, (("does not exist",),))
