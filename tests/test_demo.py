"""The tiny demo model: real SD structure, deterministic build, recognisable pictures, the style dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lora_studio import demo
from lora_studio.demo.build import Stage
from lora_studio.demo.shapes import COLORS, WORDS, ShapeSpec, draw_striped, shape_mask


def test_tokenizer_has_one_token_per_demo_word_and_still_tokenizes_anything():
    tok = demo.tiny_tokenizer()
    for word in WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))  # <start> word <end>
    ids = tok("a Zebra-like ümlaut!").input_ids  # unknown words fall back to bytes, never to an unk token
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]


def test_demo_pipeline_has_the_real_sd_structure(demo_pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(demo_pipe.unet, UNet2DConditionModel)
    assert isinstance(demo_pipe.vae, AutoencoderKL)
    assert isinstance(demo_pipe.text_encoder, CLIPTextModel)
    names = {n for n, _ in demo_pipe.unet.named_modules()}
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert f"down_blocks.0.attentions.0.transformer_blocks.0.attn2.{proj}" in names
        assert f"mid_block.attentions.0.transformer_blocks.0.attn1.{proj}" in names
    attn2_k = demo_pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
    assert attn2_k.in_features == demo_pipe.text_encoder.config.hidden_size


def test_demo_build_is_deterministic(tmp_path):
    cfg = demo.DemoBuildConfig(vae=Stage(2, 2e-3), unet=Stage(2, 1e-3), pool_size=16, batch_size=4)
    a = demo.build_demo_pipeline(cfg)
    b = demo.build_demo_pipeline(cfg)
    c = demo.build_demo_pipeline(demo.DemoBuildConfig(vae=Stage(2, 2e-3), unet=Stage(2, 1e-3), pool_size=16, batch_size=4, seed=1))
    for comp in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, comp).state_dict() for p in (a, b, c))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), f"{comp}: the seed must matter"
    # the trained UNet moved away from its initialisation
    init = demo.random_demo_pipeline(cfg.seed).unet.state_dict()
    assert not all(torch.equal(init[k], a.unet.state_dict()[k]) for k in init)


def test_shipped_demo_model_is_small(demo_model_dir):
    size = sum(p.stat().st_size for p in demo_model_dir.rglob("*") if p.is_file())
    assert size < 20 * 1024 * 1024


def _render(pipe, prompt: str, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    img = pipe(prompt, num_inference_steps=20, guidance_scale=3.0, generator=gen,
               height=demo.DEMO_RESOLUTION, width=demo.DEMO_RESOLUTION).images[0]
    return np.asarray(img, dtype=np.float32)


CENTRE = ShapeSpec("red", "circle", 0.5, 0.5, 0.2)  # a region inside every demo shape (they jitter by 0.06)


@pytest.mark.parametrize("color", ["red", "green", "blue", "yellow"])
def test_demo_model_draws_the_colour_it_is_asked_for(demo_pipe, color):
    """Mean colour in the shape region is closest to the prompted colour, and the background stays light."""
    mask = np.asarray(shape_mask(CENTRE, demo.DEMO_RESOLUTION)) > 0
    for seed in (0, 1):
        img = _render(demo_pipe, f"a {color} circle", seed)
        centre = img[mask].mean(axis=0)
        nearest = min(COLORS, key=lambda c: np.linalg.norm(centre - np.array(COLORS[c])))
        assert nearest == color, (seed, centre.round())
        corners = np.concatenate([img[:6, :6].reshape(-1, 3), img[-6:, -6:].reshape(-1, 3)])
        assert corners.mean() > 180, corners.mean()


def _fill_ratio(img: np.ndarray) -> float:
    """Share of the drawn region's bounding box that is filled: square ~1, circle ~0.79, triangle ~0.5."""
    mask = np.linalg.norm(img - 255, axis=2) > 120
    ys, xs = np.nonzero(mask)
    assert len(ys), "nothing was drawn"
    return float(mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))


def test_demo_model_draws_the_shape_it_is_asked_for(demo_pipe):
    fill = {shape: np.mean([_fill_ratio(_render(demo_pipe, f"a {color} {shape}", seed))
                            for color in ("red", "blue", "green") for seed in (0, 1, 2)])
            for shape in ("square", "circle", "triangle")}
    assert fill["triangle"] + 0.2 < fill["circle"] < fill["square"] - 0.03, fill


def test_demo_dataset_is_a_kohya_folder_with_captions(tmp_path):
    root = demo.make_demo_dataset(tmp_path, count=5)
    folder = root / "10_stripes"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 5
    for png in pngs:
        caption = png.with_suffix(".txt").read_text()
        assert caption.startswith("a ") and caption.split()[1] in COLORS
        img = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
        rows = img.mean(axis=1)
        assert rows[:8].mean() < 60 and rows[8:16].mean() > rows[:8].mean() + 40  # the black stripe band


def test_striped_style_is_what_the_dataset_draws():
    img = np.asarray(draw_striped(CENTRE, 64).convert("L"), dtype=np.float32)
    assert img[0:8].mean() < 30


def test_demo_build_writes_its_folder_atomically(tmp_path, monkeypatch):
    """A build that fails while saving leaves no folder that ensure_demo_model would take for a finished model."""
    cfg = demo.DemoBuildConfig(vae=Stage(1, 2e-3), unet=Stage(1, 1e-3), pool_size=8, batch_size=2)
    out = tmp_path / "model"
    built = demo.build_demo_model(out, cfg)
    assert (built / "model_index.json").is_file() and (built / "BUILD.json").is_file()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    from diffusers import StableDiffusionPipeline

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", disk_full)
    from lora_studio.errors import ExportError

    with pytest.raises(ExportError, match="No space left"):
        demo.build_demo_model(out, cfg)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before   # the earlier build is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["model"]                # no half-written folder beside it


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os

    from lora_studio.fileio import atomic_dir, write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "x")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "f").write_text("y")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask    # not mkstemp's owner-only 0600
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~mask
